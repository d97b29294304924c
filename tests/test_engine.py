"""The continuous-batching engine and the offline ``LLM`` API.

Invariants: a request's tokens do not depend on what else runs beside it, when it arrived, how its prompt was
chunked, whether it shared cached blocks or was preempted and recomputed — greedy outputs equal transformers'
``generate`` on each prompt alone, and a seeded sampled request draws the same tokens alone or in a crowd;
processing (penalties, bias, min-p / top-k / top-p) matches transformers' processors; log-probabilities are the
model's own; every cache block comes back once requests finish or are cancelled; a bad request is refused
with a ValueError naming the field, and the requests already running are unaffected.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers_generate import (  # noqa: F401 (one_thread: a fixture)
    FAMILIES,
    MLP_NAMES,
    one_thread,
    reference_pair,
    text_checkpoint,
)

import optlm
from optlm import LLM, LLMEngine, SamplingParams
from optlm.engine.sampler import Row, warp
from optlm.generate import ContextLengthError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96  # helpers_generate.TINY
CONTEXT = 384


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 1 … 300 tokens; a quarter share a 40-token system prefix (so cached blocks get shared)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, VOCAB) for _ in range(40)]
    lengths = [1, 2, 300, 17, 16, 33] + [rng.randrange(1, 301) for _ in range(n - 6)]
    out = []
    for i, length in enumerate(lengths):
        body = [rng.randrange(3, VOCAB) for _ in range(length)]
        out.append((system + body)[:max(length, 41)] if i % 4 == 3 else body)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """Every test on the pair runs once per model family."""
    return reference_pair(tmp_path_factory.mktemp("engine"), family=request.param, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def greedy_case(pair):
    """50 prompts, their max_tokens, and what transformers' greedy generate gives for each alone."""
    ref, _ = pair
    prompts = _prompts(50)
    rng = random.Random(1)
    max_tokens = [rng.randrange(1, 25) for _ in prompts]
    want = []
    with torch.no_grad():
        for p, m in zip(prompts, max_tokens, strict=True):
            out = ref.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False, pad_token_id=1, eos_token_id=2)
            want.append(out[0, len(p):].tolist())
    return prompts, max_tokens, want


def _engine(model, **kwargs) -> LLMEngine:
    return LLMEngine(model, None, **{"block_size": 8, **kwargs})


def _run(engine: LLMEngine, arrivals: dict[int, list]) -> dict[str, list[int]]:
    """Step ``engine`` by hand, adding ``arrivals[step]`` = [(request id, prompt, params)] before that step."""
    done, step = {}, 0
    while engine.has_unfinished_requests() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


@pytest.mark.parametrize("setup", [
    dict(max_num_seqs=64, max_num_batched_tokens=512),
    # a small step budget chunks long prompts; few rows make requests queue; a small cache forces preemption
    dict(max_num_seqs=12, max_num_batched_tokens=48, kv_cache_memory=400_000),
], ids=["roomy", "tight"])
def test_greedy_outputs_equal_transformers_on_each_prompt_alone(pair, greedy_case, setup):
    _, ours = pair
    prompts, max_tokens, want = greedy_case
    llm = LLM(ours, **{"block_size": 8, **setup})
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    got = [o.outputs[0].token_ids for o in outs]
    assert got == want
    for o, m in zip(outs, max_tokens, strict=True):
        c = o.outputs[0]
        assert o.finished and c.finish_reason == ("stop" if c.token_ids[-1] == 2 and len(c.token_ids) <= m
                                                   else "length")
    engine = llm.llm_engine
    assert engine.cache.blocks_in_use == 0 and not engine.cache.seqs
    assert engine.cache.prefix_hit_tokens > 0  # prompts with the common prefix shared its cached blocks
    if "kv_cache_memory" in setup:
        assert engine.scheduler.preemptions > 0  # the tight setup really exercised preemption


def test_requests_arriving_mid_decode_get_the_same_tokens(pair, greedy_case):
    _, ours = pair
    prompts, max_tokens, want = greedy_case
    engine = _engine(ours, max_num_seqs=16, max_num_batched_tokens=64)
    arrivals: dict[int, list] = {}
    rng = random.Random(2)
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        arrivals.setdefault(rng.choice([0, 1, 2, 5, 9, 14, 30]), []).append(
            (f"r{i}", p, SamplingParams(temperature=0, max_tokens=m)))
    done = _run(engine, arrivals)
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == want
    assert engine.cache.blocks_in_use == 0


