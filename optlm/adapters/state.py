"""What every adapter layer of one model reads, and how a frame's per-row adapter index reaches it.

All adapter layers of a model share one :class:`AdapterState`: the adapters in use (``active``), whether they
are switched off (``disabled``) and, for a batch that mixes adapters, which rows use which adapter (``rows``).
The core protocol carries the per-row choice: ``Frame.adapter`` is a ``(B,)`` index into the model's adapter
table (``-1``: the base model). A pre-hook on the decoder turns it into row groups before the layers run, so
the model itself never knows adapters exist.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdapterError(ValueError):
    """An adapter that cannot be used with this model (bad files, wrong shapes, unknown names)."""


class AdapterState:
    def __init__(self) -> None:
        self.active: list[str] = []
        self.disabled = False
        self.ids: dict[str, int] = {}  # adapter name → its index in frames (stable while the adapter is loaded)
        self.kinds: dict[str, str] = {}  # adapter name → "lora" | "bottleneck"
        self.configs: dict[str, object] = {}
        # Set for one forward pass of a mixed batch: (adapter name, row indices) per adapter present; rows not
        # listed run the base model. None: every row uses ``active``.
        self.rows: list[tuple[str, Tensor]] | None = None
        self.row_ids: Tensor | None = None  # the same, as the frame gave it: (B,) adapter ids, -1 = base
        self.hook = None  # the decoder pre-hook that reads Frame.adapter
        self._next_id = 0

    def register(self, name: str, kind: str, config: object) -> None:
        if name in self.ids:
            raise AdapterError(f"an adapter named {name!r} is already loaded; pick another adapter_name or "
                               "delete_adapter() it first")
        self.ids[name], self.kinds[name], self.configs[name] = self._next_id, kind, config
        self._next_id += 1

    def forget(self, name: str) -> None:
        del self.ids[name], self.kinds[name], self.configs[name]
        self.active = [a for a in self.active if a != name]

    def set_rows(self, index: Tensor | None) -> None:
        """``index`` ``(B,)``: each row's adapter id (-1 = base), or None for every row on ``active``."""
        self.row_ids = index
        if index is None:
            self.rows = None
            return
        by_id = {i: n for n, i in self.ids.items()}
        groups = []
        for i in torch.unique(index).tolist():
            if i < 0:
                continue
            if i not in by_id:
                raise AdapterError(f"adapter index {i} is not loaded in this model (loaded: {dict(self.ids)})")
            groups.append((by_id[i], (index == i).nonzero().flatten()))
        self.rows = groups


def state_of(model: nn.Module) -> AdapterState | None:
    return getattr(model, "_adapter_state", None)


def ensure_state(model: nn.Module) -> AdapterState:
    """The model's adapter state, created (with its decoder hook) on first use."""
    state = state_of(model)
    if state is not None:
        return state
    state = AdapterState()
    object.__setattr__(model, "_adapter_state", state)  # a plain attribute, not a submodule

    def take_rows(module: nn.Module, args: tuple, kwargs: dict) -> None:
        frame = kwargs.get("frame", args[1] if len(args) > 1 else None)
        state.set_rows(getattr(frame, "adapter", None))

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    state.hook = decoder.register_forward_pre_hook(take_rows, with_kwargs=True)
    return state


def drop_state(model: nn.Module) -> None:
    """Forget the adapter state (after the last adapter is merged or removed)."""
    state = state_of(model)
    if state is not None:
        state.hook.remove()
        object.__delattr__(model, "_adapter_state")


def adapter_index(model: nn.Module, names: list[str | None], device: torch.device | None = None) -> Tensor:
    """The ``Frame.adapter`` tensor for rows using ``names`` (None = the base model)."""
    state = state_of(model)
    ids = []
    for name in names:
        if name is None:
            ids.append(-1)
        elif state is None or name not in state.ids:
            raise AdapterError(f"no adapter named {name!r} is loaded"
                               + ("" if state is None else f" (loaded: {', '.join(state.ids) or 'none'})"))
        else:
            ids.append(state.ids[name])
    return torch.tensor(ids, dtype=torch.long, device=device)


class AdapterLayer(nn.Module):
    """Base of the layers adapters add: they all read the model's shared :class:`AdapterState`.

    ``per_adapter`` names the ``ModuleDict`` attributes keyed by adapter name; ``keep_dict_name`` whether
    peft's file keys keep that attribute's name (``lora_A.weight``) or drop it (``modules_to_save``)."""

    state: AdapterState
    per_adapter: tuple[str, ...] = ()
    keep_dict_name = True

    def bind(self, state: AdapterState) -> None:
        object.__setattr__(self, "state", state)

    def names(self) -> list[str]:
        return list(getattr(self, self.per_adapter[0]).keys())

    def tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s parameters keyed as in peft's files: relative to this layer, no adapter name."""
        out = {}
        for attr in self.per_adapter:
            modules = getattr(self, attr)
            if name in modules:
                for key, t in modules[name].named_parameters():
                    out[f"{attr}.{key}" if self.keep_dict_name else key] = t
        return out

    def per_row(self, x: Tensor, y: Tensor, fn) -> Tensor:
        """Add ``fn(name, x[rows])`` to ``y[rows]`` for each adapter of a mixed batch that this layer has."""
        have = self.names()
        for name, rows in self.state.rows:
            if name in have:
                y = y.index_add(0, rows, fn(name, x.index_select(0, rows)).to(y.dtype))
        return y

    def chosen(self) -> list[str]:
        """The adapters this layer applies to every row (none while disabled or in a mixed batch)."""
        if self.state.disabled or self.state.rows is not None:
            return []
        have = self.names()
        return [a for a in self.state.active if a in have]
