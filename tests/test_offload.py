"""Streaming decoder layers from the checkpoint (optlm.parallel.offload). Invariants:

- a streamed model computes what the model loaded whole computes, bit for bit (OPT pre-LN from a sharded
  checkpoint, OPT post-LN with projections, GPT-Neo; windows of 2 and 3 layers; left-padded batches, cached
  decoding), and generates transformers' greedy tokens; the paged engine (LLM) runs it with the same tokens;
- the decoder layers' weights live in ``window`` slots only; each pass reads every layer once (plus the next
  pass's first layer, read ahead); a float16 checkpoint streams into float32 slots;
- ``max_memory`` keeps as many layers as fit, loads a model that fits whole as usual, and refuses a budget
  below two layers naming the sizes; `optlm generate --offload` prints the text of the whole model;
- resident memory stays at the window: a model whose layers take ~600 MB generates with a peak RSS ~100 MB
  above the process's start where the whole model adds ~600 MB (slow: the opt-1.3b shape, ~5.3 GB, under
  1.5 GB in all);
- what it cannot do is refused in one line: .bin weights, quantization, saving, a window under 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TOKENIZER_FILES, hf_config, left_padded_batch
from helpers_generate import text_checkpoint

import optlm
from optlm.checkpoint import CheckpointError
from optlm.cli import main
from optlm.parallel.offload import window_for

LAYERS = 5


def _opt(directory: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = hf_config(num_hidden_layers=LAYERS, **overrides)
    transformers.OPTForCausalLM(config).eval().save_pretrained(directory, max_shard_size="40KB")
    return directory


def _neo(directory: Path) -> Path:
    torch.manual_seed(1)
    config = transformers.GPTNeoConfig(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4,
                                       max_position_embeddings=64, attention_types=[[["global", "local"], 2]],
                                       window_size=4, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    transformers.GPTNeoForCausalLM(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return {"pre_ln": _opt(root / "pre_ln"),
            "post_ln_proj": _opt(root / "post_ln_proj", 1, do_layer_norm_before=False, word_embed_proj_dim=16),
            "gpt_neo": _neo(root / "gpt_neo")}


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj", "gpt_neo"])
@pytest.mark.parametrize("window", [2, 3])
def test_streamed_model_computes_what_the_whole_model_does(checkpoints, name, window):
    path = checkpoints[name]
    # bit for bit against the plain modules (a streamed model runs them; fast=True would route matmuls elsewhere)
    whole = optlm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    streamed = optlm.AutoModelForCausalLM.from_pretrained(path, offload=window)
    layers = streamed.get_decoder().layers
    assert streamed.offload is not None and len(streamed.offload.slots) == window
    ids, mask = left_padded_batch()
    with torch.no_grad():
        for _ in range(2):  # a second pass starts from the layers read ahead
            assert torch.equal(streamed(ids, attention_mask=mask).logits, whole(ids, attention_mask=mask).logits)
        # cached decoding, one token at a time after the prompt
        a = streamed(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        b = whole(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        for t in range(6, ids.shape[1]):
            a = streamed(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=a.past_key_values,
                         use_cache=True)
            b = whole(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=b.past_key_values,
                      use_cache=True)
            assert torch.equal(a.logits, b.logits)
    storages = {p.untyped_storage().data_ptr() for p in layers.parameters()}
    assert storages <= {s.untyped_storage().data_ptr() for s in streamed.offload.slots}
    assert not any(p.requires_grad for p in streamed.parameters())


def test_each_pass_reads_every_layer_once_and_the_next_first_layer_ahead(checkpoints):
    streamed = optlm.AutoModelForCausalLM.from_pretrained(checkpoints["pre_ln"], offload=True)
    ids = torch.randint(4, 128, (1, 8))
    with torch.no_grad():
        streamed(ids)
        assert streamed.offload.reads == LAYERS + 1
        streamed(ids)
        assert streamed.offload.reads == 2 * LAYERS + 1


def test_greedy_tokens_equal_transformers_and_the_engine_runs_a_streamed_model(checkpoints):
    path = checkpoints["pre_ln"]
    ref = transformers.OPTForCausalLM.from_pretrained(path).eval()
    streamed = optlm.AutoModelForCausalLM.from_pretrained(path, offload=True)
    prompt = torch.tensor([[2, 45, 67, 89, 12, 33]])
    expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(streamed.generate(prompt, max_new_tokens=12, do_sample=False), expected)
    tok = optlm.Tokenizer.from_pretrained(TOKENIZER_FILES / "opt")
    prompts = [[2, 45, 67, 89], [2, 11, 12, 13, 14, 15, 16], [2, 99]]
    params = optlm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = optlm.LLM(optlm.AutoModelForCausalLM.from_pretrained(path), tok, kv_cache_memory=1 << 20)
    llm = optlm.LLM(streamed, tok, kv_cache_memory=1 << 20)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in whole.generate(prompts, params, use_tqdm=False)]
    assert got == want and all(len(t) == 8 for t in got)


def test_a_float16_checkpoint_streams_into_float32(tmp_path):
    path = _opt(tmp_path / "fp16")
    model = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float16)
    model.save_pretrained(tmp_path / "half")
    whole = optlm.AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32, fast=False)
    streamed = optlm.AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32, offload=True)
    assert streamed.offload.slots[0].dtype == torch.float32
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(streamed(ids, attention_mask=mask).logits, whole(ids, attention_mask=mask).logits)
    lm = optlm.load(tmp_path / "half", offload=True, tokenizer=TOKENIZER_FILES / "opt")  # load(): fp16 -> fp32
    assert lm.model.dtype == torch.float32 and lm.model.offload is not None
    lm = optlm.load(tmp_path / "half", offload=True, device=torch.device("cpu"), tokenizer=TOKENIZER_FILES / "opt")
    assert lm.model.dtype == torch.float32 and lm.model.offload.slots[0].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(lm.model(ids, attention_mask=mask).logits, whole(ids, attention_mask=mask).logits)


def test_max_memory_keeps_the_layers_that_fit(checkpoints):
    path = checkpoints["pre_ln"]
    config = optlm.OPTConfig.from_json_file(path / "config.json")
    layer = 4 * 32 * 32 + 4 * 32 + 2 * 32 * 64 + 64 + 32 + 2 * 2 * 32  # q, k, v, out; fc1, fc2; 2 norms
    per_layer = layer * 4
    rest = (128 * 32 + 66 * 32 + 2 * 32) * 4  # embeddings, positions (64 + OPT's offset 2), final norm
    assert window_for(rest + 3 * per_layer + 100, optlm.OPTForCausalLM, config, torch.float32) == 3
    streamed = optlm.AutoModelForCausalLM.from_pretrained(path, max_memory={"cpu": rest + 3 * per_layer})
    assert len(streamed.offload.slots) == 3
    whole = optlm.AutoModelForCausalLM.from_pretrained(path, max_memory="1GB")
    assert getattr(whole, "offload", None) is None
    with pytest.raises(ValueError, match=r"too small: the embeddings, head and norms take"):
        optlm.AutoModelForCausalLM.from_pretrained(path, max_memory=rest + per_layer)


def test_generate_with_offload_prints_the_whole_models_text(tmp_path, capsys):
    path = text_checkpoint(tmp_path / "m", num_hidden_layers=4)
    base = ["generate", "The old house", "--model", str(path), "--temperature", "0", "--max-new-tokens", "12",
            "--no-stream"]
    assert main(base) == 0
    whole = capsys.readouterr().out
    assert main([*base, "--offload"]) == 0
    assert capsys.readouterr().out == whole
    # the embeddings and positions (6.45 MB) and 2 of the 4 layers (34 kB each)
    assert main([*base, "--max-memory", "6540000"]) == 0
    assert capsys.readouterr().out == whole


def test_what_streaming_cannot_do_is_refused(checkpoints, tmp_path):
    path = checkpoints["pre_ln"]
    with pytest.raises(ValueError, match="at least 2 layers"):
        optlm.AutoModelForCausalLM.from_pretrained(path, offload=1)
    with pytest.raises(ValueError, match="does not combine with quantization"):
        optlm.AutoModelForCausalLM.from_pretrained(path, offload=True, quantize="int8")
    streamed = optlm.AutoModelForCausalLM.from_pretrained(path, offload=True)
    with pytest.raises(ValueError, match="streams its layers from its checkpoint"):
        streamed.save_pretrained(tmp_path / "saved")
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(hf_config(num_hidden_layers=3))
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="streaming layers reads safetensors files"):
        optlm.AutoModelForCausalLM.from_pretrained(tmp_path / "bin", offload=True)
    # a file cut short after loading began is named when the layer is read
    (tmp_path / "cut").mkdir()
    for f in path.iterdir():
        (tmp_path / "cut" / f.name).write_bytes(f.read_bytes())
    streamed = optlm.AutoModelForCausalLM.from_pretrained(tmp_path / "cut", offload=True)
    index = json.loads((tmp_path / "cut" / "model.safetensors.index.json").read_text())
    last = tmp_path / "cut" / index["weight_map"]["model.decoder.layers.4.fc2.weight"]
    whole = last.read_bytes()
    last.write_bytes(whole[:-64])
    with pytest.raises(CheckpointError, match="ended early"), torch.no_grad():
        streamed(torch.tensor([[2, 5, 6]]))
    last.write_bytes(whole)  # mended: the next pass reads the layer again instead of repeating the old error
    reference = optlm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    with torch.no_grad():
        assert torch.equal(streamed(torch.tensor([[2, 5, 6]])).logits, reference(torch.tensor([[2, 5, 6]])).logits)


# ---- resident memory ---------------------------------------------------------------------------------------

CHILD = r"""
import json, sys, time
import torch
import optlm
torch.set_num_threads(2)
def status(field):  # VmRSS: resident now; VmHWM: the peak of this program (ru_maxrss would count the forked parent)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024
def rss():
    return status("VmRSS")
