"""Small corpora, tokenizers and configs for the training, data and evaluation tests (fast on 2 CPU cores)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a one old young quiet small bright dark cold warm tall".split(),
         "cat dog girl boy river house garden letter horse captain window road".split(),
         "saw found left watched followed opened crossed carried wanted remembered".split())


def corpus_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Pseudo-English with a little grammar, so a tiny model's loss has something to learn."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        adj, noun, verb = (rng.choice(w) for w in WORDS)
        adj2, noun2 = rng.choice(WORDS[0]), rng.choice(WORDS[1])
        lines.append(f"The {adj} {noun} {verb} {adj2} {noun2}.")
        if i % 7 == 6:
            lines.append("")
    return "\n".join(lines) + "\n"


def write_corpus(directory: Path, name: str = "train.txt", n_sentences: int = 400, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(corpus_text(n_sentences, seed), encoding="utf-8")
    return path


def tiny_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    from optlm.tokenizer_train import train_tokenizer

    out = directory / "tokenizer"
    train_tokenizer([write_corpus(directory / "tok-corpus", n_sentences=300, seed=99)], out,
                    vocab_size=vocab_size, show_progress=False)
    return out


def tiny_config(directory: Path, **overrides) -> Path:
    path = directory / "tiny-config.json"
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                  dropout=0.1, **overrides)
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


TOPICS = {"sea": "ship wave sailor harbour", "war": "soldier battle cannon siege", "farm": "cow harvest plough barn"}
FILLER = "the a of and to in is was he she it that".split()


def write_rows(path: Path, n: int, seed: int, label=lambda topic, r: topic) -> Path:
    """Texts of filler words and topic words; each row's topic decides its label (a separable task)."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            topic = r.choice(sorted(TOPICS))
            words = TOPICS[topic].split()
            text = " ".join(r.choice(FILLER + words) for _ in range(r.randint(4, 16))) + " " + r.choice(words)
            f.write(json.dumps({"text": text, "label": label(topic, r)}) + "\n")
    return path
