"""OPTConfig: transformers' fields and defaults, hub config.json round trips, the published sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from optlm import OPTConfig
from optlm.models.opt.config import PRESETS

FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
          "do_layer_norm_before", "_remove_final_layer_norm", "word_embed_proj_dim", "dropout",
          "attention_dropout", "num_attention_heads", "activation_function", "layerdrop", "init_std", "use_cache",
          "pad_token_id", "bos_token_id", "eos_token_id", "enable_bias", "layer_norm_elementwise_affine",
          "tie_word_embeddings"]


def test_defaults_equal_transformers():
    ours, ref = OPTConfig(), transformers.OPTConfig()
    for name in FIELDS:
        assert getattr(ours, name) == getattr(ref, name), name


def test_hub_style_config_json_round_trip(tmp_path):
    hub = {"_name_or_path": "facebook/opt-350m", "activation_dropout": 0.0, "activation_function": "relu",
           "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
           "do_layer_norm_before": False, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 4096,
           "hidden_size": 1024, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
           "model_type": "opt", "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 1,
           "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.20.0.dev0", "use_cache": True,
           "vocab_size": 50272, "word_embed_proj_dim": 512}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = OPTConfig.from_json_file(tmp_path / "config.json")
    assert config == OPTConfig.from_name("opt-350m", dropout=0.1, extra=config.extra)
    assert config.extra["prefix"] == "</s>" and config.extra["activation_dropout"] == 0.0
    out = tmp_path / "saved"
    config.save(out)
    saved = json.loads((out / "config.json").read_text())
    for key, value in hub.items():
        assert saved[key] == value, key
    ref = transformers.OPTConfig.from_pretrained(out)
    for name in FIELDS:
        assert getattr(ref, name) == getattr(config, name), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_valid_transformers_configs(name):
    config = OPTConfig.from_name(name)
    ref = transformers.OPTConfig(**{f: getattr(config, f) for f in FIELDS})
    assert ref.hidden_size // ref.num_attention_heads == config.head_dim


def test_preset_shapes():
    assert OPTConfig.from_name("opt-2.7b").head_dim == 80
    small = OPTConfig.from_name("facebook/opt-350m")
    assert not small.do_layer_norm_before and small.word_embed_proj_dim == 512 and small.hidden_size == 1024
    big = OPTConfig.from_name("opt-175b")
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads) == (12288, 96, 96)
    assert OPTConfig.from_name("opt-125m").word_embed_proj_dim == 768


def test_bad_configs_are_clear():
    with pytest.raises(ValueError, match="unknown OPT size"):
        OPTConfig.from_name("opt-7b")
    with pytest.raises(ValueError, match="not divisible"):
        OPTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        OPTConfig.from_dict({"model_type": "gpt2"})


def test_every_field_is_serialised():
    d = OPTConfig().to_dict()
    for f in dataclasses.fields(OPTConfig):
        if f.name not in ("extra", "id2label", "label2id"):
            assert f.name in d
