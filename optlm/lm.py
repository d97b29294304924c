"""Text in, text out: ``lm = optlm.load(...)``; ``lm.generate``, ``lm.stream``, ``lm.chat``.

Strings instead of tensors, named parameter presets, the context window checked up front. With no decoding
keywords the text API samples with the ``balanced`` preset (temperature 0.7, nucleus 0.9, a mild repetition
penalty): greedy decoding loops on small models ("and the other, and the other, …"), and people reading the
output expect what llama.cpp and vLLM give them. ``temperature=0`` is plain greedy decoding, ``seed=`` makes
sampling repeatable. Other keywords are those of :func:`optlm.generate.generate`. (The transformers-style
``OPTForCausalLM.generate`` keeps transformers' greedy default.)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import generate as gen
from .chat import ChatSession, ChatTemplate, check_text, fit_history, strip_pieces, trim_notice
from .hf import AutoModelForCausalLM
from .hf.base import ForCausalLM

DEFAULT_MAX_NEW_TOKENS = 64
QUANTIZE_MODES = ("int8", "int4", "int8-dynamic")

# Parameter presets in the spirit of an API playground: temperature, nucleus size and repetition penalty
# chosen together. Greedy is exact and repeatable; the sampling presets trade fidelity for variety.
PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "repetition_penalty": 1.0},
    "precise": {"do_sample": True, "temperature": 0.3, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.2},
    "balanced": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.1},
    "creative": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.98, "repetition_penalty": 1.0},
}


DEFAULT_PRESET = "balanced"
# Keywords that choose the decoding method themselves: given any, no default preset is laid under them.
_METHOD_KEYS = ("do_sample", "num_beams", "penalty_alpha")


def resolve_params(preset: str | None = None, **params: Any) -> dict[str, Any]:
    """A preset overlaid with explicit keywords (None means "not given"; 0 is kept as 0).

    Without a preset, :data:`DEFAULT_PRESET` is used unless the keywords choose the method themselves
    (``do_sample``, ``num_beams``, ``penalty_alpha``, or ``temperature=0`` for plain greedy decoding).
    ``temperature`` given without ``do_sample`` decides it: positive samples, 0 is greedy. ``stop`` is
    accepted as another name for ``stop_strings``.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in params.items() if v is not None}
    if "stop" in given:
        given["stop_strings"] = given.pop("stop")
    if preset is None and not any(k in given for k in _METHOD_KEYS) and given.get("temperature", 1) != 0:
        preset = DEFAULT_PRESET
    merged = {**(PRESETS[preset] if preset else {}), **given}
    temperature = given.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and "do_sample" not in given:
        merged["do_sample"] = temperature > 0  # other values are left for validation to name
    merged.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    return merged


