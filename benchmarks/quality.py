"""Quality of the reduced precisions against fp32: logit KL / top-1 agreement, and perplexity on held-out text.

    python benchmarks/quality.py                      # random opt-125m shape + the bundled model
    python benchmarks/quality.py --model DIR --data FILE --max-tokens 40000

1. Logits: a random-weight opt-125m-shaped checkpoint (the one ``optlm bench`` uses), random prompts; for each
   precision the mean KL(fp32 || precision) of the next-token distributions, the share of positions whose
   top-1 token agrees, and the largest logit difference relative to the largest fp32 logit.
2. Perplexity: a trained checkpoint (default: the bundled model) over held-out text (default: the
   wikitext-2 test split beside this checkout), sliding windows; the relative change against fp32.
Limits held (exit status 1 when missed): perplexity within 1 % of fp32 for int8 and bf16, 2 % for
int8-dynamic, 5 % for int4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from optlm import OPTForCausalLM
from optlm.benchmark import random_checkpoint
from optlm.evaluate import encode_file, perplexity
from optlm.fast import optimize, set_threads
from optlm.tokenizer import Tokenizer

PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "int4")
# Relative perplexity increase allowed: weight-only int8 and bf16 1 %, int8 with 7-bit activations 2 %, int4 5 %.
PPL_LIMITS = {"bf16": 0.01, "int8": 0.01, "int8-dynamic": 0.02, "int4": 0.05}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def load(checkpoint: Path, precision: str) -> OPTForCausalLM:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantize = precision if precision.startswith("int") else None
    return optimize(OPTForCausalLM.from_pretrained(checkpoint, dtype=dtype, quantize=quantize))


@torch.no_grad()
def logit_agreement(checkpoint: Path, batch: int = 4, length: int = 128) -> list[str]:
    ref = load(checkpoint, "fp32")
    ids = torch.randint(4, ref.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    want = ref(ids).logits.float()
    del ref
    rows = ["| precision | mean KL(fp32 ‖ p) | top-1 agreement | max |Δ logit| / max |logit| |", "|---|---:|---:|---:|"]
    for precision in PRECISIONS[1:]:
        got = load(checkpoint, precision)(ids).logits.float()
        kl = F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
        rel = (got - want).abs().max() / want.abs().max()
        rows.append(f"| {precision} | {kl.mean():.2e} | {100 * agree:.2f} % | {rel:.4f} |")
    return rows


def perplexities(checkpoint: Path, data: Path, max_tokens: int, stride: int | None,
                 unwrap: bool = False) -> tuple[list[str], bool]:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = torch.as_tensor(encode_file(data, tokenizer, unwrap=unwrap)[:max_tokens])
    rows = ["| precision | perplexity | vs fp32 | limit |", "|---|---:|---:|---:|"]
    base, ok = None, True
    for precision in PRECISIONS:
        model = load(checkpoint, precision)
        ppl = perplexity(model, ids, stride=stride, batch_size=4).perplexity
        del model
        if base is None:
            base = ppl
            rows.append(f"| {precision} | {ppl:.3f} | – | – |")
            continue
        change, limit = ppl / base - 1, PPL_LIMITS[precision]
        ok &= change <= limit
        rows.append(f"| {precision} | {ppl:.3f} | {100 * change:+.2f} % | {100 * limit:.0f} % |")
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-125m", help="random-weight shape for the logit comparison")
    parser.add_argument("--model", default=None, help="trained checkpoint for perplexity (default: bundled)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="held-out text file")
    parser.add_argument("--max-tokens", type=int, default=40_000, help="evaluate the first N tokens of --data")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: half a window)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--unwrap", action="store_true", help="join hard-wrapped lines of --data into paragraphs "
                        "(as the bundled model was trained)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    print(f"## Logits: random-weight {args.shape} shape, 4 x 128 random tokens\n")
    print("\n".join(logit_agreement(random_checkpoint(args.shape))))
    if args.model is None:
        from optlm.bundled import bundled_model_path

        checkpoint = bundled_model_path()
    else:
        checkpoint = Path(args.model)
    print(f"\n## Perplexity: {checkpoint.name} on {Path(args.data).name} (first {args.max_tokens} tokens)\n")
    rows, ok = perplexities(checkpoint, Path(args.data), args.max_tokens, args.stride, args.unwrap)
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
