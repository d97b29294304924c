"""`optlm generate` and `optlm chat`: as real subprocesses (exit codes, stdin, pipes, error lines), and
in-process through `cli.main` for the option combinations (cheaper than a Python start-up each)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from helpers_generate import (
    one_thread,  # noqa: F401 (a fixture, used through pytestmark)
    text_checkpoint,
)

from optlm import cli
from optlm.bundled import BUNDLED_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return text_checkpoint(tmp_path_factory.mktemp("cli_model"), max_position_embeddings=64)


def _optlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "optlm.cli", *args]


@pytest.fixture(scope="module")
def runs(model_dir):
    """Start every subprocess at once (Python start-up dominates), then collect (rc, stdout, stderr)."""
    m = str(model_dir)
    jobs = {
        "stdin_verbose": (_optlm("generate", "-", "--model", m, "--max-new-tokens", "6", "--verbose"),
                          "Once upon a time\n"),
        "negative_temperature": (_optlm("generate", "hi", "--model", m, "--temperature", "-0.5"), None),
        "chat_pipe": (_optlm("chat", "--model", m, "--max-new-tokens", "8", "--system", "Be brief."),
                      "Hello\n\n/reset\nHow are you?\n"),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, encoding="utf-8", env=env) for name, (cmd, _) in jobs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(jobs[name][1], timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


def _one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("optlm ") and "error:" in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_generate_reads_the_prompt_from_stdin_and_reports_speed(runs):
    rc, out, err = runs["stdin_verbose"]
    assert rc == 0, err
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
    for field in ("prompt tokens: 5", "new tokens:", "time to first token:", "tokens/s:"):
        assert field in err, err


def test_bad_arguments_exit_nonzero_with_one_line(runs):
    rc, out, err = runs["negative_temperature"]
    assert rc != 0 and out == ""
    _one_error_line(err, "temperature")


def test_chat_over_a_pipe_answers_each_line(runs):
    rc, out, err = runs["chat_pipe"]
    assert rc == 0, err
    assert "Traceback" not in err
    # One marked turn per non-empty message (/reset is a command, not a message), turns a blank line apart.
    turns = out.split("\n\n")
    assert [t.split("\n")[0] for t in turns if t] == ["Human: Hello", "Human: How are you?"], out
    assert all(t.split("\n")[1].startswith("AI: ") for t in turns if t), out


# ---- in-process -------------------------------------------------------------------------------------------

def _main(capsys, monkeypatch, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_seeded_sampling_is_repeatable_and_streaming_prints_the_same_text(capsys, monkeypatch, model_dir):
    args = ["generate", "The sea", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0.9",
            "--seed", "3"]
    first = _main(capsys, monkeypatch, *args)
    assert first[0] == 0 and first[1].startswith("The sea")
    assert _main(capsys, monkeypatch, *args) == first
    assert _main(capsys, monkeypatch, *args, "--no-stream") == first
    assert _main(capsys, monkeypatch, *args[:-1], "4")[1] != first[1]


@pytest.mark.parametrize("extra", [["--num-beams", "3"], ["--penalty-alpha", "0.5", "--top-k", "3"],
                                   ["--preset", "creative", "--seed", "1"], ["--repetition-penalty", "1.3"],
                                   ["--preset", "precise", "--temperature", "0"], ["--dtype", "bfloat16"]])
def test_decoding_options(capsys, monkeypatch, model_dir, extra):
    rc, out, err = _main(capsys, monkeypatch, "generate", "Hello", "--model", str(model_dir),
                         "--max-new-tokens", "5", *extra)
    assert rc == 0 and out.startswith("Hello"), err


def test_stop_flag_cuts_the_text(capsys, monkeypatch, model_dir):
    args = ["generate", "Hello", "--model", str(model_dir), "--max-new-tokens", "12", "--temperature", "0"]
    rc, full, _ = _main(capsys, monkeypatch, *args)
    text = full[len("Hello"):].rstrip("\n")
    assert rc == 0 and len(text) > 4
    stop = text[2:4]
    rc, out, _ = _main(capsys, monkeypatch, *args, "--stop", stop)
    assert rc == 0 and out == "Hello" + text[: text.find(stop)] + "\n"


@pytest.mark.parametrize("argv,words", [
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-p", "0"], ["top_p"]),
    (["--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--num-beams", "2", "--penalty-alpha", "2"], ["penalty_alpha"]),
    (["--dtype", "float8"], ["dtype"]),
    (["--model", "/no/such/model/dir"], ["does not exist"]),
])
def test_bad_generate_options_give_one_line(capsys, monkeypatch, model_dir, argv, words):
    argv = ["--model", str(model_dir), *argv] if "--model" not in argv else argv
    rc, out, err = _main(capsys, monkeypatch, "generate", "hi", *argv)
    assert rc == 1 and out == ""
    _one_error_line(err, *words)


def test_prompt_longer_than_the_context_window_gives_one_line(capsys, monkeypatch, model_dir):
    rc, out, err = _main(capsys, monkeypatch, "generate", "-", "--model", str(model_dir), stdin="word " * 80)
    assert rc == 1 and out == ""
    _one_error_line(err, "prompt has", "context window of 64 tokens")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_without_model_uses_the_bundled_one_or_says_it_is_missing(capsys, monkeypatch, command):
    argv = [command, "hi"] if command == "generate" else [command]
    rc, out, err = _main(capsys, monkeypatch, *argv, "--max-new-tokens", "2", stdin="hello\n")
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        assert rc == 0 and out, err
    else:
        assert rc == 1 and out == ""
        _one_error_line(err, "bundled default model is not installed")


def test_quantize_flag(capsys, monkeypatch, model_dir):
    rc, out, err = _main(capsys, monkeypatch, "generate", "Hello", "--model", str(model_dir), "--max-new-tokens", "4",
                         "--quantize", "int8")
    assert rc == 0 and out.startswith("Hello"), err


def test_chat_in_process_keeps_going_after_reset(capsys, monkeypatch, model_dir):
    rc, out, err = _main(capsys, monkeypatch, "chat", "--model", str(model_dir), "--max-new-tokens", "6",
                         stdin="one\n/reset\ntwo\n/exit\nthree\n")
    assert rc == 0, err
    assert out.count("Human: ") == 2 and "Human: three" not in out  # "three" comes after /exit


# ---- defaults a person reads --------------------------------------------------------------------------------

PROMPTS = ["The old house at the end of the lane", "It was a dark and stormy night", "The captain looked at me",
           '"I do not know," said the old woman,', "She opened the letter and"]


def _worst_4gram_repeat(text: str) -> int:
    """How often the most repeated 4-gram of words occurs (dialogue punctuation such as '."\n\n"' repeats
    as tokens in any novel, so words are counted: a loop is "the other, and the other, and the other")."""
    from collections import Counter

    words = text.split()
    return max(Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3)).values(), default=0)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_default_output_of_the_bundled_model_does_not_loop(capsys, monkeypatch, index):
    args = ["generate", PROMPTS[index], "--max-new-tokens", "60", "--no-echo", "--seed", str(index)]
    rc, out, err = _main(capsys, monkeypatch, *args)
    assert rc == 0 and out.strip(), err
    assert _worst_4gram_repeat(out) < 3, out


def test_greedy_is_still_there_and_is_what_loops(capsys, monkeypatch):
    """--temperature 0 is plain greedy decoding (the measure above can fail: greedy output fails it)."""
    worst = []
    for prompt in PROMPTS:
        rc, out, err = _main(capsys, monkeypatch, "generate", prompt, "--max-new-tokens", "60", "--no-echo",
                             "--temperature", "0")
        assert rc == 0, err
        assert _main(capsys, monkeypatch, "generate", prompt, "--max-new-tokens", "60", "--no-echo",
                     "--preset", "greedy")[1] == out
        worst.append(_worst_4gram_repeat(out))
    assert max(worst) >= 3, worst


def test_echo_prints_the_prompt_first_and_no_echo_only_the_continuation(capsys, monkeypatch, model_dir):
    args = ["generate", "Hello there", "--model", str(model_dir), "--max-new-tokens", "5", "--seed", "1"]
    rc, echoed, _ = _main(capsys, monkeypatch, *args)
    rc2, bare, _ = _main(capsys, monkeypatch, *args, "--no-echo")
    assert rc == rc2 == 0 and echoed == "Hello there" + bare


def test_bundled_model_has_a_short_name(capsys, monkeypatch):
    args = ["generate", "Hello", "--max-new-tokens", "5", "--seed", "1"]
    assert _main(capsys, monkeypatch, *args, "--model", "opt-gutenberg") == _main(capsys, monkeypatch, *args)


@pytest.mark.parametrize("command,expected", [
    ("generate", ["(default: balanced: temperature 0.7", "the prompt followed by its continuation"]),
    ("chat", ["'Human: ' / 'AI: '", "(default: the bundled model"]),
    ("train", ["--block-size BLOCK_SIZE", "(default: 256)", "(default: 0.0003)", "(default: cosine)"]),
    ("eval", ["(default: text)", "(default: 1)"]),
])
def test_help_shows_defaults(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert exit_info.value.code == 0
    for words in expected:
        assert " ".join(words.split()) in out, words


# ---- adapters: --adapter on generate/chat, optlm merge ----------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    import torch

    from optlm.hf import OPTForCausalLM
    from optlm.peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cli_adapter")
    get_peft_model(OPTForCausalLM.from_pretrained(model_dir),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc2"], init_lora_weights=False,
                              base_model_name_or_path=str(model_dir))).save_pretrained(out)
    return out


def test_adapter_flag_generates_what_the_adapted_model_does(capsys, monkeypatch, model_dir, adapter_dir):
    import torch

    from optlm.hf import OPTForCausalLM
    from optlm.peft import PeftModel
    from optlm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("The sea")])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(model_dir), adapter_dir)
        want = tok.decode(adapted.generate(ids, max_new_tokens=8)[0, ids.shape[1]:].tolist())
        plain = tok.decode(OPTForCausalLM.from_pretrained(model_dir).generate(ids, max_new_tokens=8)[0, 1:].tolist())
    args = ["generate", "The sea", "--max-new-tokens", "8", "--temperature", "0", "--no-echo"]
    rc, out, err = _main(capsys, monkeypatch, *args, "--adapter", str(adapter_dir))  # base from the adapter
    assert rc == 0, err
    assert out == want + "\n" and want not in plain
    rc, out, _ = _main(capsys, monkeypatch, *args, "--model", str(model_dir), "--adapter", str(adapter_dir),
                       "--quantize", "int8")
    assert rc == 0 and out.strip()
    rc, out, _ = _main(capsys, monkeypatch, "chat", "--model", str(model_dir), "--adapter", str(adapter_dir),
                       "--max-new-tokens", "4", stdin="Hello\n")
    assert rc == 0 and out.strip()


def test_merge_writes_a_checkpoint_transformers_loads_with_peft_logits(capsys, monkeypatch, model_dir, adapter_dir,
                                                                       tmp_path):
    import peft
    import torch
    import transformers
    rc, out, err = _main(capsys, monkeypatch, "merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "m"))
    assert rc == 0, err
    assert (tmp_path / "m" / "tokenizer.json").is_file() and (tmp_path / "m" / "config.json").is_file()
    ids = torch.randint(4, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(transformers.OPTForCausalLM.from_pretrained(model_dir), adapter_dir)
        unmerged = ref(input_ids=ids).logits
        want = ref.merge_and_unload()(input_ids=ids).logits  # peft's own merge
        got = transformers.OPTForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, unmerged, atol=1e-4, rtol=1e-4)  # merging only re-associates float sums
    rc, _, err = _main(capsys, monkeypatch, "merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "m"))
    assert rc == 1 and "--overwrite" in err


def test_merging_a_bottleneck_adapter_is_refused(capsys, monkeypatch, model_dir, tmp_path):
    from optlm.hf import OPTForCausalLM
    from optlm.peft import BottleneckConfig, get_peft_model

    get_peft_model(OPTForCausalLM.from_pretrained(model_dir), BottleneckConfig()).save_pretrained(tmp_path / "bn")
    rc, _, err = _main(capsys, monkeypatch, "merge", "--adapter", str(tmp_path / "bn"), "--model", str(model_dir),
                       "--out", str(tmp_path / "m"))
    assert rc == 1 and "cannot be merged" in err and "Traceback" not in err
