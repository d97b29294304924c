"""Start the processes of a ``torch.distributed`` group on this machine, or join the one ``torchrun`` made.

``run(fn, world, *args)`` spawns ``world`` processes that each call ``fn(rank, world, *args)`` inside an
initialised process group (gloo on CPU, NCCL where every rank has its own GPU), and returns when all have
finished; one that fails makes ``run`` raise with its error. Under ``torchrun`` (``WORLD_SIZE`` set) the group
already exists: :func:`joined` says so and the caller runs its part directly.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

USER_ERRORS = {"ValueError", "TypeError", "OSError", "FileNotFoundError", "ImportError",
               "optlm.checkpoint.CheckpointError", "CheckpointError"}


def joined() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    # Both where there are GPUs: CUDA tensors go through NCCL, the CPU tensors of bookkeeping (seeds, sums,
    # Python objects) through gloo.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    dist.init_process_group(_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def start(fn: Callable[..., Any], world: int, *args: Any) -> mp.ProcessContext:
    """Start ``fn(rank, world, *args)`` in each of ``world`` new processes of one group (``fn`` must be
    importable) and return at once; the processes are ``.processes`` of the result."""
    if world < 1:
        raise ValueError(f"the number of processes must be at least 1, got {world}")
    return mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=False,
                              start_method="spawn")


def run(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` in each of ``world`` new processes of one group; returns when all have."""
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not a warning per sibling it stops after one failed: the error says it
    try:
        context = start(fn, world, *args)
        while not context.join():
            pass
    except mp.ProcessRaisedException as e:
        # The child's traceback ends with its error: raise that (a user's mistake stays a ValueError, reported
        # in one line), naming the rank.
        kind, _, message = str(e).strip().splitlines()[-1].partition(": ")
        error = ValueError if kind in USER_ERRORS else RuntimeError
        raise error(f"rank {e.error_index} of {world}: {message or kind}") from None
    finally:
        spawn_log.setLevel(level)


def shared_seed(seed: int | None = None) -> int:
    """Rank 0's ``seed`` (or a random one) on every rank of the group: ranks that sample must draw alike."""
    value = torch.tensor([random.randrange(2**31) if seed is None else seed])
    dist.broadcast(value, 0)
    return int(value)


def init_from_env() -> tuple[int, int]:
    """Join the group ``torchrun`` describes in the environment; returns (rank, world size)."""
    if not dist.is_initialized():
        dist.init_process_group(_backend())
    return dist.get_rank(), dist.get_world_size()
