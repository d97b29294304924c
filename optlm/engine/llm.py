"""The offline API with vLLM's names: ``LLM(model).generate(prompts, SamplingParams(...))``.

All prompts are submitted at once and run together by the continuous-batching engine; the results come back in
prompt order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from .engine import LLMEngine, RequestOutput
from .lora import LoRARequest
from .params import SamplingParams


class LLM:
    """A model, its tokenizer and an engine.

    ``model``: a checkpoint directory or hub id, None for the bundled model, or an already built causal LM
    (then pass ``tokenizer`` — a Tokenizer or a path — for text prompts and outputs). ``dtype``, ``device``,
    ``quantize`` and ``revision`` are :func:`optlm.load`'s. ``max_num_seqs``, ``max_model_len``,
    ``kv_cache_memory`` (bytes), ``block_size`` and ``max_num_batched_tokens`` size the engine
    (:class:`LLMEngine`). ``enable_lora=True`` lets each prompt run with its own adapter
    (``generate(..., lora_request=LoRARequest(name, id, path))``), ``max_loras`` of them loaded at once.
    ``tensor_parallel_size=N`` splits the model across N worker processes started here (a checkpoint path or
    hub id; :mod:`optlm.parallel`): ``generate`` runs on all of them and answers as one; ``close()`` stops them.
    In a script torchrun runs N times, each process is instead one of the ranks, holding its share; every rank
    runs the script's calls alike and gets the same outputs. ``fast=False`` (or ``OPTLM_FAST=0`` in the
    environment) loads the model without optlm's output-preserving speed-ups (:func:`optlm.fast.optimize`).
    """

    def __init__(self, model: str | os.PathLike | torch.nn.Module | None = None, tokenizer: Any = None, *,
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 quantize: str | None = None, revision: str | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, kv_cache_memory: int | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 512, enable_lora: bool = False, max_loras: int = 8,
                 tensor_parallel_size: int = 1, fast: bool | None = None):
        from ..parallel import joined

        self._workers = None
        self._counter = 0
        in_group = tensor_parallel_size != 1 and joined()  # under torchrun: this process is one of the ranks
        if tensor_parallel_size != 1 and not in_group:
            self._start_workers(model, tokenizer, tensor_parallel_size, enable_lora, quantize,
                                dict(dtype=dtype, device=device, revision=revision, tokenizer=tokenizer, fast=fast),
                                dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                     kv_cache_memory=kv_cache_memory, block_size=block_size,
                                     max_num_batched_tokens=max_num_batched_tokens))
            return
        if isinstance(model, torch.nn.Module):
            if isinstance(tokenizer, (str, os.PathLike)):
                from ..tokenizer import Tokenizer

                tokenizer = Tokenizer.from_pretrained(tokenizer)
        else:
            from ..lm import load

            if in_group:
                _join_group(tensor_parallel_size)
            lm = load(model, dtype=dtype, device=device, quantize=quantize, revision=revision, tokenizer=tokenizer,
                      tensor_parallel=in_group, fast=fast)
            model, tokenizer = lm.model, lm.tokenizer
        self.llm_engine = LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                    kv_cache_memory=kv_cache_memory, block_size=block_size,
                                    max_num_batched_tokens=max_num_batched_tokens, enable_lora=enable_lora,
                                    max_loras=max_loras)

    def _start_workers(self, model: Any, tokenizer: Any, world: int, enable_lora: bool, quantize: str | None,
                       load_kwargs: dict, engine_kwargs: dict) -> None:
        """``tensor_parallel_size > 1``: the model lives in ``world`` worker processes (optlm.parallel.workers)."""
        from ..parallel.workers import start_workers
        from ..tokenizer import Tokenizer

        if enable_lora:
            raise ValueError("tensor parallelism does not take adapters yet; drop enable_lora")
        self._workers, directory = start_workers(model, world, {**load_kwargs, "quantize": quantize}, engine_kwargs)
        source = tokenizer if tokenizer is not None else directory
        self.tokenizer = source if not isinstance(source, (str, os.PathLike)) else Tokenizer.from_pretrained(source)
        self.llm_engine = None  # the engines live in the worker processes

    def remote_engine(self):
        """A tensor-parallel model's engines, driven step by step from this process with ``LLMEngine``'s calls
        (:class:`optlm.parallel.workers.RemoteEngine`; what ``optlm serve --tensor-parallel-size`` runs)."""
        from ..parallel.workers import RemoteEngine

        if self._workers is None:
            raise ValueError("remote_engine() is for a tensor-parallel LLM; use llm_engine")
        return RemoteEngine(self._workers, self.tokenizer)

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel model (also done when it is garbage-collected)."""
        if self._workers is not None:
            self._workers.close()

    def get_tokenizer(self) -> Any:
        return self.tokenizer if self.llm_engine is None else self.llm_engine.tokenizer

    def generate(self, prompts: str | Seq[str] | Seq[int] | Seq[Seq[int]] | Seq[dict],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Completions of every prompt (text, a list of token ids, a list of either, or ``{"prompt_token_ids":
        [...]}`` dicts), with one ``SamplingParams`` for all or one per prompt, and one adapter for all or one
        per prompt (None: the base model); finished ``RequestOutput``s in prompt order. A bad prompt or setting
        raises ValueError naming the prompt before anything runs."""
        if self._workers is not None:
            return self._workers.call("generate", prompts, sampling_params, use_tqdm=False,
                                      lora_request=lora_request)
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and all(isinstance(i, int) for i in prompts)):
            prompts = [prompts]  # one prompt (text or token ids)
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts; give one, or one per "
                                 "prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            adapters = [lora_request] * len(prompts)
        else:
            adapters = list(lora_request)
            if len(adapters) != len(prompts):
                raise ValueError(f"{len(adapters)} lora requests for {len(prompts)} prompts; give one, or one per "
                                 "prompt")
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, p, adapter) in enumerate(zip(prompts, params, adapters, strict=True)):
                rid = f"{self._counter}"
                self._counter += 1
                try:
                    engine.add_request(rid, prompt, p, adapter)
                except (ValueError, TypeError) as e:
                    e.args = (f"prompt {i}: {e}", *e.args[1:])  # its own type and fields (ContextLengthError's)
                    raise e from None
                ids.append(rid)
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="Processed prompts", unit="prompt", disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    if not engine.has_unfinished_requests():
                        raise RuntimeError("the engine stopped with requests unanswered")  # an internal error
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)  # an error or Ctrl-C leaves no request behind in the engine
            raise
        return [results[rid] for rid in ids]


def _join_group(size: int) -> None:
    """``LLM(..., tensor_parallel_size=N)`` in a script torchrun runs N times: each process is one rank and
    holds its share; every rank runs the script's calls alike (same requests, same seed), so all get the same
    outputs."""
    from ..parallel.launch import init_from_env, shared_seed

    _, world = init_from_env()
    if world != size:
        raise ValueError(f"tensor_parallel_size={size}, but torchrun started {world} processes; under torchrun "
                         "the model is split across all of them")
    torch.manual_seed(shared_seed())  # unseeded requests draw their seeds from here: alike on every rank