path, offload, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
start = rss()
model = optlm.AutoModelForCausalLM.from_pretrained(path, offload=offload)
ids = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]])
t = time.perf_counter()
out = model.generate(ids, max_new_tokens=n, do_sample=False)
seconds = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({"tokens": out[0].tolist(), "start": start, "peak": peak, "seconds": seconds}))
"""


def _measure(path: Path, offload: bool, new_tokens: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if offload else "0", str(new_tokens)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _random_checkpoint(path: Path, **shape) -> int:
    """A random-weight transformers checkpoint; returns the bytes of its decoder layers."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(**shape)
    with torch.device("meta"):
        layer_params = sum(p.numel() for p in transformers.OPTForCausalLM(config).model.decoder.layers.parameters())
    transformers.OPTForCausalLM(config).save_pretrained(path)
    return layer_params * 4


def test_resident_memory_stays_at_the_window(tmp_path):
    layers = _random_checkpoint(tmp_path / "m", vocab_size=1000, hidden_size=1024, ffn_dim=4096, num_hidden_layers=12,
                                num_attention_heads=16, max_position_embeddings=128)
    assert 550e6 < layers < 650e6
    whole, streamed = _measure(tmp_path / "m", False, 4), _measure(tmp_path / "m", True, 4)
    assert streamed["tokens"] == whole["tokens"]
    assert whole["peak"] - whole["start"] > 0.9 * layers  # the test can tell: the whole model is resident there
    assert streamed["peak"] - streamed["start"] < 0.25 * layers, streamed  # two 50 MB slots and the rest


@pytest.mark.slow
def test_opt_1_3b_shape_streams_under_1_5_gb(tmp_path):
    _random_checkpoint(tmp_path / "m", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                       num_attention_heads=32, max_position_embeddings=2048)
    size = sum(f.stat().st_size for f in (tmp_path / "m").glob("*.safetensors"))
    assert size > 5.0e9
    streamed = _measure(tmp_path / "m", True, 8)
    whole = _measure(tmp_path / "m", False, 8)
    assert streamed["tokens"] == whole["tokens"]
    assert streamed["peak"] < 1.5 * 2**30, streamed
    print(f"\nopt-1.3b shape, {size / 1e9:.2f} GB: peak RSS {streamed['peak'] / 2**30:.2f} GiB streamed, "
          f"{whole['peak'] / 2**30:.2f} GiB whole; 8 tokens in {streamed['seconds']:.1f} s vs {whole['seconds']:.1f} s")
