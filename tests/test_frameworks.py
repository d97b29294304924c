"""OPT in JAX/Flax and TensorFlow (optlm.flax, optlm.tf) against transformers' PyTorch implementation.

Invariants:
- OPT's tensor list (optlm.models.opt.arch), which both ports build from, is the PyTorch module tree's.
- On random checkpoints saved by transformers (pre-LN, post-LN with projections as opt-350m, no bias / no
  affine norms, no final norm), each port's logits and hidden states equal transformers' (float32, <= 1e-5) on
  left-padded batches of uneven length, and decoding step by step through the cache equals the full pass.
- Greedy generation gives transformers' tokens, end-of-sequence handling included; seeded sampling repeats
  with its seed, and each port's sampler draws from the filtered softmax (chi-square, as for PyTorch).
- Weights saved by either port load in transformers with the same logits, bfloat16 included.
- A SavedModel exported by the TensorFlow port runs in a process that cannot import optlm, with the same
  logits and tokens.
- Bad input gets the PyTorch path's own errors: missing or mis-shaped tensors, an unknown dtype, too long a
  prompt, invalid decoding settings.
- Importing optlm imports neither framework; the ports run without torch; a missing framework names its extra.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers_frameworks as ports
import numpy as np
import pytest
import torch
import transformers
from conftest import CONFIGS, hf_config, left_padded_batch
from helpers_generate import CHI2_LOGITS, SAMPLING_CASES, assert_follows, filtered_softmax
from safetensors.torch import load_file, save_file

import optlm
from optlm.checkpoint import CheckpointError
from optlm.generation_config import ContextLengthError
from optlm.models.opt import arch

FRAMEWORKS = ("flax", "tf")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(optlm.__file__).parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random transformers checkpoints, one per tiny config, and their reference models (init_std 0.1, so
    logits are of order 1 and a 1e-5 tolerance means something)."""
    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            ref = transformers.OPTForCausalLM(hf_config(**CONFIGS[name], init_std=0.1)).eval()
            directory = tmp_path_factory.mktemp(name)
            ref.save_pretrained(directory)
            made[name] = directory, ref
        return made[name]

    return get


def test_tensor_list_is_the_pytorch_module_tree():
    for kw in CONFIGS.values():
        config = optlm.OPTConfig.from_dict(hf_config(**kw).to_dict())
        for cls, head in ((optlm.OPTModel, False), (optlm.OPTForCausalLM, True)):
            model = cls(config)
            assert arch.tensor_shapes(config, head) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_cached_decoding_equal_transformers(checkpoints, framework, name):
    directory, ref = checkpoints(name)
    ids, mask = left_padded_batch(lengths=(9, 4, 7))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.numpy()
        want_hidden = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(want).max() > 0.5  # logits of order 1: the tolerance below is meaningful
    lm = ports.causal_lm(framework).from_pretrained(directory)
    got = np.asarray(lm(ids.numpy(), mask.numpy()).logits)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    positions = (torch.cumsum(mask, 1) * mask - 1 + 3 * mask).long()  # explicit positions, 3 further on
    with torch.no_grad():
        moved = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm(ids.numpy(), mask.numpy(), position_ids=positions.numpy()).logits), moved,
                               rtol=0, atol=1e-5)
    assert np.abs(moved - want).max() > 1e-3  # the positions given are the ones used
    hidden = np.asarray(ports.base_model(framework).from_pretrained(directory)(ids.numpy(), mask.numpy())
                        .last_hidden_state)
    np.testing.assert_allclose(hidden, want_hidden, rtol=0, atol=1e-5)

    # Step by step: a 4-token prefill into a preallocated cache, then one token per call.
    out = lm(ids[:, :4].numpy(), mask[:, :4].numpy(), past_key_values=lm.init_cache(3, ids.shape[1]))
    steps = [np.asarray(out.logits)]
    for t in range(4, ids.shape[1]):
        out = lm(ids[:, t:t + 1].numpy(), mask[:, :t + 1].numpy(), past_key_values=out.past_key_values)
        steps.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=0, atol=1e-5)
    # A cache made by a call without one grows as it must, and keeps the padding it was given.
    first = lm(ids[:, :-1].numpy(), mask[:, :-1].numpy())
    last = lm(ids[:, -1:].numpy(), past_key_values=first.past_key_values)
    np.testing.assert_allclose(np.asarray(last.logits)[:, 0], want[:, -1], rtol=0, atol=1e-5)
    # It grows in steps of 64 slots: decoding on does not change its shape (and compile again) every token.
    assert first.past_key_values.capacity == last.past_key_values.capacity == 64


