"""Adapters per request: ``LoRARequest`` (vLLM's name and fields) and the engine's table of loaded adapters.

Every request names its adapter (or none); the engine loads an adapter on first use, keeps at most
``max_loras`` loaded, and evicts the least recently used one that no unfinished request needs. A batch may mix
any of the loaded adapters and the base model: each adapted layer runs the base matmul once for all rows and a
low-rank product per adapter over that adapter's rows (``optlm.adapters``), not one forward per adapter.
Bottleneck adapters (optlm's format) are served the same way.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from ..adapters import AdapterError, load_adapter, remove_adapter
from ..adapters.state import state_of


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request: a unique name, a unique positive integer id, and its directory (or hub id)."""

    lora_name: str
    lora_int_id: int
    lora_path: str | os.PathLike

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")


class AdapterTable:
    """The adapters loaded into one engine's model, by name, with how many unfinished sequences use each."""

    def __init__(self, model: nn.Module, max_loras: int):
        if not isinstance(max_loras, int) or isinstance(max_loras, bool) or max_loras < 1:
            raise ValueError(f"max_loras must be an integer >= 1, got {max_loras!r}")
        if any(getattr(m, "merged", None) for m in model.modules()):
            raise ValueError("the model has merged adapters; serve the base model (adapters unmerged)")
        self.model = model
        self.max_loras = max_loras
        self.loaded: OrderedDict[str, LoRARequest] = OrderedDict()  # least recently used first
        self.users: dict[str, int] = {}

    def acquire(self, request: LoRARequest) -> str:
        """Make ``request``'s adapter ready (loading it if needed) and count one more user; its name."""
        name = request.lora_name
        known = self.loaded.get(name)
        if known is not None:
            if known.lora_int_id != request.lora_int_id or str(known.lora_path) != str(request.lora_path):
                raise AdapterError(f"adapter name {name!r} is already loaded as {known}; use a new name (and id) "
                                   "for another adapter")
            self.loaded.move_to_end(name)
        else:
            clash = [r for r in self.loaded.values() if r.lora_int_id == request.lora_int_id]
            if clash:
                raise AdapterError(f"lora_int_id {request.lora_int_id} is already used by adapter "
                                   f"{clash[0].lora_name!r}")
            self._make_room()
            load_adapter(self.model, request.lora_path, name)
            self.loaded[name] = request
        self.users[name] = self.users.get(name, 0) + 1
        return name

    def release(self, name: str | None) -> None:
        if name is not None and name in self.users:
            self.users[name] -= 1

    def _make_room(self) -> None:
        if len(self.loaded) < self.max_loras:
            return
        for name in self.loaded:  # least recently used first
            if self.users.get(name, 0) == 0:
                self.unload(name)
                return
        raise AdapterError(f"all {self.max_loras} adapter slots are in use by running requests; retry later or "
                           "raise max_loras")

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        if self.users.get(name, 0):
            raise AdapterError(f"adapter {name!r} is in use by {self.users[name]} unfinished request(s)")
        remove_adapter(self.model, name)
        del self.loaded[name]
        self.users.pop(name, None)

    def names(self) -> list[str]:
        state = state_of(self.model)
        return [] if state is None else [n for n in self.loaded if n in state.ids]
