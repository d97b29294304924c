"""What the JAX and TensorFlow ports of OPT (``optlm.flax``, ``optlm.tf``) share besides the architecture
(:mod:`optlm.models.opt.arch`): reading a checkpoint into numpy arrays under the model's names, random
initialisation, the checks on ``generate``'s arguments, and the output records. No framework is imported here,
torch included, so each port runs with its own framework alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .generation_config import GenerationConfig, check_prompt, make_config
from .models.config import check_positions
from .models.opt import arch
from .models.opt.config import OPTConfig

FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")


@dataclass
class BaseModelOutput:
    """The decoder's output: ``last_hidden_state`` ``(B, T, word_embed_proj_dim)`` and the cache."""

    last_hidden_state: Any
    past_key_values: Any = None


@dataclass
class CausalLMOutput:
    """The causal LM's output: ``logits`` ``(B, T, vocab_size)`` and the cache."""

    logits: Any
    past_key_values: Any = None


class Ported:
    """``from_pretrained`` and ``save_pretrained`` for a port's model classes, which name themselves after the
    PyTorch class with a prefix (``FlaxOPTForCausalLM``, ``TFOPTModel``), set ``head``, and provide
    ``config``, ``dtype`` and ``state_arrays()``."""

    head = False  # the causal LM has a head, and its decoder under "model." (transformers' names)
    prefix = ""

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: Any = None, revision: str | None = None):
        """Load an OPT checkpoint: a local directory or a hub id; safetensors read straight into the framework's
        arrays without torch (a ``.bin`` through torch's weights-only loader); either key layout (transformers'
        ``model.decoder.*``, the hub uploads' ``decoder.*``), sharded or not. ``dtype``: a name (``"float32"``,
        ``"bfloat16"`` …) or the framework's dtype, None for the checkpoint's own."""
        directory, config = resolve_config(path_or_hub_id, cls.__name__, revision)
        weights, dtype = read_weights(directory, config, cls.head, dtype)
        model = cls(config, weights, dtype)
        model.name_or_path = str(path_or_hub_id)
        return model

    def _checked(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any):
        """A forward call's arguments as the port's compiled step takes them (checked by :func:`call_inputs`):
        ids ``(B, T)``, positions ``(B, T)``, the cache (made or grown to fit; the port's ``init_cache`` and its
        cache's ``grown`` / ``with_mask``) and the new tokens' mask ``(B, T)``."""
        past = 0 if cache is None else int(cache.length)
        ids, positions, mask = call_inputs(self.config, input_ids, attention_mask, position_ids, past,
                                           None if cache is None else np.asarray(cache.mask))
        B, T = ids.shape
        cache = (self.init_cache(B, capacity(T)) if cache is None else cache).grown(capacity(past + T))
        if attention_mask is not None:
            cache = cache.with_mask(mask[:, :past])  # the cached tokens' padding, as the caller gives it now
        return ids, positions, cache, mask[:, past:]

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """config.json and safetensors weights in transformers' layout, which optlm's PyTorch classes, transformers
        and the other port read."""
        save(save_directory, self.state_arrays(), self.config, ckpt.dtype_name(self.dtype),
             type(self).__name__.removeprefix(self.prefix), max_shard_size)


def resolve_config(path_or_id: str | os.PathLike, loader: str, revision: str | None = None):
    """The checkpoint directory of a local path or hub id, and its OPT config (another family is refused,
    naming it, as the PyTorch classes do)."""
    directory = ckpt.resolve(path_or_id, revision)
    config = ckpt.read_family_config(directory, OPTConfig, loader)
    if "quantization_config" in config.extra:
        raise ckpt.CheckpointError(f"{directory} is an optlm quantized checkpoint; {loader} runs floating-point "
                                   "weights — load the unquantized checkpoint (quantized ones run in optlm's PyTorch "
                                   "classes)")
    return directory, config


