"""OPT in TensorFlow: the computation only. Names, shapes and quirks come from :mod:`optlm.models.opt.arch`;
reading checkpoints and checking arguments from :mod:`optlm.port`.

The models are ``tf.Module``s rather than Keras models: Keras 3 picks its backend once per process (from
``KERAS_BACKEND``), so a Keras model could end up running on JAX or torch in a user's process, while a
``tf.Module`` is always TensorFlow; it saves straight to a SavedModel whose signatures load with plain
``tf.saved_model.load`` (no Keras, no optlm); and its ``tf.Variable``s train under ``tf.GradientTape``.

On NVIDIA GPUs TensorFlow runs float32 matmuls in TF32 unless
``tf.config.experimental.enable_tensor_float_32_execution(False)`` is called (a process-wide switch, left to
the user); the float32 numbers match the reference to 1e-5 only with it off, as on CPUs.

Parameters keep transformers' names and layout (weights ``(out, in)``). The cache is static: keys and values
``(L, B, nh, hs)`` per layer for a capacity ``L`` fixed up front (slot-major, so a pass writes its slots with
one ``tensor_scatter_nd_update``), and ``generate`` is one ``tf.function(jit_compile=True)`` over a
``tf.while_loop``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow as tf

from .. import port
from ..models.opt import arch
from ..models.opt.config import OPTConfig

ACTIVATIONS = {
    "relu": tf.nn.relu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "tanh": tf.math.tanh,
}


@dataclasses.dataclass
class KVCache:
    """Static cache: per layer ``keys`` / ``values`` ``(L, B, nh, hs)``; ``mask`` ``(B, L)`` 1 for a real token
    in a filled slot; ``length`` (int32 scalar) the slots filled. Make one with
    :meth:`TFOPTModel.init_cache`, or let a call without one make it."""

    keys: tuple[tf.Tensor, ...]
    values: tuple[tf.Tensor, ...]
    mask: tf.Tensor
    length: tf.Tensor

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    def grown(self, capacity: int) -> KVCache:
        """This cache with room for ``capacity`` slots (a copy when it has less)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return self
        pad = [[0, extra], [0, 0], [0, 0], [0, 0]]
        return KVCache(tuple(tf.pad(k, pad) for k in self.keys), tuple(tf.pad(v, pad) for v in self.values),
                       tf.pad(self.mask, [[0, 0], [0, extra]]), self.length)

    def with_mask(self, past_mask: np.ndarray) -> KVCache:
        """This cache with its first slots' mask replaced by ``past_mask`` ``(B, P)``."""
        return dataclasses.replace(self, mask=tf.concat([tf.constant(past_mask, tf.int32),
                                                         self.mask[:, past_mask.shape[1]:]], axis=1))


def _variable(weights: dict[str, np.ndarray], name: str, dtype: tf.DType) -> tf.Variable | None:
    if name not in weights:
        return None
    return tf.Variable(tf.cast(np.asarray(weights[name]), dtype), name=name)


class Linear(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: tf.DType):
        super().__init__()
        self.weight = _variable(weights, name + ".weight", dtype)  # (out, in), transformers' layout
        self.bias = _variable(weights, name + ".bias", dtype)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        # As one 2-D matmul: a 3-D x would make a broadcasting batch matmul, which XLA runs ~8x slower on CPU.
        y = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), self.weight, transpose_b=True)
        y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.weight.shape[0]]], axis=0))
        return y if self.bias is None else y + self.bias


class LayerNorm(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: tf.DType):
        super().__init__()
        self.weight = _variable(weights, name + ".weight", dtype)
        self.bias = _variable(weights, name + ".bias", dtype)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        h = x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)  # statistics in float32 or wider
        mean, var = tf.nn.moments(h, axes=[-1], keepdims=True)
        h = (h - mean) * tf.math.rsqrt(var + arch.LAYER_NORM_EPS)
        if self.weight is not None:
            h = h * tf.cast(self.weight, h.dtype) + tf.cast(self.bias, h.dtype)
        return tf.cast(h, x.dtype)


class Embedding(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, dtype: tf.DType):
        super().__init__()
        self.weight = _variable(weights, name + ".weight", dtype)

    def __call__(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.weight, ids)


