"""Using a fine-tuned task model: load a classifier or an extractive QA reader (a checkpoint, or a base model
plus an adapter trained with ``--task ...``), predict labels with probabilities or answers with scores, and
score it on labelled data with the metrics the trainer validates with."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, resolve
from ..hf import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
from ..tokenizer import Tokenizer
from . import labelled, metrics, qa
from .tasks import TASKS, QuestionAnswering, SequenceClassification, classifier_logits, qa_logits

TASK_FILE = "task.json"  # beside an adapter trained on a task: the head's config fields (labels, problem type)
TASK_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")


def write_task_file(model: nn.Module, directory: Path, task: str) -> None:
    """Record what a task head needs beyond the adapter (peft keeps these in the base model's config)."""
    c = model.config
    fields = {k: getattr(c, k) for k in TASK_FIELDS}
    (directory / TASK_FILE).write_text(json.dumps({"task": task, **fields}, indent=1) + "\n", "utf-8")


@dataclass
class Classifier:
    model: nn.Module
    tokenizer: Tokenizer
    max_length: int
    progress: bool = False  # a progress bar on stderr over the texts

    @property
    def labels(self) -> list[str]:
        c = self.model.config
        return [c.id2label[i] for i in range(c.num_labels)] if c.id2label else \
            [f"LABEL_{i}" for i in range(c.num_labels)]

    @property
    def problem_type(self) -> str:
        c = self.model.config
        return c.problem_type or ("regression" if c.num_labels == 1 else "single_label_classification")

    def task(self) -> SequenceClassification:
        """The training task's scoring, set to this model's classes."""
        task = SequenceClassification()
        task.problem_type, task.labels = self.problem_type, None if self.problem_type == "regression" else self.labels
        return task

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 16) -> Tensor:
        """(N, num_labels) float32 logits, each text cut to ``max_length`` tokens (its start kept)."""
        ids, _ = labelled.encode_texts(self.tokenizer, texts, self.max_length)
        device = next(self.model.parameters()).device
        return classifier_logits(self.model, ids, self.tokenizer.pad_token_id, batch_size, device, self.progress)

    def predict(self, texts: list[str], batch_size: int = 16, threshold: float = 0.5) -> list[dict[str, Any]]:
        """Per text: ``label`` and its probability ``score`` and all ``probs`` (single-label); ``labels`` over
        ``threshold`` and ``probs`` (multi-label); ``value`` (regression)."""
        logits = self.logits(texts, batch_size)
        out = []
        if self.problem_type == "regression":
            return [{"value": float(v)} for v in logits[:, 0]]
        multi = self.problem_type == "multi_label_classification"
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, -1)
        for row in probs.tolist():
            named = dict(zip(self.labels, row, strict=True))
            if multi:
                out.append({"labels": [n for n, p in named.items() if p > threshold], "probs": named})
            else:
                best = max(range(len(row)), key=row.__getitem__)
                out.append({"label": self.labels[best], "score": row[best], "probs": named})
        return out


def _load(cls: type, head: str, task: str, model: str | os.PathLike | None, adapter: str | os.PathLike | None,
          device: Any, dtype: Any) -> tuple[nn.Module, Tokenizer]:
    """A task model from a checkpoint, or a base model plus an adapter trained on ``task`` (its head comes
    with the adapter); a checkpoint without the head is refused rather than run with a random one."""
    fields: dict[str, Any] = {}
    tokenizer_dir = model
    if adapter is not None:
        from ..adapters import PeftModel, read_config

        adapter_dir, config = read_config(adapter)
        task_file = adapter_dir / TASK_FILE
        saved = json.loads(task_file.read_text("utf-8")) if task_file.is_file() else {}
        if saved.get("task") != task:
            raise CheckpointError(f"{adapter_dir} is not an adapter trained with --task {task} (no {TASK_FILE} "
                                  "naming that task)")
        if task == SequenceClassification.name:  # the head's size and labels, as peft keeps them in the base
            fields = {k: v for k, v in saved.items() if k in TASK_FIELDS}
            if fields.get("id2label") is not None:  # JSON object keys are strings
                fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
        model = model or config.base_model_name_or_path
        if model is None:
            raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; pass --model")
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else model
    if model is None:
        raise ValueError(f"give --model: a fine-tuned checkpoint (or the base model of --adapter) for {task}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = cls.from_pretrained(model, dtype=dtype, device=device, **fields)
    for w in caught:
        missing = f"{head}.weight not in the checkpoint" in str(w.message)
        if missing and adapter is None:
            raise CheckpointError(f"{resolve(model)} has no {task} head ({head}.weight): it is not fine-tuned for "
                                  f"that task; train one with optlm train --task {task}")
        if not missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter).base_model
    if net.config.pad_token_id is None:
        raise CheckpointError(f"{model} has no pad_token_id in its config; batches need one")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    TASKS[task]().align_pad(net, tokenizer, str(model))
    return net.eval(), tokenizer


def _length(net: nn.Module, max_length: int | None, default: int) -> int:
    limit = net.config.max_position_embeddings
    if max_length is not None and not 1 <= max_length <= limit:
        raise ValueError(f"--max-length must be between 1 and the model's context ({limit}), got {max_length}")
    return max_length or min(default, limit)