class LM:
    """A causal language model (any family) and its tokenizer behind a string interface."""

    def __init__(self, model: ForCausalLM, tokenizer: Any, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or "model"

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def __repr__(self) -> str:
        return f"LM({self.name!r}, context_length={self.context_length})"

    # ---- completion --------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts:
            raise ValueError("no prompts given; pass a string or a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
            check_text(p, f"prompt {i}")
        gen.validate_params(params)
        enc = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        longest = int(mask.sum(1).max())
        if longest >= self.context_length:
            raise ValueError(f"prompt has {longest} tokens; {self.name} has a context window of {self.context_length} "
                             "tokens (the prompt plus at least one new token) — shorten the prompt")
        # Room for new tokens is whatever the (padded) prompt leaves: cap the request rather than fail, and say so.
        room = self.context_length - ids.shape[1]
        if params["max_new_tokens"] > room:
            warnings.warn(f"max_new_tokens {params['max_new_tokens']} does not fit: the prompt ({ids.shape[1]} "
                          f"tokens) leaves room for {room} in the {self.context_length}-token context of "
                          f"{self.name}; generating at most {room}", stacklevel=3)
            params["max_new_tokens"] = room
        return ids, mask

    def generate(self, prompt: str | Sequence[str], preset: str | None = None, **params: Any) -> list[str]:
        """Continuations of one prompt or a batch (``num_return_sequences`` per prompt, grouped by prompt),
        without the prompt text and cut before any stop string."""
        out, width = self.generate_ids(prompt, preset, **params)
        return self.decode(out[:, width:], params.get("stop_strings", params.get("stop")))

    def generate_ids(self, prompt: str | Sequence[str], preset: str | None = None,
                     **params: Any) -> tuple[torch.Tensor, int]:
        """The ids :meth:`generate` decodes: ``(prompt rows, left-padded, + new tokens)`` and the prompt width."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        params = resolve_params(preset, **params)
        ids, mask = self._encode(prompts, params)
        return gen.generate(self.model, ids, mask, tokenizer=self.tokenizer, **params), ids.shape[1]

    def decode(self, new_ids: torch.Tensor, stop_strings: str | Sequence[str] | None = None) -> list[str]:
        """Text of each row of new tokens, special tokens skipped, cut before the first stop string."""
        stops = gen.stop_list(stop_strings)
        return [gen.trim_at_stop(t, stops) for t in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]

    def stream(self, prompt: str, preset: str | None = None, **params: Any) -> gen.TextStream:
        """Iterator over the text of one prompt's continuation as it is generated (see ``TextStream``)."""
        params = resolve_params(preset, **params)
        ids, mask = self._encode([prompt], params)
        return gen.stream(self.model, self.tokenizer, ids, mask, **params)

    # ---- chat --------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict[str, str]], preset: str | None = None,
             template: ChatTemplate | None = None, **params: Any) -> str:
        """The assistant's reply to ``messages`` (``{"role": "system"|"user"|"assistant", "content": ...}``),
        rendered with :class:`optlm.chat.ChatTemplate`; old turns that do not fit the context are dropped
        with a warning."""
        return "".join(self.chat_stream(messages, preset=preset, template=template, **params))

    def chat_stream(self, messages: Sequence[dict[str, str]], preset: str | None = None,
                    template: ChatTemplate | None = None,
                    on_trim: Callable[[list[dict[str, str]], int, int], None] | None = None,
                    **params: Any) -> Iterator[str]:
        """:meth:`chat`, piece by piece. ``on_trim(kept_messages, dropped, context)`` hears about dropped turns."""
        template = template or ChatTemplate()
        params = resolve_params(preset, **params)
        params["stop_strings"] = template.stop_strings + gen.stop_list(params.get("stop_strings"))
        budget = self.context_length - params["max_new_tokens"]
        kept, dropped = fit_history(messages, lambda text: len(self.tokenizer.encode(text)), budget, template)
        if dropped:
            if on_trim is None:
                warnings.warn(trim_notice(dropped, self.context_length), stacklevel=3)
            else:
                on_trim(kept, dropped, self.context_length)
        return strip_pieces(iter(self.stream(template.render(kept), **params)))

    def chat_session(self, system: str | None = None, template: ChatTemplate | None = None,
                     on_trim: Callable[[str], None] | None = None, **params: Any) -> ChatSession:
        """A conversation that remembers its turns: ``session.send("hi")`` → reply."""
        return ChatSession(self, system=system, template=template, on_trim=on_trim, **params)


def load(path_or_hub_id: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, quantize: str | None = None, revision: str | None = None,
         tokenizer: Any = None, adapter: str | os.PathLike | None = None, tensor_parallel: bool = False,
         offload: bool | int = False, max_memory: int | str | None = None, fast: bool | None = None) -> LM:
    """Load a checkpoint directory or hub id (None: the bundled default model, or the adapter's base model)
    with its tokenizer.

    ``dtype=None`` keeps the checkpoint's dtype, except that float16 on CPU becomes float32 (CPU half
    precision is slow and partly unsupported). ``quantize`` ("int8" / "int4" / "int8-dynamic") converts the
    linear layers with :func:`optlm.quantize.quantize`.
    ``tokenizer`` (a path or a Tokenizer) overrides the checkpoint's.
    ``tensor_parallel=True``: inside a ``torch.distributed`` group, this rank's share of the model
    (:mod:`optlm.parallel`), read as such from the checkpoint; every rank calls ``load`` alike.
    ``adapter``: a LoRA or bottleneck adapter directory (or hub id) in peft's format. A LoRA is merged into the
    floating-point weights before any quantization (same outputs, the base model's speed); a bottleneck
    adapter stays a pair of small layers.
    ``offload`` / ``max_memory``: a model larger than memory streams its decoder layers from the checkpoint
    (see ``from_pretrained``; :mod:`optlm.parallel.offload`).
    ``fast`` (default: on, unless the environment sets ``OPTLM_FAST=0``): the speed-ups of
    :func:`optlm.fast.optimize`, which keep outputs as they are; ``fast=False`` runs the plain PyTorch modules.
    """
    from .tokenizer import Tokenizer

    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    adapter_config = None
    if adapter is not None:
        from .adapters import read_config

        _, adapter_config = read_config(adapter, revision)
        if path_or_hub_id is None:
            path_or_hub_id = adapter_config.base_model_name_or_path
            if path_or_hub_id is None:
                raise ValueError(f"{adapter}/adapter_config.json names no base model (base_model_name_or_path); "
                                 "pass the model it was trained on")
    if path_or_hub_id is None:
        from .bundled import BUNDLED_MODEL_NAME, bundled_model_path

        path, name = bundled_model_path(), BUNDLED_MODEL_NAME
    else:
        path, name = path_or_hub_id, str(path_or_hub_id)
    if offload or max_memory is not None:
        if tensor_parallel or quantize is not None or adapter is not None:
            raise ValueError("streaming layers (--offload / --max-memory) runs a floating-point model in one "
                             "process; it does not combine with tensor parallelism, quantization or adapters yet")
        dtype = _cpu_dtype(path, revision, dtype, device)  # converting afterwards would undo the streaming
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device=device, revision=revision,
                                                     offload=offload, max_memory=max_memory, fast=False)
    elif tensor_parallel:
        if adapter is not None and adapter_config.peft_type != "LORA":
            raise ValueError("tensor parallelism carries LoRA adapters (merged into each rank's slices); a "
                             f"{adapter_config.peft_type.lower()} adapter is not supported with it yet")
        from .parallel.tp import load_tensor_parallel, quantize_tensor_parallel

        dtype = _cpu_dtype(path, revision, dtype, device)  # before the adapter is merged and the slices quantized
        model = load_tensor_parallel(path, dtype=dtype, revision=revision)
        if adapter is not None:  # each rank merges its share of the update: the slices of the merged weights
            model, adapter, adapter_config = _with_adapter(model, adapter, revision), None, None
        if quantize is not None:  # each rank quantizes its slices as the whole model's quantization would
            model, quantize = quantize_tensor_parallel(model, quantize), None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device=device, revision=revision,
                                                     fast=False)  # optimized below
    if dtype is None and model.dtype == torch.float16 and model.device.type == "cpu":
        model = model.float()
    lora = adapter_config is not None and adapter_config.peft_type == "LORA"
    if lora:
        model = _with_adapter(model, adapter, revision)
    if quantize is not None:
        model = _quantize(model, quantize)
    if adapter is not None and not lora:
        model = _with_adapter(model, adapter, revision)
    from .fast import on_by_default, optimize

    if on_by_default() if fast is None else fast:
        model = optimize(model)  # fused q/k/v, faster CPU linears, one-call decode steps; outputs unchanged
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        source = tokenizer if tokenizer is not None else path
        tokenizer = Tokenizer.from_pretrained(source, revision=revision if tokenizer is None else None)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-Neo's tokenizer has no pad token: batches are padded with EOS (masked out), as transformers'
        # text-generation pipeline does.
        tokenizer.special_tokens_map["pad_token"] = tokenizer.eos_token
    return LM(model, tokenizer, name)


def _cpu_dtype(path: Any, revision: str | None, dtype: Any, device: Any) -> Any:
    """load()'s rule, decided before loading: a float16 checkpoint runs as float32 on the CPU."""
    if dtype is not None or (device is not None and torch.device(device).type != "cpu"):
        return dtype
    from . import checkpoint as ckpt

    _, stored = ckpt.count_parameters(ckpt.weight_files(ckpt.resolve(path, revision)))
    return torch.float32 if stored == {"F16"} else None


def _with_adapter(model: ForCausalLM, adapter: str | os.PathLike, revision: str | None) -> ForCausalLM:
    from .adapters import PeftModel

    peft = PeftModel.from_pretrained(model, adapter, revision=revision)
    if peft.peft_config["default"].peft_type == "LORA":
        return peft.merge_and_unload()
    return model


def _quantize(model: ForCausalLM, mode: str) -> ForCausalLM:
    try:
        from .quantize import quantize
    except ImportError as e:
        raise ImportError(f"quantize={mode!r} needs the optlm.quantize module, which this installation lacks; "
                          "load without quantization") from e
    result = quantize(model, mode)
    return model if result is None else result
