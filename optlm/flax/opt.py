"""OPT in JAX with Flax NNX: the computation only. Names, shapes and quirks come from
:mod:`optlm.models.opt.arch`; reading checkpoints and checking arguments from :mod:`optlm.port`.

Parameters keep transformers' names and layout (weights ``(out, in)``), so a checkpoint maps onto the module
tree one to one. The cache is static: ``(B, L, nh, hs)`` keys and values per layer for a capacity ``L`` fixed
up front, written in place at the slots of each pass, so ``generate`` compiles once (for its batch, prompt
length and ``max_new_tokens``) into a single ``lax.while_loop`` that does not retrace per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoint as ckpt
from .. import port
from ..models.opt import arch
from ..models.opt.config import OPTConfig

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static cache: per layer ``keys`` / ``values`` ``(B, L, nh, hs)``; ``mask`` ``(B, L)`` 1 for a real token in
    a filled slot; ``length`` (int32 scalar) the slots filled. Make one with :meth:`FlaxOPTModel.init_cache`, or
    let a call without one make it."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def grown(self, capacity: int) -> KVCache:
        """This cache with room for ``capacity`` slots (a copy when it has less)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return self
        pad = ((0, 0), (0, extra), (0, 0), (0, 0))
        return KVCache(tuple(jnp.pad(k, pad) for k in self.keys), tuple(jnp.pad(v, pad) for v in self.values),
                       jnp.pad(self.mask, ((0, 0), (0, extra))), self.length)

    def with_mask(self, past_mask: np.ndarray) -> KVCache:
        """This cache with its first slots' mask replaced by ``past_mask`` ``(B, P)``."""
        return dataclasses.replace(self, mask=self.mask.at[:, :past_mask.shape[1]].set(past_mask))


def _param(weights: dict[str, np.ndarray], name: str, dtype: Any) -> nnx.Param | None:
    return nnx.Param(jnp.asarray(weights[name], dtype=dtype)) if name in weights else None


class _Static:
    """A static attribute compared by identity: NNX puts static attributes in the graph definition, which
    ``jax.jit`` hashes, and a config (a mutable dataclass) has no hash of its own."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.value is self.value


class Embedding(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: Any):
        self.weight = _param(weights, name + ".weight", dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class Linear(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: Any):
        self.weight = _param(weights, name + ".weight", dtype)  # (out, in), transformers' layout
        self.bias = _param(weights, name + ".bias", dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: Any):
        self.weight = _param(weights, name + ".weight", dtype)
        self.bias = _param(weights, name + ".bias", dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in (at least) float32, as torch does
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + arch.LAYER_NORM_EPS)
        if self.weight is not None:
            h = h * self.weight[...] + self.bias[...]
        return h.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: Any):
        self.k_proj = Linear(weights, name + ".k_proj", dtype)
        self.v_proj = Linear(weights, name + ".v_proj", dtype)
        self.q_proj = Linear(weights, name + ".q_proj", dtype)
        self.out_proj = Linear(weights, name + ".out_proj", dtype)
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim

    def __call__(self, x: jax.Array, allowed: jax.Array, keys: jax.Array, values: jax.Array,
                 index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x`` ``(B, T, d)`` at slots ``index …``; ``allowed`` ``(B, T, L)``; the layer's cache ``(B, L, nh, hs)``."""
        B, T, d = x.shape
        q = self.q_proj(x) * self.head_dim**-0.5  # OPT scales q before q·kᵀ (fairseq's order)
        q = q.reshape(B, T, self.heads, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).reshape(B, T, self.heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.heads, self.head_dim)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, index, 0, 0))  # (B, L, nh, hs)
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, index, 0, 0))
        scores = jnp.einsum("bthd,bshd->bhts", q, keys)  # (B, nh, T, L)
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # softmax in (at least) float32
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
        w = jax.nn.softmax(scores, axis=-1)
        w = jnp.where(allowed.any(-1)[:, None, :, None], w, 0.0).astype(values.dtype)  # all-padding rows: zeros
        y = jnp.einsum("bhts,bshd->bthd", w, values).reshape(B, T, d)  # (B, T, d)
        return self.out_proj(y.astype(x.dtype)), keys, values


