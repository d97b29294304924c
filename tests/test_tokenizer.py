"""optlm.Tokenizer against transformers' tokenizers built from the same OPT and GPT-2 vocab files."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # the reference these tests compare against
from conftest import TOKENIZER_FILES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optlm.tokenizer import StreamDecoder, Tokenizer

DATA = TOKENIZER_FILES


def _added(content: str) -> dict:
    # The AddedToken form the facebook/opt-* tokenizer_config.json uses.
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


# Config files as the hub ships them; config.json lets AutoTokenizer pick GPT2Tokenizer via model_type.
OPT_FILES = {
    "tokenizer_config.json": {
        "errors": "replace", "add_prefix_space": False, "add_bos_token": True,
        "special_tokens_map_file": None, "model_max_length": 1000000000000000019884624838656,
        **{k: {**_added(v), "__type": "AddedToken"} for k, v in
           [("unk_token", "</s>"), ("bos_token", "</s>"), ("eos_token", "</s>"), ("pad_token", "<pad>")]},
    },
    "special_tokens_map.json": {k: _added(v) for k, v in
                                [("bos_token", "</s>"), ("eos_token", "</s>"), ("unk_token", "</s>"),
                                 ("pad_token", "<pad>")]},
    "config.json": {"model_type": "opt"},
}
GPT2_FILES = {
    "tokenizer_config.json": {
        "add_bos_token": False, "add_prefix_space": False, "errors": "replace", "model_max_length": 1024,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": None, "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {"50256": {**_added("<|endoftext|>"), "special": True}},
    },
    "config.json": {"model_type": "gpt2"},
}

SPECIAL_TEXTS = ["a</s>b", "<pad>", "x <pad> </s>y", "<s>", "<unk>", "<mask>", "<|endoftext|>", "</s></s>"]
TEXTS = [
    "", " ", "Hello world", "  leading", "trailing   ", "  both  ", "a    b\t\tc \t d", "tab\tand\nnewline",
    "line1\r\nline2\r\n\r\n", "\n\n\nmany\n\n\n\n", "café naïve résumé Ångström", "日本語のテキストと中文",
    "emoji 🎉🙂 and ZWJ 👩‍👩‍👧‍👦 🏳️‍🌈 flags 🇺🇸", "def f(x):\n    return {'k': x ** 2}  # comment\n",
    "3.14159 1,000,000 -42 0xFF 1e-9", "It's don't I'll we've they're", "\u200b\u00a0\ufeff odd spaces",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº", "a" * 300, *SPECIAL_TEXTS,
]


def _make_dir(root: Path, src: str, files: dict) -> Path:
    root.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / src / name, root / name)
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory) -> Path:
    return _make_dir(tmp_path_factory.mktemp("tok") / "opt", "opt", OPT_FILES)


@pytest.fixture(scope="module")
def opt(opt_dir):
    return Tokenizer.from_pretrained(opt_dir), transformers.AutoTokenizer.from_pretrained(opt_dir)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = _make_dir(tmp_path_factory.mktemp("tok") / "gpt2", "gpt2", GPT2_FILES)
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def _lists(enc) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in enc.items()}


def test_runtime_module_does_not_import_transformers():
    source = (Path(__file__).resolve().parents[1] / "optlm" / "tokenizer.py").read_text()
    imported = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "transformers" for m in imported)


def test_opt_special_tokens_and_vocab(opt):
    ours, ref = opt
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (2, 2, 2, 1)
    assert (ours.bos_token, ours.pad_token) == ("</s>", "<pad>")
    assert (ours.vocab_size, len(ours)) == (ref.vocab_size, len(ref)) == (50265, 50265)
    assert ours.all_special_ids == ref.all_special_ids
    tokens = ["</s>", "<pad>", "Ġthe", "<mask>", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("Ġthe") == 5
    assert ours.convert_ids_to_tokens([0, 2, 5, 50264]) == ref.convert_ids_to_tokens([0, 2, 5, 50264])
    assert ours.convert_ids_to_tokens(torch.tensor(5)) == "Ġthe"


@pytest.mark.parametrize("text", TEXTS)
def test_opt_encode_decode_match_transformers(opt, text):
    ours, ref = opt
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ids[0] == 2  # OPT's BOS is </s>
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    if text not in SPECIAL_TEXTS:  # skipping drops special tokens written in the text itself
        assert ours.decode(ids, skip_special_tokens=True) == text


def test_special_token_strings_are_single_ids(opt):
    ours, _ = opt
    assert ours.encode("a</s>b") == [2, 102, 2, 428]
    assert ours.encode("<pad>") == [2, 1]
    assert ours.encode("<s>")[1:] != [0]  # not a special token for OPT's tokenizer: plain BPE pieces


def test_decode_accepts_tensors_and_batches(opt):
    ours, ref = opt
    ids = torch.tensor([ours.encode("Hello world"), ours.encode("Hello there")])
    assert ours.decode(ids[0]) == ref.decode(ids[0]) == "</s>Hello world"
    assert ours.decode(ids[0, 1]) == "Hello"
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.batch_decode(ids.tolist()) == ["</s>Hello world", "</s>Hello there"]


BATCH = ["Hello world, this is a longer one", "Hi", "", "日本 🎉"]


@pytest.mark.parametrize("kwargs", [
    {"padding": True},
    {"padding": True, "padding_side": "left"},
    {"padding": "longest", "padding_side": "right", "add_special_tokens": False},
    {"padding": "max_length", "max_length": 12},
    {"padding": "max_length", "max_length": 3, "truncation": True, "padding_side": "left"},
    {"padding": "max_length", "max_length": 3},  # no truncation: longer rows stay longer
    {"max_length": 3},  # transformers' legacy rule: max_length alone truncates
    {"max_length": 1, "truncation": True},
    {"max_length": 3, "truncation": False},
    {"truncation": True},
    {},
])
def test_call_matches_transformers(opt, kwargs):
    ours, ref = opt
    assert _lists(ours(BATCH, **kwargs)) == _lists(ref(BATCH, **kwargs))
    assert _lists(ours(BATCH[0], **kwargs)) == _lists(ref(BATCH[0], **kwargs))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensors_match_transformers(opt, side):
    ours, ref = opt
    enc, expected = ours(BATCH, padding=True, padding_side=side, return_tensors="pt"), ref(
        BATCH, padding=True, padding_side=side, return_tensors="pt")
    assert enc.input_ids.dtype == torch.long and enc.input_ids.shape == (4, expected["input_ids"].shape[1])
    assert torch.equal(enc["input_ids"], expected["input_ids"])
    assert torch.equal(enc.attention_mask, expected["attention_mask"])
    pad_col = 0 if side == "left" else -1
    assert enc.input_ids[1, pad_col] == 1 and enc.attention_mask[1, pad_col] == 0
    single = ours("Hello", return_tensors="pt")
    assert torch.equal(single.input_ids, ref("Hello", return_tensors="pt")["input_ids"])  # shape (1, T)


def test_padding_side_attribute_and_errors(opt):
    ours, _ = opt
    assert ours.padding_side == "right"
    with pytest.raises(ValueError, match="padding=True"):
        ours(BATCH, return_tensors="pt")
    with pytest.raises(ValueError, match="padding_side"):
        ours(BATCH, padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors"):
        ours(BATCH, return_tensors="np")


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_matches_transformers(gpt2, text):
    ours, ref = gpt2
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids)
    if "<|endoftext|>" not in text:
        assert ours.decode(ids, skip_special_tokens=True) == text


def test_gpt2_has_no_bos_and_no_pad(gpt2):
    ours, ref = gpt2
    assert ours.encode("Hello world") == [15496, 995]  # no BOS prepended, as GPT-2's tokenizer does
    assert ours.bos_token_id == ours.eos_token_id == 50256 and ours.pad_token_id is None
    assert ours.all_special_ids == ref.all_special_ids == [50256]
    assert _lists(ours(BATCH, truncation=True)) == _lists(ref(BATCH, truncation=True))
    assert len(ours(["word " * 1500], truncation=True)["input_ids"][0]) == 1024  # model_max_length
    with pytest.raises(ValueError, match="no pad token"):
        ours(BATCH, padding=True)


def test_save_pretrained_round_trip(opt, tmp_path):
    ours, ref = opt
    ours.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    again, theirs = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == theirs.encode(text) == ref.encode(text)
        assert again.decode(ref.encode(text)) == theirs.decode(ref.encode(text))
    assert _lists(again(BATCH, padding=True)) == _lists(theirs(BATCH, padding=True))
    assert again.all_special_ids == theirs.all_special_ids == [2, 1]


@pytest.fixture(scope="module")
def trained():
    """A small byte-level BPE trained by `tokenizers`, with the special tokens at ids 0-3."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS * 3 + ["the cat sat on the mat " * 20], trainer)
    return tk


