"""Fine-tuning memory and speed: full fine-tuning against LoRA, LoRA on an int8 base and a bottleneck adapter,
each a real ``optlm train`` run in its own process on an opt-125m-shaped checkpoint and real text.

    python benchmarks/adapters_train.py --markdown benchmarks/RESULTS.md

Peak memory is the process's peak resident set (weights, gradients, optimizer state, activations, data);
step time is the median over the run's steps after the first two; the size is what a checkpoint's weights
take on disk (the whole model, or the adapter). The checkpoint has random weights (no download); the text is
the test fixture (Tiny Shakespeare's first 60 KB) unless ``--data`` names another file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from optlm.benchmark import publish, random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
LORA_QV = ["--lora", "r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj"]
MODES = {  # id: (name, flags)
    "full": ("full fine-tuning", []),
    "lora": ("LoRA r=8 (q_proj, v_proj)", LORA_QV),
    "lora-int8": ("LoRA r=8 (q_proj, v_proj) on an int8 base", [*LORA_QV, "--quantize", "int8"]),
    "lora-all": ("LoRA r=8, all linear layers", ["--lora", "r=8,alpha=16,targets=all-linear"]),
    "bottleneck": ("bottleneck (Pfeiffer, reduction 16)", ["--adapter", "bottleneck,reduction=16,variant=pfeiffer"]),
}


def run(mode: list[str], checkpoint: Path, tokenizer: Path, data: Path, out: Path, steps: int, batch: int,
        block: int) -> dict:
    argv = [sys.executable, "-m", "optlm.cli", "train", "--model", str(checkpoint), "--tokenizer", str(tokenizer),
            "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
            "--block-size", str(block), "--warmup-steps", "2", "--eval-every", str(steps), "--eval-batches", "1",
            "--save-every", str(steps), "--log-every", "1", "--dtype", "fp32", "--quiet", *mode]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"optlm train failed: {proc.stderr.read()}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [batch * block / r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    weights = ckpt / ("adapter_model.safetensors" if (ckpt / "adapter_config.json").is_file() else "model.safetensors")
    return {"peak_mib": usage.ru_maxrss / 1024, "step_s": statistics.median(step_s),
            "size_mib": weights.stat().st_size / 2**20, "loss": records[-1].get("val_loss")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="opt-125m")
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "fixtures" / "text" / "shakespeare.txt")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "tests" / "fixtures" / "tokenizers" / "opt",
                        help="OPT's tokenizer files (vocab.json, merges.txt)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES), help="which runs (full always comes first)")
    parser.add_argument("--checkpointing", choices=["no", "yes", "both"], default="both",
                        help="without and/or with --gradient-checkpointing")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args(argv)

    checkpoint = random_checkpoint(args.shape)
    rows, results = [], {}
    print(f"{args.shape} shape, batch {args.batch_size} x {args.block_size} tokens, {args.steps} steps, fp32, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        chosen = ["full", *[m for m in args.modes.split(",") if m != "full"]]
        unknown = [m for m in chosen if m not in MODES]
        if unknown:
            parser.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
        for checkpointing in {"no": (False,), "yes": (True,), "both": (False, True)}[args.checkpointing]:
            for name, mode in (MODES[m] for m in chosen):
                extra = ["--gradient-checkpointing"] if checkpointing else []
                out = Path(tmp) / str(len(results))
                results[name, checkpointing] = r = run([*mode, *extra], checkpoint, args.tokenizer, args.data, out,
                                                       args.steps, args.batch_size, args.block_size)
                full = results["full fine-tuning", checkpointing]
                rows.append(f"| {name} | {'yes' if checkpointing else 'no'} | {r['peak_mib']:,.0f} | "
                            f"{r['peak_mib'] / full['peak_mib']:.0%} | {r['step_s']:.2f} | "
                            f"{r['step_s'] / full['step_s']:.2f}x | {r['size_mib']:,.2f} |")
                print(rows[-1], flush=True)
    table = "\n".join([f"Fine-tuning an {args.shape}-shaped model, batch {args.batch_size} x {args.block_size} "
                       f"tokens, fp32, {args.steps} steps:", "",
                       "| run | gradient checkpointing | peak memory MiB | of full (same checkpointing) | step s | "
                       "of full | checkpoint weights MiB |", "|---|---|---|---|---|---|---|", *rows])
    return publish(table, args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
