"""``optlm serve``: the OpenAI-compatible server (FastAPI on uvicorn) over the continuous-batching engine."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $OPTLM_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit (default: the model's)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for the paged KV cache (default: what --max-num-seqs full sequences need, at most 2)")
    p.add_argument("--max-waiting", type=int, default=512, help="requests queued before new ones get 503")
    p.add_argument("--max-n", type=int, default=16, help="largest n per request")
    p.add_argument("--max-prompts", type=int, default=64, help="most prompts in one completions request")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish on Ctrl-C / SIGTERM")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cpu)")
    p.add_argument("--quantize", choices=("int8", "int4", "int8-dynamic"), default=None,
                   help="weight quantization (see optlm generate --help)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model across N processes on this machine (started here; see optlm generate)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=DIR",
                   help="adapters to serve (LoRA or bottleneck, peft's format): a request's model field picks one "
                        "by NAME; they run beside the base model in the same batches")
    p.add_argument("--max-loras", type=int, default=8, help="adapters loaded at once (unused ones are evicted)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (loading only from --lora-root)")
    p.add_argument("--guard", default=None, metavar="DIR",
                   help="screen every prompt / user message with this sequence classifier (a checkpoint, or an "
                        "adapter trained with --task sequence-classification) before generation; refused "
                        "requests get a 400 with code content_filter")
    p.add_argument("--guard-threshold", type=float, default=0.5,
                   help="refuse when the guard's refused labels together reach this probability")
    p.add_argument("--guard-allow", nargs="+", default=None, metavar="LABEL",
                   help="the guard's labels that pass (default: a label named in_domain, allowed, safe …)")
    p.add_argument("--lora-root", default=None,
                   help="the directory runtime-loaded adapters must be under (needed by --allow-runtime-lora)")


def _lora_modules(items: list[str]):
    """``NAME=DIR`` (or vLLM's JSON form ``{"name": ..., "path": ...}``) → adapters by name."""
    import json

    from ..engine.lora import LoRARequest

    loras = {}
    for i, item in enumerate(items, start=1):
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {item!r}: JSON needs \"name\" and \"path\" ({e})") from None
        else:
            name, eq, path = item.partition("=")
            if not eq or not name or not path:
                raise ValueError(f"--lora-modules {item!r}: use NAME=DIR")
        if name in loras:
            raise ValueError(f"--lora-modules names {name!r} twice")
        loras[name] = LoRARequest(name, i, path)
    return loras


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, except that Ctrl-C / SIGTERM end it normally: it stops accepting, lets requests in
        flight finish (up to the shutdown timeout), and the process exits 0 (uvicorn re-raises the signal)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import Limits, build_app
    except ImportError as e:
        raise ImportError(f"optlm serve needs FastAPI, uvicorn and prometheus_client ({e}); "
                          "pip install 'optlm[serve]'") from None
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import LLMEngine
    from ..lm import load

    for name in ("port", "max_num_seqs", "max_waiting", "max_n", "max_prompts", "tensor_parallel_size"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise ValueError(f"--{name.replace('_', '-')} {value} is out of range")
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPTLM_API_KEY") or None
    loras = _lora_modules(args.lora_modules)
    if args.allow_runtime_lora and args.lora_root is None:
        raise ValueError("--allow-runtime-lora needs --lora-root: the directory adapters may be loaded from")
    if args.lora_root is not None and not os.path.isdir(args.lora_root):
        raise ValueError(f"--lora-root {args.lora_root} is not a directory")
    enable_lora = bool(loras) or args.allow_runtime_lora
    memory = None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)
    name = args.served_model_name or (args.model if args.model is not None else "opt-gutenberg")
    if name in loras:
        raise ValueError(f"--lora-modules uses the name {name!r}, which is the base model's; rename the adapter")
    if args.guard is not None and not 0 < args.guard_threshold <= 1:
        raise ValueError(f"--guard-threshold must be in (0, 1], got {args.guard_threshold}")
    if args.guard is None and (args.guard_allow is not None or args.guard_threshold != 0.5):
        raise ValueError("--guard-threshold and --guard-allow need --guard DIR")
    limits = Limits(max_n=args.max_n, max_prompts=args.max_prompts, max_body_bytes=int(args.max_body_mb * 2**20))
    from ..parallel import joined

    split = args.tensor_parallel_size > 1 or joined()
    if split and enable_lora:
        raise ValueError("adapters are not served across tensor-parallel ranks yet; drop --lora-modules / "
                         "--allow-runtime-lora, or merge a LoRA into its base (optlm merge-lora) and serve that")
    load_kwargs = dict(dtype=args.dtype, device=args.device, quantize=args.quantize, revision=args.revision)
    engine_kwargs = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, kv_cache_memory=memory)
    if joined():  # torchrun: rank 0 serves, the other ranks follow its engine's calls
        from ..parallel.workers import follow_group, torchrun_rank

        if torchrun_rank(args.tensor_parallel_size) != 0:
            follow_group(args.model, load_kwargs, engine_kwargs)
            return 0

    def load_backend() -> tuple[AsyncEngine, object]:
        if split:  # the engines run in the ranks; this process drives them step by step
            from ..engine.llm import LLM
            from ..parallel.workers import GroupWorkers, RemoteEngine

            if joined():
                workers = GroupWorkers(args.model, load_kwargs, engine_kwargs)
                engine, tokenizer = RemoteEngine(workers, workers.lm.tokenizer), workers.lm.tokenizer
            else:
                llm = LLM(args.model, **load_kwargs, **engine_kwargs, tensor_parallel_size=args.tensor_parallel_size)
                engine, tokenizer = llm.remote_engine(), llm.get_tokenizer()
        else:
            lm = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, revision=args.revision)
            engine, tokenizer = LLMEngine(lm.model, lm.tokenizer, max_num_seqs=args.max_num_seqs,
                                          max_model_len=args.max_model_len, kv_cache_memory=memory,
                                          enable_lora=enable_lora, max_loras=args.max_loras), lm.tokenizer
        for request in loras.values():  # load each once now: a bad adapter stops the server before it is ready
            try:
                engine.add_lora(request)
            except ValueError as e:
                raise ValueError(f"--lora-modules {request.lora_name}={request.lora_path}: {e}") from None
        guard = None
        if args.guard is not None:
            from ..train.predict import load_classifier
            from .guard import Guard

            adapter = os.path.isfile(os.path.join(args.guard, "adapter_config.json"))
            classifier = load_classifier(None if adapter else args.guard, args.guard if adapter else None,
                                         device=args.device)
            guard = Guard(classifier, args.guard_threshold, args.guard_allow, source=f"--guard {args.guard}")
        print(f"optlm serve: {name} loaded; ready", file=sys.stderr, flush=True)
        return AsyncEngine(engine, max_waiting=args.max_waiting), tokenizer, guard

    def announce() -> None:
        print(f"optlm serve: {name} on http://{args.host}:{args.port} (OpenAI API under /v1; /health is 503 "
              "until the model is loaded; Ctrl-C stops)", file=sys.stderr, flush=True)

    failed: list[BaseException] = []

    def load_failed(error: BaseException) -> None:
        print(f"optlm serve: error: {error}", file=sys.stderr, flush=True)
        failed.append(error)
        server.should_exit = True

    # The port opens at once and the model loads behind it: /health answers 503 until it is ready.
    app = build_app(None, None, name, api_key=api_key, limits=limits, on_start=announce, load=load_backend,
                    on_load_error=load_failed, loras=loras, allow_runtime_lora=args.allow_runtime_lora,
                    lora_root=args.lora_root)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _server_class(uvicorn)(config)
    try:
        server.run()
    finally:
        engine = app.state.backend.engine
        if engine is not None:
            engine.shutdown(timeout=args.shutdown_timeout)
            # Tensor-parallel ranks are released once the engine loop has stopped (a step still running would be
            # cut off mid-collective; then the process ends and the ranks go with it).
            if hasattr(engine.engine, "close") and engine.stopped:
                engine.engine.close()
    return 1 if failed else 0
