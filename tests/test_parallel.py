"""Tensor parallelism on torch.distributed (gloo, 2 processes on this CPU).

Invariants: a model split across 2 ranks — split after loading, or each rank reading only its share of the
checkpoint — gives the logits of the whole model (float32, within 1e-5) — for
OPT pre-LN, OPT's post-LN layout with embedding projections (opt-350m), and GPT-Neo with an odd vocabulary —
on left-padded batches and through the KV cache (each rank caching only its heads), and its greedy tokens are
the whole model's; `optlm generate --tensor-parallel-size 2` and the same command under torchrun print the
single process's text (greedy and seeded sampling); a head count the ranks do not divide is refused, naming
both numbers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import TOKENIZER_FILES, hf_config, left_padded_batch

import optlm
from optlm.models.core import kv_heads
from optlm.parallel import run, tensor_parallel
from optlm.parallel.tp import load_tensor_parallel

CASES = {
    "opt_pre_ln": lambda: transformers.OPTForCausalLM(hf_config()),
    "opt_post_ln_proj": lambda: transformers.OPTForCausalLM(hf_config(do_layer_norm_before=False,
                                                                      word_embed_proj_dim=16)),
    "gpt_neo": lambda: transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=127, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64, bos_token_id=2, eos_token_id=2)),
}


def _outputs(model) -> dict[str, torch.Tensor]:
    """Logits of a left-padded batch, the same batch's next step through the KV cache, and greedy tokens."""
    ids, mask = left_padded_batch(vocab=120)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=True)
        nxt = full.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     past_key_values=full.past_key_values).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1)
    return {"logits": full.logits, "step": step, "greedy": greedy, "cache_heads": torch.tensor(
        full.past_key_values.k.shape[2])}


def _worker(rank: int, world: int, directories: dict, out) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, directory in directories.items():
        # a built model split in place, and the same share read as such from the checkpoint
        split = tensor_parallel(optlm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))
        read = load_tensor_parallel(directory, dtype=torch.float32)
        for how, model in (("split", split), ("read", read)):
            assert kv_heads(model) == model.config.num_attention_heads // world
            results[f"{name}/{how}"] = {**_outputs(model),
                                        "params": torch.tensor(sum(p.numel() for p in model.parameters()))}
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    dirs = {}
    for i, (name, make) in enumerate(CASES.items()):
        torch.manual_seed(i)
        make().save_pretrained(root / name)
        for f in ("vocab.json", "merges.txt"):  # LLM loads a tokenizer with the model (prompts here are ids)
            shutil.copy(TOKENIZER_FILES / "opt" / f, root / name / f)
        dirs[name] = str(root / name)
    return dirs


def test_two_ranks_give_the_whole_models_logits_cache_steps_and_greedy_tokens(checkpoints, tmp_path):
    run(_worker, 2, checkpoints, str(tmp_path / "out.pt"))
    runs = torch.load(tmp_path / "out.pt")
    assert len(runs) == 2 * len(checkpoints)
    for key, got in runs.items():  # "<case>/split" and "<case>/read"
        directory = checkpoints[key.split("/")[0]]
        want = _outputs(optlm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))
        ids, mask = left_padded_batch(vocab=120)
        m = mask.bool()
        assert (got["logits"] - want["logits"])[m].abs().max() <= 1e-5, key
        assert (got["step"] - want["step"]).abs().max() <= 1e-5, key
        assert torch.equal(got["greedy"], want["greedy"]), key
        assert int(got["cache_heads"]) * 2 == int(want["cache_heads"]), key  # each rank: half the heads
        whole = optlm.AutoModelForCausalLM.from_pretrained(directory).num_parameters()
        assert int(got["params"]) < 0.6 * whole, key  # and little more than half the weights


def _refuse(rank: int, world: int, directory: str) -> None:
    tensor_parallel(optlm.AutoModelForCausalLM.from_pretrained(directory))


