"""OPT's transformers-style classes: OPTModel, OPTForCausalLM, OPTForSequenceClassification,
OPTForQuestionAnswering. Code written against transformers' OPT classes switches by changing the import."""

from __future__ import annotations

from torch import nn

from ..models.opt import arch
from ..models.opt.config import OPTConfig
from ..models.opt.model import OPTDecoder
from .base import BaseModel, ForCausalLM, ForQuestionAnswering, ForSequenceClassification, PreTrainedModel


class OPTPreTrainedModel(PreTrainedModel):
    config_class = OPTConfig
    base_model_prefix = "model"
    _ignore_checkpoint_keys = arch.IGNORED_KEYS  # fairseq bookkeeping buffers, not weights
    bottleneck_points = {"attention": "self_attn", "mlp": "fc2"}
    tp_plan = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "out_proj": "row", "fc1": "column",
               "fc2": "row"}
    positions_follow_mask = True


class OPTModel(OPTPreTrainedModel, BaseModel):
    """The bare decoder: returns ``last_hidden_state`` (width word_embed_proj_dim)."""

    def __init__(self, config: OPTConfig, init: bool = True):
        super().__init__(config)
        self.decoder = OPTDecoder(config)
        if init:
            self.init_weights()

    def get_decoder(self) -> nn.Module:
        return self.decoder


OPTPreTrainedModel.base_model_class = OPTModel


class OPTForCausalLM(OPTPreTrainedModel, ForCausalLM):
    """OPT with its language-model head (tied to the token embeddings)."""


class OPTForSequenceClassification(OPTPreTrainedModel, ForSequenceClassification):
    """OPT with a classification/regression head on each row's last real token."""


class OPTForQuestionAnswering(OPTPreTrainedModel, ForQuestionAnswering):
    """OPT with start/end logits for extractive question answering."""
