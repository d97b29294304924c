"""Original metaseq checkpoints to Hugging Face directories.

Invariants: a checkpoint laid out as metaseq lays out OPT (q/k/v fused in k, v, q order, split across 1, 2 or 4
model-parallel parts Megatron-style, metaseq's names, its bookkeeping keys) converts back to logits equal to the
model it was made from, in transformers; a pickle holding anything but tensors and plain containers is refused
with an error naming it, and nothing in it runs; a checkpoint that lacks a part or its architecture is refused
with the fix named.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import transformers
from conftest import hf_config, left_padded_batch

from optlm import cli
from optlm.checkpoint import CheckpointError
from optlm.convert import convert_metaseq

# transformers' name -> metaseq's, and how metaseq splits it across model-parallel parts (the inverse of
# optlm.models.opt.names, written out independently here)
RENAME = {"project_in": "project_in_dim", "project_out": "project_out_dim", "final_layer_norm": "layer_norm"}


def _metaseq_parts(ref: transformers.OPTForCausalLM, mp: int) -> list[dict[str, torch.Tensor]]:
    sd = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if not k.startswith("lm_head")}
    cfg = ref.config
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, value in sd.items():
        name = key.removeprefix("decoder.")
        if not name.startswith("layers."):
            top = name.split(".")[0]
            new = "decoder." + name.replace(top, RENAME.get(top, top), 1)
            pieces = value.chunk(mp, 0) if top == "embed_tokens" else [value] * mp
        elif ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            continue  # fused below, with v
        elif ".self_attn.v_proj." in name:
            kind = name.split(".")[-1]
            pre = name.split(".self_attn.")[0]
            q, k, v = (sd[f"decoder.{pre}.self_attn.{x}_proj.{kind}"].chunk(mp, 0) for x in "qkv")
            new = f"decoder.{pre}.self_attn.qkv_proj.{kind}"
            pieces = [torch.cat([k[i], v[i], q[i]], 0) for i in range(mp)]  # metaseq's order: k, v, q
        elif name.endswith(("out_proj.weight", "fc2.weight")):
            new, pieces = "decoder." + name, value.chunk(mp, 1)
        elif name.endswith(("fc1.weight", "fc1.bias")):
            new, pieces = "decoder." + name, value.chunk(mp, 0)
        else:
            new, pieces = "decoder." + name, [value] * mp
        for i in range(mp):
            parts[i][new] = pieces[i].clone()
    for i in range(mp):
        parts[i]["decoder.version"] = torch.tensor([3.0])
        parts[i]["decoder.output_projection.weight"] = parts[i]["decoder.embed_tokens.weight"]
    record = {"decoder_attention_heads": cfg.num_attention_heads, "decoder_normalize_before":
              cfg.do_layer_norm_before, "activation_fn": cfg.activation_function,
              "decoder_embed_dim": cfg.hidden_size}
    return [{"model": p, "cfg": {"model": dict(record)}, "optimizer_history": [{"num_updates": 10}]} for p in parts]


def _save_parts(directory, ref, mp: int):
    directory.mkdir()
    for i, part in enumerate(_metaseq_parts(ref, mp)):
        torch.save(part, directory / f"reshard-model_part-{i}.pt")
    return directory


@pytest.mark.parametrize("mp", [1, 2, 4])
@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
def test_metaseq_parts_convert_back_to_the_models_logits(tmp_path, mp, shape):
    overrides = {"pre_ln": {}, "post_ln_proj": {"do_layer_norm_before": False, "word_embed_proj_dim": 16}}[shape]
    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(hf_config(**overrides)).eval()
    parts = _save_parts(tmp_path / "metaseq", ref, mp)
    assert cli.main(["convert", str(parts), "--from", "metaseq", "--out", str(tmp_path / "hf")]) == 0
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = back(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(want, got)  # the same numbers, only moved
    assert back.config.do_layer_norm_before == ref.config.do_layer_norm_before
    assert back.config.word_embed_proj_dim == ref.config.word_embed_proj_dim


def _side_effect(path):
    """What a malicious pickle would run on load."""
    with open(path, "w") as f:
        f.write("ran")
    return {}


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _side_effect, (self.path,)


def test_a_pickle_with_a_foreign_class_is_refused_and_nothing_in_it_runs(tmp_path):
    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(hf_config()).eval()
    part = _metaseq_parts(ref, 1)[0]
    marker = tmp_path / "ran.txt"
    part["cfg"] = Payload(str(marker))
    torch.save(part, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"test_convert\._side_effect.*only tensors and plain containers"):
        convert_metaseq(tmp_path / "model.pt", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_old_fairseq_namespace_record_is_read_as_data(tmp_path):
    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(hf_config()).eval()
    part = _metaseq_parts(ref, 1)[0]
    part["args"] = argparse.Namespace(**part.pop("cfg")["model"])  # fairseq before its config objects
    torch.save(part, tmp_path / "model.pt")
    convert_metaseq(tmp_path / "model.pt", tmp_path / "out")
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(4, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, back(ids).logits)


def test_missing_parts_and_unrecorded_architectures_name_the_fix(tmp_path):
    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(hf_config()).eval()
    parts = _save_parts(tmp_path / "mp", ref, 4)
    (parts / "reshard-model_part-2.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks model part\(s\) \[2\]"):
        convert_metaseq(parts, tmp_path / "out")
    part = _metaseq_parts(ref, 1)[0]
    del part["cfg"]
    torch.save(part, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="pass --config"):
        convert_metaseq(tmp_path / "bare.pt", tmp_path / "out")
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    convert_metaseq(tmp_path / "bare.pt", tmp_path / "out", config=tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="check --config"):
        convert_metaseq(tmp_path / "bare.pt", tmp_path / "out2", config="opt-125m")
