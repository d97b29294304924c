"""Pure functions on next-token scores: penalties, bans, temperature, top-k / top-p filtering, drawing.

Every function takes ``(N, V)`` float scores and returns new ones (inputs are never modified); removed tokens
get ``-inf``. The semantics and the order ``generate`` applies them in follow transformers' logits processors
(``generation/logits_process.py``), so decoding results match the reference token for token:
repetition penalty → no-repeat-n-gram → min length, then, when sampling, temperature → top-k → top-p.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


# ---- processors (every decoding strategy) --------------------------------------------------------------

def seen_tokens(ids: Tensor, vocab_size: int, mask: Tensor | None = None) -> Tensor:
    """``(N, V)`` bool: which tokens occur in each row of ``ids`` ``(N, L)``.

    Leading padding (``mask`` 0 before a row's first real token) does not count, as in transformers; ids at or
    above ``vocab_size`` (embedding rows the head cannot emit) are ignored.
    """
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)  # +1: spare column
    ids = ids.clamp(max=vocab_size)
    if mask is not None:
        lead = (mask != 0).int().argmax(dim=1, keepdim=True)  # (N, 1) count of leading pad slots
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < lead, vocab_size)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens already seen: positive scores are divided by
    ``penalty`` (a number, or ``(N, 1)`` per row), negative ones multiplied, so a penalty above 1 always makes a
    repeat less likely."""
    tiny = torch.finfo(scores.dtype).tiny  # a penalty that underflows to 0 would make 0 / 0 = NaN
    penalty = penalty.clamp(min=tiny) if isinstance(penalty, Tensor) else max(penalty, tiny)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return _no_pos_inf(torch.where(seen, penalized, scores))


def presence_frequency_penalty(scores: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's penalties: subtract ``presence`` once from every token that occurred and ``frequency`` per
    occurrence; ``counts`` ``(N, V)`` are the occurrences, ``presence`` and ``frequency`` ``(N, 1)``."""
    return scores - frequency * counts - presence * (counts > 0)


def _no_pos_inf(scores: Tensor) -> Tensor:
    """Scores pushed past the float range by an extreme penalty or temperature stay the largest finite value:
    +inf would turn softmax into NaN (inf - inf), where the intent is plain "most likely"."""
    return scores.clamp(max=torch.finfo(scores.dtype).max)


def repeated_ngram_bans(ids: Tensor, n: int, vocab_size: int) -> Tensor:
    """``(N, V)`` bool: tokens that would complete an n-gram already present in ``ids`` ``(N, L)``.

    Every length-n window whose first n-1 tokens equal the row's last n-1 tokens bans its last token.
    """
    L = ids.shape[1]
    if L < n:
        return torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)
    windows = ids.unfold(1, n, 1)  # (N, L - n + 1, n)
    suffix = ids[:, L - n + 1:]  # (N, n - 1), empty for n = 1 (then every seen token is banned)
    hit = (windows[:, :, :-1] == suffix[:, None, :]).all(-1)  # (N, L - n + 1)
    # Windows that do not match write into a spare column, so they cannot clear another window's ban.
    target = torch.where(hit, windows[:, :, -1].clamp(max=vocab_size), vocab_size)
    bans = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    bans.scatter_(1, target, True)
    return bans[:, :vocab_size]


def ban_tokens(scores: Tensor, banned: Tensor) -> Tensor:
    """Set ``scores`` to -inf where ``banned`` (``(N, V)`` or ``(V,)`` bool) is True (n-gram bans, min length)."""
    return scores.masked_fill(banned, NEG_INF)


# ---- warpers (sampling only) ---------------------------------------------------------------------------

def apply_temperature(scores: Tensor, temperature: float | Tensor) -> Tensor:
    """``scores / temperature`` (a number, or ``(N, 1)`` per row); temperature must be positive (0 means
    greedy and is handled by the caller)."""
    if not bool((torch.as_tensor(temperature) > 0).all()):
        raise ValueError(f"temperature must be > 0 here, got {temperature}; use greedy decoding for 0")
    return _no_pos_inf(scores / temperature)


def top_k_filter(scores: Tensor, k: int | Tensor, min_keep: int = 1) -> Tensor:
    """Keep the ``k`` highest scores of each row (all tokens tied with the k-th are kept too); ``k`` is a
    number or ``(N,)`` per row."""
    if isinstance(k, Tensor):
        k = k.clamp(min_keep, scores.shape[-1])
        kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(-1, k[:, None] - 1)  # (N, 1)
    else:
        k = min(max(k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: Tensor, p: float | Tensor, min_keep: int = 1) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most probable tokens whose probabilities sum to at
    least ``p`` (a number, or ``(N, 1)`` per row). Ascending sort: a token goes when the mass of itself and
    everything less likely is at most ``1 - p``; the ``min_keep`` most likely always stay."""
    ascending, order = torch.sort(scores, dim=-1)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)  # (N, V) mass of this token and all below it
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, NEG_INF)


def min_p_filter(scores: Tensor, min_p: Tensor) -> Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below ``min_p`` ``(N, 1)`` times
    the row's most likely token's."""
    probs = torch.softmax(scores, dim=-1)
    return scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), NEG_INF)


def warp(scores: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
         min_keep: int = 1) -> Tensor:
    """Temperature, then top-k, then top-p: the distribution sampling draws from is ``softmax`` of this."""
    if temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k:
        scores = top_k_filter(scores, top_k, min_keep)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p, min_keep)
    return scores


def sample(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row drawn from ``softmax(scores)``: ``(N, V)`` → ``(N,)``."""
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
