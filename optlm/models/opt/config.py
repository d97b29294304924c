"""OPT configuration: one dataclass with transformers' field names and defaults, plus the published sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig


@dataclass
class OPTConfig(ModelConfig):
    """Architecture of an OPT model.

    Field names, defaults and meaning follow transformers' ``OPTConfig`` so a hub ``config.json`` reads
    unchanged. Unknown keys in a config file (``activation_dropout``, ``prefix``, ``torch_dtype`` …) are
    kept in :attr:`extra` and written back on save.
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    # True: pre-LN blocks (every size but 350m); False: post-LN (opt-350m).
    do_layer_norm_before: bool = True
    # Checkpoints converted from some metaseq runs have no final layer norm even though they are pre-LN.
    _remove_final_layer_norm: bool = False
    # Embedding width; when it differs from hidden_size the decoder has project_in / project_out (opt-350m).
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    model_type = "opt"
    family_name = "OPT"
    architecture = "OPTForCausalLM"
    hub_org = "facebook"

    def __post_init__(self) -> None:
        self._check_types()
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        self._normalise_labels()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        self._check_positive("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings")

    @property
    def output_dim(self) -> int:
        return self.word_embed_proj_dim

    def with_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        d = super().with_overrides(overrides)
        if "hidden_size" in overrides and "word_embed_proj_dim" not in overrides:
            d["word_embed_proj_dim"] = overrides["hidden_size"]  # embeddings as wide as the decoder, as presets
        return d


def _preset(hidden: int, layers: int, heads: int, **kw: Any) -> dict[str, Any]:
    # Every published size uses ffn_dim = 4 * hidden, 2048 positions and the 50272-row embedding
    # (50265 tokenizer entries padded up to a multiple of 8 by metaseq).
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                word_embed_proj_dim=hidden, **kw)


# Sources: the config.json of each facebook/opt-* repository on the Hugging Face hub (125m … 66b) and
# Table 1 of Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models" (175b, which the hub
# does not host; its shape also appears in metaseq's projects/OPT model card).
PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": _preset(768, 12, 12),
    # The only post-LN size; embeddings are 512 wide and projected in/out of the 1024-wide decoder.
    "opt-350m": {**_preset(1024, 24, 16), "word_embed_proj_dim": 512, "do_layer_norm_before": False},
    "opt-1.3b": _preset(2048, 24, 32),
    "opt-2.7b": _preset(2560, 32, 32),  # head_dim 80
    "opt-6.7b": _preset(4096, 32, 32),
    "opt-13b": _preset(5120, 40, 40),
    "opt-30b": _preset(7168, 48, 56),
    "opt-66b": _preset(9216, 64, 72),
    "opt-175b": _preset(12288, 96, 96),
}


OPTConfig.presets = PRESETS
