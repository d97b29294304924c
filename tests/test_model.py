"""The OPT core against transformers on the same random weights.

Invariants: for every OPT variant (pre-LN, post-LN with projection, no bias / no affine, no final norm),
every head and every attention implementation, optlm's outputs equal transformers' on left-padded batches;
cached step-by-step decoding equals one full forward; losses equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import hf_config, left_padded_batch

import optlm

HEADS = {
    "base": (transformers.OPTModel, optlm.OPTModel, "last_hidden_state"),
    "causal_lm": (transformers.OPTForCausalLM, optlm.OPTForCausalLM, "logits"),
    "seq_cls": (transformers.OPTForSequenceClassification, optlm.OPTForSequenceClassification, "logits"),
    "qa": (transformers.OPTForQuestionAnswering, optlm.OPTForQuestionAnswering, "start_logits"),
}


def build_pair(tmp_path, hf_cls, opt_cls, dtype=torch.float64, attn="sdpa", seed=0, **config_kwargs):
    torch.manual_seed(seed)
    ref = hf_cls(hf_config(**config_kwargs)).to(dtype).eval()
    ref.set_attn_implementation(attn)
    ref.save_pretrained(tmp_path)
    ours = opt_cls.from_pretrained(tmp_path, attn_implementation=attn)
    assert ours.dtype == dtype
    return ref, ours


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_heads_match_reference_on_left_padded_batch(tmp_path, config_kwargs, head, attn):
    hf_cls, opt_cls, field = HEADS[head]
    # transformers' eager path overflows to NaN in float64 when a row is fully padded, so eager is compared
    # in float32 (its softmax runs in fp32 anyway) and sdpa in float64.
    dtype = torch.float64 if attn == "sdpa" else torch.float32
    ref, ours = build_pair(tmp_path, hf_cls, opt_cls, dtype, attn, **config_kwargs)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    fields = [field, "end_logits"] if head == "qa" else [field]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name in fields:
        e, g = getattr(expected, name), getattr(got, name)
        assert e.shape == g.shape
        if e.dim() >= 2 and e.shape[1] == ids.shape[1]:
            e, g = e[mask.bool()], g[mask.bool()]  # padded positions are don't-care in eager mode
        assert (e - g).abs().max() <= tol, name


def test_padded_positions_match_sdpa_reference_too(tmp_path):
    """Even outputs at padded positions equal the reference (they feed losses whose labels are not -100)."""
    ref, ours = build_pair(tmp_path, transformers.OPTForCausalLM, optlm.OPTForCausalLM)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits,
                              atol=1e-12, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decoding_equals_full_forward(tmp_path, config_kwargs, attn):
    _, ours = build_pair(tmp_path, transformers.OPTForCausalLM, optlm.OPTForCausalLM, attn=attn, **config_kwargs)
    ids, mask = left_padded_batch(lengths=(11, 6, 8))
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        out = ours(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)  # prefill
        cache, pieces = out.past_key_values, [out.logits]
        pieces.append(ours(ids[:, 4:7], attention_mask=mask[:, :7], past_key_values=cache).logits)  # a chunk
        for t in range(7, ids.shape[1]):  # then one token at a time
            pieces.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    stepped = torch.cat(pieces, dim=1)
    valid = mask.bool()
    assert (stepped - full)[valid].abs().max() <= 1e-12
    assert cache.get_seq_length() == ids.shape[1]


def test_cache_feedback_matches_reference_cache(tmp_path):
    """Feeding our returned cache back gives the reference's logits for the next token."""
    ref, ours = build_pair(tmp_path, transformers.OPTForCausalLM, optlm.OPTForCausalLM)
    ids, mask = left_padded_batch()
    nxt = torch.tensor([[5], [6], [7]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, use_cache=True)
        r2 = ref(input_ids=nxt, attention_mask=mask2, past_key_values=r.past_key_values).logits
        o = ours(ids, attention_mask=mask, use_cache=True)
        o2 = ours(nxt, attention_mask=mask2, past_key_values=o.past_key_values).logits
        o3 = ours(torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1:]
    assert (r2 - o2).abs().max() <= 1e-12
    assert (o3 - o2).abs().max() <= 1e-12


def test_mask_may_be_omitted_after_padded_prefill(tmp_path):
    """The cache remembers padding, so later steps without an attention_mask still see it."""
    _, ours = build_pair(tmp_path, transformers.OPTForCausalLM, optlm.OPTForCausalLM)
    ids, mask = left_padded_batch()
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        a = ours(nxt, past_key_values=ours(ids, attention_mask=mask, use_cache=True).past_key_values).logits
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        b = ours(torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1:]
    assert (a - b).abs().max() <= 1e-12


def test_causal_lm_loss_matches_reference(tmp_path, config_kwargs):
    ref, ours = build_pair(tmp_path, transformers.OPTForCausalLM, optlm.OPTForCausalLM, **config_kwargs)
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, -2] = -100
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = ours(ids, attention_mask=mask, labels=labels).loss
    assert abs(expected.item() - got.item()) <= 1e-6