def test_a_seeded_sample_is_the_same_alone_and_among_31_others(pair):
    _, ours = pair
    prompts = _prompts(32, seed=5)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, presence_penalty=0.3, seed=1234,
                            max_tokens=24)
    rng = random.Random(3)
    crowd = [SamplingParams(temperature=rng.choice([0, 0.5, 1.0, 1.5]), top_p=rng.choice([1.0, 0.8]),
                            top_k=rng.choice([0, 5]), repetition_penalty=rng.choice([1.0, 1.3]),
                            frequency_penalty=rng.choice([0.0, 0.5]), seed=rng.choice([None, 7, 99]),
                            max_tokens=rng.randrange(1, 30), n=rng.choice([1, 2])) for _ in range(31)]
    llm = LLM(ours, block_size=8, max_num_seqs=20, max_num_batched_tokens=96)
    alone = llm.generate([prompts[17]], target, use_tqdm=False)[0].outputs[0].token_ids
    params = crowd[:17] + [target] + crowd[17:]
    together = llm.generate(prompts, params, use_tqdm=False)[17].outputs[0].token_ids
    assert together == alone and len(alone) == 24
    # and the seed matters: another seed gives another completion
    other = SamplingParams(**{**_fields(target), "seed": 4321})
    assert llm.generate([prompts[17]], other, use_tqdm=False)[0].outputs[0].token_ids != alone


def _fields(p: SamplingParams) -> dict:
    return {k: v for k, v in vars(p).items() if k != "stops"}


def test_n_completions_share_the_prompt_and_each_is_its_own_seeded_request(pair):
    _, ours = pair
    prompt = _prompts(3, seed=8)[2]  # 300 tokens
    llm = LLM(ours, block_size=8, max_num_batched_tokens=512)
    params = SamplingParams(n=3, temperature=1.0, seed=10, max_tokens=12)
    outs = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert [c.index for c in outs] == [0, 1, 2]
    for i, c in enumerate(outs):
        single = llm.generate([prompt], SamplingParams(temperature=1.0, seed=10 + i, max_tokens=12), use_tqdm=False)
        assert c.token_ids == single[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in outs}) == 3


def test_logprobs_are_the_models_own_distribution(pair):
    ref, ours = pair
    prompts = _prompts(4, seed=11)
    llm = LLM(ours, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=5), use_tqdm=False)
    with torch.no_grad():
        for p, o in zip(prompts, outs, strict=True):
            c = o.outputs[0]
            ids = torch.tensor([p + c.token_ids])
            logp = torch.log_softmax(ref(ids).logits[0, len(p) - 1:-1].float(), -1)  # (new, V)
            assert len(c.logprobs) == len(c.token_ids)
            total = 0.0
            for t, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
                assert entry[tok].logprob == pytest.approx(float(logp[t, tok]), abs=1e-5)
                assert entry[tok].rank == int((logp[t] > logp[t, tok]).sum()) + 1
                top = torch.topk(logp[t], 5)
                for r, (value, idx) in enumerate(zip(top.values, top.indices, strict=True)):
                    assert entry[int(idx)].logprob == pytest.approx(float(value), abs=1e-5)
                    assert entry[int(idx)].rank == r + 1 or int(idx) == tok
                assert set(entry) == set(top.indices.tolist()) | {tok}
                total += entry[tok].logprob
            assert c.cumulative_logprob == pytest.approx(total)


def test_repetition_penalty_bias_and_min_tokens_match_transformers(pair, greedy_case):
    ref, ours = pair
    prompts = greedy_case[0][:12]
    llm = LLM(ours, block_size=8)
    bias = {2: 30.0, 50: 2.5}  # push EOS up, so min_tokens has something to hold back
    cases = [(dict(repetition_penalty=1.6), dict(repetition_penalty=1.6)),
             (dict(logit_bias=bias, min_tokens=6), dict(sequence_bias={(2,): 30.0, (50,): 2.5}, min_new_tokens=6))]
    for ours_kw, ref_kw in cases:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=15, **ours_kw), use_tqdm=False)
        with torch.no_grad():
            for p, o in zip(prompts, outs, strict=True):
                r = ref.generate(torch.tensor([p]), max_new_tokens=15, do_sample=False, pad_token_id=1,
                                 eos_token_id=2, **ref_kw)
                assert o.outputs[0].token_ids == r[0, len(p):].tolist(), ours_kw
    assert any(len(o.outputs[0].token_ids) == 7 for o in outs)  # six tokens, then EOS as soon as allowed


