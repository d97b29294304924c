"""optlm train-tokenizer: byte-level BPE with OPT's special tokens, loadable by optlm and transformers alike."""

from __future__ import annotations

import pytest
from train_fixtures import tiny_tokenizer, write_corpus

from optlm.cli import main
from optlm.tokenizer import Tokenizer
from optlm.tokenizer_train import train_tokenizer

TEXTS = ["The old captain opened the window.", "  two  spaces\nand a newline\n\n", "naïve café — “quoted” 😀",
         "</s>inline special<pad>", ""]


def test_special_tokens_at_opt_ids(tmp_path):
    tok = Tokenizer.from_pretrained(tiny_tokenizer(tmp_path))
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    assert len(tok) == 320
    ids = tok.encode("The cat")
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == "The cat"


def test_transformers_loads_it_with_identical_ids(tmp_path):
    import transformers

    path = tiny_tokenizer(tmp_path)
    ours = Tokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)
        # byte-level: every string round-trips, including characters never seen in training
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_cli_and_errors(tmp_path, capsys):
    corpus = write_corpus(tmp_path, n_sentences=50)
    assert main(["train-tokenizer", "--data", str(corpus), "--out", str(tmp_path / "tk"), "--vocab-size", "300",
                 "--quiet"]) == 0
    assert (tmp_path / "tk" / "tokenizer.json").is_file() and (tmp_path / "tk" / "tokenizer_config.json").is_file()
    assert "300-token tokenizer" in capsys.readouterr().out
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([corpus], tmp_path / "x", vocab_size=100)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["train-tokenizer", "--data", str(bad), "--out", str(tmp_path / "y"), "--quiet"]) == 1
    assert "not UTF-8" in capsys.readouterr().err


def test_cli_prints_no_progress_lines_when_not_on_a_terminal(tmp_path):
    import subprocess
    import sys

    corpus = write_corpus(tmp_path, n_sentences=50)
    run = subprocess.run([sys.executable, "-m", "optlm.cli", "train-tokenizer", "--data", str(corpus), "--out",
                          str(tmp_path / "tk"), "--vocab-size", "300"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"saved a 300-token tokenizer to {tmp_path / 'tk'}\n" and run.stderr.strip() == ""
