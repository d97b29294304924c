"""What every family's configuration shares: field checking, hub ``config.json`` reading and writing, presets.

A family's config is a dataclass with transformers' field names and defaults (so a hub file reads unchanged)
that subclasses :class:`ModelConfig` and names its ``model_type``, its default architecture and its presets.
Unknown keys in a file (``torch_dtype``, ``prefix`` …) are kept in ``extra`` and written back on save.

Besides its own fields, every config answers the questions the rest of optlm asks of a model (the engine, the
caches, quantization, adapters never read a family's own field names): ``num_hidden_layers``,
``num_attention_heads``, ``head_dim``, ``hidden_size``, ``output_dim`` (width of the final hidden states),
``max_position_embeddings``, ``vocab_size``, ``layer_windows`` (per layer: a local-attention window or None)
and ``init_std``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

_NAMES = {"int": "integer", "float": "number", "bool": "true or false", "str": "string", "dict": "JSON object",
          "list": "JSON list"}
_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
           "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
           "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, (list, tuple))}


def _kind(annotation: str) -> tuple[str | None, bool]:
    """``"int | None"`` → ("int", True): the declared kind of a field and whether None is allowed (the
    annotations are strings under ``from __future__ import annotations``)."""
    parts = [p.strip() for p in annotation.split("|")]
    base = parts[0].split("[")[0]
    return (base if base in _CHECKS else None), "None" in parts


@dataclass
class ModelConfig:
    """Base of the families' config dataclasses (see the module docstring): the task-head fields every family
    shares, as transformers' PreTrainedConfig has them, and the unknown keys of a file (``extra``)."""

    # Sequence classification head size (transformers derives it from id2label; both are accepted).
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type: ClassVar[str]
    family_name: ClassVar[str]  # as people write it: "OPT", "GPT-Neo"
    architecture: ClassVar[str]  # the class transformers should build from a file this config writes
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    hub_org: ClassVar[str] = ""  # "facebook/opt-125m" names the preset "opt-125m"
    dropout_fields: ClassVar[tuple[str, ...]] = ("dropout",)  # what a single "dropout" setting sets

    def _check_types(self) -> None:
        """Each field holds its declared kind of value (a config.json with ``"num_hidden_layers": "two"``
        fails here, naming the field, instead of deep inside the model)."""
        for f in dataclasses.fields(self):
            kind, optional = _kind(str(f.type))
            value = getattr(self, f.name)
            if kind is None or f.name == "extra" or (value is None and optional):
                continue
            if not _CHECKS[kind](value):
                article = "an" if kind == "int" else "a"
                raise ValueError(f"config field {f.name} must be {article} {_NAMES[kind]}, got {value!r}")

    def _normalise_labels(self) -> None:
        """JSON keys are strings: ``id2label`` gets int keys back, and decides ``num_labels`` as in transformers."""
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def field_names(cls) -> set[str]:
        """The architecture fields (what ``--set`` may change)."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def output_dim(self) -> int:
        return self.hidden_size

    @property
    def layer_windows(self) -> list[int | None]:
        return [None] * self.num_hidden_layers

    def with_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """This config's fields with ``overrides`` laid over them, and any field that follows from an
        overridden one adjusted (for ``from_dict``)."""
        return {**self.to_dict(), **overrides}

    # ---- serialisation -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a {type(d).__name__}")
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config.json has model_type {model_type!r}; {cls.__name__} needs {cls.model_type!r}")
        known = cls.field_names()
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in cls._derived()}
        return cls(**kwargs, extra=extra)

    @classmethod
    def _derived(cls) -> tuple[str, ...]:
        """Keys a file carries that follow from other fields (rebuilt on load, written on save)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        d = {**self.extra}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        if d.get("id2label") is None:
            d.pop("id2label", None)
            d.pop("label2id", None)
        d["model_type"] = self.model_type
        d.setdefault("architectures", [self.architecture])
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, d: Any = None) -> ModelConfig:
        """The config in ``path``; ``d``: its contents, when the caller has read them already."""
        d = read_json(path) if d is None else d
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}; fix the file (transformers' {cls.__name__} fields and types)") from None

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A published size by name (``"opt-125m"``, ``"gpt-neo-1.3b"``; the hub organisation prefix allowed)."""
        key = name.removeprefix(cls.hub_org + "/").lower()
        if key not in cls.presets:
            raise ValueError(f"unknown {cls.family_name} size {name!r}; known: {', '.join(cls.presets)}")
        return cls(**{**cls.presets[key], **overrides})


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); is it a config.json?") from e


def check_positions(highest: int, lowest: int, limit: int) -> None:
    """Every position of an input must fit the model's ``limit`` (max_position_embeddings; -1 marks padding):
    a ValueError naming the fix otherwise. Shared by the PyTorch, JAX and TensorFlow decoders."""
    if highest >= limit or lowest < -1:
        raise ValueError(f"the input reaches position {highest} (counting from 0); this model allows "
                         f"{limit} tokens (max_position_embeddings) — shorten or truncate it")
