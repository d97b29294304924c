"""The transformers-compatible façade: each family's classes, and Auto classes that pick the family from a
checkpoint's ``model_type`` (``AutoModelForCausalLM.from_pretrained("EleutherAI/gpt-neo-125m")``)."""

from __future__ import annotations

import os
from typing import Any

from .. import checkpoint as ckpt
from ..models import config_class
from ..models.config import ModelConfig, read_json
from .base import ModelOutput, PreTrainedModel, causal_lm_loss, parse_device, parse_dtype
from .gpt_neo import (
    GPTNeoForCausalLM,
    GPTNeoForQuestionAnswering,
    GPTNeoForSequenceClassification,
    GPTNeoForTokenClassification,
    GPTNeoModel,
)
from .opt import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification, OPTModel

OPTOutput = ModelOutput  # the name optlm's OPT classes returned before there was a second family

# model_type → task → class. A family without a head for a task (OPT has no token classification in
# transformers either) is left out of that task.
CLASSES: dict[str, dict[str, type[PreTrainedModel]]] = {
    "opt": {"base": OPTModel, "causal-lm": OPTForCausalLM, "sequence-classification": OPTForSequenceClassification,
            "question-answering": OPTForQuestionAnswering},
    "gpt_neo": {"base": GPTNeoModel, "causal-lm": GPTNeoForCausalLM,
                "sequence-classification": GPTNeoForSequenceClassification,
                "question-answering": GPTNeoForQuestionAnswering,
                "token-classification": GPTNeoForTokenClassification},
}


def model_class(model_type: str, task: str = "causal-lm") -> type[PreTrainedModel]:
    """The class for ``task`` in the family ``model_type``."""
    config_class(model_type)  # an unknown family is named as such
    classes = CLASSES[model_type]
    if task not in classes:
        raise ValueError(f"{model_type} models have no {task} head in optlm (nor in transformers); "
                         f"available: {', '.join(t for t in classes if t != 'base')}")
    return classes[task]


def checkpoint_model_type(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> str:
    """The ``model_type`` of a checkpoint directory or hub id (config.json only; weights are not fetched)."""
    directory = ckpt.resolve(path_or_hub_id, revision, weights=False)
    if not (directory / "config.json").is_file():
        raise ckpt.CheckpointError(f"{directory} has no config.json; a checkpoint directory needs one")
    d = read_json(directory / "config.json")
    return d.get("model_type", "opt") if isinstance(d, dict) else "opt"


class _Auto:
    """transformers' Auto classes: the family comes from the checkpoint's (or config's) ``model_type``."""

    task = "base"

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(path) "
                        "or .from_config(config)")

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *args: Any, **kwargs: Any) -> PreTrainedModel:
        model_type = checkpoint_model_type(path_or_hub_id, kwargs.get("revision"))
        return model_class(model_type, cls.task).from_pretrained(path_or_hub_id, *args, **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig) -> PreTrainedModel:
        """A randomly initialised model of ``config``'s family."""
        return model_class(config.model_type, cls.task)(config)


class AutoModel(_Auto):
    task = "base"


class AutoModelForCausalLM(_Auto):
    task = "causal-lm"


class AutoModelForSequenceClassification(_Auto):
    task = "sequence-classification"


class AutoModelForQuestionAnswering(_Auto):
    task = "question-answering"


class AutoModelForTokenClassification(_Auto):
    task = "token-classification"


__all__ = [
    "AutoModel", "AutoModelForCausalLM", "AutoModelForQuestionAnswering", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "CLASSES", "GPTNeoForCausalLM", "GPTNeoForQuestionAnswering",
    "GPTNeoForSequenceClassification", "GPTNeoForTokenClassification", "GPTNeoModel", "ModelOutput",
    "OPTForCausalLM", "OPTForQuestionAnswering", "OPTForSequenceClassification", "OPTModel", "OPTOutput",
    "PreTrainedModel", "causal_lm_loss", "checkpoint_model_type", "model_class", "parse_device", "parse_dtype",
]
