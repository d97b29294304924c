"""OPT's architecture as data, for every framework: each tensor's name and shape for a config, and the quirks
an implementation must reproduce to give the reference's numbers.

The PyTorch decoder (``model.py``), the JAX port (``optlm.flax``) and the TensorFlow port (``optlm.tf``) all
build from this: their parameters carry these names (transformers' layout, weights as ``(out, in)``), so one
checkpoint reader, one name map and one shape check serve the three; a test holds the PyTorch module tree to
:func:`tensor_shapes`.

The quirks (each cited where transformers' ``modeling_opt.py`` or metaseq does it):

- Learned positions start at :data:`POSITION_OFFSET` (fairseq reserved rows 0 and 1), so position ``p`` reads
  row ``p + 2``. Positions count real tokens only (``cumsum(mask) * mask - 1`` over a 0/1 attention mask): left
  padding does not shift them, and a padded slot has position -1, which reads row 1.
- q is multiplied by ``head_dim ** -0.5`` before q·kᵀ (fairseq's order, not the scores after).
- ``do_layer_norm_before``: True normalises each block's input (pre-LN, every size but 350m); False normalises
  each residual sum (post-LN, opt-350m).
- The decoder's final layer norm exists only for pre-LN models that do not set ``_remove_final_layer_norm``.
- ``word_embed_proj_dim != hidden_size`` (opt-350m): embeddings are narrower than the decoder, with
  ``project_in`` after the token embedding (before the positions are added) and ``project_out`` after the
  final layer norm; both without bias.
- ``enable_bias`` and ``layer_norm_elementwise_affine`` drop the linear biases and the norms' parameters.
- The head is tied to the token embedding unless ``tie_word_embeddings`` is False (then ``lm_head.weight``
  is its own tensor); it has no bias.
- A query whose row is all padding attends to nothing: its attention output is zeros (as torch's SDPA gives).
- Layer norms use eps 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import OPTConfig

# fairseq legacy: learned positions are offset by 2 (ids 0 and 1 were reserved for padding in metaseq).
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5
BASE_PREFIX = "model"  # the causal LM's base model lives under "model." (transformers' base_model_prefix)
IGNORED_KEYS = (r"\.version$",)  # fairseq bookkeeping buffers some checkpoints carry, not weights


def has_final_layer_norm(config: OPTConfig) -> bool:
    return config.do_layer_norm_before and not config._remove_final_layer_norm


def has_projections(config: OPTConfig) -> bool:
    return config.word_embed_proj_dim != config.hidden_size


def tensor_shapes(config: OPTConfig, head: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the decoder (``decoder.*``, OPTModel's names) and, with ``head``, of the causal LM
    (``model.decoder.*`` and ``lm_head.weight``), with its shape."""
    d, e, f, v = config.hidden_size, config.word_embed_proj_dim, config.ffn_dim, config.vocab_size
    bias, affine = config.enable_bias, config.layer_norm_elementwise_affine
    out = {"decoder.embed_tokens.weight": (v, e),
           "decoder.embed_positions.weight": (config.max_position_embeddings + POSITION_OFFSET, d)}
    if has_projections(config):
        out["decoder.project_in.weight"] = (d, e)
        out["decoder.project_out.weight"] = (e, d)

    def norm(name: str) -> None:
        if affine:
            out[f"{name}.weight"] = out[f"{name}.bias"] = (d,)

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    if has_final_layer_norm(config):
        norm("decoder.final_layer_norm")
    for i in range(config.num_hidden_layers):
        p = f"decoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(p + "self_attn." + proj, d, d)
        norm(p + "self_attn_layer_norm")
        linear(p + "fc1", f, d)
        linear(p + "fc2", d, f)
        norm(p + "final_layer_norm")
    if not head:
        return out
    return {**{f"{BASE_PREFIX}.{k}": s for k, s in out.items()}, "lm_head.weight": (v, e)}


def optional_tensors(config: OPTConfig, head: bool = False) -> set[str]:
    """Tensors a checkpoint may leave out: the head when it is tied to the embedding."""
    return {"lm_head.weight"} if head and config.tie_word_embeddings else set()



# ---- the order of operations, over any framework's callables and arrays (only + is applied here) --------

def embed_input(ids: Any, positions: Any, embed_tokens: Callable, embed_positions: Callable,
          project_in: Callable | None) -> Any:
    """The decoder's input: token embeddings, projected in where the embeddings are narrower (opt-350m), plus
    the learned positions (read at ``position + POSITION_OFFSET``)."""
    x = embed_tokens(ids)  # (B, T, e)
    if project_in is not None:
        x = project_in(x)  # (B, T, d)
    return x + embed_positions(positions + POSITION_OFFSET)


def decoder_layer(x: Any, attend: Callable, mlp: Callable, attn_norm: Callable, mlp_norm: Callable, pre_ln: bool,
          drop: Callable = lambda h: h) -> tuple[Any, ...]:
    """One decoder layer: pre-LN normalises each sublayer's input, post-LN (opt-350m) each residual sum.
    ``attend(h)`` returns the attention output and whatever state it carries (a cache's keys and values),
    which comes back after the new ``x``; ``drop``: dropout on each sublayer's output (training)."""
    h, *state = attend(attn_norm(x) if pre_ln else x)
    x = x + drop(h)
    if not pre_ln:
        x = attn_norm(x)
    x = x + drop(mlp(mlp_norm(x) if pre_ln else x))
    if not pre_ln:
        x = mlp_norm(x)
    return (x, *state)


def decoder_output(x: Any, final_norm: Callable | None, project_out: Callable | None) -> Any:
    """The decoder's output: the final layer norm (where the model has one), projected out to the embedding
    width (opt-350m)."""
    if final_norm is not None:
        x = final_norm(x)
    if project_out is not None:
        x = project_out(x)  # (B, T, e)
    return x
