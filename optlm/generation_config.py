"""What a generation asks for, without any framework: transformers' ``GenerationConfig`` fields with their
checks, and the one check that a request fits the context. The PyTorch decoder (``optlm.generate``), the engine,
and the JAX and TensorFlow ports (``optlm.flax``, ``optlm.tf``) all validate through here, so the same bad
argument gets the same message everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_TEMPERATURE = 1e-5  # temperatures below this decode greedily


@dataclass
class GenerationConfig:
    """Decoding parameters, named and defaulted as in transformers' ``GenerationConfig``.

    ``temperature=0`` (or below ``MIN_TEMPERATURE``) means greedy even with ``do_sample=True``.
    ``eos_token_id`` / ``pad_token_id`` left as None come from the model config (OPT: 2 and 1).
    ``penalty_alpha > 0`` with ``top_k > 1`` selects contrastive search.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    penalty_alpha: float | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None

    @property
    def sampling(self) -> bool:
        # Below MIN_TEMPERATURE the scaled logits overflow float32; such a distribution is greedy anyway (vLLM
        # draws the same line).
        return bool(self.do_sample) and self.temperature >= MIN_TEMPERATURE

    @property
    def mode(self) -> str:
        """``"beam"``, ``"contrastive"``, ``"sample"`` or ``"greedy"`` (transformers' selection rules)."""
        if self.num_beams > 1:
            return "beam"
        if not self.do_sample and self.penalty_alpha is not None and self.penalty_alpha > 0 and (self.top_k or 0) > 1:
            return "contrastive"
        return "sample" if self.sampling else "greedy"

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]

    @property
    def stops(self) -> list[str]:
        return stop_list(self.stop_strings)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        self._check_types()
        if self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.min_new_tokens < 0:
            bad(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            bad(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        if any(e < 0 for e in self.eos_ids) or (self.pad_token_id is not None and self.pad_token_id < 0):
            bad(f"eos_token_id and pad_token_id must be token ids (>= 0), got {self.eos_token_id!r} and "
                f"{self.pad_token_id!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            bad(f"top_k must be >= 0 (0 or None = no top-k filtering), got {self.top_k}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            bad(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            bad("num_beams and num_return_sequences must be >= 1")
        if self.penalty_alpha is not None and not 0 <= self.penalty_alpha <= 1:
            bad(f"penalty_alpha must lie in [0, 1], got {self.penalty_alpha}")
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.mode in ("greedy", "contrastive") and self.num_return_sequences > 1:
            bad(f"{self.mode} decoding returns one sequence per prompt; pass do_sample=True (with temperature > 0) "
                f"or num_beams >= {self.num_return_sequences} to get num_return_sequences="
                f"{self.num_return_sequences}")


    def _check_types(self) -> None:
        """Each keyword holds its kind of value: a TypeError naming it otherwise (NaN counts as no number)."""
        def fail(name: str, kind: str) -> None:
            raise TypeError(f"{name} must be {kind}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "num_beams", "num_return_sequences"):
            if not is_int(getattr(self, name)):
                fail(name, "an integer")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "penalty_alpha"):
            v = getattr(self, name)
            if v is None and name == "penalty_alpha":
                continue
            if not is_finite_number(v):
                fail(name, "a finite number")
        if self.top_k is not None and not is_int(self.top_k):
            fail("top_k", "an integer or None")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "True or False")
        if self.pad_token_id is not None and not is_int(self.pad_token_id):
            fail("pad_token_id", "a token id (int) or None")
        eos = self.eos_token_id
        if eos is not None and not is_int(eos) and not (isinstance(eos, (list, tuple))
                                                          and all(is_int(e) for e in eos)):
            fail("eos_token_id", "a token id, a list of them, or None")
        stops = self.stop_strings
        if stops is not None and not isinstance(stops, str) and not (
                isinstance(stops, (list, tuple)) and all(isinstance(t, str) and t for t in stops)):
            fail("stop_strings", "a string or a list of non-empty strings")


def is_int(v: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float, not a bool, not NaN or infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stop_list(stop_strings: str | Sequence[str] | None) -> list[str]:
    """``stop_strings`` as a list (one string, several, or none)."""
    if not stop_strings:
        return []
    return [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)


_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


def validate_params(params: dict[str, Any]) -> None:
    """Check decoding keywords before a model is at hand (a CLI validates before loading one)."""
    GenerationConfig(**{k: v for k, v in params.items() if k in _FIELDS and v is not None}).validate()


def make_config(model, max_length: int | None = None, prompt_length: int = 0, **params: Any) -> GenerationConfig:
    """A validated config from ``generate``'s keywords; unknown names raise TypeError (typos fail loudly)."""
    unknown = set(params) - _FIELDS
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(unknown)}")
    params = {k: v for k, v in params.items() if v is not None or k in ("top_k", "penalty_alpha", "stop_strings")}
    if "max_new_tokens" not in params and max_length is not None:
        params["max_new_tokens"] = max_length - prompt_length  # transformers: max_length counts the prompt
    cfg = GenerationConfig(**params)
    if cfg.eos_token_id is None:
        cfg.eos_token_id = model.config.eos_token_id
    if cfg.pad_token_id is None:
        # As in transformers: the config's pad id, else the first eos id.
        cfg.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else (
            cfg.eos_ids[0] if cfg.eos_ids else None)
    cfg.validate()
    return cfg



class ContextLengthError(ValueError):
    """A request longer than the context: ``prompt_tokens`` (+ the new tokens asked for) over ``limit``."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens, self.limit = prompt_tokens, limit

    def __reduce__(self):  # pickled whole (a tensor-parallel rank hands it to the caller's process)
        return type(self), (str(self), self.prompt_tokens, self.limit)


def check_fits(prompt: int, new: int | None, limit: int, name: str = "max_tokens") -> None:
    """The one up-front check that a request fits the context: a :class:`ContextLengthError` (a ValueError)
    naming both lengths otherwise. ``new=None`` asks for whatever room the prompt leaves (at least one token)."""
    if prompt >= limit:
        raise ContextLengthError(f"the prompt has {prompt} tokens and the context holds {limit} (prompt + "
                                 "completion); shorten the prompt", prompt, limit)
    if new is not None and prompt + new > limit:
        raise ContextLengthError(f"the prompt has {prompt} tokens and {name} is {new}: {prompt + new} tokens, more "
                                 f"than the context's {limit}; lower {name} to {limit - prompt} or shorten the prompt",
                                 prompt, limit)


def check_prompt(ids: np.ndarray, attention_mask: np.ndarray | None, cfg: GenerationConfig, vocab: int,
                 limit: int) -> np.ndarray | None:
    """The prompt checks every ``generate`` makes, on host arrays: ``ids`` ``(B, P)`` token ids in the vocabulary,
    the mask shaped as the ids, the pad id a token, the whole request within ``limit`` positions. Returns the
    mask to use (``(B, P)``), or None where there is no padding; as in transformers, pad ids in a prompt given
    without a mask mean padding (unless the pad id is also an end-of-sequence id)."""
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) array of token ids, got shape "
                         f"{tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocab_size), got "
                         f"{int(ids.min())}..{int(ids.max())}")
    if cfg.pad_token_id is not None and cfg.pad_token_id >= vocab:
        raise ValueError(f"pad_token_id {cfg.pad_token_id} is not a token of this model (vocab_size {vocab})")
    mask = None
    if attention_mask is not None:
        if attention_mask.size != ids.size:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids "
                             f"{tuple(ids.shape)}")
        mask = attention_mask.reshape(ids.shape)
    pad = cfg.pad_token_id
    if mask is None and pad is not None and pad not in cfg.eos_ids and bool((ids == pad).any()):
        mask = (ids != pad).astype(np.int64)
    if mask is not None and bool(mask.all()):
        mask = None
    check_fits(ids.shape[1], cfg.max_new_tokens, limit, "max_new_tokens")
    return mask
