"""Load on an OpenAI-compatible server: throughput, time to first token and inter-token latency under 1 … 64
concurrent streams.

    optlm serve --model DIR --port 8000 &            # or any OpenAI-compatible server on the same checkpoint
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,8,32,64

Each stream sends greedy completion requests (prompts of 32–512 random token ids, ``--new`` tokens, EOS ignored
unless ``--no-ignore-eos``) one after another until ``--requests`` per level are done. Reported per level:
generated tokens (streamed text chunks) per second of wall time, TTFT and inter-token latency p50 / p99, errors.
Prompts are token ids, so the server's tokenizer does not matter; ``--text`` sends "word word …" instead, for
servers that take only text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one(http: httpx.AsyncClient, body: dict, stats: dict) -> None:
    start = time.perf_counter()
    last = None
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"] += 1
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats["errors"] += 1
                    return
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - start)
                else:
                    stats["itl"].append(now - last)
                last = now
                tokens += 1  # one text chunk per generated token (pieces of one character may merge)
    except httpx.HTTPError:
        stats["errors"] += 1
        return
    stats["tokens"] += tokens


async def level(url: str, model: str | None, concurrency: int, requests: int, new: int, text: bool,
                seed: int, ignore_eos: bool) -> dict:
    rng = random.Random(seed)
    bodies = []
    for _ in range(requests):
        n = rng.randrange(32, 513)
        prompt = " ".join("word" for _ in range(n)) if text else [rng.randrange(4, 50000) for _ in range(n)]
        body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
        if ignore_eos:
            body["ignore_eos"] = True
        if model:
            body["model"] = model
        bodies.append(body)
    stats = {"ttft": [], "itl": [], "errors": 0, "tokens": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            await one(http, queue.get_nowait(), stats)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "tok_s": stats["tokens"] / wall, "ttft_p50": percentile(stats["ttft"], 0.5),
            "ttft_p99": percentile(stats["ttft"], 0.99), "itl_p50": percentile(stats["itl"], 0.5),
            "itl_p99": percentile(stats["itl"], 0.99), "errors": stats["errors"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: none)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, "
                                                                 "at least 4)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--text", action="store_true", help="send text prompts instead of token ids")
    parser.add_argument("--label", default="server", help="name of the server in the table")
    parser.add_argument("--seed", type=int, default=None, help="prompt seed (default: the stream count)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="do not send ignore_eos (servers that refuse unknown fields)")
    args = parser.parse_args(argv)
    print("| server | streams | generated tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in (int(x) for x in args.concurrency.split(",")):
        n = args.requests or max(4, 2 * c)
        seed = c if args.seed is None else args.seed
        r = asyncio.run(level(args.url, args.model, c, n, args.new, args.text, seed=seed,
                              ignore_eos=not args.no_ignore_eos))
        print(f"| {args.label} | {c} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
              f"{1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} | {r['errors']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
