"""The trainer: loss falls, exact resume after SIGKILL (mid-training and mid-checkpoint-write), checkpoints that
transformers loads with identical logits, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_config, tiny_tokenizer, write_corpus

from optlm import OPTForCausalLM
from optlm.cli import main
from optlm.train import SAVE_SLEEP_ENV, TrainArgs, TrainingError, list_checkpoints, lr_at, make_optimizer, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "data": write_corpus(root, n_sentences=600), "tokenizer": tiny_tokenizer(root),
            "config": tiny_config(root)}


def args_for(setup, out: Path, **kw) -> TrainArgs:
    base = dict(data=[str(setup["data"])], out_dir=str(out), config=str(setup["config"]),
                tokenizer=str(setup["tokenizer"]), block_size=32, batch_size=4, max_steps=30, warmup_steps=5,
                lr=3e-3, eval_every=10, eval_batches=2, save_every=10, log_every=1, progress=False)
    return TrainArgs(**{**base, **kw})


def cli_args(setup, out: Path, max_steps: int, *extra: str) -> list[str]:
    return ["train", "--data", str(setup["data"]), "--out", str(out), "--config", str(setup["config"]),
            "--tokenizer", str(setup["tokenizer"]), "--block-size", "32", "--batch-size", "4", "--grad-accum", "2",
            "--max-steps", str(max_steps), "--warmup-steps", "5", "--lr", "3e-3", "--eval-every", "7",
            "--eval-batches", "2", "--save-every", "5", "--keep-last", "2", "--log-every", "1", "--quiet", *extra]


def losses(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    val_loss = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert len(train_loss) == sum("loss" in r for r in records)  # no step logged twice
    return train_loss, val_loss


def spawn(argv: list[str], **env: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "optlm.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_checkpoints_readable(out: Path) -> None:
    for ckpt in list_checkpoints(out):
        OPTForCausalLM.from_pretrained(ckpt)
        json.loads((ckpt / "trainer_state.json").read_text())
    assert all((c / "optimizer.safetensors").is_file() for c in out.glob("checkpoint-*"))


def test_loss_falls_and_outputs(setup, tmp_path):
    result = train(args_for(setup, tmp_path / "run"))
    train_loss, val_loss = losses(tmp_path / "run")
    first = sum(train_loss[s] for s in range(1, 4)) / 3
    last = sum(train_loss[s] for s in range(28, 31)) / 3
    assert last < first - 1.0, (first, last)
    assert val_loss[30] < val_loss[10]
    assert result.step == 30 and result.checkpoint.name == "checkpoint-00000030"
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [f"checkpoint-000000{s}" for s in (10, 20, 30)]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(record)


def test_resume_after_sigkill_repeats_the_uninterrupted_run(setup, tmp_path):
    steps = 24
    ref, killed, killed_in_save = tmp_path / "ref", tmp_path / "killed", tmp_path / "killed-in-save"
    # Three runs side by side (subprocess start-up dominates): the reference, one SIGKILLed in the middle of
    # training (some steps past a checkpoint), one SIGKILLed while writing the step-15 checkpoint (the test
    # hook sleeps inside that save).
    p_ref = spawn(cli_args(setup, ref, steps))
    p_killed = spawn(cli_args(setup, killed, steps))
    p_in_save = spawn(cli_args(setup, killed_in_save, steps), **{SAVE_SLEEP_ENV: "60@15"})
    kill_when(p_killed, lambda: (killed / "metrics.jsonl").is_file() and len(losses_safe(killed)) >= 13)
    kill_when(p_in_save, lambda: (killed_in_save / ".tmp-checkpoint-00000015" / "model.safetensors").is_file())
    _, err = p_ref.communicate(timeout=300)
    assert p_ref.returncode == 0, err.decode()
    expected = losses(ref)
    assert len(expected[0]) == steps

    assert len(losses_safe(killed)) < steps
    assert [c.name for c in list_checkpoints(killed_in_save)] == ["checkpoint-00000005", "checkpoint-00000010"]
    for out in (killed, killed_in_save):
        assert_checkpoints_readable(out)
    resumed = [spawn(cli_args(setup, out, steps, "--resume")) for out in (killed, killed_in_save)]
    for p in resumed:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()

    assert losses(killed) == expected
    assert losses(killed_in_save) == expected
    assert not list(killed_in_save.glob(".tmp-*"))
    assert [c.name for c in list_checkpoints(killed_in_save)] == ["checkpoint-00000020", "checkpoint-00000024"]
    a = OPTForCausalLM.from_pretrained(ref / "checkpoint-00000024").state_dict()
    b = OPTForCausalLM.from_pretrained(killed_in_save / "checkpoint-00000024").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def losses_safe(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, [x for x in lines[:-1] if x]) if "loss" in r}


def test_checkpoint_loads_in_transformers_with_identical_logits(setup, tmp_path):
    import transformers

    ckpt = train(args_for(setup, tmp_path / "run", max_steps=3, save_every=3, eval_every=3)).checkpoint
    theirs = transformers.OPTForCausalLM.from_pretrained(str(ckpt)).eval()
    ours = OPTForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(3, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    assert tok("The cat")["input_ids"][0] == 2


def test_optimizer_groups_and_schedule(setup, tmp_path):
    args = args_for(setup, tmp_path, max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, args) == pytest.approx(0.1) and lr_at(9, args) == pytest.approx(1.0)
    assert lr_at(55, args) == pytest.approx(0.55) and lr_at(100, args) == pytest.approx(0.1)
    from optlm import OPTConfig
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     ffn_dim=32, max_position_embeddings=16))
    decay, no_decay = make_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0 and all(p.dim() == 1 for p in no_decay["params"])
    assert any("layer_norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == args.weight_decay
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_wsd_schedule_is_flat_until_its_decay_and_independent_of_the_end_before_it(setup, tmp_path):
    args = args_for(setup, tmp_path, max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd",
                    decay_steps=20)
    assert lr_at(9, args) == pytest.approx(1.0) and lr_at(80, args) == pytest.approx(1.0)
    assert lr_at(90, args) == pytest.approx(0.55) and lr_at(100, args) == pytest.approx(0.1)
    longer = dataclasses.replace(args, max_steps=500)  # a resumed run given a bigger budget
    assert [lr_at(s, longer) for s in range(81)] == [lr_at(s, args) for s in range(81)]
    assert lr_at(50, dataclasses.replace(args, decay_steps=None)) == pytest.approx(1.0)  # default: last fifth
    assert lr_at(90, dataclasses.replace(args, decay_steps=None)) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, dataclasses.replace(args, schedule="linear"))


def test_grad_accum_and_checkpointing_train(setup, tmp_path):
    r = train(args_for(setup, tmp_path / "run", max_steps=4, grad_accum=2, gradient_checkpointing=True,
                       eval_every=4, save_every=4, dropout=0.0))
    assert r.step == 4 and r.train_loss is not None and r.val_loss is not None


def test_errors(setup, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        train(args_for(setup, tmp_path / "a", data=[str(empty)]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(ValueError, match="not UTF-8"):
        train(args_for(setup, tmp_path / "b", data=[str(latin)]))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        train(args_for(setup, tmp_path / "c", block_size=65))

    train(args_for(setup, tmp_path / "run", max_steps=2, save_every=2, eval_every=2))
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(args_for(setup, tmp_path / "run", max_steps=2))
    with pytest.raises(TrainingError, match="different run: lr") as refusal:
        train(args_for(setup, tmp_path / "run", max_steps=4, lr=1e-3, resume=True))
    assert "lr: 0.003 in the run, 0.001 now" in str(refusal.value)  # which value changed, and how
    train(args_for(setup, tmp_path / "run", max_steps=3, lr=1e-3, overwrite=True))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000003"]
    # the CLI turns the refusal into one line and exit status 1
    argv = ["train", "--data", str(setup["data"]), "--out", str(tmp_path / "run"), "--config", str(setup["config"]),
            "--tokenizer", str(setup["tokenizer"]), "--block-size", "32", "--max-steps", "2", "--quiet"]
    assert main(argv) == 1
    assert "--resume" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step(setup, tmp_path):
    from optlm import OPTConfig
    config = OPTConfig.from_json_file(setup["config"])
    config.vocab_size = 320
    model = OPTForCausalLM(config)
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train(args_for(setup, tmp_path / "run", model=str(tmp_path / "broken"), config=None))


def test_stop_after_then_resume_equals_one_run(setup, tmp_path):
    kw = dict(max_steps=12, save_every=4, eval_every=4)
    train(args_for(setup, tmp_path / "one", **kw))
    first = train(args_for(setup, tmp_path / "two", stop_after=6, **kw))
    assert first.step == 6 and first.checkpoint.name == "checkpoint-00000006"
    train(args_for(setup, tmp_path / "two", resume=True, **kw))
    assert losses(tmp_path / "two")[0] == losses(tmp_path / "one")[0]


def test_warmup_longer_than_the_run_is_warned_about(setup, tmp_path):
    with pytest.warns(UserWarning, match="--warmup-steps 10 is not shorter than --max-steps 3"):
        train(args_for(setup, tmp_path / "run", max_steps=3, warmup_steps=10, save_every=3, eval_every=3))


def test_cli_prints_warnings_as_one_plain_line(setup, tmp_path):
    run = subprocess.run([sys.executable, "-m", "optlm.cli", *cli_args(setup, tmp_path / "run", 2)[:-1],
                          "--warmup-steps", "50", "--quiet"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    warning = [line for line in run.stderr.splitlines() if "warning:" in line]
    assert warning == [warning[0]] and warning[0].startswith("optlm train: warning: --warmup-steps 50")
    assert "warnings.warn" not in run.stderr and ".py:" not in run.stderr


# ---- adapters: only the adapter trains, checkpoints are adapter directories -------------------------------

FIXTURE_TEXT = Path(__file__).resolve().parent / "fixtures" / "text" / "shakespeare.txt"


@pytest.fixture(scope="module")
def base_model(setup, tmp_path_factory):
    """A small random base model with the tiny tokenizer, saved as a checkpoint directory."""
    from optlm.models import OPTConfig
    from optlm.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("base")
    tok = Tokenizer.from_pretrained(setup["tokenizer"])
    config = OPTConfig.from_dict({**json.loads(setup["config"].read_text()), "vocab_size": -(-len(tok) // 8) * 8})
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def adapter_args(setup, base_model, out: Path, adapter: str, **kw) -> TrainArgs:
    from optlm.adapters.spec import parse_spec

    return args_for(setup, out, config=None, model=str(base_model), tokenizer=None,
                    adapter=parse_spec(adapter).to_dict(), lr=1e-2, **kw)


def test_lora_run_trains_only_the_adapter_and_resumes_exactly(setup, base_model, tmp_path):
    from safetensors.torch import load_file

    spec = "r=4,alpha=8,dropout=0.1,targets=q_proj,v_proj,fc1"
    whole = train(adapter_args(setup, base_model, tmp_path / "whole", spec, max_steps=20))
    train_loss, _ = losses(tmp_path / "whole")
    assert sum(train_loss[s] for s in (18, 19, 20)) < sum(train_loss[s] for s in (1, 2, 3)) - 0.3
    ckpt = whole.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    n_adapter = sum(t.numel() for t in adapter.values())
    optimizer = load_file(ckpt / "optimizer.safetensors")  # exp_avg and exp_avg_sq of adapter weights only
    assert sum(t.numel() for k, t in optimizer.items() if not k.endswith(".step")) == 2 * n_adapter
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(base_model)
    # Stopped at step 10 and resumed: the same losses and the same adapter as the uninterrupted run.
    train(adapter_args(setup, base_model, tmp_path / "split", spec, max_steps=20, stop_after=10))
    train(adapter_args(setup, base_model, tmp_path / "split", spec, max_steps=20, resume=True))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    again = load_file(tmp_path / "split" / ckpt.name / "adapter_model.safetensors")
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)
    # The base stayed as it was.
    base = OPTForCausalLM.from_pretrained(base_model).state_dict()
    merged = OPTForCausalLM.from_pretrained(base_model)
    from optlm.peft import PeftModel

    peft_model = PeftModel.from_pretrained(merged, ckpt)
    frozen = {k.replace(".base_layer", ""): v for k, v in peft_model.base_model.state_dict().items()
              if "lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base)


def test_trained_lora_loads_in_peft_with_the_same_logits(setup, base_model, tmp_path):
    import peft
    import transformers

    from optlm.peft import PeftModel

    result = train(adapter_args(setup, base_model, tmp_path / "run", "r=4,alpha=8,targets=q_proj,v_proj,out_proj,fc2",
                                max_steps=8))
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_model), result.checkpoint).eval()
    ref = peft.PeftModel.from_pretrained(transformers.OPTForCausalLM.from_pretrained(base_model), result.checkpoint)
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).logits
        base = transformers.OPTForCausalLM.from_pretrained(base_model)(input_ids=ids).logits
        assert (want - base).abs().max() > 1e-3  # training moved the adapter away from the identity
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_bottleneck_run_and_cli_spec(setup, base_model, tmp_path):
    argv = ["train", "--model", str(base_model), "--data", str(setup["data"]), "--out", str(tmp_path / "bn"),
            "--adapter", "bottleneck,reduction=4,variant=houlsby,act=gelu", "--block-size", "32", "--batch-size", "4",
            "--max-steps", "12", "--warmup-steps", "2", "--lr", "1e-2", "--eval-every", "6", "--eval-batches", "2",
            "--save-every", "6", "--log-every", "1", "--quiet"]
    assert main(argv) == 0
    train_loss, _ = losses(tmp_path / "bn")
    assert train_loss[12] < train_loss[1]
    config = json.loads((tmp_path / "bn" / "checkpoint-00000012" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["variant"] == "houlsby" and config["reduction_factor"] == 4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_on_a_quantized_base_learns_real_text_and_reloads(tmp_path, mode):
    """The QLoRA recipe: frozen quantized base (the bundled model), fp32 LoRA, 50 steps on Shakespeare."""
    from optlm.adapters.spec import parse_spec
    from optlm.bundled import bundled_model_path
    from optlm.lm import load

    result = train(TrainArgs(data=[str(FIXTURE_TEXT)], out_dir=str(tmp_path / "q"), model=str(bundled_model_path()),
                             adapter=parse_spec("r=8,alpha=16,targets=q_proj,v_proj,fc1").to_dict(),
                             quantize=mode, block_size=64, batch_size=4, max_steps=50, warmup_steps=5, lr=3e-3,
                             eval_every=25, eval_batches=4, save_every=50, log_every=1, progress=False))
    train_loss, val_loss = losses(tmp_path / "q")
    first = sum(train_loss[s] for s in range(1, 6)) / 5
    last = sum(train_loss[s] for s in range(46, 51)) / 5
    assert last < first - 0.3, (first, last)
    assert val_loss[50] < val_loss[25]
    lm = load(adapter=result.checkpoint, quantize=mode)  # the base comes from the adapter's config
    assert lm.generate("ROMEO:", max_new_tokens=5, do_sample=False)[0]


def test_adapter_argument_errors(setup, base_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="--model"):
        train(args_for(setup, tmp_path / "a", adapter={"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="quantized base is frozen"):
        train(args_for(setup, tmp_path / "b", config=None, model=str(base_model), tokenizer=None, quantize="int8"))
    code = main(["train", "--model", str(base_model), "--data", str(setup["data"]), "--out", str(tmp_path / "c"),
                 "--lora", "r=4,rank=3"])
    assert code == 1 and "unknown key 'rank'" in capsys.readouterr().err
    code = main(["train", "--model", str(base_model), "--data", str(setup["data"]), "--out", str(tmp_path / "d"),
                 "--lora", "targets=query_key_value", "--max-steps", "1", "--warmup-steps", "0", "--block-size", "32",
                 "--quiet"])
    assert code == 1 and "matched no linear layer" in capsys.readouterr().err


def test_chunked_loss_equals_the_whole_logits_loss_and_its_gradients():
    """lm_loss never holds all the logits; its loss and gradients are those of the plain cross-entropy."""
    import torch.nn.functional as F

    from optlm.models import OPTConfig
    from optlm.train import lm_loss

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=128, dropout=0.0))
    x, y = torch.randint(0, 1000, (3, 100)), torch.randint(0, 1000, (3, 100))
    want = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = lm_loss(model.get_output_embeddings(), model.get_decoder()(x), y, rows=64)  # 5 chunks, the last short
    got.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    for a, b in zip(want_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)


FRAGMENT = """
import sys, torch
from optlm.train import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
big = torch.empty(8 << 20, dtype=torch.uint8); big.fill_(1); del big  # a freed 8 MiB block
blocks = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MiB, as activations are
before = rss()
del blocks[::2]  # free every other block: holes between live ones
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="glibc's malloc on Linux only")
def test_return_freed_memory_gives_freed_blocks_back_to_the_system():
    """With return_freed_memory() (what --gradient-checkpointing turns on), freeing half of 200 blocks of 1 MiB
    lowers the process's resident memory by ~100 MiB; glibc's default keeps it (the control)."""
    def released(mode: str) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert released("on") > 90
    assert released("off") < 10
