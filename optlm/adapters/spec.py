"""Adapter specs as the command line writes them: ``r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj`` (LoRA)
and ``bottleneck,reduction=16,variant=houlsby,act=relu``. A bare word after a list key adds to that list, so
``targets=q_proj,v_proj`` is two targets."""

from __future__ import annotations

from .bottleneck import BottleneckConfig
from .lora import LoraConfig
from .state import AdapterError

LORA_KEYS = {"r": ("r", int), "alpha": ("lora_alpha", float), "dropout": ("lora_dropout", float),
             "targets": ("target_modules", list), "bias": ("bias", str), "rslora": ("use_rslora", bool),
             "modules_to_save": ("modules_to_save", list), "init": ("init_lora_weights", str)}
BOTTLENECK_KEYS = {"reduction": ("reduction_factor", int), "variant": ("variant", str),
                   "act": ("non_linearity", str), "modules_to_save": ("modules_to_save", list)}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_spec(spec: str, kind: str = "lora") -> LoraConfig | BottleneckConfig:
    """A config from ``spec``; ``kind`` is the default when the spec does not start with ``lora`` or
    ``bottleneck``. Errors name the key and list the known ones."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts and parts[0] in ("lora", "bottleneck"):
        kind = parts.pop(0)
    keys = LORA_KEYS if kind == "lora" else BOTTLENECK_KEYS
    values: dict[str, object] = {}
    last = None
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            if last is None or keys[last][1] is not list:
                raise AdapterError(f"adapter spec {spec!r}: {part!r} is not key=value (keys: {', '.join(keys)})")
            values[keys[last][0]].append(part)
            continue
        key = key.strip().replace("-", "_")
        if key not in keys:
            raise AdapterError(f"adapter spec {spec!r}: unknown key {key!r} for a {kind} adapter; "
                               f"known: {', '.join(keys)}")
        field, kind_of = keys[key]
        values[field] = _convert(spec, key, value.strip(), kind_of)
        last = key
    if values.get("target_modules") == ["all-linear"]:
        values["target_modules"] = "all-linear"  # peft's keyword, not a module name
    if kind == "lora" and values.get("init_lora_weights") in TRUE + FALSE:
        values["init_lora_weights"] = values["init_lora_weights"] in TRUE
    return LoraConfig(**values) if kind == "lora" else BottleneckConfig(**values)


def _convert(spec: str, key: str, value: str, kind_of: type) -> object:
    try:
        if kind_of is list:
            return [value] if value else []
        if kind_of is bool:
            if value.lower() not in TRUE + FALSE:
                raise ValueError
            return value.lower() in TRUE
        if kind_of is float:
            number = float(value)
            return int(number) if number.is_integer() else number
        return kind_of(value)
    except ValueError:
        raise AdapterError(f"adapter spec {spec!r}: {key}={value!r} is not a valid {kind_of.__name__}") from None
