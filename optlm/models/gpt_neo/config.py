"""GPT-Neo configuration: transformers' ``GPTNeoConfig`` fields and defaults, plus EleutherAI's published sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig

ATTENTION_KINDS = ("global", "local")


@dataclass
class GPTNeoConfig(ModelConfig):
    """Architecture of a GPT-Neo model (Black et al. 2021, EleutherAI).

    Field names, defaults and meaning follow transformers' ``GPTNeoConfig`` (whose defaults describe the 1.3B
    model), so a hub ``config.json`` reads unchanged. ``attention_types`` lists ``[[kinds, repeat], ...]``:
    ``[[["global", "local"], 12]]`` is 24 layers alternating global and local attention; local layers see
    the last ``window_size`` tokens only. ``num_hidden_layers`` / ``num_attention_heads`` answer for
    ``num_layers`` / ``num_heads`` (transformers' attribute map).
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    attention_types: list | None = None
    num_heads: int = 16
    # Width of the MLP; None means 4 * hidden_size.
    intermediate_size: int | None = None
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    # GPT-Neo has no pad token; batched generation pads with EOS, as transformers' pipelines do.
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    model_type = "gpt_neo"
    family_name = "GPT-Neo"
    architecture = "GPTNeoForCausalLM"
    hub_org = "EleutherAI"
    dropout_fields = ("resid_dropout", "embed_dropout")

    def __post_init__(self) -> None:
        self._check_types()
        if self.attention_types is None:
            self.attention_types = [[["global", "local"], self.num_layers // 2]]
        self._normalise_labels()
        self._check_positive("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings",
                             "window_size")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                             "pick a head count that divides it")
        layers = self.attention_layers
        if len(layers) != self.num_layers:
            raise ValueError(f"attention_types {self.attention_types} describe {len(layers)} layers but num_layers is "
                             f"{self.num_layers}; make them agree (e.g. [[['global', 'local'], "
                             f"{self.num_layers // 2}]])")

    @property
    def attention_layers(self) -> list[str]:
        """``attention_types`` expanded to one kind per layer: ``["global", "local", "global", ...]``."""
        layers = []
        try:
            for kinds, repeat in self.attention_types:
                for _ in range(repeat):
                    layers.extend(kinds)
        except (TypeError, ValueError):
            raise ValueError(f"attention_types must be a list of [[kinds...], count] pairs, got "
                             f"{self.attention_types!r}") from None
        unknown = sorted(set(layers) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"attention_types has {', '.join(map(repr, unknown))}; layers are 'global' or 'local'")
        return layers

    def with_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        d = super().with_overrides(overrides)
        d.pop("attention_layers", None)
        if "num_layers" in overrides and "attention_types" not in overrides:
            n = overrides["num_layers"]
            d["attention_types"] = [[["global", "local"], n // 2]] if n % 2 == 0 else [[["global"], n]]
        return d

    @classmethod
    def _derived(cls) -> tuple[str, ...]:
        return ("attention_layers",)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "attention_layers": self.attention_layers}

    # ---- the questions every family's config answers (optlm.models.config) --------------------------------

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_size if self.intermediate_size is None else self.intermediate_size

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.window_size if kind == "local" else None for kind in self.attention_layers]

    @property
    def init_std(self) -> float:
        return self.initializer_range


def _preset(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    # Every published size alternates global and local layers, with a 256-token window, 2048 positions and
    # GPT-2's 50257-token vocabulary.
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads,
                attention_types=[[["global", "local"], layers // 2]])


# Sources: the config.json of EleutherAI/gpt-neo-125m, gpt-neo-1.3B and gpt-neo-2.7B on the Hugging Face hub,
# and the model table of EleutherAI's gpt-neo repository (Black et al. 2021, doi:10.5281/zenodo.5297715).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt-neo-125m": _preset(768, 12, 12),
    "gpt-neo-1.3b": _preset(2048, 24, 16),
    "gpt-neo-2.7b": _preset(2560, 32, 20),  # head_dim 128
}

GPTNeoConfig.presets = PRESETS
