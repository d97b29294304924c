"""OPT's byte-level BPE tokenizer on the `tokenizers` library, plus streaming detokenisation.

Behaves like transformers' `GPT2Tokenizer` loaded from the facebook/opt-* hub files (the class that
`model_type: opt` maps to): GPT-2 BPE, `</s>` (id 2) prepended as BOS, special-token strings in the
text matched as single tokens, and decoding without `clean_up_tokenization_spaces` (transformers 5
skips that clean-up for BPE tokenizers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .bundled import BUNDLED_ALIASES, bundled_model_path

# Each family's special tokens, as its hub repositories' special_tokens_map.json / tokenizer_config.json give
# them; used when a directory has no tokenizer config. OPT prepends </s> as BOS; GPT-Neo (GPT-2's tokenizer)
# prepends nothing and has no pad token.
OPT_DEFAULTS = {
    "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "add_bos_token": True
}
GPT2_DEFAULTS = {
    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_bos_token": False
}
FAMILY_DEFAULTS = {"opt": OPT_DEFAULTS, "gpt_neo": GPT2_DEFAULTS}
# transformers' named special tokens, in its order (which fixes the order of `all_special_ids`).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
NO_LIMIT = int(1e20)  # transformers reads a model_max_length above this as "no limit" (OPT ships 1e30)


def _content(token: str | dict) -> str:
    return token if isinstance(token, str) else token["content"]


def _added_token(token: str | dict, special: bool | None = None) -> AddedToken:
    """An AddedToken from a config entry: a plain string, or a dict with `content` and matching flags."""
    if isinstance(token, str):
        return AddedToken(token, special=True, normalized=False)  # what transformers makes of a string
    flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
    special = token.get("special", True) if special is None else special
    return AddedToken(token["content"], special=special, **flags)


def _to_list(ids: Any) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # torch tensors and numpy arrays
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


class BatchEncoding(dict):
    """The `dict` returned by `Tokenizer.__call__`; also allows `enc.input_ids` and `enc.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """A copy with every tensor moved to `device`."""
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and call surface of a transformers tokenizer.

    `config` holds `tokenizer_config.json` keys: special tokens (strings or AddedToken dicts),
    `add_bos_token`, `add_eos_token`, `added_tokens_decoder`, `additional_special_tokens`,
    `padding_side`, `model_max_length`; a missing key means "none", as in transformers.
    The backend is modified (special tokens, post-processor), so pass one this object may own.
    """

    def __init__(self, backend: Backend, config: dict[str, Any]):
        self._tk = backend
        self.special_tokens_map = {k: _content(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        self.additional_special_tokens = [_content(t) for t in extra]
        # Register added and special tokens (in transformers' order) so their strings in text become one id.
        decoder = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        backend.add_tokens([_added_token(t) for _, t in decoder])
        named = [config[k] for k in SPECIAL_KEYS if config.get(k) is not None]
        backend.add_special_tokens([_added_token(t, special=True) for t in named + extra])

        self._add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self._add_eos = bool(config.get("add_eos_token", False)) and self.eos_token is not None
        # As in transformers, a tokenizer.json's own post-processor stands unless the config says otherwise.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = self._template()
        self.padding_side: str = config.get("padding_side", "right")
        limit = config.get("model_max_length")
        self.model_max_length: int | None = int(limit) if limit is not None and limit < NO_LIMIT else None

    # Read-only: the post-processor is built from them once. Pass add_special_tokens=False to skip BOS.
    add_bos_token = property(lambda self: self._add_bos, doc="Whether `encode` prepends the BOS token.")
    add_eos_token = property(lambda self: self._add_eos, doc="Whether `encode` appends the EOS token.")

    def _template(self) -> processors.TemplateProcessing:
        bos = self.bos_token if self.add_bos_token else None
        eos = self.eos_token if self.add_eos_token else None
        single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
        pair = " ".join(p for p in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
        used = [(t, self._tk.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t]
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)

    # ---- construction and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Tokenizer:
        """Load from a local directory or a hub id such as "facebook/opt-125m" (through the HF cache).

        Reads `tokenizer.json`, else `vocab.json` + `merges.txt` (GPT-2 byte-level BPE), plus
        `tokenizer_config.json` / `special_tokens_map.json` when present; with neither config, the special
        tokens of the model family (config.json's `model_type`: OPT's, or GPT-2's for GPT-Neo) apply.
        `revision` (branch, tag or commit) is used for hub ids only.
        """
        path, local = Path(path_or_hub_id), Path(path_or_hub_id).is_dir()
        if not local and str(path_or_hub_id) in BUNDLED_ALIASES:
            path, local = bundled_model_path(), True
        if path.is_file():
            raise ValueError(f"{str(path)!r} is a file; pass the directory that holds the tokenizer files")

        def find(name: str) -> Path | None:
            if local:
                return path / name if (path / name).is_file() else None
            return _hub_file(str(path_or_hub_id), name, revision)

        config = _read_config(*map(find, CONFIG_FILES))
        if tokenizer_json := find("tokenizer.json"):
            try:
                backend = Backend.from_file(str(tokenizer_json))
            except Exception as e:  # the tokenizers library raises plain Exception for a bad file
                raise ValueError(f"{tokenizer_json} is not a valid tokenizer.json ({e}); restore it, or remove it "
                                 "to fall back to vocab.json + merges.txt") from None
        else:
            vocab, merges = find("vocab.json"), find("merges.txt")
            if vocab is None or merges is None:
                where = f"directory {str(path)!r}" if local else f"hub repo {str(path_or_hub_id)!r}"
                hint = "point at the folder that holds them" if local else (
                    "check the id and revision; with HF_HUB_OFFLINE=1 they must already be in the HF cache"
                )
                raise FileNotFoundError(
                    f"no tokenizer in {where}: looked for tokenizer.json, or vocab.json + merges.txt; {hint}"
                )
            # The pipeline transformers' GPT2Tokenizer builds from these files.
            try:
                backend = Backend(models.BPE.from_file(
                    str(vocab), str(merges), dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                    fuse_unk=False,
                ))
            except Exception as e:  # the tokenizers library raises plain Exception for bad files
                raise ValueError(f"{vocab} / {merges} are not valid BPE files ({e}); restore them") from None
            add_prefix_space = bool((config or {}).get("add_prefix_space", False))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
            backend.decoder = decoders.ByteLevel()
        if config is None:
            config = _family_defaults(backend, find("config.json"))
        return cls(backend, config)

    @classmethod
    def from_tokenizers(cls, tk: Backend, **special_tokens: Any) -> Tokenizer:
        """Wrap an in-memory `tokenizers.Tokenizer` (e.g. one just trained); `tk` itself is left untouched.

        Keywords are config keys (`bos_token="<s>"`, `pad_token=None`, `add_bos_token=False`, ...) and
        override the defaults of the family whose end-of-text token the vocabulary has (OPT's unless it
        lacks ``</s>``), each of which applies only if the vocabulary has that token.
        """
        known = {*SPECIAL_KEYS, "add_bos_token", "add_eos_token", "additional_special_tokens",
                 "padding_side", "model_max_length"}
        if unknown := set(special_tokens) - known:
            raise TypeError(f"unknown keyword(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(Backend.from_str(tk.to_str()), {**_family_defaults(tk, None), **special_tokens})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, which this class
        and transformers' `AutoTokenizer` both load to identical ids."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(out / "tokenizer.json"))
        config = {
            **self.special_tokens_map,
            "additional_special_tokens": self.additional_special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            # The generic class loads tokenizer.json as is, whatever pre-tokenizer a trained one has.
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        config = {k: v for k, v in config.items() if v is not None}
        for name, content in zip(CONFIG_FILES, (config, self.special_tokens_map), strict=True):
            (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", "utf-8")

    # ---- vocabulary ---------------------------------------------------------------------------------

    bos_token = property(lambda self: self.special_tokens_map.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens_map.get("eos_token"))
    unk_token = property(lambda self: self.special_tokens_map.get("unk_token"))
    pad_token = property(lambda self: self.special_tokens_map.get("pad_token"))
    # Their ids, None when unset: bos = eos = unk = 2 and pad = 1 for OPT.
    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (50265 for OPT; its model pads to 50272)."""
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and additional special tokens, deduplicated, in transformers' order."""
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.additional_special_tokens])
        return [self._tk.token_to_id(t) for t in tokens]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) to id(s); unknown tokens map to `unk_token_id`."""
        if isinstance(tokens, str):
            found = self._tk.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int] | torch.Tensor) -> str | None | list[str | None]:
        """Id(s) to token string(s) in byte-level form (`Ġ` stands for a space)."""
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self._tk.id_to_token(int(ids))
        return [self._tk.id_to_token(i) for i in _to_list(ids)]

    # ---- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS (`</s>`) first for OPT when `add_special_tokens`."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` without special tokens, and each token's (start, end) character span in it
        (a token's span includes the space it starts with)."""
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, 1-D tensor or single id); broken UTF-8 becomes U+FFFD."""
        return self._tk.decode(_to_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch: Iterable[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        """`decode` for each row of a list of id lists or a 2-D tensor."""
        rows = [_to_list(row) for row in batch]
        return self._tk.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch into `input_ids` and `attention_mask`, as transformers does.

        padding: False / "do_not_pad", True / "longest" (to the longest row) or "max_length".
        truncation: cut rows (keeping BOS) to `max_length`, else to `model_max_length` when set. Left as
        None it follows transformers: on exactly when `max_length` is given and `padding` is False.
        return_tensors: None for lists (flat for a single text), "pt" for (batch, length) tensors.
        """
        side = padding_side or self.padding_side
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding={padding!r}; use False, True, 'longest' or 'max_length'")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}; use 'left' or 'right'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}; only None and 'pt' are supported")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length}; it must be at least 1")
        if truncation not in (None, True, False):  # transformers' strategy names: only one sequence here
            raise ValueError(f"truncation={truncation!r}; use True or False")
        if truncation is None:
            truncation = max_length is not None and padding is False
        limit = self.model_max_length if max_length is None else max_length
        texts = [text] if isinstance(text, str) else list(text)
        rows = self._encode_batch(texts, add_special_tokens, limit if truncation else None)
        masks = [[1] * len(r) for r in rows]

        # "max_length" with no length known pads nothing, as in transformers.
        width = max(map(len, rows), default=0) if padding in (True, "longest") else None
        width = limit if padding == "max_length" else width
        if width is not None:
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token; set one first, e.g. "
                                 "tok.special_tokens_map['pad_token'] = tok.eos_token")

            def pad(row: list[int], fill: int) -> list[int]:
                extra = [fill] * max(width - len(row), 0)
                return extra + row if side == "left" else row + extra

            rows, masks = [pad(r, self.pad_token_id) for r in rows], [pad(m, 0) for m in masks]

        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows have different lengths; pass padding=True to get tensors")
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if isinstance(text, str):
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def _encode_batch(self, texts: list[str], add_special: bool, max_length: int | None) -> list[list[int]]:
        n_special = self._tk.num_special_tokens_to_add(False) if add_special else 0
        rows = []
        for enc in self._tk.encode_batch(texts, add_special_tokens=False):
            if max_length is not None:  # cut the text, not BOS/EOS: the template adds those afterwards
                enc.truncate(max(max_length - n_special, 0))
            rows.append((self._tk.post_process(enc) if add_special else enc).ids)
        return rows