def load_classifier(model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, dtype: Any = None,
                    max_length: int | None = None) -> Classifier:
    """A sequence classifier from a checkpoint directory or hub id, or a base model plus an adapter directory
    trained with ``optlm train --task sequence-classification --lora/--adapter`` (base: ``model``, or the one
    the adapter names)."""
    net, tokenizer = _load(AutoModelForSequenceClassification, "score", SequenceClassification.name, model, adapter,
                           device, dtype)
    return Classifier(net, tokenizer, _length(net, max_length, net.config.max_position_embeddings))


@dataclass
class Reader:
    """An extractive QA model: answers from contexts of any length (overlapping windows)."""

    model: nn.Module
    tokenizer: Tokenizer
    max_length: int
    doc_stride: int = 128
    max_answer_length: int = 30
    progress: bool = False  # a progress bar on stderr over the windows

    @torch.no_grad()
    def answer(self, examples: list[qa.Example], batch_size: int = 16,
               allow_no_answer: bool = False) -> list[qa.Answer]:
        stride = min(self.doc_stride, self.max_length // 2)
        features = qa.Features(examples, qa.windows(self.tokenizer, examples, self.max_length, stride),
                               self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        start, end = qa_logits(self.model, features, batch_size, device, self.progress)
        return qa.best_answers(features, start, end, self.max_answer_length, allow_no_answer=allow_no_answer)


def load_reader(model: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
                device: str | torch.device | None = None, dtype: Any = None, max_length: int | None = None,
                doc_stride: int = 128, max_answer_length: int = 30) -> Reader:
    """An extractive QA model (a checkpoint, or a base model plus an adapter trained with ``--task
    question-answering``); windows of ``max_length`` tokens (default 384, at most the model's context)."""
    net, tokenizer = _load(AutoModelForQuestionAnswering, "qa_outputs", QuestionAnswering.name, model, adapter, device,
                           dtype)
    return Reader(net, tokenizer, _length(net, max_length, 384), doc_stride, max_answer_length)


def task_of(model: str | os.PathLike | None, adapter: str | os.PathLike | None) -> str:
    """Which task a fine-tuned checkpoint or adapter was trained for (from task.json or the saved class)."""
    if adapter is not None:
        from ..adapters import read_config

        directory, _ = read_config(adapter)
        if (directory / TASK_FILE).is_file():
            return json.loads((directory / TASK_FILE).read_text("utf-8")).get("task", "")
        return ""
    if model is None:
        return ""
    config = resolve(model) / "config.json"
    archs = (json.loads(config.read_text("utf-8")).get("architectures") or []) if config.is_file() else []
    arch = archs[0] if archs else ""
    for suffix, task in (("ForQuestionAnswering", QuestionAnswering.name),
                         ("ForSequenceClassification", SequenceClassification.name)):
        if arch.endswith(suffix):
            return task
    return ""


def answer_file(reader: Reader, data: str | os.PathLike, batch_size: int = 16,
                allow_no_answer: bool = False) -> list[dict[str, Any]]:
    """``{"id", "question", "answer", "score"}`` for each question of a SQuAD JSON / JSONL file, in order."""
    examples = qa.read_examples(data, require_answers=False)
    found = reader.answer(examples, batch_size, allow_no_answer)
    return [{"id": ex.id, "question": ex.question, "answer": a.text, "score": a.score}
            for ex, a in zip(examples, found, strict=True)]


def evaluate_qa_file(reader: Reader, data: str | os.PathLike, batch_size: int = 16) -> dict[str, Any]:
    """SQuAD's exact match and F1 on ``data`` (no-answer predictions allowed when it has unanswerable
    questions, as SQuAD 2.0 scores them)."""
    examples = qa.read_examples(data)
    allow = any(not e.answers for e in examples)
    found = reader.answer(examples, batch_size, allow)
    return metrics.squad_metrics({str(k): a.text for k, a in enumerate(found)},
                                 {str(k): [t for t, _ in e.answers] for k, e in enumerate(examples)})


def predict_file(clf: Classifier, data: str | os.PathLike, text_key: str = "text", batch_size: int = 16,
                 threshold: float = 0.5) -> list[dict[str, Any]]:
    """Each row of ``data`` (JSONL, CSV or TSV) with the prediction added (``predicted_label``/``score``/``probs``, or
    ``predicted_labels``, or ``predicted_value``), in order."""
    rows = labelled.read_rows(data, text_key, None)
    out = []
    for row, prediction in zip(rows, clf.predict([r.text for r in rows], batch_size, threshold), strict=True):
        named = {("predicted_" + k if k in ("label", "labels", "value") else k): v for k, v in prediction.items()}
        out.append({**row.record, **named})
    return out


def evaluate_file(clf: Classifier, data: str | os.PathLike, text_key: str = "text", label_key: str = "label",
                  batch_size: int = 16) -> dict[str, Any]:
    """The validation metrics of the trainer (loss, accuracy, F1, per label, confusion matrix) on ``data``."""
    rows = labelled.read_rows(data, text_key, label_key)
    task = clf.task()
    label2id = None if task.labels is None else {n: i for i, n in enumerate(task.labels)}
    y = labelled.encode_labels(rows, task.problem_type, label2id, data)
    logits = clf.logits([r.text for r in rows], batch_size)
    return {"loss": float(task.loss_of(logits, y)), **task.scores(logits, y), "examples": len(rows)}


def report(clf: Classifier, m: dict[str, Any]) -> str:
    return metrics.format_report({k: v for k, v in m.items() if k != "examples"},
                                 None if clf.problem_type == "regression" else clf.labels)
