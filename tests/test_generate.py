"""Generation against transformers' ``generate`` on the same random float64 weights, plus what the reference
cannot check: contrastive search against a cache-free recomputation, one prefill then one token per step,
seeds, validation errors, stop strings and streaming text.
"""

from __future__ import annotations

import pytest
import torch
from helpers_generate import (
    ScriptedLM,
    left_padded,
    need_tokenizer,
    one_thread,  # noqa: F401 (a fixture, used through pytestmark)
    reference_pair,
    text_checkpoint,
)

import optlm
from optlm import generate as gen

pytestmark = pytest.mark.usefixtures("one_thread")

P = 7  # prompt width of left_padded()
MAX_NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return reference_pair(tmp_path_factory.mktemp("pre_ln"))


@pytest.fixture(scope="module")
def post_ln_pair(tmp_path_factory):
    return reference_pair(tmp_path_factory.mktemp("post_ln"), seed=1, do_layer_norm_before=False,
                          word_embed_proj_dim=16)


@pytest.fixture(scope="module")
def eos_ids(pair):
    """Eos ids that fire mid-generation: a token greedy produces part-way through row 1, and a list with one
    mid-way token of every row (so every row stops early and the output is shorter than MAX_NEW)."""
    _, ours = pair
    ids, mask = left_padded()
    greedy = ours.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[])[:, P:]
    one = int(greedy[1, 3])
    assert one not in greedy[1, :3].tolist(), "pick a token that first appears mid-way"
    every = sorted({int(greedy[0, 6]), int(greedy[1, 3]), int(greedy[2, 8])})
    return one, every


