"""Inference speed-ups that leave results unchanged: fused q/k/v projections, half-precision GEMMs routed
to fp32 where the CPU has no native ones, thread settings.

Each is a transformation of a built model (or of the process), so the plain path stays the reference;
``optimize(model)`` applies them all and costs no start-up time.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .model import OPTAttention


class FusedQKV:
    """One ``(3C, C)`` projection standing in for ``q_proj``, ``k_proj`` and ``v_proj``.

    The three modules' weights are row views of the fused weight, so nothing is stored twice and in-place
    updates (``load_state_dict``) reach both. If any of the three is replaced (an adapter wraps it, the model
    is cast with ``.to(dtype)``), :meth:`matches` turns false and the attention goes back to three matmuls.
    """

    def __init__(self, linear: nn.Module, attn: OPTAttention):
        self.linear = linear
        self._key = _identity(attn)

    def matches(self, attn: OPTAttention) -> bool:
        return _identity(attn) == self._key

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear(x)  # (B, T, 3C)


def _identity(attn: OPTAttention) -> tuple:
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    return tuple(id(m) for m in mods) + tuple(m.weight.data_ptr() for m in mods)


def _fuse_float(mods: list[nn.Linear]) -> nn.Linear:
    C = mods[0].in_features
    has_bias = mods[0].bias is not None
    w = torch.cat([m.weight.detach() for m in mods])  # (3C, C)
    b = torch.cat([m.bias.detach() for m in mods]) if has_bias else None
    with torch.device("meta"):
        fused = nn.Linear(C, w.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(b, requires_grad=False)
    n = mods[0].out_features
    for i, m in enumerate(mods):
        rows = slice(i * n, (i + 1) * n)
        m.weight = nn.Parameter(w[rows], requires_grad=m.weight.requires_grad)
        if has_bias:
            m.bias = nn.Parameter(b[rows], requires_grad=m.bias.requires_grad)
    return fused


@torch.no_grad()
def fuse_qkv(model: nn.Module) -> nn.Module:
    """Give every attention layer a single q/k/v matmul (in place; returns the model).

    Works on float and quantized projections (all three of one kind). Call it before building an optimizer:
    the q/k/v parameters become new (view) tensors. Gradient-enabled forwards keep using three matmuls.
    """
    for attn in model.modules():
        if not isinstance(attn, OPTAttention) or (attn.fused_qkv is not None and attn.fused_qkv.matches(attn)):
            continue
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        kinds = {type(m) for m in mods}
        if len(kinds) != 1:
            continue
        kind = kinds.pop()
        if issubclass(kind, nn.Linear) and len({(m.weight.dtype, m.weight.device) for m in mods}) == 1:
            attn.fused_qkv = FusedQKV(_fuse_float(mods), attn)
        elif hasattr(kind, "stack_rows"):  # quantized linears (optlm.quantize) know how to stack themselves
            fused = kind.stack_rows(mods)
            if fused is not None:
                attn.fused_qkv = FusedQKV(fused, attn)
    return model


class UpcastLinear(nn.Linear):
    """A bf16/fp16 ``nn.Linear`` for CPUs without native half-precision matmul (no AVX-512 BF16/AMX).

    There PyTorch's half-precision GEMM is a slow fallback (7x slower than fp32 for a 128-token prefill on an
    AVX2 core), while a few-row product (decoding) is bound by reading the weight, where half precision wins.
    So products over more than ``MAX_NATIVE_ROWS`` rows run in fp32 and round back; the parameters, their
    names and the module's place in the tree stay those of the ``nn.Linear`` it was.
    """

    MAX_NATIVE_ROWS = 4  # measured crossover on an AVX2 core: native wins at 1-4 rows, fp32 from ~6 on

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= self.MAX_NATIVE_ROWS * self.in_features:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class OneDNNLinear(nn.Linear):
    """An fp32 CPU ``nn.Linear`` computed by oneDNN's inner product instead of the default BLAS call.

    For decoding (one row per sequence) PyTorch's BLAS path runs a matrix-vector product on one core at
    ~10 GB/s; oneDNN splits it across cores and reads weights at ~20 GB/s (2 AVX2 cores), so batch-1 decode
    nearly doubles; for a 128-row prefill both take the same time. Parameters and names are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _native_half_matmul() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_linears(model: nn.Module) -> nn.Module:
    """Route the CPU ``nn.Linear`` layers of ``model`` (in place) to the faster kernels: fp32 ones to
    :class:`OneDNNLinear`, half-precision ones to :class:`UpcastLinear` where the CPU lacks native
    half-precision matmul. Only the class changes; the parameters stay where they are."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for attn in model.modules():
        if isinstance(attn, OPTAttention) and attn.fused_qkv is not None:
            linears.append(attn.fused_qkv.linear)
    onednn = torch.backends.mkldnn.is_available()
    for m in linears:
        if type(m) is not nn.Linear or m.weight.device.type != "cpu":
            continue
        if m.weight.dtype == torch.float32 and onednn:
            m.__class__ = OneDNNLinear
        elif m.weight.dtype in (torch.bfloat16, torch.float16) and not _native_half_matmul():
            m.__class__ = UpcastLinear
    return model


def physical_cores() -> int:
    """CPU cores this process may run on, counting SMT siblings once (they share one core's FMA units)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in allowed:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path, encoding="ascii") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads for CPU kernels (default: one per physical core available); returns the count."""
    n = physical_cores() if n is None else n
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def optimize(model: nn.Module) -> nn.Module:
    """The speed-ups that cost no start-up time, in place: fused q/k/v (inference), CPU linears routed to
    the faster kernels (:func:`cpu_linears`), and eval mode."""
    fuse_qkv(model)
    cpu_linears(model)
    return model.eval()