def test_from_tokenizers_and_save_load_in_transformers(trained, tmp_path):
    tok = Tokenizer.from_tokenizers(trained)
    assert (tok.bos_token_id, tok.pad_token_id) == (2, 1)  # OPT's defaults: </s>, <pad>
    assert trained.post_processor is None  # the wrapped tokenizer was copied, not changed
    tok.save_pretrained(tmp_path / "ours")
    trained.save(str(tmp_path / "raw.json"))
    (tmp_path / "raw").mkdir()
    shutil.move(tmp_path / "raw.json", tmp_path / "raw" / "tokenizer.json")  # tokenizers' own format only

    again = Tokenizer.from_pretrained(tmp_path / "ours")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    raw = Tokenizer.from_pretrained(tmp_path / "raw")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 2 and ids == again.encode(text) == theirs.encode(text) == raw.encode(text)
        assert tok.decode(ids) == theirs.decode(ids)
    assert _lists(again(BATCH, padding=True, padding_side="left")) == _lists(
        theirs(BATCH, padding=True, padding_side="left"))
    plain = Tokenizer.from_tokenizers(trained, bos_token="<s>", eos_token="</s>", add_bos_token=False)
    assert plain.encode("the cat")[0] != 0 and plain.bos_token_id == 0
    with pytest.raises(TypeError, match="bos_tokn"):
        Tokenizer.from_tokenizers(trained, bos_tokn="<s>")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=60))
