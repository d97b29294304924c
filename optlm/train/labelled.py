"""Labelled texts for sequence classification: JSONL or CSV / TSV rows read with line-numbered errors, the
label set, and batches padded on the left.

A row is a JSON object (or a CSV row under a header) with a text field and a label field (names chosen by the
caller). The label decides the
problem type unless one is given: a string or a whole number is one class (single-label), a list of them is a
set of classes (multi-label), any other number is a target value (regression). The classes are the sorted
distinct labels of the training file, named as strings (``id2label`` / ``label2id``, as transformers saves
them). Rows are padded on the left, so every row's last real token (the one OPT's classification head reads)
sits in the last column.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import check_file, epoch_order, iter_jsonl
from ..tokenizer import Tokenizer

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclass
class Row:
    text: str
    label: object  # str / int / float / list, as read
    line: int
    record: dict = field(default_factory=dict, repr=False)  # every field of the row, as read


def _csv_records(path: Path):
    """``(line, where, record)`` for each row of a CSV / TSV file with a header row (fields as strings; a label
    column of whole numbers reads as numbers, as a JSON file would give them)."""
    check_file(path)
    with open(path, newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            for record in reader:
                n = reader.line_num
                if not any((v or "").strip() for v in record.values()):
                    continue
                yield n, f"{path} line {n}", {k: _number(v) for k, v in record.items() if k is not None}
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 ({e.reason}); convert the file to UTF-8") from None
        except csv.Error as e:
            raise ValueError(f"{path} line {reader.line_num}: {e}") from None


def _number(value: str | None) -> object:
    """A CSV cell as a JSON value: whole and decimal numbers become numbers; an empty cell is missing."""
    if value is None or value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_records(path: str | os.PathLike):
    """``(line, where, record)`` for each row of a JSONL, CSV or TSV file (by its suffix; CSV / TSV need a
    header row naming the columns)."""
    path = Path(path)
    return _csv_records(path) if path.suffix in (".csv", ".tsv") else iter_jsonl(path)


def read_rows(path: str | os.PathLike, text_key: str, label_key: str | None) -> list[Row]:
    """Every row of a JSONL file (one object per line) or a CSV / TSV file with a header; ``label_key=None``
    reads texts only (prediction)."""
    rows = []
    for n, where, record in read_records(path):
        if isinstance(record.get(text_key), (int, float)):  # a CSV text cell that looks like a number
            record[text_key] = str(record[text_key])
        if not isinstance(record.get(text_key), str):
            raise ValueError(f"{where} has no string field {text_key!r} (the text); name the field with --text-key")
        if label_key is not None and record.get(label_key) is None:
            raise ValueError(f"{where} has no field {label_key!r} (the label); every row needs one — name the "
                             "field with --label-key")
        rows.append(Row(record[text_key], None if label_key is None else record[label_key], n, record))
    if not rows:
        raise ValueError(f"{path} has no examples (no non-blank lines)")
    return rows


def _kind(label: object) -> str:
    if isinstance(label, bool):
        return "bool"
    if isinstance(label, str):
        return "str"
    if isinstance(label, int) or (isinstance(label, float) and label.is_integer()):
        return "int"
    if isinstance(label, float):
        return "float"
    if isinstance(label, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in label):
        return "list"
    return "other"


def infer_problem_type(rows: Sequence[Row], path: str | os.PathLike) -> str:
    kinds = {}
    for r in rows:
        kind = _kind(r.label)
        if kind in ("bool", "other"):
            raise ValueError(f"{path} line {r.line}: label {r.label!r} is neither a class (a string or whole "
                             "number), a list of classes, nor a number")
        kinds.setdefault(kind, r)
    if "list" in kinds:
        if len(kinds) > 1:
            other = next(r for k, r in kinds.items() if k != "list")
            raise ValueError(f"{path} line {other.line}: label {other.label!r} is not a list, but line "
                             f"{kinds['list'].line}'s is; give every row a list of classes (multi-label)")
        return "multi_label_classification"
    if "float" in kinds:
        if "str" in kinds:
            raise ValueError(f"{path} line {kinds['str'].line}: label {kinds['str'].label!r} is a string, but "
                             f"line {kinds['float'].line}'s is a number; regression needs numbers throughout")
        return "regression"
    if len(kinds) > 1:
        raise ValueError(f"{path} line {kinds['str'].line}: label {kinds['str'].label!r} is a string, but line "
                         f"{kinds['int'].line}'s is a number; use one kind of label")
    return "single_label_classification"


def label_names(rows: Sequence[Row], problem_type: str) -> list[str] | None:
    """The classes, sorted (numbers by value); None for regression."""
    if problem_type == "regression":
        return None
    values = {x for r in rows for x in (r.label if isinstance(r.label, list) else [r.label])}
    numbers = all(_kind(v) == "int" for v in values)
    return [str(int(v)) if numbers else str(v) for v in sorted(values, key=(float if numbers else str))]


def encode_labels(rows: Sequence[Row], problem_type: str, label2id: dict[str, int] | None,
                  path: str | os.PathLike) -> Tensor:
    """(N,) class ids, (N, L) multi-hot floats, or (N,) float targets; an unknown class names its line."""
    if problem_type == "regression":
        bad = next((r for r in rows if _kind(r.label) not in ("int", "float")), None)
        if bad is not None:
            raise ValueError(f"{path} line {bad.line}: label {bad.label!r} is not a number (regression)")
        return torch.tensor([float(r.label) for r in rows], dtype=torch.float32)

    def class_id(value: object, r: Row) -> int:
        name = str(int(value)) if _kind(value) == "int" else str(value)
        if name not in label2id:
            raise ValueError(f"{path} line {r.line}: label {value!r} is not one of the model's classes "
                             f"({', '.join(label2id)}); it must appear in the training data")
        return label2id[name]

    if problem_type == "multi_label_classification":
        hot = torch.zeros(len(rows), len(label2id))
        for i, r in enumerate(rows):
            if _kind(r.label) != "list":
                raise ValueError(f"{path} line {r.line}: label {r.label!r} is not a list of classes (multi-label)")
            for v in r.label:
                hot[i, class_id(v, r)] = 1.0
        return hot
    for r in rows:
        if _kind(r.label) not in ("str", "int"):
            raise ValueError(f"{path} line {r.line}: label {r.label!r} is not a class (a string or whole number)")
    return torch.tensor([class_id(r.label, r) for r in rows], dtype=torch.long)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids of each text (BOS first), cut to ``max_length`` keeping the start; and how many were cut."""
    full = tokenizer(list(texts), truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in full)
    return [np.asarray(ids[:max_length], dtype=np.int64) for ids in full], cut


def pad_rows(rows: Sequence[np.ndarray], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` (B, longest row), padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, where] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, where] = 1
    return ids, mask


@dataclass
class LabelledTexts:
    """Token ids and labels; batches of left-padded rows in a per-epoch shuffled order."""

    ids: list[np.ndarray]
    labels: Tensor
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        input_ids, attention_mask = pad_rows([self.ids[i] for i in indices], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[list(indices)]}

    def example_index(self, k: int) -> int:
        epoch, j = divmod(k, len(self.ids))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.ids)))
        return int(self._order[1][j])

    def train_batch(self, first_example: int, batch_size: int) -> dict[str, Tensor]:
        return self.batch([self.example_index(first_example + b) for b in range(batch_size)])
