"""The one-call decode step (optlm.decode_step) changes speed, never results.

Invariants: where it runs, each step's logits and hidden states equal the PyTorch path's (float32 to 1e-5, the
quantized layers to their own kernels' rounding) for every OPT layout, with left padding, over the contiguous
cache and the engine's paged one, and float32 greedy tokens equal transformers'; it answers None — so the
PyTorch path runs — for whatever it does not cover (gradients, hooks, adapters, other dtypes), and a model
changed after loading (new weights in place, a cast, a replaced module) is never run with stale weights; it is
on by default and ``fast=False`` / ``OPTLM_FAST=0`` turn it off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CONFIGS, left_padded_batch
from helpers_generate import need_tokenizer

import optlm
from optlm import huge_pages, kernels
from optlm.fast import optimize
from optlm.generate import new_cache, prefill

pytestmark = pytest.mark.skipif(not kernels.available(), reason="optlm's C kernels cannot be built here")

# hidden 64 and ffn 128: multiples of int4's group size; 4 heads of 16
SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
             max_position_embeddings=128, dropout=0.0, init_std=0.1)


def _model(layout: str = "pre_ln", quantize: str | None = None, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> optlm.OPTForCausalLM:
    torch.manual_seed(seed)
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**{**SMALL, **CONFIGS[layout]})).eval().to(dtype)
    if quantize is not None:
        optlm.quantize(model, quantize)
    return optimize(model)


class Spy:
    """Stands in for a model's decode step and records whether each call ran it (not None) or stepped aside."""

    def __init__(self, model):
        self.step, self.ran = model.decode_step, []
        model.decode_step = self

    def __call__(self, ids, frame):
        out = self.step(ids, frame)
        self.ran.append(out is not None)
        return out


