"""The OpenAI-compatible HTTP API over the engine: routes only (bodies in ``schemas``, errors in ``errors``).

``build_app(engine, tokenizer, ...)`` makes the FastAPI app; ``optlm serve`` runs it on uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..chat import ChatTemplate
from ..engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ..engine.engine import RequestOutput
from ..engine.lora import LoRARequest
from ..engine.params import SamplingParams
from ..engine.sampler import Logprob
from ..generation_config import ContextLengthError
from .errors import APIError, api_error_handler, bad_value, http_handler, unexpected_handler, validation_handler
from .guard import Guard
from .metrics import Metrics
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)

OPEN_PATHS = ("/health", "/metrics", "/version")


class _BodyLimit:
    """Refuse bodies over ``limit`` bytes while they arrive, also when no Content-Length announces them
    (chunked uploads): reading stops at the limit with a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body is over {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


@dataclass
class Limits:
    """Bounds on one request, so no single client can take the server down."""

    max_n: int = 16
    max_prompts: int = 64
    max_body_bytes: int = 4 * 2**20


class Backend:
    """The engine, tokenizer and guard the routes use, once the model is loaded (``engine`` is None until then)."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.tokenizer: Any = None
        self.guard: Guard | None = None
        self.failed: BaseException | None = None

    def set(self, engine: AsyncEngine, tokenizer: Any, guard: Guard | None = None) -> None:
        self.tokenizer, self.guard, self.engine = tokenizer, guard, engine

    @property
    def context(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab(self) -> int:
        return self.engine.engine.model.config.vocab_size


def build_app(engine: AsyncEngine | None, tokenizer: Any, model_name: str, api_key: str | None = None,
              limits: Limits | None = None, template: ChatTemplate | None = None,
              on_start: Callable[[], None] | None = None,
              load: Callable[[], tuple[AsyncEngine, Any]] | None = None,
              on_load_error: Callable[[BaseException], None] | None = None,
              loras: dict[str, LoRARequest] | None = None, allow_runtime_lora: bool = False,
              lora_root: str | os.PathLike | None = None, guard: Guard | None = None) -> FastAPI:
    """The app over ``engine`` and ``tokenizer``, or, with ``load``, over what ``load()`` returns: then the
    server listens at once, loads the model in a thread, and answers 503 (``/health`` included) until it is
    ready; a failed load is reported to ``on_load_error``.

    ``loras`` are the adapters served by name (a request's ``model`` picks one; the engine needs
    ``enable_lora``); ``allow_runtime_lora`` adds ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``,
    which load only directories under ``lora_root``. ``guard`` screens prompts before they reach the engine
    (with ``load``, ``load()`` may return it as a third item)."""
    loras = dict(loras or {})
    limits = limits or Limits()
    template = template or ChatTemplate()
    metrics = Metrics()
    b = Backend()
    if engine is not None:
        b.set(engine, tokenizer, guard)

    def load_in_background() -> None:
        try:
            b.set(*load())
        except BaseException as e:  # noqa: BLE001 (reported through /health and on_load_error)
            b.failed = e
            if on_load_error is not None:
                on_load_error(e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_start is not None:
            on_start()
        if load is not None and b.engine is None:
            threading.Thread(target=load_in_background, name="optlm-load", daemon=True).start()
        yield

    app = FastAPI(title="optlm", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_handler)
    app.add_exception_handler(Exception, unexpected_handler)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.state.backend, app.state.metrics = b, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            metrics.errors.labels("body_too_large").inc()
            return APIError(413, f"the request body is over {limits.max_body_bytes} bytes").response()
        if b.engine is None and request.url.path not in OPEN_PATHS:
            return APIError(503, "the model is still loading; retry shortly",
                            headers={"Retry-After": "2"}).response()
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                metrics.errors.labels("unauthorized").inc()
                return APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'").response()
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        return response

    # ---- plain routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if b.engine is None:
            failed = b.failed
            body = {"status": "loading"} if failed is None else {"status": "error", "error": repr(failed)}
            return JSONResponse(body, status_code=503)
        if not b.engine.alive:
            return JSONResponse({"status": "error", "error": repr(b.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = b.engine.stats() if b.engine is not None else {"running": 0, "waiting": 0, "blocks": 0,
                                                                   "blocks_total": 0}
        return Response(metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "optlm",
                "max_model_len": b.context, "root": model_name, "parent": None}
        if name in loras:  # an adapter: its directory, and the base model it runs on (vLLM's fields)
            card.update(root=str(loras[name].lora_path), parent=model_name)
        return card

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in [model_name, *loras]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _model(model_id)
        return model_card(model_id)

    # ---- adapters loaded and unloaded at run time (only with allow_runtime_lora) ---------------------------

    if allow_runtime_lora:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            name = body.lora_name
            if not name or name == model_name or name in loras:
                raise APIError(400, f"the name `{name}` is already served; unload it first or pick another",
                               param="lora_name")
            path = _under_root(body.lora_path)
            request = LoRARequest(name, max((r.lora_int_id for r in loras.values()), default=0) + 1, str(path))
            try:
                await b.engine.call(lambda engine: engine.add_lora(request))
            except (ValueError, TypeError) as e:
                raise APIError(400, f"cannot load adapter `{name}`: {e}", param="lora_path") from None
            loras[name] = request
            return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            name = body.lora_name
            if name not in loras:
                raise APIError(404, f"no adapter `{name}` is served", param="lora_name", code="model_not_found")
            del loras[name]  # new requests for it get 404 from now on
            try:
                await b.engine.call(lambda engine: name in engine.list_loras() and engine.remove_lora(name))
            except ValueError:
                pass  # still running for requests already accepted: it is evicted once they finish
            return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    def _under_root(path: str) -> Path:
        if lora_root is None:
            raise APIError(400, "this server loads adapters only from --lora-root, which is not set",
                           param="lora_path")
        root = Path(lora_root).resolve()
        target = (root / path).resolve()  # an absolute path stays absolute; symlinks are followed before the check
        if not target.is_relative_to(root) or target == root:
            raise APIError(400, f"lora_path must be a directory under the server's --lora-root; {path!r} is not",
                           param="lora_path")
        if not target.is_dir():
            raise APIError(400, f"lora_path {path!r} is not a directory under --lora-root", param="lora_path")
        return target

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else _render(body.messages)
        ids = b.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": b.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        _model(body.model)
        _check_ids(body.tokens, "tokens")
        return {"prompt": b.tokenizer.decode(body.tokens)}

    # ---- completions --------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        lora = _model(body.model)
        prompts = _prompts(body.prompt)
        echo_only = body.echo and body.max_tokens == 0  # score the prompt only (what lm-eval's loglikelihood asks)
        scored = body.echo and body.logprobs is not None
        params = _params(body, max_tokens=1 if echo_only else body.max_tokens, logprobs=body.logprobs,
                         prompt_logprobs=body.logprobs if scored else None)
        await _screen(prompts, "prompt")
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        streams = await _submit(prompts, params, lora)
        if body.stream:
            return _sse(_completion_chunks(streams, body, params, cid, created, echo_only))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(await _finals(streams)):
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                text, ids, lps = ("", [], []) if echo_only else (c.text, c.token_ids, c.logprobs or [])
                completion_tokens += len(ids)
                lp = None if body.logprobs is None else _completion_logprobs(out, ids, lps, body.echo)
                choices.append({"index": i * params.n + c.index,
                                "text": (_prompt_text(out) if body.echo else "") + text, "logprobs": lp,
                                "finish_reason": "length" if echo_only else c.finish_reason,
                                "stop_reason": None if echo_only else c.stop_reason})
        return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                             "model": body.model or model_name,
                             "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})

    async def _completion_chunks(streams, body, params, cid, created, echo_only) -> AsyncIterator[dict]:
        sent: dict[tuple[int, int], list[int]] = {}  # (prompt, completion) -> [chars, tokens, prompt echoed]
        echoed: dict[int, str] = {}  # prompt -> its text, decoded once
        prompt_tokens = completion_tokens = 0
        async for i, out in _merge(streams):
            if body.echo and i not in echoed:
                echoed[i] = _prompt_text(out)
            for c in out.outputs:
                s = sent.setdefault((i, c.index), [0, 0, 0])
                text, ids = ("", []) if echo_only else (c.text[s[0]:], c.token_ids[s[1]:])
                prefix = echoed[i] if body.echo and not s[2] else ""
                finish = ("length" if echo_only else c.finish_reason) if c.finish_reason else None
                if not text and not ids and not prefix and finish is None:
                    continue
                lp = None
                if body.logprobs is not None:
                    lps = (c.logprobs or [])[s[1]:s[1] + len(ids)]
                    lp = _completion_logprobs(out, ids, lps, bool(prefix),
                                              offset=len(echoed.get(i, "")) + s[0])
                s[0], s[1], s[2] = s[0] + len(text), s[1] + len(ids), 1
                if finish:
                    completion_tokens += 0 if echo_only else len(c.token_ids)
                yield {"id": cid, "object": "text_completion", "created": created, "model": body.model or model_name,
                       "choices": [{"index": i * params.n + c.index, "text": prefix + text, "logprobs": lp,
                                    "finish_reason": finish,
                                    "stop_reason": c.stop_reason if finish and not echo_only else None}]}
            if out.finished:
                prompt_tokens += len(out.prompt_token_ids)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {"id": cid, "object": "text_completion", "created": created,
                   "model": body.model or model_name, "choices": [],
                   "usage": _usage(prompt_tokens, completion_tokens)}

    # ---- chat ---------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        lora = _model(body.model)
        prompt = _render(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        stop = body.stop if body.stop is not None else []
        stop = [stop] if isinstance(stop, str) else list(stop)
        params = _params(body, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                         stop=template.stop_strings + stop)
        await _screen([m.content for m in body.messages if m.role == "user" and m.content], "messages")
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        streams = await _submit([prompt], params, lora)
        if body.stream:
            return _sse(_chat_chunks(streams, body, cid, created))
        out = (await _finals(streams))[0]
        choices = []
        for c in out.outputs:
            lp = ({"content": _chat_logprobs(c.token_ids, c.logprobs or [], body.top_logprobs or 0)}
                  if body.logprobs else None)
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text.strip()},
                            "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        completion = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                             "model": body.model or model_name,
                             "choices": choices, "usage": _usage(len(out.prompt_token_ids), completion)})

    async def _chat_chunks(streams, body, cid, created) -> AsyncIterator[dict]:
        sent: dict[int, list[int]] = {}
        last = None
        async for _, out in _merge(streams):
            last = out
            for c in out.outputs:
                s = sent.setdefault(c.index, [0, 0, 0])  # chars, tokens, role sent
                text = c.text[s[0]:]
                if s[0] == 0:
                    text = text.lstrip()  # the template leaves a space after "AI:"
                    if not text and c.finish_reason is None:
                        continue
                ids = c.token_ids[s[1]:]
                delta: dict[str, Any] = {} if s[2] else {"role": "assistant"}
                if text:
                    delta["content"] = text
                if not delta and c.finish_reason is None:
                    continue
                lp = ({"content": _chat_logprobs(ids, (c.logprobs or [])[s[1]:s[1] + len(ids)],
                                                 body.top_logprobs or 0)} if body.logprobs else None)
                s[0], s[1], s[2] = len(c.text), len(c.token_ids), 1
                yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": body.model or model_name,
                       "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                    "finish_reason": c.finish_reason}]}
        if body.stream_options is not None and body.stream_options.include_usage and last is not None:
            completion = sum(len(c.token_ids) for c in last.outputs)
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model or model_name,
                   "choices": [], "usage": _usage(len(last.prompt_token_ids), completion)}

    # ---- helpers (closures over the app's settings) -------------------------------------------------------

    async def _screen(prompts: list, param: str) -> None:
        """Refuse the request (OpenAI's content_filter error) when the guard refuses any of ``prompts`` (texts,
        or token ids, which it reads decoded)."""
        if b.guard is None or not prompts:
            return
        for p in prompts:
            if not isinstance(p, str):
                _check_ids(p, param)
        texts = [p if isinstance(p, str) else b.tokenizer.decode(p) for p in prompts]
        try:
            verdicts = await b.guard.check(b.engine, texts)
        except EngineDeadError as e:
            raise _refusal(e, metrics) from None
        metrics.guard_checked.inc(len(texts))
        refused = next((v for v in verdicts if not v.allowed), None)
        if refused is not None:
            metrics.guard_refused.labels(refused.label).inc()
            metrics.errors.labels("content_filter").inc()
            raise APIError(400, f"the {param} was refused by this server's guard: it reads as {refused.label!r} "
                                f"(probability {refused.score:.3f}; refused labels together {refused.refused_score:.3f}"
                                f", threshold {b.guard.threshold})", param=param, code="content_filter",
                           extra={"guard": {"label": refused.label, "score": refused.score}})

    async def _submit(prompts: list, params: SamplingParams, lora: LoRARequest | None) -> list:
        """Hand every prompt to the engine, or none: a refusal aborts those already accepted."""
        streams = []
        try:
            for p in prompts:
                streams.append(await b.engine.submit(p, params, lora_request=lora))
        except BaseException as e:
            for s in streams:
                s.abort()
            raise _refusal(e, metrics) from None
        return [_tracked(s, metrics) for s in streams]

    def _model(name: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model); an unknown name is a 404."""
        if name is None or name == model_name:
            return None
        if name in loras:
            return loras[name]
        served = ", ".join(f"`{n}`" for n in [model_name, *loras])
        raise APIError(404, f"The model `{name}` does not exist; this server serves {served}", param="model",
                       code="model_not_found")


    def _check_ids(ids: list[int], field: str) -> None:
        vocab = b.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"{field} holds token id {bad[0]}, outside the vocabulary [0, {vocab})", param=field)

    def _prompts(prompt: Any) -> list:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"prompt holds {len(prompts)} prompts; at most {limits.max_prompts} per request",
                           param="prompt")
        for p in prompts:  # the engine checks token ids and lengths when it takes them (see _refusal)
            if not p:
                raise APIError(400, "prompt is empty; give at least one character or token", param="prompt")
        return prompts

    def _render(messages) -> str:
        try:
            return template.render([m.model_dump() for m in messages])
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None

    def _params(body, max_tokens: int | None, logprobs: int | None, stop: list[str] | None = None,
                prompt_logprobs: int | None = None) -> SamplingParams:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if not 1 <= body.n <= limits.max_n:
            raise APIError(400, f"n must be an integer in [1, {limits.max_n}], got {body.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1 (0 only with echo), got {max_tokens}",
                           param="max_tokens")
        kwargs = {k: getattr(body, k) for k in ("n", "temperature", "top_p", "top_k", "min_p", "seed",
                                                  "presence_penalty", "frequency_penalty", "repetition_penalty",
                                                  "stop_token_ids", "min_tokens", "ignore_eos",
                                                  "include_stop_str_in_output", "skip_special_tokens")
                  if getattr(body, k) is not None}
        kwargs["stop"] = stop if stop is not None else body.stop
        if body.logit_bias is not None:
            try:
                kwargs["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                    **kwargs)
            params.check_vocab(b.vocab)
        except (ValueError, TypeError) as e:
            raise bad_value(e) from None
        return params

    def _prompt_text(out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else b.tokenizer.decode(out.prompt_token_ids)

    def _token(i: int) -> str:
        return b.tokenizer.decode([i])

    def _completion_logprobs(out: RequestOutput, ids: list[int], lps: list, with_prompt: bool,
                             offset: int = 0) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        pos = offset
        pairs = []
        if with_prompt:
            plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            pairs += list(zip(out.prompt_token_ids, plp, strict=False))
            pos = 0
        pairs += list(zip(ids, lps, strict=False))
        for tok, entry in pairs:
            tokens.append(_token(tok))
            offsets.append(pos)
            pos += len(b.tokenizer.decode([tok], skip_special_tokens=True))  # specials take no room in the text
            values.append(None if entry is None else entry[tok].logprob)
            tops.append(None if entry is None else {_token(k): v.logprob for k, v in entry.items()})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(ids: list[int], lps: list[dict[int, Logprob]], k: int) -> list[dict]:
        out = []
        for tok, entry in zip(ids, lps, strict=False):
            piece = _token(tok)
            top = sorted(((t, v) for t, v in entry.items() if v.rank <= k), key=lambda tv: tv[1].rank)
            out.append({"token": piece, "logprob": entry[tok].logprob, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": _token(t), "logprob": v.logprob,
                                          "bytes": list(_token(t).encode())} for t, v in top]})
        return out

    return app


