"""The engine: requests in, a step at a time, per-request outputs out (vLLM's ``LLMEngine`` surface).

``add_request`` checks a request (and its adapter, ``lora_request``) and queues it; ``step`` runs one
forward pass of prompt chunks and one of decoding rows over the paged cache, samples every row that reached
the end of its tokens, and returns the requests that changed, each with its text so far; ``abort_request``
cancels one at any time and gives its cache blocks back at once. The engine calls the model only through its
core ``step(ids, frame, last)``; with adapters the frame also carries each row's adapter.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.state import adapter_index, state_of
from ..cache import PagedKVCache
from ..generate import cache_dtype, check_finite, check_fits, stop_prefix_length
from ..models.core import kv_heads
from ..tokenizer import StreamDecoder
from .lora import AdapterTable, LoRARequest
from .params import SamplingParams
from .sampler import Logprob, Row, sample
from .scheduler import Scheduler, Sequence, Status

DEFAULT_KV_CACHE_MEMORY = 2 * 2**30  # bytes; at most what max_num_seqs full-context sequences would use


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's fields). ``finish_reason``: None while running, then ``"stop"``
    (EOS, a stop token or a stop string; ``stop_reason`` says which of the last two), ``"length"`` (max_tokens
    or the context's end) or ``"abort"``."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its completions so far; ``finished`` once all of them have ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


def _groups(rows: list[tuple[Sequence, int]], waste: float = 0.25) -> list[list[tuple[Sequence, int]]]:
    """Forward passes for one step: prompt chunks of similar lengths together (padding at most ``waste`` of
    the tokens computed), then all decoding rows (one token each) in one pass."""
    groups: list[list[tuple[Sequence, int]]] = []
    for row in sorted((r for r in rows if r[1] > 1), key=lambda r: r[1]):
        group = groups[-1] if groups else None
        if group is not None and row[1] * (len(group) + 1) <= (1 + waste) * (sum(n for _, n in group) + row[1]):
            group.append(row)
        else:
            groups.append([row])
    decoding = [r for r in rows if r[1] == 1]
    return groups + ([decoding] if decoding else [])


class LLMEngine:
    """Continuous batching of many requests over one model and one paged KV cache.

    ``max_num_seqs`` sequences run at once; ``max_num_batched_tokens`` bounds the tokens of one step (prompts
    longer than that are prefilled in chunks); ``kv_cache_memory`` (bytes) sizes the cache; ``max_model_len``
    caps prompt + completion (default: the model's context). ``enable_lora`` lets requests name an adapter
    (``lora_request``), ``max_loras`` of them loaded at once.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_num_seqs: int = 64,
                 max_model_len: int | None = None, kv_cache_memory: int | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 512, enable_lora: bool = False, max_loras: int = 8):
        config = model.config
        limit = config.max_position_embeddings
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or not 1 < max_model_len <= limit):
            raise ValueError(f"max_model_len must be an integer in [2, {limit}] (the model's context), "
                             f"got {max_model_len!r}")
        if any(getattr(m, "attn_implementation", None) == "flash_attention_2" for m in model.modules()):
            raise ValueError("the engine attends over a paged cache with 'sdpa' or 'eager'; load the model with "
                             "attn_implementation='sdpa'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len or limit
        dtype = cache_dtype(model)
        heads = kv_heads(model)  # all of them, or a tensor-parallel rank's share
        per_token = PagedKVCache.bytes_per_token(config, dtype, heads)
        if kv_cache_memory is None:
            kv_cache_memory = min(DEFAULT_KV_CACHE_MEMORY, per_token * max_num_seqs * self.max_model_len)
            kv_cache_memory = max(kv_cache_memory, per_token * (self.max_model_len + block_size))
        if not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a number of bytes (int >= 1), got {kv_cache_memory!r}")
        device = next(model.parameters()).device
        self.cache = PagedKVCache.for_memory(config, kv_cache_memory, block_size, dtype, device, max_num_seqs,
                                             max_num_batched_tokens, heads)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens)
        self.requests: dict[str, _Request] = {}
        self._detok: dict[int, StreamDecoder] = {}
        self.adapters = AdapterTable(model, max_loras) if enable_lora else None
        self.requests_added = 0  # requests accepted since the engine started

    # ---- requests --------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Seq[int] | dict, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Check and queue a request: ``prompt`` is text, a list of token ids, or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}``; ``lora_request`` the adapter it runs with (loaded on first use).
        Raises ValueError (naming the problem) for a request that can never run; the requests already queued
        are not affected."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        params.check_vocab(vocab)
        P, limit = len(ids), self.max_model_len
        check_fits(P, params.max_tokens, limit)
        need = P + (params.max_tokens or limit - P)
        capacity = self.cache.num_blocks * self.cache.block_size
        if need > capacity:
            raise ValueError(f"the request needs cache room for {need} tokens (prompt {P} + completion) and the "
                             f"whole cache holds {capacity}; raise kv_cache_memory or lower max_tokens")
        adapter = self._adapter(lora_request, params.n)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            gen = torch.Generator(device=self.cache.k.device)
            # Unseeded requests draw their seed from torch's global generator (torch.manual_seed repeats them).
            gen.manual_seed(int(torch.randint(0, 2**63 - 1, ())) if seed is None else seed)
            seqs.append(Sequence(request_id, i, ids, params, gen, seqs[0] if seqs else None, adapter=adapter))
            if params.logprobs is not None:
                seqs[-1].logprobs, seqs[-1].cumulative_logprob = [], 0.0
            if params.prompt_logprobs is not None and i == 0:
                seqs[-1].prompt_logprobs = [None]  # the first token has no context to be scored in
        self.requests[request_id] = _Request(request_id, text, ids, params, seqs)
        self.requests_added += 1
        for seq in seqs:
            if self.tokenizer is not None:
                self._detok[seq.id] = StreamDecoder(self.tokenizer, params.skip_special_tokens)
            self.scheduler.add(seq)

    def _adapter(self, lora_request: LoRARequest | None, n: int) -> str | None:
        """The adapter name the request's sequences run with (loaded now if new), or None for the base model."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.adapters is None:
            raise ValueError("this engine serves the base model only; create it with enable_lora=True to run "
                             "requests with adapters")
        name = self.adapters.acquire(lora_request)
        for _ in range(n - 1):
            self.adapters.acquire(lora_request)  # one use per sequence, released as each finishes
        return name

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter now (kept until evicted or removed); True when it is loaded."""
        if self.adapters is None:
            raise ValueError("create the engine with enable_lora=True to load adapters")
        name = self.adapters.acquire(lora_request)
        self.adapters.release(name)
        return True

    def remove_lora(self, lora_name: str) -> bool:
        """Unload an adapter no unfinished request uses."""
        if self.adapters is None:
            raise ValueError("this engine has no adapters")
        self.adapters.unload(lora_name)
        return True

    def list_loras(self) -> list[str]:
        return [] if self.adapters is None else self.adapters.names()

    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; give at least one character or token")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids, or give the engine a tokenizer")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                             for i in prompt):
            raise TypeError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token id")
        return None, list(prompt)

    def abort_request(self, request_id: str | Seq[str]) -> None:
        """Cancel requests now (unknown or finished ids are ignored); their cache blocks are freed at once."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self.requests.pop(rid, None)
            for seq in [] if request is None else request.seqs:
                if not seq.finished:
                    self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def get_num_unfinished_requests(self) -> int:
        return sum(not r.finished for r in self.requests.values())

    # ---- one step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of the requests it advanced (finished ones are then forgotten)."""
        rows = self.scheduler.schedule()
        seqs: list[Sequence] = []
        parts: list[torch.Tensor] = []
        for group in _groups(rows):
            done, logits = self._forward(group)
            seqs += done
            parts.append(logits)
        touched: dict[str, _Request] = {}
        if seqs:
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            logits = check_finite(logits.float(), "this step")
            rows_ = [Row(s.params, s.prompt_ids, s.output_ids, s.generator, self.model.config.eos_token_id)
                     for s in seqs]
            for seq, picked in zip(seqs, sample(logits, rows_), strict=True):
                self._append(seq, picked.token, picked)
                touched[seq.request_id] = self.requests[seq.request_id]
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

    def _forward(self, group: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """One forward pass over ``group``; the rows that have run all their tokens, and their logits."""
        T = max(n for _, n in group)
        dev = self.cache.k.device
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for b, (seq, n) in enumerate(group):
            ids[b, :n] = torch.tensor(seq.tokens[seq.computed:seq.computed + n])
        frame = self.cache.frame([(seq.id, n) for seq, n in group])
        if self.adapters is not None:
            frame.adapter = self._rows([seq.adapter for seq, _ in group])
        last = torch.tensor([n - 1 for _, n in group], device=dev)
        logits, hidden = self.model.step(ids.to(dev), frame, last)
        ready = []
        for b, (seq, n) in enumerate(group):
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_ids):
                self._score_prompt(seq, hidden[b, :n], ids[b, :n])
            self.cache.publish(seq.id)  # its full blocks are computed now: later prompts may share them
            seq.computed += n
            if seq.pending == 0:
                ready.append(b)
        if len(ready) < len(group):
            logits = logits[torch.tensor(ready, dtype=torch.long, device=logits.device)]
        return [group[b][0] for b in ready], logits

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that follow this chunk's positions (prompt_logprobs)."""
        start = seq.computed  # position of the chunk's first token
        head = self.model.get_output_embeddings()
        if self.adapters is not None:  # an adapted head: this one row runs with the sequence's adapter
            state_of(self.model).set_rows(self._rows([seq.adapter]))
            hidden = hidden[None]
        logp = torch.log_softmax(head(hidden).float(), dim=-1).reshape(-1, self.model.config.vocab_size)
        k = seq.params.prompt_logprobs
        for t in range(logp.shape[0]):
            pos = start + t + 1
            if pos >= len(seq.prompt_ids) or pos < len(seq.prompt_logprobs):
                continue  # past the prompt, or already scored before a preemption
            token = seq.prompt_ids[pos]
            lp = logp[t]
            entry = {token: Logprob(float(lp[token]), int((lp > lp[token]).sum()) + 1)}
            if k:
                values, idx = torch.topk(lp, k)
                for r, (value, i) in enumerate(zip(values.tolist(), idx.tolist(), strict=True)):
                    entry.setdefault(i, Logprob(value, r + 1))
            seq.prompt_logprobs.append(entry)

    def _append(self, seq: Sequence, token: int, picked) -> None:
        p = seq.params
        seq.output_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(picked.top)
            seq.cumulative_logprob += picked.logprob
        detok = self._detok.get(seq.id)
        start = len(seq.text)
        if detok is not None:
            seq.text += detok.push(token)
        counted = len(seq.output_ids) >= p.min_tokens
        eos = self.model.config.eos_token_id
        if counted and not p.ignore_eos and token == eos:
            return self._finish(seq, "stop")
        if counted and p.stop_token_ids and token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        if counted and p.stops and len(seq.text) > start:
            window = max(0, start - max(len(s) for s in p.stops) + 1)
            hits = [(seq.text.find(s, window), s) for s in p.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.text = seq.text[:i + len(s) if p.include_stop_str_in_output else i]
                return self._finish(seq, "stop", s, flush=False)
        if p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            return self._finish(seq, "length")
        if len(seq.tokens) >= self.max_model_len:
            return self._finish(seq, "length")
        return None

    def _rows(self, adapters: list[str | None]) -> torch.Tensor | None:
        """``Frame.adapter`` for rows running ``adapters`` (None when every row runs the base model)."""
        if state_of(self.model) is None:
            return None  # no adapter loaded yet
        return adapter_index(self.model, adapters, self.cache.k.device)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None, flush: bool = True) -> None:
        if self.adapters is not None:
            self.adapters.release(seq.adapter)
        detok = self._detok.pop(seq.id, None)
        if detok is not None and flush:
            seq.text += detok.flush()
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.scheduler.remove(seq)

    def _output(self, request: _Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            text = seq.text
            if not seq.finished and seq.params.stops:
                text = text[:len(text) - stop_prefix_length(text, seq.params.stops)]  # may become a stop string
            outs.append(CompletionOutput(seq.index, text, list(seq.output_ids), seq.cumulative_logprob,
                                         None if seq.logprobs is None else list(seq.logprobs), seq.finish_reason,
                                         seq.stop_reason))
        lead = request.seqs[0].prompt_logprobs
        return RequestOutput(request.request_id, request.prompt, list(request.prompt_ids), outs, request.finished,
                             None if lead is None else list(lead))