def test_a_head_count_the_ranks_do_not_divide_is_refused(tmp_path, capsys):
    from helpers_generate import text_checkpoint

    from optlm import cli

    transformers.OPTForCausalLM(hf_config(num_attention_heads=1, hidden_size=32)).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="rank [01] of 2: the model's 1 attention heads do not divide among 2 ranks"):
        run(_refuse, 2, str(tmp_path / "a"))
    # the command line checks before it starts any process, and says so in one line
    model = text_checkpoint(tmp_path / "b", max_position_embeddings=64)  # 2 heads
    capsys.readouterr()
    assert cli.main(["generate", "Hi", "--model", str(model), "--tensor-parallel-size", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["optlm generate: error: the model's 2 attention heads do not divide among 3 ranks; use a "
                   "tensor-parallel size that divides 2"]


def test_optlm_generate_with_two_ranks_prints_the_single_process_text(tmp_path):
    import subprocess
    import sys

    from helpers_generate import text_checkpoint

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=64)
    base = [sys.executable, "-m", "optlm.cli", "generate", "The old house at the end of the lane", "--model",
            str(model), "--max-new-tokens", "16", "--no-stream"]
    runs = {}
    for flags in (["--temperature", "0"], ["--temperature", "0", "--tensor-parallel-size", "2"],
                  ["--temperature", "0.8", "--seed", "5"],
                  ["--temperature", "0.8", "--seed", "5", "--tensor-parallel-size", "2"]):
        r = subprocess.run(base + flags, capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        runs[" ".join(flags)] = r.stdout
    assert runs["--temperature 0 --tensor-parallel-size 2"] == runs["--temperature 0"]
    # sampling: every rank draws from the same gathered logits with the same seed, as the single process does
    assert runs["--temperature 0.8 --seed 5 --tensor-parallel-size 2"] == runs["--temperature 0.8 --seed 5"]
    # under torchrun the command joins the group torchrun made (one text, from rank 0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "optlm.cli",
                        *base[3:], "--temperature", "0"], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == runs["--temperature 0"]


def test_llm_with_two_ranks_answers_as_the_single_process_engine(checkpoints):
    from optlm import LLM, SamplingParams

    prompts = [[5, 9, 11, 40, 7], [3] * 20, list(range(4, 60))]
    params = [SamplingParams(temperature=0, max_tokens=10), SamplingParams(temperature=0.9, seed=3, max_tokens=12),
              SamplingParams(temperature=0.7, top_p=0.9, seed=8, max_tokens=8, n=2)]
    for name in ("opt_pre_ln", "gpt_neo"):
        want = LLM(checkpoints[name], block_size=8).generate(prompts, params, use_tqdm=False)
        llm = LLM(checkpoints[name], block_size=8, tensor_parallel_size=2)
        try:
            got = llm.generate(prompts, params, use_tqdm=False)
            again = llm.generate(prompts[:1], params[0], use_tqdm=False)  # the ranks stay up between calls
            with pytest.raises(ValueError, match="prompt 0"):
                llm.generate([[10**6]], params[0])  # a bad request comes back as the engine's own error
        finally:
            llm.close()
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
        assert again[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="do not divide among 3 ranks"):
        LLM(checkpoints["opt_pre_ln"], tensor_parallel_size=3)


# ---- quantized weights under tensor parallelism --------------------------------------------------------------

WIDE = {  # inputs that divide into int4 groups of 64 on each of 2 ranks
    "opt_pre_ln": lambda: transformers.OPTForCausalLM(hf_config(hidden_size=128, ffn_dim=256)),
    "gpt_neo": lambda: transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=127, hidden_size=128, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64, bos_token_id=2, eos_token_id=2)),
}
MODES = ("int8", "int4", "int8-dynamic")


def _quantized_worker(rank: int, world: int, directories: dict, out) -> None:
    from optlm.parallel.tp import quantize_tensor_parallel

    torch.set_num_threads(1)
    results = {}
    for name, directory in directories.items():
        for mode in MODES:
            model = quantize_tensor_parallel(load_tensor_parallel(directory, dtype=torch.float32), mode)
            results[f"{name}/{mode}"] = _outputs(model)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-wide")
    for i, (name, make) in enumerate(WIDE.items()):
        torch.manual_seed(10 + i)
        make().save_pretrained(root / name)
    return {name: str(root / name) for name in WIDE}


