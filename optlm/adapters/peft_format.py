"""Adapter files in and out, in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are the module names of the transformers model under ``base_model.model.``, with the adapter name
left out (``base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight``); a module trained in full
(``modules_to_save``) is saved under its own name (``base_model.model.score.weight``); ``bias="all"`` /
``"lora_only"`` add the trained biases under their in-memory names (``q_proj.base_layer.bias``). A LoRA on the
output head also saves the head's weight (``lm_head.base_layer.weight``), as peft does for embedding layers.
peft's ``PeftModel.from_pretrained`` reads these files and optlm reads peft's (tests/test_adapters.py).
Bottleneck adapters use the same two files with ``peft_type: "BOTTLENECK"`` (see ``bottleneck.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import CheckpointError, resolve
from .bottleneck import BottleneckConfig, add_bottleneck
from .lora import LoraConfig, LoraLinear, ModulesToSave, add_lora, replace_module, resolve_modules_to_save
from .state import AdapterError, AdapterLayer, ensure_state, state_of

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
# peft's names for the adapter methods; only the first two are implemented here.
CONFIGS = {"LORA": LoraConfig, "BOTTLENECK": BottleneckConfig}

AdapterConfig = LoraConfig | BottleneckConfig


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors, keyed as in peft's files (without the ``base_model.model.`` prefix)."""
    state = state_of(model)
    if state is None or name not in state.ids:
        raise AdapterError(f"no adapter named {name!r} in this model")
    config = state.configs[name]
    out: dict[str, Tensor] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for prefix, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            out.update({f"{prefix}.{k}": t for k, t in layer.tensors(name).items()})
            if layer is head and isinstance(layer, LoraLinear) and name in layer.names() \
                    and isinstance(layer.base_layer, nn.Linear):
                out[f"{prefix}.base_layer.weight"] = layer.base_layer.weight
    out.update(_bias_tensors(model, getattr(config, "bias", "none")))
    return out


def _bias_tensors(model: nn.Module, mode: str) -> dict[str, Tensor]:
    """The biases an adapter trains besides its own weights: all of them, or those of its LoRA layers."""
    if mode == "none":
        return {}
    inside = tuple(f"{n}.{part}." for n, m in model.named_modules() if isinstance(m, AdapterLayer)
                   for part in m.per_adapter)
    out = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        if not key.endswith("bias") or key.startswith(inside):
            continue
        if mode == "all" or (key.endswith(".base_layer.bias")
                             and isinstance(model.get_submodule(key[:-len(".base_layer.bias")]), LoraLinear)):
            out[key] = p
    return out


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in ``directory``.

    Files are written beside their final names and renamed into place, so a crash leaves the old files or the
    new ones, never half of either."""
    state = state_of(model)
    if state is None or name not in state.ids:
        raise AdapterError(f"no adapter named {name!r} in this model")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = state.configs[name].to_dict()
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    config["inference_mode"] = True
    if config.get("modules_to_save") is None and state.kinds[name] == "lora":
        config["modules_to_save"] = resolve_modules_to_save(model, state.configs[name]) or None
    tensors = {PREFIX + k: t.detach().to("cpu").contiguous() for k, t in adapter_tensors(model, name).items()}
    _atomic(out / SAFE_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(path: str | os.PathLike, revision: str | None = None) -> tuple[Path, AdapterConfig]:
    """The adapter directory (a local path or a hub id) and its parsed config."""
    try:
        directory = resolve(path, revision)
    except CheckpointError as e:
        raise AdapterError(str(e).replace("model directory", "adapter directory")) from e
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_NAME}: it is not an adapter directory (a merged or full "
                           "checkpoint loads as a model instead)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("the top level must be an object")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e})") from e
    kind = raw.get("peft_type")
    if kind not in CONFIGS:
        raise AdapterError(f"{file} is a {kind!r} adapter; optlm loads {' and '.join(CONFIGS)} adapters")
    try:
        return directory, CONFIGS[kind].from_dict(raw)
    except TypeError as e:
        raise AdapterError(f"{file}: {e}") from e


def read_tensors(directory: Path) -> dict[str, Tensor]:
    if (directory / SAFE_WEIGHTS).is_file():
        tensors = load_file(str(directory / SAFE_WEIGHTS))
    elif (directory / BIN_WEIGHTS).is_file():
        tensors = torch.load(directory / BIN_WEIGHTS, map_location="cpu", weights_only=True)  # never unpickle code
    else:
        raise AdapterError(f"{directory} has {CONFIG_NAME} but no {SAFE_WEIGHTS} (or {BIN_WEIGHTS})")
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def add_adapter(model: nn.Module, config: AdapterConfig, name: str) -> list[str]:
    """Add a fresh adapter of ``config``'s kind to ``model``."""
    if isinstance(config, LoraConfig):
        return add_lora(model, config, name)
    return add_bottleneck(model, config, name)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 revision: str | None = None) -> AdapterConfig:
    """Add the adapter saved in ``path`` to ``model`` as ``name``; every tensor is checked against the shape
    this base gives it, and a mismatch names the tensor. On any error the model is left as it was."""
    directory, config = read_config(path, revision)
    tensors = read_tensors(directory)
    state = ensure_state(model)
    if name in state.ids:
        raise AdapterError(f"an adapter named {name!r} is already loaded; pick another name or delete it first")
    # A bad file must not leave half an adapter behind: the adapter is removed again on any error.
    add_adapter(model, config, name)
    try:
        expected = adapter_tensors(model, name)
        _fill(model, expected, tensors, directory)
    except Exception:
        remove_adapter(model, name)
        raise
    return config