class DecoderLayer(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: Any):
        self.self_attn = Attention(weights, name + ".self_attn", config, dtype)
        self.self_attn_layer_norm = LayerNorm(weights, name + ".self_attn_layer_norm", dtype)
        self.fc1 = Linear(weights, name + ".fc1", dtype)
        self.fc2 = Linear(weights, name + ".fc2", dtype)
        self.final_layer_norm = LayerNorm(weights, name + ".final_layer_norm", dtype)
        self.pre_ln = config.do_layer_norm_before
        self.act = ACTIVATIONS[config.activation_function]

    def __call__(self, x, allowed, keys, values, index):
        return arch.decoder_layer(x, lambda h: self.self_attn(h, allowed, keys, values, index),
                                  lambda h: self.fc2(self.act(self.fc1(h))), self.self_attn_layer_norm,
                                  self.final_layer_norm, self.pre_ln)


class Decoder(nnx.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: Any):
        self.embed_tokens = Embedding(weights, name + ".embed_tokens", dtype)
        self.embed_positions = Embedding(weights, name + ".embed_positions", dtype)
        projections = arch.has_projections(config)  # opt-350m: 512-wide embeddings, a 1024-wide decoder
        self.project_in = Linear(weights, name + ".project_in", dtype) if projections else None
        self.project_out = Linear(weights, name + ".project_out", dtype) if projections else None
        final = arch.has_final_layer_norm(config)
        self.final_layer_norm = LayerNorm(weights, name + ".final_layer_norm", dtype) if final else None
        self.layers = nnx.List([DecoderLayer(weights, f"{name}.layers.{i}", config, dtype)
                                for i in range(config.num_hidden_layers)])

    def __call__(self, ids: jax.Array, positions: jax.Array, allowed: jax.Array, cache: KVCache,
                 index: jax.Array) -> tuple[jax.Array, tuple, tuple]:
        x = arch.embed_input(ids, positions, self.embed_tokens, self.embed_positions, self.project_in)
        keys, values = [], []
        for layer, k, v in zip(self.layers, cache.keys, cache.values, strict=True):
            x, k, v = layer(x, allowed, k, v, index)
            keys.append(k)
            values.append(v)
        x = arch.decoder_output(x, self.final_layer_norm, self.project_out)  # (B, T, e)
        return x, tuple(keys), tuple(values)


def _weights_dtype(dtype: str) -> Any:
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs JAX's 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                         "before loading, or load in float32")
    return ckpt.numpy_dtype(dtype)


class _OPT(port.Ported, nnx.Module):
    """What the two classes share: the weights, the cache, the checked public call, the compiled step (loading
    and saving: :class:`port.Ported`)."""

    prefix = "Flax"

    def __init__(self, config: OPTConfig, weights: dict[str, np.ndarray] | None = None, dtype: Any = None,
                 seed: int = 0):
        """A model of ``config`` holding ``weights`` (names as :func:`arch.tensor_shapes`), or fresh random
        weights (transformers' initialisation, drawn with ``seed``); ``dtype`` (default float32 for random
        weights, the arrays' own otherwise) is what the parameters are held and computed in."""
        weights, name = port.model_weights(config, self.head, weights, seed, dtype, ACTIVATIONS)
        dtype = _weights_dtype(name)
        self._config = _Static(config)
        self._build(weights, dtype)

    def _build(self, weights: dict[str, np.ndarray], dtype: Any) -> None:
        raise NotImplementedError

    @property
    def config(self) -> OPTConfig:
        return self._config.value

    @property
    def dtype(self) -> Any:
        return self._decoder.embed_tokens.weight[...].dtype

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter under transformers' names (the module tree mirrors them), as host arrays; a tied head
        is stored once, as the embedding."""
        return {".".join(str(p) for p in path): np.asarray(value[...])
                for path, value in nnx.to_flat_state(nnx.state(self, nnx.Param))}

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        c = self.config
        shape = (batch_size, max_length, c.num_attention_heads, c.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_hidden_layers))
        return KVCache(zeros, zeros, jnp.zeros((batch_size, max_length), jnp.int32), jnp.zeros((), jnp.int32))

    def _run(self, ids, positions, new_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The decoder over ``ids`` ``(B, T)`` at the cache's next slots: hidden states ``(B, T, e)`` and the
        cache with them written."""
        index = cache.length
        mask = jax.lax.dynamic_update_slice(cache.mask, new_mask.astype(jnp.int32), (0, index))  # (B, L)
        T, L = ids.shape[1], mask.shape[1]
        q_slot = index + jnp.arange(T)[:, None]  # (T, 1)
        allowed = (jnp.arange(L)[None, :] <= q_slot)[None] & (mask[:, None, :] > 0)  # (B, T, L)
        x, keys, values = self._decoder(ids, positions, allowed, cache, index)
        return x, KVCache(keys, values, mask, index + T)


