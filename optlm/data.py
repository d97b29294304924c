"""Training data: read text/JSONL files in pieces, tokenize into a memory-mapped token file, pack blocks.

Layout of a token stream: every document is preceded by `</s>` (OPT's BOS, which is also its EOS), so
documents are separated by it and each starts the way `Tokenizer.encode` starts a prompt:
``</s> doc1 </s> doc2 …``. Token files are raw little-endian uint16 (vocabularies up to 65536) or
uint32 arrays, cached under a key of the input files and the tokenizer, and read back with
`numpy.memmap`, so a corpus never sits in Python lists.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .tokenizer import Tokenizer

PIECE_CHARS = 1 << 20  # text is tokenized ~1 MiB at a time
_CACHE_VERSION = 2
# A blank line (spaces allowed) and any further blank lines: the break between two paragraphs.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


# ---- reading ---------------------------------------------------------------------------------------

def check_file(path: str | os.PathLike) -> None:
    """A data file must be a regular, non-empty file; the error says which of those it is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty; give files with text in them")


def _utf8_error(path: Path, e: UnicodeDecodeError, offset: int) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text (undecodable byte {e.object[e.start:e.start + 1]!r} near byte "
                      f"{offset + e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`")


def unwrap(text: str) -> str:
    """Undo hard line wrapping: the lines of each paragraph joined by single spaces, paragraphs kept apart
    by one blank line. Books from Project Gutenberg break lines at ~70 characters, mid-sentence; a model
    trained on them as they are learns to emit newlines in the middle of sentences."""
    paragraphs = _PARAGRAPH_BREAK.split(text)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def _paragraph_cut(text: str) -> int:
    """Index where the last paragraph break starts (0 if none): a piece cut there unwraps as the whole would."""
    # A break that reaches the end of the text may go on in the next read: cut only before complete ones.
    starts = [m.start() for m in _PARAGRAPH_BREAK.finditer(text) if m.end() < len(text)]
    return starts[-1] if starts else 0


def _text_pieces(path: Path, unwrapped: bool = False) -> Iterator[str]:
    """The file in ~PIECE_CHARS pieces, cut only between a newline and a non-space character.

    At such a cut the GPT-2 pre-tokenizer splits the same way with or without the cut, so
    tokenizing piece by piece gives exactly the ids of tokenizing the whole file. With ``unwrapped`` each
    piece is :func:`unwrap`-ped and cut just before a paragraph break (which the next piece then starts with).
    """
    cut_at = _paragraph_cut if unwrapped else _safe_cut
    decoder = codecs.getincrementaldecoder("utf-8")()  # holds back a character split by the read
    buf, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(PIECE_CHARS)
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, offset) from None
            offset += len(raw)
            if not raw:
                break
            cut = cut_at(buf)
            if cut > 0:
                yield unwrap(buf[:cut]) if unwrapped else buf[:cut]
                buf = buf[cut:]
    if buf:
        yield unwrap(buf) if unwrapped else buf


