"""optlm: Meta's OPT (and EleutherAI's GPT-Neo) language models in lean PyTorch, numerically matching the
reference implementation.

The public names below load on first use (PEP 562), so ``import optlm`` stays light and the JAX and
TensorFlow ports (``optlm.flax``, ``optlm.tf``) run without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_WHERE = {
    **dict.fromkeys(("LLM", "CompletionOutput", "LLMEngine", "LoRARequest", "RequestOutput", "SamplingParams"),
                    ".engine"),
    **dict.fromkeys(("evaluate_file", "perplexity"), ".evaluate"),
    **dict.fromkeys(("AutoModel", "AutoModelForCausalLM", "AutoModelForQuestionAnswering",
                     "AutoModelForSequenceClassification", "AutoModelForTokenClassification", "GPTNeoForCausalLM",
                     "GPTNeoForQuestionAnswering", "GPTNeoForSequenceClassification", "GPTNeoForTokenClassification",
                     "GPTNeoModel", "ModelOutput", "OPTForCausalLM", "OPTForQuestionAnswering",
                     "OPTForSequenceClassification", "OPTModel", "OPTOutput"), ".hf"),
    "KVCache": ".kv_cache",
    **dict.fromkeys(("LM", "load"), ".lm"),
    **dict.fromkeys(("GPTNeoConfig", "OPTConfig"), ".models"),
    "quantize": ".quantize",
    **dict.fromkeys(("StreamDecoder", "Tokenizer"), ".tokenizer"),
    "train_tokenizer": ".tokenizer_train",
    **dict.fromkeys(("TrainArgs", "train"), ".train"),
}

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'optlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


class _Package(types.ModuleType):
    """``optlm.quantize`` and ``optlm.train`` are functions, named as their modules are: importing such a
    module (which Python records as an attribute of its package) must not hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == "." + name:
            return  # the module stays reachable through sys.modules and its full import path
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .engine import LLM, CompletionOutput, LLMEngine, LoRARequest, RequestOutput, SamplingParams
    from .evaluate import evaluate_file, perplexity
    from .hf import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        GPTNeoForCausalLM,
        GPTNeoForQuestionAnswering,
        GPTNeoForSequenceClassification,
        GPTNeoForTokenClassification,
        GPTNeoModel,
        ModelOutput,
        OPTForCausalLM,
        OPTForQuestionAnswering,
        OPTForSequenceClassification,
        OPTModel,
        OPTOutput,
    )
    from .kv_cache import KVCache
    from .lm import LM, load
    from .models import GPTNeoConfig, OPTConfig
    from .quantize import quantize
    from .tokenizer import StreamDecoder, Tokenizer
    from .tokenizer_train import train_tokenizer
    from .train import TrainArgs, train

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "GPTNeoConfig",
    "GPTNeoForCausalLM",
    "GPTNeoForQuestionAnswering",
    "GPTNeoForSequenceClassification",
    "GPTNeoForTokenClassification",
    "GPTNeoModel",
    "ModelOutput",
    "LLM",
    "CompletionOutput",
    "LLMEngine",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "KVCache",
    "LM",
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
    "OPTOutput",
    "StreamDecoder",
    "Tokenizer",
    "TrainArgs",
    "evaluate_file",
    "load",
    "perplexity",
    "quantize",
    "train",
    "train_tokenizer",
]
