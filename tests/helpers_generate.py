"""Shared pieces of the generation tests: tiny reference/optlm model pairs, checkpoints with the real OPT
tokenizer, and a scripted model that emits a fixed token sequence."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_FILES, left_padded_batch
from torch import nn

import optlm
from optlm.models import OPTConfig
from optlm.models.opt.model import OPTDecoder

OPT_TOKENIZER = TOKENIZER_FILES / "opt"
OPT_VOCAB = 50272  # the published models' embedding rows (50265 tokenizer entries padded to a multiple of 8)

# A larger init_std than the default 0.02 makes random models' greedy outputs varied instead of one token
# repeated, so eos ids, n-gram bans and beams all get exercised.
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, dropout=0.0, init_std=0.3)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a module's many tiny ops on one thread: on a shared, busy machine every multi-threaded op waits for
    its slowest thread, which makes tiny-model tests ~30x slower; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The families the engine and server tests run once each (parametrised), so each goes through the same checks.
FAMILIES = ("opt", "gpt_neo")
GPT2_TOKENIZER = TOKENIZER_FILES / "gpt2"
GPT2_VOCAB = 50257
MLP_NAMES = {"opt": ("fc1", "fc2"), "gpt_neo": ("c_fc", "c_proj")}  # each family's MLP projections, in, out


def tiny_config(family: str = "opt", **overrides):
    """A transformers config of ``family`` in the TINY shape (OPT's field names for the overrides). GPT-Neo
    alternates a global and a local layer whose 16-token window long prompts overrun; its BOS/EOS are OPT's 2,
    so tests that look for EOS hold for both."""
    import transformers

    if family == "opt":
        return transformers.OPTConfig(**{**TINY, **overrides})
    o = {**TINY, **overrides}
    return transformers.GPTNeoConfig(
        vocab_size=o["vocab_size"], hidden_size=o["hidden_size"], num_layers=o["num_hidden_layers"],
        num_heads=o["num_attention_heads"], intermediate_size=o["ffn_dim"], window_size=o.get("window_size", 16),
        attention_types=[[["global", "local"], o["num_hidden_layers"] // 2]],
        max_position_embeddings=o["max_position_embeddings"], initializer_range=o["init_std"],
        bos_token_id=o.get("bos_token_id", 2), eos_token_id=o.get("eos_token_id", 2))


def reference_pair(directory: Path, seed: int = 0, family: str = "opt", **overrides):
    """(transformers model, optlm model) of ``family`` with the same random float64 weights, via a checkpoint."""
    import transformers

    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    ref = ref.to(torch.float64).eval()
    ref.save_pretrained(directory)
    return ref, optlm.AutoModelForCausalLM.from_pretrained(directory)


def left_padded(lengths=(7, 4, 6), vocab: int = 96, seed: int = 0, pad: int = 1):
    """Random prompts (B, T) left-padded with ``pad``, and the 0/1 attention mask."""
    return left_padded_batch(vocab=vocab, lengths=lengths, pad_id=pad, seed=seed)


def need_tokenizer() -> Path:
    """The real OPT tokenizer files (shipped with the tests)."""
    return OPT_TOKENIZER


def text_checkpoint(directory: Path, seed: int = 0, favour: list[int] | None = None, family: str = "opt",
                    **overrides) -> Path:
    """A tiny random checkpoint with its family's real tokenizer files beside it (OPT's, or GPT-2's for GPT-Neo).

    ``favour``: keep only these rows of the (tied) embedding and scale them up, so the model emits almost
    only these tokens (e.g. the byte pieces of multi-byte characters).
    """
    source = need_tokenizer() if family == "opt" else GPT2_TOKENIZER
    torch.manual_seed(seed)
    shape = dict(vocab_size=OPT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                 max_position_embeddings=128, init_std=0.5)
    if family == "opt":
        model = optlm.OPTForCausalLM(OPTConfig(**{**shape, **overrides}))
    else:
        config = tiny_config(family, **{**shape, "vocab_size": GPT2_VOCAB, "bos_token_id": GPT2_VOCAB - 1,
                                        "eos_token_id": GPT2_VOCAB - 1, **overrides})
        model = optlm.AutoModelForCausalLM.from_config(optlm.models.config_from_dict(config.to_dict()))
    if favour is not None:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            keep = torch.zeros(emb.shape[0], dtype=torch.bool)
            keep[favour] = True
            emb[~keep] = 0
            emb[keep] *= 8
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, directory / name)
    return directory


class ScriptedLM(nn.Module):
    """A stand-in causal LM that emits ``script`` token after token (one-hot logits), then ``after`` forever.

    It implements just what generation calls (the core `step`, config, get_decoder), so
    text-level behaviour (streaming, stop strings, chat turns) can be tested on exactly chosen tokens.
    """

    def __init__(self, script: list[int], vocab_size: int = OPT_VOCAB, after: int = 2, context: int = 256):
        super().__init__()
        self.config = OPTConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                ffn_dim=8, max_position_embeddings=context)
        self.decoder = OPTDecoder(self.config)
        self.script, self.after = list(script), after
        self.start: torch.Tensor | None = None  # (B,) position of each row's first generated token
        self.prompts: list[torch.Tensor] = []  # every prefilled prompt, for tests to inspect

    def get_decoder(self) -> OPTDecoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def step(self, input_ids, frame, last=None):
        B, T = input_ids.shape
        nxt = frame.positions[:, -1] + 1  # (B,) position of the token these logits predict, per row
        if frame.cache.length == 0:
            self.start = nxt.clone()
            self.prompts.append(input_ids.clone())
        elif len(self.start) != B:  # rows were repeated after the prefill (several sequences per prompt)
            self.start = self.start.repeat_interleave(B // len(self.start))
        logits = torch.full((B, self.config.vocab_size), -30.0)
        for b in range(B):
            i = int(nxt[b] - self.start[b])
            logits[b, self.script[i] if 0 <= i < len(self.script) else self.after] = 30.0
        return logits, torch.zeros(B, T, 8)


# The sampling distribution checks (PyTorch, JAX, TensorFlow samplers): fixed logits over a tiny vocabulary, and
# filter settings covering plain, top-k, top-p and both.
CHI2_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])
SAMPLING_CASES = [(1.0, None, 1.0), (0.7, 5, 1.0), (1.3, None, 0.8), (0.5, 6, 0.95)]
# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def filtered_softmax(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float):
    """The target of sampling written out directly: scale, keep the top k, keep the nucleus, renormalise.
    Returns the probabilities (float64) and which tokens are kept."""
    target = torch.softmax(logits.double() / temperature, -1)
    order = target.argsort(descending=True)
    keep = torch.zeros(len(logits), dtype=torch.bool)
    above = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k is None or rank < top_k) and above < top_p:
            keep[i] = True
        above += float(target[i])
    target = torch.where(keep, target, 0.0)
    return target / target.sum(), keep


def assert_follows(draws, target: torch.Tensor, keep: torch.Tensor) -> None:
    """Chi-square goodness of fit of ``draws`` (token ids) to ``target`` at the 0.1% level; filtered tokens are
    never drawn."""
    draws = torch.as_tensor(draws).long().flatten()
    n = len(draws)
    counts = torch.bincount(draws, minlength=len(target)).double()
    assert counts[~keep].sum() == 0  # filtered tokens are never drawn
    expected = target[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(keep.sum()) - 1], (chi2, counts.tolist(), expected.tolist())
