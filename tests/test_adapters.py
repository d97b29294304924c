"""Adapters (optlm.adapters, optlm.peft). Invariants:

- an adapter saved by peft loads into optlm and gives peft's logits (fp32, <= 1e-5) and its greedy tokens, for
  every LoRA option optlm implements; an adapter saved by optlm loads into peft with the same logits;
- merged == unmerged; disable_adapter() == base; a fresh bottleneck adapter == base; save/load round-trips;
- a batch whose rows use different adapters (and none) equals each row run alone with its adapter merged;
- bad adapters fail with an error that names the problem, and leave the model as it was.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import hf_config, save_hf

from optlm.adapters import AdapterError, BottleneckConfig, adapter_index, load_adapter
from optlm.hf import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
from optlm.models.core import Frame
from optlm.peft import LoraConfig, PeftModel, get_peft_model

IDS = torch.randint(4, 128, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_hf(transformers.OPTForCausalLM(hf_config()), tmp_path_factory.mktemp("base"))


def _randomize_biases(model, mode):
    """Give the biases an adapter trains non-zero values (they are part of the adapter's file)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and (mode == "all" or (mode == "lora_only" and "base_layer" in name)):
                p.add_(torch.randn_like(p) * 0.1)


def _peft_adapter(base_dir, out, task=transformers.OPTForCausalLM, **kwargs):
    """A peft LoRA with random (non-zero) B matrices on the transformers model, saved to ``out``."""
    torch.manual_seed(2)
    ref = peft.get_peft_model(task.from_pretrained(base_dir),
                              peft.LoraConfig(init_lora_weights=False, **kwargs))
    _randomize_biases(ref, kwargs.get("bias", "none"))
    ref.save_pretrained(out)
    return ref.eval()


LORA_CASES = {
    "default_targets": dict(r=4, lora_alpha=8, task_type="CAUSAL_LM"),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    "lora_only_bias": dict(r=2, lora_alpha=4, bias="lora_only", target_modules=["out_proj", "fc2"]),
    "all_bias": dict(r=2, lora_alpha=4, bias="all", target_modules=["fc1"]),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    "lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2},
                     alpha_pattern={"v_proj": 3}),
    "regex_layers": dict(r=3, lora_alpha=6, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"),
    "layers_to_transform": dict(r=3, lora_alpha=6, target_modules=["fc1", "fc2"], layers_to_transform=[0]),
    "lora_bias": dict(r=2, lora_alpha=2, target_modules=["q_proj"], lora_bias=True),
    "exclude": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_adapter_loads_with_peft_logits_and_tokens(base_dir, tmp_path, case):
    kwargs = LORA_CASES[case]
    ref = _peft_adapter(base_dir, tmp_path / "ad", **kwargs)
    ours = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        base = transformers.OPTForCausalLM.from_pretrained(base_dir)(input_ids=IDS).logits
        got = ours(IDS).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the model, so equality means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref_tokens = ref.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(ours.generate(IDS, max_new_tokens=8), ref_tokens)


@pytest.mark.parametrize("task,kind", [(transformers.OPTForSequenceClassification, OPTForSequenceClassification),
                                       (transformers.OPTForQuestionAnswering, OPTForQuestionAnswering)])
def test_modules_to_save_heads_match_peft(base_dir, tmp_path, task, kind):
    task_type = "SEQ_CLS" if kind is OPTForSequenceClassification else "QUESTION_ANS"
    torch.manual_seed(3)
    head_dir = save_hf(task.from_pretrained(base_dir), tmp_path / "base")  # a random head, saved once
    ref = peft.get_peft_model(task.from_pretrained(head_dir),
                              peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type=task_type))
    with torch.no_grad():  # the adapter's own copy of the head differs from the base's
        for name, p in ref.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    ref.save_pretrained(tmp_path / "ad")
    ref.eval()
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["modules_to_save"]  # peft added the task's head
    ours = PeftModel.from_pretrained(kind.from_pretrained(head_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        want, got = ref(input_ids=IDS), ours(IDS)
        keys = ["logits"] if task_type == "SEQ_CLS" else ["start_logits", "end_logits"]
        for key in keys:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
        with ours.disable_adapter():
            plain = kind.from_pretrained(head_dir)(IDS)
            torch.testing.assert_close(ours(IDS)[keys[0]], plain[keys[0]], atol=1e-6, rtol=1e-6)


def test_optlm_adapter_loads_in_peft(base_dir, tmp_path):
    model = OPTForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2", "lm_head"], bias="lora_only",
                        init_lora_weights=False, use_rslora=True, task_type="CAUSAL_LM")
    ours = get_peft_model(model, config)
    _randomize_biases(ours, "lora_only")
    ours.save_pretrained(tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["r"] == 4
    ref = peft.PeftModel.from_pretrained(transformers.OPTForCausalLM.from_pretrained(base_dir), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS).logits, ref.eval()(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_disable(base_dir, tmp_path):
    _peft_adapter(base_dir, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "lm_head"])
    base = OPTForCausalLM.from_pretrained(base_dir).eval()
    ours = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        adapted, plain = ours(IDS).logits, base(IDS).logits
        with ours.disable_adapter():
            torch.testing.assert_close(ours(IDS).logits, plain, atol=0, rtol=0)
        ours.merge_adapter()
        torch.testing.assert_close(ours(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
        with ours.disable_adapter():  # a merged adapter is taken out first, as in peft
            torch.testing.assert_close(ours(IDS).logits, plain, atol=1e-5, rtol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
        merged = ours.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    # The LoRA on the tied head changed the head only: the merged model keeps its own head weight.
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.OPTForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_bottleneck_fresh_is_identity_and_round_trips(base_dir, tmp_path, variant):
    base = OPTForCausalLM.from_pretrained(base_dir).eval()
    model = get_peft_model(OPTForCausalLM.from_pretrained(base_dir),
                           BottleneckConfig(variant=variant, reduction_factor=4, non_linearity="gelu")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=0, rtol=0)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        per_layer = 4 if variant == "houlsby" else 2  # down + up per adapter point, weights only below
        assert len([n for n in names if n.endswith("weight")]) == per_layer * base.config.num_hidden_layers
        for n, p in model.named_parameters():
            if ".up." in n:
                p.normal_(std=0.5)  # a trained adapter
        trained = model(IDS).logits
    assert (trained - base(IDS).logits).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "bn")
    config = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["variant"] == variant
    again = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "bn").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, trained, atol=0, rtol=0)
    with pytest.raises(AdapterError, match="cannot be merged"):
        again.merge_and_unload()
    plain = again.unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, base(IDS).logits, atol=0, rtol=0)


def test_bottleneck_and_lora_together(base_dir, tmp_path):
    """LoRA on fc2 after a bottleneck hooked on fc2 keeps the hook (the swap moves it)."""
    model = get_peft_model(OPTForCausalLM.from_pretrained(base_dir), BottleneckConfig(reduction_factor=4), "bn")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".up." in n:
                p.normal_(std=0.5)
        before = model.eval()(IDS).logits
        model.add_adapter("lora", LoraConfig(target_modules=["fc2"]))  # fresh LoRA: B = 0, output unchanged
        model.set_adapter(["bn", "lora"])
        torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def _lora_dir(base_dir, out, seed, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(OPTForCausalLM.from_pretrained(base_dir),
                           LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(out)
    return out


def test_mixed_batch_equals_each_row_alone_merged(base_dir, tmp_path):
    dirs = {"a": _lora_dir(base_dir, tmp_path / "a", 10, r=4, target_modules=["q_proj", "v_proj"]),
            "b": _lora_dir(base_dir, tmp_path / "b", 11, r=8, lora_alpha=16, target_modules="all-linear"),
            "c": _lora_dir(base_dir, tmp_path / "c", 12, r=2, target_modules=["fc1", "lm_head"], use_rslora=True)}
    model = OPTForCausalLM.from_pretrained(base_dir).eval()
    for name, d in dirs.items():
        load_adapter(model, d, name)
    rows = ["b", None, "a", "c", "a"]
    ids = torch.randint(4, 128, (len(rows), 10), generator=torch.Generator().manual_seed(5))
    frame = Frame.causal(len(rows), 10, ids.device)
    frame.adapter = adapter_index(model, rows)
    with torch.no_grad():
        got, _ = model.step(ids, frame)
        for b, name in enumerate(rows):
            alone = OPTForCausalLM.from_pretrained(base_dir).eval()
            if name is not None:
                alone = PeftModel.from_pretrained(alone, dirs[name]).merge_and_unload()
            want = alone(ids[b:b + 1]).logits[:, -1]
            torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------

def test_missing_config(base_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "empty")
    with pytest.raises(AdapterError, match="does not exist"):
        PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "nowhere")


def test_unsupported_peft_type_is_named(base_dir, tmp_path):
    ref = peft.get_peft_model(transformers.OPTForCausalLM.from_pretrained(base_dir),
                              peft.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]))
    ref.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="'IA3' adapter"):
        PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "ia3")
    ref = peft.get_peft_model(transformers.OPTForCausalLM.from_pretrained(base_dir),
                              peft.LoraConfig(use_dora=True))
    ref.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match="use_dora"):
        PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir), tmp_path / "dora")


