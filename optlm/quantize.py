"""Quantization as a transformation of a built model: ``quantize(model, "int8" | "int4" | "int8-dynamic")``.

Why weight-only: OPT grows activation outliers (a few hidden channels 20-100x larger than the rest) from
~6.7b up, which is what breaks naive int8 activation quantization (Dettmers et al. 2022, "LLM.int8()";
Xiao et al. 2023, "SmoothQuant"). Leaving activations in floating point sidesteps them at every size with no
calibration data, and batch-1 decoding is bound by reading weights, which is what quantizing weights buys.

* ``int8`` (the default choice): symmetric, one scale per output channel (per row of the weight).
  On x86 CPUs with AVX2 optlm's own kernel (:mod:`optlm.kernels`) multiplies the int8 weights by rows of
  activations quantized to int16 (one scale per row, ~15 bits kept: finer than bf16) with exact integer
  sums; elsewhere PyTorch's ``_weight_int8pack_mm``, activations entering it as bf16. Calls of 4+ rows
  (prompts, batches) run the same sums on AMX tiles where the CPU has them (``optlm.kernels.amx_int8``),
  several times faster than fp32 with the same results as the one-row loop.
* ``int8-dynamic``: the int8 weights above, with activations quantized on the fly to 7 bits (one scale
  per matmul) so fbgemm's int8 GEMM does the arithmetic, as CTranslate2's int8 does. It pays for the
  activation-outlier sensitivity above (fine for opt-125m/350m, measured in benchmarks/quality.py; not
  advised from ~6.7b up). Measured on an AVX2 machine: about 2x ``int8``'s prefill and batch-8 speed,
  but slower batch-1 decoding than ``int8`` with optlm's kernel.
* ``int4``: asymmetric, one scale and zero point per ``group_size`` inputs of each output channel,
  optlm's AVX2 kernel (int16 activations, exact integer sums per group) where it builds, else PyTorch's
  ``_weight_int4pack_mm_for_cpu``; the LM head stays int8 (the logits are the most
  sensitive matmul, and the int8 head doubles as the embedding table, see below).

The tied token embedding / LM head (50272 x d) is the largest single matrix and is read in full for every
generated token, so it is quantized too (int8, per vocabulary row). When the two are tied, the embedding
lookup reads the same int8 rows and scales, so the float table is dropped and the model shrinks ~4x.
Module names stay (``layers.N.self_attn.q_proj`` …), so code that finds modules by name still finds them.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from . import kernels
from .fast import fuse_qkv

MODES = ("int8", "int4", "int8-dynamic")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # The CPU kernels accumulate in fp32 either way; their fp32-input paths are scalar loops on CPUs without
    # AVX-512 (10-50x slower), so activations enter them as bf16, which is also what they were written for.
    return torch.bfloat16 if x.device.type == "cpu" else x.dtype


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and one fp scale per output channel: y = x @ (q * s).T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._scales_c: Tensor | None = None  # scales in the kernel's activation dtype, made on first use
        self._packed = None  # fbgemm's packed weight when the dynamic-activation kernel is in use

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        q, scales = quantize_int8_rows(w)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        new.weight, new.scales = q, scales.to(w.dtype)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def dequantize(self) -> Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    @classmethod
    def stack_rows(cls, mods: list[Int8Linear]) -> Int8Linear:
        """One layer computing all of ``mods`` (same input); their buffers become row views of its own."""
        first = mods[0]
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None,
                    first.scales.dtype, first.weight.device)
        fused.weight = torch.cat([m.weight for m in mods])
        fused.scales = torch.cat([m.scales for m in mods])
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        start = 0
        for m in mods:
            rows = slice(start, start + m.out_features)
            m.weight, m.scales = fused.weight[rows], fused.scales[rows]
            if m.bias is not None:
                m.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=False)
            start += m.out_features
        return fused

    def kernel_spec(self) -> kernels.LinearSpec | None:
        """This layer for optlm's kernels (``optlm.decode_step``); None while it runs fbgemm's int8-dynamic path."""
        if self._packed is not None:
            return None
        return kernels.LinearSpec("int8", self.weight, scales=self.scales, bias=self.bias)

    def use_dynamic_activations(self) -> None:
        """Compute with activations quantized on the fly (8-bit per tensor; fbgemm's AVX2/AVX-512 int8 GEMM).

        Several times faster than the weight-only kernel on CPUs without AVX-512, but activation outliers
        then cost precision (see the module docstring); the stored int8 weight and scales are unchanged.
        """
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ValueError("int8-dynamic needs PyTorch's fbgemm backend (x86 builds); use quantize='int8' here")
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are only the carrier for fbgemm's weight packing
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.scales.double(), zeros, 0)
        bias = None if self.bias is None else self.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _frozen_forward(self, x)
        return self._forward(x, self.bias)

    def _forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self._packed is not None:
            # reduce_range=True: 7-bit activations, so fbgemm's u8 x s8 pair sums cannot saturate int16.
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # the packed bias is already added
            return y if bias is not None or self.bias is None else y - self.bias.to(y.dtype)
        w = self.weight
        if x.is_cpu and kernels.enabled() and w.is_contiguous():
            # optlm's AVX2 kernel: int8 weights times int16-quantized rows of x (~1e-5 relative), fp32 sums.
            s = self._scales_c
            if s is None or s.dtype != torch.float32:
                s = self._scales_c = self.scales.float().contiguous()
            b = None if bias is None else bias.float()
            return kernels.rowwise(x, self.out_features, lambda x2: kernels.linear_int8(x2, w, s, b, check=False))
        cdt = _compute_dtype(x)
        if self._scales_c is None or self._scales_c.dtype != cdt or self._scales_c.device != x.device:
            self._scales_c = self.scales.to(cdt)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(cdt), w, self._scales_c)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with a 4-bit weight; each run of ``group_size`` inputs of an output channel has its own
    scale and zero point: w = q * scale + min, q in [0, 15]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide in_features {in_features}; "
                             f"pick one of {INT4_GROUP_SIZES} that does")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Two 4-bit values per byte, (N, K / 2) uint8, in the layout of the kernel that will run it: "optlm"
        # (optlm.kernels.pack_int4, for optlm's AVX2 kernel) or "torch" (PyTorch's _weight_int4pack_mm_for_cpu).
        self.packing = "torch"
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (K / group_size, N, 2): scale and zero (= min + 8 * scale, the kernel's convention) per group.
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._sz_c: Tensor | None = None
        self._codes: Tensor | None = None  # unpacked codes, made by dequantize() for training adapters above
        self._groups: tuple | None = None  # (scales_and_zeros it came from, scales (N, G), mins (N, G)) in fp32

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.dtype, w.device)
        q, scales, mins = quantize_int4_groups(w, group_size)
        new.set_codes(q)
        new.scales_and_zeros = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous().to(w.dtype)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def set_codes(self, q: Tensor) -> None:
        """Store the 4-bit codes ``q`` (N, K) in the packing of the kernel that will run on this machine."""
        if q.device.type == "cpu" and kernels.enabled():
            self.weight, self.packing = kernels.pack_int4(q), "optlm"
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self.weight, self.packing = packed, "torch"

    @torch.no_grad()
    def codes(self, rows: int = 256) -> Tensor:
        """The 4-bit codes q (N, K) uint8, read back through this layer's own kernel, so any packing works:
        with scale 1 and min 0 per group the layer computes x @ q.T, and identity rows of x return q exactly."""
        K, N, gs = self.in_features, self.out_features, self.group_size
        G = K // gs
        out = torch.empty(N, K, dtype=torch.uint8)
        for start in range(0, K, rows):
            r = min(rows, K - start)
            eye = torch.zeros(r, K)  # rows start … start + r - 1 of the identity
            eye[torch.arange(r), torch.arange(start, start + r)] = 1.0
            if self.packing == "optlm":
                y = kernels.linear_int4(eye, self.weight, torch.ones(N, G), torch.zeros(N, G), gs, check=False)
            else:
                unit = torch.stack([torch.ones(G, N), torch.full((G, N), 8.0)], dim=-1).to(torch.bfloat16)
                y = torch._weight_int4pack_mm_for_cpu(eye.to(torch.bfloat16), self.weight, gs, unit).float()
            out[:, start:start + rows] = y.T.round().to(torch.uint8)  # (N, r)
        return out

    @classmethod
    def stack_rows(cls, mods: list[Int4Linear]) -> Int4Linear | None:
        """One layer computing all of ``mods`` (same input, same group size); their packed weights become
        row views of its own. None when the group sizes differ."""
        first = mods[0]
        if len({(m.group_size, m.packing) for m in mods}) != 1:
            return None
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None,
                    first.group_size, first.scales_and_zeros.dtype, first.weight.device)
        fused.packing = first.packing
        # Both packings are row by row, so stacking packed rows equals packing the stacked rows.
        fused.weight = torch.cat([m.weight for m in mods])
        fused.scales_and_zeros = torch.cat([m.scales_and_zeros for m in mods], dim=1)  # (groups, N, 2)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        start = 0
        for m in mods:
            rows = slice(start, start + m.out_features)
            m.weight = fused.weight[rows]
            if m.bias is not None:
                m.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=False)
            start += m.out_features
        return fused

    def dequantize(self) -> Tensor:
        """The float weight ``(N, K)`` (for the backward pass through a frozen layer). The 4-bit codes are read
        back once and kept unpacked (one byte per weight) while the layer trains adapters above it."""
        if self._codes is None:
            self._codes = self.codes()
        sz = self.scales_and_zeros.float()  # (G, N, 2)
        scales = sz[..., 0].T.repeat_interleave(self.group_size, dim=1)  # (N, K)
        mins = (sz[..., 1] - 8 * sz[..., 0]).T.repeat_interleave(self.group_size, dim=1)  # (N, K)
        return self._codes.float() * scales + mins

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _frozen_forward(self, x)
        return self._forward(x, self.bias)

    def _scales_mins(self) -> tuple[Tensor, Tensor]:
        """float32 scales and mins (N, K / group_size) for optlm's kernel, made from scales_and_zeros once."""
        sz = self.scales_and_zeros
        if self._groups is None or self._groups[0] is not sz:
            scales = sz[..., 0].float()
            self._groups = (sz, scales.T.contiguous(), (sz[..., 1].float() - 8 * scales).T.contiguous())
        return self._groups[1], self._groups[2]

    def kernel_spec(self) -> kernels.LinearSpec | None:
        """This layer for optlm's kernels (``optlm.decode_step``); None in PyTorch's packing."""
        if self.packing != "optlm":
            return None
        scales, mins = self._scales_mins()
        return kernels.LinearSpec("int4", self.weight, scales=scales, mins=mins, bias=self.bias,
                                  group=self.group_size)

    def _forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.packing == "optlm":
            # optlm's AVX2 kernel: exact integer sums of q times int16-quantized x per group, then scale and min.
            scales, mins = self._scales_mins()
            w, gs, b = self.weight, self.group_size, None if bias is None else bias.float()
            return kernels.rowwise(x, self.out_features,
                                   lambda x2: kernels.linear_int4(x2, w, scales, mins, gs, b, check=False))
        cdt = _compute_dtype(x)
        if self._sz_c is None or self._sz_c.dtype != cdt or self._sz_c.device != x.device:
            self._sz_c = self.scales_and_zeros.to(cdt)
        x2 = x.reshape(-1, self.in_features).to(cdt)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self._sz_c)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, packing={self.packing}")


