"""A tensor-parallel ``LLM`` in worker processes: ``LLM(model, tensor_parallel_size=N)``.

The caller's process starts N ranks once and keeps them: each loads its share of the model
(``optlm.load(..., tensor_parallel=True)``) and builds the same engine. A call (``generate``) goes to rank 0
over a pipe; rank 0 broadcasts it to the others, every rank runs it — the same requests in the same order,
the same seed, so the same schedule and, with the gathered logits, the same tokens — and rank 0 sends the
result back. The objects passed are the caller's own (prompts, SamplingParams, RequestOutputs), pickled only
between these processes.

:class:`RemoteEngine` drives the ranks' engines step by step from the caller's process, with the interface of
``LLMEngine`` that the server's asynchronous engine uses (add_request, abort_request, step, and the queue and
cache figures it reads), so ``optlm serve --tensor-parallel-size N`` serves a split model.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .launch import USER_ERRORS, shared_seed, start

RELAY = "<optlm: call back the caller>"  # a keyword argument of a streamed call: a callback run by the caller


class _Rank:
    """What every rank holds and does: its share of the model (``LM``), the engine (``LLM``, built at the first
    call that needs it), and the calls. ``lm.NAME`` calls a method of the ``LM``, ``engine.NAME`` one of the
    engine's, anything else one of ``LLM``'s; ``stream:`` before the name streams what the method yields."""

    def __init__(self, model: str, load_kwargs: dict, engine_kwargs: dict, seed: int):
        from ..lm import load

        torch.manual_seed(seed)  # unseeded requests draw their seeds from here: alike on every rank
        self.engine_kwargs, self.llm = engine_kwargs, None
        try:
            self.lm, error = load(model, tensor_parallel=True, **load_kwargs), None
        except Exception as e:
            self.lm, error = None, e
        # Reported to the caller at its first call, by every rank alike, whichever rank failed.
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        self.error = next((e for e in errors if e is not None), None)

    def _target(self, name: str) -> tuple[Any, str]:
        from ..engine.llm import LLM

        if self.error is not None:
            raise self.error
        if name.startswith("lm."):
            return self.lm, name.removeprefix("lm.")
        if self.llm is None:
            self.llm = LLM(self.lm.model, self.lm.tokenizer, **self.engine_kwargs)
        return self.llm, name

    def run(self, message: tuple) -> Any:
        """A plain call: its result, or the exception it raised."""
        name, args, kwargs = message
        try:
            target, name = self._target(name)
            if name.startswith("engine."):
                return _engine_call(target.llm_engine, name.removeprefix("engine."), args, kwargs)
            return getattr(target, name)(*args, **kwargs)
        except Exception as e:
            return e

    def stream(self, message: tuple) -> Iterator[tuple]:
        """A streamed call, as ("item", x) and ("call", keyword, args) for the caller's callbacks; it raises as
        the method does."""
        name, args, kwargs = message
        target, name = self._target(name.removeprefix("stream:"))
        pending: list[tuple] = []
        for key in [k for k, v in kwargs.items() if v == RELAY]:
            kwargs[key] = lambda *a, key=key: pending.append(("call", key, a))
        items = iter(getattr(target, name)(*args, **kwargs))
        while True:
            yield from pending
            pending.clear()
            try:
                item = next(items)
            except StopIteration:
                break
            yield ("item", item)
        yield from pending

    def follow(self, receive: Callable[[], Any] | None = None, send: Callable[[Any], None] | None = None) -> None:
        """Run the calls rank 0 broadcasts until it broadcasts None. Rank 0 of self-started ranks ``receive``s
        each call from the caller's process and ``send``s back each result, streamed item and callback."""
        while True:
            box = [receive() if receive is not None else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            if not box[0][0].startswith("stream:"):
                result = self.run(box[0])
                if send is not None:
                    try:
                        send(result)
                    except Exception as e:  # a result that cannot travel (a generator ...): say so
                        send(RuntimeError(f"{box[0][0]} returned what cannot be sent between processes: {e}"))
                continue
            try:
                for event in self.stream(box[0]):
                    if send is not None:
                        send(event)
                result = ("end", None)
            except Exception as e:
                result = e
            if send is not None:
                send(result)


def _serve(rank: int, world: int, conn: Connection, model: str, load_kwargs: dict, engine_kwargs: dict,
           seed: int) -> None:
    """One self-started rank's life: rank 0 takes each call from the caller's process on ``conn`` (the other
    ranks hold the same pipe end unused) and sends back what it produces."""
    import signal

    # Ctrl-C at the terminal reaches these processes too; the caller's process decides when they stop (it
    # sends None; if it dies, rank 0 reads the end of the pipe and stops them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = _Rank(model, load_kwargs, engine_kwargs, seed)
    if rank == 0:

        def receive() -> Any:
            try:
                return conn.recv()
            except (EOFError, OSError):  # the caller's process is gone
                return None

        me.follow(receive, conn.send)
    else:
        me.follow()


def _engine_call(engine: Any, name: str, args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """An ``LLMEngine`` method on one rank, and the figures the caller's copy shows until its next call."""
    if name == "info":
        result = {"max_model_len": engine.max_model_len, "config": engine.model.config}
    else:
        result = getattr(engine, name)(*args, **kwargs)
    s = engine.scheduler
    return result, {"waiting": len(s.waiting), "running": len(s.running), "blocks_in_use": engine.cache.blocks_in_use,
                    "num_blocks": engine.cache.num_blocks, "requests_added": engine.requests_added,
                    "unfinished": engine.has_unfinished_requests()}


def _deliver(events: Iterator[tuple], callbacks: dict) -> Iterator[Any]:
    """The items of a streamed call, its callbacks run here. A reader that stops early (or a callback that
    raises) still takes the call to its end: the ranks run it through, and what rank 0 sends belongs to it, not
    to the next call."""
    try:
        for kind, *rest in events:
            if kind == "call":
                callbacks[rest[0]](*rest[1])
            else:
                yield rest[0]
    finally:
        with contextlib.suppress(Exception):  # the call's own error, after its reader has gone
            for _ in events:
                pass


def _raised(result: Any) -> Any:
    """A rank's result, or its error raised here as a user would expect it."""
    if isinstance(result, Exception):
        if isinstance(result, (TypeError, ValueError)):
            raise result from None  # its own type (e.g. the server tells a ContextLengthError apart)
        if type(result).__name__ in USER_ERRORS:
            raise ValueError(str(result)) from None
        raise RuntimeError(f"{type(result).__name__}: {result}") from None
    return result


def torchrun_rank(world_flag: int) -> int:
    """Under torchrun: join the group and return this process's rank; ``world_flag`` (--tensor-parallel-size)
    must be 1 or the number of processes, across which the model is split."""
    from .launch import init_from_env

    rank, world = init_from_env()
    if world_flag not in (1, world):
        raise ValueError(f"--tensor-parallel-size {world_flag} differs from the {world} processes torchrun started; "
                         "under torchrun the model is split across all of them (drop the flag)")
    return rank


def follow_group(model: Any, load_kwargs: dict, engine_kwargs: dict | None = None) -> None:
    """A rank other than 0 under torchrun: load this rank's share and run the calls rank 0's
    :class:`GroupWorkers` makes until it closes; then leave the group. Ctrl-C and SIGTERM (which torchrun hands
    every process) are left to rank 0: it finishes what is in flight and then releases this rank, which would
    otherwise be gone while rank 0 still needs it (torchrun kills what remains after its grace period)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    try:
        _Rank(model, load_kwargs, engine_kwargs or {}, shared_seed()).follow()
    finally:
        dist.destroy_process_group()


class GroupWorkers:
    """Rank 0 of a group torchrun started, driving the calls as :class:`Workers` does for self-started ranks:
    each call runs here and on the other ranks, which follow it (:func:`follow_group`)."""

    def __init__(self, model: Any, load_kwargs: dict, engine_kwargs: dict):
        self._rank = _Rank(model, load_kwargs, engine_kwargs, shared_seed())
        self._open = True
        if self._rank.error is not None:
            self.close()
            raise self._rank.error

    @property
    def lm(self) -> Any:
        return self._rank.lm  # rank 0's share: its tokenizer, config, name

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self._open:
            raise RuntimeError("this tensor-parallel model is closed")
        message = (name, args, kwargs)
        dist.broadcast_object_list([message], src=0)
        return _raised(self._rank.run(message))

    def stream(self, name: str, *args: Any, callbacks: dict | None = None, **kwargs: Any) -> Iterator[Any]:
        if not self._open:
            raise RuntimeError("this tensor-parallel model is closed")
        callbacks = callbacks or {}
        message = ("stream:" + name, args, {**kwargs, **dict.fromkeys(callbacks, RELAY)})
        dist.broadcast_object_list([message], src=0)
        return _deliver(self._rank.stream(message), callbacks)

    def close(self) -> None:
        if self._open:
            self._open = False
            dist.broadcast_object_list([None], src=0)
            dist.destroy_process_group()


def start_workers(model: Any, world: int, load_kwargs: dict, engine_kwargs: dict | None = None) -> tuple[Workers, Any]:
    """``world`` ranks of the checkpoint ``model`` (a path or hub id; None: the bundled model), after checking
    that they divide its heads; returns them and the checkpoint directory."""
    from .. import checkpoint as ckpt
    from ..bundled import bundled_model_path
    from ..models import read_config
    from .tp import check_divisible

    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {world!r}")
    if isinstance(model, torch.nn.Module):
        raise ValueError("tensor_parallel_size > 1 needs a checkpoint path or hub id (each rank reads its share); "
                         "got a built model")
    directory = bundled_model_path() if model is None else ckpt.resolve(model, load_kwargs.get("revision"))
    check_divisible(read_config(directory / "config.json"), world)
    return Workers(world, directory, load_kwargs, engine_kwargs or {}), directory


class Workers:
    """The N processes of one tensor-parallel model; :meth:`call` runs an ``LLM`` method on all of them."""

    def __init__(self, world: int, model: str | os.PathLike, load_kwargs: dict, engine_kwargs: dict):
        parent, child = mp.get_context("spawn").Pipe()
        self._conn = parent
        seed = random.randrange(2**31)
        # The ranks are started by a thread that lives until they stop: torch's spawn asks the kernel to signal
        # a child when the *thread* that started it ends, so ranks started by a passing thread (the server loads
        # its model in one) would die with it. Ending with this process they should.
        started, done, box = threading.Event(), threading.Event(), {}

        def keeper() -> None:
            try:
                box["context"] = start(_serve, world, child, str(model), load_kwargs, engine_kwargs, seed)
            except BaseException as e:  # noqa: BLE001 (raised in the constructor below)
                box["error"] = e
                done.set()
            started.set()
            done.wait()

        threading.Thread(target=keeper, name="optlm-tp-ranks", daemon=True).start()
        started.wait()
        if "error" in box:
            raise box["error"]
        self._context = box["context"]
        self._finalizer = weakref.finalize(self, Workers._stop, self._conn, self._context.processes, done)

    @staticmethod
    def _stop(conn: Connection, processes: list, done: threading.Event) -> None:
        """Ask the ranks to finish (at close or when the model is garbage-collected), then make sure they do."""
        try:
            conn.send(None)
        except (OSError, EOFError, BrokenPipeError):
            pass  # rank 0 is gone already
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
        done.set()

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._context is None:
            raise RuntimeError("this tensor-parallel model is closed")
        try:
            self._conn.send((name, args, kwargs))
        except (OSError, EOFError):  # the pipe to rank 0 broke: it is gone
            self._check_alive()
            raise
        return self._receive()

    def stream(self, name: str, *args: Any, callbacks: dict | None = None, **kwargs: Any) -> Iterator[Any]:
        """What an ``LM`` / ``LLM`` generator method yields on rank 0, item by item; ``callbacks`` (keyword
        name -> function) run here when the ranks call them."""
        callbacks = callbacks or {}
        first = self.call("stream:" + name, *args, **kwargs, **dict.fromkeys(callbacks, RELAY))
        return _deliver(self._events(first), callbacks)

    def _events(self, message: Any) -> Iterator[tuple]:
        """A streamed call's events as rank 0 sends them, up to its end (or its error, raised)."""
        while message != ("end", None):
            yield message
            message = self._receive()

    def _receive(self) -> Any:
        try:
            while not self._conn.poll(1.0):
                self._check_alive()
            result = self._conn.recv()
        except (OSError, EOFError):  # the pipe to rank 0 broke: it is gone
            self._check_alive()
            raise
        return _raised(result)

    def _check_alive(self) -> None:
        processes = self._context.processes
        dead = [i for i, p in enumerate(processes) if not p.is_alive()]
        if dead:
            self.close()
            raise RuntimeError(f"tensor-parallel rank {dead[0]} stopped (exit code {processes[dead[0]].exitcode}); "
                               "the model is closed")

    def close(self) -> None:
        self._context = None
        self._finalizer()  # runs _stop once, whichever of close() and garbage collection comes first


class RemoteEngine:
    """The engine of a tensor-parallel model, seen from the caller's process: every call runs on each rank's
    ``LLMEngine`` (the same operations in the same order, so the same schedule), rank 0 answers, and the queue
    and cache figures come back with each answer. What it offers is what the asynchronous engine and the server
    use; adapters are not supported across ranks."""

    def __init__(self, workers: Workers, tokenizer: Any):
        self._workers, self.tokenizer = workers, tokenizer
        self.scheduler = SimpleNamespace(waiting=[], running=[])
        self.cache = SimpleNamespace(blocks_in_use=0, num_blocks=0)
        self.requests_added, self._unfinished = 0, False
        info = self._call("info")
        self.max_model_len, self.model = info["max_model_len"], SimpleNamespace(config=info["config"])

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result, figures = self._workers.call("engine." + name, *args, **kwargs)
        self.scheduler.waiting = [None] * figures["waiting"]  # only their lengths are read
        self.scheduler.running = [None] * figures["running"]
        self.cache.blocks_in_use, self.cache.num_blocks = figures["blocks_in_use"], figures["num_blocks"]
        self.requests_added, self._unfinished = figures["requests_added"], figures["unfinished"]
        return result

    def add_request(self, request_id: str, prompt: Any, params: Any = None, lora_request: Any = None) -> None:
        if lora_request is not None:
            raise ValueError("adapters are not served across tensor-parallel ranks yet; serve the base model, or a "
                             "LoRA merged into it (optlm merge-lora)")
        self._call("add_request", request_id, prompt, params)

    def abort_request(self, request_id: Any) -> None:
        self._call("abort_request", request_id)

    def has_unfinished_requests(self) -> bool:
        return self._unfinished

    def step(self) -> list:
        return self._call("step")

    def add_lora(self, request: Any) -> bool:
        raise ValueError("adapters are not served across tensor-parallel ranks yet")

    def list_loras(self) -> list:
        return []

    def remove_lora(self, name: str) -> bool:
        return False

    def close(self) -> None:
        self._workers.close()


class RemoteLM:
    """The ``LM`` of a tensor-parallel model for a conversation driven from the caller's process: each turn
    runs on every rank and rank 0 streams the reply back (``optlm chat --tensor-parallel-size N``)."""

    def __init__(self, workers: Workers, name: str):
        self._workers, self.name = workers, name

    def chat_stream(self, messages: Any, on_trim: Any = None, **kwargs: Any) -> Iterator[str]:
        callbacks = {} if on_trim is None else {"on_trim": on_trim}
        return self._workers.stream("lm.chat_stream", messages, callbacks=callbacks, **kwargs)

    def chat_session(self, **kwargs: Any) -> Any:
        from ..chat import ChatSession

        return ChatSession(self, **kwargs)

    def close(self) -> None:
        self._workers.close()
