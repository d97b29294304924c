"""Training: causal-LM pre-training and fine-tuning, sequence classification and extractive QA (the task's
data, loss and metrics come from ``tasks``), whole models or adapters.

One loop for every task: AdamW (no decay on biases and LayerNorm weights), linear warm-up then cosine decay, gradient
clipping and accumulation, bf16 autocast where the device has it, optional gradient checkpointing,
periodic validation, checkpoints in the Hugging Face layout written atomically, and exact resume.

An output directory holds::

    run.json                 the arguments that define the run (checked on --resume)
    metrics.jsonl            one JSON record per logged step / validation
    loss.png                 train and validation loss curves
    data/                    token caches (memmaps) of the training and validation files
    checkpoint-00000100/     config.json, model.safetensors, tokenizer files   (HF layout)
                             optimizer.safetensors, rng.safetensors, trainer_state.json (resume state)
    best/                    the model at the best validation of --best-metric, best.json (task runs)
    validation.txt, confusion.png    the last validation's report (classification)

With an adapter (``adapter``: LoRA or bottleneck, see optlm.adapters) only the adapter trains, and only its
parameters have optimizer state; the base may be quantized (``quantize``: frozen int8/int4 weights under
float adapters, the QLoRA recipe). Checkpoints are then adapter directories (``adapter_config.json`` +
``adapter_model.safetensors`` in peft's format, plus the tokenizer and the resume state).

Resume state holds no pickles: tensors in safetensors, everything else in JSON. The data order is a
pure function of the seed and the step, so with the model, optimizer and RNG restored a resumed run
repeats the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import CheckpointError, resolve
from ..data import check_file
from ..hf import parse_device
from ..models import ModelConfig, config_from_dict, config_from_name, read_config
from ..parallel import fsdp
from ..tokenizer import Tokenizer
from . import metrics as task_metrics
from .labelled import PROBLEM_TYPES
from .predict import write_task_file
from .tasks import TASKS, Task

CKPT_PREFIX = "checkpoint-"
BEST_DIR = "best"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Test hook (for tests only): "SECONDS" or "SECONDS@STEP" sleeps in the middle of writing a checkpoint
# (of every step, or only of STEP), after the weights and before the resume state and the final rename,
# so a test can SIGKILL a run mid-save deterministically. Unset in normal use.
SAVE_SLEEP_ENV = "OPTLM_TEST_SAVE_SLEEP"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable output directory …); the message says why."""


