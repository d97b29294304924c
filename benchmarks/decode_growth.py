"""Cost of one cached decode step as the cache fills: it should grow only by attention's share.

Usage: python benchmarks/decode_growth.py [--size opt-125m] [--short 40] [--long 520] [--repeats 20]

Random weights, float32, batch 1. Steps with `short` and `long` filled cache slots are timed alternately
(so machine noise hits both alike) and the medians printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optlm import KVCache, OPTConfig, OPTForCausalLM


def step_time(model: OPTForCausalLM, filled: int) -> float:
    cache = KVCache.for_model(model.config, 1, filled + 1, torch.float32)
    with torch.no_grad():
        model(torch.randint(4, 1000, (1, filled)), past_key_values=cache)
        start = time.perf_counter()
        model(torch.tensor([[5]]), past_key_values=cache)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="opt-125m")
    ap.add_argument("--short", type=int, default=40)
    ap.add_argument("--long", type=int, default=520)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig.from_name(args.size)).eval()
    times: dict[int, list[float]] = {args.short: [], args.long: []}
    for _ in range(args.repeats):
        for filled in times:
            times[filled].append(step_time(model, filled))
    print(f"{args.size}, fp32, batch 1, {torch.get_num_threads()} threads, medians of {args.repeats}")
    for filled, ts in times.items():
        print(f"  one cached step with {filled:4d} filled slots: {statistics.median(ts) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
