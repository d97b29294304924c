"""Inference speed-ups that leave results unchanged (up to float rounding): fused q/k/v projections, CPU
linear layers routed to the fastest kernel for their dtype and row count, one-call decode steps
(``optlm.decode_step``), thread settings.

Each is a transformation of a built model (or of the process), so the plain path stays the reference;
``optimize(model)`` applies them all and costs little start-up time (the weights are copied once, into huge
pages). ``from_pretrained`` applies :func:`for_inference` by default; ``fast=False`` or ``OPTLM_FAST=0`` opt out.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import kernels


class FusedQKV:
    """One ``(3C, C)`` projection standing in for ``q_proj``, ``k_proj`` and ``v_proj``.

    The three modules' weights are row views of the fused weight, so nothing is stored twice and in-place
    updates (``load_state_dict``, merging a LoRA) reach both. If any of the three is replaced (the model is
    cast with ``.to(dtype)``), :meth:`matches` turns false and the attention goes back to three matmuls; a
    projection an adapter wraps still matches (through its ``base_layer``) and adds its ``delta``.
    """

    def __init__(self, linear: nn.Module, attn: nn.Module):
        self.linear = linear
        self._key = self._identity(attn)

    def matches(self, attn: nn.Module) -> bool:
        return self._identity(attn) == self._key

    def _identity(self, attn: nn.Module) -> tuple:
        # The same three modules, each weight still a view of the fused one at the same place. Where that
        # storage lives may change (optlm.huge_pages moves it, views and all) without breaking the fusion.
        # An adapter's wrapper keeps the projection as ``base_layer`` (peft's convention): the base still matches.
        mods = [getattr(m, "base_layer", m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        fused = self.linear.weight
        shared = all(m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for m in mods)
        return (shared, *(id(m) for m in mods), *(m.weight.storage_offset() - fused.storage_offset() for m in mods))

    def __call__(self, x: Tensor, attn: nn.Module) -> Tensor:
        y = self.linear(x)  # (B, T, 3C)
        # A projection wrapped by an adapter (optlm.adapters) adds its share to the fused base output.
        extras = [getattr(m, "delta", None) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        if any(extras):
            parts = list(y.split(y.shape[-1] // 3, dim=-1))
            for i, extra in enumerate(extras):
                d = None if extra is None else extra(x)
                if d is not None:
                    parts[i] = parts[i] + d.to(y.dtype)
            y = torch.cat(parts, dim=-1)
        return y


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


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention layers of any model family: modules that declare the slots these speed-ups use
    (``q_proj``, ``k_proj``, ``v_proj``, ``fused_qkv``, ``upcast_attention``; see ``optlm.model``)."""
    return [m for m in model.modules() if hasattr(m, "fused_qkv") and hasattr(m, "upcast_attention")]