class _FrozenMatmul(torch.autograd.Function):
    """x @ W.T through a quantized layer's kernel; the backward gives x its gradient dy @ W with W dequantized
    for that moment only. The quantized weight itself never trains (QLoRA: adapters above it do)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        ctx.layer = layer
        return layer._forward(x.detach(), None)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        w = ctx.layer.dequantize()  # (N, K)
        dx = dy.reshape(-1, w.shape[0]).to(w.dtype) @ w  # (rows, K)
        return dx.view(*dy.shape[:-1], w.shape[1]).to(dy.dtype), None


def _frozen_forward(layer: nn.Module, x: Tensor) -> Tensor:
    y = _FrozenMatmul.apply(x, layer)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)  # a trainable bias (bias="all") gets its grad


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table with one scale per row; shares the tied LM head's storage."""

    def __init__(self, head: Int8Linear, padding_idx: int | None):
        super().__init__()
        self.head = [head]  # a list, so the head is not registered (and saved) twice
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> Tensor:
        """The dequantized table (for inspection; lookups never build it)."""
        return self.head[0].dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        head = self.head[0]
        rows = head.weight[ids].to(head.scales.dtype)  # (..., d)
        return rows * head.scales[ids].unsqueeze(-1)


def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: returns q (int8, same shape) and scales (rows,), w ≈ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)  # all-zero rows (the padding embedding) stay zero
    q = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # in place: one float temporary
    return q, scales


