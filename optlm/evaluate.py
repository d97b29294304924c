"""Perplexity of a causal LM over a text, with a sliding window.

The transformers docs recipe "Perplexity of fixed-length models": windows of up to the model's
context length advance by ``stride`` tokens; in each window only the tokens not scored by an
earlier window count, and they see up to ``max_length - 1`` tokens of history. With
``stride == max_length`` the windows are disjoint (fast, less context); smaller strides give every
token more context at the cost of more forward passes. Every token after the first is scored exactly
once, so the result is exp(total NLL / number of scored tokens).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .data import check_file, iter_documents
from .tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float          # mean negative log-likelihood per scored token (nats)
    tokens: int         # number of scored tokens
    seconds: float


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_new)`` per window: the window is ids[begin:end], its last n_new targets are scored."""
    if stride < 1 or stride > max_length:
        raise ValueError(f"stride must be between 1 and the context length {max_length}, got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor | np.ndarray, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (1-D) under ``model`` (any module whose output has ``.logits``).

    ``max_length`` defaults to the model's ``max_position_embeddings``, ``stride`` to half of it.
    ``progress`` shows a progress bar over the scored tokens on stderr.
    """
    t0 = time.perf_counter()
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if isinstance(ids, np.ndarray) else ids).long()
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one token stream), got shape {tuple(ids.shape)}")
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens; there is nothing to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = model.config.max_position_embeddings
    max_length = limit if max_length is None else max_length
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's context ({limit} positions)")
    stride = max_length // 2 if stride is None else stride
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    spans = windows(len(ids), max_length, stride)
    # Windows of the same length are batched; only the last one (and, with few tokens, the first) differ.
    bar = tqdm(total=len(ids) - 1, desc="eval", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        bar.update(sum(n for _, _, n in group) - (1 if i == 0 else 0))
        for same in _by_length(group):
            x = torch.stack([ids[b:e] for b, e, _ in same]).to(device)  # (B, T)
            logits = model(x, use_cache=False).logits.float()  # (B, T, V)
            for row, (b, e, n_new) in enumerate(same):
                # Targets ids[e - n_new : e], predicted from the positions just before them; the very
                # first token of the text has no prediction.
                first = max(e - b - n_new, 1)
                pred = logits[row, first - 1:e - b - 1]
                nll += F.cross_entropy(pred, x[row, first:], reduction="sum").item()
                count += e - b - first
    bar.close()
    model.train(was_training)
    mean = nll / count
    if not math.isfinite(mean):
        raise ValueError(f"the model's log-likelihood is {mean} (NaN or infinite logits): its weights may be damaged "
                         "(NaN/inf in the checkpoint) or the dtype overflows — check the checkpoint, or use float32")
    return PerplexityResult(math.exp(mean), mean, count, time.perf_counter() - t0)


def _by_length(group: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    lengths: dict[int, list[tuple[int, int, int]]] = {}
    for span in group:
        lengths.setdefault(span[1] - span[0], []).append(span)
    return list(lengths.values())


def encode_file(path: str | os.PathLike, tokenizer: Tokenizer, jsonl_key: str = "text",
                unwrap: bool = False) -> np.ndarray:
    """Token ids of a text/JSONL file, ``</s>`` before each document as in training (read in pieces)."""
    bos = tokenizer.bos_token_id
    parts = []
    for piece, new_doc in iter_documents(path, jsonl_key, unwrap):
        ids = tokenizer.encode(piece, add_special_tokens=False)
        parts.append(np.asarray(([bos] if new_doc and bos is not None else []) + ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def evaluate_file(model: str | os.PathLike | None, data: str | os.PathLike, stride: int | None = None,
                  max_length: int | None = None, batch_size: int = 1, device: str = "cpu",
                  dtype: str | torch.dtype | None = None, jsonl_key: str = "text",
                  unwrap: bool = False, progress: bool = False) -> PerplexityResult:
    """Perplexity of the checkpoint ``model`` (directory or hub id; None = the bundled model) on ``data``.

    ``unwrap`` joins hard-wrapped lines into paragraphs first, as the model's training data may have been."""
    from .bundled import bundled_model_path
    from .hf import AutoModelForCausalLM

    source = bundled_model_path() if model is None else model
    check_file(data)
    tokenizer = Tokenizer.from_pretrained(source)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device=device)
    ids = encode_file(data, tokenizer, jsonl_key, unwrap)
    return perplexity(lm, ids, max_length=max_length, stride=stride, batch_size=batch_size, progress=progress)
