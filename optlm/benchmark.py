"""Speed benchmark: optlm against transformers and CTranslate2 on the same random-weight checkpoints.

Every engine generates greedily through its own ``generate`` with the prompt and new-token counts fixed
(``min_new_tokens`` = ``max_new_tokens``, so no engine stops early). From two runs per engine,
one producing 1 token and one producing N:

* time to first token (TTFT) = time of the 1-token run (prefill + one step);
* prefill tok/s = batch x prompt tokens / TTFT;
* decode tok/s = batch x (N - 1) / (time of the N-token run - TTFT).

Engines run interleaved (every engine once per round, several rounds) so drifting machine load hits them
alike, each in a process of its own (:class:`Isolated`); the tables report medians. Memory is measured in a
fresh process per engine (load + one run) as the growth of resident memory over the bare interpreter with its
libraries imported: the peak (for optlm's quantized modes it includes the fp32 checkpoint being read and
converted at load time) and what stays resident after the run.
transformers and CTranslate2 are optional: without them only optlm is measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

OPTLM_PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic", "int4")
CT2_PRECISIONS = ("fp32", "int8")
FRAMEWORKS = ("torch", "flax", "tf")  # optlm's PyTorch core, its JAX/Flax port, its TensorFlow port
PORT_PRECISIONS = ("fp32", "bf16")  # what the JAX and TensorFlow ports run in
CACHE_DIR = Path(os.environ.get("OPTLM_BENCH_CACHE", Path.home() / ".cache" / "optlm-bench"))


@dataclass
class Result:
    engine: str
    ttft: list[float] = field(default_factory=list)  # seconds
    decode: list[float] = field(default_factory=list)  # tok/s
    prefill: list[float] = field(default_factory=list)  # tok/s
    peak_mb: list[float] | None = None  # [peak, after the run]
    full: list[float] = field(default_factory=list)  # seconds of each N-token run
    first: list[float] = field(default_factory=list)  # seconds of the warm-up round's 1-token and N-token runs

    def first_call_s(self) -> float:
        """What the first calls cost beyond steady ones: compilation, for the JAX and TensorFlow ports."""
        return max(0.0, self.first[0] - self.median("ttft")) + max(0.0, self.first[1] - self.median("full"))

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))


# ---- checkpoints ---------------------------------------------------------------------------------------

def publish(table: str, markdown: Path | None) -> int:
    """Print a benchmark script's table and append it to ``markdown`` (when given); the script's exit status."""
    print(table)
    if markdown:
        with Path(markdown).open("a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


def random_checkpoint(shape: str, directory: Path | None = None) -> Path:
    """A random-weight checkpoint of a published shape (``opt-125m``, ``gpt-neo-125m`` ...), written once (with a
    synthetic full-size vocabulary so CTranslate2's converter has token strings for every id)."""
    from .hf import AutoModelForCausalLM
    from .models import config_from_name

    directory = directory or CACHE_DIR / shape
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config_from_name(shape)).save_pretrained(directory)
    return directory