def quantize_int4_groups(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit per group: q (int32 in [0, 15], (N, K)), scales and mins (N, K / group_size)."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)  # (N, groups, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = (g - lo[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).to(torch.int32)
    return q.reshape(N, K), scales, lo


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8", group_size: int = 64, lm_head: bool = True,
             keep: tuple[str, ...] = ()) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by weight-only int8 or int4 ones, in place; returns the model.

    The q/k/v projections of each layer are also fused into one matmul (``optlm.fast.fuse_qkv``).

    ``lm_head=False`` keeps the (tied) LM head and embedding in floating point; ``keep`` names other linear
    modules to leave in floating point (e.g. ``("score",)``: a task head an adapter run trains whole). The
    model is switched to eval mode: quantized weights are frozen (fine-tune first, or train adapters on top).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if any(hasattr(m, "base_layer") or hasattr(m, "per_adapter") for m in model.modules()):
        raise ValueError("this model has adapters; quantize the base model first, then add adapters (or merge "
                         "a LoRA with merge_and_unload() and quantize the merged model)")
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise ValueError("this model is already quantized; load it again in floating point to quantize differently")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize() uses PyTorch's CPU int8/int4 kernels; quantize a model on the CPU "
                         "(device='cpu'), or use bf16 on a GPU")
    model.eval()
    _swap_modules(model, mode, group_size, lm_head, lambda kind, linear: kind.from_float(linear)
                  if kind is Int8Linear else kind.from_float(linear, group_size), keep)
    # Own copies of the float tensors left (norms, biases, positions): a loaded model's tensors share the
    # checkpoint's memory map, which would otherwise keep every fp32 weight resident.
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.clone()
    _finish(model, mode)
    if hasattr(model, "config"):
        model.config.extra["quantization_config"] = {"quant_method": QUANT_METHOD, "mode": mode,
                                                     "group_size": group_size, "lm_head": lm_head,
                                                     **({"keep": list(keep)} if keep else {})}
    return model


