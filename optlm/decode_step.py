"""A decode step with no Python per layer: every layer of a one-token-per-row pass in one call of a C kernel
(``optlm/kernels/decode_step.c``) over the model's own weights and the caller's cache, read in place.

Why: in a decode step of a small model on a CPU, the matmuls are a minority of the time; the rest was one
Python dispatch per layer norm, residual add, reshape and attention call, and PyTorch's attention for a single
query. ``benchmarks/decode_profile.py`` measures what each part costs, before and after.

It is a transformation of a built model, as the other speed-ups in ``optlm.fast``: :func:`install` gives a
causal LM a :class:`DecodeStep`, which ``ForCausalLM.step`` tries first for a pass of one new token per row and
which answers None (so the PyTorch path runs) for anything it does not cover:

* gradients on, training mode, or a frame that carries adapters per row (the engine's multi-LoRA batches);
* a frame whose cache is not float32 on the CPU (``Frame.kv_layout``), or has local-attention layers;
* a family whose decoder does not describe itself (``decoder.parts()``; OPT does), a layer wrapped by an adapter,
  an int8-dynamic layer, weights on another device, or no C compiler (``optlm.kernels``).

Results equal the PyTorch path's up to float rounding (the sums run in another order); fp32 greedy tokens are
the same (``tests/test_decode_step.py``). A bfloat16 model's step multiplies its bfloat16 weights with float32
activations and keeps float32 between the matmuls (its keys/values are cached in float32), where the PyTorch
path rounds each intermediate result to bfloat16: the step's numbers are the more precise ones.

The weights are read where they lie: nothing is copied except float32 versions of half-precision biases, norm
parameters and scales. When the model changes (a parameter or module replaced or moved, a copied tensor edited
in place), the step rebuilds its description before the next call; a copied model gets a step of its own.
"""

from __future__ import annotations

import ctypes
import itertools
import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import huge_pages, kernels
from .fast import attention_modules
from .models.core import SelfAttention

P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
KINDS = {"f32": 0, "bf16": 1, "int8": 2, "int4": 3}
ACTS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2}  # decode_step.c's activations


class _Linear(ctypes.Structure):
    _fields_ = [("kind", I), ("w", P), ("scales", P), ("mins", P), ("bias", P), ("n", L), ("k", L), ("group", L)]


class _Norm(ctypes.Structure):
    _fields_ = [("w", P), ("b", P)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", _Norm), ("norm2", _Norm), ("q", _Linear), ("k", _Linear), ("v", _Linear), ("out", _Linear),
                ("fc1", _Linear), ("fc2", _Linear), ("qkv", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", L), ("hidden", L), ("heads", L), ("head_dim", L), ("pre_ln", I), ("act", I),
                ("final_norm", I), ("scaling", F), ("eps", F), ("layer", ctypes.POINTER(_Layer)), ("norm_f", _Norm),
                ("project_out", ctypes.POINTER(_Linear)), ("head", ctypes.POINTER(_Linear))]


class _Cache(ctypes.Structure):
    _fields_ = [("k", P), ("v", P), ("layer_stride", L), ("batch_stride", L), ("head_stride", L),
                ("slot_stride", L), ("slots", P), ("S", L), ("lens", P), ("valid", P)]


# Any module, parameter or buffer registered or replaced anywhere bumps this; a step built before rebuilds.
_changes = itertools.count()
_generation = [0]


def _changed(*_: Any) -> None:
    _generation[0] = next(_changes)


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook, _module.register_module_module_registration_hook):
    _register(_changed)


_version = operator.attrgetter("_version")


class Unsupported(Exception):
    """The model (as it is now) has something the compiled step does not run; the message says what."""


