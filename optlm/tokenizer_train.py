"""Train a byte-level BPE tokenizer with OPT's special tokens, through the `tokenizers` library.

The result has OPT's layout: `<s>`, `<pad>`, `</s>`, `<unk>` at ids 0–3, GPT-2's byte-level
pre-tokenizer and decoder, and `</s>` prepended as BOS. It is saved as `tokenizer.json` plus the two
config files, which `optlm.Tokenizer` and transformers' `AutoTokenizer` both load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .data import iter_documents
from .tokenizer import Tokenizer

# OPT's dictionary order (fairseq): these four come first, so they keep ids 0..3.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def _texts(paths: Sequence[str | os.PathLike], jsonl_key: str, unwrapped: bool) -> Iterator[str]:
    for path in paths:
        for piece, _ in iter_documents(path, jsonl_key=jsonl_key, unwrapped=unwrapped):
            yield piece


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    jsonl_key: str = "text",
    show_progress: bool = True,
    unwrap: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on text/JSONL `files` and save it to `out_dir`; returns the wrapped tokenizer.

    `vocab_size` counts everything: the 4 special tokens, the 256 byte symbols and the merges.
    Files are read in pieces, never whole, so large corpora fit in memory. ``unwrap`` joins hard-wrapped
    lines into paragraphs first (:func:`optlm.data.unwrap`), as ``optlm train --unwrap`` does.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small; byte-level BPE needs at least "
                         f"{len(SPECIAL_TOKENS) + 256 + 1} (4 special tokens, 256 bytes, one merge)")
    if not files:
        raise ValueError("no training files given")
    backend = Backend(models.BPE())
    # GPT-2/OPT settings: no prefix space, the GPT-2 split regex, and byte-level decoding.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_texts(files, jsonl_key, unwrap), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == i, (token, backend.token_to_id(token))
    tokenizer = Tokenizer.from_tokenizers(backend)  # OPT's defaults: bos = eos = "</s>", pad "<pad>"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