def test_quantized_ranks_compute_the_whole_quantized_model(wide_checkpoints, tmp_path):
    """Each rank holds the integers and scales of the whole model's quantization (int8 scales over whole rows,
    int4 groups within a rank's slice), so two ranks give the whole quantized model's logits up to the
    kernels' rounding of the activations, and its greedy tokens."""
    run(_quantized_worker, 2, wide_checkpoints, str(tmp_path / "out.pt"))
    runs = torch.load(tmp_path / "out.pt")
    ids, mask = left_padded_batch(vocab=120)
    m = mask.bool()
    for key, got in runs.items():
        name, mode = key.split("/")
        whole = optlm.AutoModelForCausalLM.from_pretrained(wide_checkpoints[name], dtype=torch.float32)
        float_logits = _outputs(whole)["logits"]
        want = _outputs(optlm.quantize(whole, mode, lm_head=False))
        error = (want["logits"] - float_logits)[m].abs().max()
        assert error > 1e-3, key  # quantization changed the numbers
        if mode == "int8-dynamic":
            # Activations are quantized per tensor, here over each rank's slice of a row-parallel layer's input
            # (a scale of its own): another rounding, as far from the float model as the whole model's.
            assert (got["logits"] - float_logits)[m].abs().max() <= 1.5 * error, key
            continue
        assert (got["logits"] - want["logits"])[m].abs().max() <= 2e-4, key
        assert (got["step"] - want["step"]).abs().max() <= 2e-4, key
        assert torch.equal(got["greedy"], want["greedy"]), key


