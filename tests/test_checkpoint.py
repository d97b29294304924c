"""Checkpoint formats and failure modes.

Invariants: every layout users meet (single / sharded safetensors, weights-only .bin, `decoder.*` and
`model.decoder.*` keys, a missing tied lm_head, the hub cache offline) loads to the same model; what optlm
saves loads back in transformers with identical outputs; every bad checkpoint names what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import hf_config, left_padded_batch
from safetensors.torch import load_file, save_file

import optlm
from optlm.checkpoint import CheckpointError, parse_size


@pytest.fixture
def reference(tmp_path):
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(hf_config()).double().eval()
    directory = tmp_path / "ref"
    model.save_pretrained(directory)
    return model, directory


def logits_equal(ref, ours, tol=1e-12):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    return (a - b).abs().max().item() <= tol


def test_save_round_trip_loads_in_transformers(tmp_path, reference, config_kwargs):
    torch.manual_seed(1)
    ours = optlm.OPTForCausalLM(optlm.OPTConfig.from_dict(hf_config(**config_kwargs).to_dict())).double().eval()
    ours.save_pretrained(tmp_path / "out")
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.dtype == torch.float64
    assert logits_equal(back, ours)
    again = optlm.OPTForCausalLM.from_pretrained(tmp_path / "out")
    assert logits_equal(back, again)


@pytest.mark.parametrize("cls_pair", [
    (optlm.OPTForSequenceClassification, transformers.OPTForSequenceClassification),
    (optlm.OPTForQuestionAnswering, transformers.OPTForQuestionAnswering),
])
def test_heads_save_round_trip(tmp_path, cls_pair):
    ours_cls, hf_cls = cls_pair
    torch.manual_seed(2)
    ours = ours_cls(optlm.OPTConfig.from_dict(hf_config(num_labels=3).to_dict())).double().eval()
    ours.save_pretrained(tmp_path)
    back = hf_cls.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a, b = back(input_ids=ids, attention_mask=mask), ours(ids, attention_mask=mask)
    name = "logits" if ours_cls is optlm.OPTForSequenceClassification else "start_logits"
    assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-12, rtol=0)


def test_sharded_save_both_ways(tmp_path, reference):
    ref, _ = reference
    ref.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    assert logits_equal(ref, optlm.OPTForCausalLM.from_pretrained(tmp_path / "hf_sharded"))

    ours = optlm.OPTForCausalLM.from_pretrained(tmp_path / "hf_sharded")
    ours.save_pretrained(tmp_path / "ours_sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "ours_sharded").eval()
    assert logits_equal(back, ours)


def test_bin_checkpoint_with_original_decoder_layout(tmp_path, reference):
    """The original hub uploads: pytorch_model.bin with `decoder.*` keys and no lm_head."""
    ref, directory = reference
    state = {k.removeprefix("model."): v for k, v in load_file(directory / "model.safetensors").items()}
    assert all(k.startswith("decoder.") for k in state)
    out = tmp_path / "bin"
    out.mkdir()
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text((directory / "config.json").read_text())
    ours = optlm.OPTForCausalLM.from_pretrained(out)
    assert logits_equal(ref, ours)
    assert ours.lm_head.weight is ours.model.decoder.embed_tokens.weight


def test_bin_loading_never_unpickles_objects(tmp_path, reference):
    _, directory = reference
    out = tmp_path / "evil"
    out.mkdir()
    (out / "config.json").write_text((directory / "config.json").read_text())

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Payload()}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        optlm.OPTForCausalLM.from_pretrained(out)


def test_model_prefixed_keys_load_into_base_model(tmp_path, reference):
    ref, directory = reference
    base = optlm.OPTModel.from_pretrained(directory)  # lm_head in the file is not needed by OPTModel
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = base(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert set(base.state_dict()) == set(transformers.OPTModel(hf_config()).state_dict())


def test_classifier_from_causal_checkpoint_initialises_new_head(tmp_path, reference):
    _, directory = reference
    model = optlm.OPTForSequenceClassification.from_pretrained(directory, num_labels=5)
    assert model.score.weight.shape == (5, 32) and not model.score.weight.is_meta
    assert model.score.weight.std() > 0


def test_dtype_conversion_and_auto(tmp_path, reference):
    _, directory = reference
    assert optlm.OPTForCausalLM.from_pretrained(directory).dtype == torch.float64  # "auto": as stored
    assert optlm.OPTForCausalLM.from_pretrained(directory, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        optlm.OPTForCausalLM.from_pretrained(directory, dtype="float8")


# ---- bad checkpoints ----------------------------------------------------------------------------------

def _copy_with_state(directory: Path, out: Path, state: dict) -> Path:
    out.mkdir()
    (out / "config.json").write_text((directory / "config.json").read_text())
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_wrong_key_names_are_named(tmp_path, reference):
    _, directory = reference
    state = load_file(directory / "model.safetensors")
    state["model.decoder.layers.0.self_attn.query.weight"] = state.pop("model.decoder.layers.0.self_attn.q_proj.weight")
    out = _copy_with_state(directory, tmp_path / "bad", state)
    with pytest.raises(CheckpointError) as e:
        optlm.OPTForCausalLM.from_pretrained(out)
    assert "missing (1): model.decoder.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert "unexpected (1): model.decoder.layers.0.self_attn.query.weight" in str(e.value)


def test_wrong_shapes_are_named(tmp_path, reference):
    _, directory = reference
    state = load_file(directory / "model.safetensors")
    state["model.decoder.layers.1.fc1.weight"] = torch.zeros(48, 32, dtype=torch.float64)
    out = _copy_with_state(directory, tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc1\.weight: checkpoint \(48, 32\) vs model \(64, 32\)"):
        optlm.OPTForCausalLM.from_pretrained(out)


def test_config_that_disagrees_with_weights_says_so(tmp_path, reference):
    _, directory = reference
    out = tmp_path / "cfg"
    out.mkdir()
    (out / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has 2 layers but config.json says num_hidden_layers=3"):
        optlm.OPTForCausalLM.from_pretrained(out)


def test_truncated_safetensors_is_reported(tmp_path, reference):
    _, directory = reference
    out = tmp_path / "trunc"
    out.mkdir()
    (out / "config.json").write_text((directory / "config.json").read_text())
    data = (directory / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        optlm.OPTForCausalLM.from_pretrained(out)


def test_directory_without_weights_lists_what_it_looked_for(tmp_path, reference):
    _, directory = reference
    out = tmp_path / "empty"
    out.mkdir()
    (out / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found .* model.safetensors"):
        optlm.OPTForCausalLM.from_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        optlm.OPTForCausalLM.from_pretrained(out)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        optlm.OPTForCausalLM.from_pretrained(str(tmp_path / "nope"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("10KiB") == 10240 and parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


# ---- hub cache ----------------------------------------------------------------------------------------

def _hub_cache(root: Path, repo: str, source: Path) -> None:
    """A Hugging Face cache entry as huggingface_hub writes it: blobs, a snapshot and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in source.iterdir():
        blob = base / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_hub_id_resolves_from_offline_cache(tmp_path, reference):
    ref, directory = reference
    cache = tmp_path / "hub"
    _hub_cache(cache, "facebook/opt-125m", directory)
    code = (
        "import torch, optlm\n"
        "m = optlm.OPTForCausalLM.from_pretrained('facebook/opt-125m')\n"
        "print(m.num_parameters(), m.dtype)\n"
        "try:\n"
        "    optlm.OPTForCausalLM.from_pretrained('facebook/opt-350m')\n"
        "except ValueError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{ref.num_parameters()} torch.float64"
    assert lines[1].startswith("ERR") and "not in the Hugging Face cache" in lines[1]


def test_info_command(tmp_path, reference):
    ref, directory = reference
    out = subprocess.run([sys.executable, "-m", "optlm.cli", "info", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"parameters:  {ref.num_parameters():,}" in out.stdout
    assert "F64" in out.stdout and "model.safetensors" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "optlm.cli", "info", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
