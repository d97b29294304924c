"""Autoregressive generation: prefill the prompt once, then one cached decode step per new token.

Strategies: greedy, multinomial sampling, beam search (the vectorised algorithm of transformers 5, including
its length-penalty and early-stopping rules) and contrastive search (Su et al. 2022, "A Contrastive Framework
for Neural Text Generation"). Arguments carry transformers' ``generate`` names and meanings so calling code
ports unchanged; the output is the prompt plus the new tokens, rows that finished early filled with the pad id.
Logits are processed in float32, as the reference does, so ties break the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sampling
from .fast import attention_modules
from .generation_config import (  # noqa: F401 (re-exported: generation's request side lives there)
    MIN_TEMPERATURE,
    ContextLengthError,
    GenerationConfig,
    check_fits,
    check_prompt,
    is_finite_number,
    is_int,
    make_config,
    stop_list,
    validate_params,
)
from .kv_cache import KVCache
from .models.core import kv_heads

NEG = -1.0e9  # the reference's "impossible" beam score: finite, so sums and divisions stay ordered


# ---- model steps -----------------------------------------------------------------------------------------

def _float_weight(model) -> Tensor:
    """A weight in the activation dtype and device, whatever the family: the first floating-point parameter
    (quantized weights are integer buffers, never parameters)."""
    return next(p for p in model.parameters() if p.is_floating_point())


def new_cache(model, batch_size: int, capacity: int) -> KVCache:
    """A cache sized for the whole generation, so decoding never reallocates it.

    Where half-precision attention runs in fp32 (``optlm.fast.upcast_half_attention``) the cache holds fp32:
    the same values (bf16/fp16 widen exactly), converted once when written instead of at every step."""
    return KVCache.for_model(model.config, batch_size, capacity, cache_dtype(model), _float_weight(model).device,
                             kv_heads(model))


def cache_dtype(model) -> torch.dtype:
    """The dtype keys/values are cached in: the activations', or float32 where half-precision attention is
    computed in float32 (``optlm.fast.upcast_half_attention``)."""
    upcast = any(attn.upcast_attention for attn in attention_modules(model))
    return torch.float32 if upcast else _float_weight(model).dtype


def prefill(model, ids: Tensor, mask: Tensor | None, cache: KVCache) -> tuple[Tensor, Tensor]:
    """Run the prompt ``(B, P)`` through the model once, filling ``cache``.

    Returns float32 next-token logits ``(B, V)`` and the last hidden states of every prompt token ``(B, P, d)``.
    """
    frame = cache.frame(ids.shape[1], mask)
    logits, hidden = model.step(ids, frame)
    cache.commit(frame)
    return check_finite(logits.float(), "the prompt"), hidden


def decode_one(model, tokens: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """One cached step for ``tokens`` ``(N,)``: float32 logits ``(N, V)`` and hidden states ``(N, d)``.

    The cache remembers earlier padding, so each row's position follows from it; the cost is one token through
    the layers plus attention over the filled slots.
    """
    frame = cache.frame(1)
    logits, hidden = model.step(tokens[:, None], frame)
    cache.commit(frame)
    return check_finite(logits.float(), f"position {int(frame.positions.max())}"), hidden[:, -1]


class NonFiniteError(ValueError):
    """The model computed NaN or infinite logits (damaged weights, or a dtype that overflows)."""


def check_finite(logits: Tensor, where: str) -> Tensor:
    # One pass: a NaN or infinity anywhere in a row makes the row's sum non-finite (finite float32 logits of
    # any sane model are far too small for their sum to overflow).
    if not bool(torch.isfinite(logits.sum(-1)).all()):
        raise NonFiniteError(f"the model produced NaN or infinite logits at {where}: its weights may be damaged "
                             "(NaN/inf in the checkpoint) or the dtype overflows — check the checkpoint, or load "
                             "it in float32")
    return logits


# ---- logits processing and stopping ----------------------------------------------------------------------

class Processors:
    """The logits processors of one generation (repetition penalty, no-repeat-n-gram, min length) with the
    per-row state they carry, built once so the decode loop only applies them."""

    def __init__(self, cfg: GenerationConfig, prompt: Tensor, mask: Tensor | None, vocab_size: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seen = sampling.seen_tokens(prompt, vocab_size, mask) if cfg.repetition_penalty != 1.0 else None
        self.eos_mask = None
        if cfg.min_new_tokens > 0 and cfg.eos_ids:
            self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=prompt.device)
            self.eos_mask[[e for e in cfg.eos_ids if e < vocab_size]] = True

    def __call__(self, scores: Tensor, seqs: Tensor, n_new: int) -> Tensor:
        """``scores`` ``(N, V)`` for rows whose tokens so far are ``seqs`` ``(N, L)``, ``n_new`` of them generated."""
        if self.seen is not None:
            scores = sampling.repetition_penalty(scores, self.seen, self.cfg.repetition_penalty)
        if self.cfg.no_repeat_ngram_size > 0:
            bans = sampling.repeated_ngram_bans(seqs, self.cfg.no_repeat_ngram_size, self.vocab_size)
            scores = sampling.ban_tokens(scores, bans)
        if self.eos_mask is not None and n_new < self.cfg.min_new_tokens:
            scores = sampling.ban_tokens(scores, self.eos_mask)
        return scores

    def expand(self, n: int) -> None:
        if self.seen is not None:
            self.seen = self.seen.repeat_interleave(n, dim=0)

    def advance(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """Rows continue from ``rows`` (beam parents; None = themselves) and append ``tokens`` ``(N,)``."""
        if self.seen is not None:
            if rows is not None:
                self.seen = self.seen[rows]
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True


class StopStrings:
    """Finds rows whose generated text contains a stop string, decoding only a short tail of each row.

    A stop string of b UTF-8 bytes spans at most b tokens of a byte-level BPE (special tokens decode to
    nothing; ``slack`` covers a few of them), and a row is checked after every token, so a tail window sees
    every occurrence at the step its last byte arrives.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_length: int, slack: int = 8):
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer to read the generated text; pass tokenizer=...")
        if any(not s for s in stops):
            raise ValueError("stop_strings must be non-empty strings")
        self.tokenizer, self.stops, self.start = tokenizer, stops, prompt_length
        self.window = max(len(s.encode("utf-8")) for s in stops) + slack

    def __call__(self, seqs: Tensor) -> Tensor:
        """``(N, L)`` → ``(N,)`` bool."""
        L = seqs.shape[1]
        tails = seqs[:, max(self.start, L - self.window):].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=seqs.device)


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def as_ids(input_ids: Tensor | Sequence) -> Tensor:
    """``input_ids`` as a (batch, length) or (length,) integer tensor, or a TypeError naming the argument."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"input_ids must be a tensor or (nested) list of token ids ({e})") from None
    if ids.dim() not in (1, 2) or ids.shape[-1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or ids.is_complex():
        raise TypeError(f"input_ids must be a non-empty 1-D or 2-D array of integer token ids, got "
                        f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids


def _prepare(model, input_ids: Tensor | Sequence, attention_mask: Tensor | None, cfg: GenerationConfig):
    device = _float_weight(model).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    # checked here too, not only at the model's door: the penalties index by id
    given = None if attention_mask is None else torch.as_tensor(attention_mask).cpu()
    if given is not None and given.is_floating_point():
        given = given.float()  # numpy has no bfloat16
    mask = check_prompt(ids.cpu().numpy(), None if given is None else given.numpy(), cfg, model.config.vocab_size,
                        model.config.max_position_embeddings)
    mask = None if mask is None else torch.as_tensor(mask, device=device)
    return ids, mask


# ---- greedy, sampling and contrastive search -------------------------------------------------------------

class Decoding:
    """One running generation (greedy, sampling or contrastive): iterate it to get each step's new tokens
    ``(N,)``; afterwards ``sequences`` holds prompt + new tokens. Timing fields fill in as it runs."""

    def __init__(self, model, ids: Tensor, mask: Tensor | None, cfg: GenerationConfig, tokenizer=None,
                 generator: torch.Generator | None = None):
        self.model, self.cfg, self.generator = model, cfg, generator
        n = cfg.num_return_sequences
        B, P = ids.shape
        self.prompt_length = P
        self.procs = Processors(cfg, ids, mask, model.config.vocab_size)
        self.stop = StopStrings(tokenizer, cfg.stops, P) if cfg.stops else None
        self.eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=ids.device)
        N = B * n
        self.seqs = torch.full((N, P + cfg.max_new_tokens), cfg.pad_token_id if cfg.pad_token_id is not None else 0,
                               dtype=torch.long, device=ids.device)
        self.seqs[:, :P] = ids.repeat_interleave(n, dim=0)
        self.mask = None if mask is None else mask.repeat_interleave(n, dim=0)  # (N, P), None: no padding
        self.steps = 0
        self.unfinished = torch.ones(N, dtype=torch.bool, device=ids.device)
        self.started = self.first_token_at = self.finished_at = None
        self._prompt, self._prompt_mask = ids, mask  # (B, P): prefilled once, before rows are repeated

    @property
    def sequences(self) -> Tensor:
        return self.seqs[:, : self.prompt_length + self.steps]

    @property
    def new_tokens(self) -> Tensor:
        return self.seqs[:, self.prompt_length: self.prompt_length + self.steps]

    def __iter__(self) -> Iterator[Tensor]:
        self.started = time.perf_counter()
        steps = self._contrastive() if self.cfg.mode == "contrastive" else self._sample()
        try:
            for tokens in steps:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                yield tokens
        finally:
            self.finished_at = time.perf_counter()

    def _emit(self, tokens: Tensor) -> Tensor:
        """Record this step's tokens; finished rows get the pad id. Returns the tokens as written."""
        pad = self.cfg.pad_token_id
        if pad is not None:
            tokens = torch.where(self.unfinished, tokens, pad)
        col = self.prompt_length + self.steps
        self.seqs[:, col] = tokens
        self.steps += 1
        self.procs.advance(tokens)
        done = torch.isin(tokens, self.eos)
        if self.stop is not None:
            done |= self.stop(self.seqs[:, : col + 1])
        self.unfinished &= ~done
        return tokens

    def _more(self) -> bool:
        return self.steps < self.cfg.max_new_tokens and bool(self.unfinished.any())

    def _sample(self) -> Iterator[Tensor]:
        cfg, n = self.cfg, self.cfg.num_return_sequences
        B = self._prompt.shape[0]
        cache = new_cache(self.model, B, self.seqs.shape[1])
        with torch.no_grad():
            logits, _ = prefill(self.model, self._prompt, self._prompt_mask, cache)
        if n > 1:  # prefill once per prompt, then copy its cache for each returned sequence
            cache.repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            self.procs.expand(n)
        while True:
            scores = self.procs(logits, self.sequences, self.steps)
            if cfg.sampling:
                scores = sampling.warp(scores, cfg.temperature, cfg.top_k, cfg.top_p)
                tokens = sampling.sample(scores, self.generator)
            else:
                tokens = scores.argmax(-1)
            tokens = self._emit(tokens)
            yield tokens
            if not self._more():
                return
            with torch.no_grad():
                logits, _ = decode_one(self.model, tokens, cache)

    def _contrastive(self) -> Iterator[Tensor]:
        """Contrastive search: among the top-k candidates pick argmax of (1 - α) p(v) - α max_j cos(h_v, h_j),
        where h_j are the last-layer hidden states of every real token so far.

        All k candidates of a row run in one batched step. The cache holds k copies of each row whose
        histories stay identical (every copy always receives the chosen token), so after choosing, only the
        newest slot is copied from the winner to its siblings instead of reordering the whole cache.
        """
        cfg, K = self.cfg, min(self.cfg.top_k, self.model.config.vocab_size)
        B, P = self._prompt.shape
        cache = new_cache(self.model, B, self.seqs.shape[1])
        with torch.no_grad():
            logits, hidden = prefill(self.model, self._prompt, self._prompt_mask, cache)
        cache.repeat_interleave(K)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        context = torch.zeros(B, self.seqs.shape[1], hidden.shape[-1], dtype=dtype, device=hidden.device)
        context[:, :P] = F.normalize(hidden.to(dtype), dim=-1)  # unit vectors: dot products are cosines
        valid = torch.zeros(B, self.seqs.shape[1], dtype=torch.bool, device=hidden.device)
        valid[:, :P] = True if self._prompt_mask is None else self._prompt_mask.bool()
        rows = torch.arange(B, device=hidden.device) * K
        alpha = cfg.penalty_alpha
        while True:
            S = P + self.steps
            probs = torch.softmax(self.procs(logits, self.sequences, self.steps), dim=-1)
            top_probs, top_ids = torch.topk(probs, K, dim=-1)  # (B, K)
            with torch.no_grad():
                cand_logits, cand_hidden = decode_one(self.model, top_ids.reshape(-1), cache)
            cand = F.normalize(cand_hidden.to(dtype), dim=-1).view(B, K, -1)  # (B, K, d)
            cos = cand @ context[:, :S].transpose(1, 2)  # (B, K, S)
            penalty = cos.masked_fill(~valid[:, None, :S], -1.0).amax(-1)  # (B, K) degeneration penalty
            best = ((1 - alpha) * top_probs - alpha * penalty).argmax(-1)  # (B,)
            winner = rows + best  # (B,) flat row of each chosen candidate
            siblings = winner.repeat_interleave(K)
            cache.copy_newest(siblings)
            context[:, S] = cand[torch.arange(B, device=cand.device), best]
            valid[:, S] = True
            tokens = self._emit(top_ids.gather(1, best[:, None]).squeeze(1))
            yield tokens
            if not self._more():
                return
            logits = cand_logits[winner]