def read_weights(directory, config: OPTConfig, head: bool, dtype: Any) -> tuple[dict[str, np.ndarray], str]:
    """The checkpoint's tensors under the model's names (memory-mapped numpy arrays, checked against
    :func:`arch.tensor_shapes` with the PyTorch loader's messages) and the floating dtype to hold them in:
    ``dtype`` (any framework's or a name), or the checkpoint's own for None / "auto"."""
    target = ckpt.dtype_name(dtype)
    arrays = ckpt.read_checked_arrays(directory, arch.tensor_shapes(config, head), arch.optional_tensors(config, head),
                                      arch.BASE_PREFIX, arch.IGNORED_KEYS)
    if target is None:
        target = next((a.dtype.name for a in arrays.values() if a.dtype.name in FLOAT_KINDS), "float32")
    return arrays, target


def model_weights(config: OPTConfig, head: bool, weights: dict[str, Any] | None, seed: int, dtype: Any,
                  activations: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """What a port's constructor builds from: ``weights`` (checked against :func:`arch.tensor_shapes` with
    the PyTorch loader's messages) or fresh random ones drawn with ``seed``, and the dtype name to hold them in
    (``dtype``, else the weights' own floating dtype, else float32). ``activations``: the port's table, which
    must know the config's activation function."""
    if config.activation_function not in activations:
        raise ValueError(f"activation_function {config.activation_function!r} is not supported; known: "
                         f"{', '.join(activations)}")
    if weights is None:
        weights = random_weights(config, head, seed)
    else:
        shapes = {k: tuple(np.shape(v)) for k, v in weights.items()}
        ckpt.check_shapes(arch.tensor_shapes(config, head), shapes, arch.optional_tensors(config, head),
                          "given as weights")
    name = ckpt.dtype_name(dtype) or next(
        (np.dtype(v.dtype).name for v in weights.values() if np.dtype(v.dtype).name in FLOAT_KINDS), "float32")
    return weights, name


def save(directory: str | os.PathLike, arrays: dict[str, np.ndarray], config: OPTConfig, dtype: str,
         architecture: str, max_shard_size: int | str) -> None:
    """A port's ``save_pretrained``: safetensors in transformers' layout and its config.json (with the dtype and
    the PyTorch class that ``architecture`` names, so transformers and optlm's classes load it)."""
    directory = Path(directory)
    ckpt.save_state_dict(arrays, directory, max_shard_size)
    config = dataclasses.replace(config)
    config.extra = {**config.extra, "dtype": dtype, "architectures": [architecture]}
    config.extra.pop("torch_dtype", None)
    config.save(directory)


def random_weights(config: OPTConfig, head: bool, seed: int) -> dict[str, np.ndarray]:
    """Fresh weights as transformers initialises OPT: N(0, init_std) for embeddings and linear weights (the
    padding row of the token embedding zero), zero biases, unit norm weights; float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in arch.tensor_shapes(config, head).items():
        if name.endswith("bias"):
            out[name] = np.zeros(shape, np.float32)
        elif "layer_norm" in name:
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = rng.normal(0.0, config.init_std, shape).astype(np.float32)
            if name.endswith("embed_tokens.weight") and config.pad_token_id is not None:
                out[name][config.pad_token_id] = 0.0
    if head and config.tie_word_embeddings:
        del out["lm_head.weight"]
    return out


# Decoding the ports compile: greedy and sampling with temperature, top-k and top-p. Any other generate keyword
# (beams, penalties, stop strings …) is the PyTorch model's.
PORTED = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


def prepare(config: OPTConfig, input_ids: Any, attention_mask: Any, framework: str,
            params: dict[str, Any]) -> tuple[GenerationConfig, np.ndarray, np.ndarray]:
    """``generate``'s arguments checked as the PyTorch ``generate`` checks them (same errors), and any keyword
    the port does not compile refused by name: the config, the ids ``(B, P)`` and the mask (ones where there is
    no padding), as int32 host arrays."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[-1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be a non-empty 1-D or 2-D array of integer token ids, got {ids.dtype} of "
                        f"shape {ids.shape}")
    max_length = params.pop("max_length", None)  # transformers' total length, prompt included
    cfg = make_config(SimpleNamespace(config=config), max_length, ids.shape[1], **params)
    default = GenerationConfig()
    other = sorted(k for k in params if k not in PORTED and getattr(cfg, k) != getattr(default, k))
    if other:
        raise ValueError(f"{framework} generate() decodes greedily or by sampling (max_new_tokens, do_sample, "
                         f"temperature, top_k, top_p, eos_token_id, pad_token_id); {', '.join(other)} need optlm's "
                         "PyTorch model (optlm.OPTForCausalLM)")
    mask = check_prompt(ids, None if attention_mask is None else np.asarray(attention_mask), cfg, config.vocab_size,
                        config.max_position_embeddings)
    mask = np.ones(ids.shape, np.int32) if mask is None else mask.astype(np.int32)
    return cfg, ids.astype(np.int32), mask


