"""Peak resident memory of loading an opt-125m-shaped checkpoint, optlm vs transformers.

Usage: python benchmarks/load_memory.py [--dtype float32|float16] [--size opt-125m]

Each load runs in a fresh subprocess; the table gives the peak RSS (VmHWM) after importing the library
and after from_pretrained, next to the size of the weight file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import sys, torch
torch.set_num_threads(2)

def hwm():  # peak RSS of this process image in MiB (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

lib, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if lib == "optlm":
    from optlm import OPTForCausalLM
else:
    from transformers import OPTForCausalLM
base = hwm()
model = OPTForCausalLM.from_pretrained(path, dtype=dtype)
with torch.no_grad():
    model(torch.ones(1, 8, dtype=torch.long))
print(base, hwm())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="opt-125m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    import torch

    from optlm import OPTConfig, OPTForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = OPTForCausalLM(OPTConfig.from_name(args.size)).to(getattr(torch, args.dtype))
        model.save_pretrained(tmp)
        del model
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        print(f"{args.size} random weights, {args.dtype}, safetensors file {size:.0f} MiB")
        print("| library | RSS after import (MiB) | peak RSS after load + forward (MiB) | load cost (MiB) |")
        print("|---|---:|---:|---:|")
        for lib in ("optlm", "transformers"):
            out = subprocess.run([sys.executable, "-c", PROBE, lib, tmp, args.dtype], capture_output=True, text=True)
            if out.returncode:
                print(f"| {lib} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            base, peak = map(float, out.stdout.split())
            print(f"| {lib} | {base:.0f} | {peak:.0f} | {peak - base:.0f} |")


if __name__ == "__main__":
    main()
