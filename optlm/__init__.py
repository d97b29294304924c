"""optlm: Meta's OPT (and EleutherAI's GPT-Neo) language models in lean PyTorch, numerically matching the
reference implementation."""

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

__version__ = "0.1.0"

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
