"""Model families: one folder each (``config.py`` with the dataclass and presets, ``model.py`` pure torch),
and the registry that picks a family by a checkpoint's ``model_type``.

Adding a family adds a folder and one line to :data:`CONFIGS` (and its façade classes to ``optlm.hf``); nothing
else in optlm names a family.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ModelConfig, read_json
from .gpt_neo.config import GPTNeoConfig
from .opt.config import OPTConfig

CONFIGS: dict[str, type[ModelConfig]] = {"opt": OPTConfig, "gpt_neo": GPTNeoConfig}


def config_class(model_type: str) -> type[ModelConfig]:
    if model_type not in CONFIGS:
        raise ValueError(f"model_type {model_type!r} is not supported; optlm runs {', '.join(CONFIGS)}")
    return CONFIGS[model_type]


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A config of the family ``d["model_type"]`` names (OPT when the key is absent, as in optlm's early files)."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a JSON object of fields, got a {type(d).__name__}")
    return config_class(d.get("model_type", "opt")).from_dict(d)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The config in a ``config.json`` file, of whichever family it names."""
    d = read_json(path)
    cls = config_class(d.get("model_type", "opt")) if isinstance(d, dict) else OPTConfig
    return cls.from_json_file(path, d)


def config_from_name(name: str, **overrides: Any) -> ModelConfig:
    """A published size of any family: ``opt-125m``, ``facebook/opt-1.3b``, ``gpt-neo-125m``, ..."""
    for cls in CONFIGS.values():
        if name.removeprefix(cls.hub_org + "/").lower() in cls.presets:
            return cls.from_name(name, **overrides)
    known = [p for cls in CONFIGS.values() for p in cls.presets]
    raise ValueError(f"unknown model size {name!r}; known: {', '.join(known)}")


__all__ = ["CONFIGS", "GPTNeoConfig", "ModelConfig", "OPTConfig", "config_class", "config_from_dict",
           "config_from_name", "read_config"]
