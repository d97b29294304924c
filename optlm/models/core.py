"""What every model family shares: the core protocol (:class:`Frame`) and multi-head self-attention.

The core protocol: ``decoder(ids, frame)``. A :class:`Frame` says where the new tokens sit (their positions) and
what they attend to; the default frame is the tokens themselves, causally. A cache hands the model a frame of
its own (``KVCache.frame``, ``PagedKVCache.frame``) whose ``update`` stores the new keys/values and returns all
the keys/values the pass may read. The model never imports a cache and never advances one: the caller does.

Slots: the keys of one pass are numbered ``0 … S-1`` in the order the caller laid the tokens out (left padding
included); the ``T`` new tokens are the last ``T`` slots. Local attention (GPT-Neo) counts its window in slots,
as transformers does; for left-padded rows that equals counting in positions, because padding only ever
precedes a row's real tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_positions

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function {name!r} is not supported; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def positions_from_mask(mask: Tensor) -> Tensor:
    """Token positions from a (B, S) 0/1 attention mask: counting only real tokens, so left padding does not
    shift positions; padded slots get -1."""
    mask = mask.long()
    return torch.cumsum(mask, dim=1) * mask - 1


def frame_for(ids: Tensor, frame: Frame | None, limit: int) -> Frame:
    """The frame a decoder runs ``ids`` ``(B, T)`` in: the one given, or the tokens alone, causally, without
    padding; every position in it must fit ``limit`` (max_position_embeddings; -1 is padding)."""
    if frame is None:
        frame = Frame.causal(*ids.shape, ids.device)
    check_positions(int(frame.positions.max()), int(frame.positions.min()), limit)
    return frame


class Frame:
    """One forward pass's view: where its ``T`` new tokens sit and which ``S`` keys each may attend to.

    ``positions`` ``(B, T)``: position of each new token (-1 for padding). ``allowed`` ``(B|1, 1, T, S)`` bool:
    query t may attend key s; None means plain causal attention over the new tokens (``T == S``) or, for one
    query per row (``T == 1``), all keys. ``valid`` ``(B, S)``: real keys, for flash-attention's variable-length
    path; None = all real. ``past``: slots before the new tokens (``S = past + T``). This base frame has no
    cache: the keys are the new tokens' own.

    ``adapter`` ``(B,)`` long or None: the adapter each row runs with, an index into the model's adapter table
    (``optlm.adapters.adapter_index``; -1 = none). The model does not read it: adapter layers do.
    """

    adapter: Tensor | None = None

    def __init__(self, positions: Tensor, allowed: Tensor | None = None, valid: Tensor | None = None,
                 past: int = 0):
        self.positions, self.allowed, self.valid, self.past = positions, allowed, valid, past

    @classmethod
    def causal(cls, B: int, T: int, device: torch.device, mask: Tensor | None = None, past: int = 0) -> Frame:
        """``T`` new tokens after ``past`` earlier ones; ``mask`` ``(B, past + T)`` marks real tokens (1) and
        left padding (0), or None for no padding. The one place positions and masks are derived from padding."""
        S = past + T
        if mask is not None and tuple(mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected ({B}, {S}) = "
                             f"(batch, cached tokens {past} + new tokens {T})")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding anywhere: take the unmasked fast path
        if mask is None:
            positions = torch.arange(past, S, device=device).expand(B, T)
            return cls(positions, causal_mask(T, S, device) if 1 < T < S else None, past=past)
        valid = mask.bool()
        return cls(positions_from_mask(mask)[:, past:], causal_mask(T, S, device, valid), valid, past)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer ``layer``'s new keys/values ``(B, nh, T, hs)``; return all it attends to ``(B, nh, S, hs)``."""
        return k, v

    def local(self, window: int) -> Tensor | None:
        """:attr:`allowed` for a local-attention layer, which sees only keys less than ``window`` slots back
        (its own slot included), over the keys :meth:`update` returns for such a layer."""
        T = self.positions.shape[1]
        S = self.past + T
        if S <= window:
            return self.allowed  # no key is far enough back to drop out of the window
        return causal_mask(T, S, self.positions.device, self.valid, window)

    def kv_layout(self) -> KVLayout | None:
        """Where a pass of one new token per row reads and writes every layer's keys/values in place, for a
        step that runs all layers in one call (``optlm.decode_step``); None: this frame cannot say (the base
        frame has no cache)."""
        return None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor | None:
        """A frame that computes attention its own way (a kernel reading a paged cache in place) stores the new
        keys/values and returns the output ``(B, nh, T, hs)``; None (the default) leaves it to the model, which
        then calls :meth:`update`. ``q`` is already scaled; ``window``: a local layer's window, or None."""
        return None


