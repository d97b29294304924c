"""LoRA (Hu et al. 2021) as a module swap on a built model: ``add_lora(model, LoraConfig(...), name)``.

A targeted linear layer ``W`` becomes :class:`LoraLinear` holding ``W`` as ``base_layer`` and, per adapter,
``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``: y = W x + B A dropout(x) * scaling, scaling = alpha / r
(alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). Module and parameter names are peft's
(``q_proj.base_layer.weight``, ``q_proj.lora_A.<adapter>.weight``), as are the config fields and how targets are
matched, so files move between optlm and peft unchanged (``peft_format.py``). The base may be float or
quantized (``optlm.quantize``): the QLoRA recipe of frozen quantized weights under float adapters.
"""

from __future__ import annotations

import copy
import enum
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from .state import AdapterError, AdapterLayer, AdapterState, ensure_state

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")


class TaskType(str, enum.Enum):
    """peft's task types (the values are what ``adapter_config.json`` stores)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"


TASK_TYPES = tuple(t.value for t in TaskType)
# The head modules peft trains and saves in full for a task type (its defaults).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# peft config fields that change the computation in ways optlm does not implement: loading refuses them.
UNSUPPORTED = ("use_dora", "layer_replication", "alora_invocation_tokens", "arrow_config", "use_bdlora",
               "velora_config", "kasa_config", "monteclora_config", "target_parameters", "trainable_token_indices",
               "use_qalora", "megatron_config")


@dataclass
class LoraConfig:
    """peft's ``LoraConfig`` fields (same names, defaults and meaning) that optlm implements.

    ``target_modules``: module names (a name matches itself and any ``*.name``), one regular expression
    matched against the full module name, or ``"all-linear"`` (every linear layer but the output head);
    None takes the model family's default (OPT: ``q_proj``, ``v_proj``, as peft does).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        _check_rank("r", self.r)
        for key, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", r)
        for key, a in [("lora_alpha", self.lora_alpha)] + [(f"alpha_pattern[{k!r}]", v)
                                                           for k, v in self.alpha_pattern.items()]:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise AdapterError(f"{key} must be a number, got {a!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise AdapterError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise AdapterError(f"init_lora_weights={self.init_lora_weights!r} is not supported; optlm implements "
                               "True (A Kaiming-uniform, B zero), 'gaussian' (A normal, B zero) and False (both "
                               "random, for tests)")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise AdapterError(f"task_type must be one of {', '.join(TASK_TYPES)} or None, got {self.task_type!r}")
        if self.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True is for GPT-2-style Conv1D layers; OPT's layers are nn.Linear, so "
                          "it is set to False (as peft does)", stacklevel=3)
            self.fan_in_fan_out = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(set(d["target_modules"]))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """From an ``adapter_config.json``: peft fields optlm does not use are ignored, ones that change the
        computation are refused by name."""
        for key in UNSUPPORTED:
            if d.get(key) not in (None, False, [], {}):
                raise AdapterError(f"this adapter uses peft's {key}={d[key]!r}, which optlm does not implement; "
                                   "merge it into the base with peft (merge_and_unload) and load the merged model")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("init_lora_weights") not in INIT_MODES:
            kwargs["init_lora_weights"] = True  # other schemes only decide the starting point; the weights are given
        return cls(**kwargs)


