"""Every linear layer of a model shape, once, through each CPU kernel: the time a decode step spends in matmuls.

Usage: python benchmarks/kernels.py [--size opt-125m] [--rows 1,2,4,8,32,128] [--repeats 5] [--threads N]
                                   [--huge-pages]

Random weights. Prints the machine's memory read speed for reference, then, for each row count M
(1 = batch-1 decode), milliseconds for one pass over all weights (q/k/v fused, out_proj, fc1, fc2 per layer,
and the LM head) and the weight bytes read per second, for optlm's AVX2 kernels (fp32, bf16, int8, int4
group 64) and PyTorch's (fp32 F.linear, fp32 oneDNN, bf16 F.linear, int8 ``_weight_int8pack_mm``, int4
``_weight_int4pack_mm_for_cpu``). Kernels are interleaved within each repeat and medians reported.
``--huge-pages`` first moves every weight into memory backed by 2 MiB pages (``optlm.huge_pages``), as the
decode step's install does with a model's weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from optlm import OPTConfig, huge_pages, kernels
from optlm.fast import set_threads


def shapes(cfg: OPTConfig) -> list[tuple[int, int]]:
    d, f = cfg.hidden_size, cfg.ffn_dim
    return [(3 * d, d), (d, d), (f, d), (d, f)] * cfg.num_hidden_layers + [(cfg.vocab_size, d)]


def memory_read_gbs(mib: int = 512, repeats: int = 7) -> float:
    """A reference for the GB/s columns: reading a buffer far larger than the caches, with every thread."""
    buf = torch.randn(mib * 2**20 // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.amax()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="opt-125m")
    ap.add_argument("--rows", default="1,2,4,8,32,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--huge-pages", action="store_true", help="weights in 2 MiB pages (optlm.huge_pages)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"optlm kernels unavailable: {kernels.unavailable_reason()}")
    cfg = OPTConfig.from_name(args.size)
    torch.manual_seed(0)
    layers = []
    for n, k in shapes(cfg):
        w = torch.randn(n, k) / k**0.5
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        q4 = torch.randint(0, 16, (n, k))
        layers.append((w, w.bfloat16(), q, torch.rand(n), torch.rand(n).bfloat16(), torch.randn(n),
                       kernels.pack_int4(q4), torch.rand(n, k // 64), -torch.rand(n, k // 64),
                       torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.int(), 1),
                       torch.rand(k // 64, n, 2).bfloat16()))
    params = sum(n * k for n, k in shapes(cfg))
    if args.huge_pages:
        moved = huge_pages.place(torch.nn.Module(), [t for layer in layers for t in layer])
        print(f"weights in 2 MiB pages: {moved / 1e6:.0f} MB moved" if moved else "huge pages unavailable here")
    engines = {
        "optlm fp32": (4, lambda x, L: kernels.linear_f32(x, L[0], L[5])),
        "torch fp32 F.linear": (4, lambda x, L: F.linear(x, L[0], L[5])),
        "torch fp32 oneDNN": (4, lambda x, L: torch.ops.mkldnn._linear_pointwise(x, L[0], L[5], "none", [], "")),
        "optlm bf16": (2, lambda x, L: kernels.linear_bf16(x, L[1], L[5])),
        "torch bf16 F.linear": (2, lambda x, L: F.linear(x.bfloat16(), L[1], L[5].bfloat16())),
        "optlm int8": (1, lambda x, L: kernels.linear_int8(x, L[2], L[3], L[5])),
        "torch int8pack": (1, lambda x, L: torch._weight_int8pack_mm(x.bfloat16(), L[2], L[4]) + L[5]),
        "optlm int4": (0.5, lambda x, L: kernels.linear_int4(x, L[6], L[7], L[8], 64, L[5])),
        "torch int4pack": (0.5, lambda x, L: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), L[9], 64, L[10]) + L[5]),
    }
    print(f"{args.size}: {len(layers)} matrices, {params / 1e6:.1f} M weights, {threads} threads, "
          f"torch {torch.__version__}; memory read (max over 512 MiB of floats): {memory_read_gbs():.1f} GB/s")
    print(f"| rows | {' | '.join(engines)} |")
    print(f"|---:|{'---:|' * len(engines)}")
    for M in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(M, k) for k in {k for _, k in shapes(cfg)}}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, (_, fn) in engines.items():
                start = time.perf_counter()
                with torch.no_grad():
                    for L in layers:
                        fn(xs[L[0].shape[1]], L)
                times[name].append(time.perf_counter() - start)
        cells = []
        for name, (nbytes, _) in engines.items():
            t = statistics.median(times[name])
            cells.append(f"{t * 1e3:.1f} ms ({params * nbytes / t / 1e9:.0f} GB/s)")
        print(f"| {M} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
