"""Tensor parallelism as a transformation of a built model, the split Megatron-LM made standard (Shoeybi et al.
2019) and vLLM serves OPT with: ``tensor_parallel(model)`` in every process of a ``torch.distributed`` group.

Each rank keeps a slice of every decoder layer: q, k, v and the MLP's first projection split by output (its
share of the heads and of the MLP's width; no communication), the attention output and the MLP's second
projection split by input (one all-reduce each, the bias added once after it). The token embedding is split
by vocabulary (each rank looks up the ids in its range, an all-reduce sums them) and the tied LM head with it
(each rank scores its range, an all-gather joins the logits, so every rank samples from the same numbers and
draws the same tokens). Each rank's KV cache holds its own heads only.

The model is first built whole on every rank from the memory-mapped checkpoint (``from_pretrained``), so
slicing reads only the rank's share of the weights from disk; the full tensors are dropped. Which layers are
split how, the family says (``tp_plan`` on its classes); nothing here names a family's modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.core import SelfAttention


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` over this rank's slice of the input features: partial sums, all-reduced, then the bias."""

    group: dist.ProcessGroup | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """The rows ``[start, start + rows)`` of the token embedding; ids outside them look up zeros, and the ranks'
    lookups are summed."""

    def __init__(self, weight: Tensor, start: int, vocab: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (rows, d), zero-padded on the last rank
        self.start, self.vocab, self.group = start, vocab, group
        self.num_embeddings, self.embedding_dim = vocab, weight.shape[1]
        self.padding_idx = None

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[..., None]  # (..., d)
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """The LM head over this rank's vocabulary rows; the ranks' logits are gathered, so every rank has them all."""

    def __init__(self, weight: nn.Parameter, vocab: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = weight  # (rows, d): the embedding's own slice when tied
        self.vocab, self.group = vocab, group
        self.in_features, self.out_features = weight.shape[1], vocab

    def forward(self, h: Tensor) -> Tensor:
        local = F.linear(h, self.weight)  # (..., rows)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, -1)[..., :self.vocab]  # (..., vocab): the padding rows of the last rank dropped


def check_divisible(config, world: int) -> None:
    """A model splits across ``world`` ranks only if they divide its heads and its MLP width."""
    for what, n in (("attention heads", config.num_attention_heads), ("MLP width (ffn)", config.ffn_dim)):
        if n % world:
            raise ValueError(f"the model's {n} {what} do not divide among {world} ranks; use a tensor-parallel size "
                             f"that divides {n}")


def _column(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    rows = linear.out_features // world
    part = nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone(), requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[rank * rows:(rank + 1) * rows].clone(), requires_grad=False)
    return part


def _row(linear: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> RowParallelLinear:
    cols = linear.in_features // world
    part = RowParallelLinear(cols, linear.out_features, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone(), requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    part.group = group
    return part


@torch.no_grad()
def tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep this rank's slice of ``model`` (in place; returns it): every process of ``group`` (default: the
    whole world) calls it on the same model. Inference only. A head count or MLP width that the number of
    ranks does not divide is refused, naming both."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    config, plan = model.config, getattr(model, "tp_plan", {})
    if not plan:
        raise ValueError(f"{type(model).__name__} does not say how to split its layers (tp_plan)")
    check_divisible(config, world)
    if world == 1:
        return model
    for attn in (m for m in model.modules() if isinstance(m, SelfAttention)):
        attn.num_heads //= world
        attn.fused_qkv = None  # rebuilt from the slices by optlm.fast, if wanted
    for parent in list(model.get_decoder().modules()):
        for name, child in list(parent.named_children()):
            kind = plan.get(name)
            if kind is not None and not isinstance(child, nn.Linear):
                raise ValueError(f"tensor parallelism splits floating-point linear layers; {name} is a "
                                 f"{type(child).__name__} (quantize or add adapters after splitting is not "
                                 "supported yet): load the model without them")
            if kind is not None and not isinstance(child, RowParallelLinear):
                setattr(parent, name, _column(child, rank, world) if kind == "column" else _row(child, rank, world,
                                                                                                group))
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    rows = -(-vocab // world)
    start = rank * rows
    table = emb.weight.detach()[start:start + rows].clone()
    if table.shape[0] < rows:  # the last rank's share of a vocabulary the ranks do not divide: zero rows
        table = torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is emb.weight
    model.set_input_embeddings(VocabParallelEmbedding(table, start, vocab, group))
    if head is not None:
        weight = model.get_input_embeddings().weight
        if not tied:
            own = head.weight.detach()[start:start + rows].clone()
            weight = nn.Parameter(torch.cat([own, own.new_zeros(rows - own.shape[0], own.shape[1])]),
                                  requires_grad=False)
        model.set_output_embeddings(VocabParallelHead(weight, vocab, group))
    # The replicated tensors (norms, positions, biases) still point into the memory-mapped checkpoint, which keeps
    # every page the slicing read resident: copy them, so the mapping goes and the rank holds only its share.
    sliced = {id(p) for m in model.modules() if isinstance(m, (RowParallelLinear, VocabParallelEmbedding,
                                                                  VocabParallelHead)) for p in m.parameters()}
    sliced |= {id(p) for parent in model.get_decoder().modules() for name, child in parent.named_children()
               if name in plan for p in child.parameters()}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in sliced:
            t.data = t.data.clone()
    model.tensor_parallel = (rank, world)
    return model.eval()
