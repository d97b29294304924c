"""The bundled default model: shipped files, OPT architecture, loads and generates offline, beats an n-gram."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from optlm import OPTForCausalLM
from optlm.bundled import BUNDLED_MODEL_DIR

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "README.md")

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").is_file(),
                                reason="the bundled model (optlm/assets/opt-gutenberg) is not in this checkout")

# No hub, no network: offline flags, and any connection attempt goes to a closed local port.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
           "HF_HOME": "/nonexistent-hf-home", "OMP_NUM_THREADS": "1"}


def test_files_and_architecture():
    for name in FILES:
        assert (BUNDLED_MODEL_DIR / name).is_file(), name
    assert (BUNDLED_MODEL_DIR / "model.safetensors").stat().st_size <= 40 * 2**20
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "opt" and config["architectures"] == ["OPTForCausalLM"]
    tok = json.loads((BUNDLED_MODEL_DIR / "tokenizer.json").read_text())
    assert [tok["model"]["vocab"][t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]


def test_transformers_reads_it_identically():
    import transformers

    ours = OPTForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32)
    theirs = transformers.OPTForCausalLM.from_pretrained(str(BUNDLED_MODEL_DIR), dtype=torch.float32).eval()
    ids = transformers.AutoTokenizer.from_pretrained(str(BUNDLED_MODEL_DIR))("It was a dark night.",
                                                                              return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_loads_and_generates_offline():
    code = (
        "import torch\n"
        "from optlm import OPTForCausalLM\n"
        "from optlm.bundled import bundled_model_path\n"
        "from optlm.tokenizer import Tokenizer\n"
        "path = bundled_model_path()\n"
        "tok = Tokenizer.from_pretrained(path)\n"
        "model = OPTForCausalLM.from_pretrained(path, dtype=torch.float32)\n"
        "ids = torch.tensor([tok.encode('The old man looked at the')])\n"
        "out = model.generate(ids, max_new_tokens=24, do_sample=False)\n"
        "print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = eval(r.stdout.strip())
    words = text.split()
    assert len(words) >= 8
    # English, not token soup: mostly lower-case alphabetic words
    assert sum(w.strip(".,;:!?\"'").isalpha() for w in words) >= 0.7 * len(words), text


def test_eval_cli_defaults_to_the_bundled_model_offline(tmp_path):
    from optlm.evaluate import evaluate_file

    text = tmp_path / "held-out.txt"
    text.write_text(
        "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter to us.\n"
        "His grey eyes shone and twinkled, and his usually pale face was flushed and animated. The fire burned\n"
        "brightly, and the soft radiance of the incandescent lights in the lilies of silver caught the bubbles\n"
        "that flashed and passed in our glasses.\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "optlm.cli", "eval", "--data", str(text)],
                       env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "perplexity:" in r.stdout and "tokens:" in r.stdout
    ppl = evaluate_file(None, text).perplexity
    assert f"{ppl:.3f}" in r.stdout
    assert ppl < 1000  # a held-out book's opening; uniform over the vocabulary would be 8192
