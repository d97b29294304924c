"""Hugging Face checkpoints: find them, read them without unpickling, map names, validate, save.

Layouts understood: ``model.safetensors``; sharded ``model-0000X-of-0000N.safetensors`` with
``model.safetensors.index.json``; ``pytorch_model.bin`` (and its sharded index) read only through
``torch.load(weights_only=True)``. Keys may carry the original hub uploads' ``decoder.*`` prefix or
transformers' ``model.decoder.*``; both map onto the same module tree.

Nothing here imports torch until a torch tensor is asked for: the JAX and TensorFlow ports (``optlm.flax``,
``optlm.tf``) read safetensors into numpy arrays (:func:`read_arrays`) and check them against the family's
tensor list (:func:`check_shapes`) through the same code and messages as the PyTorch loader.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from .models.config import ModelConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# optlm's quantized checkpoints use their own file name, so that transformers (which would ignore the
# quantization record and silently re-initialise what it cannot read) refuses them instead.
QUANTIZED_STEM = "optlm-quantized"
QUANT_INDEX = f"{QUANTIZED_STEM}.safetensors.index.json"
QUANT_SINGLE = f"{QUANTIZED_STEM}.safetensors"
_WEIGHT_FILES = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE, QUANT_INDEX, QUANT_SINGLE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message says what is wrong and how to fix it."""


# Floating dtypes a model may be loaded in, by every name optlm accepts, as numpy-style names (each framework
# maps these to its own dtype objects).
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64",
               "fp64": "float64", "double": "float64"}


def dtype_name(dtype: Any) -> str | None:
    """``dtype`` (a name, a numpy / JAX / TensorFlow / torch dtype, or None / "auto" for the checkpoint's own)
    as one of ``float32``, ``float16``, ``bfloat16``, ``float64`` or None; anything else raises the same
    ValueError whichever framework asked."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None)  # numpy's and TensorFlow's dtypes
    if not isinstance(name, str):
        try:
            name = np.dtype(dtype).name  # JAX's scalar types (jnp.float32 …)
        except TypeError:
            name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# ---- locating files ----------------------------------------------------------------------------------

def resolve(path_or_id: str | os.PathLike, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory, or a hub id fetched into (or read from, with HF_HUB_OFFLINE=1) the standard cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    repo_id = str(path_or_id)
    from .bundled import BUNDLED_ALIASES, bundled_model_path

    if repo_id in BUNDLED_ALIASES:
        return bundled_model_path()
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise CheckpointError(f"model directory {repo_id} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.txt"]
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["*.safetensors"]))
        if weights and not any(snap.glob("*.safetensors")):
            snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["*.bin"]))
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid hub id") from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id} is not a local directory and is not in the Hugging Face cache, and the hub cannot be "
            "reached (offline or HF_HUB_OFFLINE=1); download it once with network access, or pass a local path"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"no model {repo_id!r} on the hub (or it is private); check the name") from e
    return snap


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors first."""
    for index in (SAFE_INDEX, BIN_INDEX, QUANT_INDEX):
        if (directory / index).is_file():
            return _shards(directory, index)
    for single in (SAFE_SINGLE, BIN_SINGLE, QUANT_SINGLE):
        if (directory / single).is_file():
            return [directory / single]
    others = sorted(p.name for p in directory.glob("*.safetensors")) + sorted(p.name for p in directory.glob("*.bin"))
    if len(others) == 1:
        return [directory / others[0]]
    raise CheckpointError(
        f"no weights found in {directory}: looked for {', '.join(_WEIGHT_FILES)}"
        + (f" (found {', '.join(others)} but no index to say which belong together)" if others else "")
    )


def _shards(directory: Path, index: str) -> list[Path]:
    """The shard files an index names: each must be a file inside ``directory`` (no ``..``, no absolute
    path, no symlink that leads out), so a crafted index cannot make optlm read files elsewhere."""
    try:
        with open(directory / index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / index} is not a valid shard index ({e}); save the checkpoint again") from e
    root = directory.resolve()
    files = sorted(set(weight_map.values()))
    for name in files:
        target = (directory / name).resolve()
        if Path(name).is_absolute() or target.parent != root:
            raise CheckpointError(f"{directory / index} names a shard outside the checkpoint directory ({name!r}); "
                                  "refusing to read it — shards must be files in the directory itself")
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory / index} lists shards that are not there: {', '.join(missing)}")
    return [directory / name for name in files]


