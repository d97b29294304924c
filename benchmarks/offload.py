"""Streaming layers (models larger than memory): tok/s and peak memory, whole model vs offloaded, and the
bytes read per token against the measured read speed.

Usage: python benchmarks/offload.py [--shape opt-1.3b] [--dir DIR] [--windows 2,4] [--batch-sizes 1,8]
                                    [--new-tokens 8] [--prompt 32] [--threads 2]

Writes a random-weight float32 checkpoint of the shape into DIR (kept and reused when DIR is given), then in
one fresh process per configuration: loads the model (whole, or streaming through W layer slots), runs a
greedy generation of --prompt + 1 and --prompt + --new-tokens tokens per batch size, and reports prefill and
decode tok/s and the process's peak resident memory (VmHWM; resident memory counts memory-mapped checkpoint
pages a process touched, but not pages read into the kernel's page cache). Then it measures how fast the
checkpoint file reads: from the page cache (warm, as the offloaded runs read it here, since it fits there),
and from the disk (after asking the kernel to drop the file's cached pages with posix_fadvise). A streamed
decode step reads every layer once, so its speed is bounded by read speed / layer bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import optlm
from optlm.models import config_from_name, read_config
from optlm.parallel.offload import layer_bytes

CHILD = r"""
import json, sys, time
import torch
import optlm
path, window, batches, prompt, new, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024
t = time.perf_counter()
model = optlm.AutoModelForCausalLM.from_pretrained(path, offload=window if window else False)
load = time.perf_counter() - t
out = {"load_s": load, "runs": {}}
for b in map(int, batches.split(",")):
    ids = torch.randint(4, 50000, (b, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t = time.perf_counter()
        first = model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        tokens = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        tn = time.perf_counter() - t
    out["runs"][b] = {"prefill": b * prompt / t1, "decode": b * (new - 1) / max(tn - t1, 1e-9),
                      "tokens": tokens[0, prompt:].tolist()}
out["peak"] = status("VmHWM")
print(json.dumps(out))
"""


def _read_speed(files: list[Path], cold: bool) -> float:
    """Bytes per second reading ``files`` whole with plain reads (cold: their cached pages dropped first)."""
    total, seconds = 0, 0.0
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                if not got:
                    break
                offset += got
            seconds += time.perf_counter() - t
            total += offset
        finally:
            os.close(fd)
    return total / seconds


def _checkpoint(shape: str, directory: Path) -> None:
    if (directory / "config.json").is_file():
        return
    print(f"writing a random {shape} checkpoint to {directory} ...", file=sys.stderr)
    torch.manual_seed(0)
    model = optlm.AutoModelForCausalLM.from_config(config_from_name(shape))
    model.save_pretrained(directory)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--dir", default=None, help="checkpoint directory (made if empty; default: a temporary one)")
    ap.add_argument("--windows", default="2,4", help="layer slots of the offloaded runs (0 = the whole model)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or tmp)
        _checkpoint(args.shape, directory)
        files = sorted(directory.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        config = read_config(directory / "config.json")
        per_layer, rest, layers = layer_bytes(optlm.OPTForCausalLM, config, torch.float32)
        rows = []
        for window in [0, *map(int, args.windows.split(","))]:
            r = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(window), args.batch_sizes,
                                str(args.prompt), str(args.new_tokens), str(args.threads)],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append((window, json.loads(r.stdout.strip().splitlines()[-1])))
        warm, cold = _read_speed(files, cold=False), _read_speed(files, cold=True)

    tokens = [run["tokens"] for _, result in rows for run in result["runs"].values()]
    same = all(t == tokens[0] for t in tokens)
    print(f"{args.shape} shape, float32, {size / 1e9:.2f} GB on disk ({layers} layers of {per_layer / 2**20:.0f} MiB, "
          f"{rest / 2**20:.0f} MiB resident besides); prompt {args.prompt}, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads; greedy tokens identical in every run: {same}")
    print(f"read speed of the checkpoint: {warm / 1e9:.2f} GB/s from the page cache, {cold / 1e9:.2f} GB/s from the "
          f"disk (cached pages dropped); a streamed decode step reads {per_layer * layers / 1e9:.2f} GB, so at most "
          f"{warm / (per_layer * layers):.2f} steps/s warm, {cold / (per_layer * layers):.2f} cold")
    print()
    batches = list(rows[0][1]["runs"])
    print("| model | peak RSS GiB | load s | " + " | ".join(f"batch {b} prefill tok/s | batch {b} decode tok/s"
                                                         for b in batches) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(batches))
    for window, result in rows:
        name = "whole" if window == 0 else f"offload, {window} layer slots"
        cells = " | ".join(f"{result['runs'][b]['prefill']:.1f} | {result['runs'][b]['decode']:.2f}" for b in batches)
        print(f"| {name} | {result['peak'] / 2**30:.2f} | {result['load_s']:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
