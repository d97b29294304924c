"""GPT-Neo's transformers-style classes: GPTNeoModel, GPTNeoForCausalLM, GPTNeoForSequenceClassification,
GPTNeoForQuestionAnswering, GPTNeoForTokenClassification."""

from __future__ import annotations

from torch import Tensor

from ..kv_cache import KVCache
from ..models.core import Frame
from ..models.gpt_neo.config import GPTNeoConfig
from ..models.gpt_neo.model import GPTNeoStack
from .base import (
    BaseModel,
    ForCausalLM,
    ForQuestionAnswering,
    ForSequenceClassification,
    ForTokenClassification,
    ModelOutput,
    PreTrainedModel,
)


class GPTNeoPreTrainedModel(PreTrainedModel):
    config_class = GPTNeoConfig
    base_model_prefix = "transformer"
    # Checkpoints saved by older transformers carry each attention layer's causal-mask buffers.
    _ignore_checkpoint_keys = (r"\.attn\.attention\.(bias|masked_bias)$",)
    bottleneck_points = {"attention": "attn", "mlp": "mlp"}
    tp_plan = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "out_proj": "row", "c_fc": "column",
               "c_proj": "row"}
    # transformers' GPTNeoModel numbers positions from the cache length, padding included, unless given
    # position_ids (its generate() passes them, derived from the attention mask, as optlm's generation does).
    positions_follow_mask = False


class GPTNeoModel(GPTNeoPreTrainedModel, GPTNeoStack):
    """The bare model. It is its own decoder: transformers keeps the embeddings and blocks on GPTNeoModel
    itself (``transformer.wte``, ``transformer.h.N``), so this class is the decoder with the keyword surface
    on top; called with a :class:`Frame` (the core protocol) it runs the decoder directly."""

    def __init__(self, config: GPTNeoConfig, init: bool = True):
        GPTNeoStack.__init__(self, config)
        if init:
            self.init_weights()

    def get_decoder(self) -> GPTNeoStack:
        return self

    # The decoder's own accessors, not PreTrainedModel's (which ask the decoder, i.e. this object).
    get_input_embeddings = GPTNeoStack.get_input_embeddings
    set_input_embeddings = GPTNeoStack.set_input_embeddings

    def forward(self, input_ids: Tensor, past_key_values: KVCache | Frame | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                use_cache: bool | None = None) -> ModelOutput | Tensor:
        if isinstance(past_key_values, Frame):  # decoder(ids, frame): the core call
            return GPTNeoStack.forward(self, input_ids, past_key_values)
        return BaseModel.forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache)


GPTNeoPreTrainedModel.base_model_class = GPTNeoModel


class GPTNeoForCausalLM(GPTNeoPreTrainedModel, ForCausalLM):
    """GPT-Neo with its language-model head (tied to the token embeddings)."""


class GPTNeoForSequenceClassification(GPTNeoPreTrainedModel, ForSequenceClassification):
    """GPT-Neo with a classification/regression head on each row's last real token."""


class GPTNeoForQuestionAnswering(GPTNeoPreTrainedModel, ForQuestionAnswering):
    """GPT-Neo with start/end logits for extractive question answering."""


class GPTNeoForTokenClassification(GPTNeoPreTrainedModel, ForTokenClassification):
    """GPT-Neo with a label per token."""
