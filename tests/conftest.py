"""Shared fixtures: tiny OPT configurations and random-weight checkpoints written by transformers.

transformers is the reference implementation; tests build the same random weights there, save them in the
Hugging Face format and load them with optlm, so every comparison goes through the real checkpoint path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The small tokenizer files every tokenizer / generation / chat / CLI test needs ship with the tests (see
# fixtures/tokenizers/README.md); the tests need nothing from outside the repository.
TOKENIZER_FILES = Path(__file__).resolve().parent / "fixtures" / "tokenizers"

# Small shapes that still exercise every code path: pre-LN (most OPT sizes), post-LN with embedding
# projection (the opt-350m layout), and no-bias / no-affine variants.
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, dropout=0.0)
CONFIGS = {
    "pre_ln": {},
    "post_ln_proj": {"do_layer_norm_before": False, "word_embed_proj_dim": 16},
    "no_bias_no_affine": {"enable_bias": False, "layer_norm_elementwise_affine": False},
    "pre_ln_no_final_ln_proj": {"_remove_final_layer_norm": True, "word_embed_proj_dim": 24},
}


def hf_config(**overrides):
    import transformers

    return transformers.OPTConfig(**{**TINY, **overrides})


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(params=sorted(CONFIGS))
def config_kwargs(request) -> dict:
    return CONFIGS[request.param]


def left_padded_batch(vocab: int = 128, lengths=(9, 5, 7), pad_id: int = 1, seed: int = 0):
    """Random ids (B, T) left-padded to the longest length, and the matching 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask

