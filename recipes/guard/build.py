"""Training data for a domain guard: is a prompt about the novels this deployment serves (``in_domain``), other
text (``out_of_domain``), or an attempt to override the model's instructions (``injection``)?

    python recipes/guard/build.py --data ../shared/data --out runs/guard-data

- in_domain: passages of 8-60 words from the Project Gutenberg novels (``DATA/gutenberg``); three whole novels
  are held out for validation;
- out_of_domain: passages from WikiText-2 (``valid.txt`` for training, ``test.txt`` for validation) and Tiny
  Shakespeare (the first 80 % for training, the rest for validation);
- injection: the hand-written attempts in ``injections.jsonl`` beside this script (every fifth held out for
  validation), each alone and wrapped in a novel passage before or after it, as an attack hidden in a
  story request would be.

Writes ``train.jsonl`` and ``val.jsonl`` (``{"text", "label"}``) and prints the counts. Train with
``--class-weights balanced``: the injection class is small.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

from optlm.data import unwrap  # noqa: E402

HELD_OUT = ("kidnapped", "the-time-machine", "frankenstein")


def chunks(text: str, n: int, rng: random.Random, low: int = 8, high: int = 60) -> list[str]:
    """``n`` passages of ``low``-``high`` words starting at random words of ``text``."""
    words = text.split()
    out = []
    for _ in range(n):
        size = rng.randint(low, high)
        start = rng.randrange(0, max(len(words) - size, 1))
        out.append(" ".join(words[start:start + size]))
    return out


def wikitext(path: Path) -> str:
    """WikiText's article text without its ``= Heading =`` lines."""
    lines = [line.strip() for line in path.read_text("utf-8").splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("="))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory with gutenberg/, wikitext-2/ and "
                        "tinyshakespeare/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=1500, help="training passages per text class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    books = sorted((args.data / "gutenberg").glob("*.txt"))
    if not books:
        parser.error(f"{args.data / 'gutenberg'} has no .txt novels")
    for name in ("wikitext-2/valid.txt", "wikitext-2/test.txt", "tinyshakespeare/input.txt"):
        if not (args.data / name).is_file():
            parser.error(f"{args.data / name} is missing")
    rng = random.Random(args.seed)
    novels = {b.stem: unwrap(b.read_text("utf-8")) for b in books}
    novel = {"train": " ".join(t for k, t in novels.items() if k not in HELD_OUT),
             "val": " ".join(t for k, t in novels.items() if k in HELD_OUT)}
    shakespeare = (args.data / "tinyshakespeare" / "input.txt").read_text("utf-8")
    cut = int(len(shakespeare) * 0.8)
    other = {"train": (wikitext(args.data / "wikitext-2" / "valid.txt"), shakespeare[:cut]),
             "val": (wikitext(args.data / "wikitext-2" / "test.txt"), shakespeare[cut:])}
    attempts = [json.loads(line)["text"] for line in (HERE / "injections.jsonl").read_text("utf-8").splitlines()]
    held = {"train": [a for i, a in enumerate(attempts) if i % 5], "val": attempts[::5]}

    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        n = args.per_class if split == "train" else args.per_class // 5
        rows = [{"text": t, "label": "in_domain"} for t in chunks(novel[split], n, rng)]
        wiki, play = other[split]
        rows += [{"text": t, "label": "out_of_domain"} for t in chunks(wiki, n // 2, rng) + chunks(play, n - n // 2,
                                                                                                        rng)]
        for attack in held[split]:
            before, after = chunks(novel[split], 2, rng, 5, 30)
            rows += [{"text": t, "label": "injection"} for t in (attack, f"{before} {attack}", f"{attack} {after}")]
        rng.shuffle(rows)
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        counts = {label: sum(r["label"] == label for r in rows) for label in ("in_domain", "out_of_domain",
                                                                              "injection")}
        print(f"{args.out / (split + '.jsonl')}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
