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
        super().__init__()  # weight: (rows, d), zero-padded on the last rank
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
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


class RowParallelQuantized:
    """Mixed into a quantized linear class (optlm.quantize) for a row-parallel layer: its matmul over this
    rank's input slice, all-reduced, then the bias once."""

    group: dist.ProcessGroup | None = None

    def kernel_spec(self) -> None:
        return None  # optlm.decode_step would skip the all-reduce: this layer runs in PyTorch

    def forward(self, x: Tensor) -> Tensor:
        y = self._forward(x, None)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


_ROW_PARALLEL_KINDS: dict[type, type] = {}


def _row_parallel_kind(kind: type) -> type:
    if kind not in _ROW_PARALLEL_KINDS:
        _ROW_PARALLEL_KINDS[kind] = type(f"RowParallel{kind.__name__}", (RowParallelQuantized, kind), {})
    return _ROW_PARALLEL_KINDS[kind]


@torch.no_grad()
def quantize_tensor_parallel(model: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """Quantize a tensor-parallel model (every rank calls it) so that it computes what the whole model quantized
    with ``optlm.quantize.quantize(model, mode, lm_head=False)`` computes: each rank's slices hold the very
    integers and scales the whole layer's quantization gives. Per-row int8 scales of a layer split by input are
    taken over the whole row (an all-reduce of the rows' maxima); int4 groups lie within one rank's slice (its
    inputs must divide into groups). The vocabulary-parallel embedding and head stay in floating point."""
    from ..quantize import Int8Linear, quantize

    rows = [(parent, name, child) for parent in model.get_decoder().modules()
            for name, child in parent.named_children() if isinstance(child, RowParallelLinear)]
    whole_row_scales = {}
    for _, _, child in rows:
        world = dist.get_world_size(child.group)
        int4 = mode == "int4" and (child.in_features * world) % group_size == 0  # as quantize() decides for the whole
        if int4 and child.in_features % group_size:
            raise ValueError(f"int4 groups of {group_size} inputs do not divide this rank's {child.in_features} "
                             "inputs of a layer split by input; use int8, or fewer ranks")
        if not int4:  # int8 (or int4's int8 fallback): one scale per whole row
            peak = child.weight.detach().float().abs().amax(dim=1)  # (out,): this rank's part of each row
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=child.group)
            whole_row_scales[id(child)] = (child.weight.detach(), (peak / 127).clamp(min=1e-10))
    quantize(model, mode, group_size, lm_head=False)
    for parent, name, child in rows:
        new = getattr(parent, name)
        if id(child) in whole_row_scales:  # requantize with the whole row's scale
            w, scales = whole_row_scales[id(child)]
            q = (w.float() / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            new.weight, new.scales = q, scales.to(new.scales.dtype)
            new._scales_c = None
            if isinstance(new, Int8Linear) and new._packed is not None:
                new.use_dynamic_activations()
        new.__class__ = _row_parallel_kind(type(new))
        new.group = child.group
    return model


def check_divisible(config, world: int) -> None:
    """A model splits across ``world`` ranks only if they divide its heads and its MLP width."""
    for what, n in (("attention heads", config.num_attention_heads), ("MLP width (ffn)", config.ffn_dim)):
        if n % world:
            raise ValueError(f"the model's {n} {what} do not divide among {world} ranks; use a tensor-parallel size "
                             f"that divides {n}")


def _part(t: Tensor, dim: int, start: int, stop: int) -> nn.Parameter:
    """A copy of ``t[start:stop]`` along ``dim`` that remembers where it came from (``load_tensor_parallel``
    reads just that from a checkpoint into a model sliced while still on the meta device)."""
    p = nn.Parameter(t.detach().narrow(dim, start, stop - start).clone(), requires_grad=False)
    p.tp_slice = (dim, start, stop)
    return p


def _column(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    rows = linear.out_features // world
    part = nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device="meta")
    part.weight = _part(linear.weight, 0, rank * rows, (rank + 1) * rows)
    if linear.bias is not None:
        part.bias = _part(linear.bias, 0, rank * rows, (rank + 1) * rows)
    return part


def _row(linear: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> RowParallelLinear:
    cols = linear.in_features // world
    part = RowParallelLinear(cols, linear.out_features, bias=linear.bias is not None, device="meta")
    part.weight = _part(linear.weight, 1, rank * cols, (rank + 1) * cols)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    part.group = group
    return part


def _vocab_rows(weight: Tensor, start: int, rows: int) -> nn.Parameter:
    """Rows ``start … start + rows - 1`` of an embedding-shaped matrix, zero rows past its end."""
    stop = min(start + rows, weight.shape[0])
    table = weight.detach()[start:stop].clone()
    if table.shape[0] < rows:  # the last rank's share of a vocabulary the ranks do not divide
        table = torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
    p = nn.Parameter(table, requires_grad=False)
    p.tp_slice = (0, start, stop)
    return p


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
                                 f"{type(child).__name__}: split the floating-point model, then quantize it with "
                                 "quantize_tensor_parallel (adapters are not supported yet)")
            if kind is not None and not isinstance(child, RowParallelLinear):
                setattr(parent, name, _column(child, rank, world) if kind == "column" else _row(child, rank, world,
                                                                                                group))
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    rows = -(-vocab // world)
    start = rank * rows
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is emb.weight
    model.set_input_embeddings(VocabParallelEmbedding(_vocab_rows(emb.weight, start, rows), start, vocab, group))
    if head is not None:
        weight = model.get_input_embeddings().weight if tied else _vocab_rows(head.weight, start, rows)
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


def load_tensor_parallel(path_or_hub_id, dtype: torch.dtype | str | None = None, task: str = "causal-lm",
                         group: dist.ProcessGroup | None = None, revision: str | None = None) -> nn.Module:
    """This rank's share of a checkpoint, read as such: the model is built and split on the meta device, then
    each parameter reads just its slice from the memory-mapped safetensors (a ``.bin`` checkpoint is loaded
    whole and split). Inside a process group, every rank calls it with the same arguments."""
    from .. import checkpoint as ckpt
    from ..hf import model_class
    from ..hf.base import empty_model, parse_dtype
    from ..models import read_config

    directory = ckpt.resolve(path_or_hub_id, revision)
    files = ckpt.weight_files(directory)
    config = read_config(directory / "config.json")
    cls = model_class(config.model_type, task)
    if any(f.suffix != ".safetensors" for f in files) or ckpt.QUANTIZED_STEM in files[0].name:
        return tensor_parallel(cls.from_pretrained(directory, dtype=dtype, fast=False), group)
    model = empty_model(cls, config)
    model.tie_weights()
    tensor_parallel(model, group)
    where = _keys_by_file(files)
    # checkpoint key of each model name (the same mapping from_pretrained applies to the checkpoint's names)
    source = ckpt.normalize_keys({k: k for k in where}, set(model.state_dict()), cls.base_model_prefix,
                                 cls._ignore_checkpoint_keys)
    target = parse_dtype(dtype)
    from safetensors import safe_open

    handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
    for name, p in list(model.named_parameters()):
        key = source.get(name)
        if key is None:
            raise ckpt.CheckpointError(f"{directory} has no {name}; check that it is a {config.family_name} "
                                       "checkpoint")
        dim, start, stop = getattr(p, "tp_slice", (0, 0, None))
        sl = handles[where[key]].get_slice(key)
        stop = sl.get_shape()[dim] if stop is None else stop
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        t = sl[index]  # may be a view of the mapped file: page cache the ranks share, not a private copy
        if t.shape[0] < p.shape[0] and dim == 0:  # the last rank's share of an uneven vocabulary
            t = torch.cat([t, t.new_zeros(p.shape[0] - t.shape[0], *t.shape[1:])])
        if tuple(t.shape) != tuple(p.shape):
            raise ckpt.CheckpointError(f"{key} in {directory} has shape {tuple(sl.get_shape())}, which does not fit "
                                       f"the config (this rank expects {tuple(p.shape)}); fix config.json")
        new = nn.Parameter(t.to(target) if target is not None else t, requires_grad=False)
        if hasattr(p, "tp_slice"):
            new.tp_slice = p.tp_slice  # where the slice lies in the whole tensor (adapters are sliced alike)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, new)
    model.tie_weights()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, VocabParallelHead) and head.weight.is_meta:  # tied: the embedding's rows, now loaded
        head.weight = model.get_input_embeddings().weight
    model.name_or_path = str(path_or_hub_id)
    return model.eval()


def _keys_by_file(files) -> dict[str, object]:
    from safetensors import safe_open

    where = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            where.update(dict.fromkeys(h.keys(), f))
    return where
