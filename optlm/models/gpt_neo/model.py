"""The GPT-Neo decoder in plain PyTorch (Black et al. 2021), numerically matching transformers' modeling_gpt_neo.

Parameter names follow the Hugging Face layout (``wte``, ``h.N.attn.attention.q_proj``, ``h.N.mlp.c_fc`` …) so
a checkpoint maps onto the module tree one to one and adapters target the same names as ``peft``. Pure
computation, on the core protocol of ``optlm.models.core`` (``decoder(ids, frame)``).

The family's quirks, from the reference: attention scores are not scaled by 1/√head_dim and q·k is computed
in float32 whatever the dtype; layers alternate global attention with local attention over the last
``window_size`` tokens; positions are plain learned embeddings (no offset); q/k/v have no bias, out_proj has.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core import Frame, SelfAttention, activation, frame_for
from .config import GPTNeoConfig


class GPTNeoAttention(nn.Module):
    """transformers' wrapper level (``attn.attention.q_proj``): kept so module and checkpoint names match."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        self.attention = SelfAttention(config.hidden_size, config.num_heads, layer_idx, qkv_bias=False, out_bias=True,
                                       scaling=None, window=config.layer_windows[layer_idx],
                                       dropout=config.attention_dropout, fp32_scores=True)

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        return self.attention(x, frame)


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.ffn_dim)
        self.c_proj = nn.Linear(config.ffn_dim, config.hidden_size)
        self.act = activation(config.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTNeoBlock(nn.Module):
    """Pre-LN block; dropout after attention and after the MLP (``resid_dropout``)."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = GPTNeoAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = GPTNeoMLP(config)
        self.dropout = config.resid_dropout

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        h = self.attn(self.ln_1(x), frame)
        x = x + (F.dropout(h, self.dropout, True) if self.training else h)
        h = self.mlp(self.ln_2(x))
        return x + (F.dropout(h, self.dropout, True) if self.training else h)


class GPTNeoStack(nn.Module):
    """Token + position embeddings, the blocks, the final norm. Returns hidden states ``(B, T, hidden)``."""

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.max_position_embeddings, d)
        self.embed_dropout = config.embed_dropout
        self.h = nn.ModuleList(GPTNeoBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    # The names the rest of optlm uses for any family's decoder (adapters, quantization, the façade).
    @property
    def layers(self) -> nn.ModuleList:
        return self.h

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.wte = module

    def forward(self, ids: Tensor, frame: Frame | None = None) -> Tensor:
        """ids ``(B, T)`` → hidden states ``(B, T, d)``. Without a frame: the tokens alone, causally, no padding."""
        frame = frame_for(ids, frame, self.config.max_position_embeddings)
        positions = frame.positions
        # Padding (position -1) reads row 0: its outputs are never attended to or used.
        x = self.wte(ids) + self.wpe(positions.clamp(min=0))  # (B, T, d)
        if self.training and self.embed_dropout > 0:
            x = F.dropout(x, self.embed_dropout, True)
        for block in self.h:
            if self.gradient_checkpointing and self.training and type(frame) is Frame:
                x = checkpoint(block, x, frame, use_reentrant=False)
            else:
                x = block(x, frame)
        return self.ln_f(x)
