"""The fast paths (fused QKV, decode-step shortcuts, compile, threads) change speed, never results.

The first test pins the core to transformers exactly; it guards every speed edit to model.py / kv_cache.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY, left_padded_batch

import optlm

# Tiny shapes that reach every branch: pre-LN, and post-LN with the 350m-style embedding projection.
LAYOUTS = {"pre_ln": {}, "post_ln_proj": {"do_layer_norm_before": False, "word_embed_proj_dim": 16}}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def hf_checkpoint(request, tmp_path_factory):
    """A random float64 transformers OPTForCausalLM saved in the Hugging Face format."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(**{**TINY, **LAYOUTS[request.param]})
    ref = transformers.OPTForCausalLM(cfg).double().eval()
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory)
    return ref, directory


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_core_matches_transformers_exactly(hf_checkpoint, impl):
    ref, directory = hf_checkpoint
    # transformers' eager path turns fully padded query rows into NaN in float64 and the NaN leaks into
    # real rows through 0 * NaN in weights @ v; its SDPA path is the reference for both of ours.
    ref.set_attn_implementation("sdpa")
    model = optlm.OPTForCausalLM.from_pretrained(directory, attn_implementation=impl)
    assert model.dtype == torch.float64
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
        valid = mask.bool()
        assert (got[valid] - want[valid]).abs().max() <= 1e-10

        # Token-by-token through the cache equals the full forward.
        out = model(ids[:, :1], attention_mask=mask[:, :1], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        stepped = torch.cat(steps, dim=1)
        assert (stepped[valid] - got[valid]).abs().max() <= 1e-10


# ---- fast paths equal the plain path ----------------------------------------------------------------------

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
             max_position_embeddings=128, dropout=0.0)


def _model(seed: int = 0, **overrides) -> optlm.OPTForCausalLM:
    torch.manual_seed(seed)
    return optlm.OPTForCausalLM(optlm.OPTConfig(**{**SMALL, **overrides})).eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_qkv_same_logits_and_greedy_tokens(layout):
    from optlm.fast import optimize

    plain = _model(**LAYOUTS[layout])
    fast = _model(**LAYOUTS[layout])
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    optimize(fast)
    assert all(layer.self_attn.fused_qkv is not None for layer in fast.model.decoder.layers)
    from optlm.fast import CPULinear

    assert isinstance(fast.lm_head, CPULinear) and isinstance(fast.model.decoder.layers[0].fc1, CPULinear)
    # Same names, same values: q/k/v_proj weights are views of the fused matrix.
    after = fast.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    ids, mask = left_padded_batch(lengths=(12, 7, 10), vocab=256)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    want = plain.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want)


def test_fused_qkv_steps_aside_when_projections_change():
    from optlm.fast import fuse_qkv

    model = fuse_qkv(_model())
    attn = model.model.decoder.layers[0].self_attn
    ids = torch.randint(4, 256, (1, 9))
    # Training keeps three matmuls, so gradients reach q/k/v_proj.
    model.train()
    model(ids, labels=ids).loss.backward()
    assert attn.q_proj.weight.grad is not None and attn.v_proj.weight.grad is not None
    model.eval()
    # Replacing a projection (as an adapter would) turns the fused path off instead of ignoring the new module.
    attn.q_proj = torch.nn.Linear(64, 64)
    assert not attn.fused_qkv.matches(attn)
    with torch.no_grad():
        model(ids)  # runs the three-matmul path
    # A dtype cast makes new tensors: the fused weight no longer matches and is not used.
    model.double()
    assert not attn.fused_qkv.matches(attn)


def test_bfloat16_runs_and_tracks_float32(tmp_path):
    plain = _model()
    plain.save_pretrained(tmp_path)
    bf16 = optlm.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    from optlm.fast import optimize

    optimize(bf16)
    ids = torch.randint(4, 256, (2, 16))
    with torch.no_grad():
        want = plain(ids).logits
        got = bf16(ids).logits.float()
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    from optlm.fast import CPULinear

    # The CPU linears route by row count (kernel for few rows, fp32 upcast or native GEMM for many); the
    # module tree keeps its names.
    assert isinstance(bf16.model.decoder.layers[0].fc1, CPULinear)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    out = bf16.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 24)


def test_set_threads():
    from optlm.fast import physical_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= physical_cores() <= (os.cpu_count() or 1)
        with pytest.raises(ValueError, match="at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_benchmark_tables_and_engine_list():
    from optlm.benchmark import Result, engine_names, ratio_table, single_table

    names = engine_names(["fp32", "int8"], {"transformers": True, "ctranslate2": False})
    assert names == ["optlm fp32", "optlm int8", "transformers fp32"]
    assert engine_names(["fp32"], {"transformers": False, "ctranslate2": True}) == ["optlm fp32"]
    results = {n: Result(n, ttft=[0.1, 0.3, 0.2], decode=[d, d, d], prefill=[500.0] * 3)
               for n, d in zip(names, (30.0, 60.0, 20.0), strict=True)}
    table = single_table(results)
    assert "| optlm int8 | 60.0 | 500 | 200 | – |" in table
    assert "| optlm fp32 | 1.50x |" in ratio_table(results) and "| optlm int8 | 3.00x |" in ratio_table(results)


def test_half_attention_in_fp32_caches_exact_values_and_tracks_plain_bf16():
    from optlm.fast import upcast_half_attention
    from optlm.generate import new_cache

    plain = _model().to(torch.bfloat16)
    fast = _model().to(torch.bfloat16)
    upcast_half_attention(fast)
    for layer in fast.model.decoder.layers:  # on CPUs with native bf16 matmul the above leaves it off
        layer.self_attn.upcast_attention = True
    assert new_cache(fast, 2, 8).k.dtype == torch.float32 and new_cache(plain, 2, 8).k.dtype == torch.bfloat16
    ids, mask = left_padded_batch(lengths=(12, 7), vocab=256)
    with torch.no_grad():
        got, want = fast(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
        assert got.dtype == torch.bfloat16
        real = mask.bool()
        assert (got.float() - want.float())[real].abs().max() <= 0.05 * want.float()[real].abs().max()
        # Cached decoding (fp32 cache) equals recomputing the whole sequence at every step.
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        seq, m = ids, mask
        for _ in range(8):
            nxt = fast(seq, attention_mask=m).logits[:, -1].float().argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_a_benchmark_engine_in_its_own_process_answers_as_in_this_one(tmp_path):
    from optlm.benchmark import Isolated, load_engine

    model = _model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(4, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    there = Isolated("optlm fp32", tmp_path, 1)
    try:
        seconds, out = there.timed(ids, 5)
        assert seconds > 0 and out == load_engine("optlm fp32", tmp_path, 1)(ids, 5)
        # what a decode step reads: every weight once (the head is the embedding), one row of the positions
        positions = model.model.decoder.embed_positions.weight
        assert there.bytes_per_token(100) == (sum(p.nbytes for p in model.parameters()) - positions.nbytes,
                                             2 * 2 * 100 * 64 * 4)  # k and v, 2 layers, 100 tokens, 64 wide
    finally:
        there.close()
    assert not there.proc.is_alive()
    with pytest.raises(RuntimeError, match="optlm fp32: .*missing"):
        Isolated("optlm fp32", tmp_path / "missing", 1)
