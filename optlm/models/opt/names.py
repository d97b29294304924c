"""OPT's weight names in metaseq's checkpoints (the layout Meta trained and released OPT in) and in
transformers', and how each tensor was split across metaseq's model-parallel ranks (Megatron-style).

Metaseq fuses each layer's q, k and v projections into one ``qkv_proj`` whose rows are ordered k, v, q (its
sequence-parallel block builds them that way despite the name); with model parallelism every rank holds its
own heads' k, v and q, fused in that order.
"""

from __future__ import annotations

import re

# How a tensor is laid out across model-parallel parts:
#   rows     split along dim 0 (column-parallel weights and their biases, the vocabulary-parallel embedding)
#   columns  split along dim 1 (row-parallel weights; their bias is applied once, after the all-reduce)
#   same     replicated: every part holds all of it
#   qkv      rows, and within each part the k, v, q blocks of that part's heads
ROWS, COLUMNS, SAME, QKV = "rows", "columns", "same", "qkv"

# metaseq name (a regular expression over the key after "decoder.") -> (transformers name, layout)
_LAYER = r"layers\.(\d+)\."
METASEQ = [
    (r"embed_tokens\.weight", "embed_tokens.weight", ROWS),
    (r"embed_positions\.weight", "embed_positions.weight", SAME),
    (r"project_in_dim\.weight", "project_in.weight", SAME),
    (r"project_out_dim\.weight", "project_out.weight", SAME),
    (r"layer_norm\.(weight|bias)", r"final_layer_norm.\1", SAME),
    (_LAYER + r"self_attn\.qkv_proj\.(weight|bias)", r"layers.\1.self_attn.{q,k,v}_proj.\2", QKV),
    (_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)", r"layers.\1.self_attn.\2_proj.\3", ROWS),
    (_LAYER + r"self_attn\.out_proj\.weight", r"layers.\1.self_attn.out_proj.weight", COLUMNS),
    (_LAYER + r"self_attn\.out_proj\.bias", r"layers.\1.self_attn.out_proj.bias", SAME),
    (_LAYER + r"fc1\.(weight|bias)", r"layers.\1.fc1.\2", ROWS),
    (_LAYER + r"fc2\.weight", r"layers.\1.fc2.weight", COLUMNS),
    (_LAYER + r"fc2\.bias", r"layers.\1.fc2.bias", SAME),
    (_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", r"layers.\1.\2.\3", SAME),
]
# Bookkeeping, not weights: fairseq's version buffer, and the output projection metaseq keeps as a copy of the
# (tied) token embedding.
METASEQ_DROPPED = (r"version", r"output_projection\.weight", r"_float_tensor")


def from_metaseq(key: str) -> tuple[str, str] | None:
    """``decoder.layers.3.fc1.weight`` -> (``model.decoder.layers.3.fc1.weight``, its layout); None for a key
    that is bookkeeping. A key this map does not know raises ValueError naming it."""
    name = key.removeprefix("model.").removeprefix("decoder.")
    if any(re.fullmatch(p, name) for p in METASEQ_DROPPED):
        return None
    for pattern, target, layout in METASEQ:
        m = re.fullmatch(pattern, name)
        if m:
            return "model.decoder." + m.expand(target), layout
    raise ValueError(f"{key!r} is not a weight of metaseq's OPT decoder; is this an OPT checkpoint?")