def test_greedy_tokens_equal_transformers_in_both_frameworks(checkpoints):
    directory, ref = checkpoints("post_ln_proj")
    ids, mask = left_padded_batch(lengths=(6, 3, 5), seed=1)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False).numpy()
    assert want.shape == (3, 6 + 32)
    # An end-of-sequence id that one row meets early: that row is padded after it, the others go on.
    eos = int(want[1, 6 + 3])
    with torch.no_grad():
        want_eos = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                eos_token_id=eos, pad_token_id=1).numpy()
    assert (want_eos[1, 6 + 4:] == 1).all()
    for framework in FRAMEWORKS:
        lm = ports.causal_lm(framework).from_pretrained(directory)
        np.testing.assert_array_equal(lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=32), want)
        np.testing.assert_array_equal(lm.generate(ids.numpy(), mask.numpy(), max_length=6 + 32), want)  # prompt + new
        np.testing.assert_array_equal(lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=32, eos_token_id=eos,
                                                  pad_token_id=1), want_eos)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_seeded_sampling_repeats_and_draws_from_the_filtered_softmax(checkpoints, framework):
    directory, _ = checkpoints("pre_ln")
    lm = ports.causal_lm(framework).from_pretrained(directory)
    ids, mask = left_padded_batch(lengths=(5, 3), seed=2)
    kw = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=12)
    a = lm.generate(ids.numpy(), mask.numpy(), seed=7, **kw)
    np.testing.assert_array_equal(a, lm.generate(ids.numpy(), mask.numpy(), seed=7, **kw))
    assert not np.array_equal(a, lm.generate(ids.numpy(), mask.numpy(), seed=8, **kw))

    # Through generate: the model's own next-token distribution, filtered as asked, over 4000 identical rows.
    prompt = np.array([[5, 9, 17, 30]])
    last = torch.tensor(np.asarray(lm(prompt).logits, dtype=np.float32)[0, -1])
    target, keep = filtered_softmax(last, 0.8, 5, 0.9)
    draws = lm.generate(np.tile(prompt, (4000, 1)), max_new_tokens=1, do_sample=True, temperature=0.8, top_k=5,
                        top_p=0.9, seed=1)[:, -1]
    assert_follows(draws, target, keep)
    greedy = lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    for same in (dict(top_k=1), dict(top_p=1e-9), dict(temperature=0.0)):  # each leaves one choice: greedy's
        np.testing.assert_array_equal(lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, do_sample=True,
                                                  seed=3, **same), greedy)

    for temperature, top_k, top_p in SAMPLING_CASES:
        target, keep = filtered_softmax(CHI2_LOGITS, temperature, top_k, top_p)
        draws = ports.draw(framework, CHI2_LOGITS.numpy(), 40_000, temperature, top_k, top_p, seed=0)
        assert_follows(draws, target, keep)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_saved_weights_load_in_transformers(checkpoints, framework, tmp_path):
    directory, ref = checkpoints("post_ln_proj")
    ids, mask = left_padded_batch()
    # Random initialisation, saved: transformers reads it and computes the port's logits.
    config = optlm.OPTConfig.from_json_file(directory / "config.json")
    fresh = ports.causal_lm(framework)(config, seed=3)
    fresh.save_pretrained(tmp_path / "fresh")
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "fresh").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(input_ids=ids, attention_mask=mask).logits.numpy(),
                                   np.asarray(fresh(ids.numpy(), mask.numpy()).logits), rtol=0, atol=1e-5)
    # bfloat16 round trip: loaded as bfloat16 and saved as bfloat16, exactly transformers' weights in bfloat16.
    lm = ports.causal_lm(framework).from_pretrained(directory, dtype="bfloat16")
    assert ports.dtype_name(lm) == "bfloat16"
    lm.save_pretrained(tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert torch.equal(stored["model.decoder.layers.0.fc1.weight"], ref.model.decoder.layers[0].fc1.weight.bfloat16())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_key_layouts_shards_pickles_and_an_untied_head_load(tmp_path):
    """The original hub uploads name tensors ``decoder.*``; a model may keep its own ``lm_head``; checkpoints
    come sharded, or as ``pytorch_model.bin``."""
    torch.manual_seed(1)
    ref = transformers.OPTForCausalLM(hf_config(tie_word_embeddings=False, init_std=0.1)).eval()
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hub = {k.removeprefix("model."): v for k, v in state.items()}
    hub["decoder.version"] = torch.tensor([3.0])  # fairseq bookkeeping some uploads carry: ignored, as in PyTorch
    save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.numpy()
    # The same weights sharded, and as a weights-only pickle (read through torch's weights-only loader).
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for framework in FRAMEWORKS:
        lm = ports.causal_lm(framework).from_pretrained(tmp_path)
        np.testing.assert_allclose(np.asarray(lm(ids.numpy(), mask.numpy()).logits), want, rtol=0, atol=1e-5)
        for other in ("sharded", "bin"):
            again = ports.causal_lm(framework).from_pretrained(tmp_path / other).state_arrays()
            assert again.keys() == lm.state_arrays().keys()
            assert all(np.array_equal(again[k], v) for k, v in lm.state_arrays().items())


def test_savedmodel_runs_without_optlm(checkpoints, tmp_path):
    directory, ref = checkpoints("pre_ln")
    lm = ports.causal_lm("tf").from_pretrained(directory)
    lm.export(tmp_path / "saved", max_new_tokens=10)
    ids, mask = left_padded_batch(lengths=(6, 4), seed=3)
    np.savez(tmp_path / "inputs.npz", ids=ids.numpy().astype(np.int32), mask=mask.numpy().astype(np.int32))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["optlm"] = None  # any import of optlm fails
        import numpy as np, tensorflow as tf
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        loaded = tf.saved_model.load({str(tmp_path / "saved")!r})
        ids, mask = tf.constant(inputs["ids"]), tf.constant(inputs["mask"])
        logits = loaded.signatures["serving_default"](input_ids=ids, attention_mask=mask)["logits"]
        out = loaded.signatures["generate"](input_ids=ids, attention_mask=mask, seed=tf.constant(0, tf.int64))
        np.savez({str(tmp_path / "outputs.npz")!r}, logits=logits.numpy(), sequences=out["sequences"].numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=ENV, timeout=300)
    outputs = np.load(tmp_path / "outputs.npz")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.numpy()
        tokens = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False).numpy()
    np.testing.assert_allclose(outputs["logits"], want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outputs["sequences"], tokens)


