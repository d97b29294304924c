"""peft's names over optlm's adapters: ``from optlm.peft import LoraConfig, get_peft_model, PeftModel``.

Files saved here load in peft (``peft.PeftModel.from_pretrained(transformers_model, path)``) and peft's load
here; see :mod:`optlm.adapters`.
"""

from .adapters import AdapterError, BottleneckConfig, LoraConfig, PeftModel, get_peft_model
from .adapters.lora import TaskType

__all__ = ["AdapterError", "BottleneckConfig", "LoraConfig", "PeftModel", "TaskType", "get_peft_model"]
