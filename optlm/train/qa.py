"""Extractive question answering data: SQuAD-format examples, long contexts cut into overlapping windows, and
the best answer span chosen back across the windows, in characters of the context.

A window is ``</s> question </s> context-piece`` (OPT's BOS, the question cut to ``max_question_tokens``, a
separator, then up to the rest of ``max_length`` context tokens). Consecutive windows of a context start
``stride`` tokens apart, so an answer cut by one window's edge lies whole in the next one (when it is shorter
than the overlap). For training, a window's target is the answer's first and last token when the whole
answer is inside it, else position 0 (the BOS token): "no answer in this window", as SQuAD 2.0 models do.

Reading accepts the official SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``) and JSONL
with one question per line (``{"id", "question", "context", "answers"}``, answers as ``{"text": [...],
"answer_start": [...]}`` or a list of ``{"text", "answer_start"}``); an empty answer list (or
``is_impossible``) is an unanswerable question.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import check_file, epoch_order, iter_jsonl
from ..tokenizer import Tokenizer
from .labelled import pad_rows


@dataclass
class Example:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character offset in the context); [] = unanswerable
    where: str  # file and line (or question id), for error messages


def _answers(raw, where: str) -> list[tuple[str, int]]:
    if isinstance(raw, dict):  # {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise ValueError(f"{where}: answers needs lists 'text' and 'answer_start' of the same length")
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if not isinstance(raw, list):
        raise ValueError(f"{where}: answers must be a list of {{'text', 'answer_start'}} objects")
    out = []
    for a in raw:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(a.get("answer_start"), int):
            raise ValueError(f"{where}: each answer needs a string 'text' and an integer 'answer_start', got {a!r}")
        out.append((a["text"], a["answer_start"]))
    return out


def _example(record: dict, where: str, context: str | None = None, require_answers: bool = True) -> Example:
    context = record.get("context") if context is None else context
    for key, value in (("question", record.get("question")), ("context", context)):
        if not isinstance(value, str):
            raise ValueError(f"{where} has no string field {key!r}")
    qid = str(record.get("id", where))
    if require_answers and "answers" not in record and not record.get("is_impossible"):
        raise ValueError(f"{where} has no field 'answers' (an empty list marks an unanswerable question)")
    answers = [] if record.get("is_impossible") else _answers(record.get("answers", []), where)
    for text, start in answers:
        if context[start:start + len(text)] != text:
            found = context[start:start + len(text)]
            raise ValueError(f"{where}: the answer {text!r} is not at character {start} of the context (the "
                             f"context has {found!r} there); fix answer_start")
    return Example(qid, record["question"], context, answers, where)


def read_examples(path: str | os.PathLike, require_answers: bool = True) -> list[Example]:
    """SQuAD JSON (``.json``) or JSONL (one question per line); every error names the file and line or id.
    ``require_answers=False`` reads questions to answer (no ``answers`` field needed)."""
    path = Path(path)
    check_file(path)
    examples = []
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid UTF-8 JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise ValueError(f"{path}: a SQuAD JSON file holds {{'data': [{{'paragraphs': [...]}}]}}")
        for article in doc["data"]:
            for paragraph in article.get("paragraphs", []):
                for qa in paragraph.get("qas", []):
                    where = f"{path} question {qa.get('id', '?')}"
                    examples.append(_example(qa, where, paragraph.get("context"), require_answers))
    else:
        examples = [_example(record, where, require_answers=require_answers) for _, where, record in iter_jsonl(path)]
    if not examples:
        raise ValueError(f"{path} has no questions")
    return examples


@dataclass(eq=False)
class Window:
    example: int  # index of its example
    ids: np.ndarray  # (T,) token ids
    context_start: int  # index of the first context token in ids
    offsets: list[tuple[int, int]]  # character span of each context token in the context
    start: int = 0  # training target (0: no answer in this window)
    end: int = 0


def windows(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int, stride: int,
            max_question_tokens: int = 64) -> list[Window]:
    """Every example's windows, in order; the targets from each example's first answer."""
    bos, sep = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for k, ex in enumerate(examples):
        q = tokenizer.encode_with_offsets(ex.question)[0][:max_question_tokens]
        ids, offsets = tokenizer.encode_with_offsets(ex.context)
        room = max_length - len(q) - 2
        if room < 8:
            raise ValueError(f"--block-size {max_length} leaves {room} tokens of context after the question; raise "
                             "it")
        step = max(room - stride, 1) if stride < room else room
        first = 0
        while True:
            piece = slice(first, first + room)
            w = Window(k, np.asarray([bos, *q, sep, *ids[piece]], dtype=np.int64), len(q) + 2, list(offsets[piece]))
            if ex.answers:
                w.start, w.end = _target(w, *ex.answers[0])
            out.append(w)
            if first + room >= len(ids):
                break
            first += step
    return out


def _target(w: Window, text: str, start_char: int) -> tuple[int, int]:
    """Token positions of the answer in ``w`` (first, last), or (0, 0) when it is not wholly inside."""
    end_char = start_char + len(text.rstrip())
    start_char += len(text) - len(text.lstrip())
    if not w.offsets or w.offsets[0][0] > start_char or w.offsets[-1][1] < end_char:
        return 0, 0
    s = next(i for i, (_, e) in enumerate(w.offsets) if e > start_char)
    e = max(i for i, (b, _) in enumerate(w.offsets) if b < end_char)
    return w.context_start + s, w.context_start + e


@dataclass
class Features:
    """Windows of a QA data set; training batches in a per-epoch shuffled order of windows."""

    examples: list[Example]
    windows: list[Window]
    pad_id: int
    seed: int = 0
    _order: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        chosen = [self.windows[i] for i in indices]
        input_ids, mask = pad_rows([w.ids for w in chosen], self.pad_id, side="right")
        return {"input_ids": input_ids, "attention_mask": mask,
                "start_positions": torch.tensor([w.start for w in chosen]),
                "end_positions": torch.tensor([w.end for w in chosen])}

    def train_batch(self, first_example: int, batch_size: int) -> dict[str, Tensor]:
        picked = []
        for k in range(first_example, first_example + batch_size):
            epoch, j = divmod(k, len(self.windows))
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, epoch_order(self.seed, epoch, len(self.windows)))
            picked.append(int(self._order[1][j]))
        return self.batch(picked)


@dataclass
class Answer:
    text: str
    score: float  # start + end logit of the span (of the no-answer position when text is "")
    null_score: float  # the best no-answer score over the example's windows


def best_answers(features: Features, start_logits: Tensor, end_logits: Tensor, max_answer_tokens: int = 30,
                 n_best: int = 20, allow_no_answer: bool = False, null_threshold: float = 0.0) -> list[Answer]:
    """The best valid span of each example across its windows: inside the context, start <= end, at most
    ``max_answer_tokens`` long, scored by start + end logit. With ``allow_no_answer`` (SQuAD 2.0) the answer is
    empty when the no-answer score (BOS's start + end logit, the smallest over the windows) beats the best span
    by more than ``null_threshold``."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for w, s_logits, e_logits in zip(features.windows, start_logits, end_logits, strict=True):
        ex = features.examples[w.example]
        null_here = float(s_logits[0] + e_logits[0])
        null[w.example] = min(null.get(w.example, null_here), null_here)
        n_ctx = len(w.offsets)
        s_ctx = s_logits[w.context_start:w.context_start + n_ctx]
        e_ctx = e_logits[w.context_start:w.context_start + n_ctx]
        starts = torch.topk(s_ctx, min(n_best, n_ctx)).indices.tolist()
        ends = torch.topk(e_ctx, min(n_best, n_ctx)).indices.tolist()
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = float(s_ctx[s] + e_ctx[e])
                if w.example not in best or score > best[w.example][0]:
                    text = ex.context[w.offsets[s][0]:w.offsets[e][1]].strip()
                    best[w.example] = (score, text)
    out = []
    for k in range(len(features.examples)):
        score, text = best.get(k, (float("-inf"), ""))
        if allow_no_answer and null[k] - score > null_threshold:
            out.append(Answer("", null[k], null[k]))
        else:
            out.append(Answer(text, score, null[k]))
    return out


def iter_batches(features: Features, batch_size: int) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    for start in range(0, len(features), batch_size):
        idx = list(range(start, min(start + batch_size, len(features))))
        yield idx, features.batch(idx)
