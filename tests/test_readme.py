"""Every Python block of the README runs, as a user would run it.

Invariant: the README's examples cannot break unnoticed. Hub ids in them resolve through huggingface_hub's
real offline cache, which the test fills with a small random checkpoint that transformers saved and the
real OPT tokenizer files, so the product's hub-loading code is what runs (no network, no monkeypatching).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_FILES

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), flags=re.S)
HUB_IDS = sorted(set(re.findall(r"\"((?:facebook/opt|EleutherAI/gpt-neo)-[\w.]+)\"", "".join(BLOCKS))))


def _fill_hub_cache(cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub reads offline: refs/main names a snapshot folder holding the files."""
    import transformers

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    torch.manual_seed(0)
    if repo_id.startswith("EleutherAI/"):  # a GPT-Neo repo: its weights and GPT-2's tokenizer files and configs
        config = transformers.GPTNeoConfig(vocab_size=50257, hidden_size=32, num_layers=2, num_heads=4,
                                           attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
        transformers.GPTNeoForCausalLM(config).save_pretrained(snapshot)
        gpt2 = TOKENIZER_FILES / "gpt2"
        transformers.GPT2Tokenizer(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt")).save_pretrained(snapshot)
    else:
        config = transformers.OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=4, max_position_embeddings=128)
        transformers.OPTForCausalLM(config).save_pretrained(snapshot)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_FILES / "opt" / name, snapshot / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2 and "facebook/opt-125m" in HUB_IDS


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    for repo_id in HUB_IDS:
        _fill_hub_cache(cache, repo_id)
    return cache


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index], "utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"
    assert run.stdout.strip(), "every README example prints something"