def test_targets_matching_nothing(base_dir):
    with pytest.raises(AdapterError, match="matched no linear layer.*q_proj"):
        get_peft_model(OPTForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["query_key_value"]))


def test_rank_and_shape_mismatches_name_the_tensor(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    _lora_dir(base_dir, tmp_path / "ad", 0, r=4, target_modules=["q_proj", "v_proj"])
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    config["r"] = 8  # the config says rank 8, the file holds rank 4
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    model = OPTForCausalLM.from_pretrained(base_dir)
    params_before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \(4, 32\).*needs \(8, 32\)"):
        load_adapter(model, tmp_path / "ad")
    assert model.state_dict().keys() == params_before.keys()  # nothing left behind
    # An adapter for a wider model.
    torch.manual_seed(0)
    wide = save_hf(transformers.OPTForCausalLM(hf_config(hidden_size=48, word_embed_proj_dim=48)), tmp_path / "wide")
    _lora_dir(wide, tmp_path / "wide_ad", 0, r=4)
    with pytest.raises(AdapterError, match=r"has shape \(4, 48\).*\(4, 32\)"):
        load_adapter(model, tmp_path / "wide_ad")
    # A file with tensors for modules this model lacks.
    tensors = load_file(tmp_path / "wide_ad" / "adapter_model.safetensors")
    tensors["base_model.model.model.decoder.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    _lora_dir(base_dir, tmp_path / "extra", 0, r=4)
    save_file({**load_file(tmp_path / "extra" / "adapter_model.safetensors"),
               "base_model.model.model.decoder.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              tmp_path / "extra" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layers.7.*no place for"):
        load_adapter(model, tmp_path / "extra")


def test_bad_config_values():
    for kwargs, match in [({"r": 0}, "rank"), ({"bias": "some"}, "bias"), ({"lora_dropout": 1.5}, "lora_dropout"),
                          ({"init_lora_weights": "pissa"}, "init_lora_weights"), ({"task_type": "X"}, "task_type")]:
        with pytest.raises(AdapterError, match=match):
            LoraConfig(**kwargs)
    with pytest.raises(AdapterError, match="variant"):
        BottleneckConfig(variant="middle")


def test_duplicate_and_unknown_names(base_dir, tmp_path):
    model = get_peft_model(OPTForCausalLM.from_pretrained(base_dir), LoraConfig())
    with pytest.raises(AdapterError, match="already loaded"):
        model.add_adapter("default", LoraConfig())
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        model.set_adapter("x")
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        adapter_index(model.base_model, ["x"])


def test_fused_qkv_keeps_working_under_adapters(base_dir, tmp_path):
    """optlm.fast fuses q/k/v into one matmul; a LoRA on q/v adds its share to the fused output, in a batch of
    one adapter and in a mixed batch, with the same result as the three separate projections."""
    from optlm.fast import optimize

    a = _lora_dir(base_dir, tmp_path / "a", 20, r=4, target_modules=["q_proj", "v_proj", "k_proj"])
    b = _lora_dir(base_dir, tmp_path / "b", 21, r=2, target_modules=["v_proj"], lora_bias=True)
    plain, fused = OPTForCausalLM.from_pretrained(base_dir).eval(), optimize(OPTForCausalLM.from_pretrained(base_dir))
    attn = fused.model.decoder.layers[0].self_attn
    for model in (plain, fused):
        load_adapter(model, a, "a")
        load_adapter(model, b, "b")
        PeftModel(model).set_adapter("a")
    assert attn.fused_qkv is not None and attn.fused_qkv.matches(attn)
    rows = ["b", "a", None]
    with torch.no_grad():
        torch.testing.assert_close(fused(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)
        frames = []
        for _ in range(2):
            frame = Frame.causal(3, IDS.shape[1], IDS.device)
            frame.adapter = adapter_index(plain, rows)
            frames.append(frame)
        torch.testing.assert_close(fused.step(IDS, frames[0])[0], plain.step(IDS, frames[1])[0], atol=1e-5, rtol=1e-5)
        single = plain(IDS).logits
    assert (single - OPTForCausalLM.from_pretrained(base_dir)(IDS).logits).abs().max() > 1e-3


def test_command_line_specs():
    from optlm.adapters.spec import parse_spec

    lora = parse_spec("r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj,fc1,bias=lora_only,rslora=true")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, lora.use_rslora) == (8, 16, 0.05, "lora_only", True)
    assert lora.target_modules == ["q_proj", "v_proj", "fc1"]
    assert parse_spec("lora,targets=all-linear").target_modules == "all-linear"
    bn = parse_spec("bottleneck,reduction=8,variant=houlsby,act=gelu")
    assert (bn.variant, bn.reduction_factor, bn.non_linearity) == ("houlsby", 8, "gelu")
    for spec, match in [("r=8,rank=4", "unknown key 'rank'"), ("r=eight", "not a valid int"),
                        ("r=8,q_proj", "not key=value"), ("rslora=maybe", "not a valid bool"),
                        ("bottleneck,r=4", "unknown key 'r' for a bottleneck")]:
        with pytest.raises(AdapterError, match=match):
            parse_spec(spec)


def test_a_layer_without_the_newest_adapter_still_runs_its_rows(base_dir, tmp_path):
    """Adapters loaded after a layer built its stacks (with ids that layer has never seen) run as the base there."""
    model = OPTForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(model, _lora_dir(base_dir, tmp_path / "a", 30, r=2, target_modules=["q_proj"]), "a")
    frame = Frame.causal(2, IDS.shape[1], IDS.device)
    frame.adapter = adapter_index(model, ["a", None])
    with torch.no_grad():
        model.step(IDS[:2], frame)  # q_proj builds its stacks
        load_adapter(model, _lora_dir(base_dir, tmp_path / "b", 31, r=2, target_modules=["fc1"]), "b")
        frame = Frame.causal(2, IDS.shape[1], IDS.device)
        frame.adapter = adapter_index(model, ["b", "a"])
        got, _ = model.step(IDS[:2], frame)
        alone = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "b")
        torch.testing.assert_close(got[:1], alone(IDS[:1]).logits[:, -1], atol=1e-5, rtol=1e-5)