class KVLayout(NamedTuple):
    """A cache's keys/values as one float32 CPU buffer each: the key of layer ``l``, row ``b``, head ``h`` in
    slot ``slot`` is ``k.view(-1)[l * strides[0] + b * strides[1] + h * strides[2] + slot * strides[3]]``.
    Row ``b`` reads its keys ``0 … lengths[b] - 1`` (the new token's last, in the slot it is written to); key
    ``s`` lies in slot ``slots[b, s]``, or in slot ``s`` when ``slots`` is None."""

    k: Tensor
    v: Tensor
    strides: tuple[int, int, int, int]
    slots: Tensor | None  # (B, S) int64
    lengths: Tensor  # (B,) int64
    valid: Tensor | None  # (B, S) bool: real keys (False: left padding); None: all real


@dataclass
class LayerParts:
    """The modules of one decoder layer, for a step that runs them outside PyTorch (``optlm.decode_step``)."""

    attention: nn.Module  # SelfAttention
    norm1: nn.Module  # before attention (pre-LN) or after its residual sum (post-LN)
    norm2: nn.Module  # the same for the MLP
    fc1: nn.Module
    fc2: nn.Module


@dataclass
class DecoderParts:
    """What a family's decoder is made of, for ``optlm.decode_step``: a family offers it through
    ``decoder.parts()`` (a family without that method runs every step in PyTorch)."""

    embed: Callable[[Tensor, Tensor], Tensor]  # (ids (B, T), positions (B, T)) -> the first layer's input
    layers: list[LayerParts]
    pre_ln: bool
    activation: str  # a name in ACTIVATIONS
    eps: float
    final_norm: nn.Module | None
    project_out: nn.Module | None


