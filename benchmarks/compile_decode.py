"""Does torch.compile pay for the decode step? Compile time and step time, compiled vs eager.

Usage: python benchmarks/compile_decode.py [--size opt-125m] [--precision int8] [--steps 20]

Random weights, batch 1, after a 128-token prompt, with ``optlm.fast.optimize`` applied. optlm's kernels are
registered as opaque custom ops for the compiled run (dynamo cannot trace ctypes calls); the cache length
grows every step, so the step is compiled with ``dynamic=True``. Compile time = the first three compiled
calls (tracing, code generation, the recompiles that follow); step times are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import optlm
from optlm import OPTConfig, OPTForCausalLM, kernels
from optlm.fast import optimize, set_threads
from optlm.generate import decode_one, new_cache, prefill


def as_custom_ops() -> None:
    """Route optlm's fp32 and int8 kernels through torch.library ops, which torch.compile keeps opaque."""
    f32, i8 = kernels.linear_f32, kernels.linear_int8

    @torch.library.custom_op("optlm_bench::linear_f32", mutates_args=())
    def op_f32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return f32(x.contiguous(), w, b, check=False)

    @op_f32.register_fake
    def _(x, w, b):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.custom_op("optlm_bench::linear_int8", mutates_args=())
    def op_i8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return i8(x.contiguous(), w, s, b, check=False)

    @op_i8.register_fake
    def _(x, w, s, b):
        return x.new_empty(x.shape[0], w.shape[0])

    kernels.linear_f32 = lambda x, w, b=None, check=True: op_f32(x, w, b)
    kernels.linear_int8 = lambda x, w, s, b=None, check=True: op_i8(x, w, s, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="opt-125m")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    set_threads()
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig.from_name(args.size)).eval()
    if args.precision == "int8":
        optlm.quantize(model, "int8")
    optimize(model)
    if kernels.available():
        as_custom_ops()
    cache = new_cache(model, 1, 128 + 4 * args.steps + 8)

    def steps(fn) -> float:
        times = []
        with torch.no_grad():
            for _ in range(args.steps):
                start = time.perf_counter()
                fn(model, torch.tensor([5]), torch.tensor([cache.length]), cache)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    with torch.no_grad():
        prefill(model, torch.randint(4, 1000, (1, 128)), None, cache)
    eager = steps(decode_one)
    compiled = torch.compile(decode_one, dynamic=True)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            compiled(model, torch.tensor([5]), torch.tensor([cache.length]), cache)
    compile_s = time.perf_counter() - start
    fast = steps(compiled)
    print(f"{args.size} {args.precision}: compile {compile_s:.1f} s; decode step eager {eager:.2f} ms, "
          f"compiled {fast:.2f} ms, torch {torch.__version__}")


if __name__ == "__main__":
    main()
