"""Original metaseq checkpoints → Hugging Face directories: ``optlm convert --from metaseq PATH --out DIR``.

OPT was trained and released in metaseq's format: one pickle per model-parallel rank
(``reshard-model_part-K.pt``), each holding that rank's slice of every split weight, q/k/v fused into one
``qkv_proj`` (optlm.models.opt.names says how each tensor is named and split). This module merges the parts,
splits the fused projections, renames, and writes a directory transformers and optlm load.

Pickles can run code when loaded. They are read only through torch's weights-only unpickler, which builds
tensors and plain containers (plus ``argparse.Namespace``, the form old fairseq configs take) and refuses any
other class, so a checkpoint that smuggles one in is rejected before anything in it runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .models import OPTConfig, read_config
from .models.opt.names import COLUMNS, QKV, ROWS, SAME, from_metaseq

PART = re.compile(r"(?:.*-)?model_part-(\d+)\.pt$")


def part_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's files, by model-parallel rank: a directory of ``*model_part-K.pt`` (K = 0 … n-1, all
    present), or one ``.pt`` file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a metaseq checkpoint file or the directory of its parts")
    parts = {int(m.group(1)): p for p in path.iterdir() if (m := PART.match(p.name))}
    if not parts:
        raise CheckpointError(f"no model-parallel parts (*model_part-K.pt) in {path}; pass the .pt file itself if "
                              "the checkpoint is a single file")
    missing = sorted(set(range(max(parts) + 1)) - set(parts))
    if missing:
        raise CheckpointError(f"{path} lacks model part(s) {missing}; a checkpoint split {max(parts) + 1} ways needs "
                              "every part")
    return [parts[k] for k in sorted(parts)]


def load_part(path: Path) -> dict[str, Any]:
    """One part's contents through the weights-only unpickler; anything but tensors and plain containers is
    refused, naming what it was."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object that is not a tensor or a plain container"
        raise CheckpointError(f"{path} holds {what}, which optlm does not load from a checkpoint (a pickled object can "
                              "run code when loaded); only tensors and plain containers are read") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dictionary")
    return state


def _weights(state: dict[str, Any], path: Path) -> dict[str, Tensor]:
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not any(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} has no weights (no 'model' dictionary of tensors)")
    return weights


def merge_parts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One transformers-named state dict from the parts' metaseq-named ones."""
    out: dict[str, Tensor] = {}
    for key in parts[0]:
        mapped = from_metaseq(key)
        if mapped is None:
            continue
        name, layout = mapped
        pieces = [p[key] for p in parts]
        if any(t.shape != pieces[0].shape for t in pieces):
            raise CheckpointError(f"{key} has different shapes across the model parts: "
                                  f"{[tuple(t.shape) for t in pieces]}")
        if layout == SAME:
            out[name] = pieces[0]
        elif layout == ROWS:
            out[name] = torch.cat(pieces, 0)
        elif layout == COLUMNS:
            out[name] = torch.cat(pieces, 1)
        else:
            assert layout == QKV
            if pieces[0].shape[0] % 3:
                raise CheckpointError(f"{key} has {pieces[0].shape[0]} rows, not a multiple of 3 (k, v, q)")
            # each part: its heads' k, v and q, in that order (metaseq's fused order)
            k, v, q = (torch.cat(chunks, 0) for chunks in zip(*(t.chunk(3, 0) for t in pieces), strict=True))
            for letter, t in (("q", q), ("k", k), ("v", v)):
                out[name.replace("{q,k,v}", letter)] = t
    for key in (k for p in parts for k in p):
        if key not in parts[0]:
            raise CheckpointError(f"{key} is in a later model part but not in the first; the parts do not belong "
                                  "together")
    return out


def config_from_metaseq(cfg: Any, weights: dict[str, Tensor]) -> OPTConfig:
    """The architecture from the checkpoint's own record of its training arguments (``cfg["model"]`` or old
    fairseq ``args``), checked against the weights' shapes."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if isinstance(model, argparse.Namespace):
        model = vars(model)
    if not isinstance(model, dict) or "decoder_attention_heads" not in model:
        raise CheckpointError("the checkpoint does not record its architecture (cfg['model'] with "
                              "decoder_attention_heads …); pass --config with a preset (opt-125m …) or a config.json")
    # Sizes come from the weights themselves; what shapes cannot tell (heads, pre- or post-LN, the activation)
    # from the record.
    emb = weights["model.decoder.embed_tokens.weight"]  # (vocab, embedding width)
    fc1 = weights["model.decoder.layers.0.fc1.weight"]  # (ffn, hidden)
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"model\.decoder\.layers\.(\d+)\.", k))}
    pre_ln = bool(model.get("decoder_normalize_before", True))
    return OPTConfig(
        vocab_size=emb.shape[0], hidden_size=fc1.shape[1], num_hidden_layers=len(layers), ffn_dim=fc1.shape[0],
        num_attention_heads=model["decoder_attention_heads"], word_embed_proj_dim=emb.shape[1],
        # fairseq legacy: the learned position table has 2 rows more than the positions it serves
        max_position_embeddings=weights["model.decoder.embed_positions.weight"].shape[0] - 2,
        do_layer_norm_before=pre_ln, activation_function=model.get("activation_fn", "relu"),
        _remove_final_layer_norm=pre_ln and "model.decoder.final_layer_norm.weight" not in weights)


def convert_metaseq(path: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Convert the metaseq checkpoint at ``path`` (a file, or a directory of model-parallel parts) into a
    transformers directory ``out`` (config.json + safetensors); returns ``out``. ``config``: a preset name or a
    config.json for checkpoints that do not record their architecture."""
    from .hf import OPTForCausalLM
    from .models import config_from_name

    files = part_files(path)
    states = [load_part(f) for f in files]
    weights = merge_parts([_weights(s, f) for s, f in zip(states, files, strict=True)])
    if config is None:
        arch = config_from_metaseq(states[0].get("cfg") or {"model": states[0].get("args")}, weights)
    else:
        arch = read_config(config) if Path(config).is_file() else config_from_name(str(config))
        if not isinstance(arch, OPTConfig):
            raise ValueError(f"--config {config} is a {arch.family_name} config; metaseq checkpoints are OPT")
    with torch.device("meta"):
        model = OPTForCausalLM(arch, init=False)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    expected = set(model.state_dict()) - {"lm_head.weight"}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the OPT architecture {arch.hidden_size}x{arch.num_hidden_layers}: "
                              f"missing {missing[:6]}, unexpected {unexpected[:6]}; check --config")
    bad = [f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
           if k in weights and weights[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: shapes do not fit the config: {'; '.join(bad[:4])}; check --config")
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    out = Path(out)
    model.save_pretrained(out)
    return out
