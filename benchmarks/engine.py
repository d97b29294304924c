"""Throughput of many requests: optlm's continuous-batching engine against the same requests run one after
another, transformers' padded batch ``generate`` and CTranslate2's ``generate_batch``.

    pip install -e ".[bench]"
    python benchmarks/engine.py --markdown benchmarks/RESULTS.md

Every engine gets the same requests (prompts of random lengths, a fixed number of new tokens each, greedy, no
early stop) on the same random opt-125m-shaped checkpoint. Throughput is generated tokens per second of wall
time, prefill included. The sequential run times a sample of the requests (``--sequential-sample``; tokens per
second do not depend on how many are run). Results vary between machines and runs; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import time
from pathlib import Path

import torch

from optlm import LLM, SamplingParams
from optlm.benchmark import ct2_model, publish, random_checkpoint


def requests(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


def run_engine(checkpoint: Path, precision: str, prompts: list[list[int]], new: int, max_num_seqs: int,
               kv_cache_memory: int) -> tuple[float, int, dict]:
    from optlm import OPTForCausalLM
    from optlm.fast import optimize

    # What optlm.load does, without a tokenizer (the random checkpoint has none; prompts are token ids).
    model = optimize(OPTForCausalLM.from_pretrained(checkpoint, quantize=None if precision == "fp32" else precision))
    llm = LLM(model, max_num_seqs=max_num_seqs, kv_cache_memory=kv_cache_memory)
    params = SamplingParams(temperature=0, max_tokens=new, min_tokens=new, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    engine.cache.pool.peak = engine.cache.blocks_in_use
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    made = sum(len(o.outputs[0].token_ids) for o in outs)
    cache = engine.cache
    per_token = cache.bytes_per_token(model.config, cache.k.dtype)
    stats = {"peak_mb": cache.pool.peak * cache.block_size * per_token / 2**20,
             "fixed_mb": max_num_seqs * engine.max_model_len * per_token / 2**20,
             "preemptions": engine.scheduler.preemptions}
    return seconds, made, stats


def run_sequential(checkpoint: Path, precision: str, prompts: list[list[int]], new: int) -> tuple[float, int]:
    from optlm.benchmark import load_optlm

    run = load_optlm(checkpoint, precision)  # from_pretrained → optimize → generate, batch 1
    run(torch.tensor([prompts[0][:8]]), 2)
    start, made = time.perf_counter(), 0
    for p in prompts:
        made += len(run(torch.tensor([p]), new)[0])
    return time.perf_counter() - start, made


def run_transformers(checkpoint: Path, prompts: list[list[int]], new: int) -> tuple[float, int]:
    import transformers

    model = transformers.OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 1)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers' generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=1)
    return time.perf_counter() - start, (out.shape[1] - width) * len(prompts)


def run_ctranslate2(checkpoint: Path, precision: str, prompts: list[list[int]], new: int,
                    max_batch_size: int) -> tuple[float, int]:
    import ctranslate2

    quantization = {"fp32": "float32", "int8": "int8"}[precision]
    generator = ctranslate2.Generator(str(ct2_model(checkpoint, quantization)), device="cpu",
                                      compute_type=quantization, intra_threads=torch.get_num_threads())
    tokens = [[f"t{i}" for i in p] for p in prompts]
    generator.generate_batch(tokens[:2], max_length=4, sampling_topk=1)  # warm-up
    start = time.perf_counter()
    results = generator.generate_batch(tokens, max_length=new, min_length=new, sampling_topk=1,
                                       include_prompt_in_result=False, max_batch_size=max_batch_size)
    return time.perf_counter() - start, sum(len(r.sequences_ids[0]) for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="opt-125m", help="published OPT shape of the random checkpoint")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--kv-cache-memory", type=float, default=4.0, help="GiB for the engine's paged cache")
    parser.add_argument("--sequential-sample", type=int, default=8,
                        help="requests timed one after another (every k-th of the list)")
    parser.add_argument("--engines", default="engine,sequential,transformers,ctranslate2")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args(argv)

    checkpoint = random_checkpoint(args.shape)
    vocab = 50272
    prompts = requests(args.requests, args.min_prompt, args.max_prompt, vocab)
    step = max(1, len(prompts) // args.sequential_sample)
    sample = prompts[::step][:args.sequential_sample]
    chosen = args.engines.split(",")
    have_ct2 = importlib.util.find_spec("ctranslate2") is not None
    rows, notes = [], []
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.new} new each, "
          f"{torch.get_num_threads()} threads")
    for precision in args.precisions.split(","):
        results = {}
        if "engine" in chosen:
            s, n, stats = run_engine(checkpoint, precision, prompts, args.new, args.max_num_seqs,
                                     int(args.kv_cache_memory * 2**30))
            results["optlm engine (all at once)"] = n / s
            notes.append(f"{precision}: cache peak {stats['peak_mb']:.0f} MiB paged vs {stats['fixed_mb']:.0f} MiB "
                         f"for {args.max_num_seqs} slots x context; {stats['preemptions']} preemptions")
        gc.collect()
        if "sequential" in chosen:
            s, n = run_sequential(checkpoint, precision, sample, args.new)
            results[f"optlm one at a time ({len(sample)} timed)"] = n / s
        gc.collect()
        if "transformers" in chosen and precision == "fp32":
            s, n = run_transformers(checkpoint, prompts, args.new)
            results["transformers padded batch"] = n / s
        gc.collect()
        if "ctranslate2" in chosen and have_ct2:
            s, n = run_ctranslate2(checkpoint, precision, prompts, args.new, args.max_num_seqs)
            results["ctranslate2 generate_batch"] = n / s
        gc.collect()
        base = results.get("optlm engine (all at once)")
        for name, tps in results.items():
            ratio = f"{base / tps:.2f}x" if base else "-"
            rows.append(f"| {precision} | {name} | {tps:.1f} | {ratio} |")
            print(rows[-1], flush=True)
    table = "\n".join(["| precision | engine | generated tok/s | engine is faster by |", "|---|---|---|---|", *rows])
    table += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return publish(table, args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