def test_presence_and_frequency_penalties_follow_openais_formula(pair, greedy_case):
    ref, ours = pair
    prompts = greedy_case[0][:6]
    llm = LLM(ours, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, presence_penalty=1.5,
                                                frequency_penalty=0.7), use_tqdm=False)
    with torch.no_grad():
        for p, o in zip(prompts, outs, strict=True):
            seq, new = list(p), []
            for _ in range(12):
                logits = ref(torch.tensor([seq])).logits[0, -1].float()
                counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=VOCAB).float()
                # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence (output tokens only)
                token = int((logits - counts * 0.7 - (counts > 0).float() * 1.5).argmax())
                seq.append(token)
                new.append(token)
                if token == 2:
                    break
            assert o.outputs[0].token_ids == new


def test_sampling_filters_match_transformers_warpers_row_by_row():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=g) * 3
    settings = [dict(temperature=0.7), dict(temperature=1.3, top_k=7), dict(top_p=0.6),
                dict(min_p=0.1, temperature=0.5), dict(top_k=3, top_p=0.9, min_p=0.05),
                dict(temperature=2.0, top_k=150)]
    rows = [Row(SamplingParams(**s), [], [], g, 2) for s in settings]
    got = warp(logits, rows)
    for r, s in enumerate(settings):
        want = logits[r:r + 1]
        want = TemperatureLogitsWarper(s.get("temperature", 1.0))(None, want)
        if s.get("min_p"):
            want = MinPLogitsWarper(s["min_p"])(None, want)
        if s.get("top_k"):
            want = TopKLogitsWarper(s["top_k"])(None, want)
        if s.get("top_p"):
            want = TopPLogitsWarper(s["top_p"])(None, want)
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want[0])), s
        finite = ~torch.isinf(want[0])
        assert torch.allclose(got[r][finite], want[0][finite]), s


def test_memory_returns_to_zero_after_1000_requests_with_cancellations(pair):
    _, ours = pair
    engine = _engine(ours, max_num_seqs=24, max_num_batched_tokens=64, kv_cache_memory=120_000)
    rng = random.Random(4)
    system = [rng.randrange(3, VOCAB) for _ in range(20)]
    submitted, aborted, finished, live = 0, set(), {}, set()
    while submitted < 1000 or engine.has_unfinished_requests():
        for _ in range(min(rng.randrange(0, 12), 1000 - submitted)):
            body = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))]
            prompt = system + body if rng.random() < 0.3 else body
            params = SamplingParams(temperature=rng.choice([0, 1.0]), max_tokens=rng.randrange(1, 12),
                                    n=rng.choice([1, 1, 2]), seed=rng.choice([None, 5]))
            engine.add_request(f"q{submitted}", prompt, params)
            live.add(f"q{submitted}")
            submitted += 1
        if live and rng.random() < 0.3:  # cancel a running or waiting request
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
            aborted.add(victim)
            live.discard(victim)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
                live.discard(out.request_id)
    assert engine.cache.blocks_in_use == 0 and not engine.cache.seqs
    assert all(r == 0 for r in engine.cache.pool.refs)
    assert not engine.requests and not live
    assert set(finished) | aborted == {f"q{i}" for i in range(1000)} and not set(finished) & aborted
    assert len(aborted) > 50 and engine.scheduler.preemptions > 0
    for out in finished.values():
        assert all(c.finish_reason in ("stop", "length") for c in out.outputs)


