"""The transformers-compatible façade, family-neutral: loading, saving, keyword translation, heads and losses.

Each family (``optlm.hf.opt``, ``optlm.hf.gpt_neo``) declares a small base class naming its config, its
checkpoint prefix and its decoder; the heads here (causal LM, sequence classification, question answering,
token classification) are written once for all of them. The computation lives in ``optlm.models``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import checkpoint as ckpt
from ..checkpoint import read_family_config
from ..fast import for_inference, on_by_default
from ..kv_cache import KVCache
from ..models.config import ModelConfig
from ..models.core import Frame, kv_heads, set_attn_implementation
from ..quantize import finish_quantized, prepare_quantized, quantization_config, saved_state
from ..quantize import quantize as quantize_model


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    return getattr(torch, ckpt.dtype_name(dtype))  # a name: the same names and errors in every framework


def parse_device(device: torch.device | str | None) -> torch.device | None:
    """A device this machine has, or a ValueError saying what it has instead."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = ("without CUDA" if torch.version.cuda is None
                     else f"with CUDA {torch.version.cuda}, but no GPU is visible")
            raise ValueError(f"device {str(device)!r}: no CUDA GPU here (this torch {torch.__version__} is built "
                             f"{built}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's MPS backend is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


@dataclass
class ModelOutput:
    """What the forward passes return; fields a head does not produce stay None."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    past_key_values: KVCache | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class _ShapesOnly(TorchFunctionMode):
    """Skip the layers' random initialisation while building on the meta device: only shapes are needed
    there, and the first meta-device init kernel alone costs seconds of one-off setup in torch."""

    _INIT = frozenset({"uniform_", "normal_", "zero_", "fill_", "trunc_normal_", "kaiming_uniform_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes the tensor by keyword
        if getattr(func, "__name__", "") in self._INIT and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def empty_model(cls: type[nn.Module], config: ModelConfig) -> nn.Module:
    """``cls`` built for ``config`` on the meta device: shapes only, no memory, no random initialisation (the
    weights are assigned afterwards, from a checkpoint)."""
    with torch.device("meta"), _ShapesOnly():
        return cls(config, init=False)


class PreTrainedModel(nn.Module):
    """Shared loading, saving and bookkeeping. A family's base class sets the class attributes below; a head
    sets ``_optional_keys`` (weights it may initialise itself)."""

    config_class: type[ModelConfig]
    _optional_keys: tuple[str, ...] = ()
    # What checkpoint loading needs from a family (transformers' names where it has them): the attribute that
    # holds the base model in the classes with a head, and keys to drop on load.
    base_model_prefix = "model"
    _ignore_checkpoint_keys: tuple[str, ...] = ()
    # What adapters need from a family (optlm.adapters): peft's default LoRA targets, and the sublayers of each
    # decoder layer whose outputs bottleneck adapters follow.
    default_lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    bottleneck_points: dict[str, str] = {}
    # What tensor parallelism needs (optlm.parallel): each decoder layer's linear layers by name, split by output
    # ("column": q/k/v and the MLP's first) or by input ("row": each block's output projections).
    tp_plan: dict[str, str] = {}
    # How forward() places tokens when no position_ids are given: True counts real tokens only (OPT derives
    # positions from the attention mask); False numbers slots from the cache length, padding included (GPT-Neo).
    positions_follow_mask = True
    name_or_path: str | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # ---- construction ---------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """Random initialisation as transformers does it: N(0, init_std) weights, zero biases, unit norms."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Point the LM head at the input embedding matrix (heads without an LM head have nothing to tie)."""

    def get_decoder(self) -> nn.Module:
        """The family's decoder: the module called as ``decoder(ids, frame)`` (``optlm.models.core``)."""
        return getattr(self, self.base_model_prefix).get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.get_decoder().get_input_embeddings()

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.get_decoder().set_input_embeddings(module)

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head (None for models without one, as in transformers)."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def set_attn_implementation(self, name: str) -> None:
        set_attn_implementation(self, name)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.get_decoder().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.get_decoder().gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.get_decoder().gradient_checkpointing

    # ---- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, attn_implementation: str | None = None,
                        revision: str | None = None, config: ModelConfig | None = None,
                        torch_dtype: torch.dtype | str | None = None, quantize: str | None = None,
                        max_memory: int | str | dict | None = None, offload: bool | int = False,
                        fast: bool | None = None, **config_overrides: Any):
        """Load a Hugging Face checkpoint of this class's family (directory or hub id).

        The model is built on the meta device and the memory-mapped checkpoint tensors are assigned to it,
        so peak memory stays near one copy of the weights. ``dtype=None`` keeps the checkpoint's dtype
        (transformers' "auto"); ``config_overrides`` (e.g. ``num_labels=3``) edit the loaded config.
        ``quantize="int8"`` or ``"int4"`` swaps the linear layers for weight-only quantized ones
        (:func:`optlm.quantize.quantize`).

        Larger than memory (inference, CPU, safetensors): ``max_memory`` ("4GB", a byte count, or
        accelerate's ``{"cpu": "4GB"}``) keeps as many decoder layers resident as fit beside the embeddings and
        streams the rest from the files (:mod:`optlm.parallel.offload`; the whole model when it fits);
        ``offload=True`` streams through 2 layers, the least memory, ``offload=N`` through N.

        ``fast`` (default: on, unless the environment sets ``OPTLM_FAST=0``) applies the speed-ups that keep
        outputs and parameter objects as they are (:func:`optlm.fast.for_inference`): faster CPU matmul routing
        and, for a causal LM, decoding steps run in one C call over weights moved into huge pages.
        ``fast=False`` gives the plain PyTorch modules.
        """
        dtype = parse_dtype(dtype if dtype is not None else torch_dtype)
        device = parse_device(device)
        directory = ckpt.resolve(path_or_hub_id, revision)
        if config is None:
            config = read_family_config(directory, self_family=cls.config_class, loader=cls.__name__)
        for key, value in config_overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"from_pretrained() got an unexpected keyword argument {key!r}")
            setattr(config, key, value)
        if "id2label" not in config_overrides and "num_labels" in config_overrides:
            config.id2label = config.label2id = None
        if max_memory is not None or offload:
            model = _offloaded(cls, directory, config, dtype, device, quantize, max_memory, offload)
            if model is not None:
                if attn_implementation is not None:
                    model.set_attn_implementation(attn_implementation)
                model.name_or_path = str(path_or_hub_id)
                return model
        state = ckpt.read_state_dict(ckpt.weight_files(directory))

        model = empty_model(cls, config)
        qc = quantization_config(config)
        if qc is not None:
            if quantize is not None:
                raise ValueError(f"{directory} is already quantized ({qc['mode']}); load it without quantize=")
            prepare_quantized(model, qc)
        state = ckpt.normalize_keys(state, set(model.state_dict()), cls.base_model_prefix,
                                    cls._ignore_checkpoint_keys)
        new_keys = ckpt.check_state_dict(model, state, set(model._optional_keys), str(directory))
        fresh = [k for k in new_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if fresh:
            warnings.warn(f"{cls.__name__}: {', '.join(fresh)} not in the checkpoint {directory}, newly initialised "
                          "at random; fine-tune the model before using its predictions", stacklevel=2)
        target = dtype or ckpt.storage_dtype(state)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()
                 if k in model.state_dict()}
        model.load_state_dict(state, strict=False, assign=True)
        model._materialize(new_keys, target)
        if qc is not None:
            finish_quantized(model, state, qc)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if device is not None:
            model.to(device)
        if quantize is not None:
            quantize_model(model, quantize)
        model.name_or_path = str(path_or_hub_id)  # as transformers records it (adapters save it as their base)
        if on_by_default() if fast is None else fast:
            for_inference(model)
        return model.eval()

    def _materialize(self, new_keys: list[str], dtype: torch.dtype) -> None:
        """Give real memory to weights the checkpoint did not have (tied head, fresh classifier head)."""
        self.tie_weights()
        for key in new_keys:
            module_name, _, _ = key.rpartition(".")
            module = self.get_submodule(module_name)
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                module.to(dtype)
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        assert not meta, f"parameters left on the meta device: {meta}"

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_size``) as transformers does."""
        if not safe_serialization:
            raise ValueError("optlm saves safetensors only (no pickle); drop safe_serialization=False")
        if getattr(self, "offload", None) is not None:
            raise ValueError("this model streams its layers from its checkpoint (offload / max_memory): its weights "
                             "are not all in memory to save; the checkpoint it reads is already saved")
        directory = Path(save_directory)
        quantized = quantization_config(self.config) is not None
        state = saved_state(self) if quantized else self.state_dict()
        embedding = next((n for n, m in self.named_modules() if m is self.get_input_embeddings()), None)
        if self.config.tie_word_embeddings and f"{embedding}.weight" in state:
            state.pop("lm_head.weight", None)  # tied: stored once, as the embedding (transformers omits it too)
        self.config.extra["dtype"] = str(self.dtype).removeprefix("torch.")
        self.config.extra.pop("torch_dtype", None)
        self.config.extra["architectures"] = [type(self).__name__]  # as transformers: the class that saved it
        ckpt.save_state_dict(state, directory, max_shard_size, ckpt.QUANTIZED_STEM if quantized else "model")
        self.config.save(directory)

    # ---- forward helpers ------------------------------------------------------------------------------

    def _decode(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                past_key_values: KVCache | None, use_cache: bool | None) -> tuple[Tensor, KVCache | None]:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        lo, hi = torch.aminmax(input_ids)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must be token ids in [0, {self.config.vocab_size}) (vocab_size), got "
                             f"{int(lo)}..{int(hi)}; is the tokenizer the model's own?")
        B, T = input_ids.shape
        cache = past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = KVCache.for_model(self.config, B, T, self.dtype, input_ids.device, kv_heads(self))
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        if cache is None:
            frame = Frame.causal(B, T, input_ids.device, attention_mask)
        else:
            frame = cache.frame(T, attention_mask)
        if position_ids is not None:
            if tuple(position_ids.shape) not in ((B, T), (1, T)):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected ({B}, {T})")
            frame.positions = position_ids.expand(B, T)
        elif not self.positions_follow_mask:
            frame.positions = torch.arange(frame.past, frame.past + T, device=input_ids.device).expand(B, T)
        hidden = self.get_decoder()(input_ids, frame)
        if cache is not None:
            cache.commit(frame)
        return hidden, cache


def _offloaded(cls: type, directory: Path, config: ModelConfig, dtype: torch.dtype | None, device: torch.device | None,
               quantize: str | None, max_memory: int | str | dict | None, offload: bool | int) -> nn.Module | None:
    """``from_pretrained`` streaming its decoder layers (None: ``max_memory`` holds the whole model)."""
    from ..parallel import offload as streaming

    if quantize is not None or quantization_config(config) is not None:
        raise ValueError("streaming layers (offload / max_memory) reads floating-point weights; it does not combine "
                         "with quantization yet — load without quantize, or quantize a model that fits")
    if device is not None and device.type != "cpu":
        raise ValueError("streaming layers (offload / max_memory) runs on the CPU; load without device=")
    if max_memory is not None and offload:
        raise ValueError("give max_memory (the layers that fit are kept) or offload (a fixed window), not both")
    if isinstance(max_memory, dict):
        if set(max_memory) - {"cpu"}:
            raise ValueError(f"max_memory {max_memory}: streaming layers budgets the CPU only ({{'cpu': '4GB'}})")
        max_memory = max_memory["cpu"]
    if max_memory is not None:
        return streaming.offloaded(cls, directory, config, dtype, max_memory=ckpt.parse_size(max_memory))
    return streaming.offloaded(cls, directory, config, dtype, window=2 if offload is True else int(offload))


class BaseModel(PreTrainedModel):
    """The bare decoder with transformers' keywords: returns ``last_hidden_state`` (width ``config.output_dim``)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None) -> ModelOutput:
        hidden, cache = self._decode(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        return ModelOutput(last_hidden_state=hidden, past_key_values=cache)


class _WithBase(PreTrainedModel):
    """A head on the family's bare model, which sits at ``base_model_prefix`` (``model``, ``transformer``)."""

    base_model_class: type[nn.Module]

    def _attach_base(self, config: ModelConfig) -> None:
        setattr(self, self.base_model_prefix, self.base_model_class(config, init=False))


class ForCausalLM(_WithBase):
    """The language-model head (tied to the token embeddings unless ``tie_word_embeddings`` is false)."""

    _optional_keys = ("lm_head.weight",)
    decode_step = None  # optlm.decode_step.DecodeStep, set by optlm.fast.for_inference / optimize

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__(config)
        self._attach_base(config)
        self.lm_head = nn.Linear(config.output_dim, config.vocab_size, bias=False)
        if init:
            self.init_weights()
        if not config.tie_word_embeddings:
            self._optional_keys = ()

    def tie_weights(self) -> None:
        # A quantized head is tied the other way round: the embedding reads the head's int8 rows.
        if self.config.tie_word_embeddings and isinstance(self.get_input_embeddings(), nn.Embedding):
            head = self.lm_head
            while hasattr(head, "base_layer"):  # a layer wrapped by an adapter (peft's convention)
                head = head.base_layer
            head.weight = self.get_input_embeddings().weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """``logits_to_keep=n`` computes logits for the last n positions only (0 = all), as in transformers."""
        hidden, cache = self._decode(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return ModelOutput(loss=loss, logits=logits, last_hidden_state=hidden, past_key_values=cache)

    def step(self, ids: Tensor, frame: Frame, last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The core call of generation and the engine: ``ids`` ``(B, T)`` run in ``frame`` → logits ``(B, V)``
        of each row's token at column ``last`` ``(B,)`` (default: the last column) and the hidden states
        ``(B, T, e)``. The caller owns the cache behind the frame and advances it."""
        if self.decode_step is not None and ids.shape[1] == 1:  # all layers in one C call (optlm.decode_step)
            out = self.decode_step(ids, frame)
            if out is not None:
                return out
        hidden = self.get_decoder()(ids, frame)
        rows = hidden[:, -1] if last is None else hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return self.lm_head(rows), hidden

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """transformers-style ``generate``: prompt + new tokens; see :func:`optlm.generate.generate`."""
        from ..generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Tensor, tokenizer: Any, attention_mask: Tensor | None = None, **kwargs: Any):
        """Iterator over the text of one prompt's continuation; see :func:`optlm.generate.stream`."""
        from ..generate import stream

        return stream(self, tokenizer, input_ids, attention_mask, **kwargs)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; ``ignore_index`` labels don't count."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # fp32 like the reference
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


class ForSequenceClassification(_WithBase):
    """Classification/regression from the hidden state of each row's rightmost non-pad token."""

    _optional_keys = ("score.weight",)

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__(config)
        self.num_labels = config.num_labels
        self._attach_base(config)
        self.score = nn.Linear(config.output_dim, config.num_labels, bias=False)
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        hidden, cache = self._decode(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.score(hidden)  # (B, T, num_labels)
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError("batches of more than one sequence need config.pad_token_id to find each row's "
                                 "last token")
            last = torch.full((B,), T - 1, device=logits.device)
        else:
            # The rightmost non-pad token, so left and right padding both pool the real last token.
            idx = torch.arange(T, device=logits.device)
            last = (idx * (input_ids != pad)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None if labels is None else self._loss(pooled, labels)
        return ModelOutput(loss=loss, logits=pooled, past_key_values=cache)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        kind = self.config.problem_type
        if kind is None:  # inferred as transformers does, and remembered
            if self.num_labels == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
            self.config.problem_type = kind
        if kind == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if kind == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        if kind == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        raise ValueError(f"unknown problem_type {kind!r}; use regression, single_label_classification or "
                         "multi_label_classification")


class ForQuestionAnswering(_WithBase):
    """Extractive QA: start and end logits over the input tokens."""

    _optional_keys = ("qa_outputs.weight", "qa_outputs.bias")

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__(config)
        self._attach_base(config)
        self.qa_outputs = nn.Linear(config.output_dim, 2)
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None) -> ModelOutput:
        hidden, cache = self._decode(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            # Positions outside the sequence are clamped to T and ignored, like the reference.
            start = start_positions.reshape(-1).clamp(0, T).to(start_logits.device)
            end = end_positions.reshape(-1).clamp(0, T).to(start_logits.device)
            loss = (F.cross_entropy(start_logits, start, ignore_index=T)
                    + F.cross_entropy(end_logits, end, ignore_index=T)) / 2
        return ModelOutput(loss=loss, start_logits=start_logits.contiguous(), end_logits=end_logits.contiguous(),
                           past_key_values=cache)


class ForTokenClassification(_WithBase):
    """A label per token: dropout (``classifier_dropout``) then a linear classifier on every hidden state."""

    _optional_keys = ("classifier.weight", "classifier.bias")

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__(config)
        self.num_labels = config.num_labels
        self._attach_base(config)
        self.dropout = float(getattr(config, "classifier_dropout", 0.0) or 0.0)
        self.classifier = nn.Linear(config.output_dim, config.num_labels)
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        hidden, cache = self._decode(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        hidden = F.dropout(hidden, self.dropout, True) if self.training else hidden
        logits = self.classifier(hidden)  # (B, T, num_labels)
        loss = None
        if labels is not None:  # -100 labels (padding, word-piece continuations) do not count, as in transformers
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1).to(logits.device))
        return ModelOutput(loss=loss, logits=logits, past_key_values=cache)
