"""Serving many requests at once: a continuous-batching engine over a paged KV cache, with vLLM's names."""

from .engine import CompletionOutput, LLMEngine, RequestOutput
from .llm import LLM
from .lora import LoRARequest
from .params import SamplingParams
from .sampler import Logprob

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "LoRARequest", "Logprob", "RequestOutput", "SamplingParams"]