class _Body(nnx.Module):
    """The causal LM's base model, at ``model.`` as in transformers' names."""

    def __init__(self, weights: dict[str, np.ndarray], config: OPTConfig, dtype: Any):
        self.decoder = Decoder(weights, "model.decoder", config, dtype)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, ids, positions, new_mask, cache):
    model = nnx.merge(graphdef, state)
    with jax.default_matmul_precision("highest"):  # float32 as float32 (GPUs would otherwise use TF32)
        x, cache = model._run(ids, positions, new_mask, cache)
        return (model._logits(x) if model.head else x), cache


class FlaxOPTModel(_OPT):
    """The bare OPT decoder in JAX: ``last_hidden_state`` ``(B, T, word_embed_proj_dim)``."""

    def _build(self, weights: dict[str, np.ndarray], dtype: Any) -> None:
        self.decoder = Decoder(weights, "decoder", self.config, dtype)

    @property
    def _decoder(self) -> Decoder:
        return self.decoder

    def __call__(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: KVCache | None = None) -> port.BaseModelOutput:
        ids, positions, cache, new_mask = self._checked(input_ids, attention_mask, position_ids, past_key_values)
        hidden, cache = _step(*nnx.split(self), ids, positions, new_mask, cache)
        return port.BaseModelOutput(hidden, cache)


class FlaxOPTForCausalLM(_OPT):
    """OPT with its language-model head in JAX: ``logits`` ``(B, T, vocab_size)``, and compiled ``generate``."""

    head = True

    def _build(self, weights: dict[str, np.ndarray], dtype: Any) -> None:
        self.model = _Body(weights, self.config, dtype)
        self.lm_head = Linear(weights, "lm_head", dtype) if "lm_head.weight" in weights else None

    @property
    def _decoder(self) -> Decoder:
        return self.model.decoder

    def _logits(self, x: jax.Array) -> jax.Array:
        head = self.model.decoder.embed_tokens if self.lm_head is None else self.lm_head  # tied unless given
        return jnp.einsum("bte,ve->btv", x, head.weight[...])  # (B, T, V)

    def __call__(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: KVCache | None = None) -> port.CausalLMOutput:
        ids, positions, cache, new_mask = self._checked(input_ids, attention_mask, position_ids, past_key_values)
        logits, cache = _step(*nnx.split(self), ids, positions, new_mask, cache)
        return port.CausalLMOutput(logits, cache)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, seed: int | None = None,
                 prng_key: jax.Array | None = None, **params: Any) -> np.ndarray:
        """Prompt + new tokens ``(B, P + n)``, as the PyTorch ``generate`` returns them: greedy, or sampling
        with ``do_sample=True`` (``temperature``, ``top_k`` (default 50, as transformers), ``top_p``), drawn
        from ``prng_key`` or ``jax.random.key(seed)`` (a fresh seed when both are None). Rows that finish early
        hold the pad id; the output stops when every row has finished. The whole loop is one compiled
        function (cached per batch, prompt length, ``max_new_tokens`` and filter settings)."""
        cfg, ids, mask = port.prepare(self.config, input_ids, attention_mask, "FlaxOPTForCausalLM", params)
        if prng_key is not None and seed is not None:
            raise ValueError("pass seed= or prng_key=, not both")
        if prng_key is None:
            prng_key = jax.random.key(port.fresh_seed() if seed is None else seed)
        d = port.Decoding.of(cfg, self.config)
        new, steps = _generate(*nnx.split(self), jnp.asarray(ids), jnp.asarray(mask), prng_key,
                               jnp.float32(d.temperature), jnp.float32(d.top_p), jnp.asarray(d.eos), jnp.int32(d.pad),
                               new=d.new, sample=d.sample, top_k=d.top_k, nucleus=d.nucleus)
        return port.finish(ids, np.asarray(new), int(steps), input_ids)