@torch.no_grad()
def fuse_qkv(model: nn.Module) -> nn.Module:
    """Give every attention layer a single q/k/v matmul (in place; returns the model).

    Works on float and quantized projections (all three of one kind). Call it before building an optimizer:
    the q/k/v parameters become new (view) tensors. Gradient-enabled forwards keep using three matmuls.
    A model that streams its layers (optlm.parallel.offload) is left as it is: its weights are read per pass.
    """
    if getattr(model, "offload", None) is not None:
        return model
    for attn in attention_modules(model):
        if attn.fused_qkv is not None and attn.fused_qkv.matches(attn):
            continue
        mods = [getattr(m, "base_layer", m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
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


class CPULinear(nn.Linear):
    """An inference ``nn.Linear`` on the CPU, routed by dtype and row count to the fastest kernel measured.

    * Few rows (decoding: one per sequence) are bound by reading the weight once. optlm's AVX2 kernels
      (:mod:`optlm.kernels`) read fp32 weights ~1.2x faster than oneDNN and bf16 weights ~1.5x faster than
      PyTorch's bf16 path on a 2-core AVX2 machine (``benchmarks/kernels.py``); they take up to
      ``KERNEL_MAX_ROWS`` rows, where oneDNN / the fp32 upcast catch up.
    * More rows of fp32 go to oneDNN's inner product, which splits the work across cores better than the
      default BLAS call for these shapes.
    * More rows of bf16/fp16 on a CPU without native half-precision matmul (no AVX-512 BF16/AMX), where
      PyTorch's half GEMM is a slow fallback (7x slower than fp32 for a 128-token prefill), run in fp32 and
      round back, as the half-precision GEMM would have accumulated in fp32 anyway.

    Training (grad enabled) and any other case take ``nn.Linear``'s own path. Parameters, names and the
    module's place in the tree stay those of the ``nn.Linear`` it was.
    """

    KERNEL_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 16}  # crossovers measured by benchmarks/kernels.py

    def kernel_spec(self) -> kernels.LinearSpec | None:
        """This layer for optlm's kernels (``optlm.decode_step``); None for a dtype they do not take."""
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(self.weight.dtype)
        return None if kind is None else kernels.LinearSpec(kind, self.weight.detach(), bias=self.bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.dtype != w.dtype or not x.is_cpu:
            return super().forward(x)
        rows = x.numel() // self.in_features
        if rows <= self.KERNEL_MAX_ROWS.get(w.dtype, 0) and kernels.enabled() and w.is_contiguous():
            bias = None if self.bias is None else self.bias.float()
            fn = kernels.linear_f32 if w.dtype == torch.float32 else kernels.linear_bf16
            # check=False: rowwise hands over contiguous float32 rows; w's dtype and layout are checked above
            return kernels.rowwise(x, self.out_features, lambda x2: fn(x2, w, bias, check=False))
        if w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        if w.dtype in (torch.bfloat16, torch.float16) and not _native_half_matmul():
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(x.float(), w.float(), bias).to(x.dtype)
        return super().forward(x)


def _native_half_matmul() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_linears(model: nn.Module) -> nn.Module:
    """Make the CPU ``nn.Linear`` layers of ``model`` (in place) :class:`CPULinear`, which routes each call
    to the fastest kernel for its dtype and row count. Only the class changes; the parameters stay."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for attn in attention_modules(model):
        if attn.fused_qkv is not None:
            linears.append(attn.fused_qkv.linear)
    for m in linears:
        if type(m) is nn.Linear and m.weight.device.type == "cpu":
            m.__class__ = CPULinear
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


def upcast_half_attention(model: nn.Module) -> nn.Module:
    """On a CPU without native half-precision matmul, make bf16/fp16 attention compute in fp32 (in place).

    PyTorch's CPU attention kernel accumulates half-precision inputs in fp32 anyway, but on such CPUs its
    half-precision products are slow fallbacks: one decode step's attention took ~4x longer in bf16 than in
    fp32 on an AVX2 machine. The cost is converting q, k, v up and the result back."""
    if _native_half_matmul():
        return model
    for attn in attention_modules(model):
        attn.upcast_attention = any(p.device.type == "cpu" for p in attn.parameters())
    return model


def on_by_default() -> bool:
    """Whether loading applies the speed-ups (:func:`for_inference`, :func:`optimize`): yes unless the
    environment sets ``OPTLM_FAST=0`` (for every load in the process: ``from_pretrained``, ``optlm.load``,
    ``LLM``, the CLI); ``fast=False`` does the same for one load."""
    return os.environ.get("OPTLM_FAST", "1") != "0"


def for_inference(model: nn.Module) -> nn.Module:
    """What ``from_pretrained`` applies by default, in place: the speed-ups that replace no parameter, so a model
    loaded this way trains, saves and takes adapters as before. CPU linears routed to the faster kernels
    (:func:`cpu_linears`), half-precision attention in fp32 where that is faster (:func:`upcast_half_attention`),
    and a causal LM's one-token steps run by one C call where the model and its cache allow it
    (:mod:`optlm.decode_step`; its install also moves the weights into huge pages, :mod:`optlm.huge_pages`)."""
    cpu_linears(model)
    upcast_half_attention(model)
    if hasattr(model, "step") and hasattr(model, "lm_head"):
        from .decode_step import install

        install(model)
    return model


def optimize(model: nn.Module) -> nn.Module:
    """Every speed-up that costs no start-up time, in place: fused q/k/v (:func:`fuse_qkv`, which makes the q/k/v
    parameters views of one weight: call it before building an optimizer), :func:`for_inference`, eval mode."""
    fuse_qkv(model)
    for_inference(model)
    return model.eval()