@dataclass
class TrainArgs:
    """Everything that defines a training run. On ``resume`` every field outside ``_RESUMABLE`` must match."""

    data: list[str]
    out_dir: str
    task: str = "causal-lm"           # optlm.train.tasks: causal-lm, sequence-classification, question-answering
    model: str | None = None          # checkpoint dir to fine-tune; None = train from scratch
    config: str | None = None         # from scratch: a config.json path or preset name (opt-125m …)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None      # default: the model's directory
    val_data: list[str] | None = None
    val_fraction: float = 0.05        # used without val_data: the tail of the training stream
    jsonl_key: str = "text"           # the JSONL field holding the text (--text-key)
    label_key: str = "label"          # classification: the JSONL field holding the label
    problem_type: str | None = None   # classification: None = from the labels (see optlm.train.labelled)
    class_weights: str | None = None  # single-label classification: "balanced" or "LABEL=W,..."
    best_metric: str | None = "auto"  # keep best/ by this validation metric; "auto" = the task's, None = off
    doc_stride: int = 128             # question answering: tokens shared by consecutive windows of a context
    max_answer_length: int = 30       # question answering: longest answer span, in tokens
    unwrap: bool = False              # join hard-wrapped lines into paragraphs (optlm.data.unwrap)
    block_size: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float | None = None       # cosine floor; default lr / 10
    warmup_steps: int = 100
    schedule: str = "cosine"          # after warm-up: "cosine" decay, or "wsd" (constant, then linear decay)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float | None = None      # override the config's dropout
    seed: int = 0
    dtype: str = "auto"               # autocast: "auto" (bf16 where fast), "bf16", "fp32"
    gradient_checkpointing: bool = False
    adapter: dict[str, Any] | None = None  # an adapter config (LoraConfig / BottleneckConfig .to_dict()) to train
    quantize: str | None = None       # with an adapter: quantize the frozen base ("int8" / "int4")
    fsdp: bool = False                # shard across the torchrun processes (optlm.parallel.fsdp); batch_size per rank
    # ---- below: may change between a run and its resume ----
    max_steps: int = 1000
    decay_steps: int | None = None    # wsd: steps of the final decay (default a fifth of max_steps)
    stop_after: int | None = None     # end this session at that step (schedule still spans max_steps)
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    device: str = "cpu"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    _RESUMABLE = ("max_steps", "decay_steps", "stop_after", "eval_every", "eval_batches", "save_every", "keep_last",
                  "log_every", "device", "progress", "resume", "overwrite")

    _ADDED_LATER = {"unwrap": False, "schedule": "cosine", "adapter": None, "quantize": None, "task": "causal-lm",
                    "label_key": "label", "problem_type": None, "class_weights": None, "best_metric": "auto",
                    "doc_stride": 128, "max_answer_length": 30, "fsdp": False}

    def identity(self, world: int = 1) -> dict[str, Any]:
        """The fields that make two runs the same run (absolute paths, so a changed cwd still matches). A sharded
        run is the same run on any number of ranks that keeps the global batch (``world`` x ``batch_size``)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._RESUMABLE}
        if self.fsdp:
            d["global_batch_size"] = d.pop("batch_size") * world
        d["data"] = [str(Path(p).resolve()) for p in self.data]
        d["val_data"] = None if self.val_data is None else [str(Path(p).resolve()) for p in self.val_data]
        d.pop("out_dir")  # the directory may move; what is in it is the run
        for key, default in self._ADDED_LATER.items():
            if d[key] == default:
                d.pop(key)  # runs from before the option existed resume unchanged
        for key in ("model", "tokenizer"):
            if d[key] is not None and Path(d[key]).exists():
                d[key] = str(Path(d[key]).resolve())
        return d


@dataclass
class TrainResult:
    checkpoint: Path | None
    step: int
    train_loss: float | None
    val_loss: float | None
    metrics: dict[str, Any] = field(default_factory=dict)  # the last validation's
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of best/, when kept


# ---- schedule and optimizer ------------------------------------------------------------------------

SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up from lr/warmup to lr over ``warmup_steps``, then decay to ``min_lr`` at ``max_steps``.

    ``cosine``: a cosine over all the steps after warm-up. ``wsd`` (warm-up, stable, decay; Hu et al. 2024,
    MiniCPM): the peak rate until the last ``decay_steps``, then a linear decay. A wsd run's learning rate
    before its decay does not depend on ``max_steps``, so a run whose compute budget is not known in advance
    trains at the stable rate and is given its end later: ``--resume --max-steps N`` decays into step N.
    """
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "wsd":
        decay = max(args.max_steps // 5 if args.decay_steps is None else args.decay_steps, 1)
        start = max(args.max_steps - decay, args.warmup_steps)
        if step < start:
            return args.lr
        progress = min((step - start) / max(args.max_steps - start, 1), 1.0)
        return args.lr + (min_lr - args.lr) * progress
    if args.schedule != "cosine":
        raise ValueError(f"unknown schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    span = max(args.max_steps - args.warmup_steps, 1)
    progress = min((step - args.warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in dict.fromkeys(model.parameters()):  # tied embedding/head counted once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))


def autocast_dtype(args: TrainArgs, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively; fp32 otherwise (emulated bf16 is slower)."""
    if args.dtype == "fp32":
        return None
    if args.dtype == "bf16":
        return torch.bfloat16
    if args.dtype != "auto":
        raise ValueError(f"dtype {args.dtype!r}: use auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        # Native bf16 matmuls need AVX512-BF16 or AMX; AVX2-only CPUs emulate and get slower.
        return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") else None
    return None


# ---- checkpoints -----------------------------------------------------------------------------------

def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    found = [p for p in out_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CKPT_PREFIX)))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().clone().contiguous().reshape(-1) if v.dim() == 0 else v.contiguous()
               for i, s in sd["state"].items() for k, v in s.items()}
    scalars = {f"{i}.{k}": list(v.shape) for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": sd["param_groups"], "shapes": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    tensors = load_file(path)
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = t.reshape(meta["shapes"][f"{i}.{name}"])
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, tokenizer: Tokenizer,
                    opt: torch.optim.Optimizer, state: dict[str, Any], keep_last: int, task: Task,
                    ranks: fsdp.Ranks | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp dir + rename), then prune to the last ``keep_last``.

    Sharded (``ranks`` of an FSDP run; every rank calls this): the weights are gathered and written by rank 0,
    and each rank writes its share of the optimizer state and its RNG state (optlm.parallel.fsdp)."""
    ranks = fsdp.Ranks() if ranks is None else ranks
    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = out_dir / f"{TMP_PREFIX}{final.name}"
    whole = fsdp.full_model(model, ranks) if ranks.sharded else model

    def write_model() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_model(whole, tokenizer, tmp, task)
        _test_save_sleep(step)

    ranks.first(write_model)
    if ranks.sharded:
        ranks.each(_write_shards, opt, model, tmp, ranks)

    def finish() -> Path:
        if ranks.sharded:
            opt_meta = {"world_size": ranks.world}
        else:
            tensors, opt_meta = _optimizer_tensors(opt)
            save_file(tensors, tmp / "optimizer.safetensors")
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, tmp / "rng.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta},
                                                           indent=1) + "\n", "utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (resume after a kill between save and prune)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            # Renamed first: a kill during rmtree leaves a .trash- directory, never a damaged checkpoint.
            trash = out_dir / f"{TRASH_PREFIX}{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash)
        return final

    return ranks.first(finish)


def _write_shards(opt: torch.optim.Optimizer, model: nn.Module, directory: Path, ranks: fsdp.Ranks) -> None:
    fsdp.save_optimizer_shard(opt, model, directory, ranks)
    fsdp.save_rng_shard(directory, ranks)


def _write_model(model: nn.Module, tokenizer: Tokenizer, directory: Path, task: Task) -> None:
    """The weights in the HF layout (or, with an adapter, the adapter in peft's, and the task head's labels)
    and the tokenizer."""
    from ..adapters.state import state_of

    if state_of(model) is not None:
        from ..adapters import save_adapter

        save_adapter(model, "default", directory, base_model_name_or_path=model.name_or_path)
        if task.heads:
            write_task_file(model, directory, task.name)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _test_save_sleep(step: int) -> None:
    value = os.environ.get(SAVE_SLEEP_ENV)
    if value:
        seconds, _, at = value.partition("@")
        if not at or int(at) == step:
            time.sleep(float(seconds))


def _restore_rng(path: Path) -> None:
    rng = load_file(path)
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        if "torch_cuda" in rng:  # one rank of a sharded run: its own device's
            torch.cuda.set_rng_state(rng["torch_cuda"])
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


# ---- the output directory --------------------------------------------------------------------------

def _prepare_out_dir(args: TrainArgs, world: int = 1) -> tuple[Path, Path | None]:
    """Check the directory against ``resume``/``overwrite``; return it and the checkpoint to resume from."""
    out = Path(args.out_dir)
    run_file = out / "run.json"
    ours = [run_file, out / "metrics.jsonl", out / "loss.png", *out.glob(f"{CKPT_PREFIX}*"),
            *out.glob(f"{TMP_PREFIX}*"), *out.glob(f"{TRASH_PREFIX}*")]
    existing = [p for p in ours if p.exists()]
    if existing and not (args.resume or args.overwrite):
        ckpts = list_checkpoints(out)
        last = f", last checkpoint {ckpts[-1].name}" if ckpts else ""
        raise TrainingError(f"{out} already holds a training run ({len(ckpts)} checkpoint(s){last}); pass "
                            "--resume to continue it, --overwrite to replace it, or choose another --out")
    if args.overwrite and not args.resume:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for p in [*out.glob(f"{TMP_PREFIX}*"), *out.glob(f"{TRASH_PREFIX}*")]:
        shutil.rmtree(p)  # leftovers of a run killed while saving or pruning
    identity = args.identity(world)
    if run_file.is_file():
        previous = json.loads(run_file.read_text("utf-8"))
        changed = sorted(k for k in {*identity, *previous} if previous.get(k) != identity.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {previous.get(k)!r} in the run, {identity.get(k)!r} now" for k in changed)
            raise TrainingError(f"{out} holds a different run: {', '.join(changed)} differ(s) from its run.json "
                                f"({diffs}); resume with the same arguments, pass --overwrite to replace it, or "
                                "choose another --out")
    else:
        tmp = out / "run.json.tmp"
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n", "utf-8")
        os.replace(tmp, run_file)
    if not args.resume:
        return out, None
    ckpts = list_checkpoints(out)
    if not ckpts:
        warnings.warn(f"--resume: {out} has no checkpoint to continue from; starting a new run", stacklevel=3)
        return out, None
    damaged = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                warnings.warn(f"{'; '.join(damaged)}; resuming from {ckpt.name}, the last intact checkpoint",
                              stacklevel=3)
            return out, ckpt
        damaged.append(f"{ckpt.name} is damaged ({problem})")
    raise TrainingError(f"no intact checkpoint to resume in {out}: {'; '.join(damaged)}. Pass --overwrite to start "
                        "again, or restore the files from a backup")


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's resume state (None: intact): unreadable trainer_state.json, or
    missing / unreadable optimizer, RNG or weight files (their headers are read, not the tensors)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text("utf-8"))
        missing = [k for k in ("step", "elapsed", "tokens", "optimizer") if k not in state]
        if missing:
            return f"trainer_state.json lacks {', '.join(missing)}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
        return f"trainer_state.json is unreadable: {e}"
    weights = "adapter_model.safetensors" if (ckpt / "adapter_config.json").is_file() else "model.safetensors"
    world = state["optimizer"].get("world_size") if isinstance(state["optimizer"], dict) else None
    resume_files = fsdp.shard_files(world) if isinstance(world, int) else ["optimizer.safetensors", "rng.safetensors"]
    for name in (*resume_files, weights):
        try:
            with safe_open(str(ckpt / name), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"{name} is unreadable: {e}"
    return None


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e}); free disk space or raise the file-size limit, then "
                            "--resume from the last checkpoint") from e


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step``: a resumed run rewrites what the killed one logged after its checkpoint.
    A line cut off by a crash (or otherwise unreadable) is dropped with a warning."""
    if not path.is_file():
        return
    keep = []
    for n, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            warnings.warn(f"{path} line {n} is damaged (cut off by a crash?); dropping it", stacklevel=3)
            continue
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep), "utf-8")
    os.replace(tmp, path)


def plot_metrics(metrics_file: Path, png: Path) -> bool:
    """Train/validation loss curves to ``png``; False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the loss-curve plot", file=sys.stderr)
        return False
    records = [json.loads(line) for line in metrics_file.read_text("utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", linewidth=1)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return True


# ---- model and data --------------------------------------------------------------------------------

def _build(args: TrainArgs, task: Task, resume_from: Path | None) -> tuple[nn.Module, Tokenizer]:
    if (args.model is None) == (args.config is None):
        raise ValueError("give exactly one of --model (a checkpoint to fine-tune) and --config (a config.json "
                         "or preset name such as opt-125m, to train from scratch)")
    tok_source = args.tokenizer or args.model
    if tok_source is None:
        raise ValueError("training from scratch needs --tokenizer (a directory with tokenizer.json, e.g. from "
                         "`optlm train-tokenizer`)")
    tokenizer = Tokenizer.from_pretrained(tok_source)
    overrides = dict(args.config_overrides)
    family = type(_start_config(args))
    known = family.field_names()
    unknown = sorted(set(overrides) - known)
    if unknown:
        article = "an" if family.family_name[0] in "AEIOU" else "a"
        raise ValueError(f"--set {unknown[0]}: not {article} {family.family_name} config field (it would be saved "
                         "and never used); "
                         f"the fields are: {', '.join(sorted(known))}")
    if args.dropout is not None:
        overrides.update(dict.fromkeys(family.dropout_fields, args.dropout))
    from_data = task.config_overrides(args)
    overrides.update(from_data)
    torch.manual_seed(args.seed)  # the initial weights of whatever is new (a model from scratch, a task head)
    if args.adapter is not None:
        model = _with_adapter(args, task, tokenizer, overrides, resume_from)
    elif resume_from is not None:  # its config.json already carries the overrides
        model = task.model_class.from_pretrained(resume_from, dtype=torch.float32, fast=False)  # plain modules
        _same_labels(model, from_data, resume_from)
    elif args.model is not None:
        model = _fine_tuning_start(task, args.model, overrides)
    else:
        config = _start_config(args)
        # The embedding covers the tokenizer, padded to a multiple of 8 as metaseq does.
        overrides = {"vocab_size": -(-len(tokenizer) // 8) * 8, **overrides}
        config = config_from_dict(config.with_overrides(overrides))
        model = task.model_class.from_config(config)
    _check_fit(args, model, tokenizer)
    task.check_model(model, str(args.model or args.config))
    task.align_pad(model, tokenizer, str(args.model or args.config))
    return model, tokenizer


def _start_config(args: TrainArgs) -> ModelConfig:
    """The config training starts from: the checkpoint's (--model), or --config (a file or a preset name such
    as opt-125m or gpt-neo-125m). A resumed run continues the same family."""
    if args.model is not None:
        path = resolve(args.model) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path.parent} has no config.json; a checkpoint directory needs one")
        return read_config(path)
    return read_config(args.config) if Path(args.config).is_file() else config_from_name(args.config)


def _fine_tuning_start(task: Task, source: str, overrides: dict[str, Any]) -> nn.Module:
    """The model to fine-tune; a task head the checkpoint lacks starts at random, as expected (no warning)."""
    directory = resolve(source)
    if (directory / "config.json").is_file():
        _same_labels(read_config(directory / "config.json"), overrides, directory, fine_tuning=True)
    with warnings.catch_warnings():
        for head in task.heads:
            warnings.filterwarnings("ignore", message=rf".*\b{head}\.weight not in the checkpoint")
        return task.model_class.from_pretrained(source, dtype=torch.float32, fast=False, **overrides)  # plain modules


def _same_labels(model_or_config: Any, from_data: dict[str, Any], source: Path, fine_tuning: bool = False) -> None:
    """A checkpoint that already has classes must have the data's (else the head would be read wrongly)."""
    config = getattr(model_or_config, "config", model_or_config)
    want = from_data.get("id2label")
    have = config.id2label
    if want is None or have is None or {int(k): v for k, v in have.items()} == want:
        return
    if fine_tuning and have == {i: f"LABEL_{i}" for i in range(len(have))}:
        return  # transformers' placeholder names: the head was never trained on named classes
    raise ValueError(f"{source} classifies into {list(have.values())}, but the training data's classes are "
                     f"{list(want.values())}; train from a checkpoint without that head, or relabel the data")


def _check_fit(args: TrainArgs, model: nn.Module, tokenizer: Tokenizer) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.config.vocab_size}; use the model's own tokenizer")
    if args.block_size > model.config.max_position_embeddings:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings}); use at most that")
    if args.block_size < 2:
        raise ValueError(f"--block-size must be at least 2, got {args.block_size}")


def _with_adapter(args: TrainArgs, task: Task, tokenizer: Tokenizer, overrides: dict[str, Any],
                  resume_from: Path | None) -> nn.Module:
    """The frozen base (quantized if asked) with a fresh adapter, or the checkpoint's adapter on resume."""
    from ..adapters import add_lora, load_adapter
    from ..adapters.bottleneck import add_bottleneck
    from ..adapters.peft_format import CONFIGS
    from ..adapters.peft_model import mark_trainable
    from ..adapters.state import state_of

    model = _fine_tuning_start(task, args.model, overrides)
    _check_fit(args, model, tokenizer)
    if args.quantize is not None:
        from ..quantize import quantize

        quantize(model, args.quantize, keep=task.heads)  # a task head trains whole, in floating point
    if resume_from is not None:
        load_adapter(model, resume_from, "default")
    else:
        spec = dict(args.adapter)
        if spec.get("task_type") is None:
            spec["task_type"] = task.adapter_task_type
        if task.heads and not spec.get("modules_to_save"):
            spec["modules_to_save"] = list(task.heads)  # a fresh head trains whole (peft does so for SEQ_CLS)
        config = CONFIGS[spec["peft_type"]].from_dict(spec)
        torch.manual_seed(args.seed)  # the adapter's initial weights
        (add_lora if config.peft_type == "LORA" else add_bottleneck)(model, config, "default")
    mark_trainable(model, "default")
    state_of(model).active = ["default"]
    return model


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number


def return_freed_memory() -> bool:
    """Have glibc's malloc give every freed block above 128 KiB back to the system at once (False elsewhere).

    By default glibc raises that threshold to a freed block's size (up to 32 MiB), so activation tensors of a
    few MiB then come from the heap, which fragments and stays at its high-water mark. Returning them costs
    page faults on the next allocation (step time) for a lower peak (memory): the trade gradient checkpointing
    already makes, so the trainer does it then. Process-wide; ``MALLOC_MMAP_THRESHOLD_`` set in the
    environment wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 128 * 1024))


# ---- the loop --------------------------------------------------------------------------------------

def check_args(args: TrainArgs) -> None:
    """Every count, rate and choice in range, each error naming its command-line flag."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every"):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
    for name in ("warmup_steps", "keep_last"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    for name in ("stop_after", "decay_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name, lo, hi in (("lr", 0, None), ("min_lr", 0, None), ("weight_decay", 0, None), ("grad_clip", 0, None),
                         ("dropout", 0, 1), ("val_fraction", 0, 1), ("beta1", 0, 1), ("beta2", 0, 1)):
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < lo or (hi is not None and value >= hi) or (name == "lr" and value == 0):
            span = f"in [{lo}, {hi})" if hi is not None else ("> 0" if name == "lr" else ">= 0")
            raise ValueError(f"--{name.replace('_', '-')} must be a number {span}, got {value}")
    parse_device(args.device)
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: choose one of {', '.join(TASKS)}")
    if args.task == "causal-lm":
        for name, default in (("problem_type", None), ("class_weights", None)):
            if getattr(args, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} applies to --task sequence-classification")
    if args.task == "question-answering" and (args.problem_type is not None or args.class_weights is not None):
        raise ValueError("--problem-type and --class-weights apply to --task sequence-classification")
    if args.task != "question-answering" and (args.doc_stride != 128 or args.max_answer_length != 30):
        raise ValueError("--doc-stride and --max-answer-length apply to --task question-answering")
    if args.doc_stride < 0 or args.max_answer_length < 1:
        raise ValueError(f"--doc-stride must be >= 0 and --max-answer-length >= 1, got {args.doc_stride} and "
                         f"{args.max_answer_length}")
    if args.problem_type is not None and args.problem_type not in PROBLEM_TYPES:
        raise ValueError(f"--problem-type {args.problem_type!r}: choose one of {', '.join(PROBLEM_TYPES)}")
    for path in [*args.data, *(args.val_data or [])]:
        check_file(path)
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if args.adapter is not None and args.model is None:
        raise ValueError("an adapter trains on top of an existing model: give --model (a checkpoint directory or "
                         "hub id), not --config")
    if args.quantize is not None:
        if args.quantize not in ("int8", "int4"):
            raise ValueError(f"--quantize {args.quantize!r}: training on a quantized base supports int8 and int4")
        if args.adapter is None:
            raise ValueError("a quantized base is frozen: add an adapter to train (--lora … or --adapter …), or "
                             "fine-tune in floating point without --quantize")
        if parse_device(args.device).type != "cpu":
            raise ValueError("--quantize uses optlm's CPU int8/int4 kernels; train on --device cpu, or without "
                             "--quantize on a GPU")
    if args.fsdp and args.adapter is not None:
        raise ValueError("--fsdp shards a model trained in full; an adapter's few weights train in one process "
                         "(drop --fsdp, or train the whole model)")


def train(args: TrainArgs) -> TrainResult:
    """Run (or resume) a training run; returns the last checkpoint and the final losses.

    One writer per output directory: a second run on the same directory is refused while the first holds it.
    """
    check_args(args)
    ranks = fsdp.Ranks.join(parse_device(args.device)) if args.fsdp else fsdp.Ranks()
    out = Path(args.out_dir)
    lock = contextlib.ExitStack()

    def hold() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create the output directory {out} ({e.strerror}); choose another --out") \
                from e
        lock.enter_context(_exclusive(out))

    try:
        with lock:
            ranks.first(hold)  # rank 0 holds the directory for all
            return _train(args, ranks)
    finally:
        ranks.close()


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an exclusive lock on ``out/.lock`` for the run (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with open(out / LOCK_FILE, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise TrainingError(f"{out} is in use by another optlm train ({owner}); wait for it to finish, stop "
                                "it, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def _train(args: TrainArgs, ranks: fsdp.Ranks) -> TrainResult:
    if args.warmup_steps >= args.max_steps and ranks.main:
        peak = lr_at(args.max_steps - 1, args)
        warnings.warn(f"--warmup-steps {args.warmup_steps} is not shorter than --max-steps {args.max_steps}: the "
                      f"learning rate only reaches {peak:.3g}, short of --lr {args.lr:g}; lower --warmup-steps "
                      "(a few percent of the steps is usual)", stacklevel=2)
    fresh = not (Path(args.out_dir) / "run.json").exists()
    out, resume_from = ranks.first(_prepare_out_dir, args, ranks.world)
    task = TASKS[args.task]()
    try:
        model, tokenizer = ranks.each(_build, args, task, resume_from)  # an error on any rank stops them all
        if ranks.sharded and getattr(model.config, "layerdrop", 0) > 0:
            raise ValueError("LayerDrop skips layers at random on each rank, and a sharded layer must run on all "
                             "of them: set layerdrop=0 (--set layerdrop=0) to train with --fsdp")
        # Rank 0 tokenizes into the cache first; the other ranks then read it.
        train_data, val_data = ranks.main_first(task.datasets, args, tokenizer, out)
    except Exception:
        if fresh and ranks.main:  # a run that could not start leaves nothing that would block running it again
            (out / "run.json").unlink(missing_ok=True)
        raise
    device = _device(args, ranks)
    metrics = out / "metrics.jsonl"
    best_metric = task.default_best_metric() if args.best_metric == "auto" else args.best_metric
    # Validation runs on every rank over the global batch (what a resumed run on other ranks keeps), so its
    # numbers do not depend on the number of ranks.
    val_args = dataclasses.replace(args, batch_size=args.batch_size * ranks.world,
                                   progress=args.progress and ranks.main)

    step, elapsed, tokens_seen, best = 0, 0.0, 0, None
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text("utf-8"))
        step, elapsed, tokens_seen, best = state["step"], state["elapsed"], state["tokens"], state.get("best")
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        return_freed_memory()
    amp = autocast_dtype(args, device)
    # Sharded: bf16 also for the gathered weights and the computation (half the traffic); fp32 master weights.
    run = fsdp.shard(model, device, ranks.world, amp) if ranks.sharded else fsdp.Direct(model)
    opt = make_optimizer(model, args)
    if resume_from is not None:
        if ranks.sharded:
            _resume_shards(opt, model, resume_from, state, args, ranks)
        else:
            _load_optimizer(opt, resume_from / "optimizer.safetensors", state["optimizer"])
            _restore_rng(resume_from / "rng.safetensors")
        if ranks.main:
            _truncate_metrics(metrics, step)
            print(f"resuming from {resume_from} (step {step})", file=sys.stderr)
    else:
        if ranks.main:
            _truncate_metrics(metrics, 0)
        torch.manual_seed(args.seed + 1 + ranks.rank)  # dropout stream, independent of the init stream
    if step >= args.max_steps and ranks.main:
        print(f"nothing to do: the run is at step {step} and --max-steps is {args.max_steps}", file=sys.stderr)

    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    bar = _progress(args, step) if ranks.main else None
    loss_value, val_metrics = None, {}
    last_ckpt = list_checkpoints(out)[-1] if list_checkpoints(out) else None
    t_mark = time.perf_counter()
    end = args.max_steps if args.stop_after is None else min(args.stop_after, args.max_steps)
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, tokens_per_step = 0.0, 0
        for micro in range(args.grad_accum):
            # The step's global batch, in the order of a single process; this rank takes its slice of it.
            first = ((step * args.grad_accum + micro) * ranks.world + ranks.rank) * args.batch_size
            batch = {k: v.to(device) for k, v in task.train_batch(train_data, first, args.batch_size).items()}
            mask = batch.get("attention_mask")
            tokens_per_step += batch["input_ids"].numel() if mask is None else int(mask.sum())
            with _autocast(device, amp):
                loss = run(task.loss, batch)
            (loss / args.grad_accum).backward()
            loss_sum += loss.item()
        loss_sum, tokens_per_step = ranks.sum(loss_sum / ranks.world, tokens_per_step)  # the mean over the ranks
        tokens_per_step = int(tokens_per_step)
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the training loss is {loss_sum / args.grad_accum} at step {step + 1}; stopping. "
                                "Lower --lr, raise --warmup-steps or resume from an earlier checkpoint")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if not math.isfinite(grad_norm):
            raise TrainingError(f"the gradient norm is {grad_norm} at step {step + 1}; stopping. Lower --lr or "
                                "resume from an earlier checkpoint")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        elapsed += dt
        loss_value = loss_sum / args.grad_accum
        if (step % args.log_every == 0 or step == end) and ranks.main:
            _append_metrics(metrics, {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                      "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                                      "elapsed_s": round(elapsed, 3)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if step % args.eval_every == 0 or step == end:
            # Rank 0's numbers for all: every rank then takes the same decisions (best/, errors) in step.
            val_metrics = _validate(task, run, val_data, val_args, amp, device)
            val_metrics = ranks.first(lambda m=val_metrics: m)
            if ranks.main:
                _append_metrics(metrics, {"step": step, **val_metrics})
                task.after_validation(val_metrics, out)
            msg = f"step {step}: train loss {loss_value:.4f}, {task.summary(val_metrics)}"
            # Only scheduled validations compete for best/ (not one at the end of a --stop-after session), so
            # where a run was stopped and resumed never changes which checkpoint is best.
            if best_metric is not None and (step % args.eval_every == 0 or step == args.max_steps):
                if best_metric not in val_metrics:
                    names = ", ".join(k for k, v in val_metrics.items() if isinstance(v, float))
                    raise TrainingError(f"--best-metric {best_metric}: the {task.name} validation has no such "
                                        f"metric; choose one of {names}")
                value = val_metrics[best_metric]
                if task_metrics.better(best_metric, value, None if best is None else best["value"]):
                    best = {"metric": best_metric, "value": value, "step": step}
                    whole = fsdp.full_model(model, ranks) if ranks.sharded else model
                    ranks.first(_save_best, out, whole, tokenizer, task, best, val_metrics)
                    msg += f" (best {best_metric} so far: saved to {out / BEST_DIR})"
            if ranks.main:
                (bar.write if bar is not None else print)(msg)
        if step % args.save_every == 0 or step == end:
            try:
                progress = {"elapsed": elapsed, "tokens": tokens_seen, "train_loss": loss_value,
                            "val_loss": val_metrics.get("val_loss"), "best": best}
                last_ckpt = save_checkpoint(out, step, model, tokenizer, opt, progress, args.keep_last, task, ranks)
            except (OSError, SafetensorError) as e:
                if ranks.main:
                    shutil.rmtree(out / f"{TMP_PREFIX}{CKPT_PREFIX}{step:08d}", ignore_errors=True)
                last = f"the last complete checkpoint is {last_ckpt.name}; --resume continues from it" if last_ckpt \
                    else "no checkpoint was written yet"
                raise TrainingError(f"could not write the checkpoint of step {step} to {out} ({e}); free disk "
                                    f"space or raise the file-size limit, then run again — {last}") from e
            try:
                if ranks.main:
                    plot_metrics(metrics, out / "loss.png")
            except OSError as e:  # the curve is a convenience: never stop a run over it
                warnings.warn(f"could not draw {out / 'loss.png'} ({e})", stacklevel=2)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_mark
    if ranks.main:
        print(f"done: step {step}, {tokens_seen:,} tokens, {elapsed:.0f}s of training ({wall:.0f}s this session); "
              f"checkpoint {last_ckpt}", file=sys.stderr)
    return TrainResult(checkpoint=last_ckpt, step=step, train_loss=loss_value, val_loss=val_metrics.get("val_loss"),
                       metrics=val_metrics, best=best)


def _device(args: TrainArgs, ranks: fsdp.Ranks) -> torch.device:
    """``--device``; a sharded run on GPUs gives each rank the one torchrun assigns it (LOCAL_RANK)."""
    device = torch.device(args.device)
    if ranks.sharded and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank)))
        torch.cuda.set_device(device)
    return device


def _resume_shards(opt: torch.optim.Optimizer, model: nn.Module, ckpt: Path, state: dict[str, Any],
                   args: TrainArgs, ranks: fsdp.Ranks) -> None:
    """A sharded run's optimizer and RNG state, written by any number of ranks. On a different number of ranks
    each rank draws a new dropout stream (seeded by the run's seed, the rank and the step): with dropout the
    losses then differ from an uninterrupted run's, without it they do not."""
    saved = state["optimizer"]["world_size"]
    fsdp.load_optimizer_shards(opt, model, ckpt, saved, ranks)
    if saved == ranks.world:
        _restore_rng(ckpt / fsdp.RNG_SHARD.format(rank=ranks.rank, world=saved))
    else:
        torch.manual_seed(args.seed + 1 + ranks.rank + 1_000_003 * state["step"])
        if ranks.main:
            print(f"resuming a run of {saved} ranks on {ranks.world}", file=sys.stderr)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def _validate(task: Task, run: fsdp.Direct | fsdp.ShardedRun, val: Any, args: TrainArgs, amp: torch.dtype | None,
              device: torch.device) -> dict[str, Any]:
    model = run.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, amp):
            return run(task.validate, val, args, device)
    finally:
        model.train(was_training)


def _save_best(out: Path, model: nn.Module, tokenizer: Tokenizer, task: Task, best: dict[str, Any],
               val_metrics: dict[str, Any]) -> None:
    """Replace ``best/`` with the model as it is now (weights or adapter, tokenizer, ``best.json``): written
    beside it, then swapped in by renames, so a crash leaves the old best or the new one."""
    final, tmp, trash = out / BEST_DIR, out / f"{TMP_PREFIX}{BEST_DIR}", out / f"{TRASH_PREFIX}{BEST_DIR}"
    for leftover in (tmp, trash):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    _write_model(model, tokenizer, tmp, task)
    task.after_validation(val_metrics, tmp)
    (tmp / "best.json").write_text(json.dumps({**best, "metrics": val_metrics}, indent=1) + "\n", "utf-8")
    _fsync_tree(tmp)
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def _progress(args: TrainArgs, step: int):
    if not args.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=args.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
