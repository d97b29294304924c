"""The engine for asyncio code (the server): one thread steps the engine, coroutines submit and stream.

The engine is not thread-safe, so only its thread touches it: coroutines hand it commands (add, abort, call) through a
queue and get each request's outputs through an asyncio queue of their own. A coroutine that stops listening
(a client that disconnected, a cancelled task) aborts its request, which frees its cache blocks at once. If a
step raises, the engine is marked dead, every open request gets the error, and new ones are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .engine import LLMEngine, RequestOutput
from .lora import LoRARequest
from .params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine's thread stopped on an error; the server reports itself unhealthy."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later."""


class AsyncEngine:
    """``async for out in engine.generate(prompt, params): ...`` over an :class:`LLMEngine` run in a thread.

    ``max_waiting`` bounds the requests queued beyond the running batch (:class:`QueueFullError` past it).
    """

    def __init__(self, engine: LLMEngine, max_waiting: int = 512):
        self.engine = engine
        self.max_waiting = max_waiting
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optlm-engine", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        """The engine's thread has ended (after :meth:`shutdown`, or a crash)."""
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Running and waiting sequences and cache blocks in use (read without locking: approximate)."""
        s = self.engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "blocks": self.engine.cache.blocks_in_use,
                "blocks_total": self.engine.cache.num_blocks, "requests_added": self.engine.requests_added}

    async def submit(self, prompt: Any, params: SamplingParams, request_id: str | None = None,
                     lora_request: LoRARequest | None = None) -> RequestStream:
        """Hand a request (with its adapter, if any) to the engine and wait until it is accepted: the stream of
        its outputs, or the engine's ValueError/TypeError for a request it refuses (nothing runs then)."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if len(self.engine.scheduler.waiting) >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting")
        rid = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._commands.put(("add", rid, (prompt, params, lora_request), loop, outputs, accepted))
        await self._answer(accepted)
        return RequestStream(self, rid, outputs)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine's thread between two steps (loading or unloading an adapter) and
        return its result, or raise its error."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put(("call", fn, loop, done))
        return await self._answer(done)

    async def _answer(self, future: asyncio.Future) -> Any:
        while not future.done():  # the engine's thread answers at its next step
            await asyncio.wait({future}, timeout=1.0)
            if not future.done() and not self._thread.is_alive():
                _settle(future, EngineDeadError(f"the engine has stopped: {self.error!r}"))
        return future.result()

    async def generate(self, prompt: Any, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they grow, the last one finished."""
        stream = await self.submit(prompt, params, request_id)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # ---- the engine's thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                # Block for the next command while idle; otherwise take what has arrived and step.
                self._command(self._commands.get() if not engine.has_unfinished_requests() else None)
                while True:
                    try:
                        self._command(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        self._send(out.request_id, out)
                        if out.finished:
                            self._streams.pop(out.request_id, None)
            stopped = EngineDeadError("the server is shutting down")
            for rid in list(self._streams):
                self._send(rid, stopped)
            self._refuse_pending(stopped)
        except BaseException as e:  # noqa: BLE001 (a crash must reach every waiting client, then stop the engine)
            self.error = e
            dead = EngineDeadError(f"the engine stopped on an error: {e!r}")
            for rid in list(self._streams):
                self._send(rid, dead)
            self._streams.clear()
            self._refuse_pending(dead)

    def _command(self, cmd: tuple | None) -> None:
        if cmd is None or cmd[0] == "wake":
            return
        if cmd[0] == "abort":
            self.engine.abort_request(cmd[1])
            self._streams.pop(cmd[1], None)
            return
        if cmd[0] == "call":
            _, fn, loop, done = cmd
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 (handed to the calling coroutine, which raises it)
                loop.call_soon_threadsafe(_settle, done, e)
            else:
                loop.call_soon_threadsafe(_settle, done, None, result)
            return
        _, rid, (prompt, params, lora_request), loop, outputs, accepted = cmd
        if len(self.engine.scheduler.waiting) >= self.max_waiting:  # counted here, where requests are queued
            loop.call_soon_threadsafe(_settle, accepted, QueueFullError(
                f"{self.max_waiting} requests are already waiting"))
            return
        try:
            self.engine.add_request(rid, prompt, params, lora_request)
        except Exception as e:  # noqa: BLE001 (handed to the submitting coroutine, which raises it)
            loop.call_soon_threadsafe(_settle, accepted, e)
            return
        self._streams[rid] = (loop, outputs)
        loop.call_soon_threadsafe(_settle, accepted, None)

    def _send(self, rid: str, item: Any) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, outputs = target
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the client's event loop is closed: nobody is listening any more
                self.engine.abort_request(rid)

    def _refuse_pending(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                cmd[3].call_soon_threadsafe(_settle, cmd[5], error)
            elif cmd[0] == "call":
                cmd[2].call_soon_threadsafe(_settle, cmd[3], error)


class RequestStream:
    """One accepted request's outputs. Iterate it to the finished output; stopping early (or :meth:`abort`)
    cancels the request in the engine and frees its cache blocks."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue):
        self.engine, self.request_id, self._outputs = engine, request_id, outputs
        self.finished = False

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._outputs.get()
                if isinstance(out, BaseException):
                    self.finished = True
                    raise out
                self.finished = out.finished
                yield out
        finally:
            self.abort()


def _settle(future: asyncio.Future, error: BaseException | None, result: Any = None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