def _error(call) -> Exception:
    try:
        call()
    except Exception as e:  # noqa: BLE001 (the error itself is what is compared)
        return e
    raise AssertionError("no error raised")


def _same_error(a: Exception, b: Exception) -> None:
    assert type(a) is type(b) and str(a) == str(b), (a, b)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_gets_the_pytorch_errors(checkpoints, framework, tmp_path):
    directory, _ = checkpoints("pre_ln")
    cls = ports.causal_lm(framework)
    torch_cls = optlm.OPTForCausalLM
    # A checkpoint with a tensor missing and one mis-shaped.
    state = load_file(directory / "model.safetensors")
    del state["model.decoder.layers.1.fc2.bias"]
    state["model.decoder.layers.0.fc1.weight"] = state["model.decoder.layers.0.fc1.weight"][:, :-1].contiguous()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    e = _error(lambda: cls.from_pretrained(broken))
    assert isinstance(e, CheckpointError) and "layers.1.fc2.bias" in str(e) and "shape mismatch" in str(e)
    _same_error(e, _error(lambda: torch_cls.from_pretrained(broken)))
    # An unsupported dtype, another family's checkpoint, a directory without weights.
    _same_error(_error(lambda: cls.from_pretrained(directory, dtype="int8")),
                _error(lambda: torch_cls.from_pretrained(directory, dtype="int8")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((directory / "config.json").read_text())
    _same_error(_error(lambda: cls.from_pretrained(tmp_path / "empty")),
                _error(lambda: torch_cls.from_pretrained(tmp_path / "empty")))

    lm, ref = cls.from_pretrained(directory), torch_cls.from_pretrained(directory)
    limit = lm.config.max_position_embeddings
    long_prompt = np.full((1, limit - 5), 7)
    e = _error(lambda: lm.generate(long_prompt, max_new_tokens=10))
    assert isinstance(e, ContextLengthError)
    _same_error(e, _error(lambda: ref.generate(torch.as_tensor(long_prompt), max_new_tokens=10)))
    _same_error(_error(lambda: lm(np.full((1, limit + 1), 7))),
                _error(lambda: ref(torch.full((1, limit + 1), 7))))
    for bad in (dict(top_p=0.0, do_sample=True), dict(max_new_tokens=0), dict(temperature=-1.0),
                dict(max_new_tokens="3"), dict(no_such_option=1)):
        _same_error(_error(lambda bad=bad: lm.generate([[5, 6]], **bad)),
                    _error(lambda bad=bad: ref.generate(torch.tensor([[5, 6]]), **bad)))
    _same_error(_error(lambda: lm.generate([[5, 999]])), _error(lambda: ref.generate(torch.tensor([[5, 999]]))))
    e = _error(lambda: lm.generate([[5, 6]], num_beams=2))
    assert isinstance(e, ValueError) and "num_beams" in str(e) and "OPTForCausalLM" in str(e)


def test_imports_stay_apart(checkpoints, monkeypatch):
    """optlm imports no framework; each port runs with torch unimportable; a missing framework names its extra."""
    directory, ref = checkpoints("pre_ln")
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).tolist()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        import optlm
        optlm.OPTConfig
        assert not {{"jax", "flax", "tensorflow", "keras"}} & set(sys.modules), "optlm imported a framework"
        from optlm.flax import FlaxOPTForCausalLM
        from optlm.tf import TFOPTForCausalLM
        for cls in (FlaxOPTForCausalLM, TFOPTForCausalLM):
            tokens = cls.from_pretrained({str(directory)!r}).generate([[5, 6, 7]], max_new_tokens=4).tolist()
            assert tokens == {want!r}, (cls, tokens)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=ENV, timeout=300)
    for blocked, port, extra in (("jax", "optlm.flax", "optlm[flax]"), ("tensorflow", "optlm.tf", "optlm[tf]")):
        for name in [m for m in sys.modules if m == port or m.startswith(port + ".")]:
            monkeypatch.delitem(sys.modules, name)  # put back when the test ends
        monkeypatch.setitem(sys.modules, blocked, None)
        with pytest.raises(ImportError, match=re.escape(f'pip install "{extra}"')):
            importlib.import_module(port)


def test_the_benchmark_runs_each_port(checkpoints):
    """``optlm bench --framework``: the ports' engines make exactly the tokens asked for (no end-of-sequence
    stop), greedily, as the port's own generate does."""
    from optlm.benchmark import Result, engine_names, first_call_table, load_port

    assert engine_names(["fp32", "int8"], {}, ("torch", "flax", "tf")) == ["optlm fp32", "optlm int8", "flax fp32",
                                                                         "tf fp32"]
    directory, _ = checkpoints("pre_ln")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    for framework in FRAMEWORKS:
        tokens = load_port(framework, directory, "fp32", 1)(ids, 40)
        want = ports.causal_lm(framework).from_pretrained(directory).generate(ids.numpy(), max_new_tokens=40,
                                                                               eos_token_id=[])
        assert tokens == want[:, 3:].tolist() and len(tokens[0]) == 40
    r = Result("flax fp32", ttft=[1.0], full=[3.0], first=[2.5, 4.0])
    assert "| flax fp32 | 2.50 |" in first_call_table({"flax fp32": r})  # (2.5 - 1) + (4 - 3)
