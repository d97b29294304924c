"""Batch-1 decode speed of two optlm source trees, each in its own process (to compare before / after a change).

    git worktree add /tmp/base <commit>
    for order in "NEW OLD" "OLD NEW" "OLD NEW" "NEW OLD"; do for tree in $order; do
        for p in fp32 int8; do python benchmarks/decode_versions.py $tree $p; done; done; done

Prints the tree, the precision and the median decode tok/s of four (1-token, 65-token) generate pairs on a random
opt-125m-shaped checkpoint, prompt 128, 2 threads, through from_pretrained -> optimize -> generate.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import optlm  # noqa: E402 (the tree given on the command line)

assert optlm.__file__.startswith(sys.argv[1]), optlm.__file__
from optlm import OPTForCausalLM  # noqa: E402
from optlm.benchmark import random_checkpoint  # noqa: E402
from optlm.fast import optimize, set_threads  # noqa: E402

set_threads(2)
prec = sys.argv[2]
m = optimize(OPTForCausalLM.from_pretrained(random_checkpoint("opt-125m"), quantize=None if prec == "fp32" else prec))
ids = torch.randint(4, 50000, (1, 128), generator=torch.Generator().manual_seed(0))


def run(n: int) -> float:
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=n, min_new_tokens=n)
    return time.perf_counter() - t


run(4)
rates = []
for _ in range(4):
    t1 = run(1)
    tn = run(65)
    rates.append(64 / (tn - t1))
print(sys.argv[1], prec, round(statistics.median(rates), 1), [round(r, 1) for r in rates])