def _safe_cut(text: str) -> int:
    """Index just after the last newline that is followed by a non-space character (0 if none)."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0 or i + 1 >= len(text):
            return 0
        if not text[i + 1].isspace():
            return i + 1


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """``(line number, where, object)`` for each non-blank line of a JSONL file (``where``: "FILE line N");
    a line that is not UTF-8 or not one JSON object is an error naming it."""
    path = Path(path)
    check_file(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{where} is not UTF-8 ({e.reason}); convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is not a JSON object; each line must be one")
            yield n, where, record


def iter_documents(path: str | os.PathLike, jsonl_key: str = "text",
                   unwrapped: bool = False) -> Iterator[tuple[str, bool]]:
    """Yield ``(text piece, starts a new document)``.

    A ``.jsonl`` file holds one document per line, a JSON object whose ``jsonl_key`` field is the text;
    any other file is UTF-8 plain text and is one document (a book, an article). ``unwrapped`` joins
    hard-wrapped lines into paragraphs (:func:`unwrap`).
    """
    path = Path(path)
    check_file(path)
    if path.suffix == ".jsonl":
        for _, where, record in iter_jsonl(path):
            if not isinstance(record.get(jsonl_key), str):
                raise ValueError(f"{where} has no string field {jsonl_key!r}; pass the field that holds the text "
                                 "(--jsonl-key)")
            yield (unwrap(record[jsonl_key]) if unwrapped else record[jsonl_key]), True
    else:
        first = True
        for piece in _text_pieces(path, unwrapped):
            yield piece, first
            first = False


# ---- tokenizing into a memmap ----------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _tokenizer_digest(tokenizer: Tokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        h = hashlib.sha256()
        for name in sorted(os.listdir(tmp)):
            h.update(name.encode() + Path(tmp, name).read_bytes())
        return h.hexdigest()


def cache_key(paths: Sequence[str | os.PathLike], tokenizer: Tokenizer, jsonl_key: str,
              unwrapped: bool = False) -> str:
    """Changes when any file (path, size, mtime), the tokenizer, the JSONL field or the unwrapping changes."""
    files = []
    for p in paths:
        p = Path(p).resolve()
        check_file(p)
        st = p.stat()
        files.append([str(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": _CACHE_VERSION, "files": files, "tokenizer": _tokenizer_digest(tokenizer),
                       "jsonl_key": jsonl_key, "unwrapped": unwrapped}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_files(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    jsonl_key: str = "text",
    name: str = "tokens",
    unwrapped: bool = False,
) -> np.memmap:
    """Token stream of `paths` as a read-only memmap, built once into `cache_dir` and reused after.

    Written to a temporary file and renamed, so an interrupted build leaves no half file behind.
    """
    if not paths:
        raise ValueError("no data files given")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS/EOS token to separate documents; OPT tokenizers use '</s>'")
    dtype = token_dtype(len(tokenizer))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}-{cache_key(paths, tokenizer, jsonl_key, unwrapped)}.{dtype.name}"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}-", suffix=".tmp")
        n = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    file_tokens = 0
                    for piece, new_doc in iter_documents(path, jsonl_key, unwrapped):
                        ids = tokenizer.encode(piece, add_special_tokens=False)
                        if new_doc:
                            ids = [bos, *ids]
                        np.asarray(ids, dtype=dtype).tofile(out)
                        file_tokens += len(ids)
                    if file_tokens <= 1:
                        raise ValueError(f"data file {path} has no text to train on (only whitespace or "
                                         "empty documents)")
                    n += file_tokens
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return np.memmap(target, dtype=dtype, mode="r")


# ---- blocks ----------------------------------------------------------------------------------------

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of ``n`` examples in ``epoch``: a pure function of (seed, epoch), so a resumed run
    needs only its step counter to continue the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class BlockDataset:
    """Non-overlapping windows of ``block_size + 1`` tokens over a token stream (inputs and shifted targets).

    Training order is a fresh permutation of the blocks each epoch, drawn from ``seed + epoch``, so
    the k-th example of the run is a pure function of (seed, k): resuming needs only the step counter.
    """

    tokens: np.ndarray
    block_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.n_blocks = (len(self.tokens) - 1) // self.block_size
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n_blocks

    def block(self, i: int) -> np.ndarray:
        start = i * self.block_size
        return np.asarray(self.tokens[start:start + self.block_size + 1], dtype=np.int64)

    def example_index(self, k: int) -> int:
        """Block index of the run's k-th training example."""
        epoch, j = divmod(k, self.n_blocks)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_order(self.seed, epoch, self.n_blocks))
        return int(self._perm[1][j])

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (B, block_size) int64, for the given block indices."""
        rows = torch.from_numpy(np.stack([self.block(i) for i in indices]))  # (B, block_size + 1)
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, first_example: int, batch_size: int) -> tuple[Tensor, Tensor]:
        return self.batch([self.example_index(first_example + b) for b in range(batch_size)])


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the tail of a stream (the last documents) for validation: at least one block."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = max(int(len(tokens) * val_fraction), block_size + 1)
    if len(tokens) - n_val < block_size + 1:
        raise ValueError(f"the data has only {len(tokens)} tokens: too few for a training block and a validation "
                         f"block of {block_size} tokens; add data, lower --block-size or pass --val-data")
    return tokens[:-n_val], tokens[-n_val:]