def test_a_request_that_cannot_fit_is_refused_and_the_batch_runs_on(pair, greedy_case):
    _, ours = pair
    prompts, max_tokens, want = greedy_case
    engine = _engine(ours)
    for i in range(5):
        engine.add_request(f"ok{i}", prompts[i], SamplingParams(temperature=0, max_tokens=max_tokens[i]))
    engine.step()
    with pytest.raises(ValueError, match=r"prompt has 300 tokens and max_tokens is 100.*context's 384"):
        engine.add_request("long", prompts[2], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match=r"prompt has 384 tokens.*context holds 384"):
        engine.add_request("longer", [5] * CONTEXT, SamplingParams(max_tokens=1))
    done = _run(engine, {})
    assert [done[f"ok{i}"].outputs[0].token_ids for i in range(5)] == want[:5]
    assert engine.cache.blocks_in_use == 0


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, r"max_tokens must be an integer >= 1"),
    ("n", 0, r"n must be an integer >= 1"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
    ("temperature", -0.1, r"temperature must be a number >= 0"),
    ("top_k", -2, r"top_k must be an integer >= 1, or 0 or -1"),
    ("min_p", 1.5, r"min_p must be a number in \[0, 1\]"),
    ("presence_penalty", 3.0, r"presence_penalty must be a number in \[-2, 2\]"),
    ("logprobs", 21, r"logprobs must be an integer in \[0, 20\]"),
    ("min_tokens", 50, r"min_tokens must be at most max_tokens \(16\)"),
    ("stop", [""], r"stop must be a non-empty string"),
    ("temperature", float("nan"), r"temperature must be a number"),
])
def test_bad_sampling_params_name_the_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_bad_prompts_are_value_errors_naming_the_prompt(pair):
    _, ours = pair
    llm = LLM(ours, block_size=8)
    for prompts, message in [([[]], "prompt 0: the prompt is empty"),
                             ([[5, 6], [5, VOCAB]], rf"prompt 1: prompt token id {VOCAB} is outside the vocabulary"),
                             ([[5, -1]], "prompt 0: prompt token id -1 is outside"),
                             (["text"], "prompt 0: text prompts need a tokenizer")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids names token 500, outside the vocabulary"):
        llm.generate([[5]], SamplingParams(stop_token_ids=[500]), use_tqdm=False)
    context = llm.llm_engine.max_model_len
    with pytest.raises(ContextLengthError, match=rf"prompt 1: the prompt has {context} tokens") as caught:
        llm.generate([[5], [5] * context], SamplingParams(max_tokens=2), use_tqdm=False)
    assert (caught.value.prompt_tokens, caught.value.limit) == (context, context)  # its fields kept
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[5]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert llm.llm_engine.cache.blocks_in_use == 0 and not llm.llm_engine.requests  # nothing left behind


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    return LLM(text_checkpoint(tmp_path_factory.mktemp("engine_text")), block_size=8)


def test_stop_strings_and_stop_tokens_end_a_completion_where_they_appear(text_llm):
    prompt = "The quick brown fox"
    full = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.text) > 20
    stop = full.text[10:14]
    cut = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=["@@never", stop]),
                            use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    kept = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                    include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]
    token = full.token_ids[7]
    by_id = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token]),
                              use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", token)
    tok = text_llm.get_tokenizer()
    assert text_llm.generate(prompt, use_tqdm=False)[0].prompt_token_ids == tok.encode(prompt)


def test_streamed_text_grows_and_never_shows_a_stop_string(text_llm):
    prompt = "Once upon a time"
    full = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    stop = full.text[12:16]
    engine = text_llm.llm_engine
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=40, stop=stop))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out.outputs[0].text)
    assert seen[-1] == full.text[:full.text.index(stop)]
    for a, b in zip(seen, seen[1:], strict=False):
        assert b.startswith(a)
    assert not any(stop in s for s in seen)