def test_random_text_matches_transformers(opt, text):
    ours, ref = opt
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids[1:]) == text  # exact round trip (special-token strings included)
    out = StreamDecoder(ours, skip_special_tokens=False)
    assert "".join(out.push(i) for i in ids) + out.flush() == ours.decode(ids)


STREAM_TEXTS = [
    "日本語のテキスト", "emoji 🎉🙂 ZWJ 👩‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 done", "mixed 中文 and café</s> tail", "a</s>b<pad>"
]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_concatenation(opt, text, skip):
    ours, _ = opt
    ids = ours.encode(text)
    out = StreamDecoder(ours, skip_special_tokens=skip)
    pieces = [out.push(torch.tensor(i)) for i in ids]
    assert "".join(pieces) + out.flush() == ours.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    if not text.isascii() and "</s>" not in text:
        assert "" in pieces  # some character spans several tokens and had to wait


def test_stream_decoder_flushes_broken_bytes(opt):
    ours, _ = opt
    ids = ours.encode("ok 🎉", add_special_tokens=False)[:-1]  # drop the emoji's last byte token
    out = StreamDecoder(ours)
    assert "".join(out.push(i) for i in ids) == "ok"
    assert out.flush() == ours.decode(ids)[2:] and out.flush() == ""
    assert ours.decode(ids).endswith("\ufffd")


def test_hub_id_from_offline_cache(opt_dir, opt, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--facebook--opt-125m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(opt_dir, repo / "snapshots" / commit)
    # huggingface_hub reads these at import time, so the env vars alone would come too late.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    ours, ref = opt
    for revision in (None, commit):
        hub = Tokenizer.from_pretrained("facebook/opt-125m", revision=revision)
        assert hub.pad_token_id == 1
        assert [hub.encode(t) for t in TEXTS] == [ref.encode(t) for t in TEXTS]
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("facebook/opt-350m")


def test_missing_files_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json, or vocab\.json \+ merges\.txt"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        Tokenizer.from_pretrained(tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="neither a directory nor a hub id"):
        Tokenizer.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_vocab_files_alone_get_opt_defaults(opt_dir, opt, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(opt_dir / name, tmp_path / name)
    bare, (_, ref) = Tokenizer.from_pretrained(tmp_path), opt
    assert (bare.bos_token_id, bare.pad_token_id) == (2, 1)
    assert [bare.encode(t) for t in TEXTS] == [ref.encode(t) for t in TEXTS]


@pytest.mark.parametrize("with_decoder", [False, True])
def test_config_files_merge_like_transformers(opt_dir, tmp_path, with_decoder):
    # special_tokens_map.json overrides tokenizer_config.json, unless the latter has added_tokens_decoder.
    for name in ("vocab.json", "merges.txt", "config.json"):
        shutil.copy(opt_dir / name, tmp_path / name)
    config = {"add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
              "pad_token": "<pad>"}
    if with_decoder:
        config["added_tokens_decoder"] = {str(i): {**_added(t), "special": True} for i, t in
                                          [(1, "<pad>"), (2, "</s>"), (50264, "<mask>")]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special_tokens_map = {"pad_token": "<mask>", "unk_token": "<unk>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    ours, ref = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.pad_token_id, ours.unk_token_id) == (ref.pad_token_id, ref.unk_token_id)
    assert (ours.pad_token_id, ours.unk_token_id) == ((1, 2) if with_decoder else (50264, 3))
    assert ours.all_special_ids == ref.all_special_ids
    for text in ["a<mask>b<unk>c<pad>", "<s>x</s>"]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == ref.decode(
            ref.encode(text), skip_special_tokens=True)


def test_flags_are_read_only_and_bad_arguments_fail(opt):
    ours, _ = opt
    assert ours.add_bos_token is True and ours.add_eos_token is False
    with pytest.raises(AttributeError):
        ours.add_bos_token = False  # would silently leave the post-processor unchanged
    with pytest.raises(ValueError, match="truncation"):
        ours(BATCH, truncation="do_not_truncate")
    with pytest.raises(ValueError, match="max_length"):
        ours(BATCH, max_length=0, truncation=True)
    enc = ours(["Hi"], padding=True, return_tensors="pt").to("cpu")
    assert enc.input_ids.tolist() == [[2, 30086]]
    with pytest.raises(AttributeError):
        _ = enc.token_type_ids