class Attention(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: tf.DType):
        super().__init__()
        self.k_proj = Linear(weights, name + ".k_proj", dtype)
        self.v_proj = Linear(weights, name + ".v_proj", dtype)
        self.q_proj = Linear(weights, name + ".q_proj", dtype)
        self.out_proj = Linear(weights, name + ".out_proj", dtype)
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim

    def __call__(self, x, allowed, keys, values, slots):
        """``x`` ``(B, T, d)`` at ``slots`` ``(T, 1)``; ``allowed`` ``(B, T, L)``; the cache ``(L, B, nh, hs)``."""
        B, T, d = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
        q = self.q_proj(x) * self.head_dim**-0.5  # OPT scales q before q·kᵀ (fairseq's order)
        q = tf.reshape(q, [B, T, self.heads, self.head_dim])  # (B, T, nh, hs)
        k = tf.reshape(self.k_proj(x), [B, T, self.heads, self.head_dim])
        v = tf.reshape(self.v_proj(x), [B, T, self.heads, self.head_dim])
        keys = tf.tensor_scatter_nd_update(keys, slots, tf.cast(tf.transpose(k, [1, 0, 2, 3]), keys.dtype))
        values = tf.tensor_scatter_nd_update(values, slots, tf.cast(tf.transpose(v, [1, 0, 2, 3]), values.dtype))
        scores = tf.einsum("bthd,sbhd->bhts", q, keys)  # (B, nh, T, L)
        if scores.dtype not in (tf.float32, tf.float64):
            scores = tf.cast(scores, tf.float32)  # softmax in (at least) float32
        scores = tf.where(allowed[:, None], scores, scores.dtype.min)
        w = tf.nn.softmax(scores, axis=-1)
        w = tf.where(tf.reduce_any(allowed, -1)[:, None, :, None], w, 0.0)  # all-padding query rows: zeros
        y = tf.einsum("bhts,sbhd->bthd", tf.cast(w, values.dtype), values)  # (B, T, nh, hs)
        return self.out_proj(tf.cast(tf.reshape(y, [B, T, d]), x.dtype)), keys, values


class DecoderLayer(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: tf.DType):
        super().__init__()
        self.self_attn = Attention(weights, name + ".self_attn", config, dtype)
        self.self_attn_layer_norm = LayerNorm(weights, name + ".self_attn_layer_norm", dtype)
        self.fc1 = Linear(weights, name + ".fc1", dtype)
        self.fc2 = Linear(weights, name + ".fc2", dtype)
        self.final_layer_norm = LayerNorm(weights, name + ".final_layer_norm", dtype)
        self.pre_ln = config.do_layer_norm_before
        self.act = ACTIVATIONS[config.activation_function]

    def __call__(self, x, allowed, keys, values, slots):
        return arch.decoder_layer(x, lambda h: self.self_attn(h, allowed, keys, values, slots),
                                  lambda h: self.fc2(self.act(self.fc1(h))), self.self_attn_layer_norm,
                                  self.final_layer_norm, self.pre_ln)


class Decoder(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], name: str, config: OPTConfig, dtype: tf.DType):
        super().__init__()
        self.embed_tokens = Embedding(weights, name + ".embed_tokens", dtype)
        self.embed_positions = Embedding(weights, name + ".embed_positions", dtype)
        projections = arch.has_projections(config)  # opt-350m: 512-wide embeddings, a 1024-wide decoder
        self.project_in = Linear(weights, name + ".project_in", dtype) if projections else None
        self.project_out = Linear(weights, name + ".project_out", dtype) if projections else None
        final = arch.has_final_layer_norm(config)
        self.final_layer_norm = LayerNorm(weights, name + ".final_layer_norm", dtype) if final else None
        self.layers = [DecoderLayer(weights, f"{name}.layers.{i}", config, dtype)
                       for i in range(config.num_hidden_layers)]

    def __call__(self, ids, positions, allowed, keys, values, slots):
        x = arch.embed_input(ids, positions, self.embed_tokens, self.embed_positions, self.project_in)
        new_keys, new_values = [], []
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            x, k, v = layer(x, allowed, k, v, slots)
            new_keys.append(k)
            new_values.append(v)
        x = arch.decoder_output(x, self.final_layer_norm, self.project_out)  # (B, T, e)
        return x, tuple(new_keys), tuple(new_values)


