"""One sampling step for a batch of rows that each carry their own :class:`SamplingParams`.

Order (vLLM's): min-tokens bans → logit bias → repetition, presence and frequency penalties → (greedy rows:
argmax) → temperature → min-p → top-k → top-p → one draw per row from the row's own generator, so a seeded
request draws the same tokens whatever else shares its batch. Log-probabilities are read from the model's
distribution before any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import sampling
from .params import SamplingParams


@dataclass
class Logprob:
    """A token's log-probability and its 1-based rank in the model's next-token distribution (vLLM's record)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class Row:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator
    eos_token_id: int | None


@dataclass
class Sampled:
    token: int
    logprob: float | None  # of the chosen token, when the request asked for logprobs
    top: dict[int, Logprob] | None  # chosen token and the ``logprobs`` most likely ones


def _column(values: list, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # (N, 1)


def _occurrences(lists: list[list[int]], V: int, device: torch.device) -> Tensor:
    """``(N, V)`` counts of each token in each row's list."""
    width = max(1, max(len(ids) for ids in lists))
    ids = torch.full((len(lists), width), V, dtype=torch.long)
    for r, row in enumerate(lists):
        ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    counts = torch.zeros(len(lists), V + 1, device=device)  # +1: a spare column for the padding
    counts.scatter_add_(1, ids.clamp(max=V).to(device), torch.ones(ids.shape, device=device))
    return counts[:, :V]


def process(logits: Tensor, rows: list[Row]) -> Tensor:
    """Everything before temperature: bans, bias and penalties. ``(N, V)`` float32 in, new scores out."""
    scores, V, dev = logits, logits.shape[-1], logits.device
    banned = [r for r, row in enumerate(rows) if len(row.output_ids) < row.params.min_tokens]
    for r in banned:  # EOS and stop tokens cannot end a completion shorter than min_tokens
        p = rows[r].params
        stops = [i for i in (p.stop_token_ids or []) + ([] if rows[r].eos_token_id is None
                                                        or p.ignore_eos else [rows[r].eos_token_id]) if i < V]
        if stops:
            scores = scores.clone() if scores is logits else scores
            scores[r, stops] = sampling.NEG_INF
    biased = [r for r, row in enumerate(rows) if row.params.logit_bias]
    if biased:
        scores = scores.clone() if scores is logits else scores
        for r in biased:
            bias = rows[r].params.logit_bias
            scores[r, list(bias)] += torch.tensor(list(bias.values()), dtype=scores.dtype, device=dev)
    if any(row.params.repetition_penalty != 1.0 for row in rows):
        seen = _occurrences([row.prompt_ids + row.output_ids for row in rows], V, dev) > 0
        penalty = _column([row.params.repetition_penalty for row in rows], scores)
        scores = sampling.repetition_penalty(scores, seen, penalty)
    if any(row.params.presence_penalty or row.params.frequency_penalty for row in rows):
        counts = _occurrences([row.output_ids for row in rows], V, dev)
        scores = sampling.presence_frequency_penalty(scores, counts,
                                                     _column([row.params.presence_penalty for row in rows], scores),
                                                     _column([row.params.frequency_penalty for row in rows], scores))
    return scores


def warp(scores: Tensor, rows: list[Row]) -> Tensor:
    """Temperature, min-p, top-k and top-p, each with the row's own setting (rows here all sample)."""
    V = scores.shape[-1]
    scores = sampling.apply_temperature(scores, _column([row.params.temperature for row in rows], scores))
    if any(row.params.min_p > 0 for row in rows):
        scores = sampling.min_p_filter(scores, _column([row.params.min_p for row in rows], scores))
    if any(row.params.top_k > 0 for row in rows):
        k = torch.tensor([row.params.top_k if row.params.top_k > 0 else V for row in rows], device=scores.device)
        scores = sampling.top_k_filter(scores, k)
    if any(row.params.top_p < 1 for row in rows):
        scores = sampling.top_p_filter(scores, _column([row.params.top_p for row in rows], scores))
    return scores


def sample(logits: Tensor, rows: list[Row]) -> list[Sampled]:
    """The next token of each row from its float32 logits ``(N, V)``."""
    logits = logits.float()
    scores = process(logits, rows)
    tokens = scores.argmax(-1)  # greedy rows keep this
    drawn = [r for r, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        index = torch.tensor(drawn, device=scores.device)
        probs = torch.softmax(warp(scores[index], [rows[r] for r in drawn]), dim=-1)
        for i, r in enumerate(drawn):
            tokens[r] = torch.multinomial(probs[i], 1, generator=rows[r].generator)[0]
    chosen = tokens.tolist()
    want = [r for r, row in enumerate(rows) if row.params.logprobs is not None]
    out = [Sampled(t, None, None) for t in chosen]
    if want:
        index = torch.tensor(want, device=logits.device)
        logp = torch.log_softmax(logits[index], dim=-1)  # (W, V) the model's own distribution
        picked = logp.gather(1, tokens[index][:, None])  # (W, 1)
        ranks = (logp > picked).sum(-1) + 1  # 1-based rank of the chosen token
        k = max(rows[r].params.logprobs for r in want)
        top_lp, top_ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        for i, r in enumerate(want):
            top = {chosen[r]: Logprob(float(picked[i, 0]), int(ranks[i]))}
            for j in range(rows[r].params.logprobs):
                top.setdefault(int(top_ids[i, j]), Logprob(float(top_lp[i, j]), j + 1))
            out[r] = Sampled(chosen[r], float(picked[i, 0]), top)
    return out
