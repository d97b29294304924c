"""Weight-only int8/int4 quantization: close to float on tiny random models, names kept, fast paths equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import optlm
from optlm.fast import optimize
from optlm.quantize import Int4Linear, Int8Embedding, Int8Linear, quantize_int4_groups, quantize_int8_rows

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
             max_position_embeddings=128, dropout=0.0)
# (mode, group size, logit KL bound, max |Δ logit| / max |logit| bound); measured ~2e-6 / 0.013 for int8 and
# ~2e-4 / 0.10 for int4 and ~3e-5 / 0.04 for int8-dynamic at these shapes, so the bounds leave 2-10x of room.
TOLERANCES = [("int8", 64, 3e-5, 0.03), ("int4", 32, 2e-3, 0.25), ("int8-dynamic", 64, 3e-4, 0.08)]


def _model(seed: int = 0, **overrides) -> optlm.OPTForCausalLM:
    torch.manual_seed(seed)
    return optlm.OPTForCausalLM(optlm.OPTConfig(**{**SMALL, **overrides})).eval()


def _kl(logits: torch.Tensor, ref: torch.Tensor) -> float:
    return F.kl_div(logits.float().log_softmax(-1), ref.float().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("layout", [{}, {"do_layer_norm_before": False, "word_embed_proj_dim": 32}],
                         ids=["pre_ln", "post_ln_proj"])
@pytest.mark.parametrize(("mode", "group_size", "max_kl", "max_rel"), TOLERANCES)
def test_quantized_close_to_float(layout, mode, group_size, max_kl, max_rel):
    ref, model = _model(**layout), _model(**layout)
    optlm.quantize(model, mode, group_size=group_size)
    ids = torch.randint(4, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert got.dtype == want.dtype == torch.float32
    assert _kl(got, want) <= max_kl
    assert (got - want).abs().max() <= max_rel * want.abs().max()


def test_modules_swapped_names_kept_and_head_shared():
    model = optlm.quantize(_model(), "int8")
    names = dict(model.named_modules())
    attn = names["model.decoder.layers.0.self_attn"]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(names[f"model.decoder.layers.0.self_attn.{proj}"], Int8Linear)
    assert isinstance(names["model.decoder.layers.1.fc1"], Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    # The tied embedding reads the head's int8 rows: one table, not two.
    emb = model.model.decoder.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.head[0] is model.lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert attn.fused_qkv is not None and attn.fused_qkv.matches(attn)
    fused = attn.fused_qkv
    optimize(model)  # fusing again keeps the existing fused layer
    assert attn.fused_qkv is fused
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_embedding_lookup_matches_float_table():
    ref = _model()
    table = ref.model.decoder.embed_tokens.weight.detach().clone()
    model = optlm.quantize(_model(), "int8")
    ids = torch.tensor([[1, 5, 200, 255]])
    got = model.model.decoder.embed_tokens(ids)
    assert (got - table[ids]).abs().max() <= table.abs().max() / 127  # half a step, doubled for margin
    assert torch.equal(got[0, 0], torch.zeros(64))  # the padding row stays exactly zero


def test_lm_head_can_stay_float():
    model = optlm.quantize(_model(), "int4", group_size=32, lm_head=False)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert isinstance(model.model.decoder.layers[0].fc2, Int4Linear)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic"])
def test_fused_equals_unfused_and_generation_runs(mode):
    model = optlm.quantize(_model(), mode, group_size=32)
    ids = torch.randint(4, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(ids).logits
        for layer in model.model.decoder.layers:
            layer.self_attn.fused_qkv = None
        unfused = model(ids).logits
    if mode == "int8-dynamic":  # the stand-in q/k/v keep the weight-only kernel (never called while fused)
        torch.testing.assert_close(fused, unfused, rtol=0, atol=0.05 * float(fused.abs().max()))
    else:
        assert torch.equal(fused, unfused)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 16)


def test_kept_modules_stay_float_and_the_save_loads_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = optlm.OPTForSequenceClassification(optlm.OPTConfig(**SMALL, num_labels=3, pad_token_id=1)).eval()
    optlm.quantize(model, "int8", keep=("score",))
    assert type(model.score) is torch.nn.Linear and isinstance(model.model.decoder.layers[0].fc1, Int8Linear)
    model.save_pretrained(tmp_path)
    loaded = optlm.OPTForSequenceClassification.from_pretrained(tmp_path)
    # float (from_pretrained routes float linears through optlm.fast.CPULinear, an nn.Linear)
    assert isinstance(loaded.score, torch.nn.Linear) and loaded.config.extra["quantization_config"]["keep"] == ["score"]
    ids = torch.randint(4, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_quantize_kwarg(tmp_path):
    _model().save_pretrained(tmp_path)
    loaded = optlm.OPTForCausalLM.from_pretrained(tmp_path, quantize="int8")
    by_hand = optlm.quantize(optlm.OPTForCausalLM.from_pretrained(tmp_path), "int8")
    ids = torch.randint(4, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, by_hand(ids).logits)
    assert isinstance(loaded.lm_head, Int8Linear)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["optlm_kernels", "torch_kernels"])
@pytest.mark.parametrize("mode", ["int8", "int4", "int8-dynamic"])
def test_quantized_save_loads_back_exactly_and_transformers_refuses_it(tmp_path, monkeypatch, mode, kernels_on):
    import transformers

    from optlm import kernels

    if kernels_on and not kernels.enabled():
        pytest.skip(f"optlm's kernels are not available here ({kernels.unavailable_reason()})")
    if not kernels_on:
        monkeypatch.setattr(kernels, "enabled", lambda: False)  # PyTorch's int4 packing and kernels
    _model().save_pretrained(tmp_path / "float")
    model = optlm.OPTForCausalLM.from_pretrained(tmp_path / "float", quantize=mode)
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model.save_pretrained(tmp_path / "q", max_shard_size="40KB")  # sharded, to cover the index too
    names = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "optlm-quantized.safetensors.index.json" in names and not any(n.startswith("model") for n in names)
    loaded = optlm.OPTForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    # Memory-mapped int8 weights are moved to aligned memory (PyTorch's AVX-512 int8 matmul crashes otherwise).
    assert all(m.weight.data_ptr() % 64 == 0 for m in loaded.modules() if isinstance(m, Int8Linear))
    assert loaded.config.extra["quantization_config"]["mode"] == mode
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.OPTForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        optlm.OPTForCausalLM.from_pretrained(tmp_path / "q", quantize="int8")
    if mode == "int4":  # the stored codes are the same whichever packing the saving machine used
        fc1 = model.model.decoder.layers[0].fc1
        w = _model().model.decoder.layers[0].fc1.weight.detach()
        assert isinstance(fc1, Int4Linear) and torch.equal(fc1.codes().long(), quantize_int4_groups(w, 64)[0].long())


def test_bfloat16_model_quantizes():
    model = optlm.quantize(_model().to(torch.bfloat16), "int8")
    with torch.no_grad():
        out = model(torch.randint(4, 256, (1, 8))).logits
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_quantizers_round_trip():
    w = torch.randn(48, 128)
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6
    q4, scales, mins = quantize_int4_groups(w, 32)
    assert int(q4.min()) >= 0 and int(q4.max()) <= 15
    deq = (q4.float().view(48, 4, 32) * scales[..., None] + mins[..., None]).view(48, 128)
    assert (deq - w).abs().max() <= scales.max() / 2 + 1e-6


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of int8, int4, int8-dynamic"):
        optlm.quantize(_model(), "int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        optlm.quantize(_model(), "int4", group_size=48)
    model = optlm.quantize(_model(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        optlm.quantize(model, "int4")
