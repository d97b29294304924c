"""The OPT decoder in plain PyTorch (Zhang et al. 2022), numerically matching transformers' modeling_opt.

Parameter names follow the Hugging Face layout (``embed_tokens``, ``layers.N.self_attn.q_proj`` …) so a
checkpoint maps onto the module tree one to one and adapters can target the same names as ``peft``.
This file is pure computation: no I/O, no tokenizer, no HF keyword surface (that lives in ``hf.py``).

The core protocol: ``decoder(ids, frame)``. A :class:`Frame` says where the new tokens sit (their positions) and
what they attend to; the default frame is the tokens themselves, causally. A cache hands the model a frame of
its own (``KVCache.frame``, ``PagedKVCache.frame``) whose ``update`` stores the new keys/values and returns all
the keys/values the pass may read. The model never imports a cache and never advances one: the caller does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import OPTConfig

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

# fairseq legacy: learned positions are offset by 2 (ids 0 and 1 were reserved for padding in metaseq), so
# position p reads row p + 2 and a padding position (-1, see positions_from_mask) reads row 1.
POSITION_OFFSET = 2


def positions_from_mask(mask: Tensor) -> Tensor:
    """Token positions from a (B, S) 0/1 attention mask, as OPT defines them.

    Counting only real tokens means left padding does not shift positions; padded slots get -1.
    """
    mask = mask.long()
    return torch.cumsum(mask, dim=1) * mask - 1


class Frame:
    """One forward pass's view: where its ``T`` new tokens sit and which ``S`` keys each may attend to.

    ``positions`` ``(B, T)``: position of each new token (-1 for padding). ``allowed`` ``(B|1, 1, T, S)`` bool:
    query t may attend key s; None means plain causal attention over the new tokens (``T == S``) or, for one
    query per row (``T == 1``), all keys. ``valid`` ``(B, S)``: real keys, for flash-attention's variable-length
    path; None = all real. This base frame has no cache: the keys are the new tokens' own.

    ``adapter`` ``(B,)`` long or None: the adapter each row runs with, an index into the model's adapter table
    (``optlm.adapters.adapter_index``; -1 = none). The model does not read it: adapter layers do.
    """

    adapter: Tensor | None = None

    def __init__(self, positions: Tensor, allowed: Tensor | None = None, valid: Tensor | None = None):
        self.positions, self.allowed, self.valid = positions, allowed, valid

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
            return cls(positions, causal_mask(T, S, device) if 1 < T < S else None)
        valid = mask.bool()
        return cls(positions_from_mask(mask)[:, past:], causal_mask(T, S, device, valid), valid)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer ``layer``'s new keys/values ``(B, nh, T, hs)``; return all it attends to ``(B, nh, S, hs)``."""
        return k, v

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """A frame that computes attention its own way (a kernel reading a paged cache in place) stores the new
        keys/values and returns the output ``(B, nh, T, hs)``; None (the default) leaves it to the model, which
        then calls :meth:`update`. ``q`` is already scaled."""
        return None


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        d, bias = config.hidden_size, config.enable_bias
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        # Same construction order as the reference, so seeded initialisation matches it.
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)
        # Optional one-matmul q/k/v projection whose weight the three projections are row views of (set by
        # optlm.fast.fuse_qkv); used only for inference and only while it still matches the three modules.
        self.fused_qkv = None
        # Compute attention in fp32 for half-precision inputs (set by optlm.fast on CPUs whose half-precision
        # matmuls are slow fallbacks; the kernel accumulates in fp32 either way).
        self.upcast_attention = False

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        B, T, C = x.shape
        fused = self.fused_qkv
        if fused is not None and not torch.is_grad_enabled() and fused.matches(self):
            q, k, v = fused(x, self).split(C, dim=-1)  # 3 x (B, T, C)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # OPT scales q before the matmul (not the scores), as fairseq did; this order matters in fp16.
        q = (q * self.scaling).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        out_dtype = q.dtype
        y = None if self.training else frame.attend(self.layer_idx, q, k, v)
        if y is None:
            y = self._attention(q, k, v, frame)
        y = y.transpose(1, 2).reshape(B, T, C).to(out_dtype)  # (B, T, C)
        return self.out_proj(y)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, frame: Frame) -> Tensor:
        T = q.shape[2]
        k, v = frame.update(self.layer_idx, k, v)  # (B, nh, S, hs): cached keys (if any) and the new ones
        allowed = frame.allowed
        if self.upcast_attention and q.dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()  # no-ops for a float32 cache (see optlm.generate.new_cache)
        p = self.dropout if self.training else 0.0
        impl = self.attn_implementation
        if impl == "sdpa":
            # allowed is None only when there is no padding and either T == S (plain causal attention) or T == 1
            # (one decode query per sequence attending to its whole past).
            causal = allowed is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=causal, scale=1.0)
        elif impl == "eager":
            if allowed is None:
                allowed = causal_mask(T, k.shape[2], q.device)
            scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, torch.finfo(q.dtype).min)  # (B, nh, T, S)
            # Softmax in (at least) fp32 like the reference, so fp16/bf16 scores cannot overflow.
            w = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            w = w.masked_fill(~allowed.any(-1, keepdim=True), 0.0)  # fully padded query rows attend to nothing
            y = F.dropout(w, p=p, training=self.training) @ v  # (B, nh, T, hs)
        elif impl == "flash_attention_2":
            y = _flash_attention(q, k, v, frame.valid, p)
        else:
            raise ValueError(f"unknown attn_implementation {impl!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        return y


def causal_mask(T: int, S: int, device: torch.device, valid: Tensor | None = None) -> Tensor:
    """Boolean (B|1, 1, T, S) mask: True where query t (slot S-T+t) may attend slot s.

    ``valid`` (B, S) marks real tokens. A padded query row ends up all False; attention then returns zeros
    for it (what torch's SDPA does, and so what the reference produces), never NaN.
    """
    q_slot = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_slot <= q_slot)[None]  # (1, T, S)
    if valid is not None:
        allowed = allowed & valid[:, None, :].bool()  # (B, T, S)
    return allowed[:, None]  # (B|1, 1, T, S)


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, dropout: float) -> Tensor:
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
    B, nh, T, hs = q.shape
    S = k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T|S, nh, hs)
    if valid is None:
        # flash_attn aligns the causal diagonal bottom-right, which is our slot layout (queries are the last T).
        return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=1.0, causal=True).transpose(1, 2)
    # Padding: drop padded keys and queries, run variable-length attention, scatter results back.
    q_valid = valid[:, S - T:]  # (B, T)
    k_lens, q_lens = valid.sum(1, dtype=torch.int32), q_valid.sum(1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    cu_q = F.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(q[q_valid], k[valid], v[valid], cu_q, cu_k, int(q_lens.max()), int(k_lens.max()),
                                 dropout_p=dropout, softmax_scale=1.0, causal=True)
    y = q.new_zeros(B, T, nh, hs)
    y[q_valid] = out
    return y.transpose(1, 2)  # (B, nh, T, hs)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {config.activation_function!r} is not supported; "
                             f"known: {', '.join(_ACTIVATIONS)}")
        self.self_attn = OPTAttention(config, layer_idx)
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.act = _ACTIVATIONS[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        # Pre-LN (every OPT but 350m) normalises each sublayer's input; post-LN (350m) its residual sum.
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h = self.self_attn(h, frame)
        x = x + (F.dropout(h, self.dropout, True) if self.training else h)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = self.fc2(self.act(self.fc1(h)))
        x = x + (F.dropout(h, self.dropout, True) if self.training else h)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    """Token + position embeddings, the decoder layers, final norm/projection. Returns hidden states."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        # opt-350m keeps 512-wide embeddings and projects them in and out of the 1024-wide decoder.
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        # The final norm exists only for pre-LN models (post-LN already ends each block with one), and some
        # converted metaseq checkpoints drop it (_remove_final_layer_norm).
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layerdrop = config.layerdrop
        self.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> None:
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attn_implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        for layer in self.layers:
            layer.self_attn.attn_implementation = name

    def forward(self, ids: Tensor, frame: Frame | None = None) -> Tensor:
        """ids ``(B, T)`` → hidden states ``(B, T, e)``. Without a frame: the tokens alone, causally, no padding."""
        B, T = ids.shape
        if frame is None:
            frame = Frame.causal(B, T, ids.device)
        positions = frame.positions
        limit = self.config.max_position_embeddings
        if int(positions.max()) >= limit or int(positions.min()) < -1:
            raise ValueError(f"the input reaches position {int(positions.max())} (counting from 0); this model allows "
                             f"{limit} tokens (max_position_embeddings) — shorten or truncate it")

        x = self.embed_tokens(ids)  # (B, T, e)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, d)
        x = x + self.embed_positions(positions + POSITION_OFFSET)  # (B, T, d)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # LayerDrop (Fan et al. 2019): skip whole layers at random while training
            if self.gradient_checkpointing and self.training and type(frame) is Frame:
                x = checkpoint(layer, x, frame, use_reentrant=False)
            else:
                x = layer(x, frame)

        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, e)
        return x
