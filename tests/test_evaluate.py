"""Sliding-window perplexity: each token scored once, and the same number transformers' model gives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optlm import OPTForCausalLM
from optlm.cli import main
from optlm.evaluate import encode_file, evaluate_file, perplexity, windows


def test_windows_score_every_token_once():
    for n, max_length, stride in [(100, 16, 16), (100, 16, 5), (7, 16, 8), (33, 16, 1), (16, 16, 4)]:
        spans = windows(n, max_length, stride)
        scored = [t for b, e, new in spans for t in range(e - new, e)]
        assert scored == list(range(n))
        assert all(e - b <= max_length and new <= e - b for b, e, new in spans)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, 9)


def reference_nll(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Written independently of optlm.evaluate: the docs' loop, summing per-token losses exactly."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf_model(x).logits
        shift_logits, shift_labels = logits[0, :-1].float(), labels[0, 1:]
        total += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        count += int((shift_labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("stride", [64, 24, 7])
def test_matches_transformers(tmp_path, stride):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=64, dropout=0.0)
    transformers.OPTForCausalLM(cfg).save_pretrained(tmp_path)
    theirs = transformers.OPTForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = OPTForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 96, (300,))
    total, count = reference_nll(theirs, ids, 64, stride)
    for batch_size in (1, 4):
        r = perplexity(ours, ids, max_length=64, stride=stride, batch_size=batch_size)
        assert r.tokens == count
        assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    # and the reference model itself through optlm's windowing (any module with .logits and .config)
    assert perplexity(theirs, ids, max_length=64, stride=stride).perplexity == pytest.approx(
        math.exp(total / count), rel=1e-6)


def test_cli_eval_on_a_checkpoint(tmp_path, capsys):
    from train_fixtures import tiny_tokenizer, write_corpus

    from optlm import OPTConfig
    from optlm.tokenizer import Tokenizer

    tok_dir = tiny_tokenizer(tmp_path)
    model = OPTForCausalLM(OPTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     ffn_dim=64, max_position_embeddings=32))
    model.save_pretrained(tmp_path / "m")
    Tokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path / "m")
    text = write_corpus(tmp_path, n_sentences=40)
    ids = encode_file(text, Tokenizer.from_pretrained(tok_dir))
    assert ids[0] == 2
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--stride", "16"]) == 0
    out, err = capsys.readouterr()
    expected = evaluate_file(tmp_path / "m", text, stride=16)
    assert f"perplexity:  {expected.perplexity:.3f}" in out and f"tokens:      {expected.tokens:,}" in out
    assert f"{expected.tokens}/{expected.tokens}" in err  # the progress bar, complete
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--stride", "16", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert 200 < expected.perplexity < 500  # a random model is near-uniform over 320 tokens
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--stride", "64"]) == 1
    assert "stride" in capsys.readouterr().err