# ---- reading ------------------------------------------------------------------------------------------

def read_state_dict(files: Iterable[Path]) -> dict[str, Tensor]:
    """All tensors of a checkpoint, memory-mapped where the format allows (no copy until used)."""
    state: dict[str, Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        state[key] = f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                      "corrupted — download or save it again") from e
        else:
            state.update(_load_bin(path))
    return state


def _load_bin(path: Path) -> dict[str, Tensor]:
    import torch

    # weights_only=True: the file is never unpickled into arbitrary objects, so it cannot run code.
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file ({e}); convert it to "
                              "safetensors or re-save it with torch.save(state_dict)") from e


@dataclass(frozen=True)
class Stored:
    """Where one tensor lies in a safetensors file (``dtype``: safetensors' name, e.g. ``"BF16"``)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md) as numpy dtype names;
# bfloat16 is ml_dtypes' (which JAX and TensorFlow both install).
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def catalog(files: Iterable[Path]) -> dict[str, Stored]:
    """Every tensor of the checkpoint's safetensors files (the caller checks they are), from their headers (no
    tensor data read)."""
    out: dict[str, Stored] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            size = path.stat().st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in SAFETENSORS_DTYPES or not 0 <= begin <= end <= size - 8 - n:
                    raise ValueError(f"tensor {name}: dtype {entry['dtype']} or offsets {begin}..{end} out of range")
                out[name] = Stored(path, entry["dtype"], tuple(entry["shape"]), 8 + n + begin, end - begin)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                  "corrupted — download or save it again") from e
    return out


def numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype by name, ``bfloat16`` included (from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_arrays(files: Iterable[Path]) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as read-only numpy arrays, without torch for safetensors files (memory-mapped:
    no copy until used). A ``.bin`` file is read through torch's weights-only loader and converted."""
    files = list(files)
    if any(p.suffix != ".safetensors" for p in files):
        return {k: _to_numpy(v) for k, v in read_state_dict(files).items()}
    out, maps = {}, {}
    for name, s in catalog(files).items():
        dtype = numpy_dtype(SAFETENSORS_DTYPES[s.dtype])
        count = int(np.prod(s.shape, dtype=np.int64))
        if count * dtype.itemsize != s.nbytes:
            raise CheckpointError(f"{s.path}: tensor {name}'s byte count does not match its shape {s.shape} and "
                                  f"dtype {s.dtype}; it may be corrupted — download or save it again")
        if s.path not in maps:  # one mapping per file (a mapping per tensor would hold a descriptor each)
            maps[s.path] = np.memmap(s.path, dtype=np.uint8, mode="r")
        out[name] = maps[s.path][s.offset:s.offset + s.nbytes].view(dtype).reshape(s.shape)
    return out


def _to_numpy(t: Tensor) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return t.numpy()


def read_family_config(directory: Path, self_family: type[ModelConfig], loader: str) -> ModelConfig:
    """``directory``'s config.json, which must describe a model of ``self_family``."""
    from .models import config_class
    from .models.config import read_json

    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a checkpoint directory needs one")
    d = read_json(path)
    model_type = d.get("model_type", "opt") if isinstance(d, dict) else None
    if model_type is not None and model_type != self_family.model_type:
        config_class(model_type)  # an unsupported family is named as such
        raise CheckpointError(f"{directory} holds a {model_type} model; {loader} loads {self_family.model_type} "
                              f"checkpoints — use optlm.AutoModelForCausalLM (or the {model_type} class)")
    return self_family.from_json_file(path)


# ---- names --------------------------------------------------------------------------------------------

