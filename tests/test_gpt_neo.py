"""GPT-Neo, the second family, against transformers' GPT-Neo on the same random weights.

Invariants: every head equals the reference (float64 within 1e-10, float32 within 1e-5) on left-padded batches
longer than the local-attention window; cached decoding, step by step or in chunks, equals one full forward
beyond the window, while the local layers' cache stays a ring of window slots; greedy and beam search are
token-identical to transformers' ``generate``; the tokenizer gives GPT2Tokenizer's ids without a BOS;
checkpoints load in every layout the hub has (old mask buffers, ``.bin``, shards, a bare model's keys) and
save in one transformers reads; quantization and peft's LoRA apply unchanged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import TOKENIZER_FILES, left_padded_batch
from safetensors import safe_open

import optlm
from optlm.kv_cache import KVCache
from optlm.models import GPTNeoConfig, config_from_name, read_config
from optlm.peft import PeftModel

WINDOW = 5
TINY = dict(vocab_size=120, hidden_size=32, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
            window_size=WINDOW, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, initializer_range=0.3,
            intermediate_size=48)
HEADS = {
    "base": (transformers.GPTNeoModel, optlm.GPTNeoModel, "last_hidden_state"),
    "causal_lm": (transformers.GPTNeoForCausalLM, optlm.GPTNeoForCausalLM, "logits"),
    "seq_cls": (transformers.GPTNeoForSequenceClassification, optlm.GPTNeoForSequenceClassification, "logits"),
    "qa": (transformers.GPTNeoForQuestionAnswering, optlm.GPTNeoForQuestionAnswering, "start_logits"),
    "token_cls": (transformers.GPTNeoForTokenClassification, optlm.GPTNeoForTokenClassification, "logits"),
}
PAD = 1  # a token id the random prompts never use (left_padded_batch draws from 4 up)


def build_pair(tmp_path, hf_cls=transformers.GPTNeoForCausalLM, opt_cls=optlm.GPTNeoForCausalLM,
               dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    ref = hf_cls(transformers.GPTNeoConfig(**{**TINY, **overrides})).to(dtype).eval()
    ref.save_pretrained(tmp_path)
    ours = opt_cls.from_pretrained(tmp_path)
    assert ours.dtype == dtype
    return ref, ours


def batch(lengths=(17, 9, 13)):
    """A left-padded batch whose longest row is over three windows long."""
    return left_padded_batch(vocab=TINY["vocab_size"], lengths=lengths, pad_id=PAD)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_heads_match_reference_on_left_padded_batch_beyond_the_window(tmp_path, head, dtype):
    hf_cls, opt_cls, field = HEADS[head]
    extra = {"pad_token_id": PAD} if head == "seq_cls" else {}
    ref, ours = build_pair(tmp_path, hf_cls, opt_cls, dtype, **extra)
    ids, mask = batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name in [field, "end_logits"] if head == "qa" else [field]:
        e, g = getattr(expected, name), getattr(got, name)
        assert e.shape == g.shape
        if e.dim() >= 2 and e.shape[1] == ids.shape[1]:
            e, g = e[mask.bool()], g[mask.bool()]  # what padded positions hold is nobody's concern
        assert (e - g).abs().max() <= tol, name


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls", "qa", "token_cls"])
def test_losses_and_gradients_match_reference(tmp_path, head):
    hf_cls, opt_cls, _ = HEADS[head]
    ref, ours = build_pair(tmp_path, hf_cls, opt_cls, torch.float64, pad_token_id=PAD, classifier_dropout=0.0)
    ids, mask = batch()
    if head == "qa":  # its softmax over start/end positions spans every position, padding included
        ids, mask = batch((17, 17, 17))
    # Only real positions may feed the loss: what the reference computes at a padded position (its last pad
    # predicts the first real token) depends on its dtype's mask arithmetic, not on the model.
    first_real = mask.cumsum(1) == 1
    labels = {
        "causal_lm": {"labels": ids.masked_fill((mask == 0) | first_real, -100)},
        "seq_cls": {"labels": torch.tensor([0, 1, 1])},
        "qa": {"start_positions": torch.tensor([3, 9, 5]), "end_positions": torch.tensor([5, 12, 40])},
        "token_cls": {"labels": torch.randint(0, 2, ids.shape).masked_fill(mask == 0, -100)},
    }[head]
    ref.train()
    ours.train()
    expected = ref(input_ids=ids, attention_mask=mask, **labels).loss
    got = ours(ids, attention_mask=mask, **labels).loss
    assert abs(expected.item() - got.item()) <= 1e-10
    expected.backward()
    got.backward()
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert (p.grad - ours.get_parameter(name).grad).abs().max() <= 1e-9, name


def _in_pieces(model, ids, mask, positions, cache=None, sizes=(7, 1, 1, 3, 1, 2, 5, 1, 9)):
    """Logits of ``ids`` fed through a cache a few tokens at a time (transformers' keywords, either library)."""
    pieces, t = [], 0
    for n in sizes:
        out = model(input_ids=ids[:, t:t + n], attention_mask=mask[:, :t + n], position_ids=positions[:, t:t + n],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
        t += n
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize("init", [0.02, 0.3])
def test_cached_decoding_in_steps_and_chunks_equals_the_full_forward_beyond_the_window(tmp_path, init):
    ref, ours = build_pair(tmp_path, initializer_range=init)
    ids, mask = batch((30, 22, 26))
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as transformers' generate places left-padded rows
    m = mask.bool()
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours_steps, cache = _in_pieces(ours, ids, mask, positions)
        ref_steps, _ = _in_pieces(ref, ids, mask, positions)
    # Equal to one full pass, and to the reference fed the same pieces, up to the family's float32 q·k: its
    # rounding depends on how many keys one matmul takes, so chunked and whole passes differ in the reference
    # itself by ~1e-9 at the usual init and ~1e-5 with weights 15x larger (float64 weights, float32 scores).
    tol = 1e-8 if init == 0.02 else 1e-4
    assert (ours_steps - full)[m].abs().max() <= tol
    assert (ours_steps - ref_steps)[m].abs().max() <= tol
    assert (ref_steps - full)[m].abs().max() > 0  # the reference's own pieces are not bit-equal either
    # the local layers kept a ring of window slots; the global layers every slot
    assert cache.ring_k.shape == (2, 3, 4, WINDOW, 8) and cache.k.shape[0] == 2 and cache.length == 30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_tracks_float64_as_closely_as_the_reference_does(tmp_path, dtype):
    ref, exact = build_pair(tmp_path, initializer_range=0.02)
    low = optlm.GPTNeoForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ref_low = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    ids, mask = batch()
    m = mask.bool()
    with torch.no_grad():
        want = exact(ids, attention_mask=mask).logits[m]
        ours = (low(ids, attention_mask=mask).logits[m].double() - want).abs().max()
        theirs = (ref_low(input_ids=ids, attention_mask=mask).logits[m].double() - want).abs().max()
    assert torch.isfinite(ours) and ours <= max(2 * theirs, 1e-3)


def test_local_layer_memory_follows_the_window_in_long_generations(tmp_path):
    _, ours = build_pair(tmp_path)
    cache = KVCache.for_model(ours.config, 1, 4, torch.float64)
    ring_bytes = cache.ring_k.nbytes
    with torch.no_grad():
        ours(torch.tensor([[5, 6, 7, 8]]), past_key_values=cache)
        for i in range(50):
            ours(torch.tensor([[9 + i % 100]]), past_key_values=cache)
    assert cache.length == 54 and cache.ring_k.nbytes == ring_bytes
    assert cache.k.shape[3] >= 54  # the global layers grew with the tokens


def test_greedy_and_beam_search_are_token_identical_to_transformers(tmp_path):
    ref, ours = build_pair(tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
            want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=PAD, **kwargs)
            got = ours.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=PAD, **kwargs)
            assert torch.equal(want, got), kwargs


def test_the_tokenizer_gives_gpt2_tokenizers_ids_without_a_bos(tmp_path):
    files = TOKENIZER_FILES / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neo"}))
    ref = transformers.GPT2Tokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    ours = optlm.Tokenizer.from_pretrained(tmp_path)
    texts = ["Hello world", " leading space", "emoji 🤗 and ümlaut", "<|endoftext|>inside", "two  spaces\n\n\ttab",
             "日本語のテキスト", "don't  STOP—ever…", "x" * 300, "1234567 + 89 = ?", ""]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    assert ours.encode("Hi")[0] != ours.bos_token_id and not ours.add_bos_token
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|endoftext|>", "<|endoftext|>", None)
    assert ours.decode(ours.encode("héllo <|endoftext|> x")) == ref.decode(ref.encode("héllo <|endoftext|> x"))


def test_checkpoints_from_every_layout_load(tmp_path):
    ref, ours = build_pair(tmp_path / "a")
    ids, _ = batch()
    with torch.no_grad():
        want = ref(ids).logits
    state = {f"transformer.{k}": v for k, v in ref.transformer.state_dict().items()}
    # old uploads: each attention layer's mask buffers saved with the weights, pickled weights-only .bin
    for i in range(TINY["num_layers"]):
        state[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    shutil.copy(tmp_path / "a" / "config.json", old / "config.json")
    # a bare GPTNeoModel's keys (no "transformer." prefix), sharded safetensors
    bare = tmp_path / "bare"
    transformers.GPTNeoModel.from_pretrained(tmp_path / "a").save_pretrained(bare, max_shard_size="20KB")
    assert (bare / "model.safetensors.index.json").is_file()
    for directory in (old, bare):
        loaded = optlm.AutoModelForCausalLM.from_pretrained(directory)
        assert isinstance(loaded, optlm.GPTNeoForCausalLM)
        with torch.no_grad():
            assert (loaded(ids).logits - want).abs().max() <= 1e-10, directory.name


def test_saved_checkpoints_load_in_transformers(tmp_path):
    _, ours = build_pair(tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "gpt_neo" and config["architectures"] == ["GPTNeoForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids, mask = batch()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits)[
            mask.bool()].abs().max() <= 1e-10
    bare = optlm.GPTNeoModel.from_pretrained(tmp_path / "a")
    bare.save_pretrained(tmp_path / "c")
    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:  # a bare model's keys, as transformers writes
        keys = set(f.keys())
    assert {"wte.weight", "h.0.ln_1.weight"} <= keys and not any(k.startswith("transformer.") for k in keys)


def test_config_reads_the_hub_file_and_knows_the_published_sizes(tmp_path):
    hub = {  # EleutherAI/gpt-neo-125m's config.json on the Hugging Face hub
        "activation_function": "gelu_new", "architectures": ["GPTNeoForCausalLM"], "attention_dropout": 0,
        "attention_layers": ["global", "local"] * 6, "attention_types": [[["global", "local"], 6]],
        "bos_token_id": 50256, "embed_dropout": 0, "eos_token_id": 50256, "gradient_checkpointing": False,
        "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": None, "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neo", "num_heads": 12, "num_layers": 12,
        "resid_dropout": 0, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "transformers_version": "4.9.0.dev0",
        "use_cache": True, "vocab_size": 50257, "window_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = read_config(tmp_path / "config.json")
    assert isinstance(config, GPTNeoConfig)
    assert config.layer_windows == [None, 256] * 6 and config.ffn_dim == 3072 and config.head_dim == 64
    assert config.extra["summary_type"] == "cls_index"
    written = config.to_dict()
    assert {k: written[k] for k in hub} == hub
    assert config_from_name("EleutherAI/gpt-neo-125m") == GPTNeoConfig(**{k: hub[k] for k in (
        "hidden_size", "num_layers", "num_heads", "attention_types")})
    # the published sizes, from each repository's config.json
    for name, (d, layers, heads) in {"gpt-neo-1.3b": (2048, 24, 16), "gpt-neo-2.7b": (2560, 32, 20)}.items():
        c = config_from_name(name)
        assert (c.hidden_size, c.num_layers, c.num_heads, c.window_size, c.vocab_size) == (d, layers, heads, 256,
                                                                                           50257)
    defaults = transformers.GPTNeoConfig()
    ours = GPTNeoConfig()
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "window_size", "activation_function",
                  "layer_norm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id", "classifier_dropout",
                  "attention_types", "max_position_embeddings", "initializer_range"):
        assert getattr(ours, field) == getattr(defaults, field), field
    assert ours.attention_layers == defaults.attention_layers


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="describe 4 layers but num_layers is 6"):
        GPTNeoConfig(num_layers=6, attention_types=[[["global", "local"], 2]])
    with pytest.raises(ValueError, match="'sliding'"):
        GPTNeoConfig(num_layers=2, attention_types=[[["global", "sliding"], 1]])
    with pytest.raises(ValueError, match="num_heads"):
        GPTNeoConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown GPT-Neo size"):
        GPTNeoConfig.from_name("gpt-neo-20b")


def test_a_family_mismatch_names_both_families(tmp_path):
    build_pair(tmp_path)
    with pytest.raises(ValueError, match="holds a gpt_neo model; OPTForCausalLM loads opt checkpoints"):
        optlm.OPTForCausalLM.from_pretrained(tmp_path)


def test_quantized_int8_stays_close_and_saves_loads(tmp_path):
    _, ours = build_pair(tmp_path / "a", dtype=torch.float32, initializer_range=0.02)
    ids, _ = batch()
    with torch.no_grad():
        want = ours(ids).logits
        q = optlm.GPTNeoForCausalLM.from_pretrained(tmp_path / "a", quantize="int8")
        got = q(ids).logits
        q.save_pretrained(tmp_path / "q")
        back = optlm.AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert torch.equal(back, got)


def test_lora_with_peft_default_targets_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ref, ours = build_pair(tmp_path / "a", dtype=torch.float32)
    torch.manual_seed(1)
    lora = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert sorted({n.split(".")[-4] for n, _ in lora.named_parameters() if "lora_A" in n}) == ["q_proj", "v_proj"]
    lora.save_pretrained(tmp_path / "lora")
    ids, mask = batch()
    with torch.no_grad():
        want = lora(input_ids=ids, attention_mask=mask).logits
        got = PeftModel.from_pretrained(ours, tmp_path / "lora")(ids, attention_mask=mask).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


# ---- the command line on a GPT-Neo checkpoint (picked by its model_type) ----------------------------------------

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny GPT-Neo checkpoint saved by transformers with GPT-2's tokenizer files, as a hub repo has them."""
    directory = tmp_path_factory.mktemp("neo_text")
    torch.manual_seed(0)
    ref = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=50257, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=96, initializer_range=0.5)).eval()
    ref.save_pretrained(directory)
    transformers.GPT2Tokenizer(str(TOKENIZER_FILES / "gpt2" / "vocab.json"),
                               str(TOKENIZER_FILES / "gpt2" / "merges.txt")).save_pretrained(directory)
    return ref, directory


