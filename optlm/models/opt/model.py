"""The OPT decoder in plain PyTorch (Zhang et al. 2022), numerically matching transformers' modeling_opt.

Parameter names follow the Hugging Face layout (``embed_tokens``, ``layers.N.self_attn.q_proj`` …) so a
checkpoint maps onto the module tree one to one and adapters can target the same names as ``peft``.
This file is pure computation: no I/O, no tokenizer, no HF keyword surface (that lives in ``optlm.hf``).
The core protocol (``decoder(ids, frame)``) and the attention it shares with other families are in
``optlm.models.core``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core import DecoderParts, Frame, LayerParts, SelfAttention, activation, frame_for
from . import arch
from .config import OPTConfig


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn = SelfAttention(d, config.num_attention_heads, layer_idx, qkv_bias=config.enable_bias,
                                       out_bias=config.enable_bias, scaling=config.head_dim**-0.5,
                                       dropout=config.attention_dropout)
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.act = activation(config.activation_function)
        self.self_attn_layer_norm = nn.LayerNorm(d, arch.LAYER_NORM_EPS, affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, arch.LAYER_NORM_EPS, affine)

    def forward(self, x: Tensor, frame: Frame) -> Tensor:
        drop = (lambda h: F.dropout(h, self.dropout, True)) if self.training else (lambda h: h)
        (x,) = arch.decoder_layer(x, lambda h: (self.self_attn(h, frame),), lambda h: self.fc2(self.act(self.fc1(h))),
                                  self.self_attn_layer_norm, self.final_layer_norm, self.pre_ln, drop)
        return x


class OPTDecoder(nn.Module):
    """Token + position embeddings, the decoder layers, final norm/projection. Returns hidden states."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + arch.POSITION_OFFSET, d)
        # opt-350m keeps 512-wide embeddings and projects them in and out of the 1024-wide decoder.
        self.project_out = nn.Linear(d, e, bias=False) if arch.has_projections(config) else None
        self.project_in = nn.Linear(e, d, bias=False) if arch.has_projections(config) else None
        # The final norm exists only for pre-LN models (post-LN already ends each block with one), and some
        # converted metaseq checkpoints drop it (_remove_final_layer_norm).
        if arch.has_final_layer_norm(config):
            self.final_layer_norm = nn.LayerNorm(d, arch.LAYER_NORM_EPS, config.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layerdrop = config.layerdrop
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def parts(self) -> DecoderParts:
        """This decoder as data, for a decode step run outside PyTorch (``optlm.decode_step``)."""
        return DecoderParts(
            embed=lambda ids, positions: arch.embed_input(ids, positions, self.embed_tokens, self.embed_positions,
                                                          self.project_in),
            layers=[LayerParts(layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm, layer.fc1,
                               layer.fc2) for layer in self.layers],
            pre_ln=self.config.do_layer_norm_before, activation=self.config.activation_function,
            eps=arch.LAYER_NORM_EPS, final_norm=self.final_layer_norm, project_out=self.project_out)

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.embed_tokens = module

    def forward(self, ids: Tensor, frame: Frame | None = None) -> Tensor:
        """ids ``(B, T)`` → hidden states ``(B, T, e)``. Without a frame: the tokens alone, causally, no padding."""
        frame = frame_for(ids, frame, self.config.max_position_embeddings)
        positions = frame.positions

        x = arch.embed_input(ids, positions, self.embed_tokens, self.embed_positions, self.project_in)  # (B, T, d)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # LayerDrop (Fan et al. 2019): skip whole layers at random while training
            if self.gradient_checkpointing and self.training and type(frame) is Frame:
                x = checkpoint(layer, x, frame, use_reentrant=False)
            else:
                x = layer(x, frame)

        return arch.decoder_output(x, self.final_layer_norm, self.project_out)  # (B, T, e)