CASES = {
    "greedy": {},
    "repetition_penalty": {"repetition_penalty": 1.5},
    "repetition_reward": {"repetition_penalty": 0.7},
    "no_repeat_bigram": {"no_repeat_ngram_size": 2},
    "no_repeat_unigram": {"no_repeat_ngram_size": 1},
    "min_new_tokens": {"min_new_tokens": 6},
    "beam": {"num_beams": 3},
    "beam_return_3": {"num_beams": 4, "num_return_sequences": 3},
    "beam_early_stop_lp2": {"num_beams": 3, "early_stopping": True, "length_penalty": 2.0},
    "beam_never_negative_lp": {"num_beams": 3, "early_stopping": "never", "length_penalty": -1.0},
    "beam_processors": {"num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2, "min_new_tokens": 3},
}


@pytest.mark.parametrize("eos_kind", ["one_row", "every_row"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic_decoding_matches_transformers(pair, eos_ids, case, eos_kind):
    ref, ours = pair
    ids, mask = left_padded()
    eos = eos_ids[0] if eos_kind == "one_row" else eos_ids[1]
    kw = {**CASES[case], "eos_token_id": eos, "max_new_tokens": MAX_NEW}
    expected = ref.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = ours.generate(ids, mask, **kw)
    assert got.dtype == torch.long
    assert torch.equal(got, expected), f"{case}:\n{expected[:, P:]}\n{got[:, P:]}"


def test_eos_really_fires_mid_batch_and_rows_are_padded(pair, eos_ids):
    _, ours = pair
    ids, mask = left_padded()
    one, every = eos_ids
    out = ours.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=one)
    assert out.shape == (3, P + MAX_NEW)  # the other rows keep going
    new = out[1, P:].tolist()
    stop = new.index(one)
    assert 0 < stop < MAX_NEW - 1 and set(new[stop + 1:]) == {ours.config.pad_token_id}
    out = ours.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=every)
    assert out.shape[1] < P + MAX_NEW  # every row finished: the output ends with the last one to finish


@pytest.mark.parametrize("case", ["greedy", "beam_return_3", "beam_processors"])
def test_post_ln_projected_model_matches_transformers(post_ln_pair, case):
    ref, ours = post_ln_pair
    ids, mask = left_padded(seed=3)
    kw = {**CASES[case], "max_new_tokens": 10}
    assert torch.equal(ours.generate(ids, mask, **kw), ref.generate(ids, attention_mask=mask, do_sample=False, **kw))


SAMPLE_CASES = {
    "plain": {"do_sample": True},
    "warped": {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.8},
    "return_3_penalty": {"do_sample": True, "num_return_sequences": 3, "top_p": 0.9, "repetition_penalty": 1.3},
    "beam_sample": {"do_sample": True, "num_beams": 3, "num_return_sequences": 2, "temperature": 1.5, "top_k": 5},
}


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sampling_draws_the_same_tokens_as_transformers_from_the_same_seed(pair, eos_ids, case):
    """Same processed distribution and the same torch.multinomial calls: identical draws from one global seed."""
    ref, ours = pair
    ids, mask = left_padded()
    kw = {**SAMPLE_CASES[case], "eos_token_id": eos_ids[1], "max_new_tokens": MAX_NEW}
    torch.manual_seed(1234)
    expected = ref.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(1234)
    assert torch.equal(ours.generate(ids, mask, **kw), expected)


@pytest.mark.parametrize("seed", range(6))
def test_random_settings_match_transformers(pair, seed):
    """Random prompts, lengths and decoding settings (a wider net than the named cases above)."""
    import random

    ref, ours = pair
    rng = random.Random(seed)
    ids, mask = left_padded(tuple(rng.randint(1, 8) for _ in range(rng.randint(1, 4))), seed=seed + 10)
    kw = {"max_new_tokens": rng.randint(1, 12)}
    pool = ours.generate(ids, mask, eos_token_id=[], **kw)[:, ids.shape[1]:].flatten().tolist()
    kw["eos_token_id"] = sorted(set(rng.sample(pool, min(2, len(pool)))))
    if seed % 2:
        kw.update(num_beams=rng.randint(2, 4), length_penalty=rng.choice([0.0, 1.0, 2.0]),
                  early_stopping=rng.choice([False, True, "never"]))
        kw["num_return_sequences"] = rng.randint(1, kw["num_beams"])
    if seed % 3 == 0:
        kw.update(do_sample=True, temperature=rng.choice([0.6, 1.4]), top_k=rng.choice([0, 8]), top_p=0.9)
    kw.update(repetition_penalty=rng.choice([1.0, 1.4]), no_repeat_ngram_size=rng.choice([0, 2]),
              min_new_tokens=rng.randint(0, kw["max_new_tokens"]))
    torch.manual_seed(seed)
    expected = ref.generate(ids, attention_mask=mask, **{"do_sample": False, **kw})
    torch.manual_seed(seed)
    assert torch.equal(ours.generate(ids, mask, **kw), expected), kw


def test_unpadded_single_prompt_and_1d_input(pair):
    ref, ours = pair
    ids = torch.tensor([2, 40, 17, 33, 9])
    expected = ref.generate(ids[None], max_new_tokens=8, do_sample=False, num_beams=2)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, num_beams=2), expected)
    # transformers' max_length counts the prompt
    assert torch.equal(ours.generate(ids.tolist(), max_length=13, num_beams=2), expected)


# ---- beyond the reference ----------------------------------------------------------------------------------

