"""Serving many adapters at once: throughput of requests spread over distinct LoRA adapters against the same
requests on the base model, through optlm's engine.

    python benchmarks/adapters_serve.py --markdown benchmarks/RESULTS.md

The same requests (random prompts, a fixed number of new tokens each, greedy, no early stop) run on a random
opt-125m-shaped checkpoint twice per round: every request on the base model, then each request with one of
``--adapters`` distinct LoRA adapters (round robin, random non-zero weights, peft's default targets q_proj and
v_proj unless ``--targets``). Rounds alternate the two, so drift on a busy machine hits both alike; the table
gives each round and the median ratio. Throughput is generated tokens per second of wall time, prefill included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from engine import requests  # benchmarks/engine.py

from optlm import LLM, LoRARequest, SamplingParams
from optlm.benchmark import publish, random_checkpoint
from optlm.fast import optimize
from optlm.hf import OPTForCausalLM


def make_adapters(checkpoint: Path, out: Path, n: int, rank: int, targets: list[str]) -> list[Path]:
    from optlm.peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(OPTForCausalLM.from_pretrained(checkpoint),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                          init_lora_weights="gaussian"))
        with torch.no_grad():  # a trained adapter has non-zero B
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)
        model.save_pretrained(out / f"adapter{i}")
        dirs.append(out / f"adapter{i}")
    return dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="opt-125m", help="published OPT shape of the random checkpoint")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args(argv)

    checkpoint = random_checkpoint(args.shape)
    prompts = requests(args.requests, args.min_prompt, args.max_prompt, 50272)
    params = SamplingParams(temperature=0, max_tokens=args.new, min_tokens=args.new, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(checkpoint, Path(tmp), args.adapters, args.rank, args.targets.split(","))
        loras = [LoRARequest(f"adapter{i % len(dirs)}", i % len(dirs) + 1, str(dirs[i % len(dirs)]))
                 for i in range(len(prompts))]
        # What optlm.load does, without a tokenizer (the random checkpoint has none; prompts are token ids). The
        # base model runs in an engine of its own, without adapter layers, as it would be served alone.
        engines = {"base": (LLM(optimize(OPTForCausalLM.from_pretrained(checkpoint)), max_num_seqs=args.requests),
                            None),
                   "adapters": (LLM(optimize(OPTForCausalLM.from_pretrained(checkpoint)), enable_lora=True,
                                    max_loras=args.adapters, max_num_seqs=args.requests), loras)}
        for llm, lora in engines.values():  # warm-up; loads every adapter once
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), lora_request=lora, use_tqdm=False)
        rows, ratios = [], []
        print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.new} new each, "
              f"{args.adapters} adapters r={args.rank} on {args.targets}, {torch.get_num_threads()} threads")
        for r in range(args.rounds):
            speed = {}
            for name, (llm, lora) in engines.items():
                start = time.perf_counter()
                outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                seconds = time.perf_counter() - start
                speed[name] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
            ratios.append(speed["adapters"] / speed["base"])
            rows.append(f"| {r + 1} | {speed['base']:.1f} | {speed['adapters']:.1f} | {ratios[-1]:.0%} |")
            print(rows[-1], flush=True)
    table = "\n".join([f"{args.requests} requests over {args.adapters} LoRA adapters (r={args.rank}, "
                       f"{args.targets}), {args.shape} shape, {args.new} new tokens each:", "",
                       "| round | base model tok/s | with adapters tok/s | adapters / base |", "|---|---|---|---|",
                       *rows, f"| median | | | {statistics.median(ratios):.0%} |"])
    return publish(table, args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