def test_cli_generate_eval_train_and_info_on_a_gpt_neo_checkpoint(text_model, tmp_path, capsys):
    from optlm import cli

    ref, directory = text_model
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    prompt = "The ship sailed past the lighthouse and the long grey"
    assert cli.main(["generate", prompt, "--model", str(directory), "--temperature", "0", "--max-new-tokens",
                     "24"]) == 0
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    assert tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True) in capsys.readouterr().out

    text = "It was the best of times, it was the worst of times, it was the age of wisdom and of foolishness. " * 3
    (tmp_path / "data.txt").write_text(text)
    assert cli.main(["eval", "--model", str(directory), "--data", str(tmp_path / "data.txt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    stream = tok(text, return_tensors="pt").input_ids  # no BOS for GPT-Neo: the document's own tokens
    stream = torch.cat([torch.tensor([[tok.eos_token_id]]), stream], 1)  # documents open with <|endoftext|>
    assert stream.shape[1] <= 96
    with torch.no_grad():
        loss = ref(stream, labels=stream).loss
    ppl = float(next(line for line in out.splitlines() if line.startswith("perplexity:")).split()[1])
    assert ppl == pytest.approx(torch.exp(loss).item(), rel=1e-5)  # float32 either side

    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(directory), "--data", str(tmp_path / "data.txt"), "--out", str(run),
                     "--block-size", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1",
                     "--quiet"]) == 0
    trained = transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoint-00000002")
    assert type(trained).__name__ == "GPTNeoForCausalLM"
    assert cli.main(["info", str(run / "checkpoint-00000002")]) == 0
    assert "model_type: gpt_neo" in capsys.readouterr().out


def test_training_from_a_gpt_neo_preset_builds_that_family(text_model, tmp_path):
    from optlm import cli

    _, directory = text_model
    (tmp_path / "data.txt").write_text("A small corpus of words, repeated. " * 40)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "gpt-neo-125m", "--tokenizer", str(directory), "--set", "hidden_size=32",
                     "--set", "num_layers=2", "--set", "num_heads=2", "--set", "max_position_embeddings=64",
                     "--data", str(tmp_path / "data.txt"), "--out", str(run), "--block-size", "16",
                     "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--quiet"]) == 0
    config = json.loads((run / "checkpoint-00000002" / "config.json").read_text())
    assert config["model_type"] == "gpt_neo" and config["attention_types"] == [[["global", "local"], 1]]
    assert config["vocab_size"] == 50264  # the tokenizer's 50257 entries padded to a multiple of 8


