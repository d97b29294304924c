"""Task metrics: classification (accuracy, precision / recall / F1, confusion matrix), multi-label, regression,
and extractive QA (SQuAD's exact match and token F1).

Definitions follow scikit-learn's (``accuracy_score``, ``precision_recall_fscore_support`` with an explicit
label list, ``zero_division=0``) and the official SQuAD v1.1 / v2.0 evaluation scripts, and the tests check
them against those. Everything here is plain Python / NumPy over predictions already made.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

# Metrics where lower is better (the rest are better higher), for choosing the best checkpoint.
LOWER_IS_BETTER = frozenset({"val_loss", "mse", "mae"})


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


# ---- single-label classification ------------------------------------------------------------------

def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) counts: row = true label, column = predicted label."""
    m = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def _prf(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label precision, recall, F1 from counts; 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
        recall = np.where(true > 0, tp / np.maximum(true, 1), 0.0)
        f1 = np.where(pred + true > 0, 2 * tp / np.maximum(pred + true, 1), 0.0)
    return precision, recall, f1


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro and weighted F1 over every label in ``labels`` (also those absent from this data),
    per-label precision / recall / F1 / support, and the confusion matrix (rows true, columns predicted)."""
    if len(y_true) == 0:
        raise ValueError("no examples to score")
    m = confusion_matrix(y_true, y_pred, len(labels))
    tp, true, pred = np.diag(m), m.sum(1), m.sum(0)
    precision, recall, f1 = _prf(tp, pred, true)
    return {
        "accuracy": float(tp.sum() / m.sum()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * true).sum() / true.sum()),
        "per_label": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(true[i])} for i, name in enumerate(labels)},
        "confusion_matrix": m.tolist(),
    }


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """``y_true``/``y_pred``: (N, L) 0/1. Subset accuracy (every label right), micro and macro F1, per label."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = (y_true & y_pred).sum(0)
    true, pred = y_true.sum(0), y_pred.sum(0)
    precision, recall, f1 = _prf(tp, pred, true)
    _, _, micro = _prf(np.array([tp.sum()]), np.array([pred.sum()]), np.array([true.sum()]))
    return {
        "accuracy": float((y_true == y_pred).all(1).mean()),
        "micro_f1": float(micro[0]),
        "macro_f1": float(f1.mean()),
        "per_label": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(true[i])} for i, name in enumerate(labels)},
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict:
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    ss_tot = ((t - t.mean()) ** 2).sum()
    return {"mse": float(((t - p) ** 2).mean()), "mae": float(np.abs(t - p).mean()),
            "r2": float(1 - ((t - p) ** 2).sum() / ss_tot) if ss_tot > 0 else 0.0}


def format_report(metrics: dict, labels: Sequence[str] | None = None) -> str:
    """A text report: the headline numbers, a per-label table and (single-label) the confusion matrix."""
    lines = ["  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))]
    per = metrics.get("per_label")
    if per:
        width = max(12, *(len(n) for n in per))
        lines += ["", f"{'label':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
        lines += [f"{n:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>9}"
                  for n, r in per.items()]
    m = metrics.get("confusion_matrix")
    if m is not None and labels is not None:
        width = max(6, *(len(n) for n in labels), *(len(str(c)) for row in m for c in row))
        lines += ["", "confusion matrix (rows: true label, columns: predicted)",
                  " " * width + " " + " ".join(f"{n:>{width}}" for n in labels)]
        lines += [f"{n:>{width}} " + " ".join(f"{c:>{width}}" for c in row) for n, row in zip(labels, m, strict=True)]
    return "\n".join(lines)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path, title: str = "") -> bool:
    """Draw the confusion matrix to a PNG (False when matplotlib is missing: the text report has it too)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    m = np.asarray(matrix)
    size = 2 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- extractive QA (SQuAD) ---------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's token F1; an empty answer (no answer) scores 1 against an empty truth and 0 otherwise."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict:
    """Exact match and F1 in percent over every question in ``answers`` (each scored against its best gold
    answer; a question with no gold answers is unanswerable and scores only the empty prediction), and the
    split into answerable / unanswerable questions (SQuAD 2.0's HasAns / NoAns) where both occur."""
    missing = [q for q in answers if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for question {missing[0]!r} ({len(missing)} missing)")
    em, f1, has = {}, {}, {}
    for qid, golds in answers.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        pred = predictions[qid]
        em[qid] = max(exact_match(pred, g) for g in golds)
        f1[qid] = max(token_f1(pred, g) for g in golds)
        has[qid] = golds != [""]
    out = {"exact_match": 100 * float(np.mean(list(em.values()))), "f1": 100 * float(np.mean(list(f1.values()))),
           "total": len(answers)}
    for name, keep in (("has_answer", True), ("no_answer", False)):
        ids = [q for q in answers if has[q] == keep]
        if ids and len(ids) < len(answers):
            out[f"{name}_exact_match"] = 100 * float(np.mean([em[q] for q in ids]))
            out[f"{name}_f1"] = 100 * float(np.mean([f1[q] for q in ids]))
            out[f"{name}_total"] = len(ids)
    return out
