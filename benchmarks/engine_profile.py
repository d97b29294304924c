"""Where the engine's time goes: prefill and decode-step time at 64 rows (with a torch.profiler table), and
single-request decoding through the engine beside ``generate`` in the same process.

    python benchmarks/engine_profile.py                    # this checkout
    python benchmarks/engine_profile.py --tree OTHER_TREE  # another source tree (e.g. a git worktree)

Random-weight opt-125m shape, 2 threads, 64 requests of 32–512 random token ids (the prompts of
benchmarks/engine.py's seed), greedy. Optimised code paths called through ctypes (optlm's kernels) do not show
up as rows of the profiler table; the step time includes them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=None, help="import optlm from this source tree")
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from optlm import LLMEngine, OPTForCausalLM, SamplingParams
    from optlm.benchmark import random_checkpoint
    from optlm.fast import optimize, set_threads

    set_threads(2)
    model = optimize(OPTForCausalLM.from_pretrained(random_checkpoint("opt-125m")))
    engine = LLMEngine(model, None, max_num_seqs=64, kv_cache_memory=4 * 2**30)
    rng = random.Random(0)
    for i in range(64):
        prompt = [rng.randrange(4, 50272) for _ in range(rng.randrange(32, 513))]
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=60, min_tokens=60,
                                                          ignore_eos=True))
    start = time.perf_counter()
    while any(s.pending > 1 for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    print(f"prefill of all 64 prompts: {time.perf_counter() - start:.1f} s")
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    print(f"decode step, 64 rows: {(time.perf_counter() - start) / args.steps:.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    for rid in list(engine.requests):
        engine.abort_request(rid)

    ids = [[5] * 128]  # one request alone: the engine against generate, interleaved

    def engine_run(n: int) -> float:
        engine.add_request(f"alone-{time.perf_counter()}", ids[0],
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - t

    def generate_run(n: int) -> float:
        t = time.perf_counter()
        model.generate(torch.tensor(ids), max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t

    engine_run(4)
    generate_run(4)
    rates: dict[str, list[float]] = {"engine": [], "generate": []}
    for _ in range(4):
        rates["engine"].append(63 / (engine_run(64) - engine_run(1)))
        rates["generate"].append(63 / (generate_run(64) - generate_run(1)))
    for name, values in rates.items():
        print(f"batch-1 decode through {name}: {statistics.median(values):.1f} tok/s (median of "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
