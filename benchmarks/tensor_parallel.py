"""Tensor parallelism on this machine: decode and prefill tok/s and per-rank memory, 1 rank vs N.

Usage: python benchmarks/tensor_parallel.py [--shape opt-125m] [--ranks 1,2] [--threads 2] [--repeats 3]

Every configuration gets the same cores: with 2 threads in all, one rank runs 2 threads and two ranks 1 each,
so the table shows what splitting the model costs or gains at equal compute (on CPU the all-reduces are pure
overhead; the gain is that each rank holds a share of the weights). Greedy decoding of a 128-token random
prompt; decode tok/s from a 1-token and an N-token run, as ``optlm bench`` does; memory is each rank's resident
set after the runs and its peak (VmHWM), each rank reading only its share of the checkpoint, split into private
memory and pages of the memory-mapped checkpoint (page cache, shared between the ranks and reclaimable).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank: int, world: int, checkpoint: str, threads: int, prompt: int, new: int, repeats: int,
            out: str) -> None:
    from optlm.fast import optimize
    from optlm.parallel.tp import load_tensor_parallel

    torch.set_num_threads(threads)
    model = optimize(load_tensor_parallel(checkpoint, dtype=torch.float32))  # each rank reads its share
    ids = torch.randint(4, 50000, (1, prompt), generator=torch.Generator().manual_seed(0))
    decode, prefill = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            tn = time.perf_counter() - t
            if r:  # the first round warms up
                prefill.append(prompt / t1)
                decode.append((new - 1) / (tn - t1))
    result = {"decode": statistics.median(decode), "prefill": statistics.median(prefill),
              "rss": _mib("VmRSS:"), "peak": _mib("VmHWM:"), "anon": _mib("RssAnon:"), "file": _mib("RssFile:")}
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-125m", help="a published shape, random weights")
    ap.add_argument("--ranks", default="1,2", help="comma-separated tensor-parallel sizes")
    ap.add_argument("--threads", type=int, default=2, help="threads in all, divided among the ranks")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from optlm.benchmark import random_checkpoint
    from optlm.parallel import run

    checkpoint = random_checkpoint(args.shape)
    lines = [f"{args.shape}, fp32, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy, batch 1, "
             f"{args.threads} threads in all, medians of {args.repeats}", "",
             "| ranks | threads/rank | decode tok/s | prefill tok/s | RSS per rank MiB (peak) | of it: private + "
             "file-backed MiB |", "|---:|---:|---:|---:|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for world in [int(n) for n in args.ranks.split(",")]:
            out = str(Path(tmp) / f"r{world}")
            threads = max(1, args.threads // world)
            run(_worker, world, str(checkpoint), threads, args.prompt_tokens, args.new_tokens, args.repeats, out)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
            mem = ", ".join(f"{r['rss']:.0f} ({r['peak']:.0f})" for r in ranks)
            kinds = ", ".join(f"{r['anon']:.0f} + {r['file']:.0f}" for r in ranks)
            lines.append(f"| {world} | {threads} | {ranks[0]['decode']:.1f} | {ranks[0]['prefill']:.0f} | {mem} | "
                         f"{kinds} |")
            print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