class _Plan:
    """The C description of one model, with every tensor it points into kept alive and watched."""

    def __init__(self, model: nn.Module):
        self.generation = _generation[0]
        self.watched: list[Tensor] = []  # tensors read or copied from, and their addresses and versions then
        self.ptrs: list[int] = []
        self.versions: list[int] = []
        self.keep: list[Any] = []  # tensors and structures the C side points into
        # none of the modules may gain a forward hook (bottleneck adapters and layer offloading use them)
        self.hooks = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
        decoder = model.get_decoder()
        if not hasattr(decoder, "parts"):
            raise Unsupported(f"{type(decoder).__name__} does not describe its parts")
        parts = decoder.parts()
        if parts.activation not in ACTS:
            raise Unsupported(f"activation {parts.activation!r}")
        attn = [p.attention for p in parts.layers]
        if any(not isinstance(a, SelfAttention) or a.window is not None for a in attn):
            raise Unsupported("local attention layers, or attention of another kind")
        first = attn[0]
        self.embed = parts.embed
        self.hidden = first.num_heads * first.head_dim
        self.out_dim = model.lm_head.in_features if hasattr(model.lm_head, "in_features") else self.hidden
        self.vocab = model.config.vocab_size
        layers = (_Layer * len(parts.layers))()
        for i, p in enumerate(parts.layers):
            a = p.attention
            if (a.num_heads, a.head_dim, a.scaling) != (first.num_heads, first.head_dim, first.scaling):
                raise Unsupported("layers of different shapes")
            # q, k and v in one call where optlm.fast fused them (one pass, not three short ones); n = 0: none
            fused = a.fused_qkv is not None and a.fused_qkv.matches(a)
            qkv = self._linear(a.fused_qkv.linear) if fused else _Linear()
            layers[i] = _Layer(self._norm(p.norm1), self._norm(p.norm2), self._linear(a.q_proj),
                               self._linear(a.k_proj), self._linear(a.v_proj), self._linear(a.out_proj),
                               self._linear(p.fc1), self._linear(p.fc2), qkv)
        self.keep.append(layers)
        project_out = None if parts.project_out is None else ctypes.pointer(self._linear(parts.project_out))
        head = ctypes.pointer(self._linear(model.lm_head))
        if head.contents.n != self.vocab:
            raise Unsupported("a head whose width is not the vocabulary")
        final = _Norm() if parts.final_norm is None else self._norm(parts.final_norm)
        self.model = _Model(len(parts.layers), self.hidden, first.num_heads, first.head_dim, int(parts.pre_ln),
                            ACTS[parts.activation], int(parts.final_norm is not None),
                            1.0 if first.scaling is None else first.scaling, parts.eps, layers, final,
                            project_out, head)
        self.keep += [project_out, head]

    def _watch(self, t: Tensor) -> None:
        self.watched.append(t)
        self.ptrs.append(t.data_ptr())
        self.versions.append(t._version)

    def _float(self, t: Tensor | None) -> int | None:
        """A float32 contiguous CPU version of ``t`` (``t`` itself when it is one), kept alive; its address."""
        if t is None:
            return None
        if t.device.type != "cpu":
            raise Unsupported("weights that are not on the CPU")
        self._watch(t)
        f = t.detach().float().contiguous()
        self.keep.append(f)
        return f.data_ptr()

    def _norm(self, norm: nn.Module) -> _Norm:
        if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (self.hidden,):
            raise Unsupported(f"a norm of type {type(norm).__name__}")
        if norm.weight is None:
            return _Norm()
        return _Norm(self._float(norm.weight), self._float(norm.bias))

    def _linear(self, module: nn.Module) -> _Linear:
        kernel_spec = getattr(type(module), "kernel_spec", None)  # the class's own: wrappers may forward attributes
        spec = None if kernel_spec is None else kernel_spec(module)
        if spec is None:
            raise Unsupported(f"a {type(module).__name__} layer the kernels do not run")
        w = spec.weight
        if w.device.type != "cpu" or not w.is_contiguous():
            raise Unsupported("weights that are not contiguous on the CPU")
        self._watch(w)
        self.keep.append(w)
        n, k = w.shape[0], (w.shape[1] * 2 if spec.kind == "int4" else w.shape[1])
        return _Linear(KINDS[spec.kind], w.data_ptr(), self._float(spec.scales), self._float(spec.mins),
                       self._float(spec.bias), n, k, spec.group)

    def current(self) -> bool:
        # map() keeps these per-step checks of a few hundred tensors in C: ~20 us, not ~0.5 ms
        return (self.generation == _generation[0] and list(map(Tensor.data_ptr, self.watched)) == self.ptrs
                and list(map(_version, self.watched)) == self.versions)

    def hooked(self) -> bool:
        """Whether some module runs forward hooks, which a step outside PyTorch would skip."""
        return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks) or any(self.hooks)


