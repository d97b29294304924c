"""Bottleneck adapters: a small residual MLP after a sublayer's output, h → h + up(act(down(h))).

Two placements: ``houlsby`` (Houlsby et al. 2019: after the attention block and after the feed-forward block)
and ``pfeiffer`` (Pfeiffer et al. 2021: after the feed-forward block only). ``down`` maps the hidden size d to
d / ``reduction_factor``; ``up`` starts at zero, so a fresh adapter leaves the model unchanged. The adapter
modules live beside the sublayers (``layers.N.attn_adapter``, ``layers.N.mlp_adapter``) and run as forward
hooks on them, so no base module is renamed and LoRA can target the same layers.

AdapterHub's ``adapters`` library does not install beside transformers 5 (it pins transformers 4.x), so these
adapters are saved in optlm's own documented format (``peft_format.py``): ``adapter_config.json`` with
``peft_type: "BOTTLENECK"`` and ``adapter_model.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import Tensor, nn

from ..models.core import ACTIVATIONS as _ACTIVATIONS
from .lora import add_heads, match_mode
from .state import AdapterError, AdapterLayer, AdapterState, ensure_state

VARIANTS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}
SLOTS = {"attention": "attn_adapter", "mlp": "mlp_adapter"}  # where in each layer the adapter modules live
FORMAT = "optlm-bottleneck"


@dataclass
class BottleneckConfig:
    """A bottleneck adapter: ``variant`` (``houlsby`` | ``pfeiffer``), hidden size / ``reduction_factor``
    bottleneck units, ``non_linearity`` one of relu, gelu, gelu_new, silu, swish, tanh."""

    variant: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "BOTTLENECK"
    format: str = FORMAT
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise AdapterError(f"bottleneck variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        r = self.reduction_factor
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterError(f"reduction_factor must be an integer >= 1, got {r!r}")
        if self.non_linearity not in _ACTIVATIONS:
            raise AdapterError(f"non_linearity must be one of {', '.join(_ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.format != FORMAT or self.format_version != 1:
            raise AdapterError(f"this bottleneck adapter is in format {self.format!r} version {self.format_version}; "
                               f"this optlm reads {FORMAT!r} version 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BottleneckConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Bottleneck(AdapterLayer):
    """The bottleneck adapters at one point of one layer, one per adapter name."""

    per_adapter = ("down", "up")

    def __init__(self, hidden: int, state: AdapterState):
        super().__init__()
        self.hidden = hidden
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.act: dict[str, str] = {}
        self.bind(state)

    def add(self, name: str, reduction: int, act: str, like: Tensor) -> None:
        units = max(1, self.hidden // reduction)
        kw = {"device": like.device, "dtype": like.dtype}
        self.down[name] = nn.Linear(self.hidden, units, **kw)  # nn.Linear's default (Kaiming-uniform) init
        self.up[name] = nn.Linear(units, self.hidden, **kw)
        nn.init.zeros_(self.up[name].weight)
        nn.init.zeros_(self.up[name].bias)
        self.act[name] = act

    def remove(self, name: str) -> None:
        del self.down[name], self.up[name], self.act[name]

    def detach(self) -> None:
        """Take this adapter point out of its layer (its hook and its module)."""
        layer, slot, handle = self._detach
        handle.remove()
        delattr(layer, slot)

    def _delta(self, name: str, h: Tensor) -> Tensor:
        return self.up[name](_ACTIVATIONS[self.act[name]](self.down[name](h)))

    def forward(self, h: Tensor) -> Tensor:
        if self.state.rows is not None:
            return self.per_row(h, h, self._delta)
        for name in self.chosen():
            h = h + self._delta(name, h)
        return h


def _hook(adapter: Bottleneck):
    def run(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return adapter(output)
    return run


def add_bottleneck(model: nn.Module, config: BottleneckConfig, name: str = "default") -> list[str]:
    """Add bottleneck adapter ``name`` in place; returns the names of the adapter modules it added to."""
    points = getattr(model, "bottleneck_points", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if points is None or decoder is None:
        raise AdapterError(f"{type(model).__name__} does not declare where bottleneck adapters go")
    state = ensure_state(model)
    state.register(name, "bottleneck", config)
    like = next(p for p in decoder.parameters() if p.is_floating_point())
    hidden = model.config.hidden_size
    added = []
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    for i, layer in enumerate(decoder.layers):
        for where in VARIANTS[config.variant]:
            slot = SLOTS[where]
            adapter = getattr(layer, slot, None)
            if adapter is None:
                adapter = Bottleneck(hidden, state)
                layer.add_module(slot, adapter)
                handle = layer.get_submodule(points[where]).register_forward_hook(_hook(adapter))
                object.__setattr__(adapter, "_detach", (layer, slot, handle))
            adapter.add(name, config.reduction_factor, config.non_linearity, like)
            adapter.train(model.training)
            added.append(f"{prefix}.layers.{i}.{slot}")
    if config.modules_to_save:
        add_heads(model, list(config.modules_to_save), name)
        match_mode(model)
    return added
