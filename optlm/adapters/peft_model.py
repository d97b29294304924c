"""``PeftModel``: peft's surface over an optlm model with adapters (``get_peft_model``, ``from_pretrained``,
``save_pretrained``, ``load_adapter``, ``set_adapter``, ``disable_adapter``, ``merge_and_unload`` …).

The wrapper only keeps the adapters' bookkeeping; the work is done by the module swaps (``lora.py``,
``bottleneck.py``) and the file format (``peft_format.py``). Calls it does not define go to the model, so
``peft_model(input_ids)``, ``.generate`` and ``.step`` run the adapted model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .bottleneck import Bottleneck, BottleneckConfig
from .lora import LoraConfig, LoraLinear, ModulesToSave, replace_module
from .peft_format import AdapterConfig, adapter_tensors, add_adapter, load_adapter, remove_adapter, save_adapter
from .state import AdapterError, AdapterLayer, drop_state, state_of


def trainable_tensors(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """What training adapter ``name`` updates: its own weights and the biases its config trains."""
    out = adapter_tensors(model, name)
    return {k: p for k, p in out.items() if not k.endswith(".base_layer.weight")}


def mark_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything but adapter ``name`` (and the biases its config trains)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_tensors(model, name).values():
        p.requires_grad_(True)


def _float_name(model: nn.Module) -> str | None:
    path = getattr(model, "name_or_path", None)
    return str(path) if path else None


class PeftModel(nn.Module):
    """An optlm model with adapters, behaving as peft's ``PeftModel`` does."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # Anything not defined here is the model's (forward keywords, generate, config, step …).
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def _state(self):
        state = state_of(self.base_model)
        if state is None:
            raise AdapterError("this model has no adapters")
        return state

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return dict(self._state.configs)

    @property
    def active_adapter(self) -> str:
        return self._state.active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    # ---- adding, loading, saving -----------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Add a fresh adapter (not made active: see :meth:`set_adapter`); only its parameters train."""
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _float_name(self.base_model)
        add_adapter(self.base_model, peft_config, adapter_name)
        if not peft_config.inference_mode:
            mark_trainable(self.base_model, adapter_name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, revision: str | None = None, **_: Any) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (a directory or a hub id)."""
        peft = cls(model)
        peft.load_adapter(model_id, adapter_name, is_trainable=is_trainable, revision=revision)
        peft.set_adapter(adapter_name)
        return peft

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     revision: str | None = None, **_: Any) -> AdapterConfig:
        config = load_adapter(self.base_model, model_id, adapter_name, revision)
        config.inference_mode = not is_trainable
        if is_trainable:
            mark_trainable(self.base_model, adapter_name)
        else:
            for p in trainable_tensors(self.base_model, adapter_name).values():
                p.requires_grad_(False)
        if not self._state.active:
            self._state.active = [adapter_name]
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        **_: Any) -> None:
        """peft's layout: the ``default`` adapter in ``save_directory``, any other in a subfolder of its name."""
        for name in selected_adapters or list(self._state.ids):
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(self.base_model, name, out)

    def delete_adapter(self, adapter_name: str) -> None:
        remove_adapter(self.base_model, adapter_name)

    # ---- choosing --------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several, applied together) the adapter(s) every forward uses."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self._state.ids]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r} (loaded: {', '.join(self._state.ids)})")
        self._state.active = names

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model runs as the base model (merged LoRA weights are taken out first)."""
        state = self._state
        self.unmerge_adapter()  # peft's rule: merged weights are taken back out first (fused layers never see them)
        before, state.disabled = state.disabled, True
        try:
            yield
        finally:
            state.disabled = before

    # ---- merging ---------------------------------------------------------------------------------------

    def _layers(self) -> list[tuple[str, AdapterLayer]]:
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, AdapterLayer)]

    def _check_mergeable(self) -> None:
        kinds = {self._state.kinds[n] for n in self._state.active}
        if "bottleneck" in kinds:
            raise AdapterError("bottleneck adapters are non-linear and cannot be merged into the base weights; "
                               "keep them as adapters (they cost two small matmuls per layer)")

    def _untie_head(self, names: list[str]) -> None:
        """A LoRA on an output head tied to the input embedding changes the head only: merging it gives the
        head its own weight (and the config says the two are no longer tied)."""
        model = self.base_model
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(head, LoraLinear) and set(names) & set(head.names()) and head.weight is emb.weight:
            head.base_layer.weight = nn.Parameter(head.weight.detach().clone(), head.weight.requires_grad)
            model.config.tie_word_embeddings = False

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold the active LoRA adapters into the base weights (until :meth:`unmerge_adapter`)."""
        self._check_mergeable()
        self._untie_head(adapter_names or self._state.active)
        for _, layer in self._layers():
            if isinstance(layer, LoraLinear):
                layer.merge(adapter_names or self._state.active)

    def unmerge_adapter(self) -> None:
        for _, layer in self._layers():
            if isinstance(layer, LoraLinear):
                layer.unmerge()

    unmerge = unmerge_adapter

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapters folded in and every adapter layer removed."""
        self._check_mergeable()
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """The base model without any adapter (nothing merged)."""
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        model, active = self.base_model, self._state.active
        if merge:
            self._untie_head(active)
        for key, layer in self._layers():
            if isinstance(layer, LoraLinear):
                if merge:
                    layer.merge(active)
                replace_module(model, key, layer.base_layer)
            elif isinstance(layer, ModulesToSave):
                chosen = [a for a in active if a in layer.names()] if merge else []
                replace_module(model, key, layer.modules_to_save[chosen[-1]] if chosen else layer.original_module)
        for _, layer in list(self._layers()):
            if isinstance(layer, Bottleneck):
                layer.detach()
        drop_state(model)
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model

    # ---- reporting -------------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        seen, trainable, total = set(), 0, 0
        for p in self.base_model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Add a fresh adapter to ``model`` (in place) and return it wrapped; only the adapter trains."""
    if not isinstance(peft_config, (LoraConfig, BottleneckConfig)):
        raise AdapterError(f"unsupported adapter config {type(peft_config).__name__}; use LoraConfig or "
                           "BottleneckConfig")
    return PeftModel(model, peft_config, adapter_name)