def _steps(model, ids, mask, n: int = 6, feed: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Logits and hidden states of ``n`` decode steps after the prompt, through a KVCache: greedy, or feeding the
    tokens ``feed`` (the first of them after the prompt)."""
    cache, out = new_cache(model, ids.shape[0], ids.shape[1] + n), []
    with torch.no_grad():
        logits, _ = prefill(model, ids, mask, cache)
        for i in range(n):
            frame = cache.frame(1)
            tokens = logits.argmax(-1) if feed is None else feed[i]
            logits, hidden = model.step(tokens[:, None], frame)
            cache.commit(frame)
            out.append((logits.float(), hidden.float()))
    return out


@pytest.mark.parametrize("quantize, tol", [(None, 1e-5), ("int8", 2e-3), ("int4", 2e-3)])
@pytest.mark.parametrize("layout", sorted(CONFIGS))
def test_each_step_equals_the_pytorch_path(layout, quantize, tol):
    model = _model(layout, quantize)
    assert model.decode_step is not None
    plan = model.decode_step.plan.model
    assert all(plan.layer[i].qkv.n == 3 * plan.hidden for i in range(plan.layers))  # q/k/v in one call
    ids, mask = left_padded_batch(vocab=256, lengths=(11, 4, 8))
    spy = Spy(model)
    fast = _steps(model, ids, mask)
    assert spy.ran and all(spy.ran)
    model.decode_step = None
    plain = _steps(model, ids, mask)
    for (fl, fh), (pl, ph) in zip(fast, plain, strict=True):
        scale = pl.abs().max()
        assert (fl - pl).abs().max() <= tol * scale
        assert (fh - ph).abs().max() <= tol * ph.abs().max()


def test_a_bfloat16_model_keeps_float32_between_its_matmuls():
    ids, mask = left_padded_batch(vocab=256, lengths=(11, 4, 8))
    exact = _model()
    exact.decode_step = None
    feed = [torch.randint(4, 256, (3,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    want = _steps(exact, ids, mask, feed=feed)
    model = _model(dtype=torch.bfloat16)
    spy = Spy(model)
    fast = _steps(model, ids, mask, feed=feed)
    assert spy.ran and all(spy.ran)
    model.decode_step = None
    plain = _steps(model, ids, mask, feed=feed)
    for (fl, _), (pl, _), (wl, _) in zip(fast, plain, want, strict=True):
        # both near float32; the step, which rounds only the weights, at least as near as the bfloat16 path
        assert (fl - wl).abs().max() <= (pl - wl).abs().max() <= 0.05 * wl.abs().max()


def test_float32_greedy_tokens_equal_transformers(tmp_path):
    import transformers

    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(transformers.OPTConfig(**SMALL)).eval()
    ref.save_pretrained(tmp_path)
    model = optlm.OPTForCausalLM.from_pretrained(tmp_path)  # the speed-ups are on by default
    assert model.decode_step is not None
    spy = Spy(model)
    ids, mask = left_padded_batch(vocab=256, lengths=(12, 5, 9))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=1,
                            eos_token_id=None)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert len(spy.ran) == 23 and all(spy.ran)
    assert torch.equal(got, want)


def test_the_engine_decodes_through_the_step_over_its_paged_cache():
    from optlm import LLM, SamplingParams

    model = _model()
    spy = Spy(model)
    prompts = [[5 + (i * 7 + j) % 200 for j in range(3 + 9 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    fast = LLM(model, block_size=8).generate(prompts, params, use_tqdm=False)
    assert spy.ran and all(spy.ran)
    model.decode_step = None
    plain = LLM(model, block_size=8).generate(prompts, params, use_tqdm=False)
    for a, b in zip(fast, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)


def test_a_changed_model_is_never_run_with_stale_weights():
    model, other = _model(seed=0), _model(seed=1)
    ids, mask = left_padded_batch(vocab=256, lengths=(7, 5))

    def plain_steps(m):
        m = copy.deepcopy(m)
        m.decode_step = None
        return _steps(m, ids, mask, 3)

    # New weights copied in place (load_state_dict): the step reads them.
    model.load_state_dict(other.state_dict())
    spy = Spy(model)
    for (a, _), (b, _) in zip(_steps(model, ids, mask, 3), plain_steps(other), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(spy.ran)
    # A replaced module: the step rebuilds its description around the new one.
    model.model.decoder.layers[1].fc2 = optimize(torch.nn.Sequential(other.model.decoder.layers[0].fc2))[0]
    want = plain_steps(model)
    spy.ran.clear()
    for (a, _), (b, _) in zip(_steps(model, ids, mask, 3), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(spy.ran)
    # A cast to another dtype: the PyTorch path runs.
    model.double()
    spy.ran.clear()
    _steps(model, ids, mask, 2)
    assert spy.ran and not any(spy.ran)


def test_it_steps_aside_for_what_it_does_not_cover():
    model = _model()
    spy = Spy(model)
    ids, mask = left_padded_batch(vocab=256, lengths=(7, 5))
    with torch.enable_grad():  # gradients on: the PyTorch path
        cache = new_cache(model, 2, 12)
        prefill(model, ids, mask, cache)
        model.step(ids[:, :1], cache.frame(1))
    assert spy.ran == [False]
    # A forward hook (as bottleneck adapters and layer offloading use) must run: the PyTorch path.
    seen = []
    handle = model.model.decoder.layers[0].fc1.register_forward_hook(lambda *a: seen.append(1))
    _steps(model, ids, mask, 2)
    assert seen and spy.ran[-2:] == [False, False]
    handle.remove()
    _steps(model, ids, mask, 2)
    assert spy.ran[-2:] == [True, True]
    # A LoRA wraps the projections: the step stands aside for good, and the outputs include the adapter.
    from optlm.adapters import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "fc1"], init_lora_weights=False))
    base = copy.deepcopy(peft).merge_and_unload()
    base.decode_step = None
    for (a, _), (b, _) in zip(_steps(peft.get_base_model(), ids, mask, 2), _steps(base, ids, mask, 2),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert model.decode_step is None


def test_models_it_cannot_run_say_why():
    from optlm.decode_step import install

    model = _model(quantize="int8")
    for layer in model.modules():
        if hasattr(layer, "use_dynamic_activations"):
            layer.use_dynamic_activations()
    assert "Int8Linear" in install(model)
    neo = optlm.GPTNeoForCausalLM(optlm.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                                     attention_types=[[["global", "local"], 1]], window_size=8))
    assert "does not describe its parts" in install(neo)
    assert neo.decode_step is None


def test_fast_false_and_the_environment_switch_turn_it_off(tmp_path, monkeypatch):
    _model().save_pretrained(tmp_path)
    assert optlm.OPTForCausalLM.from_pretrained(tmp_path).decode_step is not None
    off = optlm.OPTForCausalLM.from_pretrained(tmp_path, fast=False)
    assert off.decode_step is None and type(off.lm_head) is torch.nn.Linear
    monkeypatch.setenv("OPTLM_FAST", "0")
    assert optlm.OPTForCausalLM.from_pretrained(tmp_path).decode_step is None
    assert optlm.load(tmp_path, tokenizer=need_tokenizer()).model.decode_step is None
    assert optlm.OPTForCausalLM.from_pretrained(tmp_path, fast=True).decode_step is not None


def test_its_profile_accounts_for_every_part():
    model = _model()
    model.decode_step.timing = torch.zeros(len(model.decode_step.PARTS), dtype=torch.float64)
    ids, mask = left_padded_batch(vocab=256, lengths=(7, 5))
    _steps(model, ids, mask, 3)
    assert bool((model.decode_step.timing > 0).all())


@pytest.mark.skipif(not huge_pages.available(), reason="this system gives no transparent huge pages")
def test_weights_move_into_huge_pages_unchanged_and_still_shared():
    def build():  # 7 MB of weights
        torch.manual_seed(0)
        config = optlm.OPTConfig(**{**SMALL, "hidden_size": 256, "ffn_dim": 1024, "vocab_size": 1024})
        return optlm.OPTForCausalLM(config).eval()

    model = optimize(build())  # fused q/k/v, then the weights placed in huge pages
    attn = model.model.decoder.layers[0].self_attn
    fused = attn.fused_qkv.linear.weight
    params = dict(model.named_parameters())
    assert fused.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    assert len(storages) == 1  # one region
    # Same values as a model built alike; views still views: an in-place edit reaches both.
    with torch.no_grad():
        for name, p in build().named_parameters():
            assert torch.equal(params[name], p)
        attn.q_proj.weight.mul_(2)
    assert torch.equal(fused[:256], attn.q_proj.weight)
    # The fusion survives the move (prompts still take one q/k/v matmul), and a moved-away projection ends it.
    assert all(layer.self_attn.fused_qkv.matches(layer.self_attn) for layer in model.model.decoder.layers)
    calls = []
    hook = attn.fused_qkv.linear.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randint(4, 1024, (1, 5)))
    hook.remove()
    assert calls == [1]
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    assert not attn.fused_qkv.matches(attn)
    # A model under 2 MiB is left where it is; the place() call reports the bytes it moved.
    assert huge_pages.place(torch.nn.Linear(8, 8)) == 0
    big = torch.nn.Linear(1024, 1024)
    before = big.weight.detach().clone()
    weight = big.weight
    assert huge_pages.place(big) >= 4 * 1024 * 1024
    assert big.weight is weight and torch.equal(big.weight, before) and big.weight.requires_grad
    # zeros(): a zeroed tensor of the asked shape and dtype (a key/value cache's buffers), huge pages or not.
    z = huge_pages.zeros((3, 1 << 20), torch.bfloat16)
    assert z.shape == (3, 1 << 20) and z.dtype == torch.bfloat16 and not bool(z.any())
    z += 1
    assert int(z.sum()) == 3 << 20
    # A cache's region is handed out again once no tensor uses it, zeroed; never while a view of it lives on.
    at, view = z.data_ptr(), z[1]
    del z
    other = huge_pages.zeros((3, 1 << 20), torch.bfloat16)
    assert other.data_ptr() != at
    del view
    again = huge_pages.zeros((3, 1 << 20), torch.bfloat16)
    assert again.data_ptr() == at and not bool(again.any())
    # Each allocation lets go of all but KEEP_FREE unused regions, however many caches were alive before.
    alive = [huge_pages.zeros((1 << 20,), torch.float32) for _ in range(5)]
    del other, again, alive
    kept = huge_pages.zeros((3, 1 << 20), torch.bfloat16)
    assert sum(not huge_pages._in_use(e) for e in huge_pages._pool) <= huge_pages.KEEP_FREE
    assert huge_pages._in_use(huge_pages._pool[-1]) and kept.data_ptr()
