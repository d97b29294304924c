"""The JAX and TensorFlow ports behind one small interface, so each test runs on both unchanged."""

from __future__ import annotations

import numpy as np


def causal_lm(framework: str):
    if framework == "flax":
        from optlm.flax import FlaxOPTForCausalLM

        return FlaxOPTForCausalLM
    from optlm.tf import TFOPTForCausalLM

    return TFOPTForCausalLM


def base_model(framework: str):
    if framework == "flax":
        from optlm.flax import FlaxOPTModel

        return FlaxOPTModel
    from optlm.tf import TFOPTModel

    return TFOPTModel


def dtype_name(model) -> str:
    return np.dtype(model.dtype).name if not hasattr(model.dtype, "name") else model.dtype.name


def draw(framework: str, logits: np.ndarray, n: int, temperature: float, top_k: int | None, top_p: float,
         seed: int) -> np.ndarray:
    """``n`` tokens drawn by the port's sampler from one row of ``logits``."""
    rows = np.tile(logits.astype(np.float32), (n, 1))
    settings = dict(temperature=temperature, top_p=top_p, sample=True, top_k=top_k or 0, nucleus=top_p < 1.0)
    if framework == "flax":
        import jax

        from optlm.flax.opt import next_tokens

        return np.asarray(next_tokens(rows, jax.random.key(seed), **settings))
    import tensorflow as tf

    from optlm.tf.opt import next_tokens

    return next_tokens(tf.constant(rows), tf.constant([seed, 0], tf.int64), **settings).numpy()
