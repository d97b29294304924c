"""Bad input gets a clear error, never a traceback; nothing is silently wrong.

Invariants: every case below, run through the real CLI (a subprocess) or the API, ends with a non-zero exit
status and one ``optlm COMMAND: error: ...`` line naming the input (or, where the run can go on, a one-line
warning); no Python traceback reaches the user. Generation arguments either work or raise ValueError /
TypeError naming the argument (a property test). Two trainers never share a run directory; a full disk ends
a run with the last good checkpoint named.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_generate import text_checkpoint
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from train_fixtures import tiny_config, tiny_tokenizer, write_corpus

import optlm

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def _optlm(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "optlm.cli", *args]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A good tiny checkpoint and damaged copies of it, a training corpus, tokenizer and config."""
    root = tmp_path_factory.mktemp("hardening")
    good = text_checkpoint(root / "good", max_position_embeddings=64)
    d = {"root": root, "good": good}

    def copy(name: str) -> Path:
        d[name] = root / name
        shutil.copytree(good, d[name])
        return d[name]

    (copy("config_list") / "config.json").write_text("[1, 2]")
    config = json.loads((good / "config.json").read_text())
    (copy("config_type") / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    (copy("bad_tokenizer") / "tokenizer.json").write_text("{not json")
    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    escape = copy("escape")
    (escape / "model.safetensors").rename(root / "outside.safetensors")
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../outside.safetensors"}}))
    link = copy("symlink_escape")
    (link / "model.safetensors").rename(root / "elsewhere.safetensors")
    (link / "model-00001-of-00001.safetensors").symlink_to(root / "elsewhere.safetensors")
    (link / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    (copy("no_config") / "config.json").unlink()
    nan_model = optlm.OPTForCausalLM.from_pretrained(good)
    with torch.no_grad():
        nan_model.model.decoder.layers[0].fc1.weight.fill_(float("nan"))
    nan_model.save_pretrained(copy("nan_weights"))
    d["corpus"] = write_corpus(root / "corpus", n_sentences=200)
    d["tokenizer"] = tiny_tokenizer(root)
    d["config"] = tiny_config(root)
    return d


def _train_argv(d: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(d["corpus"]), "--out", str(out), "--config", str(d["config"]), "--tokenizer",
            str(d["tokenizer"]), "--block-size", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps",
            "1", "--quiet", *extra]


# name: (argv built from the fixture dirs, stdin bytes, expected exit status, words the stderr must hold)
CASES = {
    "config_is_a_list": (lambda d: ["generate", "hi", "--model", d["config_list"]], None, 1,
                         ["config.json", "JSON object"]),
    "config_field_of_wrong_type": (lambda d: ["generate", "hi", "--model", d["config_type"]], None, 1,
                                   ["num_hidden_layers", "integer", "'two'"]),
    "corrupt_tokenizer_json": (lambda d: ["generate", "hi", "--model", d["bad_tokenizer"]], None, 1,
                               ["tokenizer.json", "not a valid"]),
    "info_on_truncated_weights": (lambda d: ["info", d["truncated"]], None, 1, ["model.safetensors", "truncated"]),
    "generate_on_truncated_weights": (lambda d: ["generate", "hi", "--model", d["truncated"]], None, 1,
                                      ["truncated"]),
    "shard_outside_the_directory": (lambda d: ["generate", "hi", "--model", d["escape"]], None, 1,
                                    ["outside the checkpoint directory", "../outside.safetensors"]),
    "shard_symlink_leading_out": (lambda d: ["generate", "hi", "--model", d["symlink_escape"]], None, 1,
                                  ["outside the checkpoint directory"]),
    "info_without_config": (lambda d: ["info", d["no_config"]], None, 1, ["has no config.json"]),
    "system_text_not_utf8": (lambda d: ["chat", "--model", d["good"], "--system", b"\xff"], b"hi\n", 1,
                             ["--system", "not UTF-8"]),
    "eval_batch_size_0": (lambda d: ["eval", "--model", d["good"], "--data", d["corpus"], "--batch-size", "0"],
                          None, 1, ["batch_size", "at least 1"]),
    "set_value_of_wrong_type": (lambda d: _train_argv(d, d["root"] / "r1", "--set", "hidden_size=abc"), None, 1,
                                ["hidden_size", "integer", "'abc'"]),
    "set_unknown_field": (lambda d: _train_argv(d, d["root"] / "r2", "--set", "bogus_field=3"), None, 1,
                          ["bogus_field", "not an OPT config field"]),
    "prompt_not_utf8": (lambda d: ["generate", b"caf\xe9", "--model", d["good"]], None, 1,
                        ["the prompt", "not UTF-8"]),
    "stdin_not_utf8": (lambda d: ["generate", "-", "--model", d["good"]], b"\xff\xfehello", 1,
                       ["standard input", "not UTF-8", "iconv"]),
    "chat_stdin_not_utf8": (lambda d: ["chat", "--model", d["good"], "--max-new-tokens", "2"], b"hi\n\xff\n", 1,
                            ["standard input", "not UTF-8"]),
    "device_cuda_without_gpu": (lambda d: ["generate", "hi", "--model", d["good"], "--device", "cuda"], None, 1,
                                ["'cuda'", "no CUDA GPU", "use cpu"]),
    "device_unknown": (lambda d: ["generate", "hi", "--model", d["good"], "--device", "tpu9"], None, 1,
                       ["'tpu9'", "cpu, cuda"]),
    "train_device_unknown": (lambda d: _train_argv(d, d["root"] / "r3", "--device", "tpu9"), None, 1, ["'tpu9'"]),
    "save_every_0": (lambda d: _train_argv(d, d["root"] / "r4", "--save-every", "0"), None, 1,
                     ["--save-every", "at least 1"]),
    "eval_every_0": (lambda d: _train_argv(d, d["root"] / "r5", "--eval-every", "0"), None, 1,
                     ["--eval-every", "at least 1"]),
    "log_every_0": (lambda d: _train_argv(d, d["root"] / "r6", "--log-every", "0"), None, 1,
                    ["--log-every", "at least 1"]),
    "temperature_nan": (lambda d: ["generate", "hi", "--model", d["good"], "--temperature", "nan"], None, 1,
                        ["temperature", "finite"]),
    "nan_weights_generate": (lambda d: ["generate", "hi", "--model", d["nan_weights"]], None, 1,
                             ["NaN or infinite logits"]),
    "nan_weights_eval": (lambda d: ["eval", "--model", d["nan_weights"], "--data", d["corpus"], "--quiet"], None, 1,
                         ["NaN or infinite"]),
    "max_new_tokens_beyond_context": (lambda d: ["generate", "hi", "--model", d["good"], "--max-new-tokens", "500",
                                                 "--temperature", "0"], None, 0,
                                      ["warning: max_new_tokens 500 does not fit", "at most 62"]),
    "resume_without_a_run": (lambda d: _train_argv(d, d["root"] / "r7", "--resume"), None, 0,
                             ["warning: --resume", "no checkpoint to continue from; starting a new run"]),
}


@pytest.fixture(scope="module")
def cli_results(dirs) -> dict[str, tuple[int, str, str]]:
    """Every CLI case at once (Python start-up dominates each), then (status, stdout, stderr) per case."""
    procs = {}
    for name, (argv, _, _, _) in CASES.items():
        args = [a if isinstance(a, bytes) else str(a) for a in argv(dirs)]
        procs[name] = subprocess.Popen(_optlm(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=ENV)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(CASES[name][1] or b"", timeout=600)
        results[name] = (proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_case(cli_results, name):
    status, out, err = cli_results[name]
    expected_status, words = CASES[name][2], CASES[name][3]
    assert "Traceback" not in err, err
    assert status == expected_status, err
    if expected_status != 0:
        last = err.strip().splitlines()[-1]
        assert last.startswith("optlm ") and " error: " in last, err
    for word in words:
        assert word in err, (word, err)


# ---- training: damaged state, two writers, a full disk -------------------------------------------------------

def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(_optlm(*argv), capture_output=True, text=True, env=ENV, timeout=600, **kwargs)


def test_resume_survives_a_cut_off_metrics_line_and_a_damaged_last_checkpoint(dirs, tmp_path):
    out = tmp_path / "run"
    first = _run(_train_argv(dirs, out, "--save-every", "1", "--keep-last", "0"))
    assert first.returncode == 0, first.stderr
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # a crash in the middle of a write
    (out / "checkpoint-00000002" / "trainer_state.json").write_text('{"step": 2, "elap')
    again = _run(_train_argv(dirs, out, "--save-every", "1", "--keep-last", "0", "--max-steps", "3", "--resume"))
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert "checkpoint-00000002 is damaged (trainer_state.json is unreadable" in again.stderr
    assert "resuming from checkpoint-00000001" in again.stderr
    assert "metrics.jsonl line" in again.stderr and "damaged" in again.stderr
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def test_resume_with_every_checkpoint_damaged_names_the_files(dirs, tmp_path):
    out = tmp_path / "run"
    assert _run(_train_argv(dirs, out, "--save-every", "1", "--keep-last", "0")).returncode == 0
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / "optimizer.safetensors").write_bytes(b"\0" * 10)
    again = _run(_train_argv(dirs, out, "--max-steps", "3", "--resume"))
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert "no intact checkpoint" in again.stderr and "optimizer.safetensors is unreadable" in again.stderr


def test_a_second_writer_is_refused_while_the_first_runs(dirs, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "OPTLM_TEST_SAVE_SLEEP": "30@1"}  # the first run sits inside its first save
    first = subprocess.Popen(_optlm(*_train_argv(dirs, out, "--save-every", "1")), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env=env, text=True)
    try:
        deadline = 120
        import time

        start = time.monotonic()
        while not list(out.glob(".tmp-checkpoint-*")):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() - start < deadline
            time.sleep(0.05)
        second = _run(_train_argv(dirs, out, "--resume"))
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"is in use by another optlm train (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder: a killed run's directory can be resumed at once.
    third = _run(_train_argv(dirs, out, "--resume"))
    assert third.returncode == 0, third.stderr


def test_a_full_disk_ends_the_run_naming_the_last_good_checkpoint(dirs, tmp_path):
    out = tmp_path / "run"
    ok = _run(_train_argv(dirs, out, "--save-every", "1"))  # also fills the token cache
    assert ok.returncode == 0, ok.stderr
    ckpt_bytes = max(f.stat().st_size for f in (out / "checkpoint-00000002").iterdir())
    limit = ckpt_bytes // 2  # every checkpoint's largest file is now too big to write

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = _run(_train_argv(dirs, out, "--save-every", "1", "--max-steps", "4", "--resume"), preexec_fn=small_files)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert "could not write the checkpoint of step 3" in full.stderr
    assert "the last complete checkpoint is checkpoint-00000002; --resume continues from it" in full.stderr
    assert not list(out.glob(".tmp-*"))  # no half-written checkpoint left behind
    resumed = _run(_train_argv(dirs, out, "--save-every", "1", "--max-steps", "4", "--resume"))
    assert resumed.returncode == 0, resumed.stderr


# ---- the Python API ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(dirs):
    return optlm.load(dirs["good"])


@pytest.mark.parametrize("call,kind,words", [
    (lambda lm: lm.generate([]), ValueError, ["no prompts"]),
    (lambda lm: lm.generate(["ok", 3]), TypeError, ["prompt 1", "string"]),
    (lambda lm: lm.generate("a\ud800b"), ValueError, ["prompt 0", "not valid Unicode", "'\\ud800'"]),
    (lambda lm: lm.chat([{"role": "user", "content": None}]), TypeError, ["message 0 content", "string"]),
    (lambda lm: lm.chat([]), ValueError, ["messages is empty"]),
    (lambda lm: lm.generate("hi", eos_token_id=-1), ValueError, ["eos_token_id", ">= 0"]),
    (lambda lm: lm.generate("hi", min_new_tokens=9, max_new_tokens=4), ValueError, ["min_new_tokens (9)"]),
    (lambda lm: lm.generate("hi", temperature=float("nan")), TypeError, ["temperature", "finite"]),
    (lambda lm: lm.model.generate(torch.tensor([[5, 99999]])), ValueError, ["input_ids", "vocab_size"]),
    (lambda lm: lm.model.generate([]), TypeError, ["input_ids", "non-empty"]),
    (lambda lm: lm.model(torch.tensor([[5, -1]])), ValueError, ["input_ids", "vocab_size"]),
    (lambda lm: lm.model(torch.tensor([[0.5, 2.0]])), ValueError, ["input_ids", "token ids"]),
    (lambda lm: optlm.OPTForCausalLM.from_pretrained(lm.model.config and "/nonexistent/x"), ValueError,
     ["does not exist"]),
])
def test_api_case(lm, call, kind, words):
    with pytest.raises(kind) as info:
        call(lm)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=3), st.lists(st.integers(-2, 5), max_size=2))
_ARGS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
         "no_repeat_ngram_size", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
         "penalty_alpha", "eos_token_id", "pad_token_id", "stop_strings", "seed")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_ARGS), _VALUES, max_size=4))
@example({"temperature": 5.5e-285})  # crashes found by this test once, kept as regression cases
@example({"repetition_penalty": 2.8e-114, "do_sample": True})
@example({"num_beams": 2, "length_penalty": 41})
@example({"temperature": ""})
def test_any_generation_arguments_run_or_fail_naming_the_argument(lm, kwargs):
    kwargs.setdefault("max_new_tokens", 3)
    try:
        lm.generate(["Hello there", "Hi"], **kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert any(name in message for name in kwargs), (kwargs, message)


def test_a_closed_pipe_ends_generation_quietly(dirs):
    proc = subprocess.Popen(_optlm("generate", "hi", "--model", str(dirs["good"]), "--max-new-tokens", "60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.read(1)
    proc.stdout.close()  # what `| head -c 1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "error" not in err, err
