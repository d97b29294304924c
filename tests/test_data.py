"""Data pipeline: pieces tokenize exactly like whole files, memmap token caches, packing, splits, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_fixtures import corpus_text, tiny_tokenizer, write_corpus

from optlm import data
from optlm.data import BlockDataset, iter_documents, split_tokens, tokenize_files
from optlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_pieces_tokenize_like_the_whole_file(tmp_path, tok, monkeypatch):
    text = corpus_text(300) + "  indented line\n\n\n   \nlast words without newline ünïcödé"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "PIECE_CHARS", 97)  # many cuts, some inside multi-byte characters
    pieces = list(iter_documents(path))
    assert len(pieces) > 10 and pieces[0][1] and not any(new for _, new in pieces[1:])
    assert "".join(p for p, _ in pieces) == text
    ids = [i for p, _ in pieces for i in tok.encode(p, add_special_tokens=False)]
    assert ids == tok.encode(text, add_special_tokens=False)


def test_unwrap_joins_wrapped_lines_and_keeps_paragraphs():
    text = "  It was a dark\nand stormy   \nnight.\n\n\n \t\n\"Who's there?\"\r\nsaid she.\n\nEnd"
    assert data.unwrap(text) == 'It was a dark and stormy night.\n\n"Who\'s there?" said she.\n\nEnd'


def test_unwrapped_pieces_tokenize_like_the_whole_unwrapped_file(tmp_path, tok, monkeypatch):
    paragraphs = [corpus_text(12, seed=i).replace(" the ", " the\n") for i in range(30)]
    text = "\n\n".join(paragraphs) + "\n\n  \n\n last words ünïcödé\n"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "PIECE_CHARS", 101)
    pieces = list(iter_documents(path, unwrapped=True))
    assert len(pieces) > 5 and "".join(p for p, _ in pieces) == data.unwrap(text)
    assert "\n" not in data.unwrap(text).replace("\n\n", "")
    ids = [i for p, _ in pieces for i in tok.encode(p, add_special_tokens=False)]
    assert ids == tok.encode(data.unwrap(text), add_special_tokens=False)
    whole = tokenize_files([path], tok, tmp_path / "cache", unwrapped=True)
    raw = tokenize_files([path], tok, tmp_path / "cache")
    assert list(whole) == [2, *ids] and len(raw) != len(whole)  # cached apart from the wrapped stream


def test_token_file_is_a_cached_memmap_with_bos_between_documents(tmp_path, tok):
    a = write_corpus(tmp_path, "a.txt", 30, seed=1)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["first doc", "second doc"]) + "\n\n", "utf-8")
    mm = tokenize_files([a, jl], tok, tmp_path / "cache")
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    expected = ([2] + tok.encode(a.read_text("utf-8"), add_special_tokens=False)
                + [2] + tok.encode("first doc", add_special_tokens=False)
                + [2] + tok.encode("second doc", add_special_tokens=False))
    assert mm.tolist() == expected
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = tokenize_files([a, jl], tok, tmp_path / "cache")  # cache hit: the file is not rewritten
    assert again.tolist() == expected and files[0].stat().st_mtime_ns == mtime
    a.write_text("changed text", encoding="utf-8")
    tokenize_files([a, jl], tok, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert data.token_dtype(70000) == np.uint32


def test_block_order_is_a_function_of_seed_and_position():
    ds = BlockDataset(np.arange(1001, dtype=np.uint16), block_size=10, seed=3)
    assert len(ds) == 100
    epoch0 = [ds.example_index(k) for k in range(100)]
    assert sorted(epoch0) == list(range(100)) and epoch0 != list(range(100))
    epoch1 = [ds.example_index(k) for k in range(100, 200)]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    fresh = BlockDataset(np.arange(1001, dtype=np.uint16), block_size=10, seed=3)
    assert [fresh.example_index(k) for k in range(150, 160)] == epoch1[50:60]
    x, y = ds.batch([0, 5])
    assert x.shape == y.shape == (2, 10)
    assert x[1].tolist() == list(range(50, 60)) and y[1].tolist() == list(range(51, 61))


def test_split_holds_out_the_tail():
    t = np.arange(1000)
    train, val = split_tokens(t, 0.1, 16)
    assert len(val) == 100 and train[-1] + 1 == val[0]
    with pytest.raises(ValueError, match="too few"):
        split_tokens(np.arange(30), 0.5, 16)


def test_bad_files(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        tokenize_files([empty], tok, tmp_path / "c")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        tokenize_files([latin], tok, tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir()]  # no half-written cache left behind
    with pytest.raises(FileNotFoundError):
        tokenize_files([tmp_path / "missing.txt"], tok, tmp_path / "c")
    broken = tmp_path / "x.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        tokenize_files([broken], tok, tmp_path / "c")
    broken.write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        tokenize_files([broken], tok, tmp_path / "c")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no text"):
        tokenize_files([blank], tok, tmp_path / "c")