def test_llm_defaults_to_the_bundled_model_offline():
    llm = LLM()
    out = llm.generate(["It was a dark night", "The"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    lm = optlm.load()
    for o, p in zip(out, ["It was a dark night", "The"], strict=True):
        assert o.prompt == p
        assert o.outputs[0].text == lm.generate(p, temperature=0, max_new_tokens=8)[0]


def test_the_paged_attention_kernel_decodes_as_the_gathering_path(pair, greedy_case, monkeypatch):
    from optlm import kernels

    if not kernels.available():
        pytest.skip(f"optlm's kernels are unavailable here ({kernels.unavailable_reason()})")
    _, ours = pair
    model = copy.deepcopy(ours).float()  # the kernel reads float32 caches
    prompts, max_tokens, _ = greedy_case
    params = [SamplingParams(temperature=0, max_tokens=m, logprobs=1) for m in max_tokens[:20]]
    with_kernel = LLM(model, block_size=8).generate(prompts[:20], params, use_tqdm=False)
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    gathered = LLM(model, block_size=8).generate(prompts[:20], params, use_tqdm=False)
    for a, b in zip(with_kernel, gathered, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)


def test_prompt_logprobs_score_every_prompt_token_even_when_chunked_or_cached(pair):
    ref, ours = pair
    prompts = _prompts(6, seed=12)
    llm = LLM(ours, block_size=8, max_num_batched_tokens=40)  # long prompts are prefilled in chunks
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)  # their blocks are now cached
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)
    with torch.no_grad():
        for p, o in zip(prompts, outs, strict=True):
            logp = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), -1)  # (P, V)
            got = o.prompt_logprobs
            assert len(got) == len(p) and got[0] is None
            for pos in range(1, len(p)):
                entry, want = got[pos], logp[pos - 1]
                assert entry[p[pos]].logprob == pytest.approx(float(want[p[pos]]), abs=1e-5)
                assert entry[p[pos]].rank == int((want > want[p[pos]]).sum()) + 1
                assert set(entry) == set(torch.topk(want, 3).indices.tolist()) | {p[pos]}


# ---- adapters per request ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(pair, tmp_path_factory):
    """Three peft LoRAs with random B (saved by peft on the transformers model) and one optlm bottleneck."""
    import peft

    from optlm.peft import BottleneckConfig, get_peft_model

    ref, _ = pair
    root = tmp_path_factory.mktemp("adapters")
    specs = {"qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "wide": dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True),
             "head": dict(r=2, lora_alpha=4, target_modules=[MLP_NAMES[pair[1].config.model_type][0], "lm_head"])}
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(init_lora_weights=False, **spec))
        model.save_pretrained(root / name)
        dirs[name] = root / name
    torch.manual_seed(7)
    bn = get_peft_model(optlm.AutoModelForCausalLM.from_pretrained(pair[1].name_or_path),
                        BottleneckConfig(variant="houlsby", reduction_factor=4))
    with torch.no_grad():
        for n, p in bn.named_parameters():
            if ".up." in n:
                p.normal_(std=0.3)
    bn.save_pretrained(root / "bn")
    dirs["bn"] = root / "bn"
    return dirs


def _alone(pair, adapter_dir, prompt, max_tokens):
    """Greedy tokens of one prompt alone: peft on transformers for a LoRA, optlm's generate for a bottleneck."""
    import peft

    ref, _ = pair
    from optlm.peft import PeftModel

    with torch.no_grad():
        if adapter_dir is None:
            model, kw = ref, {"pad_token_id": 1, "eos_token_id": 2}
        elif adapter_dir.name == "bn":
            model, kw = PeftModel.from_pretrained(optlm.AutoModelForCausalLM.from_pretrained(pair[1].name_or_path),
                                                  adapter_dir), {}
        else:
            model = peft.PeftModel.from_pretrained(copy.deepcopy(ref), adapter_dir)
            kw = {"pad_token_id": 1, "eos_token_id": 2}
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


def test_a_batch_mixing_adapters_equals_each_prompt_alone_with_its_adapter(pair, adapters):
    from optlm import LoRARequest

    _, ours = pair
    names = [None, "qv", "wide", "head", "bn"]
    base_prompts = _prompts(8, seed=3)
    # The same prompts under every adapter: equal tokens, different keys/values (never shared across adapters).
    jobs = [(p, names[i % len(names)]) for i, p in enumerate(base_prompts)] + [(base_prompts[2], n) for n in names]
    llm = LLM(copy.deepcopy(ours), block_size=8, max_num_batched_tokens=64, enable_lora=True, max_loras=4)
    requests = [None if n is None else LoRARequest(n, names.index(n), str(adapters[n])) for _, n in jobs]
    outs = llm.generate([p for p, _ in jobs], SamplingParams(temperature=0, max_tokens=6),
                        lora_request=requests, use_tqdm=False)
    for (prompt, name), out in zip(jobs, outs, strict=True):
        want = _alone(pair, None if name is None else adapters[name], prompt, 6)
        assert out.outputs[0].token_ids == want, name
    # Distinct adapters changed the tokens of the shared prompt (so the equality above means something).
    shared = {n: o.outputs[0].token_ids for (p, n), o in zip(jobs, outs, strict=True) if p is base_prompts[2]}
    assert len({tuple(v) for v in shared.values()}) > 2
    engine = llm.llm_engine
    assert engine.cache.blocks_in_use == 0 and all(n == 0 for n in engine.adapters.users.values())


