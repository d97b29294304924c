"""FSDP training (optlm.parallel.fsdp through optlm.train). Invariants, on gloo with CPU processes:

- two ranks taking half of the same global batch each repeat the single-process run: losses, validation and
  the saved weights within float32 rounding (<= 1e-5), for causal-LM and sequence classification, with
  gradient accumulation; the checkpoint is an ordinary HF directory that transformers loads with our logits;
- a run resumes on a different number of ranks (2 -> 1, 1 -> 2) with the uninterrupted run's losses: each
  rank reads the optimizer rows it now holds from the files the other layout wrote;
- a torchrun run SIGKILLed after a checkpoint and resumed under torchrun repeats the uninterrupted run's losses
  exactly (same ranks: each restores its own RNG, so dropout streams continue too);
- activation checkpointing changes nothing; bf16 (gathered and computed in bf16) tracks the fp32 run;
- wrong use is refused in one line: --fsdp outside torchrun, with an adapter, or resumed with another global
  batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from train_fixtures import tiny_config, tiny_tokenizer, write_corpus, write_rows

import optlm
from optlm.parallel import run
from optlm.train import TrainArgs, TrainingError, train

STEPS = 6


def _args(setup: dict, out: Path, **kw) -> TrainArgs:
    base = dict(data=[str(setup["data"])], out_dir=str(out), config=str(setup["config"]),
                tokenizer=str(setup["tokenizer"]), block_size=32, batch_size=4, grad_accum=2, max_steps=STEPS,
                warmup_steps=2, lr=3e-3, eval_every=3, eval_batches=2, save_every=3, log_every=1, progress=False,
                dropout=0.0, dtype="fp32")
    return TrainArgs(**{**base, **kw})


def _classifier_args(setup: dict, out: Path, **kw) -> TrainArgs:
    return _args(setup, out, **{"task": "sequence-classification", "data": [str(setup["rows"])],
                                "val_data": [str(setup["val_rows"])], "batch_size": 8, "grad_accum": 1, **kw})


def _ranks(rank: int, world: int, runs: list[tuple[str, str, dict, dict]], report: str) -> None:
    """Each (label, kind, setup, arguments) in turn, in every rank; a run's error is reported under its label."""
    errors = {}
    for label, kind, setup, kw in runs:
        make = _classifier_args if kind == "classify" else _args
        try:
            train(make(setup, **kw))
        except (TrainingError, ValueError) as e:
            errors[label] = f"{type(e).__name__}: {e}"
    if rank == 0:
        Path(report).write_text(json.dumps(errors))


def _in_ranks(world: int, runs: list, tmp: Path) -> dict[str, str]:
    report = tmp / f"report-{time.monotonic_ns()}.json"
    run(_ranks, world, runs, str(report))
    return json.loads(report.read_text())