# Each family's special tokens at their ids, and the names transformers' tokenizer gives them.
_SPECIALS = {
    "opt": ({0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"},
            dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")),
    "gpt_neo": ({50256: "<|endoftext|>"},
                dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")),
}


def _synthetic_tokenizer(directory: Path, vocab_size: int, model_type: str) -> None:
    # CTranslate2 takes token strings; "t<id>" names every id but the family's special tokens.
    if (directory / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials, names = _SPECIALS[model_type]
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"])),
                                  **names)
    tok.save_pretrained(directory)


def ct2_model(checkpoint: Path, quantization: str) -> Path:
    """The checkpoint converted by CTranslate2's own converter (cached beside it). CTranslate2 has no GPT-Neo
    converter, so a GPT-Neo checkpoint goes in as the GPT-2 model that computes the same function
    (:func:`gpt2_equivalent`)."""
    import ctranslate2

    from .models import read_config

    out = checkpoint.parent / f"{checkpoint.name}-ct2-{quantization}"
    if not (out / "model.bin").is_file():
        config = read_config(checkpoint / "config.json")
        _synthetic_tokenizer(checkpoint, config.vocab_size, config.model_type)
        source = gpt2_equivalent(checkpoint) if config.model_type == "gpt_neo" else checkpoint
        ctranslate2.converters.TransformersConverter(str(source)).convert(
            str(out), quantization=quantization, force=True)
    return out


GPT2_POSITIONS = 1024  # what the GPT-2 stand-in for a GPT-Neo model keeps of its position table


def gpt2_equivalent(checkpoint: Path) -> Path:
    """A GPT-2 checkpoint computing what the GPT-Neo ``checkpoint`` computes on sequences no longer than its
    local-attention window: the same blocks (pre-LN, gelu_new MLP, learned positions, tied head) with q scaled
    by √head_dim, which cancels GPT-2's 1/√head_dim score scaling (GPT-Neo does not scale), zero q/k/v biases
    (GPT-Neo has none), and GPT-2's transposed (Conv1D) weight layout. Cached beside the checkpoint."""
    import transformers
    from safetensors.torch import load_file

    out = checkpoint.parent / f"{checkpoint.name}-as-gpt2"
    if (out / "config.json").is_file():
        return out
    neo = transformers.GPTNeoConfig.from_pretrained(checkpoint)
    hs = neo.hidden_size // neo.num_heads
    config = transformers.GPT2Config(
        vocab_size=neo.vocab_size, n_positions=min(neo.max_position_embeddings, GPT2_POSITIONS),
        n_embd=neo.hidden_size, n_layer=neo.num_layers, n_head=neo.num_heads, n_inner=neo.intermediate_size,
        activation_function=neo.activation_function, layer_norm_epsilon=neo.layer_norm_epsilon,
        bos_token_id=neo.bos_token_id, eos_token_id=neo.eos_token_id)
    w = {k.removeprefix("transformer."): v for k, v in load_file(checkpoint / "model.safetensors").items()}
    state = {"wte.weight": w["wte.weight"], "wpe.weight": w["wpe.weight"][:config.n_positions],
             "ln_f.weight": w["ln_f.weight"], "ln_f.bias": w["ln_f.bias"]}
    for i in range(neo.num_layers):
        a, h = f"h.{i}.attn.attention.", f"h.{i}."
        qkv = torch.cat([w[a + "q_proj.weight"] * hs**0.5, w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
        state.update({
            h + "attn.c_attn.weight": qkv.T.contiguous(), h + "attn.c_attn.bias": torch.zeros(qkv.shape[0]),
            h + "attn.c_proj.weight": w[a + "out_proj.weight"].T.contiguous(),
            h + "attn.c_proj.bias": w[a + "out_proj.bias"],
            h + "mlp.c_fc.weight": w[h + "mlp.c_fc.weight"].T.contiguous(), h + "mlp.c_fc.bias": w[h + "mlp.c_fc.bias"],
            h + "mlp.c_proj.weight": w[h + "mlp.c_proj.weight"].T.contiguous(),
            h + "mlp.c_proj.bias": w[h + "mlp.c_proj.bias"]})
        for norm in ("ln_1", "ln_2"):
            state.update({h + f"{norm}.weight": w[h + f"{norm}.weight"], h + f"{norm}.bias": w[h + f"{norm}.bias"]})
    model = transformers.GPT2LMHeadModel(config)
    model.transformer.load_state_dict(state, strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / name).is_file():
            (out / name).write_bytes((checkpoint / name).read_bytes())
    return out


# ---- engines: each returns a function (ids, new_tokens) -> generated ids --------------------------------

def load_optlm(checkpoint: Path, precision: str) -> Callable:
    from .fast import optimize
    from .hf import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantize = precision if precision.startswith("int") else None
    # fast=False: optimize() applies everything once (from_pretrained's default would copy the weights twice)
    model = optimize(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, quantize=quantize, fast=False))

    def run(ids: torch.Tensor, n: int) -> list[list[int]]:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    run.model = model  # for the roofline (bytes_per_token)
    return run


def load_transformers(checkpoint: Path) -> Callable:
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    # SDPA where the family has it (OPT); GPT-Neo's reference has only its eager attention.
    attn = "sdpa" if config.model_type == "opt" else "eager"
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation=attn).eval()
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    def run(ids: torch.Tensor, n: int) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        return out[:, ids.shape[1]:].tolist()

    return run


def load_ctranslate2(checkpoint: Path, precision: str, threads: int) -> Callable:
    import ctranslate2

    quantization = {"fp32": "float32", "int8": "int8"}[precision]
    generator = ctranslate2.Generator(str(ct2_model(checkpoint, quantization)), device="cpu",
                                      compute_type=quantization, intra_threads=threads, inter_threads=1)

    def run(ids: torch.Tensor, n: int) -> list[list[int]]:
        tokens = [[f"t{i}" for i in row] for row in ids.tolist()]
        results = generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                           include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in results]

    return run


def load_port(framework: str, checkpoint: Path, precision: str, threads: int) -> Callable:
    """optlm's JAX or TensorFlow port: ``generate`` compiled (once per batch, prompt and token count), with no
    end-of-sequence id, so every run makes exactly the tokens asked for."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    if framework == "flax":
        from .flax import FlaxOPTForCausalLM as cls
    else:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already started in this process: its thread pool is set
            pass
        from .tf import TFOPTForCausalLM as cls
    model = cls.from_pretrained(checkpoint, dtype=dtype)

    def run(ids: torch.Tensor, n: int) -> list[list[int]]:
        out = model.generate(ids.numpy(), max_new_tokens=n, eos_token_id=[])
        return out[:, ids.shape[1]:].tolist()

    return run


def available_peers() -> dict[str, bool]:
    return {name: importlib.util.find_spec(name) is not None for name in ("transformers", "ctranslate2")}


def engine_names(precisions: list[str], peers: dict[str, bool], frameworks: tuple[str, ...] = ("torch",)) -> list[str]:
    names = [f"optlm {p}" for p in precisions] if "torch" in frameworks else []
    names += [f"{f} {p}" for f in ("flax", "tf") if f in frameworks for p in precisions if p in PORT_PRECISIONS]
    if peers.get("transformers"):
        names.append("transformers fp32")
    if peers.get("ctranslate2") and peers.get("transformers"):  # the converter reads the model with transformers
        names += [f"ctranslate2 {p}" for p in CT2_PRECISIONS]
    return names


def load_engine(name: str, checkpoint: Path, threads: int) -> Callable:
    kind, precision = name.split()
    if kind == "optlm":
        return load_optlm(checkpoint, precision)
    if kind == "transformers":
        return load_transformers(checkpoint)
    if kind in ("flax", "tf"):
        return load_port(kind, checkpoint, precision, threads)
    return load_ctranslate2(checkpoint, precision, threads)


class Isolated:
    """An engine loaded and run in a process of its own, driven from here: ``run(ids, n)`` as the engine, and
    :meth:`timed`, timed in that process.

    Why: engines sharing a process changed each other's speed. After CTranslate2 had run in the same process,
    optlm's int8 decoding ran far slower for as long as the process lived, 3 s pauses between runs or not
    (an ad-hoc check; cause not found: CTranslate2 brings its own OpenMP runtime), and the pause below was
    already there for a shorter slowdown. Each engine alone in its process, the rounds still interleaved, is
    the fair comparison."""

    def __init__(self, name: str, checkpoint: Path, threads: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter: no thread pools or runtimes inherited
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_engine, args=(child, name, str(checkpoint), threads), daemon=True)
        self.proc.start()
        child.close()
        self._answer()  # loaded, or the loading error

    def _call(self, *message):
        self.conn.send(message)
        return self._answer()

    def _answer(self):
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: its benchmark process ended (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"{self.name}: {value}")
        return value

    def __call__(self, ids: torch.Tensor, n: int) -> list[list[int]]:
        return self.timed(ids, n)[1]

    def timed(self, ids: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
        return self._call("run", ids, n)

    def bytes_per_token(self, context: float) -> tuple[int, int] | None:
        """:func:`bytes_per_token` of the engine's model (None: not an optlm engine)."""
        return self._call("bytes", context)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def _serve_engine(conn, name: str, checkpoint: str, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        run = load_engine(name, Path(checkpoint), threads)
    except Exception as e:  # noqa: BLE001 (reported to the driving process, which raises it)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    while True:
        kind, *args = conn.recv()
        if kind == "stop":
            return
        try:
            if kind == "run":
                start = time.perf_counter()
                out = run(*args)
                conn.send(("ok", (time.perf_counter() - start, out)))
            else:
                model = getattr(run, "model", None)
                conn.send(("ok", None if model is None else bytes_per_token(model, *args)))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


# ---- measuring -----------------------------------------------------------------------------------------

def _timed(run: Callable, ids: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
    # A pause between runs: right after another engine ran (CTranslate2 above all), the next one in the same
    # process measured ~30 % slower for a few seconds on a 2-core machine; after ~3 s idle it is back.
    time.sleep(3.0)
    if isinstance(run, Isolated):
        return run.timed(ids, n)
    start = time.perf_counter()
    out = run(ids, n)
    return time.perf_counter() - start, out


def measure(engines: dict[str, Callable], batch: int, prompt: int, new: int, repeats: int, vocab: int,
            log: Callable[[str], None] = print, warmup: bool = True) -> dict[str, Result]:
    """Interleaved rounds of (1-token run, N-token run) per engine; a first warm-up round is discarded."""
    ids = torch.randint(4, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
    results = {name: Result(name) for name in engines}
    for r in range(0 if warmup else 1, repeats + 1):
        for name, run in engines.items():
            t1, _ = _timed(run, ids, 1)
            tn, out = _timed(run, ids, new)
            if len(out[0]) != new:
                raise RuntimeError(f"{name} generated {len(out[0])} tokens instead of {new}")
            res = results[name]
            if r == 0:
                res.first = [t1, tn]
                continue  # warm-up: allocator, thread pools, lazily built kernels, compilation
            res.ttft.append(t1)
            res.full.append(tn)
            res.prefill.append(batch * prompt / t1)
            res.decode.append(batch * (new - 1) / max(tn - t1, 1e-9))
        if r:
            log(f"  round {r}/{repeats}: " + ", ".join(f"{n} {results[n].decode[-1]:.1f}" for n in engines))
    return results


def _rss_mb(key: str = "VmRSS:") -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(name: str, checkpoint: Path, threads: int, prompt: int, new: int) -> list[float] | None:
    """Resident memory growth (peak, and after the run) of loading ``name`` and running it once, in a
    fresh process."""
    if not Path("/proc/self/status").exists():
        return None
    code = ("import sys, json; from optlm import benchmark as b; "
            f"print(json.dumps(b._memory_probe({name!r}, {str(checkpoint)!r}, {threads}, {prompt}, {new})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory probe for {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_probe(name: str, checkpoint: str, threads: int, prompt: int, new: int) -> float:
    torch.set_num_threads(threads)
    kind = name.split()[0]
    __import__({"optlm": "optlm.hf", "transformers": "transformers", "ctranslate2": "ctranslate2",
                "flax": "optlm.flax", "tf": "optlm.tf"}[kind])
    if kind == "ctranslate2":
        __import__("transformers")  # the converter's import, kept out of the measured growth
    base = _rss_mb()
    run = load_engine(name, Path(checkpoint), threads)
    run(torch.randint(4, 1000, (1, prompt)), new)
    # VmHWM: the high-water mark of this process image (ru_maxrss would carry the parent's over exec).
    return [_rss_mb("VmHWM:") - base, _rss_mb() - base]


# ---- the memory roofline -------------------------------------------------------------------------------

def bytes_per_token(model: torch.nn.Module, context: float) -> tuple[int, int]:
    """What one decode step of one sequence reads: (weight bytes, key/value bytes at ``context`` cached tokens).

    Weights: every parameter and buffer once (a tied embedding and head share their storage), except the position
    table, of which a step reads one row. Keys/values: each layer's ``context`` cached keys and values, in the
    cache's dtype."""
    from .generate import cache_dtype
    from .models.core import kv_heads

    tensors = {t.data_ptr(): t.nbytes for t in (*model.parameters(), *model.buffers())}
    positions = model.get_decoder().embed_positions.weight
    weights = sum(tensors.values()) - positions.nbytes
    config = model.config
    width = kv_heads(model) * config.head_dim
    kv = int(2 * config.num_hidden_layers * context * width * torch.empty((), dtype=cache_dtype(model)).element_size())
    return weights, kv


def read_speed(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second at which this process reads a buffer of ``nbytes`` (at least 64 MiB), with the threads set
    for the benchmark: the best of ``repeats`` passes of a sum over float32 values, after one untimed pass."""
    buf = torch.ones(max(nbytes, 64 * 2**20) // 4)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.nbytes / best


def roofline_table(engines: dict[str, Callable], results: dict[str, Result], prompt: int, new: int) -> str:
    """optlm's batch-1 decode speed beside the memory roofline: bytes read per token ÷ the measured read speed
    (over a buffer as large as those bytes, so it is the speed of whichever level of memory holds them)."""
    lines = ["| engine | weights MB/token | KV MB/token | read speed GB/s | roofline tok/s | decode tok/s | "
             "of roofline |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in engines.items():
        context = prompt + (new + 1) / 2  # the average context of the decode
        if isinstance(run, Isolated):
            counted = run.bytes_per_token(context)
        else:
            counted = None if getattr(run, "model", None) is None else bytes_per_token(run.model, context)
        if counted is None:
            continue
        weights, kv = counted
        speed = read_speed(weights + kv)
        roof = speed / (weights + kv)
        decode = results[name].median("decode")
        lines.append(f"| {name} | {weights / 1e6:.1f} | {kv / 1e6:.1f} | {speed / 1e9:.1f} | {roof:.1f} | "
                     f"{decode:.1f} | {decode / roof:.0%} |")
    return "\n".join(lines)


# ---- reporting -----------------------------------------------------------------------------------------

def single_table(results: dict[str, Result]) -> str:
    lines = ["| engine | decode tok/s | prefill tok/s | TTFT ms | peak MB (after run) |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        mem = "–" if r.peak_mb is None else f"{r.peak_mb[0]:.0f} ({r.peak_mb[1]:.0f})"
        lines.append(f"| {name} | {r.median('decode'):.1f} | {r.median('prefill'):.0f} | "
                     f"{1000 * r.median('ttft'):.0f} | {mem} |")
    return "\n".join(lines)


def first_call_table(results: dict[str, Result]) -> str:
    lines = ["| engine | first calls beyond steady ones, s (compilation for JAX and TensorFlow) |", "|---|---:|"]
    lines += [f"| {name} | {r.first_call_s():.2f} |" for name, r in results.items() if r.first]
    return "\n".join(lines)


def ratio_table(results: dict[str, Result], metric: str = "decode") -> str:
    ours = [n for n in results if n.startswith("optlm")]
    peers = [n for n in results if not n.startswith("optlm")]
    if not peers:
        return ""
    lines = [f"| {metric} ratio | " + " | ".join(f"vs {p}" for p in peers) + " |",
             "|---|" + "---:|" * len(peers)]
    for n in ours:
        cells = [f"{results[n].median(metric) / results[p].median(metric):.2f}x" for p in peers]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(by_batch: dict[int, dict[str, Result]]) -> str:
    batches = sorted(by_batch)
    names = list(next(iter(by_batch.values())))
    lines = ["| engine | " + " | ".join(f"batch {b} decode tok/s" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{by_batch[b][n].median('decode'):.0f}" for b in batches) + " |")
    return "\n".join(lines)


def run_benchmark(shapes: list[str], precisions: list[str], prompt: int = 128, new: int = 64, repeats: int = 5,
                  batch_sizes: list[int] | None = None, threads: int | None = None, memory: bool = True,
                  peers: dict[str, bool] | None = None, log: Callable[[str], None] = print,
                  batch_shapes: list[str] | None = None, frameworks: tuple[str, ...] = ("torch",)) -> str:
    """Run everything and return the report as Markdown (also logged as it goes)."""
    from .fast import set_threads

    threads = set_threads(threads)
    peers = available_peers() if peers is None else peers
    missing = [p for p, ok in peers.items() if not ok]
    report = [f"threads: {threads}; prompt {prompt} tokens, {new} new tokens, greedy; medians of {repeats} "
              f"interleaved rounds; torch {torch.__version__}"]
    if missing:
        report.append(f"not installed, so not measured: {', '.join(missing)} (pip install 'optlm[bench]')")
    log(report[-1])
    for shape in shapes:
        checkpoint = random_checkpoint(shape)
        names = engine_names(precisions, peers, frameworks)
        window = json.loads((checkpoint / "config.json").read_text()).get("window_size")
        if window is not None and prompt + new > window and any(n.startswith("ctranslate2") for n in names):
            # CTranslate2 runs GPT-Neo as its GPT-2 equivalent, which holds only within the local window
            names = [n for n in names if not n.startswith("ctranslate2")]
            report.append(f"{shape}: CTranslate2 left out (it has no GPT-Neo converter; the GPT-2 stand-in computes "
                          f"the same only up to the {window}-token window, and {prompt} + {new} tokens exceed it)")
            log(report[-1])
        log(f"{shape}: loading {', '.join(names)}, each in a process of its own")
        engines = {n: Isolated(n, checkpoint, threads) for n in names}
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        results = measure(engines, 1, prompt, new, repeats, vocab, log)
        if memory:
            for n in names:
                results[n].peak_mb = peak_memory_mb(n, checkpoint, threads, prompt, new)
        report += [f"\n### {shape}, batch 1\n", single_table(results), "", ratio_table(results, "decode"), "",
                   ratio_table(results, "prefill"), "", roofline_table(engines, results, prompt, new)]
        compiled = any(not n.startswith(("optlm", "transformers", "ctranslate2")) for n in names)
        if compiled:
            report += ["", first_call_table(results)]
        if batch_sizes and (batch_shapes is None or shape in batch_shapes):
            # Engines are warm from the batch-1 rounds (compiled ports compile again for a new batch size, so they
            # get a warm-up round); fewer rounds, as each one costs batch-size times more.
            by_batch = {b: measure(engines, b, prompt, new, max(1, repeats // 2), vocab, log, warmup=compiled)
                        for b in batch_sizes}
            report += [f"\n### {shape}, batched decode throughput\n", throughput_table(by_batch)]
        for engine in engines.values():
            engine.close()
        log("\n".join(report))
    return "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench.py`` and ``optlm bench`` share this entry point's options."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", default="opt-125m,opt-350m",
                        help="comma-separated published shapes, random weights (opt-125m … opt-175b, gpt-neo-125m, "
                             "gpt-neo-1.3b, gpt-neo-2.7b)")
    parser.add_argument("--precisions", default=",".join(OPTLM_PRECISIONS), help="optlm precisions to measure")
    parser.add_argument("--framework", default="torch",
                        help="comma-separated: torch (optlm's PyTorch core), flax, tf (its JAX and TensorFlow ports, "
                             f"at the precisions among {', '.join(PORT_PRECISIONS)}; need optlm[flax] / optlm[tf])")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--batch-sizes", default="8,32", help="batched throughput runs ('' to skip)")
    parser.add_argument("--batch-shapes", default="opt-125m", help="shapes that get the batched runs ('all')")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: cores)")
    parser.add_argument("--optlm-only", action="store_true", help="skip transformers and CTranslate2")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-engine peak-memory probes")
    parser.add_argument("--markdown", default=None, help="also write the report to this Markdown file")


def run_from_args(args) -> int:
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in OPTLM_PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; choose from {', '.join(OPTLM_PRECISIONS)}")
    frameworks = tuple(f for f in args.framework.split(",") if f)
    bad = [f for f in frameworks if f not in FRAMEWORKS]
    if bad or not frameworks:
        raise ValueError(f"unknown framework(s) {bad}; choose from {', '.join(FRAMEWORKS)}")
    peers = {"transformers": False, "ctranslate2": False} if args.optlm_only else None
    report = run_benchmark([s for s in args.shapes.split(",") if s], precisions, args.prompt_tokens,
                           args.new_tokens, args.repeats, [int(b) for b in args.batch_sizes.split(",") if b],
                           args.threads, not args.no_memory, peers,
                           batch_shapes=None if args.batch_shapes == "all" else args.batch_shapes.split(","),
                           frameworks=frameworks)
    if args.markdown:
        argv = sys.argv[1:]
        command = " ".join(["optlm"] + argv[argv.index("bench"):] if "bench" in argv
                           else ["python", "benchmarks/bench.py"] + argv)
        Path(args.markdown).write_text(f"```\n{command}\n```\n\n{report}\n", encoding="utf-8")
    return 0
