"""What the one training loop (trainer.py) needs to know about each kind of run: the model class, the data,
the loss of a batch and the validation metrics.

- ``causal-lm``: next-token prediction on packed blocks of text (`*ForCausalLM` of the model's family);
- ``sequence-classification``: a label per text (`*ForSequenceClassification`): single-label, multi-label
  or regression (``problem_type``), accuracy / F1 / confusion matrix while validating;
- ``question-answering``: extractive QA on SQuAD-format data (`*ForQuestionAnswering`): contexts in
  overlapping windows, the best span across them, SQuAD's exact match and F1 while validating.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..data import BlockDataset, epoch_order, split_tokens, tokenize_files
from ..hf import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification
from ..models.core import Frame
from ..tokenizer import Tokenizer
from . import labelled, metrics, qa

LOSS_CHUNK = 128  # positions whose logits exist at once in the LM loss (see lm_loss)


class Task:
    """The per-task parts of a training run; one instance per run."""

    name = ""
    model_class: type = AutoModelForCausalLM  # from_pretrained / from_config pick the checkpoint's family
    adapter_task_type: str | None = None  # peft's task_type for an adapter trained on this task
    heads: tuple[str, ...] = ()  # freshly initialised modules an adapter run trains whole (peft's modules_to_save)

    def config_overrides(self, args: Any) -> dict[str, Any]:
        """Config fields the data decides (read before the model is built)."""
        return {}

    def check_model(self, model: nn.Module, source: str) -> None:
        """Refuse a built model the task cannot use (the message names the fix): a task head reads padded
        batches, so it needs a pad token."""
        if self.heads and model.config.pad_token_id is None:
            eos = model.config.eos_token_id
            raise ValueError(f"{source} has no pad_token_id in its config; padded batches need one (--set "
                             f"pad_token_id=1 for OPT's tokenizer; a family without a pad token, like GPT-Neo, "
                             f"pads with its EOS: --set pad_token_id={eos})")

    def align_pad(self, model: nn.Module, tokenizer: Any, source: str) -> None:
        """Batches must be padded with the id the head skips (``config.pad_token_id``): a tokenizer without a
        pad token (GPT-Neo's) takes the config's; one with a different pad token is refused."""
        if not self.heads:
            return
        pad = model.config.pad_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.special_tokens_map["pad_token"] = tokenizer.convert_ids_to_tokens(pad)
        elif tokenizer.pad_token_id != pad:
            raise ValueError(f"{source}: the tokenizer pads with id {tokenizer.pad_token_id} but the model's config "
                             f"says pad_token_id={pad}; the head would read padding as text — set pad_token_id="
                             f"{tokenizer.pad_token_id} (--set) or use the model's own tokenizer")

    def hold_out(self, items: list, args: Any, what: str) -> tuple[list, list]:
        """Training and validation items without --val-data: a --val-fraction drawn with the seed (from an
        'epoch' training never reaches), each part in file order."""
        order = epoch_order(args.seed, 2**31, len(items))
        n_val = max(1, int(len(items) * args.val_fraction))
        if len(items) - n_val < 1:
            raise ValueError(f"{args.data[0]} has {len(items)} {what}: too few to hold out --val-fraction "
                             f"{args.val_fraction} for validation; add {what} or pass --val-data")
        return [items[i] for i in sorted(order[n_val:])], [items[i] for i in sorted(order[:n_val])]

    def datasets(self, args: Any, tokenizer: Tokenizer, out: Path) -> tuple[Any, Any]:
        raise NotImplementedError

    def train_batch(self, data: Any, first_example: int, batch_size: int) -> dict[str, Tensor]:
        return data.train_batch(first_example, batch_size)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def validate(self, model: nn.Module, val: Any, args: Any, device: torch.device) -> dict[str, Any]:
        """Metrics over the validation data (called in eval mode, without gradients): at least ``val_loss``."""
        raise NotImplementedError

    def default_best_metric(self) -> str | None:
        return None

    def summary(self, m: dict[str, Any]) -> str:
        return f"val loss {m['val_loss']:.4f}"

    def after_validation(self, m: dict[str, Any], directory: Path) -> None:
        """Write what a validation leaves beside the metrics (e.g. a confusion-matrix picture)."""


# ---- causal LM ------------------------------------------------------------------------------------------

def lm_loss(head: nn.Module, hidden: Tensor, targets: Tensor, rows: int = LOSS_CHUNK) -> Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` ``(B, T, e)`` against ``targets`` ``(B, T)``.

    The logits are made ``rows`` positions at a time and made again in the backward pass instead of kept, so
    the (tokens x vocabulary) logits, their log-softmax and their gradient never exist whole: for a batch of
    4 x 256 tokens over OPT's 50,272-token vocabulary each of the three is 196 MiB whole and 25 MiB per chunk."""
    h, t = hidden.flatten(0, 1), targets.flatten()  # (N, e), (N,)
    total = None
    for start in range(0, h.shape[0], rows):
        part = checkpoint(_summed_loss, head, h[start:start + rows], t[start:start + rows], use_reentrant=False) \
            if torch.is_grad_enabled() else _summed_loss(head, h[start:start + rows], t[start:start + rows])
        total = part if total is None else total + part
    return total / t.numel()


def _summed_loss(head: nn.Module, h: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


class CausalLM(Task):
    name = "causal-lm"
    model_class = AutoModelForCausalLM
    adapter_task_type = "CAUSAL_LM"

    def datasets(self, args: Any, tokenizer: Tokenizer, out: Path) -> tuple[BlockDataset, BlockDataset]:
        cache = out / "data"
        tokens = tokenize_files(args.data, tokenizer, cache, args.jsonl_key, name="train", unwrapped=args.unwrap)
        if args.val_data:
            train_tokens = tokens
            val_tokens = tokenize_files(args.val_data, tokenizer, cache, args.jsonl_key, name="val",
                                        unwrapped=args.unwrap)
        else:
            train_tokens, val_tokens = split_tokens(tokens, args.val_fraction, args.block_size)
        for name, t in (("training", train_tokens), ("validation", val_tokens)):
            if len(t) < args.block_size + 1:
                raise ValueError(f"the {name} data has {len(t)} tokens, fewer than one block of --block-size "
                                 f"{args.block_size} + 1; add data or lower --block-size")
        return BlockDataset(train_tokens, args.block_size, args.seed), BlockDataset(val_tokens, args.block_size)

    def train_batch(self, data: BlockDataset, first_example: int, batch_size: int) -> dict[str, Tensor]:
        x, y = data.train_batch(first_example, batch_size)
        return {"input_ids": x, "labels": y}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        hidden = model.get_decoder()(ids, Frame.causal(*ids.shape, ids.device))  # (B, T, e)
        return lm_loss(model.get_output_embeddings(), hidden, batch["labels"])

    def validate(self, model: nn.Module, val: BlockDataset, args: Any, device: torch.device) -> dict[str, Any]:
        """Mean loss over the first ``eval_batches`` batches of validation blocks (the same blocks every time)."""
        n = min(len(val), args.eval_batches * args.batch_size)
        total = 0.0
        for start in range(0, n, args.batch_size):
            x, y = val.batch(range(start, min(start + args.batch_size, n)))
            total += self.loss(model, {"input_ids": x.to(device), "labels": y.to(device)}).item() * len(x)
        loss = total / n
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700))}

    def summary(self, m: dict[str, Any]) -> str:
        return f"val loss {m['val_loss']:.4f}, val ppl {m['val_ppl']:.2f}"