def test_the_benchmarks_gpt2_stand_in_computes_what_gpt_neo_does(tmp_path):
    """CTranslate2 cannot convert GPT-Neo, so ``optlm bench`` gives it the GPT-2 model that computes the same
    function within the local window; the comparison is only fair if that holds."""
    from optlm.benchmark import gpt2_equivalent

    torch.manual_seed(0)
    neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**{**TINY, "window_size": 32})).eval()
    neo.save_pretrained(tmp_path / "neo")
    gpt2 = transformers.GPT2LMHeadModel.from_pretrained(gpt2_equivalent(tmp_path / "neo")).eval()
    ids = torch.randint(3, TINY["vocab_size"], (2, 32))
    with torch.no_grad():
        assert (gpt2(ids).logits - neo(ids).logits).abs().max() <= 1e-4  # float32; q·k rounds differently


def test_classifier_training_on_gpt_neo_needs_a_pad_id_and_then_predicts(text_model, tmp_path, capsys):
    from optlm import cli
    from optlm.train.predict import load_classifier

    _, directory = text_model
    rows = [{"text": f"{word} " * (3 + i % 5), "label": label} for i in range(24)
            for word, label in (("ship sea", "sea"), ("barn cow", "farm"))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--task", "sequence-classification", "--model", str(directory), "--data",
            str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "run"), "--batch-size", "8", "--max-steps", "2",
            "--block-size", "64",
            "--warmup-steps", "1", "--quiet"]
    assert cli.main(argv) == 1
    assert "pad_token_id=50256" in capsys.readouterr().err  # GPT-Neo has no pad token: the fix is named
    assert cli.main([*argv, "--set", "pad_token_id=50256"]) == 0
    classifier = load_classifier(tmp_path / "run" / "checkpoint-00000002")
    assert isinstance(classifier.model, optlm.GPTNeoForSequenceClassification)
    ref = transformers.GPTNeoForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-00000002")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "checkpoint-00000002")
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    enc = tok(["ship sea ship", "barn cow barn cow barn"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = ref(**enc).logits
        got = classifier.model(enc.input_ids, attention_mask=enc.attention_mask).logits
    assert (want - got).abs().max() <= 1e-5
