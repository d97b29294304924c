"""Adapters as transformations of a built model: LoRA and bottleneck adapters, peft's file format, and the
per-row adapter choice the engine uses to run many adapters in one batch."""

from .bottleneck import BottleneckConfig, add_bottleneck
from .lora import LoraConfig, LoraLinear, add_lora
from .peft_format import load_adapter, read_config, remove_adapter, save_adapter
from .peft_model import PeftModel, get_peft_model
from .state import AdapterError, adapter_index

__all__ = ["AdapterError", "BottleneckConfig", "LoraConfig", "LoraLinear", "PeftModel", "adapter_index",
           "add_bottleneck", "add_lora", "get_peft_model", "load_adapter", "read_config", "remove_adapter",
           "save_adapter"]