# ---- sequence classification ------------------------------------------------------------------------------

def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, file=sys.stderr, leave=False)


def classifier_logits(model: nn.Module, ids: Sequence[np.ndarray], pad_id: int, batch_size: int,
                      device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """(N, num_labels) float32 logits of each row, in order; rows are batched by length (less padding)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.num_labels)
    with _bar(len(ids), "classify", progress) as bar:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            input_ids, mask = labelled.pad_rows([ids[i] for i in chosen], pad_id)
            out[chosen] = model(input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            bar.update(len(chosen))
    return out


def parse_class_weights(spec: str, labels: Sequence[str], counts: Tensor) -> Tensor:
    """``balanced`` (n / (classes x count), scikit-learn's) or ``LABEL=W,LABEL=W,...`` (unnamed classes 1)."""
    if spec == "balanced":
        return counts.sum() / (len(labels) * counts.float())
    weights = torch.ones(len(labels))
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in labels:
            raise ValueError(f"--class-weights {item!r}: use 'balanced' or LABEL=WEIGHT pairs over the classes "
                             f"({', '.join(labels)})")
        try:
            weights[labels.index(name)] = float(value)
        except ValueError:
            raise ValueError(f"--class-weights {item!r}: {value!r} is not a number") from None
        if not math.isfinite(weights[labels.index(name)]) or weights[labels.index(name)] < 0:
            raise ValueError(f"--class-weights {item!r}: weights must be finite and >= 0")
    return weights


class SequenceClassification(Task):
    name = "sequence-classification"
    model_class = AutoModelForSequenceClassification
    adapter_task_type = "SEQ_CLS"
    heads = ("score",)

    def __init__(self) -> None:
        self.problem_type: str | None = None
        self.labels: list[str] | None = None
        self.rows: list[labelled.Row] = []
        self.weight: Tensor | None = None

    def _read(self, files: Sequence[str], args: Any) -> list[labelled.Row]:
        return [r for f in files for r in labelled.read_rows(f, args.jsonl_key, args.label_key)]

    def config_overrides(self, args: Any) -> dict[str, Any]:
        self.rows = self._read(args.data, args)
        where = args.data[0] if len(args.data) == 1 else ", ".join(args.data)
        self.problem_type = args.problem_type or labelled.infer_problem_type(self.rows, where)
        self.labels = labelled.label_names(self.rows, self.problem_type)
        if self.labels is None:
            return {"num_labels": 1, "id2label": None, "label2id": None, "problem_type": self.problem_type}
        if len(self.labels) < 2 and self.problem_type == "single_label_classification":
            raise ValueError(f"{where}: every row has the label {self.labels[0]!r}; a classifier needs at least two "
                             "classes")
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}, "problem_type": self.problem_type}

    def datasets(self, args: Any, tokenizer: Tokenizer, out: Path):
        if args.unwrap:
            raise ValueError("--unwrap applies to causal-lm text files; classification reads one text per row")
        if args.val_data:
            train_rows, val_rows = self.rows, self._read(args.val_data, args)
        else:
            train_rows, val_rows = self.hold_out(self.rows, args, "rows")
        label2id = None if self.labels is None else {n: i for i, n in enumerate(self.labels)}
        sets = []
        for rows, files in ((train_rows, args.data), (val_rows, args.val_data or args.data)):
            where = files[0] if len(files) == 1 else ", ".join(files)
            y = labelled.encode_labels(rows, self.problem_type, label2id, where)
            ids, cut = labelled.encode_texts(tokenizer, [r.text for r in rows], args.block_size)
            if cut:
                warnings.warn(f"{cut} of {len(rows)} texts in {where} are longer than --block-size "
                              f"{args.block_size} tokens and were cut to their first {args.block_size}",
                              stacklevel=2)
            sets.append(labelled.LabelledTexts(ids, y, tokenizer.pad_token_id, args.seed))
        if args.class_weights is not None:
            if self.problem_type != "single_label_classification":
                raise ValueError("--class-weights needs single-label classification")
            counts = torch.bincount(sets[0].labels, minlength=len(self.labels))
            self.weight = parse_class_weights(args.class_weights, self.labels, counts)
        return sets[0], sets[1]

    def loss_of(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss of (N, num_labels) logits against labels (class weights included)."""
        logits = logits.float()
        if self.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels, reduction=reduction)
        if self.problem_type == "multi_label_classification":
            loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
            return loss.mean() if reduction == "mean" else loss.sum()
        weight = None if self.weight is None else self.weight.to(logits.device)
        return F.cross_entropy(logits, labels, weight=weight, reduction=reduction)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, num_labels)
        return self.loss_of(logits, batch["labels"])

    def validate(self, model: nn.Module, val: labelled.LabelledTexts, args: Any,
                 device: torch.device) -> dict[str, Any]:
        """Loss and metrics over every validation row."""
        logits = classifier_logits(model, val.ids, val.pad_id, args.batch_size, device)
        if self.weight is not None:  # the weighted mean, as the training loss
            w = self.weight[val.labels]
            loss = float(self.loss_of(logits, val.labels, "none").sum() / w.sum())
        else:
            loss = float(self.loss_of(logits, val.labels))
        return {"val_loss": loss, **self.scores(logits, val.labels)}

    def scores(self, logits: Tensor, labels: Tensor) -> dict[str, Any]:
        if self.problem_type == "regression":
            return metrics.regression_metrics(labels.tolist(), logits.squeeze(-1).tolist())
        if self.problem_type == "multi_label_classification":
            return metrics.multilabel_metrics(labels.numpy() > 0.5, torch.sigmoid(logits).numpy() > 0.5,
                                              self.labels)
        return metrics.classification_metrics(labels.tolist(), logits.argmax(-1).tolist(), self.labels)

    def default_best_metric(self) -> str | None:
        return "val_loss" if self.problem_type == "regression" else "macro_f1"

    def summary(self, m: dict[str, Any]) -> str:
        if self.problem_type == "regression":
            return f"val loss {m['val_loss']:.4f}, mae {m['mae']:.4f}, r2 {m['r2']:.4f}"
        return f"val loss {m['val_loss']:.4f}, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"

    def after_validation(self, m: dict[str, Any], directory: Path) -> None:
        """``validation.txt`` (headline numbers, the per-label table, the confusion matrix) and
        ``confusion.png``."""
        (directory / "validation.txt").write_text(metrics.format_report(m, self.labels) + "\n", "utf-8")
        if "confusion_matrix" in m:
            metrics.plot_confusion(m["confusion_matrix"], self.labels, directory / "confusion.png",
                                   f"validation, accuracy {m['accuracy']:.3f}")


# ---- extractive question answering -------------------------------------------------------------------------

def qa_logits(model: nn.Module, features: qa.Features, batch_size: int, device: torch.device | str = "cpu",
              progress: bool = False) -> tuple[Tensor, Tensor]:
    """Start and end logits of every window, (windows, longest window) float32 each (padding at the end)."""
    width = max(len(w.ids) for w in features.windows)
    start = torch.full((len(features), width), float("-inf"))
    end = torch.full((len(features), width), float("-inf"))
    with _bar(len(features), "read", progress) as bar:
        for idx, batch in qa.iter_batches(features, batch_size):
            out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            T = out.start_logits.shape[1]
            start[idx, :T], end[idx, :T] = out.start_logits.float().cpu(), out.end_logits.float().cpu()
            bar.update(len(idx))
    return start, end


class QuestionAnswering(Task):
    name = "question-answering"
    model_class = AutoModelForQuestionAnswering
    adapter_task_type = "QUESTION_ANS"
    heads = ("qa_outputs",)

    def __init__(self) -> None:
        self.allow_no_answer = False

    def features(self, examples: list[qa.Example], args: Any, tokenizer: Tokenizer) -> qa.Features:
        windows = qa.windows(tokenizer, examples, args.block_size, args.doc_stride)
        return qa.Features(examples, windows, tokenizer.pad_token_id, args.seed)

    def datasets(self, args: Any, tokenizer: Tokenizer, out: Path) -> tuple[qa.Features, qa.Features]:
        if args.unwrap:
            raise ValueError("--unwrap applies to causal-lm text files")
        examples = [e for f in args.data for e in qa.read_examples(f)]
        if args.val_data:
            train, val = examples, [e for f in args.val_data for e in qa.read_examples(f)]
        else:
            train, val = self.hold_out(examples, args, "questions")
        self.allow_no_answer = any(not e.answers for e in train + val)
        return self.features(train, args, tokenizer), self.features(val, args, tokenizer)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     start_positions=batch["start_positions"], end_positions=batch["end_positions"]).loss

    def answers(self, features: qa.Features, start: Tensor, end: Tensor, args: Any) -> list[qa.Answer]:
        return qa.best_answers(features, start, end, args.max_answer_length, allow_no_answer=self.allow_no_answer)

    def validate(self, model: nn.Module, val: qa.Features, args: Any, device: torch.device) -> dict[str, Any]:
        """Window loss, and exact match / F1 of the best span of every question (SQuAD's rules)."""
        start, end = qa_logits(model, val, args.batch_size, device)
        targets = val.batch(range(len(val)))
        loss = (F.cross_entropy(start, targets["start_positions"]) + F.cross_entropy(end, targets["end_positions"])) / 2
        found = self.answers(val, start, end, args)
        scores = metrics.squad_metrics({str(k): a.text for k, a in enumerate(found)},
                                       {str(k): [t for t, _ in ex.answers] for k, ex in enumerate(val.examples)})
        return {"val_loss": float(loss), **scores}

    def default_best_metric(self) -> str | None:
        return "f1"

    def summary(self, m: dict[str, Any]) -> str:
        return f"val loss {m['val_loss']:.4f}, exact match {m['exact_match']:.2f}, F1 {m['f1']:.2f}"


TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLM, SequenceClassification, QuestionAnswering)}
