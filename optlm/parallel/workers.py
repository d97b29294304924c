"""A tensor-parallel ``LLM`` in worker processes: ``LLM(model, tensor_parallel_size=N)``.

The caller's process starts N ranks once and keeps them: each loads its share of the model
(``optlm.load(..., tensor_parallel=True)``) and builds the same engine. A call (``generate``) goes to rank 0
over a pipe; rank 0 broadcasts it to the others, every rank runs it — the same requests in the same order,
the same seed, so the same schedule and, with the gathered logits, the same tokens — and rank 0 sends the
result back. The objects passed are the caller's own (prompts, SamplingParams, RequestOutputs), pickled only
between these processes.
"""

from __future__ import annotations

import os
import random
import weakref
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import USER_ERRORS, start


def _serve(rank: int, world: int, conn: Connection, model: str, load_kwargs: dict, engine_kwargs: dict,
           seed: int) -> None:
    """One rank's life: load its share, build the engine, then run every call rank 0 receives on ``conn`` (the
    other ranks hold the same pipe end unused) until it receives None."""
    from ..engine.llm import LLM
    from ..lm import load

    torch.manual_seed(seed)  # unseeded requests draw their seeds from here: alike on every rank
    try:
        lm = load(model, tensor_parallel=True, **load_kwargs)
        llm, error = LLM(lm.model, lm.tokenizer, **engine_kwargs), None
    except Exception as e:  # reported to the caller at its first call, on every rank alike
        llm, error = None, e
    while True:
        box = [conn.recv() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        name, args, kwargs = box[0]
        try:
            if error is not None:
                raise error
            result = getattr(llm, name)(*args, **kwargs)
        except Exception as e:
            result = e
        if rank == 0:
            conn.send(result)


class Workers:
    """The N processes of one tensor-parallel model; :meth:`call` runs an ``LLM`` method on all of them."""

    def __init__(self, world: int, model: str | os.PathLike, load_kwargs: dict, engine_kwargs: dict):
        parent, child = mp.get_context("spawn").Pipe()
        self._conn = parent
        seed = random.randrange(2**31)
        self._context = start(_serve, world, child, str(model), load_kwargs, engine_kwargs, seed)
        self._finalizer = weakref.finalize(self, Workers._stop, self._conn, self._context.processes)

    @staticmethod
    def _stop(conn: Connection, processes: list) -> None:
        """Ask the ranks to finish (at close or when the model is garbage-collected), then make sure they do."""
        try:
            conn.send(None)
        except (OSError, EOFError, BrokenPipeError):
            pass  # rank 0 is gone already
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._context is None:
            raise RuntimeError("this tensor-parallel model is closed")
        self._conn.send((name, args, kwargs))
        processes = self._context.processes
        while not self._conn.poll(1.0):
            dead = [i for i, p in enumerate(processes) if not p.is_alive()]
            if dead:
                self.close()
                raise RuntimeError(f"tensor-parallel rank {dead[0]} stopped (exit code {processes[dead[0]].exitcode}); "
                                   "the model is closed")
        result = self._conn.recv()
        if isinstance(result, Exception):  # the engine's own error, raised here as a user would expect it
            if isinstance(result, TypeError):
                raise TypeError(str(result)) from None
            if isinstance(result, ValueError) or type(result).__name__ in USER_ERRORS:
                raise ValueError(str(result)) from None
            raise RuntimeError(f"{type(result).__name__}: {result}") from None
        return result

    def close(self) -> None:
        self._context = None
        self._finalizer()  # runs _stop once, whichever of close() and garbage collection comes first