# ---- beam search -----------------------------------------------------------------------------------------

def _gather(t: Tensor, index: Tensor) -> Tensor:
    """Select along dim 1 (beams) of ``t`` ``(B, M, ...)`` with ``index`` ``(B, K)``."""
    return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)


def _length_norm(length: int, length_penalty: float) -> float:
    """``length ** length_penalty`` as the reference computes it, infinite where a float cannot hold it."""
    try:
        return float(length) ** float(length_penalty)
    except OverflowError:
        return math.inf


def beam_search(model, ids: Tensor, mask: Tensor | None, cfg: GenerationConfig, tokenizer=None,
                generator: torch.Generator | None = None) -> Tensor:
    """Beam search with the rules of transformers 5: keep the top ``C = max(2, 1 + #eos) * K`` continuations,
    continue with the best K that did not stop, and keep the best K stopped hypotheses scored
    ``sum log p / generated_length ** length_penalty``. ``early_stopping``: True stops a prompt once it has K
    finished hypotheses; False stops when the best running score (over the current length) cannot beat the
    worst finished one; "never" uses the maximum length for that bound when ``length_penalty > 0``.
    """
    B, P = ids.shape
    K, n, dev = cfg.num_beams, cfg.num_return_sequences, ids.device
    max_len = P + cfg.max_new_tokens
    eos = cfg.eos_ids
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    C = max(2, 1 + len(eos)) * K
    top_mask = torch.arange(C, device=dev) < K  # only the top K candidates may become final hypotheses
    # The reference fills unused slots with the pad id (the first eos id when pad is 0 or unset; -1 without eos).
    fill = (cfg.pad_token_id or eos[0]) if eos else -1
    procs = Processors(cfg, ids, mask, model.config.vocab_size)
    procs.expand(K)
    stop = StopStrings(tokenizer, cfg.stops, P) if cfg.stops else None
    min_keep = len(eos) + 1 if eos else 2  # sampling must leave a non-eos continuation

    cache = new_cache(model, B, max_len)
    with torch.no_grad():
        logits, _ = prefill(model, ids, mask, cache)
    cache.repeat_interleave(K)
    logits = logits.repeat_interleave(K, dim=0)  # (B*K, V)

    run_seq = torch.full((B, K, max_len), fill, dtype=torch.long, device=dev)
    run_seq[:, :, :P] = ids[:, None]
    run_score = torch.zeros(B, K, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    fin_seq = run_seq.clone()
    fin_score = torch.full((B, K), NEG, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    base = torch.arange(B, device=dev)[:, None] * K  # (B, 1) first flat row of each prompt
    lp = cfg.length_penalty

    for cur in range(P, max_len):
        logp = torch.log_softmax(logits, dim=-1)
        logp = procs(logp, run_seq.reshape(B * K, max_len)[:, :cur], cur - P)
        if cfg.sampling:
            logp = sampling.warp(logp, cfg.temperature, cfg.top_k, cfg.top_p, min_keep)
        V = logp.shape[-1]
        total = (logp.view(B, K, V) + run_score[:, :, None]).view(B, K * V)
        if cfg.sampling:
            pick = torch.multinomial(torch.softmax(total, dim=-1), C, generator=generator)
            cand_score = total.gather(1, pick)
        else:
            cand_score, pick = torch.topk(total, C)  # (B, C)
        parent, token = pick // V, pick % V
        cand_seq = _gather(run_seq, parent)  # (B, C, max_len)
        cand_seq[:, :, cur] = token
        if cur + 1 >= max_len:
            hits = torch.ones(B, C, dtype=torch.bool, device=dev)
        else:
            hits = torch.isin(token, eos_t)
            if stop is not None:
                hits |= stop(cand_seq.view(B * C, max_len)[:, : cur + 1]).view(B, C)

        # Next running beams: the best K candidates that did not stop.
        live = cand_score + hits.float() * NEG
        keep = torch.topk(live, K).indices
        run_seq, run_score, run_parent = _gather(cand_seq, keep), _gather(live, keep), _gather(parent, keep)

        # Final hypotheses: merge the stopped top-K candidates into the best K so far.
        just = hits & top_mask
        final = cand_score / _length_norm(cur + 1 - P, lp)
        if cfg.early_stopping is True:
            final += fin_done.all(-1, keepdim=True).float() * NEG  # this prompt already has K hypotheses
        final += (~improvable).float() * NEG
        final += (~just).float() * NEG
        merged = torch.cat([fin_score, final], 1)
        best = torch.topk(merged, K).indices
        fin_seq = _gather(torch.cat([fin_seq, cand_seq], 1), best)
        fin_score = _gather(merged, best)
        fin_len = _gather(torch.cat([fin_len, torch.full_like(token, cur + 1 - P)], 1), best)
        fin_done = _gather(torch.cat([fin_done, just], 1), best)

        # Can any prompt still improve its worst final hypothesis?
        reach = max_len - P if cfg.early_stopping == "never" and lp > 0 else cur + 1 - P
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True).values, NEG)
        improvable = improvable & (run_score[:, :1] / _length_norm(reach, lp) > worst).any(-1, keepdim=True)
        all_full = bool(fin_done.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(hits.all()):
            break

        flat_parent = (base + run_parent).view(-1)
        cache.reorder(flat_parent)
        tokens = run_seq[:, :, cur].reshape(-1)
        procs.advance(tokens, flat_parent)
        with torch.no_grad():
            logits, _ = decode_one(model, tokens, cache)

    out = fin_seq[:, :n].reshape(B * n, max_len)
    return out[:, : P + int(fin_len[:, :n].max())]


# ---- entry points ----------------------------------------------------------------------------------------

def _generator(model, generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise TypeError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if generator is not None or seed is None:
        return generator
    return torch.Generator(device=_float_weight(model).device).manual_seed(seed)


def start(model, input_ids: Tensor | Sequence, attention_mask: Tensor | None = None, *, tokenizer=None,
          generator: torch.Generator | None = None, seed: int | None = None, max_length: int | None = None,
          **params: Any) -> Decoding:
    """A :class:`Decoding` to iterate step by step (greedy, sampling or contrastive search; not beams)."""
    ids = as_ids(input_ids)
    cfg = make_config(model, max_length, ids.shape[-1], **params)
    if cfg.mode == "beam":
        raise ValueError("beam search scores whole hypotheses, so it cannot emit tokens step by step; use num_beams=1")
    ids, mask = _prepare(model, ids, attention_mask, cfg)
    return Decoding(model, ids, mask, cfg, tokenizer, _generator(model, generator, seed))


@torch.no_grad()
def generate(model, input_ids: Tensor | Sequence, attention_mask: Tensor | None = None, *, tokenizer=None,
             generator: torch.Generator | None = None, seed: int | None = None, max_length: int | None = None,
             use_cache: bool = True, **params: Any) -> Tensor:
    """Prompt ``(B, P)`` (left-padded with ``attention_mask``) → ``(B * num_return_sequences, P + new)`` ids.

    Keywords are :class:`GenerationConfig` fields (transformers' names); ``max_length`` (prompt included) is
    read when ``max_new_tokens`` is not given. ``stop_strings`` end a row once its generated text contains one
    (the ids keep the token that completed it; text outputs cut the string off) and need ``tokenizer``.
    ``generator`` or ``seed`` makes sampling reproducible; without them the global torch RNG is used, as
    transformers does. ``use_cache`` is accepted for compatibility: generation always uses the cache.
    """
    ids = as_ids(input_ids)
    cfg = make_config(model, max_length, ids.shape[-1], **params)
    ids, mask = _prepare(model, ids, attention_mask, cfg)
    gen = _generator(model, generator, seed)
    if cfg.mode == "beam":
        return beam_search(model, ids, mask, cfg, tokenizer, gen)
    run = Decoding(model, ids, mask, cfg, tokenizer, gen)
    for _ in run:
        pass
    return run.sequences


class TextStream:
    """Text of one prompt's continuation, piece by piece as tokens are generated.

    Pieces never split a UTF-8 character (ids wait until their bytes complete one) and never include a
    stop string: text that might begin one is held back until it is clearly not one. Joined, the pieces equal
    the non-streamed text. After iteration, ``text``, ``prompt_tokens``, ``new_tokens``,
    ``time_to_first_token`` and ``tokens_per_second`` describe the run.
    """

    def __init__(self, run: Decoding, tokenizer):
        from .tokenizer import StreamDecoder

        if run.seqs.shape[0] != 1:
            raise ValueError("streaming handles one sequence; pass one prompt and num_return_sequences=1")
        self.run, self.decoder, self.stops = run, StreamDecoder(tokenizer, skip_special_tokens=True), run.cfg.stops
        self.text = ""
        self.prompt_tokens = run.prompt_length

    @property
    def new_tokens(self) -> int:
        return self.run.steps

    @property
    def time_to_first_token(self) -> float | None:
        r = self.run
        return None if r.first_token_at is None else r.first_token_at - r.started

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token (the prefill is in ``time_to_first_token``)."""
        r = self.run
        if r.finished_at is None or r.first_token_at is None or r.steps < 2:
            return None
        return (r.steps - 1) / max(r.finished_at - r.first_token_at, 1e-9)

    def __iter__(self) -> Iterator[str]:
        pending = ""
        steps = iter(self.run)
        try:
            for tokens in steps:
                pending += self.decoder.push(tokens[0])
                out, pending, stopped = self._split(pending)
                if out:
                    self.text += out
                    yield out
                if stopped:
                    return
            out, _, _ = self._split(pending + self.decoder.flush(), final=True)
            if out:
                self.text += out
                yield out
        finally:
            steps.close()

    def _split(self, pending: str, final: bool = False) -> tuple[str, str, bool]:
        """(text safe to emit, text held back, stop string reached)."""
        if not self.stops:
            return pending, "", False
        cut = trim_at_stop(pending, self.stops)
        if len(cut) < len(pending):
            return cut, "", True
        hold = 0 if final else stop_prefix_length(pending, self.stops)
        return pending[: len(pending) - hold], pending[len(pending) - hold:], False


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string (streamed text holds
    it back until it is clearly not one)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream(model, tokenizer, input_ids: Tensor | Sequence, attention_mask: Tensor | None = None,
           **params: Any) -> TextStream:
    """Stream the continuation of one prompt as text (greedy, sampling or contrastive search)."""
    return TextStream(start(model, input_ids, attention_mask, tokenizer=tokenizer, **params), tokenizer)
