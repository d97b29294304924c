"""Fully sharded data-parallel training with PyTorch's FSDP2 (``fully_shard``): each of N processes holds
1/N of every parameter, gradient and AdamW moment, gathers a layer's weights just before the layer runs and
frees them after, and reduce-scatters the gradients (averaged over the ranks) so every rank updates only its
share. The trainer's loop is unchanged: it runs its loss through :class:`ShardedRun`, the root unit that
sees every computation, and writes checkpoints through the functions here.

Checkpoints stay ordinary: the weights are gathered and written on rank 0 in the Hugging Face layout, and
each rank writes its share of the optimizer state as ``optimizer-RRRRR-of-WWWWW.safetensors`` (the rows of
each moment it holds, with their offset in the full tensor in the file's metadata). A run resumes on any
number of ranks: each reads the rows it now holds from whichever files have them.

:class:`Ranks` is the little the loop needs from the group: who writes files (rank 0), running a step on
rank 0 first and handing its result or its error to all, and sums of numbers across ranks. A single-process
run uses ``Ranks()`` and never touches torch.distributed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .launch import init_from_env

OPTIMIZER_SHARD = "optimizer-{rank:05d}-of-{world:05d}.safetensors"
RNG_SHARD = "rng-{rank:05d}-of-{world:05d}.safetensors"


class Ranks:
    """The processes one run spans: ``rank`` of ``world``. ``Ranks()`` is a single process."""

    def __init__(self, rank: int = 0, world: int = 1, sharded: bool = False, owns_group: bool = False):
        self.rank, self.world, self.owns_group = rank, world, owns_group
        self.sharded = sharded  # in a torch.distributed group (even of one process, under torchrun)

    @classmethod
    def join(cls, device: torch.device | None = None) -> Ranks:
        """The group this process belongs to: an initialised one (processes started by optlm.parallel.run), or
        the one torchrun describes in the environment (joined here, and left by :meth:`close`). On GPUs each
        rank takes the one torchrun assigns it (LOCAL_RANK) before any collective runs."""
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), sharded=True)
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("--fsdp shards the model across the processes torchrun starts: run "
                             "`torchrun --nproc-per-node N --no-python optlm train ... --fsdp` (N processes, each "
                             "taking --batch-size sequences per micro-batch)")
        rank, world = init_from_env()
        return cls(rank, world, sharded=True, owns_group=True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()  # gloo's threads stopped here, not torn down at interpreter exit

    def first(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on rank 0; every rank returns its result (sent as a Python object) or raises its error."""
        if not self.sharded:
            return fn(*args)
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn(*args))
            except Exception as e:  # handed to every rank, which raises it as rank 0 does
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def each(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on every rank; if it failed on any, every rank raises the first rank's error."""
        if not self.sharded:
            return fn(*args)
        try:
            result, error = fn(*args), None
        except Exception as e:
            result, error = None, e
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed
        return result

    def main_first(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on rank 0, then (if it worked) on the others: for work that writes a cache rank 0
        makes and the others read."""
        if not self.sharded:
            return fn(*args)
        result = None

        def on_main() -> None:
            nonlocal result
            result = fn(*args)

        self.first(on_main)
        return self.each(lambda: result if self.main else fn(*args))  # an error on any rank stops them all

    def sum(self, *values: float) -> list[float]:
        """The sums over the ranks of each value (float64)."""
        if not self.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


class ShardedRun(nn.Module):
    """The root FSDP unit: ``run(fn, *args)`` is ``fn(model, *args)`` with the parameters outside the decoder
    layers (embeddings, final norm, head) gathered around it, whatever parts of the model ``fn`` calls. A plain
    ``model(...)`` would not do: the training losses call the decoder and the head separately."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class Direct:
    """``run(fn, *args)`` = ``fn(model, *args)`` for an unsharded model: the loop calls both alike."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def shard(model: nn.Module, device: torch.device, world: int, param_dtype: torch.dtype | None = None) -> ShardedRun:
    """Shard ``model`` in place across the ``world`` ranks of the default group (every rank calls this on the
    same model) and return its root unit. Each decoder layer is one unit (gathered as it runs, freed after);
    the rest is the root's. ``param_dtype`` (bf16) gathers and computes in that dtype, reducing gradients in
    float32, with float32 master weights kept sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    reduce = torch.float32 if param_dtype else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = ShardedRun(model)
    # The root's inputs are the loss's batch and arguments, never cast: labels (a regression's numbers) stay exact.
    fully_shard(root, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce,
                                                                 cast_forward_inputs=False))
    return root


def full_model(model: nn.Module, ranks: Ranks) -> nn.Module | None:
    """A plain copy of a sharded ``model`` with the whole weights, on rank 0 (None on the others; every rank
    calls this, as gathering is collective): what ``save_pretrained`` and the adapters' savers write."""
    from ..hf.base import empty_model

    full: dict[str, Tensor] = {}
    gathered: dict[int, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():  # the parameters themselves: a tied one is seen twice
        if id(t) not in gathered:  # a tied weight is gathered once
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            # Kept on rank 0 only, in CPU memory: the others drop each whole tensor as soon as it is gathered.
            gathered[id(t)] = whole.detach().cpu() if ranks.main else None
        full[name] = gathered[id(t)]
    if not ranks.main:
        return None
    plain = empty_model(type(model), model.config)
    plain.load_state_dict(full, strict=True, assign=True)
    if plain.config.tie_word_embeddings and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    plain.name_or_path = getattr(model, "name_or_path", "")
    return plain


# ---- sharded optimizer state ------------------------------------------------------------------------

def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of an ``n``-row tensor that FSDP2 gives ``rank`` (torch.chunk's split)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def save_optimizer_shard(opt: torch.optim.Optimizer, model: nn.Module, directory: Path, ranks: Ranks) -> None:
    """This rank's share of ``opt``'s state in ``directory``: sharded moments as their rows (with the offset),
    replicated values (AdamW's step) whole."""
    tensors: dict[str, Tensor] = {}
    layout: dict[str, list[int] | None] = {}
    for name, p in _named_params(model).items():
        for key, value in opt.state.get(p, {}).items():
            full_key = f"{name}.{key}"
            if isinstance(value, DTensor):
                local = value.to_local()
                start, stop = _rows(value.shape[0], ranks.rank, ranks.world)
                assert local.shape[0] == stop - start, "FSDP's split is torch.chunk's"
                tensors[full_key] = local.detach().cpu().contiguous()
                layout[full_key] = [start, *value.shape]
            else:
                tensors[full_key] = value.detach().cpu().reshape(-1).clone()
                layout[full_key] = None  # replicated; the shape of a scalar is restored from the parameter's state
    path = directory / OPTIMIZER_SHARD.format(rank=ranks.rank, world=ranks.world)
    save_file(tensors, path, metadata={"layout": json.dumps(layout)})


def load_optimizer_shards(opt: torch.optim.Optimizer, model: nn.Module, directory: Path, saved_world: int,
                          ranks: Ranks) -> None:
    """Fill ``opt``'s state for this rank's shares from the ``saved_world`` files in ``directory``, whatever
    the number of ranks that wrote them."""
    files = [directory / OPTIMIZER_SHARD.format(rank=r, world=saved_world) for r in range(saved_world)]
    handles = [safe_open(str(f), framework="pt") for f in files]
    layouts = [json.loads(h.metadata()["layout"]) for h in handles]
    for name, p in _named_params(model).items():
        keys = sorted({k.removeprefix(f"{name}.") for k in layouts[0] if k.rsplit(".", 1)[0] == name})
        if not keys:
            continue
        state = {}
        for key in keys:
            full_key = f"{name}.{key}"
            if layouts[0][full_key] is None:
                state[key] = handles[0].get_tensor(full_key).reshape(())  # AdamW's step: a scalar
                continue
            start, stop = _rows(p.shape[0], ranks.rank, ranks.world) if isinstance(p, DTensor) else (0, p.shape[0])
            pieces = []
            for h, layout in zip(handles, layouts, strict=True):
                at, rows = layout[full_key][0], h.get_slice(full_key).get_shape()[0]
                lo, hi = max(start, at), min(stop, at + rows)
                if lo < hi:
                    pieces.append(h.get_slice(full_key)[lo - at:hi - at])
            local = torch.cat(pieces) if pieces else torch.empty(0, *p.shape[1:], dtype=p.dtype)
            local = local.to(p.device)
            state[key] = (DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride()) if isinstance(p, DTensor) else local)
        opt.state[p] = state


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, each once (a tied weight under its first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_rng_shard(directory: Path, ranks: Ranks) -> None:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / RNG_SHARD.format(rank=ranks.rank, world=ranks.world))


def shard_files(world: int) -> list[str]:
    """The per-rank files a checkpoint written by ``world`` ranks holds besides the model."""
    return [pattern.format(rank=r, world=world) for pattern in (OPTIMIZER_SHARD, RNG_SHARD) for r in range(world)]