@torch.no_grad()
def contrastive_reference(model, ids, mask, k, alpha, steps, eos, pad):
    """Contrastive search (Su et al. 2022) the slow, obvious way: no cache, every candidate re-runs the whole
    sequence; the penalty is the candidate's largest cosine similarity to the earlier real tokens' states."""
    seqs, mask = ids.clone(), mask.clone()
    done = [False] * len(ids)
    for _ in range(steps):
        probs = torch.softmax(model(seqs, attention_mask=mask, use_cache=False).logits[:, -1].float(), -1)
        top_p, top_ids = torch.topk(probs, k)
        nxt = []
        for b in range(len(seqs)):
            scores = []
            for j in range(k):
                cand = torch.cat([seqs[b], top_ids[b, j:j + 1]])[None]
                cmask = torch.cat([mask[b], mask.new_ones(1)])[None]
                h = model(cand, attention_mask=cmask, use_cache=False).last_hidden_state[0]  # (L + 1, d)
                ctx = h[:-1][mask[b].bool()]
                penalty = torch.cosine_similarity(h[-1:], ctx, dim=-1).max()
                scores.append((1 - alpha) * top_p[b, j] - alpha * penalty)
            tok = int(top_ids[b, int(torch.stack(scores).argmax())])
            nxt.append(pad if done[b] else tok)
            done[b] = done[b] or tok == eos
        seqs = torch.cat([seqs, torch.tensor(nxt)[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], 1)
        if all(done):
            break
    return seqs


@pytest.mark.parametrize("k,alpha", [(4, 0.6), (3, 0.3)])
def test_contrastive_search_matches_cache_free_reference(pair, eos_ids, k, alpha):
    _, ours = pair
    ids, mask = left_padded(seed=5)
    eos = eos_ids[0]
    got = ours.generate(ids, mask, max_new_tokens=8, penalty_alpha=alpha, top_k=k, eos_token_id=eos)
    expected = contrastive_reference(ours, ids, mask, k, alpha, 8, eos, ours.config.pad_token_id)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ours.generate(ids, mask, max_new_tokens=8, eos_token_id=eos))  # not just greedy


def _count_decoder_calls(model):
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    return calls, hook


@pytest.mark.parametrize("kw,rows", [({}, 3), ({"do_sample": True, "num_return_sequences": 2}, 6),
                                     ({"num_beams": 3}, 9), ({"penalty_alpha": 0.5, "top_k": 4}, 12)])
def test_prompt_is_prefilled_once_then_one_token_per_step(pair, kw, rows):
    _, ours = pair
    ids, mask = left_padded()
    calls, hook = _count_decoder_calls(ours)
    try:
        out = ours.generate(ids, mask, max_new_tokens=9, eos_token_id=[], seed=0, **kw)
    finally:
        hook.remove()
    assert calls[0] == (3, P)  # the prompt, once, one row per prompt
    assert all(c == (rows, 1) for c in calls[1:])  # then one new token per row and step
    assert out.shape[1] == P + 9
    # each step but the last needs one forward; contrastive also scores the last step's candidates
    assert len(calls) - 1 == (9 if "penalty_alpha" in kw else 8)


def test_top_k_1_sampling_is_greedy_and_temperature_0_is_greedy(pair):
    _, ours = pair
    ids, mask = left_padded()
    greedy = ours.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=MAX_NEW, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=MAX_NEW, do_sample=True, temperature=0), greedy)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=MAX_NEW, do_sample=True, temperature=0.0,
                                     top_p=0.5), greedy)


def test_seed_and_generator_reproduce_samples(pair):
    _, ours = pair
    ids, mask = left_padded()
    kw = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.3, top_k=0, eos_token_id=[])
    a = ours.generate(ids, mask, seed=7, **kw)
    assert torch.equal(a, ours.generate(ids, mask, seed=7, **kw))
    assert torch.equal(a, ours.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw))
    assert not torch.equal(a, ours.generate(ids, mask, seed=8, **kw))


def test_attention_mask_is_inferred_from_pad_ids_like_transformers(pair):
    _, ours = pair
    ids, mask = left_padded()
    assert torch.equal(ours.generate(ids, max_new_tokens=6), ours.generate(ids, mask, max_new_tokens=6))
    # a mask of any dtype (bool, float, bfloat16) means the same
    want = ours.generate(ids, mask, max_new_tokens=6)
    for dtype in (torch.bool, torch.float32, torch.bfloat16):
        assert torch.equal(ours.generate(ids, mask.to(dtype), max_new_tokens=6), want)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"early_stopping": "sometimes", "num_beams": 2}, "early_stopping"),
    ({"max_new_tokens": 60}, "context"),
    ({"stop_strings": ["x"]}, "tokenizer"),
])
def test_bad_arguments_fail_with_a_clear_message(pair, kw, match):
    _, ours = pair
    ids, mask = left_padded()
    with pytest.raises(ValueError, match=match):
        ours.generate(ids, mask, **{"max_new_tokens": 4, **kw})


