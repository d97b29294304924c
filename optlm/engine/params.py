"""Per-request sampling settings, with vLLM's names, meanings and defaults.

Code written for ``vllm.SamplingParams`` ports by changing the import. Every field is checked when the object is
made: a bad value is a ValueError naming the field and what it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation_config import MIN_TEMPERATURE
from ..generation_config import is_finite_number as _is_number
from ..generation_config import is_int as _is_int

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows


@dataclass
class SamplingParams:
    """How one request is decoded.

    ``temperature=0`` is greedy; ``top_k`` of 0 or -1 and ``top_p=1`` switch those filters off; ``min_p`` drops
    tokens less likely than ``min_p`` times the most likely one. ``repetition_penalty`` (CTRL's, on prompt and
    output tokens) divides positive and multiplies negative logits; ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's, on output tokens) subtract a constant and a per-occurrence amount.
    ``logit_bias`` adds to chosen tokens' logits. Generation ends at ``max_tokens`` (None: the context's end),
    at EOS (unless ``ignore_eos``), at any ``stop_token_ids`` or at a ``stop`` string (cut from the text unless
    ``include_stop_str_in_output``); neither EOS nor stops count before ``min_tokens``. ``logprobs=k`` returns
    the log-probability of each generated token and of the ``k`` most likely alternatives, taken from the
    model's distribution before any processing; ``prompt_logprobs=k`` does the same for every prompt token after
    the first (scoring a text; such a prompt is computed in full, never taken from the prefix cache). ``seed``
    makes a sampled request repeatable, whatever else is running beside it. With ``n > 1`` the request returns
    ``n`` completions; completion ``i`` of a seeded request uses seed ``seed + i``.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stops: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0 (1 = no penalty)")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "an integer >= 1, or 0 or -1 for no top-k filtering")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "an integer in [0, 2**63) or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1, or None for as many as the context allows")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"at most max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"an integer in [0, {MAX_LOGPROBS}] or None")
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)):
            bad("stop", "a non-empty string, a list of them, or None")
        self.stops = list(stop or [])
        ids = self.stop_token_ids
        if ids is not None and not (isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids)):
            bad("stop_token_ids", "a list of token ids (integers >= 0) or None")
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                bad("logit_bias", "a dict of token id → bias in [-100, 100]")
            try:
                bias = {int(k): float(v) for k, v in bias.items()}  # JSON object keys arrive as strings
            except (TypeError, ValueError):
                bad("logit_bias", "a dict of token id → bias in [-100, 100]")
            if any(k < 0 or not -100 <= v <= 100 for k, v in bias.items()):
                bad("logit_bias", "a dict of token id (>= 0) → bias in [-100, 100]")
            self.logit_bias = bias
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the settings must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids or []), ("logit_bias", self.logit_bias or {})):
            out = [i for i in ids if i >= vocab_size]
            if out:
                raise ValueError(f"{name} names token {out[0]}, outside the vocabulary [0, {vocab_size})")
