"""Which sequences run in the next step, and how many of their tokens: continuous batching over a paged cache.

Two queues, as in vLLM and nano-vllm: ``waiting`` (not yet admitted, or preempted) and ``running``. Each step
first gives every running sequence that is decoding its one token, then continues prompts that are part-way
through their prefill, then admits waiting sequences while there is room — a free row (``max_num_seqs``),
token budget (``max_num_batched_tokens``, so a long prompt is prefilled in chunks beside the decoding rows) and
free cache blocks. When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from its tokens
later (its full blocks usually survive in the prefix cache). No request fails because others are running.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..cache import CacheFull, PagedKVCache
from .params import SamplingParams
from .sampler import Logprob


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One completion being generated: its tokens, how many of them are in the cache, its text so far."""

    request_id: str
    index: int  # which of the request's ``n`` completions
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    leader: Sequence | None = None  # completion 0 of the request, for the others (n > 1)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    text: str = ""  # decoded output so far (cut at a stop string once finished)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, then one per prompt token]
    adapter: str | None = None  # the adapter it runs with (None: the base model)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens not yet run through the model (the whole prompt at first, then the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Scheduler:
    """Admits, continues and preempts sequences; owns nothing but the two queues and the cache's bookkeeping."""

    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and give back its cache blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The rows of the next step: ``(sequence, number of its pending tokens to run)``, slots reserved."""
        budget = self.max_num_batched_tokens
        rows: dict[Sequence, int] = {}
        decoding = [s for s in self.running if s.pending == 1]
        prefilling = [s for s in self.running if s.pending > 1]
        for seq in decoding + prefilling:
            if seq not in self.running or budget == 0:
                continue  # preempted while making room for an earlier row
            n = min(seq.pending, budget)
            if self._reserve(seq, n, rows):
                rows[seq] = n
                budget -= n
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            lead = seq.leader
            if lead is not None and not lead.finished and lead.computed < len(lead.prompt_ids):
                continue  # n > 1: wait for the first completion's prompt, then share its cached blocks
            if seq.id not in self.cache.seqs:
                # Whole blocks already cached are reused, unless the prompt's own logprobs are wanted.
                seq.computed = self.cache.add(seq.id, seq.tokens, reuse=seq.prompt_logprobs is None,
                                              salt=("adapter", seq.adapter) if seq.adapter else 0)
            n = min(seq.pending, budget)
            # Keep a block in hand for each running sequence, so admitting does not force a preemption next step.
            if not self.cache.fits(seq.id, n, spare=len(self.running)):
                self.cache.free(seq.id)  # do not hold on to its prefix blocks while it waits
                break
            self.cache.append(seq.id, seq.tokens[seq.computed:seq.computed + n])
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            rows[seq] = n
            budget -= n
        return list(rows.items())

    def _reserve(self, seq: Sequence, n: int, rows: dict[Sequence, int]) -> bool:
        """Reserve slots for ``n`` more tokens of ``seq``, preempting newer sequences while the cache is full.
        False if ``seq`` itself had to be preempted."""
        while True:
            try:
                self.cache.append(seq.id, seq.tokens[seq.computed:seq.computed + n])
                return True
            except CacheFull:
                victim = self.running[-1]
                self._preempt(victim)
                rows.pop(victim, None)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first; it is recomputed from its tokens when admitted again."""
        self.running.remove(seq)
        self.cache.free(seq.id)
        seq.computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
