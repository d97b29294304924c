"""What each part of a decode step costs: the PyTorch path (before) beside the one-call C step (after).

    python benchmarks/decode_profile.py                       # opt-125m and opt-350m shapes, fp32 and int8
    python benchmarks/decode_profile.py --markdown out.md     # also append the tables to a file

Random-weight checkpoints of the published shapes (optlm.benchmark.random_checkpoint), batch 1, a 128-token
prompt, then greedy decode steps through ``optlm.generate.decode_one`` (what ``generate`` runs per token: the step,
the finite-logits check) at contexts 129 … 128 + steps. The two paths alternate in rounds (medians reported).

* Before (``decode_step`` off): weight matmuls are timed by hooks around every linear layer (q/k/v, out, fc1,
  fc2, head); everything else in the step — attention, norms, residuals, reshapes, Python — is "the rest".
* After: the C step times its own parts (``DecodeStep.timing``); "outside" is the rest of ``decode_one``
  (embedding lookup, building the frame, the check).

The non-matmul share is the part of a step that is not the weight matmuls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _linears(model) -> list:
    from optlm.fast import attention_modules

    mods = [m for m in model.modules() if hasattr(type(m), "kernel_spec")]
    mods += [a.fused_qkv.linear for a in attention_modules(model) if a.fused_qkv is not None]
    return mods


def _timed_linears(model) -> tuple[list[float], list]:
    """Hooks adding each linear call's seconds to a counter (returned with the hook handles)."""
    spent, start = [0.0], [0.0]

    def before(*_):
        start[0] = time.perf_counter()

    def after(*_):
        spent[0] += time.perf_counter() - start[0]

    handles = []
    for m in _linears(model):
        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    return spent, handles


def profile(shape: str, precision: str, steps: int, rounds: int) -> dict:
    import torch

    from optlm.benchmark import load_optlm, random_checkpoint
    from optlm.generate import decode_one, new_cache, prefill

    model = load_optlm(random_checkpoint(shape), precision).model
    step = model.decode_step
    assert step is not None, "the C decode step did not install"
    ids = torch.randint(4, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    before = {"step": [], "matmul": []}
    after = {"step": [], **{p: [] for p in step.PARTS}}
    for _ in range(rounds):
        for fast in (False, True):
            model.decode_step = step if fast else None
            cache = new_cache(model, 1, 128 + steps + 1)
            with torch.no_grad():
                logits, _ = prefill(model, ids, None, cache)
                token = logits.argmax(-1)
                decode_one(model, token, cache)  # warm
                if fast:
                    step.timing = torch.zeros(len(step.PARTS), dtype=torch.float64)
                else:
                    spent, handles = _timed_linears(model)
                t0 = time.perf_counter()
                for _ in range(steps):
                    logits, _ = decode_one(model, token, cache)
                    token = logits.argmax(-1)
                total = (time.perf_counter() - t0) / steps
            if fast:
                after["step"].append(total)
                for part, sec in zip(step.PARTS, step.timing.tolist(), strict=True):
                    after[part].append(sec / steps)
                step.timing = None
            else:
                for h in handles:
                    h.remove()
                before["step"].append(total)
                before["matmul"].append(spent[0] / steps)
    model.decode_step = step
    med = {k: statistics.median(v) for k, v in before.items()}, {k: statistics.median(v) for k, v in after.items()}
    return {"before": med[0], "after": med[1]}


def tables(results: dict[tuple[str, str], dict]) -> str:
    ms = lambda s: f"{1000 * s:.2f}"  # noqa: E731
    summary = ["| shape, precision | path | step ms | weight matmuls ms | the rest ms | non-matmul share |",
               "|---|---|---:|---:|---:|---:|"]
    parts = ["| shape, precision | q/k/v | attention | out_proj | fc1 | fc2 | head | norms, residuals, activation "
             "| outside the C call | step ms |", "|---|" + "---:|" * 9]
    for (shape, prec), r in results.items():
        b, a = r["before"], r["after"]
        matmul_a = sum(a[p] for p in ("qkv", "out_proj", "fc1", "fc2", "head"))
        summary.append(f"| {shape} {prec} | PyTorch (before) | {ms(b['step'])} | {ms(b['matmul'])} | "
                       f"{ms(b['step'] - b['matmul'])} | {1 - b['matmul'] / b['step']:.0%} |")
        summary.append(f"| {shape} {prec} | one C call (after) | {ms(a['step'])} | {ms(matmul_a)} | "
                       f"{ms(a['step'] - matmul_a)} | {1 - matmul_a / a['step']:.0%} |")
        inside = sum(a[p] for p in ("qkv", "attention", "out_proj", "fc1", "fc2", "head", "other"))
        parts.append(f"| {shape} {prec} | {ms(a['qkv'])} | {ms(a['attention'])} | {ms(a['out_proj'])} | "
                     f"{ms(a['fc1'])} | {ms(a['fc2'])} | {ms(a['head'])} | {ms(a['other'])} | "
                     f"{ms(a['step'] - inside)} | {ms(a['step'])} |")
    return "\n".join(summary) + "\n\nThe C step's parts (ms per step):\n\n" + "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="opt-125m,opt-350m")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two paths (medians)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    parser.add_argument("--markdown", default=None, help="also append the tables to this Markdown file")
    args = parser.parse_args()
    from optlm.fast import set_threads

    threads = set_threads(args.threads)
    results = {}
    for shape in args.shapes.split(","):
        for prec in args.precisions.split(","):
            results[(shape, prec)] = profile(shape, prec, args.steps, args.rounds)
            print(f"{shape} {prec}: done", file=sys.stderr)
    out = (f"threads: {threads}; batch 1, prompt 128, {args.steps} decode steps per round, medians of "
           f"{args.rounds} alternating rounds\n\n" + tables(results))
    print(out)
    if args.markdown:
        with Path(args.markdown).open("a", encoding="utf-8") as f:
            f.write(f"\n```\npython benchmarks/decode_profile.py {' '.join(sys.argv[1:])}\n```\n\n{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