def causal_mask(T: int, S: int, device: torch.device, valid: Tensor | None = None,
                window: int | None = None) -> Tensor:
    """Boolean (B|1, 1, T, S) mask: True where query t (slot S-T+t) may attend slot s: s <= S-T+t, and with a
    ``window`` also S-T+t - s < window.

    ``valid`` (B, S) marks real tokens. A padded query row ends up all False; attention then returns zeros
    for it (what torch's SDPA does, and so what the reference produces), never NaN.
    """
    q_slot = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (q_slot - k_slot < window)
    allowed = allowed[None]  # (1, T, S)
    if valid is not None:
        allowed = allowed & valid[:, None, :].bool()  # (B, T, S)
    return allowed[:, None]  # (B|1, 1, T, S)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a :class:`Frame`, with transformers' parameter names (``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``) so checkpoints and adapters address it as they do the reference.

    A family states its quirks as arguments: ``scaling`` multiplies q before the scores (OPT: 1/√head_dim;
    None: no scaling, GPT-Neo); ``window`` makes a local layer (None: global); ``fp32_scores`` computes q·k and
    the softmax in (at least) float32 whatever the model's dtype, as GPT-Neo's reference does (float64 included).
    """

    def __init__(self, hidden: int, heads: int, layer_idx: int, *, qkv_bias: bool, out_bias: bool,
                 scaling: float | None, window: int | None = None, dropout: float = 0.0, fp32_scores: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.layer_idx = layer_idx
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.scaling = scaling
        self.window = window
        self.dropout = dropout
        self.fp32_scores = fp32_scores
        self.attn_implementation = "sdpa"
        # Same construction order as both references (k, v, q, out), so seeded initialisation matches them.
        self.k_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.q_proj = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=out_bias)
        # Optional one-matmul q/k/v projection whose weight the three projections are row views of (set by
        # optlm.fast.fuse_qkv); used only for inference and only while it still matches the three modules.
        self.fused_qkv = None
        # Compute attention in fp32 for half-precision inputs (set by optlm.fast on CPUs whose half-precision
        # matmuls are slow fallbacks; the kernel accumulates in fp32 either way).
        self.upcast_attention = False

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        B, T, _ = x.shape
        C = self.num_heads * self.head_dim  # the model width, or this rank's share of the heads (optlm.parallel)
        fused = self.fused_qkv
        if fused is not None and not torch.is_grad_enabled() and fused.matches(self):
            q, k, v = fused(x, self).split(C, dim=-1)  # 3 x (B, T, C)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.scaling is not None:
            # OPT scales q before the matmul (not the scores), as fairseq did; this order matters in fp16.
            q = q * self.scaling
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        out_dtype = q.dtype
        y = None if self.training else frame.attend(self.layer_idx, q, k, v, self.window)
        if y is None:
            y = self._attention(q, k, v, frame)
        y = y.transpose(1, 2).reshape(B, T, C).to(out_dtype)  # (B, T, C)
        return self.out_proj(y)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, frame: Frame) -> Tensor:
        T = q.shape[2]
        k, v = frame.update(self.layer_idx, k, v)  # (B, nh, S, hs): cached keys (if any) and the new ones
        allowed = frame.allowed if self.window is None else frame.local(self.window)
        half = q.dtype in (torch.float16, torch.bfloat16)
        if self.upcast_attention and half:
            q, k, v = q.float(), k.float(), v.float()  # no-ops for a float32 cache (see optlm.generate.new_cache)
        p = self.dropout if self.training else 0.0
        impl = self.attn_implementation
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attn_implementation {impl!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        if impl == "flash_attention_2":
            return _flash_attention(q, k, v, frame.valid, p, self.window)
        if impl == "eager" or (self.fp32_scores and q.dtype != torch.float32):  # float32 q·k: SDPA's own math
            if allowed is None:
                allowed = causal_mask(T, k.shape[2], q.device)
            if self.fp32_scores:
                # GPT-Neo: q·k in float32; the reference then adds its mask in the model's dtype, so the softmax
                # runs in float32, or float64 for a float64 model.
                scores = (q.float() @ k.float().transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
            else:
                scores = q @ k.transpose(-1, -2)  # (B, nh, T, S)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            # Softmax in (at least) fp32 like the reference, so fp16/bf16 scores cannot overflow.
            w = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
            w = w.masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # fully padded query rows attend to nothing
            return F.dropout(w, p=p, training=self.training) @ v  # (B, nh, T, hs)
        # allowed is None only when there is no padding and either T == S (plain causal attention) or T == 1
        # (one decode query per sequence attending to its whole past).
        causal = allowed is None and T > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=causal, scale=1.0)


def kv_heads(model: nn.Module) -> int:
    """Attention heads whose keys/values this process caches: the model's, or its rank's share under tensor
    parallelism (``optlm.parallel``)."""
    return next(m.num_heads for m in model.modules() if isinstance(m, SelfAttention))


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Make every attention layer of ``model`` compute with ``name`` (one of :data:`ATTN_IMPLEMENTATIONS`)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS}")
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.attn_implementation = name


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, dropout: float,
                     window: int | None) -> Tensor:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash_attn package (pip install flash-attn) "
            "and a CUDA GPU; use 'sdpa' (the default) otherwise"
        ) from e
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("flash_attention_2 runs on CUDA tensors in float16 or bfloat16; load the model with "
                         "device='cuda' and dtype=torch.bfloat16, or use attn_implementation='sdpa'")
    # flash_attn's window (left, right) counts keys besides the query's own: window - 1 back, none ahead.
    sides = (-1, -1) if window is None else (window - 1, 0)
    B, nh, T, hs = q.shape
    S = k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T|S, nh, hs)
    if valid is None:
        # flash_attn aligns the causal diagonal bottom-right, which is our slot layout (queries are the last T).
        return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=1.0, causal=True,
                               window_size=sides).transpose(1, 2)
    # Padding: drop padded keys and queries, run variable-length attention, scatter results back.
    q_valid = valid[:, S - T:]  # (B, T)
    k_lens, q_lens = valid.sum(1, dtype=torch.int32), q_valid.sum(1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(q[q_valid], k[valid], v[valid], cu_q, cu_k, int(q_lens.max()), int(k_lens.max()),
                                 dropout_p=dropout, softmax_scale=1.0, causal=True, window_size=sides)
    y = q.new_zeros(B, T, nh, hs)
    y[q_valid] = out
    return y.transpose(1, 2)  # (B, nh, T, hs)