def _check_rank(name: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{name} (the LoRA rank) must be an integer >= 1, got {r!r}")


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # peft's rule: the pattern matches a suffix of the module name
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


class LoraLinear(AdapterLayer):
    """A linear layer (float or quantized) with LoRA adapters beside it."""

    per_adapter = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []
        self.bind(state)

    # The base layer's tensors, where code expects a linear layer (weight tying, fused q/k/v bookkeeping).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: bool | str,
            lora_bias: bool) -> None:
        w = next(t for t in (*self.base_layer.parameters(), *self.base_layer.buffers()) if t.is_floating_point())
        dev, dtype = w.device, w.dtype
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias, device=dev, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if init is not False:  # False keeps nn.Linear's random init in B too (a non-trivial adapter, for tests)
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as loralib / peft
            else:
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[name].weight)
            if lora_bias:
                nn.init.zeros_(self.lora_B[name].bias)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name]

    def _delta(self, name: str, x: Tensor) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged and self.state.disabled:
            self.unmerge()  # peft's rule: disabling a merged adapter takes it back out of the weights
        y = self.base_layer(x)
        d = self.delta(x)
        return y if d is None else y + d.to(y.dtype)

    def delta(self, x: Tensor) -> Tensor | None:
        """What the adapters add to the base layer's output for ``x`` (None: nothing). A fused projection that
        computes this layer's base output with others (``optlm.fast.FusedQKV``) adds it to its share."""
        state = self.state
        if state.rows is not None:
            if self.merged:
                raise AdapterError("a batch mixing adapters needs them unmerged; call unmerge_adapter() first")
            if not state.rows:
                return None  # every row runs the base model
            if self.training:  # dropout per adapter, as each adapter trains
                return self.per_row(x, x.new_zeros(*x.shape[:-1], self.out_features), self._delta)
            return self._rows_delta(x)
        d = None
        for name in self.chosen():
            if name not in self.merged:
                d = self._delta(name, x) if d is None else d + self._delta(name, x)
        return d

    def _rows_delta(self, x: Tensor) -> Tensor:
        """Every row's adapter contribution at once (the S-LoRA / Punica gather): each row picks its adapter's
        A and B from stacks of all this layer's adapters and runs two batched matmuls, so the cost does not
        grow with the number of adapters in the batch. Base rows (and adapters this layer lacks) pick the
        all-zero slot."""
        lut, a, b, bias = self._stacks()
        slot = lut[self.state.row_ids + 1]  # (B,): this row's stack slot
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # (B, T, in); (B, in) rows (the head) too
        h = torch.bmm(x3, a[slot].transpose(1, 2))  # (B, T, r_max)
        out = torch.bmm(h, b[slot].transpose(1, 2))  # (B, T, out)
        if bias is not None:
            out = out + bias[slot][:, None]
        return out.reshape(*x.shape[:-1], self.out_features)

    def _stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``lut`` (adapter id + 1 → stack slot), A ``(n + 1, r_max, in)``, B * scaling ``(n + 1, out, r_max)``
        and B's biases * scaling, zero-padded to the largest rank; rebuilt only when the adapters change."""
        names = self.names()
        ids = self.state.ids
        key = tuple((n, ids[n], self.lora_A[n].weight._version, self.lora_B[n].weight._version,
                     self.lora_A[n].weight.data_ptr(), self.lora_B[n].weight.data_ptr(), self.scaling[n])
                    for n in names) + (max(ids.values()),)  # the lut covers every loaded adapter's id
        cached = getattr(self, "_stack_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        w = self.lora_A[names[0]].weight
        r_max, n = max(self.lora_A[m].out_features for m in names), len(names)
        a = w.new_zeros(n + 1, r_max, self.in_features)
        b = w.new_zeros(n + 1, self.out_features, r_max)
        biased = any(self.lora_B[m].bias is not None for m in names)
        bias = w.new_zeros(n + 1, self.out_features) if biased else None
        lut = torch.full((max(ids.values()) + 2,), n, dtype=torch.long, device=w.device)  # unknown → zeros
        with torch.no_grad():
            for i, m in enumerate(names):
                r = self.lora_A[m].out_features
                a[i, :r] = self.lora_A[m].weight
                b[i, :, :r] = self.lora_B[m].weight * self.scaling[m]
                if self.lora_B[m].bias is not None:
                    bias[i] = self.lora_B[m].bias * self.scaling[m]
                lut[ids[m] + 1] = i
        object.__setattr__(self, "_stack_cache", (key, (lut, a, b, bias)))
        return lut, a, b, bias

    # ---- merging ---------------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> Tensor:
        """``B @ A * scaling`` ``(out, in)`` in fp32 (CPU half-precision matmuls are slow fallbacks)."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (B @ A) * self.scaling[name]

    def _float_base(self) -> nn.Linear:
        if not isinstance(self.base_layer, nn.Linear):
            raise AdapterError(f"cannot merge an adapter into a quantized layer ({type(self.base_layer).__name__}); "
                               "load the base model in floating point, merge there, and quantize the result")
        return self.base_layer

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        base = self._float_base()
        for name in self.names() if names is None else names:
            if name in self.merged or name not in self.lora_A:
                continue
            base.weight.data += self.delta_weight(name).to(base.weight.dtype)
            if self.lora_B[name].bias is not None:
                base.bias.data += (self.lora_B[name].bias.float() * self.scaling[name]).to(base.bias.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        base = self._float_base()
        for name in list(self.merged) if names is None else names:
            if name not in self.merged:
                continue
            base.weight.data -= self.delta_weight(name).to(base.weight.dtype)
            if self.lora_B[name].bias is not None:
                base.bias.data -= (self.lora_B[name].bias.float() * self.scaling[name]).to(base.bias.dtype)
            self.merged.remove(name)

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={ranks}"


class ModulesToSave(AdapterLayer):
    """A module trained in full by an adapter (a classification head): the original stays, and each adapter
    owns a copy of it (peft's ``ModulesToSaveWrapper``, same names)."""

    per_adapter = ("modules_to_save",)
    keep_dict_name = False

    def __init__(self, original_module: nn.Module, state: AdapterState):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.bind(state)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)  # in_features, weight …: the module it stands in for

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = self.state
        if state.rows is not None:
            y = self.original_module(x, *args, **kwargs)
            for name, rows in state.rows:
                if name in self.modules_to_save:
                    y = y.index_copy(0, rows, self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs))
            return y
        chosen = self.chosen()
        module = self.modules_to_save[chosen[-1]] if chosen else self.original_module
        return module(x, *args, **kwargs)