def _hub_file(repo_id: str, name: str, revision: str | None) -> Path | None:
    """Path of `name` in the HF cache (downloaded first when online), or None when the repo lacks it."""
    try:
        return Path(hf_hub_download(repo_id, name, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None  # an optional file; the caller names the required ones if they are missing
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is neither a directory nor a hub id like 'facebook/opt-125m'") from e


def _read_config(tokenizer_config: Path | None, special_tokens_map: Path | None) -> dict[str, Any] | None:
    """Merge the two config files as transformers does; None when neither exists."""
    if tokenizer_config is None and special_tokens_map is None:
        return None
    config = _read_json_object(tokenizer_config) if tokenizer_config else {}
    # transformers reads special_tokens_map.json, which then wins, only without added_tokens_decoder.
    if special_tokens_map is not None and "added_tokens_decoder" not in config:
        config.update(_read_json_object(special_tokens_map))
    return config


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the tokenizer files") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}; restore the tokenizer files")
    return value


def _family_defaults(backend: Backend, model_config: Path | None) -> dict[str, Any]:
    """The special tokens of the model family the checkpoint's config.json names; without one, of the family
    whose end-of-text token the vocabulary has (OPT's ``</s>``, else GPT-2's ``<|endoftext|>``). Tokens missing
    from the vocabulary are left out, so a foreign vocabulary gains no ids."""
    model_type = None
    if model_config is not None:
        try:
            model_type = json.loads(model_config.read_bytes().decode("utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            model_type = None  # the model loader reports a broken config.json; the tokenizer needs no more
    if model_type not in FAMILY_DEFAULTS:
        model_type = "gpt_neo" if backend.token_to_id("</s>") is None and backend.token_to_id("<|endoftext|>") \
            is not None else "opt"
    defaults = FAMILY_DEFAULTS[model_type]
    return {k: v for k, v in defaults.items() if isinstance(v, bool) or backend.token_to_id(v) is not None}


class StreamDecoder:
    """Turn ids into text as they are generated, never emitting half a UTF-8 character.

    Byte-level BPE spreads one emoji or CJK character over several tokens, and decoding only some of
    them gives U+FFFD. So ids wait until their text stops ending in U+FFFD and then go out together;
    every piece ends on a character boundary, so the pieces joined equal decoding all ids at once.
    (That holds for byte-level decoders: OPT, GPT-2 and ByteLevel BPE trained with `tokenizers`.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending: list[int] = []

    def push(self, token_id: int | torch.Tensor) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""  # possibly a partial character whose remaining bytes are still to come
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Return whatever is held back (bytes that never formed a character come out as U+FFFD)."""
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        self._pending.clear()
        return text