class DecodeStep:
    """``step(ids, frame)`` for one new token per row, all layers in one C call; None where it does not apply
    (see the module docstring), and the caller then runs the PyTorch path."""

    PARTS = ("qkv", "attention", "out_proj", "fc1", "fc2", "head", "other")  # decode_step.c's timing parts

    def __init__(self, model: nn.Module):
        self.model = model
        self.plan: _Plan | None = _Plan(model)  # raises Unsupported; None: built at the next call
        self.timing: Tensor | None = None  # float64 (len(PARTS),): seconds per part, summed, when profiling

    def __getstate__(self) -> dict:
        # A copied or pickled model gets a step of its own, described afresh (the plan holds raw pointers).
        return {"model": self.model, "plan": None, "timing": None}

    def __call__(self, ids: Tensor, frame: Any) -> tuple[Tensor, Tensor] | None:
        if ids.shape[1] != 1 or torch.is_grad_enabled() or self.model.training or frame.adapter is not None:
            return None
        layout = frame.kv_layout()
        if layout is None or not kernels.enabled():
            return None
        if self.plan is None or not self.plan.current():
            try:
                self.plan = _Plan(self.model)
            except Unsupported:
                self.model.decode_step = None  # the model changed into one this step does not run
                return None
        plan = self.plan
        if plan.hooked():
            return None
        B = ids.shape[0]
        x = plan.embed(ids, frame.positions)  # (B, 1, d)
        if x.dtype not in (torch.float32, torch.bfloat16) or x.shape != (B, 1, plan.hidden):
            return None
        dtype = x.dtype
        x = x.reshape(B, plan.hidden).float().contiguous()  # a new tensor (embeddings plus positions): C overwrites it
        lengths = layout.lengths.contiguous()
        slots = None if layout.slots is None else layout.slots.contiguous()
        valid = None if layout.valid is None else layout.valid.contiguous().view(torch.uint8)
        table = slots if slots is not None else valid
        S = int(lengths.max()) if table is None else table.shape[1]  # columns of the per-row tables
        cache = _Cache(layout.k.data_ptr(), layout.v.data_ptr(), *layout.strides,
                       None if slots is None else slots.data_ptr(), S, lengths.data_ptr(),
                       None if valid is None else valid.data_ptr())
        hidden = torch.empty(B, plan.out_dim)
        logits = torch.empty(B, plan.vocab)
        rc = kernels.library().optlm_decode_step(ctypes.byref(plan.model), ctypes.byref(cache), x.data_ptr(), B,
                                                 hidden.data_ptr(), logits.data_ptr(), torch.get_num_threads(),
                                                 None if self.timing is None else self.timing.data_ptr())
        if rc != 0:
            raise MemoryError(f"no memory for a decode step of {B} rows")
        return logits, hidden[:, None].to(dtype)


def install(model: nn.Module) -> str | None:
    """Give ``model`` (a causal LM) a :class:`DecodeStep`, in place; returns None, or why it could not."""
    if not kernels.enabled():
        model.decode_step = None
        return f"the kernels are unavailable ({kernels.unavailable_reason()})"
    try:
        _Plan(model)  # raises Unsupported before anything moves
        fused = [t for attn in attention_modules(model) if attn.fused_qkv is not None
                 for t in (*attn.fused_qkv.linear.parameters(), *attn.fused_qkv.linear.buffers())]
        huge_pages.place(model, fused)  # every weight in 2 MiB pages (why: optlm.huge_pages)
        model.decode_step = DecodeStep(model)
    except Unsupported as e:
        model.decode_step = None
        return str(e)
    if next(p.dtype for p in model.parameters() if p.is_floating_point()) == torch.bfloat16:
        # a bfloat16 model's step computes in float32 from a float32 cache, which the attention of its PyTorch
        # passes (the prompt) then fills and reads in float32 too
        for attn in model.modules():
            if isinstance(attn, SelfAttention):
                attn.upcast_attention = True
    return None