@dataclass(frozen=True)
class Decoding:
    """What a port's compiled ``generate`` loop needs from a checked :class:`GenerationConfig`: the settings its
    program is compiled for (``new``, ``sample``, ``top_k``, ``nucleus``; each set compiles once) and the values
    it takes as inputs."""

    new: int
    sample: bool
    top_k: int  # 0: no top-k filter
    nucleus: bool  # top_p < 1: the top-p filter runs
    temperature: float
    top_p: float
    eos: np.ndarray  # (E,) int32; [-1] when there is none
    pad: int

    @classmethod
    def of(cls, cfg: GenerationConfig, config: OPTConfig) -> Decoding:
        return cls(cfg.max_new_tokens, cfg.sampling, min(cfg.top_k or 0, config.vocab_size), cfg.top_p < 1.0,
                   cfg.temperature, cfg.top_p, np.asarray(cfg.eos_ids or [-1], np.int32),
                   0 if cfg.pad_token_id is None else cfg.pad_token_id)


def fresh_seed() -> int:
    """A seed for a sampling call given none (as PyTorch's global generator would differ from call to call)."""
    return int(np.random.SeedSequence().entropy % 2**31)


def capacity(needed: int) -> int:
    """The slots a cache grows to when a call needs ``needed``: a multiple of 64, so step-by-step decoding with
    a growing cache changes shape (and compiles again) once every 64 tokens, not every token."""
    return -(-needed // 64) * 64


def call_inputs(config: OPTConfig, input_ids: Any, attention_mask: Any, position_ids: Any, past: int,
                past_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A forward call's arguments checked as the PyTorch classes check them (same messages), after ``past``
    cached tokens whose mask is ``past_mask`` ``(rows, >= past)`` (None without a cache): the ids ``(B, T)``,
    their positions ``(B, T)`` and the mask of cached and new tokens ``(B, past + T)``, as int32 host arrays.
    Without ``attention_mask`` the cached tokens keep the mask they were given and the new ones are real."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got {ids.dtype} of "
                         f"shape {ids.shape}")
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise ValueError(f"input_ids must be token ids in [0, {config.vocab_size}) (vocab_size), got "
                         f"{int(ids.min())}..{int(ids.max())}; is the tokenizer the model's own?")
    B, T = ids.shape
    if past_mask is not None and past_mask.shape[0] != B:
        raise ValueError(f"past_key_values holds {past_mask.shape[0]} rows; input_ids has {B}")
    if attention_mask is None:
        cached = np.zeros((B, 0), np.int32) if past_mask is None else past_mask[:, :past]
        mask = np.concatenate([cached, np.ones((B, T), np.int32)], axis=1)
    else:
        mask = np.asarray(attention_mask).astype(np.int32)
        if mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {mask.shape}; expected ({B}, {past + T}) = "
                             f"(batch, cached tokens {past} + new tokens {T})")
    if position_ids is None:
        positions = (np.cumsum(mask, axis=1) * mask - 1)[:, past:]
    else:
        positions = np.asarray(position_ids)
        if positions.shape not in ((B, T), (1, T)):
            raise ValueError(f"position_ids has shape {positions.shape}; expected ({B}, {T})")
        positions = np.broadcast_to(positions, (B, T))
    check_positions(int(positions.max()), int(positions.min()), config.max_position_embeddings)
    return ids.astype(np.int32), positions.astype(np.int32), mask


def finish(ids: np.ndarray, new: np.ndarray, steps: int, input_ids: Any) -> np.ndarray:
    """Prompt + the ``steps`` tokens generated (rows that finished early hold the pad id), as transformers
    returns them: the generation stops when every row has finished. Integers of the caller's ``input_ids``."""
    out = np.concatenate([ids, np.asarray(new)[:, :steps].astype(ids.dtype)], axis=1)
    given = np.asarray(input_ids).dtype
    return out.astype(given) if np.issubdtype(given, np.integer) else out