class _OPT(port.Ported, tf.Module):
    """What the two classes share: the weights, the cache, the checked public call, the compiled step (loading
    and saving: :class:`port.Ported`)."""

    prefix = "TF"

    def __init__(self, config: OPTConfig, weights: dict[str, np.ndarray] | None = None, dtype: Any = None,
                 seed: int = 0):
        """A model of ``config`` holding ``weights`` (names as :func:`arch.tensor_shapes`), or fresh random
        weights (transformers' initialisation, drawn with ``seed``); ``dtype`` (default: the arrays' own,
        float32 for random weights) is what the parameters are held and computed in."""
        super().__init__(name=type(self).__name__)
        weights, name = port.model_weights(config, self.head, weights, seed, dtype, ACTIVATIONS)
        self.config = config
        self._build(weights, tf.as_dtype(name))
        # Compiled functions by their static settings; set past tf.Module's tracking so that a SavedModel of
        # this model holds only the signatures export() writes.
        object.__setattr__(self, "_compiled", {})

    def _build(self, weights: dict[str, np.ndarray], dtype: tf.DType) -> None:
        raise NotImplementedError

    @property
    def dtype(self) -> tf.DType:
        return self._decoder.embed_tokens.weight.dtype

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter under transformers' names, as host arrays (a tied head stored once, as the
        embedding)."""
        # A variable's name is its transformers name, after any tf.name_scope the model was built in.
        return {v.name.rsplit("/", 1)[-1].removesuffix(":0"): v.numpy() for v in self.variables}

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        c = self.config
        shape = (max_length, batch_size, c.num_attention_heads, c.head_dim)
        zeros = tuple(tf.zeros(shape, self.dtype) for _ in range(c.num_hidden_layers))
        return KVCache(zeros, zeros, tf.zeros((batch_size, max_length), tf.int32), tf.constant(0, tf.int32))

    def _run(self, ids, positions, new_mask, keys, values, mask, index):
        """The decoder over ``ids`` ``(B, T)`` at slots ``index …``: hidden states ``(B, T, e)``, the caches
        with them written, and the slot mask ``(B, L)``."""
        T, L = tf.shape(ids)[1], tf.shape(mask)[1]
        slots = index + tf.range(T)  # (T,)
        mask = tf.transpose(tf.tensor_scatter_nd_update(tf.transpose(mask), slots[:, None],
                                                        tf.transpose(tf.cast(new_mask, tf.int32))))  # (B, L)
        allowed = (tf.range(L)[None, :] <= slots[:, None])[None] & (mask[:, None, :] > 0)  # (B, T, L)
        x, keys, values = self._decoder(ids, positions, allowed, keys, values, slots[:, None])
        return x, keys, values, mask

    def _step(self, ids, positions, new_mask, keys, values, mask, index):
        x, keys, values, mask = self._run(ids, positions, new_mask, keys, values, mask, index)
        return (self._logits(x) if self.head else x), keys, values, mask

    def _compiled_step(self):
        if "step" not in self._compiled:
            self._compiled["step"] = tf.function(self._step, jit_compile=True, reduce_retracing=True)
        return self._compiled["step"]

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values):
        ids, positions, cache, new_mask = self._checked(input_ids, attention_mask, position_ids, past_key_values)
        out, keys, values, mask = self._compiled_step()(tf.constant(ids), tf.constant(positions),
                                                         tf.constant(new_mask), cache.keys, cache.values, cache.mask,
                                                         cache.length)
        return out, KVCache(keys, values, mask, cache.length + ids.shape[1])


class _Body(tf.Module):
    """The causal LM's base model, at ``model.`` as in transformers' names."""

    def __init__(self, weights: dict[str, np.ndarray], config: OPTConfig, dtype: tf.DType):
        super().__init__(name="model")
        self.decoder = Decoder(weights, "model.decoder", config, dtype)


class TFOPTModel(_OPT):
    """The bare OPT decoder in TensorFlow: ``last_hidden_state`` ``(B, T, word_embed_proj_dim)``."""

    def _build(self, weights: dict[str, np.ndarray], dtype: tf.DType) -> None:
        self.decoder = Decoder(weights, "decoder", self.config, dtype)

    @property
    def _decoder(self) -> Decoder:
        return self.decoder

    def __call__(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: KVCache | None = None) -> port.BaseModelOutput:
        return port.BaseModelOutput(*self._forward(input_ids, attention_mask, position_ids, past_key_values))


class TFOPTForCausalLM(_OPT):
    """OPT with its language-model head in TensorFlow: ``logits`` ``(B, T, vocab_size)``, compiled
    ``generate``, and :meth:`export` to a SavedModel."""

    head = True

    def _build(self, weights: dict[str, np.ndarray], dtype: tf.DType) -> None:
        self.model = _Body(weights, self.config, dtype)
        self.lm_head = Linear(weights, "lm_head", dtype) if "lm_head.weight" in weights else None

    @property
    def _decoder(self) -> Decoder:
        return self.model.decoder

    def _logits(self, x: tf.Tensor) -> tf.Tensor:
        head = self.model.decoder.embed_tokens if self.lm_head is None else self.lm_head  # tied unless given
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        logits = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), head.weight, transpose_b=True)  # 2-D, as in Linear
        return tf.reshape(logits, [B, T, head.weight.shape[0]])  # (B, T, V)

    def __call__(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                 past_key_values: KVCache | None = None) -> port.CausalLMOutput:
        return port.CausalLMOutput(*self._forward(input_ids, attention_mask, position_ids, past_key_values))

    def generate(self, input_ids: Any, attention_mask: Any = None, *, seed: int | None = None,
                 **params: Any) -> np.ndarray:
        """Prompt + new tokens ``(B, P + n)``, as the PyTorch ``generate`` returns them: greedy, or sampling
        with ``do_sample=True`` (``temperature``, ``top_k`` (default 50, as transformers), ``top_p``), drawn by
        TensorFlow's stateless sampler from ``seed`` (a fresh one when None). Rows that finish early hold the
        pad id; the output stops when every row has finished. The loop is one XLA-compiled function (cached per
        batch, prompt length, ``max_new_tokens`` and filter settings)."""
        cfg, ids, mask = port.prepare(self.config, input_ids, attention_mask, "TFOPTForCausalLM", params)
        d = port.Decoding.of(cfg, self.config)
        new, steps = self._compiled_generate(d)(
            tf.constant(ids), tf.constant(mask), tf.constant(port.fresh_seed() if seed is None else seed, tf.int64),
            tf.constant(d.temperature, tf.float32), tf.constant(d.top_p, tf.float32), tf.constant(d.eos),
            tf.constant(d.pad, tf.int32))
        return port.finish(ids, new.numpy(), int(steps), input_ids)

    def _compiled_generate(self, d: port.Decoding):
        key = ("generate", d.new, d.sample, d.top_k, d.nucleus)
        if key not in self._compiled:
            def run(ids, mask, seed, temperature, top_p, eos, pad):
                return self._generate(ids, mask, seed, temperature, top_p, eos, pad, d.new, d.sample, d.top_k,
                                      d.nucleus)

            self._compiled[key] = tf.function(run, jit_compile=True, reduce_retracing=True)
        return self._compiled[key]

    def _generate(self, ids, mask, seed, temperature, top_p, eos, pad, new: int, sample: bool, top_k: int,
                  nucleus: bool):
        """Prefill the prompt into a cache of ``P + new`` slots, then decode in one ``while_loop`` until ``new``
        tokens or every row has met an end-of-sequence id."""
        c = self.config
        B, P = tf.shape(ids)[0], tf.shape(ids)[1]
        shape = [P + new, B, c.num_attention_heads, c.head_dim]
        keys = tuple(tf.zeros(shape, self.dtype) for _ in range(c.num_hidden_layers))
        slot_mask = tf.zeros([B, P + new], tf.int32)
        positions = tf.cumsum(mask, axis=1) * mask - 1  # (B, P)
        x, keys, values, slot_mask = self._run(ids, positions, mask, keys, keys, slot_mask, 0)

        def choose(logits, step):
            return next_tokens(logits, tf.stack([seed, tf.cast(step, tf.int64)]), temperature, top_p, sample, top_k,
                           nucleus)

        token = choose(self._logits(x[:, -1:])[:, 0], 0)  # (B,)
        out = tf.tensor_scatter_nd_update(tf.fill([new, B], pad), [[0]], token[None])  # (new, B), step-major
        done = tf.reduce_any(token[:, None] == eos[None, :], axis=1)
        real = tf.reduce_sum(mask, axis=1)  # (B,) the next position of each row

        def more(step, token, keys, values, slot_mask, out, done):
            return (step < new) & ~tf.reduce_all(done)

        def one(step, token, keys, values, slot_mask, out, done):
            x, keys, values, slot_mask = self._run(token[:, None], (real + step - 1)[:, None], ones, keys, values,
                                                   slot_mask, P + step - 1)
            token = tf.where(done, pad, choose(self._logits(x)[:, 0], step))
            out = tf.tensor_scatter_nd_update(out, [[step]], token[None])
            done = done | tf.reduce_any(token[:, None] == eos[None, :], axis=1)
            return step + 1, token, keys, values, slot_mask, out, done

        ones = tf.ones([B, 1], tf.int32)
        loop = (tf.constant(1), token, keys, values, slot_mask, out, done)
        steps, _, _, _, _, out, _ = tf.while_loop(more, one, loop)
        return tf.transpose(out), steps

    def export(self, export_dir: str | os.PathLike, max_new_tokens: int = 32, **generate_params: Any) -> None:
        """Write a SavedModel that runs without optlm (``tf.saved_model.load``), with two signatures:
        ``serving_default`` (``input_ids``, ``attention_mask`` int32 ``(B, T)`` → ``logits``) and ``generate``
        (``input_ids``, ``attention_mask``, ``seed`` int64 → ``sequences`` ``(B, T + n)``, n <= max_new_tokens),
        whose decoding settings (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
        ``pad_token_id``) are fixed here as ``generate``'s keywords."""
        cfg, _, _ = port.prepare(self.config, [[0]], None, "TFOPTForCausalLM.export",
                                 {"max_new_tokens": max_new_tokens, **generate_params})
        d = port.Decoding.of(cfg, self.config)
        decode = self._compiled_generate(d)
        ids_spec = tf.TensorSpec([None, None], tf.int32, name="input_ids")
        mask_spec = tf.TensorSpec([None, None], tf.int32, name="attention_mask")
        c = self.config
        step = self._compiled_step()
        module = tf.Module()
        module.model = self  # tracks the variables

        def check(input_ids, attention_mask, new):
            """What XLA would not catch (its gathers clamp out-of-range ids): the checks of optlm's own calls."""
            return [tf.debugging.assert_equal(tf.shape(input_ids), tf.shape(attention_mask),
                                              "attention_mask must have input_ids' shape"),
                    tf.debugging.assert_non_negative(input_ids, "input_ids must be token ids >= 0"),
                    tf.debugging.assert_less(input_ids, c.vocab_size,
                                             f"input_ids must be below vocab_size {c.vocab_size}"),
                    tf.debugging.assert_less_equal(tf.shape(input_ids)[1] + new, c.max_position_embeddings,
                                                   f"the prompt (+ {new} new tokens) is longer than the context of "
                                                   f"{c.max_position_embeddings} tokens")]

        @tf.function(input_signature=[ids_spec, mask_spec])
        def serving(input_ids, attention_mask):
            with tf.control_dependencies(check(input_ids, attention_mask, 0)):
                positions = tf.cumsum(attention_mask, axis=1) * attention_mask - 1
            B, T = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
            zeros = tuple(tf.zeros([T, B, c.num_attention_heads, c.head_dim], self.dtype)
                          for _ in range(c.num_hidden_layers))
            logits, _, _, _ = step(input_ids, positions, attention_mask, zeros, zeros, tf.zeros([B, T], tf.int32), 0)
            return {"logits": logits}

        @tf.function(input_signature=[ids_spec, mask_spec, tf.TensorSpec([], tf.int64, name="seed")])
        def generate(input_ids, attention_mask, seed):
            with tf.control_dependencies(check(input_ids, attention_mask, d.new)):
                new, steps = decode(input_ids, attention_mask, seed, tf.constant(d.temperature, tf.float32),
                                    tf.constant(d.top_p, tf.float32), tf.constant(d.eos), tf.constant(d.pad, tf.int32))
            return {"sequences": tf.concat([input_ids, new[:, :steps]], axis=1)}

        module.serving = serving
        module.generate = generate
        tf.saved_model.save(module, str(export_dir), signatures={"serving_default": serving, "generate": generate})