# ---- injecting -----------------------------------------------------------------------------------------

def default_targets(model: nn.Module) -> list[str]:
    targets = getattr(model, "default_lora_targets", None)
    if targets is None:
        raise AdapterError(f"{type(model).__name__} has no default LoRA targets; pass target_modules")
    return list(targets)


def _linear_like(m: nn.Module) -> bool:
    """nn.Linear or a quantized stand-in for one (optlm.quantize's Int8Linear / Int4Linear)."""
    return isinstance(m, nn.Linear) or (type(m).__name__.endswith("Linear") and hasattr(m, "in_features")
                                        and not isinstance(m, AdapterLayer))


def _excluded_heads(model: nn.Module, config: LoraConfig) -> set[str]:
    """What ``all-linear`` leaves out, as peft does: the output head (and a classification head)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out.add(names.get(id(head), "lm_head"))
    elif config.task_type == "SEQ_CLS":
        for name in TASK_HEADS["SEQ_CLS"]:
            if isinstance(getattr(model, name, None), nn.Module):
                out.add(name)
                break
    return out


def _layer_index(key: str, patterns: list[str] | str | None) -> int | None:
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def matches(config: LoraConfig, key: str, targets: list[str] | str) -> bool:
    """Whether module ``key`` (its full name) is a target (peft's matching rules)."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str) and re.fullmatch(ex, key):
            return False
        if not isinstance(ex, str) and (key in ex or any(key.endswith(f".{e}") for e in ex)):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    if found and layers is not None and layers != []:
        idx = _layer_index(key, config.layers_pattern)
        found = idx is not None and (idx == layers if isinstance(layers, int) else idx in layers)
    return found


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``name`` is; hooks on the old module (bottleneck adapters) move to the new one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    module._forward_hooks.update(old._forward_hooks)
    old._forward_hooks.clear()


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    names = list(config.modules_to_save or [])
    for head in TASK_HEADS.get(config.task_type or "", ()):
        if isinstance(getattr(model, head, None), nn.Module) and head not in names:
            names.append(head)
    return names


def add_heads(model: nn.Module, to_save: list[str], name: str) -> None:
    """Give adapter ``name`` its own trainable copy of each module named in ``to_save`` (peft's
    ``modules_to_save``: e.g. a classification head); names the model lacks are skipped, as in peft."""
    state = ensure_state(model)
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    heads = [key for key, _ in model.named_modules()
             if key and not key.startswith(inside) and any(key == h or key.endswith(f".{h}") for h in to_save)]
    if to_save and not heads:
        raise AdapterError(f"modules_to_save {to_save} names no module of {type(model).__name__}")
    for key in heads:
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, state)
            replace_module(model, key, module)
        module.add(name)


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Add LoRA adapter ``name`` to ``model`` in place; returns the names of the layers it adapts.

    Base parameters are left as they are (freezing is the caller's choice: see ``optlm.peft``)."""
    state = ensure_state(model)
    targets = config.target_modules
    if targets is None:
        targets = default_targets(model)
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    skip = _excluded_heads(model, config) if all_linear else set()
    to_save = resolve_modules_to_save(model, config)
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    chosen = []
    for key, module in model.named_modules():
        if not key or key.startswith(inside):
            continue  # never adapt an adapter's own parts
        if not isinstance(module, LoraLinear) and not _linear_like(module):
            continue
        if all_linear:
            hit = key not in skip and matches(config, key, [key])
        else:
            hit = matches(config, key, targets)
        if hit:
            chosen.append(key)
    if not chosen:
        raise AdapterError(f"target_modules {targets!r} matched no linear layer of {type(model).__name__}; "
                           f"its linear layers are named like {_example_names(model)}")
    state.register(name, "lora", config)
    for key in chosen:
        module = model.get_submodule(key)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, state)
            replace_module(model, key, module)
        r = _pattern_value(config.rank_pattern, key, config.r)
        alpha = _pattern_value(config.alpha_pattern, key, config.lora_alpha)
        module.add(name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights,
                   config.lora_bias)
    add_heads(model, to_save, name)
    match_mode(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return chosen


def match_mode(model: nn.Module) -> None:
    """New adapter modules start in training mode; give them the model's (no dropout in an eval model)."""
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            m.train(model.training)


def _example_names(model: nn.Module) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names) or "(none)"