def _fill(model: nn.Module, expected: dict[str, Tensor], tensors: dict[str, Tensor], directory: Path) -> None:
    missing = [k for k in expected if k not in tensors and not k.endswith("bias") and ".base_layer." not in k]
    if missing:
        raise AdapterError(f"{directory / SAFE_WEIGHTS} lacks {len(missing)} tensor(s) this adapter's config "
                           f"calls for, e.g. {PREFIX}{missing[0]} — the config's target_modules or "
                           "modules_to_save do not match the file")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise AdapterError(f"{directory / SAFE_WEIGHTS} has tensor {PREFIX}{unexpected[0]} (and "
                           f"{len(unexpected) - 1} more) that this base model has no place for — the adapter "
                           "was made for another model architecture")
    tensors = {k: _share(model, k, t, expected[k]) for k, t in tensors.items()}
    for key, target in expected.items():
        if key not in tensors:
            continue
        t = tensors[key]
        if tuple(t.shape) != tuple(target.shape):
            raise AdapterError(f"adapter tensor {PREFIX}{key} has shape {tuple(t.shape)}, but this base model with "
                               f"the adapter's config needs {tuple(target.shape)} — the adapter was trained for "
                               "another model size, or its rank does not match adapter_config.json")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterError(f"adapter tensor {PREFIX}{key} is not a finite floating-point tensor")
    for key, target in expected.items():
        if key in tensors:
            target.data.copy_(tensors[key].to(target.dtype))


def _share(model: nn.Module, key: str, t: Tensor, target: Tensor) -> Tensor:
    """The part of an adapter tensor that goes with a model holding slices of its weights (a tensor-parallel
    rank's share; each sliced tensor records ``tp_slice = (dim, start, stop)``): a layer split by output takes
    its rows of lora_B, one split by input its columns of lora_A — the low-rank update of the slice is then the
    slice of the update — and a sliced tensor the adapter replaces (a bias it trained) takes its own slice."""
    module_path, _, leaf = key.partition(".lora_")
    if leaf:
        layer = model.get_submodule(module_path)
        base = getattr(getattr(layer, "base_layer", layer), "weight", None)
        dim, start, stop = getattr(base, "tp_slice", (None, 0, 0))
        if leaf.startswith("B.") and dim == 0:
            return t[start:stop]
        if leaf.startswith("A.") and dim == 1:
            return t[:, start:stop]
        return t
    dim, start, stop = getattr(target, "tp_slice", (None, 0, 0))
    return t if dim is None or t.shape == target.shape else t.narrow(dim, start, stop - start)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer; layers left with no adapter go back to the plain module."""
    state = state_of(model)
    if state is None or name not in state.ids:
        raise AdapterError(f"no adapter named {name!r} in this model")
    for key, layer in list(model.named_modules()):
        if isinstance(layer, AdapterLayer) and name in layer.names():
            layer.remove(name)
            if not layer.names() and isinstance(layer, (LoraLinear, ModulesToSave)):
                base = layer.base_layer if isinstance(layer, LoraLinear) else layer.original_module
                replace_module(model, key, base)
    state.forget(name)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
