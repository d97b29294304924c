"""Who wrote this passage? Fine-tuning the bundled model as an author classifier on Project Gutenberg novels,
against a TF-IDF + logistic-regression baseline on the same split.

    python benchmarks/authorship.py --gutenberg ../shared/data/gutenberg --markdown benchmarks/RESULTS.md

Seven authors with at least two novels among the files; for each, one whole novel is held out for validation
(never a passage of a training novel), so the classifier has to recognise the author, not the book. Passages
are ~120 words of unwrapped text (consecutive paragraphs), at most ``--train-per-author`` / ``--val-per-author``
per author, drawn with a fixed seed. The fine-tuned runs are real ``optlm train --task sequence-classification``
processes (full fine-tuning, and LoRA r=8 on q/v with a trainable head) from the bundled model (or
``--model``); their scores
are ``optlm eval`` on the ``best/`` checkpoint. Requires scikit-learn (a test dependency).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from optlm.benchmark import publish
from optlm.data import unwrap

# author: (training novels, the held-out novel). Kidnapped and The Time Machine are also the two books the
# bundled model never saw in pre-training; the other held-out novels were part of its (unlabelled) text.
AUTHORS = {
    "Dickens": (["a-tale-of-two-cities", "great-expectations", "oliver-twist"], "a-christmas-carol"),
    "Twain": (["adventures-of-huckleberry-finn", "the-adventures-of-tom-sawyer"], "the-prince-and-the-pauper"),
    "Austen": (["emma", "pride-and-prejudice"], "sense-and-sensibility"),
    "Doyle": (["the-adventures-of-sherlock-holmes"], "the-hound-of-the-baskervilles"),
    "Stevenson": (["treasure-island"], "kidnapped"),
    "Wells": (["the-war-of-the-worlds"], "the-time-machine"),
    "London": (["white-fang"], "the-call-of-the-wild"),
}


def passages(text: str, words: int) -> list[str]:
    """Consecutive paragraphs joined until ~``words`` words; longer paragraphs are cut."""
    out, current = [], []
    for para in unwrap(text).split("\n\n"):
        tokens = para.split()
        while tokens:
            room = words - len(current)
            current += tokens[:room]
            tokens = tokens[room:]
            if len(current) >= words:
                out.append(" ".join(current))
                current = []
    return out


def build(gutenberg: Path, out: Path, words: int, train_n: int, val_n: int, seed: int) -> dict[str, Path]:
    rng = random.Random(seed)
    files = {}
    for split, n in (("train", train_n), ("val", val_n)):
        rows = []
        for author, (train_books, val_book) in AUTHORS.items():
            books = train_books if split == "train" else [val_book]
            found = [p for p in passages("\n\n".join((gutenberg / f"{b}.txt").read_text("utf-8") for b in books),
                                         words)]
            rows += [{"text": t, "label": author} for t in rng.sample(found, min(n, len(found)))]
        rng.shuffle(rows)
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return files


def baseline(files: dict[str, Path]) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    def read(p):
        rows = [json.loads(line) for line in p.read_text("utf-8").splitlines()]
        return [r["text"] for r in rows], [r["label"] for r in rows]

    (xt, yt), (xv, yv) = read(files["train"]), read(files["val"])
    t0 = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(vec.fit_transform(xt), yt)
    pred = clf.predict(vec.transform(xv))
    return {"accuracy": accuracy_score(yv, pred), "macro_f1": f1_score(yv, pred, average="macro"),
            "seconds": time.perf_counter() - t0}


def finetune(files: dict[str, Path], out: Path, model: str, extra: list[str], steps: int,
             lr: float) -> dict[str, float]:
    argv = [sys.executable, "-m", "optlm.cli", "train", "--task", "sequence-classification", "--model",
            model, "--data", str(files["train"]), "--val-data", str(files["val"]), "--out", str(out),
            "--overwrite", "--max-steps", str(steps), "--batch-size", "16", "--lr", str(lr), "--warmup-steps",
            str(steps // 10), "--eval-every", str(max(steps // 6, 1)), "--save-every", str(steps),
            "--block-size", "256", "--dropout", "0.1", "--dtype", "fp32", "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    best = out / "best"
    source = ["--adapter", str(best)] if (best / "adapter_config.json").is_file() else ["--model", str(best)]
    m = json.loads(subprocess.run([sys.executable, "-m", "optlm.cli", "eval", "--task", "sequence-classification",
                                   *source, "--data", str(files["val"]), "--batch-size", "16", "--json"], check=True,
                                  capture_output=True, text=True).stdout)
    step = json.loads((best / "best.json").read_text())["step"]
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": seconds, "best_step": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gutenberg", type=Path, required=True, help="directory of the novels' .txt files")
    parser.add_argument("--out", type=Path, default=Path("runs/authorship"), help="data and runs go here")
    parser.add_argument("--model", default="opt-gutenberg", help="the checkpoint to fine-tune (dir or hub id)")
    parser.add_argument("--words", type=int, default=120, help="words per passage")
    parser.add_argument("--train-per-author", type=int, default=300)
    parser.add_argument("--val-per-author", type=int, default=80)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of each fine-tuning run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args(argv)

    missing = [b for books, held in AUTHORS.values() for b in [*books, held]
               if not (args.gutenberg / f"{b}.txt").is_file()]
    if missing:
        parser.error(f"{args.gutenberg} lacks {', '.join(m + '.txt' for m in missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    files = build(args.gutenberg, args.out, args.words, args.train_per_author, args.val_per_author, args.seed)
    counts = {s: sum(1 for _ in open(p)) for s, p in files.items()}
    print(f"{len(AUTHORS)} authors, {counts['train']} training and {counts['val']} validation passages of "
          f"{args.words} words (validation: one whole held-out novel per author)", flush=True)
    rows = []
    r = baseline(files)
    rows.append(f"| TF-IDF (1-2 grams) + logistic regression | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                f"{r['seconds']:.0f} | |")
    print(rows[-1], flush=True)
    for kind, extra, lr in (("full fine-tuning", [], 1e-4),
                            ("LoRA r=8 (q_proj, v_proj) + head", ["--lora", "r=8,alpha=16"], 1e-3)):
        name = f"{args.model}, {kind}"
        r = finetune(files, args.out / kind.split(" ")[0].lower(), args.model, extra, args.steps, lr)
        rows.append(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['seconds']:.0f} | "
                    f"{r['best_step']} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Author of a {args.words}-word passage, {len(AUTHORS)} authors, one whole novel per author held out "
        f"({counts['train']} training / {counts['val']} validation passages):", "",
        "| model | accuracy | macro-F1 | seconds (train) | best step |", "|---|---|---|---|---|", *rows])
    return publish(table, args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