# ---- streaming plumbing ---------------------------------------------------------------------------------

def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _tracked(stream, metrics: Metrics) -> AsyncIterator[RequestOutput]:
    """Outputs of one accepted request, timed into the metrics; an engine failure becomes an API error."""
    start = time.perf_counter()
    first = previous = None
    try:
        async for out in stream:
            now = time.perf_counter()
            if first is None and any(c.token_ids for c in out.outputs):
                first = now
                metrics.ttft.observe(now - start)
            elif previous is not None:
                metrics.itl.observe(now - previous)
            previous = now
            if out.finished:
                metrics.e2e.observe(now - start)
                metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                for c in out.outputs:
                    metrics.generation_tokens.inc(len(c.token_ids))
                    metrics.requests.labels(c.finish_reason or "unknown").inc()
            yield out
    except EngineDeadError as e:
        metrics.errors.labels("engine_dead").inc()
        raise APIError(503, str(e)) from None
    finally:
        stream.abort()


def _refusal(e: BaseException, metrics: Metrics) -> BaseException:
    """The API error for a request the engine did not accept."""
    if isinstance(e, QueueFullError):
        metrics.errors.labels("queue_full").inc()
        return APIError(503, f"the server is busy ({e}); retry later", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        metrics.errors.labels("engine_dead").inc()
        return APIError(503, str(e))
    if isinstance(e, (ValueError, TypeError)):
        metrics.errors.labels("bad_request").inc()
        if isinstance(e, ContextLengthError):
            return APIError(400, f"This model's maximum context length is {e.limit} tokens; your request has "
                                 f"{e.prompt_tokens} prompt tokens ({e})", param="prompt",
                            code="context_length_exceeded")
        return bad_value(e)
    return e


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the request's position. Leaving early
    (a disconnected client) cancels every request."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_ = len(tasks)
    try:
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _finals(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for i, out in _merge(streams):
        if out.finished:
            finals[i] = out
    return [finals[i] for i in range(len(streams))]


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events ending with ``data: [DONE]``; an error after the stream began is sent as an event."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