def next_tokens(logits: jax.Array, key: jax.Array, temperature, top_p, sample: bool, top_k: int,
            nucleus: bool) -> jax.Array:
    """The next token of each row from its last logits ``(B, V)``, filtered as transformers' warpers do, in
    their order: temperature, then top-k, then top-p (``nucleus``)."""
    scores = logits.astype(jnp.float32)
    if not sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    scores = scores / temperature
    if top_k > 0:
        kth = jax.lax.top_k(scores, top_k)[0][:, -1:]  # (B, 1)
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if nucleus:
        order = jnp.argsort(scores, axis=-1)  # ascending
        ranked = jnp.take_along_axis(scores, order, axis=-1)
        above = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)  # probability at or below each rank
        drop = (above <= 1 - top_p).at[:, -1].set(False)  # the most likely token always stays
        rows = jnp.arange(scores.shape[0])[:, None]
        scores = jnp.where(jnp.zeros_like(drop).at[rows, order].set(drop), -jnp.inf, scores)
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("new", "sample", "top_k", "nucleus"))
def _generate(graphdef, state, ids, mask, key, temperature, top_p, eos, pad, *, new: int, sample: bool, top_k: int,
              nucleus: bool):
    """Prefill the prompt into a cache of ``P + new`` slots, then decode in one ``while_loop`` until ``new``
    tokens or every row has met an end-of-sequence id."""
    with jax.default_matmul_precision("highest"):  # float32 as float32 (GPUs would otherwise use TF32)
        return _decode(nnx.merge(graphdef, state), ids, mask, key, temperature, top_p, eos, pad, new, sample, top_k,
                       nucleus)


def _decode(model, ids, mask, key, temperature, top_p, eos, pad, new: int, sample: bool, top_k: int, nucleus: bool):
    B, P = ids.shape
    cache = model.init_cache(B, P + new)
    positions = jnp.cumsum(mask, axis=1) * mask - 1  # (B, P)
    x, cache = model._run(ids, positions, mask, cache)
    choose = functools.partial(next_tokens, temperature=temperature, top_p=top_p, sample=sample, top_k=top_k,
                               nucleus=nucleus)
    key, sub = jax.random.split(key)
    token = choose(model._logits(x[:, -1:])[:, 0], sub)  # (B,)
    out = jnp.full((B, new), pad, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)
    real = mask.sum(axis=1).astype(jnp.int32)  # (B,) the next position of each row

    def more(carry):
        step, _, _, _, done, _ = carry
        return (step < new) & ~done.all()

    def one(carry):
        step, token, cache, out, done, key = carry
        x, cache = model._run(token[:, None], (real + step - 1)[:, None], jnp.ones((B, 1), jnp.int32), cache)
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad, choose(model._logits(x)[:, 0], sub))
        out = out.at[:, step].set(token)
        return step + 1, token, cache, out, done | jnp.isin(token, eos), key

    steps, _, _, out, _, _ = jax.lax.while_loop(more, one, (jnp.int32(1), token, cache, out, done, key))
    return out, steps