def test_generate_with_two_quantized_ranks_prints_the_single_process_text(tmp_path):
    import subprocess
    import sys

    from helpers_generate import text_checkpoint

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=64)
    base = [sys.executable, "-m", "optlm.cli", "generate", "The old house", "--model", str(model),
            "--max-new-tokens", "12", "--no-stream", "--temperature", "0"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    outputs = [subprocess.run(base + flags, capture_output=True, text=True, timeout=300, env=env)
               for flags in (["--quantize", "int8"], ["--quantize", "int8", "--tensor-parallel-size", "2"])]
    assert all(r.returncode == 0 for r in outputs), [r.stderr for r in outputs]
    assert outputs[0].stdout == outputs[1].stdout


# ---- serving a split model ---------------------------------------------------------------------------------

def test_optlm_serve_with_two_ranks_answers_as_the_single_process_engine(tmp_path):
    """The server's engine loop drives both ranks' engines step by step (optlm.parallel.workers.RemoteEngine):
    greedy and seeded completions, concurrent and streamed, equal the single-process engine's; /metrics reads
    the ranks' queue; adapters are refused before anything starts."""
    import asyncio
    import os

    import httpx
    import openai
    from helpers_generate import text_checkpoint
    from test_serve import _start

    from optlm import LLM, SamplingParams

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=128)
    proc, base = _start(model, "--served-model-name", "tiny", "--tensor-parallel-size", "2", "--max-num-seqs", "4",
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        prompts = ["The old house at the end of the lane", "It was", "A ship sailed into the harbour at dawn and"]
        want = LLM(model).generate(prompts, [SamplingParams(temperature=0, max_tokens=12),
                                             SamplingParams(temperature=0.9, seed=4, max_tokens=10),
                                             SamplingParams(temperature=0, max_tokens=16)], use_tqdm=False)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)

        async def ask():
            return await asyncio.gather(
                client.completions.create(model="tiny", prompt=prompts[0], max_tokens=12, temperature=0),
                client.completions.create(model="tiny", prompt=prompts[1], max_tokens=10, temperature=0.9, seed=4),
                client.completions.create(model="tiny", prompt=prompts[2], max_tokens=16, temperature=0))

        got = asyncio.run(ask())
        assert [r.choices[0].text for r in got] == [o.outputs[0].text for o in want]
        sync = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        chunks = list(sync.completions.create(model="tiny", prompt=prompts[2], max_tokens=16, temperature=0,
                                              stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want[2].outputs[0].text
        with pytest.raises(openai.BadRequestError, match="context"):  # the ranks' engine refuses it, as one would
            sync.completions.create(model="tiny", prompt="x " * 500, max_tokens=4)
        metrics = httpx.get(f"{base}/metrics").text  # the ranks' cache, as rank 0's engine reports it
        blocks = next(line for line in metrics.splitlines() if line.startswith("optlm:kv_cache_blocks_total"))
        assert float(blocks.split()[-1]) > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "optlm.cli", "serve", "--model", str(model), "--tensor-parallel-size",
                        "2", "--lora-modules", f"a={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not served across tensor-parallel ranks" in r.stderr


def test_optlm_chat_with_two_ranks_prints_the_single_process_transcript(tmp_path):
    """The conversation stays in the command's process; each turn runs on both ranks and rank 0 streams the reply
    back; a turn that overflows the context is trimmed (the notice comes back from the ranks) as in one process."""
    import os
    import subprocess
    import sys

    from helpers_generate import text_checkpoint

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=48)
    messages = "Hello there\nWhat is the old house like\nAnd the garden behind it\nTell me more\n"
    runs = []
    for extra in ([], ["--tensor-parallel-size", "2"]):
        r = subprocess.run([sys.executable, "-m", "optlm.cli", "chat", "--model", str(model), "--temperature", "0.8",
                            "--seed", "3", "--max-new-tokens", "8", "--system", "A chat.", *extra], input=messages,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        runs.append(r)
    assert runs[1].stdout == runs[0].stdout and runs[0].stdout.count("AI: ") == 4
    trims = [[line for line in r.stderr.splitlines() if line.startswith("[dropped")] for r in runs]
    assert trims[0] and trims[1] == trims[0]  # the 48-token context forced trimming, reported alike


# ---- LoRA adapters under tensor parallelism ---------------------------------------------------------------

LORAS = {
    "every_linear": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "biases": dict(r=2, lora_alpha=4, bias="all", target_modules=["fc1", "out_proj"]),
}


def _lora_worker(rank: int, world: int, base: str, adapters: dict, out) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, adapter in adapters.items():
        for mode in (None, "int8"):
            lm = optlm.load(base, adapter=adapter, tensor_parallel=True, quantize=mode,
                            tokenizer=TOKENIZER_FILES / "opt")
            results[f"{name}/{mode}"] = _outputs(lm.model)
    if rank == 0:
        torch.save(results, out)


def test_a_lora_merged_into_each_ranks_slices_gives_the_merged_models_logits(wide_checkpoints, tmp_path):
    """Each rank merges its share of the update (a layer split by output takes its rows of lora_B, one split
    by input its columns of lora_A; a trained bias its slice): the whole merged model's logits, in float and
    after int8 quantization; a bottleneck adapter is refused."""
    import peft

    base = wide_checkpoints["opt_pre_ln"]
    adapters = {}
    for name, kwargs in LORAS.items():
        torch.manual_seed(7)
        ref = peft.get_peft_model(transformers.OPTForCausalLM.from_pretrained(base),
                                  peft.LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.endswith("bias") and kwargs.get("bias") == "all":
                    p.add_(torch.randn_like(p) * 0.1)
        ref.save_pretrained(tmp_path / name)
        adapters[name] = str(tmp_path / name)
    run(_lora_worker, 2, base, adapters, str(tmp_path / "out.pt"))
    runs = torch.load(tmp_path / "out.pt")
    ids, mask = left_padded_batch(vocab=120)
    m = mask.bool()
    plain = _outputs(optlm.AutoModelForCausalLM.from_pretrained(base))["logits"]
    for key, got in runs.items():
        name, mode = key.split("/")
        merged = optlm.load(base, adapter=adapters[name], tokenizer=TOKENIZER_FILES / "opt").model
        if mode == "int8":
            merged = optlm.quantize(merged, "int8", lm_head=False)
        want = _outputs(merged)
        assert (want["logits"] - plain)[m].abs().max() > 1e-3, key  # the adapter changes the model
        tol = 1e-5 if mode == "None" else 2e-4
        assert (got["logits"] - want["logits"])[m].abs().max() <= tol, key
        assert (got["step"] - want["step"]).abs().max() <= tol, key
        assert torch.equal(got["greedy"], want["greedy"]), key
    from optlm.adapters import BottleneckConfig, get_peft_model

    get_peft_model(optlm.OPTForCausalLM.from_pretrained(base), BottleneckConfig(reduction_factor=4)).save_pretrained(
        tmp_path / "bottleneck")
    with pytest.raises(ValueError, match="a bottleneck adapter is not supported with it yet"):
        optlm.load(base, adapter=tmp_path / "bottleneck", tensor_parallel=True)


# ---- under torchrun ------------------------------------------------------------------------------------------

TORCHRUN_LLM = r"""
import json, sys
from optlm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, block_size=8)
out = llm.generate([[5, 9, 11, 40, 7], list(range(4, 40))], [SamplingParams(temperature=0, max_tokens=10),
                   SamplingParams(temperature=0.8, seed=5, max_tokens=12)], use_tqdm=False)
import torch.distributed as dist
with open(f"{sys.argv[2]}.{dist.get_rank()}", "w") as f:
    json.dump({"rank": dist.get_rank(), "tokens": [o.outputs[0].token_ids for o in out]}, f)
"""


def _torchrun(*argv: str, **kwargs):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *argv],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          **kwargs)


def test_under_torchrun_llm_chat_and_serve_split_the_model_across_its_processes(checkpoints, tmp_path):
    """torchrun starts the ranks (as it would across machines): in a script every rank's LLM holds its share and
    all return the single-process tokens; `optlm chat` and `optlm serve` run on rank 0 and the other ranks
    follow its calls."""
    import json
    import os
    import subprocess
    import sys

    import openai
    from helpers_generate import text_checkpoint
    from test_serve import _free_port

    from optlm import LLM, SamplingParams

    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_LLM)
    r = _torchrun(str(script), checkpoints["opt_pre_ln"], str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    want = LLM(checkpoints["opt_pre_ln"], block_size=8).generate(
        [[5, 9, 11, 40, 7], list(range(4, 40))], [SamplingParams(temperature=0, max_tokens=10),
                                                  SamplingParams(temperature=0.8, seed=5, max_tokens=12)],
        use_tqdm=False)
    assert sorted(g["rank"] for g in got) == [0, 1]
    assert all(g["tokens"] == [o.outputs[0].token_ids for o in want] for g in got)

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=128)
    chat = ["chat", "--model", str(model), "--temperature", "0", "--max-new-tokens", "8", "--system", "A chat."]
    messages = "Hello there\nTell me more\n"
    single = subprocess.run([sys.executable, "-m", "optlm.cli", *chat], input=messages, capture_output=True, text=True,
                            timeout=300)
    split = _torchrun("-m", "optlm.cli", *chat, input=messages)
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == single.stdout and single.stdout.count("AI: ") == 2

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "optlm.cli",
                             "serve", "--model", str(model), "--port", str(port), "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        import time

        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = client.completions.create(model="tiny", prompt="The old house", max_tokens=10, temperature=0)
        want = LLM(model).generate(["The old house"], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
        assert r.choices[0].text == want[0].outputs[0].text
    finally:
        proc.terminate()  # torchrun passes it on: rank 0's server stops and releases the other rank
        proc.wait(timeout=120)  # (torchrun itself exits 1 on SIGTERM, whatever its processes do)
        err = proc.stderr.read()
        assert "[rank" not in err and "Connection closed" not in err, err[-3000:]  # no rank failed on the way out


def test_a_reply_abandoned_midway_leaves_the_next_call_its_own_answer(tmp_path):
    """A reader that stops a streamed reply early (or whose callback raises) must not leave the rest of that reply
    to be read as the answer to the next call: the stream reads it to its end first."""
    from helpers_generate import text_checkpoint

    from optlm.parallel.workers import RemoteLM, start_workers

    model = text_checkpoint(tmp_path / "m", max_position_embeddings=128)
    messages = [{"role": "user", "content": "Hello there"}]
    want = "".join(optlm.load(model).chat_stream(messages, temperature=0, max_new_tokens=8))
    workers, _ = start_workers(str(model), 2, {})
    lm = RemoteLM(workers, "m")
    try:
        pieces = lm.chat_stream(messages, temperature=0, max_new_tokens=8)
        assert next(pieces)
        pieces.close()  # stopped after the first piece
        assert "".join(lm.chat_stream(messages, temperature=0, max_new_tokens=8)) == want
        assert workers.call("lm.chat", messages, temperature=0, max_new_tokens=8) == want
    finally:
        lm.close()
