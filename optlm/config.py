"""OPT configuration: one dataclass with transformers' field names and defaults, plus the published sizes."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Keys the hub's config.json carries that describe the file rather than the architecture; written back
# on save so transformers recognises the checkpoint.
_HF_IDENTITY = {"model_type": "opt", "architectures": ["OPTForCausalLM"]}


@dataclass
class OPTConfig:
    """Architecture of an OPT model.

    Field names, defaults and meaning follow transformers' ``OPTConfig`` so a hub ``config.json`` reads
    unchanged. Unknown keys in a config file (``activation_dropout``, ``prefix``, ``torch_dtype`` …) are
    kept in :attr:`extra` and written back on save.
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    # True: pre-LN blocks (every size but 350m); False: post-LN (opt-350m).
    do_layer_norm_before: bool = True
    # Checkpoints converted from some metaseq runs have no final layer norm even though they are pre-LN.
    _remove_final_layer_norm: bool = False
    # Embedding width; when it differs from hidden_size the decoder has project_in / project_out (opt-350m).
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    # Sequence classification head size (transformers derives it from id2label; both are accepted).
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def _check_types(self) -> None:
        """Each field holds its declared kind of value (a config.json with ``"num_hidden_layers": "two"``
        fails here, naming the field, instead of deep inside the model)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _KINDS.get(f.name)
            if kind is None or (value is None and f.name in _OPTIONAL):
                continue
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "bool": isinstance(value, bool), "str": isinstance(value, str),
                  "dict": isinstance(value, dict)}[kind]
            if not ok:
                article = "an" if kind == "int" else "a"
                raise ValueError(f"config field {f.name} must be {article} {_NAMES[kind]}, got {value!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        """The architecture fields (what ``--set`` may change)."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- serialisation -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OPTConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a {type(d).__name__}")
        known = cls.field_names()
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        model_type = d.get("model_type", "opt")
        if model_type != "opt":
            raise ValueError(f"config.json has model_type {model_type!r}; optlm's OPT classes need 'opt'")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {**self.extra}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            d[f.name] = getattr(self, f.name)
        if self.id2label is None:
            d.pop("id2label")
            d.pop("label2id")
        d.update(_HF_IDENTITY if "architectures" not in self.extra else {"model_type": "opt"})
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> OPTConfig:
        with open(path, "rb") as f:
            try:
                d = json.loads(f.read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON ({e}); is it a config.json?") from e
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}; fix the file (transformers' OPTConfig fields and types)") from None

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OPTConfig:
        """A published OPT size: ``"opt-125m"`` … ``"opt-175b"`` (``"facebook/"`` prefix allowed)."""
        key = name.removeprefix("facebook/").lower()
        if key not in PRESETS:
            raise ValueError(f"unknown OPT size {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


# Declared kinds of the fields, checked on construction (the annotations are strings under
# ``from __future__ import annotations``, so they are spelled out here).
_KINDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
                     "word_embed_proj_dim", "num_attention_heads", "pad_token_id", "bos_token_id", "eos_token_id",
                     "num_labels"), "int"),
    **dict.fromkeys(("dropout", "attention_dropout", "layerdrop", "init_std"), "float"),
    **dict.fromkeys(("do_layer_norm_before", "_remove_final_layer_norm", "use_cache", "enable_bias",
                     "layer_norm_elementwise_affine", "tie_word_embeddings"), "bool"),
    **dict.fromkeys(("activation_function", "problem_type"), "str"),
    **dict.fromkeys(("id2label", "label2id"), "dict"),
}
_OPTIONAL = {"word_embed_proj_dim", "pad_token_id", "bos_token_id", "eos_token_id", "id2label", "label2id",
             "problem_type"}
_NAMES = {"int": "integer", "float": "number", "bool": "true or false", "str": "string", "dict": "JSON object"}


def _preset(hidden: int, layers: int, heads: int, **kw: Any) -> dict[str, Any]:
    # Every published size uses ffn_dim = 4 * hidden, 2048 positions and the 50272-row embedding
    # (50265 tokenizer entries padded up to a multiple of 8 by metaseq).
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                word_embed_proj_dim=hidden, **kw)


# Sources: the config.json of each facebook/opt-* repository on the Hugging Face hub (125m … 66b) and
# Table 1 of Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models" (175b, which the hub
# does not host; its shape also appears in metaseq's projects/OPT model card).
PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": _preset(768, 12, 12),
    # The only post-LN size; embeddings are 512 wide and projected in/out of the 1024-wide decoder.
    "opt-350m": {**_preset(1024, 24, 16), "word_embed_proj_dim": 512, "do_layer_norm_before": False},
    "opt-1.3b": _preset(2048, 24, 32),
    "opt-2.7b": _preset(2560, 32, 32),  # head_dim 80
    "opt-6.7b": _preset(4096, 32, 32),
    "opt-13b": _preset(5120, 40, 40),
    "opt-30b": _preset(7168, 48, 56),
    "opt-66b": _preset(9216, 64, 72),
    "opt-175b": _preset(12288, 96, 96),
}