def losses(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


def close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    neo = root / "gpt-neo.json"
    neo.write_text(json.dumps(dict(model_type="gpt_neo", hidden_size=32, num_layers=2, num_heads=4,
                                   attention_types=[[["global", "local"], 1]], window_size=8,
                                   max_position_embeddings=64, embed_dropout=0.0, attention_dropout=0.0,
                                   resid_dropout=0.0)))
    return {"root": root, "data": write_corpus(root, n_sentences=600), "tokenizer": tiny_tokenizer(root),
            "config": tiny_config(root), "rows": write_rows(root / "rows.jsonl", 96, 0),
            "val_rows": write_rows(root / "val.jsonl", 24, 1), "neo": neo}


@pytest.fixture(scope="module")
def runs(setup):
    """The single-process references, then every sharded run, in three starts of the ranks."""
    root = setup["root"]
    s = {k: str(v) for k, v in setup.items()}
    train(_args(s, root / "single"))
    train(_classifier_args(s, root / "single-cls"))
    train(_args(s, root / "single-bf16", dtype="bf16", max_steps=3))
    train(_args(s, root / "single-neo", config=s["neo"]))
    errors = _in_ranks(2, [
        ("two", "lm", s, dict(out=root / "two", batch_size=2, fsdp=True)),
        ("two-cls", "classify", s, dict(out=root / "two-cls", batch_size=4, fsdp=True)),
        ("two-then-one", "lm", s, dict(out=root / "two-then-one", batch_size=2, fsdp=True, stop_after=3)),
        ("two-ckpt", "lm", s, dict(out=root / "two-ckpt", batch_size=2, fsdp=True, gradient_checkpointing=True,
                                   max_steps=3)),
        ("two-bf16", "lm", s, dict(out=root / "two-bf16", batch_size=2, fsdp=True, dtype="bf16", max_steps=3)),
        ("two-neo", "lm", s, dict(out=root / "two-neo", batch_size=2, fsdp=True, config=s["neo"])),
    ], root)
    errors |= _in_ranks(1, [
        ("two-then-one resumed", "lm", s, dict(out=root / "two-then-one", batch_size=4, fsdp=True, resume=True)),
        ("one-then-two", "lm", s, dict(out=root / "one-then-two", batch_size=4, fsdp=True, stop_after=3)),
        ("global batch 2", "lm", s, dict(out=root / "one-then-two", batch_size=2, fsdp=True, resume=True)),
        ("layerdrop", "lm", s, dict(out=root / "layerdrop", fsdp=True, config_overrides={"layerdrop": 0.1})),
    ], root)
    errors |= _in_ranks(2, [("one-then-two resumed", "lm", s, dict(out=root / "one-then-two", batch_size=2,
                                                                   fsdp=True, resume=True))], root)
    return root, errors


def test_two_ranks_repeat_the_single_process_run(runs):
    root, errors = runs
    assert "two" not in errors, errors
    single, two = losses(root / "single"), losses(root / "two")
    assert len(single[0]) == STEPS and len(single[1]) == 2
    assert close(single[0], two[0]) and close(single[1], two[1]), (single, two)
    a = load_file(root / "single" / "checkpoint-00000006" / "model.safetensors")
    b = load_file(root / "two" / "checkpoint-00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    shards = sorted(p.name for p in (root / "two" / "checkpoint-00000006").glob("*-of-*"))
    assert shards == ["optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors",
                      "rng-00000-of-00002.safetensors", "rng-00001-of-00002.safetensors"]


def test_sharded_gpt_neo_repeats_the_single_process_run(runs):
    root, errors = runs
    assert "two-neo" not in errors, errors
    single, two = losses(root / "single-neo"), losses(root / "two-neo")
    assert len(single[0]) == STEPS and close(single[0], two[0]) and close(single[1], two[1]), (single, two)
    config = json.loads((root / "two-neo" / "checkpoint-00000006" / "config.json").read_text())
    assert config["model_type"] == "gpt_neo"


def test_a_sharded_classifier_repeats_the_single_process_run(runs):
    root, errors = runs
    assert "two-cls" not in errors, errors
    single = [json.loads(x) for x in (root / "single-cls" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (root / "two-cls" / "metrics.jsonl").read_text().splitlines()]
    assert [r.keys() for r in single] == [r.keys() for r in two]
    for r, q in zip(single, two, strict=True):
        for k, v in r.items():
            if isinstance(v, float) and k not in ("tokens_per_s", "elapsed_s"):
                assert abs(v - q[k]) <= 1e-5, (k, v, q[k])


def test_the_sharded_checkpoint_loads_in_transformers_with_our_logits(runs):
    root, _ = runs
    ckpt = root / "two" / "checkpoint-00000006"
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = optlm.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_a_run_resumes_on_another_number_of_ranks(runs):
    root, errors = runs
    single = losses(root / "single")
    for name in ("two-then-one", "one-then-two"):
        assert {name, f"{name} resumed"}.isdisjoint(errors), errors
        assert close(single[0], losses(root / name)[0]) and close(single[1], losses(root / name)[1]), name
    state = json.loads((root / "one-then-two" / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["optimizer"] == {"world_size": 2}


def test_activation_checkpointing_and_bf16_under_fsdp(runs):
    root, errors = runs
    assert {"two-ckpt", "two-bf16"}.isdisjoint(errors), errors
    single, single_bf16 = losses(root / "single")[0], losses(root / "single-bf16")[0]
    assert close({k: v for k, v in single.items() if k <= 3}, losses(root / "two-ckpt")[0])
    bf16 = losses(root / "two-bf16")[0]
    # bf16 weights and activations: within bf16's rounding of the fp32 run, as the single-process bf16 run is.
    assert bf16.keys() == single_bf16.keys()
    for k in bf16:
        assert abs(bf16[k] - single[k]) <= 0.05 and abs(single_bf16[k] - single[k]) <= 0.05
    assert any(bf16[k] != single[k] for k in bf16)  # it did compute in bf16


def test_another_global_batch_on_resume_and_layerdrop_are_refused(runs):
    _, errors = runs
    # one rank resuming with --batch-size 2: a global batch of 2 where the run has 4
    assert errors.keys() == {"global batch 2", "layerdrop"}, errors
    # LayerDrop would skip a sharded layer on one rank and run it on another
    assert errors["layerdrop"].startswith("ValueError: LayerDrop skips layers at random on each rank")
    assert "global_batch_size: 4 in the run, 2 now" in errors["global batch 2"]
    assert errors["global batch 2"].startswith("TrainingError")


def test_fsdp_outside_torchrun_or_with_an_adapter_is_refused(setup, tmp_path, monkeypatch):
    s = {k: str(v) for k, v in setup.items()}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N --no-python optlm train"):
        train(_args(s, tmp_path / "a", fsdp=True))
    with pytest.raises(ValueError, match="--fsdp shards a model trained in full"):
        train(_args(s, tmp_path / "b", fsdp=True, model=str(tmp_path), config=None, adapter={"peft_type": "LORA"}))


def _torchrun(setup: dict, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "optlm.cli", "train",
            "--data", str(setup["data"]), "--out", str(out), "--config", str(setup["config"]),
            "--tokenizer", str(setup["tokenizer"]), "--block-size", "32", "--batch-size", "2",
            "--max-steps", "8", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "4", "--eval-batches", "2",
            "--save-every", "2", "--log-every", "1", "--dtype", "fp32", "--quiet", "--fsdp", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill reaches every rank


def test_torchrun_run_killed_and_resumed_repeats_the_straight_run(setup, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p_straight, p_killed = _torchrun(setup, straight), _torchrun(setup, killed)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-00000004" / "trainer_state.json").is_file():
        assert p_killed.poll() is None, p_killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.01)
    os.killpg(p_killed.pid, signal.SIGKILL)  # torchrun and both ranks at once, as a lost machine
    p_killed.wait()
    out, err = p_straight.communicate(timeout=300)
    assert p_straight.returncode == 0, err[-3000:]
    assert out.count("checkpoint:") == 1  # rank 0 reports for both
    resumed = _torchrun(setup, killed, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    a, b = losses(straight), losses(killed)
    assert len(a[0]) == 8 and a == b  # dropout 0.1 (the config's): each rank's stream resumes where it was