def normalize_keys(state: dict[str, Tensor], expected: set[str], prefix: str = "model",
                   ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """Map checkpoint names onto ``expected`` model names: add or drop the base model's ``prefix`` (``model.``
    for OPT, as transformers' ``base_model_prefix``) as needed; drop keys matching an ``ignore`` pattern
    (bookkeeping buffers a family's old checkpoints carry)."""
    out, lead = {}, prefix + "."
    patterns = [re.compile(p) for p in ignore]
    for key, value in state.items():
        if any(p.search(key) for p in patterns):
            continue
        if key not in expected:
            if lead + key in expected:
                key = lead + key
            elif key.startswith(lead) and key[len(lead):] in expected:
                key = key[len(lead):]
        out[key] = value
    return out


def _layer_count(keys: Iterable[str]) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.search(r"layers\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def check_state_dict(model: nn.Module, state: dict[str, Tensor], optional: set[str], source: str) -> list[str]:
    """:func:`check_shapes` for a torch model: its state dict is what the checkpoint must provide."""
    return check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                        {k: tuple(v.shape) for k, v in state.items()}, optional, source)


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], optional: set[str],
                 source: str) -> list[str]:
    """Raise on missing, unexpected or mis-shaped weights, naming each; return the optional keys missing.

    ``expected``: the model's tensor names and shapes; ``found``: the checkpoint's (after
    :func:`normalize_keys`). ``optional`` are weights the model may initialise itself (a new classification
    head, a tied lm_head). Keys of heads this model does not have (e.g. ``lm_head.weight`` loaded into
    OPTModel) are ignored.
    """
    missing = sorted(k for k in expected if k not in found and k not in optional)
    head_keys = ("lm_head.", "score.", "qa_outputs.")
    unexpected = sorted(k for k in found if k not in expected and not k.startswith(head_keys))
    mismatched = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
                  for k in sorted(expected) if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model built from its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        ckpt_layers, model_layers = _layer_count(found), _layer_count(expected)
        if ckpt_layers != model_layers:
            lines.append(f"  the checkpoint has {ckpt_layers} layers but config.json says num_hidden_layers="
                         f"{model_layers}")
        if mismatched or ckpt_layers != model_layers:
            lines.append("  fix config.json (hidden_size, ffn_dim, vocab_size, word_embed_proj_dim, "
                         "num_hidden_layers …) so it describes these weights")
        raise CheckpointError("\n".join(lines))
    return sorted(k for k in optional if k not in found)


def read_checked_arrays(directory: Path, expected: dict[str, tuple[int, ...]], optional: set[str], prefix: str,
                        ignore: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The checkpoint in ``directory`` as numpy arrays under the model's names, after the same name mapping
    and shape check as the PyTorch loader (:func:`normalize_keys`, :func:`check_shapes`): every name of
    ``expected`` but the ``optional`` ones the checkpoint lacks."""
    state = normalize_keys(read_arrays(weight_files(directory)), set(expected), prefix, ignore)
    check_shapes(expected, {k: v.shape for k, v in state.items()}, optional, str(directory))
    return {k: v for k, v in state.items() if k in expected}


def storage_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The floating dtype the checkpoint stores its weights in."""
    import torch

    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    return torch.float32


# ---- writing ------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """'5GB', '200MB', '10KiB' or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. '5GB', '500MB' or a number of bytes")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(m.group(1)) * units[(m.group(2) or "b").lower()])


def save_state_dict(state: dict[str, Tensor] | dict[str, np.ndarray], directory: Path,
                    max_shard_size: int | str = "5GB", stem: str = "model") -> None:
    """Write safetensors, sharded with an index when larger than ``max_shard_size`` (transformers' layout);
    ``stem`` names the files (``model`` as transformers does, or :data:`QUANTIZED_STEM`). ``state`` holds torch
    tensors or numpy arrays (the JAX and TensorFlow ports save through numpy, bfloat16 included)."""
    if all(isinstance(v, np.ndarray) for v in state.values()):
        from safetensors.numpy import save_file

        state = {k: np.ascontiguousarray(v) for k, v in state.items()}
        sizes = {k: v.nbytes for k, v in state.items()}
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in state.items()}
        sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    limit = parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for key, value in state.items():
        if shards[-1] and size + sizes[key] > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += sizes[key]
    directory.mkdir(parents=True, exist_ok=True)
    for old in ("model", QUANTIZED_STEM):  # a previous save (other shard count, other precision) must not linger
        for stale in [*directory.glob(f"{old}*.safetensors"), directory / f"{old}.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(sizes.values())
    with open(directory / f"{stem}.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def count_parameters(files: Iterable[Path]) -> tuple[int, set[str]]:
    """Parameter count and stored dtypes, read from headers only (no tensor data touched)."""
    total, dtypes = 0, set()
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():  # noqa: SIM118
                        sl = f.get_slice(key)
                        n = 1
                        for dim in sl.get_shape():
                            n *= dim
                        total += n
                        dtypes.add(sl.get_dtype())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                      "corrupted — download or save it again") from e
        else:
            for value in _load_bin(path).values():
                total += value.numel()
                dtypes.add(str(value.dtype).removeprefix("torch."))
    return total, dtypes