def test_prompt_logprobs_through_an_adapter_on_the_head(pair, adapters):
    import peft

    from optlm import LoRARequest

    ref, ours = pair
    prompt = _prompts(3, seed=4)[2][:40]
    llm = LLM(copy.deepcopy(ours), block_size=8, enable_lora=True)
    out = llm.generate([prompt, prompt], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       lora_request=[LoRARequest("head", 1, str(adapters["head"])), None], use_tqdm=False)
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(copy.deepcopy(ref), adapters["head"])
        for model, o in ((adapted, out[0]), (ref, out[1])):
            logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
            for pos in range(1, len(prompt)):
                assert o.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(
                    float(logp[pos - 1, prompt[pos]]), abs=1e-5)


def test_adapter_requests_are_checked_and_slots_are_reused(pair, adapters, tmp_path):
    from optlm import LoRARequest
    from optlm.adapters import AdapterError

    _, ours = pair
    prompt = [5, 6, 7, 8]
    plain = _engine(copy.deepcopy(ours))
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.add_request("a", prompt, SamplingParams(max_tokens=2), LoRARequest("qv", 1, str(adapters["qv"])))
    engine = _engine(copy.deepcopy(ours), enable_lora=True, max_loras=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.add_request("x", prompt, SamplingParams(max_tokens=2), LoRARequest("e", 9, str(tmp_path / "empty")))
    engine.add_request("a", prompt, SamplingParams(max_tokens=3), LoRARequest("qv", 1, str(adapters["qv"])))
    with pytest.raises(AdapterError, match="adapter slots are in use"):  # one slot, held by request a
        engine.add_request("b", prompt, SamplingParams(max_tokens=3), LoRARequest("wide", 2, str(adapters["wide"])))
    with pytest.raises(AdapterError, match="already loaded"):
        engine.add_request("c", prompt, SamplingParams(max_tokens=3), LoRARequest("qv", 5, str(adapters["wide"])))
    done = _run(engine, {})
    assert list(done) == ["a"] and engine.list_loras() == ["qv"]
    # Request a finished: its adapter is evicted for the next one.
    engine.add_request("b", prompt, SamplingParams(max_tokens=3), LoRARequest("wide", 2, str(adapters["wide"])))
    assert engine.list_loras() == ["wide"]
    assert _run(engine, {})["b"].finished
    assert engine.cache.blocks_in_use == 0 and engine.adapters.users == {"wide": 0}


def test_local_attention_layers_hold_only_their_window_of_cache_blocks(tmp_path):
    """GPT-Neo's local layers give back each block their 16-token window has passed: a 300-token prompt run in
    64-token steps, then decoded, keeps at most the window plus one step of them, while the global layers keep
    every token — and the tokens are still transformers'."""
    ref, ours = reference_pair(tmp_path, family="gpt_neo", max_position_embeddings=CONTEXT)
    prompt = _prompts(3)[2]  # 300 tokens
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=1,
                            eos_token_id=2)[0, len(prompt):].tolist()
    engine = _engine(ours, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=40))
    most_local, most_global, out = 0, 0, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        most_local = max(most_local, engine.cache.local_blocks_in_use)
        most_global = max(most_global, engine.cache.blocks_in_use)
    assert out.outputs[0].token_ids == want
    assert most_local <= -(-(16 - 1 + 64) // 8) + 1 == 11  # the window behind a 64-token step, and the step
    assert most_global == -(-(300 + len(want) - 1) // 8)  # every token but the last sampled (never run)
    assert engine.cache.local_blocks_in_use == engine.cache.blocks_in_use == 0