def test_unknown_keyword_is_a_type_error(pair):
    _, ours = pair
    with pytest.raises(TypeError, match="max_new_token"):
        ours.generate(torch.tensor([[2, 5]]), max_new_token=3)


# ---- text: stop strings and streaming ----------------------------------------------------------------------

MULTIBYTE = "héllo 世界 🙂 naïve 日本語, ok"


@pytest.fixture(scope="module")
def tokenizer():
    return optlm.Tokenizer.from_pretrained(need_tokenizer())


def _scripted(tokenizer, text=MULTIBYTE):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the script must split characters across tokens"
    return ScriptedLM(ids), ids


@pytest.mark.parametrize("stop,expected", [(None, MULTIBYTE), ("日本", "héllo 世界 🙂 naïve "),
                                           (["🙂", "zzz"], "héllo 世界 "), (", o", "héllo 世界 🙂 naïve 日本語")])
def test_stream_yields_whole_characters_and_stops_before_the_stop_string(tokenizer, stop, expected):
    model, ids = _scripted(tokenizer)
    prompt = torch.tensor([tokenizer.encode("Say:")])
    stream = gen.stream(model, tokenizer, prompt, max_new_tokens=len(ids) + 3, stop_strings=stop)
    pieces = list(stream)
    assert "".join(pieces) == expected == stream.text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert stream.prompt_tokens == prompt.shape[1] and stream.time_to_first_token is not None
    out = gen.generate(model, prompt, max_new_tokens=len(ids) + 3, stop_strings=stop, tokenizer=tokenizer)
    text = gen.trim_at_stop(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True),
                            gen.stop_list(stop))
    assert text == expected
    if stop is not None:  # generation ended at the token that completed the stop string
        assert out.shape[1] - prompt.shape[1] <= len(ids)


def test_stop_strings_finish_rows_and_beams(tokenizer):
    model, ids = _scripted(tokenizer)
    prompt = torch.tensor([tokenizer.encode("Say:")] * 2)
    out = gen.generate(model, prompt, max_new_tokens=len(ids), stop_strings="🙂", tokenizer=tokenizer,
                       eos_token_id=[])
    new = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert new.endswith("🙂") and out.shape[1] - prompt.shape[1] < len(ids)
    beams = gen.generate(model, prompt[:1], max_new_tokens=len(ids), stop_strings="世界", tokenizer=tokenizer,
                         num_beams=2, eos_token_id=[])
    assert "世界" in tokenizer.decode(beams[0, prompt.shape[1]:]) and beams.shape[1] - prompt.shape[1] < len(ids)


@pytest.fixture(scope="module")
def multibyte_lm(tmp_path_factory, tokenizer):
    """A real (random) OPT model that almost only emits pieces of multi-byte characters."""
    favour = sorted(set(tokenizer.encode(MULTIBYTE + " ü€ — ß", add_special_tokens=False)))
    return optlm.load(text_checkpoint(tmp_path_factory.mktemp("multibyte"), favour=favour))


@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_equals_generated_text_on_a_real_model(multibyte_lm, seed):
    lm = multibyte_lm
    kw = dict(max_new_tokens=24, temperature=1.0, seed=seed, stop="世")
    pieces = list(lm.stream("Texte: 日本", **kw))
    assert "".join(pieces) == lm.generate("Texte: 日本", **kw)[0]
    greedy = list(lm.stream("Texte: 日本", max_new_tokens=24, temperature=0))
    assert "".join(greedy) == lm.generate("Texte: 日本", max_new_tokens=24, temperature=0)[0]
    assert not any(p.endswith("\ufffd") and p != pieces[-1] for p in pieces)
