"""The pure logits functions against direct reimplementations, and sampling against its target distribution.

The draws test is a chi-square goodness-of-fit on a tiny vocabulary: with a fixed generator it is
deterministic, and a correct sampler passes it with probability 0.999 for any seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers_generate import (  # noqa: F401 (one_thread: a fixture, used through pytestmark)
    CHI2_LOGITS,
    SAMPLING_CASES,
    assert_follows,
    filtered_softmax,
    one_thread,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from optlm import sampling

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=60, deadline=None)


def distinct_logits(min_size=2, max_size=12):
    """Rows of well-separated logits (no ties, so "the k highest" and nucleus sets are unambiguous)."""
    return st.lists(st.integers(-40, 40), min_size=min_size, max_size=max_size, unique=True).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32)[None] / 8)


@SETTINGS
@given(distinct_logits(), st.integers(1, 14), st.integers(1, 3))
def test_top_k_keeps_exactly_the_k_highest(logits, k, min_keep):
    out = sampling.top_k_filter(logits, k, min_keep)
    keep = max(k, min_keep)
    ranked = sorted(range(logits.shape[1]), key=lambda i: -float(logits[0, i]))
    for rank, i in enumerate(ranked):
        assert out[0, i] == (logits[0, i] if rank < keep else -math.inf)


@SETTINGS
@given(distinct_logits(), st.floats(0.01, 1.0), st.integers(1, 3))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p, min_keep):
    probs = torch.softmax(logits.double(), -1)[0].tolist()
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    above = 0.0  # mass of the tokens more likely than this one
    kept = set()
    for rank, i in enumerate(ranked):
        if abs(above - p) < 1e-5:
            return  # a float32 rounding decides this boundary; skip the example
        if above < p or rank < min_keep:
            kept.add(i)
        above += probs[i]
    out = sampling.top_p_filter(logits, p, min_keep)
    assert {i for i in range(len(probs)) if out[0, i] > -math.inf} == kept
    assert torch.equal(out[0, sorted(kept)], logits[0, sorted(kept)])


def test_top_p_one_keeps_everything_and_top_k_ties_are_kept():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    assert torch.equal(sampling.top_p_filter(logits, 1.0), logits)
    assert torch.equal(sampling.top_k_filter(logits, 1), torch.tensor([[-math.inf, 2.0, 2.0, -math.inf]]))


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=12), min_size=1, max_size=3),
       st.floats(0.3, 3.0))
def test_repetition_penalty_applies_once_per_seen_token(rows, penalty):
    width = max(map(len, rows))
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    scores = torch.randn(len(rows), 10)
    out = sampling.repetition_penalty(scores, sampling.seen_tokens(ids, 10), penalty)
    for b, row in enumerate(ids.tolist()):
        for v in range(10):
            s = float(scores[b, v])
            expect = (s * penalty if s < 0 else s / penalty) if v in row else s
            assert math.isclose(float(out[b, v]), expect, rel_tol=1e-6)


def test_seen_tokens_ignore_leading_padding_only():
    ids = torch.tensor([[1, 1, 5, 1, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 1, 1, 1]])
    seen = sampling.seen_tokens(ids, 9, mask)
    assert seen[0].nonzero().flatten().tolist() == [1, 5, 7]  # the pad in the middle counts, as in transformers
    assert seen[1].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


def banned_by_dict(row: list[int], n: int) -> set[int]:
    """No-repeat-n-gram the textbook way: every (n-1)-prefix seen so far maps to the tokens that followed it."""
    if len(row) < n:
        return set()
    follow: dict[tuple, set[int]] = {}
    for i in range(len(row) - n + 1):
        follow.setdefault(tuple(row[i:i + n - 1]), set()).add(row[i + n - 1])
    return follow.get(tuple(row[len(row) - n + 1:]), set())


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=14), min_size=1, max_size=3),
       st.integers(1, 4))
def test_no_repeat_ngram_bans_match_the_dictionary_definition(rows, n):
    width = min(map(len, rows))
    ids = torch.tensor([r[:width] for r in rows])
    bans = sampling.repeated_ngram_bans(ids, n, 6)
    for b, row in enumerate(ids.tolist()):
        assert set(bans[b].nonzero().flatten().tolist()) == banned_by_dict(row, n)


def test_ban_tokens_and_temperature():
    scores = torch.tensor([[1.0, -2.0, 3.0]])
    assert torch.equal(sampling.ban_tokens(scores, torch.tensor([True, False, False])),
                       torch.tensor([[-math.inf, -2.0, 3.0]]))
    assert torch.equal(sampling.apply_temperature(scores, 0.5), scores * 2)
    with pytest.raises(ValueError, match="greedy"):
        sampling.apply_temperature(scores, 0.0)


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
def test_draws_follow_softmax_of_the_filtered_scaled_logits(temperature, top_k, top_p):
    scores = sampling.warp(CHI2_LOGITS[None], temperature, top_k, top_p)[0]
    target, keep = filtered_softmax(CHI2_LOGITS, temperature, top_k, top_p)
    assert torch.equal(scores > -math.inf, keep)

    n = 40_000
    draws = sampling.sample(scores.expand(n, 8), torch.Generator().manual_seed(0))
    assert_follows(draws, target, keep)