@pytest.mark.parametrize("problem", ["single", "multi", "regression"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification_pooling_and_losses(tmp_path, problem, side):
    num_labels = 1 if problem == "regression" else 3
    ref, ours = build_pair(tmp_path, transformers.OPTForSequenceClassification, optlm.OPTForSequenceClassification,
                           num_labels=num_labels)
    ids, mask = left_padded_batch()
    if side == "right":
        lengths = mask.sum(1)
        ids, mask = ids.clone(), mask.clone()
        for i, n in enumerate(lengths.tolist()):
            ids[i] = torch.cat([ids[i, -n:], ids.new_full((ids.shape[1] - n,), 1)])
            mask[i] = torch.cat([mask.new_ones(n), mask.new_zeros(ids.shape[1] - n)])
    g = torch.Generator().manual_seed(1)
    labels = {"single": torch.tensor([0, 2, 1]), "multi": torch.randint(0, 2, (3, 3), generator=g).double(),
              "regression": torch.randn(3, generator=g, dtype=torch.float64)}[problem]
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, num_labels)
    assert (expected.logits - got.logits).abs().max() <= 1e-10
    assert abs(expected.loss.item() - got.loss.item()) <= 1e-10
    assert ours.config.problem_type == ref.config.problem_type


def test_question_answering_loss_clamps_positions_like_reference(tmp_path):
    ref, ours = build_pair(tmp_path, transformers.OPTForQuestionAnswering, optlm.OPTForQuestionAnswering)
    ids, mask = left_padded_batch()
    start, end = torch.tensor([3, 50, 7]), torch.tensor([[8], [-4], [100]])  # out-of-range ones are clamped
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
        got = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert abs(expected.loss.item() - got.loss.item()) <= 1e-10


def _head_labels(head: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    if head == "causal_lm":
        return {"labels": ids.masked_fill(mask == 0, -100)}
    if head == "seq_cls":
        return {"labels": torch.tensor([0, 1, 0])}
    if head == "qa":
        return {"start_positions": torch.tensor([3, 5, 4]), "end_positions": torch.tensor([6, 8, 5])}
    return {}


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_with_gradients_matches_reference(tmp_path, head, with_labels, mode):
    """The first forward an HF user writes: grad mode on, use_cache left at its default, with and without labels.
    Outputs and every parameter's gradient equal transformers' (backward from the loss, or from a fixed
    projection of the output when there are no labels)."""
    hf_cls, opt_cls, field = HEADS[head]
    ref, ours = build_pair(tmp_path, hf_cls, opt_cls, num_labels=2)
    ref.train(mode == "train")
    ours.train(mode == "train")
    ids, mask = left_padded_batch()
    kwargs = _head_labels(head, ids, mask) if with_labels else {}
    expected = ref(input_ids=ids, attention_mask=mask, **kwargs)
    got = ours(ids, attention_mask=mask, **kwargs)
    e, g = getattr(expected, field), getattr(got, field)
    assert (e - g).abs().max() <= 1e-10
    if kwargs and head != "base":
        assert abs(expected.loss.item() - got.loss.item()) <= 1e-10
        e_obj, g_obj = expected.loss, got.loss
    else:
        weights = torch.randn(e.shape, generator=torch.Generator().manual_seed(2), dtype=e.dtype)
        e_obj, g_obj = (e * weights).sum(), (g * weights).sum()
    e_obj.backward()
    g_obj.backward()
    ref_grads = dict(ref.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        r = ref_grads[name if name in ref_grads else name.removeprefix("model.")]
        assert (r.grad is None) == (p.grad is None), name
        if p.grad is not None:
            assert (r.grad - p.grad).abs().max() <= 1e-9, name
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reduced_precisions_track_float64(tmp_path, dtype):
    torch.manual_seed(0)
    ref = transformers.OPTForCausalLM(hf_config()).double().eval()
    ref.save_pretrained(tmp_path)
    exact = optlm.OPTForCausalLM.from_pretrained(tmp_path)
    low = optlm.OPTForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert low.dtype == dtype
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a = exact(ids, attention_mask=mask).logits[mask.bool()]
        b = low(ids, attention_mask=mask).logits[mask.bool()].double()
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() <= tol


def test_dropout_active_only_in_train_mode(tmp_path):
    torch.manual_seed(0)
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**{**_tiny(), "dropout": 0.3, "attention_dropout": 0.2}))
    ids, _ = left_padded_batch()
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**_tiny())).double().train()
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-12), name


def test_lm_head_is_tied_to_embeddings():
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**_tiny()))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


def test_too_long_input_is_a_clear_error():
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**_tiny()))
    with pytest.raises(ValueError, match="allows 64"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_flash_attention_without_package_or_gpu_is_a_clear_error():
    model = optlm.OPTForCausalLM(optlm.OPTConfig(**_tiny()))
    model.set_attn_implementation("flash_attention_2")
    with pytest.raises((ImportError, ValueError), match="flash"):
        model(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        model.set_attn_implementation("fast")


def _tiny() -> dict:
    return dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, dropout=0.0)


def test_a_head_missing_from_the_checkpoint_is_announced(tmp_path):
    """Like transformers: loading a classifier from a causal-LM checkpoint says the head is new."""
    torch.manual_seed(0)
    transformers.OPTForCausalLM(hf_config()).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="score.weight not in the checkpoint .* newly initialised"):
        optlm.OPTForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    with pytest.warns(UserWarning, match="qa_outputs.bias, qa_outputs.weight not in the checkpoint"):
        optlm.OPTForQuestionAnswering.from_pretrained(tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tied LM head is not "new": no warning
        optlm.OPTForCausalLM.from_pretrained(tmp_path)
