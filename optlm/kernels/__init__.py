"""Hand-written CPU kernels for decoding, compiled on first use and cached: matmuls (``linear_avx2.c``),
attention over a paged cache (``paged_attention.c``) and a whole decode step (``decode_step.c``, driven by
``optlm.decode_step``).

``available()`` says whether they can run here: an x86-64 CPU with AVX2 + FMA, a C compiler (``$CC``, else
``cc``/``gcc``/``clang``) and OpenMP. The build takes about a second and is cached under
``$OPTLM_CACHE`` (default ``~/.cache/optlm``), keyed by the source, compiler, flags and CPU. When they
cannot be built the callers use PyTorch's kernels instead (same results up to rounding), after one warning.
``OPTLM_KERNELS=0`` turns them off.

Each function takes contiguous CPU tensors, checks them, and returns a new float32 ``(M, N)`` tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("linear_avx2.c", "gemm_amx.c", "paged_attention.c", "decode_step.c")]
HEADERS = [Path(__file__).with_name("dot.h")]
# -march=native: built on the machine that runs it, tuned for its core (faster than plain -mavx2 -mfma on a
# Zen 3 core); the cache key includes the CPU so a shared home directory never serves another CPU's build.
FLAGS = ["-O3", "-march=native", "-funroll-loops", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None  # why the kernels are unavailable, once known


class LinearSpec(NamedTuple):
    """A linear layer as these kernels take it (a layer's ``kernel_spec()``): ``kind`` is ``"f32"``,
    ``"bf16"``, ``"int8"`` or ``"int4"``; ``weight`` as :func:`linear_f32` … :func:`linear_int4` take it;
    ``scales`` / ``mins`` / ``bias`` in any float dtype (None where unused); ``group``: int4's group size."""

    kind: str
    weight: Tensor
    scales: Tensor | None = None
    mins: Tensor | None = None
    bias: Tensor | None = None
    group: int = 0


def cache_dir() -> Path:
    return Path(os.environ.get("OPTLM_CACHE") or Path.home() / ".cache" / "optlm") / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_ok() -> str | None:
    if sys.platform == "win32":
        return "the kernels are built with a Unix C compiler (PyTorch's kernels are used on Windows)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are for x86-64 CPUs (this is {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    return None


def _cpu_signature() -> str:
    try:  # model name and feature flags of the first CPU
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            first = f.read().split("\n\n")[0].splitlines()
        return "\n".join(ln for ln in first if ln.startswith(("model", "flags", "cpu family")))
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    sources = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    key = hashlib.sha256(sources + version.encode() + " ".join(FLAGS).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    out = cache_dir() / f"optlm-kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp_out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp_out, out)  # atomic: a concurrent build or a crash never leaves a half-written library
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        if os.environ.get("OPTLM_KERNELS", "1") == "0":
            _error = "turned off by OPTLM_KERNELS=0"
            return None
        _error = _cpu_ok()
        cc = _compiler()
        if _error is None and cc is None:
            _error = "no C compiler found (set CC, or install gcc)"
        if _error is None:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
            except (OSError, RuntimeError) as e:
                _error = f"building them failed: {e}"
            else:
                P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
                lib.optlm_linear_f32.argtypes = [P, P, P, P, L, L, L, I]
                lib.optlm_linear_bf16.argtypes = [P, P, P, P, L, L, L, I]
                lib.optlm_linear_i8.argtypes = [P, P, P, P, P, L, L, L, I]
                lib.optlm_linear_i8.restype = I
                lib.optlm_linear_bf16.restype = I
                lib.optlm_linear_i4.argtypes = [P, P, P, P, P, P, L, L, L, L, I]
                lib.optlm_linear_i4.restype = I
                lib.optlm_paged_qk.argtypes = [P, P, P, P, P, L, L, L, L, I]
                lib.optlm_paged_pv.argtypes = [P, P, P, P, P, L, L, L, L, I]
                lib.optlm_decode_step.argtypes = [P, P, P, L, P, P, I, P]
                lib.optlm_decode_step.restype = I
                lib.optlm_amx_int8.restype = I
                _lib = lib
        if _error is not None:
            warnings.warn(f"optlm's AVX2 kernels are not used ({_error}); falling back to PyTorch's kernels, "
                          "which are slower for decoding on this CPU", RuntimeWarning, stacklevel=3)
        return _lib


def enabled() -> bool:
    """Cheap per-call check for callers: True once the kernels are loaded (loads them on first use)."""
    return _lib is not None or (_error is None and _load() is not None)


def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(x: Tensor, w: Tensor, bias: Tensor | None, wdtype: torch.dtype, w_cols: int | None = None) -> tuple:
    """Validate x (M, K) float32 and w (N, w_cols or K) of ``wdtype``, all contiguous on the CPU; (M, N, K)."""
    K = x.shape[-1]
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != (K if w_cols is None else w_cols):
        raise ValueError(f"expected x (M, K) and weight (N, {'K' if w_cols is None else w_cols}), "
                         f"got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != torch.float32 or w.dtype != wdtype:
        raise TypeError(f"expected float32 x and {wdtype} weight, got {x.dtype} and {w.dtype}")
    for t in (x, w, bias):
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError("kernel inputs must be contiguous CPU tensors")
    _check_float(bias, "bias", (w.shape[0],))
    return x.shape[0], w.shape[0], K


def _check_float(t: Tensor | None, name: str, shape: tuple) -> None:
    if t is not None and (t.dtype != torch.float32 or t.shape != shape or not t.is_contiguous()):
        raise ValueError(f"{name} must be contiguous float32 of shape {shape}")


def rowwise(x: Tensor, out_features: int, kernel) -> Tensor:
    """Run ``kernel`` (float32 (rows, K) -> float32 (rows, out_features)) on ``x`` (..., K) of any float
    dtype; the result has x's leading shape and dtype. The glue every kernel-backed layer needs."""
    y = kernel(x.reshape(-1, x.shape[-1]).float().contiguous())
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


def amx_int8() -> bool:
    """Whether :func:`linear_int8` runs calls of 4+ rows (prompts, batches) on AMX tiles here (``gemm_amx.c``:
    same results, several times faster): an AMX-INT8 CPU, a compiler that knows it, and Linux letting the
    process use tile data. Shapes the tile kernel does not take (inputs not a multiple of 64, outputs not of
    32) use the AVX loop either way."""
    return enabled() and bool(_lib_or_raise().optlm_amx_int8())


def library() -> ctypes.CDLL:
    """The loaded kernel library (for ``optlm.decode_step``, which passes it structures of pointers)."""
    return _lib_or_raise()


def _lib_or_raise() -> ctypes.CDLL:
    lib = _lib if _lib is not None else _load()  # no lock once loaded: this runs per layer per token
    if lib is None:
        raise RuntimeError(f"optlm's AVX2 kernels are unavailable: {_error}")
    return lib


def linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, check: bool = True) -> Tensor:
    """``x @ weight.T + bias`` for float32 ``weight`` (N, K).

    ``check=False`` skips validating the arguments (callers that already guarantee them, once per token)."""
    lib = _lib_or_raise()
    M, N, K = _check(x, weight, bias, torch.float32) if check else (x.shape[0], weight.shape[0], x.shape[1])
    y = torch.empty(M, N)
    lib.optlm_linear_f32(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), M, N, K, torch.get_num_threads())
    return y


def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, check: bool = True) -> Tensor:
    """``x @ weight.T + bias`` for bfloat16 ``weight`` (N, K), accumulated in float32."""
    lib = _lib_or_raise()
    M, N, K = _check(x, weight, bias, torch.bfloat16) if check else (x.shape[0], weight.shape[0], x.shape[1])
    y = torch.empty(M, N)
    if lib.optlm_linear_bf16(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), M, N, K, torch.get_num_threads()) != 0:
        raise MemoryError(f"no memory for the split copy of a ({M}, {K}) input")
    return y


def linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None = None, *,
                check: bool = True) -> Tensor:
    """``x @ (weight * scales[:, None]).T + bias`` for int8 ``weight`` (N, K) and float32 ``scales`` (N,).

    Rows of ``x`` are quantized to int16 (one scale per row) inside the kernel, so products are exact
    integer dot products; the result differs from the float computation by about 1e-5 relative.
    """
    lib = _lib_or_raise()
    M, N, K = x.shape[0], weight.shape[0], x.shape[1]
    if check:
        _check(x, weight, bias, torch.int8)
        _check_float(scales, "scales", (N,))
    y = torch.empty(M, N)
    if lib.optlm_linear_i8(_ptr(x), _ptr(weight), _ptr(scales), _ptr(bias), _ptr(y), M, N, K,
                           torch.get_num_threads()) != 0:
        raise MemoryError(f"no memory for the int16 copy of a ({M}, {K}) input")
    return y


def pack_int4(q: Tensor) -> Tensor:
    """``q`` (N, K) integers in [0, 15], K even -> (N, K / 2) uint8, byte j = q[2j] | q[2j + 1] << 4."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (N, K / 2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def linear_int4(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor, group_size: int,
                bias: Tensor | None = None, *, check: bool = True) -> Tensor:
    """``x @ w.T + bias`` for int4 ``w = q * scales + mins`` per group of ``group_size`` inputs: ``packed``
    (N, K / 2) from :func:`pack_int4`, ``scales`` and ``mins`` float32 (N, K / group_size). Rows of ``x``
    are quantized to int16 as in :func:`linear_int8`; ``group_size`` must be a multiple of 32 dividing K."""
    lib = _lib_or_raise()
    M, N, K = x.shape[0], packed.shape[0], x.shape[-1]
    if check:
        if group_size <= 0 or group_size % 32 or K % group_size:
            raise ValueError(f"group_size must be a multiple of 32 dividing K={K}, got {group_size}")
        _check(x, packed, bias, torch.uint8, w_cols=K // 2)
        _check_float(scales, "scales", (N, K // group_size))
        _check_float(mins, "mins", (N, K // group_size))
    y = torch.empty(M, N)
    rc = lib.optlm_linear_i4(_ptr(x), _ptr(packed), _ptr(scales), _ptr(mins), _ptr(bias), _ptr(y), M, N, K,
                             group_size, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"no memory for the int16 copies of a ({M}, {K}) input")
    return y


def paged_decode_attention(q: Tensor, k: Tensor, v: Tensor, slots: Tensor, lengths: Tensor, *,
                           check: bool = True) -> Tensor:
    """Attention of one query per sequence over its cached keys/values, read in place from a paged cache.

    ``q`` (B, H, D) float32 (already scaled as the model wants); ``k``, ``v`` (slots, H, D) float32, one layer
    of the cache; ``slots`` (B, S) int64, sequence b's s-th token's slot (s < ``lengths[b]``; the rest is
    ignored); ``lengths`` (B,) int64, each at least 1. Returns (B, H, D) float32. ``check=False`` skips
    validating the arguments (a caller that builds them itself, once per layer per step).
    """
    lib = _lib_or_raise()
    B, H, D = q.shape
    S = slots.shape[1]
    if check:
        _check_paged(q, k, v, slots, lengths)
    threads = torch.get_num_threads()
    scores = torch.empty(B, H, S)
    lib.optlm_paged_qk(_ptr(q), _ptr(k), _ptr(slots), _ptr(lengths), _ptr(scores), B, H, D, S, threads)
    if int(lengths.min()) < S:  # mask the slots past each shorter sequence's end
        past_end = torch.arange(S) >= lengths[:, None]  # (B, S)
        scores.masked_fill_(past_end[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.empty(B, H, D)
    lib.optlm_paged_pv(_ptr(probs), _ptr(v), _ptr(slots), _ptr(lengths), _ptr(out), B, H, D, S, threads)
    return out


def _check_paged(q: Tensor, k: Tensor, v: Tensor, slots: Tensor, lengths: Tensor) -> None:
    B, H, D = q.shape
    S = slots.shape[1]
    for t in (q, k, v, slots, lengths):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("paged attention inputs must be contiguous CPU tensors")
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError("paged attention runs on float32 queries, keys and values")
    if k.shape[1:] != (H, D) or v.shape != k.shape or slots.dtype != torch.int64 or lengths.shape != (B,):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"slots {tuple(slots.shape)}, lengths {tuple(lengths.shape)}")
    if lengths.dtype != torch.int64 or int(lengths.min()) < 1 or int(lengths.max()) > S:
        raise ValueError(f"lengths must be int64 and lie in [1, {S}]")
    if int(slots.min()) < 0 or int(slots.max()) >= k.shape[0]:
        raise ValueError(f"slots must lie in [0, {k.shape[0]})")


__all__ = ["LinearSpec", "library", "available", "enabled", "unavailable_reason", "cache_dir", "rowwise", "linear_f32",
           "linear_bf16",
           "linear_int8", "linear_int4", "pack_int4", "unpack_int4", "paged_decode_attention"]