def _swap_modules(model: nn.Module, mode: str, group_size: int, lm_head: bool, make,
                  keep: tuple[str, ...] = ()) -> None:
    """Replace each ``nn.Linear`` (but those named in ``keep``) by ``make(Int8Linear | Int4Linear, linear)``;
    the (tied) head and embedding become an int8 head and an embedding that reads its rows."""
    # The head and embedding are found through transformers' accessors, so any model family that has them works.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and emb is not None and head.weight is emb.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head or name in keep:
                continue
            int4 = mode == "int4" and child.in_features % group_size == 0
            setattr(parent, name, make(Int4Linear if int4 else Int8Linear, child))
    if head is not None and lm_head:
        qhead = make(Int8Linear, head)
        model.set_output_embeddings(qhead)
        if tied:
            model.set_input_embeddings(Int8Embedding(qhead, emb.padding_idx))


def _finish(model: nn.Module, mode: str) -> None:
    fuse_qkv(model)
    if mode == "int8-dynamic":
        fused = [a for a in model.modules() if getattr(a, "fused_qkv", None) is not None]
        standing_in = {id(p) for a in fused for p in (a.q_proj, a.k_proj, a.v_proj)}  # never called while fused
        for m in [a.fused_qkv.linear for a in fused] + list(model.modules()):
            if isinstance(m, Int8Linear) and id(m) not in standing_in:
                m.use_dynamic_activations()


# ---- saving and loading quantized models ------------------------------------------------------------------
# A quantized model saves its integer weights as they are, with ``quantization_config`` in config.json naming
# optlm as the method, so optlm loads it back bit for bit. int4 codes are stored in one portable packing (two
# codes per byte, the even input in the low nibble) whatever packing the machine that saved it used.
# transformers refuses such a checkpoint: it does not know the quantization method "optlm" (tested).

QUANT_METHOD = "optlm"


def quantization_config(config) -> dict | None:
    """The checkpoint's optlm quantization record, checked; None for a floating-point checkpoint."""
    qc = getattr(config, "extra", {}).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("mode") not in MODES:
        raise ValueError(f"config.json has a quantization_config optlm cannot load ({qc!r}); optlm reads its own "
                         f"quantized checkpoints (quant_method {QUANT_METHOD!r}, mode one of {', '.join(MODES)})")
    return qc


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict to save: int4 weights moved to the portable packing."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            state[f"{name}.weight"] = kernels.pack_int4(m.codes())
    return state


def prepare_quantized(model: nn.Module, qc: dict) -> None:
    """Give a model built on the meta device the quantized modules a checkpoint with ``qc`` holds."""
    def empty(kind, linear):
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        if kind is Int4Linear:
            return kind(*args, group_size=qc["group_size"], dtype=linear.weight.dtype, device="meta")
        return kind(*args, dtype=linear.weight.dtype, device="meta")

    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head becomes one int8 matrix the embedding reads, as in quantize()
    _swap_modules(model, qc["mode"], qc["group_size"], qc["lm_head"], empty, tuple(qc.get("keep", ())))


def finish_quantized(model: nn.Module, state: dict[str, Tensor], qc: dict) -> None:
    """After the saved tensors are assigned: int4 codes into this machine's packing, fusion, dynamic mode."""
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            m.set_codes(kernels.unpack_int4(state[f"{name}.weight"]))
        elif isinstance(m, Int8Linear):
            # Tensors memory-mapped from a safetensors file start wherever the file put them; PyTorch's int8
            # matmul reads its weight with aligned vector loads on AVX-512 CPUs and crashes on such a pointer.
            # A copy lands on the allocator's 64-byte alignment.
            for key in ("weight", "scales"):
                t = getattr(m, key)
                if t.device.type == "cpu" and t.data_ptr() % 64:
                    setattr(m, key, t.clone())
    _finish(model, qc["mode"])