def next_tokens(logits, seed, temperature, top_p, sample: bool, top_k: int, nucleus: bool):
    """The next token of each row from its last logits ``(B, V)``, filtered as transformers' warpers do, in
    their order: temperature, then top-k, then top-p (``nucleus``); drawn from stateless noise (``seed``: two
    int64), so a seed repeats its draws."""
    scores = tf.cast(logits, tf.float32)
    if not sample:
        return tf.argmax(scores, axis=-1, output_type=tf.int32)
    scores = scores / temperature
    if top_k > 0:
        kth = tf.math.top_k(scores, top_k).values[:, -1:]  # (B, 1)
        scores = tf.where(scores < kth, -np.inf, scores)
    if nucleus:
        order = tf.argsort(scores, axis=-1, stable=True)  # ascending
        ranked = tf.gather(scores, order, batch_dims=1)
        above = tf.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1)  # probability at or below each rank
        drop = above <= 1 - top_p
        drop = tf.concat([drop[:, :-1], tf.zeros_like(drop[:, -1:])], axis=1)  # the most likely token always stays
        drop = tf.gather(drop, tf.argsort(order, axis=-1), batch_dims=1)  # back to vocabulary order
        scores = tf.where(drop, -np.inf, scores)
    # The Gumbel-max draw (argmax of scores + Gumbel noise is a draw from softmax(scores)): XLA compiles
    # stateless uniform noise, not TensorFlow's multinomial op.
    u = tf.random.stateless_uniform(tf.shape(scores), seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return tf.argmax(scores - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)
