"""Models larger than memory: keep only a window of decoder layers resident and stream the others from the
checkpoint's safetensors files as the forward pass reaches them (the use case of FlexGen and accelerate's
disk offload, for one CPU process).

The embeddings, final norm and head are read once and stay. The decoder layers share ``window`` slots of
memory, each the size of one layer: while layer i computes in its slot, a background thread reads layer
i + 1 (… i + window - 1) into the next (``os.preadv`` releases the GIL, so reading and computing overlap), and
layer i's parameters are pointed at its slot just before it runs. The files are read with plain reads, not
memory-mapped: a mapped file's touched pages count in the process's resident memory until unmapped, and
after one pass that would be the whole model; read pages stay in the kernel's page cache, which it can
reclaim, so a model several times the memory limit runs at the speed of reading it once per token (from the
page cache when it fits there, from the disk when it does not).

``offloaded(cls, directory, config, dtype, window)`` builds such a model; ``from_pretrained(...,
max_memory=...)`` and ``--offload`` / ``--max-memory`` use it. Inference only: the model's weights outside the
running layers are not in memory, so training, saving or fusing projections is refused or skipped.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..checkpoint import Stored

# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md) as torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_into(stored: Stored, out: Tensor, fds: dict[Path, int]) -> None:
    """Read ``stored`` into ``out`` (contiguous, same shape), converting its dtype if they differ."""
    dtype = DTYPES[stored.dtype]
    target = out if out.dtype == dtype else torch.empty(stored.shape, dtype=dtype)
    buffer = memoryview(target.view(-1).view(torch.uint8).numpy())
    if buffer.nbytes != stored.nbytes:
        raise ckpt.CheckpointError(f"{stored.path}: a tensor's byte count does not match its shape and dtype")
    done = 0
    while done < stored.nbytes:  # preadv may return short reads
        got = os.preadv(fds[stored.path], [buffer[done:]], stored.offset + done)
        if got == 0:
            raise ckpt.CheckpointError(f"{stored.path} ended early (truncated while in use?)")
        done += got
    if target is not out:
        out.copy_(target)


class LayerStream:
    """``window`` slots shared by a list of layers, filled ahead of the forward pass."""

    def __init__(self, layers: list[nn.Module], sources: list[dict[str, Stored]], dtype: torch.dtype, window: int):
        if window < 2:
            raise ValueError(f"the window must hold at least 2 layers (one computing, one being read), got {window}")
        self.layers, self.sources, self.dtype = layers, sources, dtype
        self.window = min(window, len(layers))
        # A slot's layout: each of a layer's parameters at its offset (all layers of a family have the same).
        self.names = [list(s) for s in sources]
        sizes = [sum(math.prod(s.shape) for s in src.values()) for src in sources]
        self.slots = [torch.empty(max(sizes), dtype=dtype) for _ in range(self.window)]
        self.fds = {p: os.open(p, os.O_RDONLY) for p in {s.path for src in sources for s in src.values()}}
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="optlm-offload")
        self.queue: deque[tuple[int, int, Future]] = deque()  # (layer, slot, read) in the order they will run
        self.lock = threading.Lock()
        self.reads = 0  # layers read so far (tests and benchmarks)
        for i in range(len(layers)):
            self._point(i, 0)  # shapes right from the start; the contents arrive when the layer runs
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: self.before(i))

    def _views(self, i: int, slot: int) -> dict[str, Tensor]:
        views, at = {}, 0
        for name in self.names[i]:
            shape = self.sources[i][name].shape
            views[name] = self.slots[slot][at:at + math.prod(shape)].view(shape)
            at += math.prod(shape)
        return views

    def _point(self, i: int, slot: int) -> None:
        layer = self.layers[i]
        for name, view in self._views(i, slot).items():
            owner, _, attr = name.rpartition(".")
            module = layer.get_submodule(owner)
            param = getattr(module, attr)
            if param.is_meta:  # first time: built on the meta device
                setattr(module, attr, nn.Parameter(view, requires_grad=False))
            else:
                param.data = view

    def _read(self, i: int, slot: int) -> None:
        for name, view in self._views(i, slot).items():
            read_into(self.sources[i][name], view, self.fds)
        self.reads += 1

    def _submit(self, i: int, slot: int) -> None:
        self.queue.append((i, slot, self.reader.submit(self._read, i, slot)))

    def before(self, i: int) -> None:
        """Layer ``i`` is about to run: wait for its read (start it if nobody did), point it at its slot, and
        start reading the layers after it into the slots the layers before it have left."""
        with self.lock:
            while self.queue and self.queue[0][0] != i:  # layers that ran (or were skipped): their slots are free
                self.queue.popleft()[2].exception()  # waited for; an error of a read nobody needs is not raised
            if not self.queue:  # a pass that did not go in order (the first one, or one cut short by an error)
                self._submit(i, 0)
            _, slot, read = self.queue[0]
            if read.exception() is not None:  # raised here, in the forward pass, once: the next pass reads again
                self.queue.popleft()
                raise read.exception()
            self._point(i, slot)
            used = {s for _, s, _ in self.queue}
            last = self.queue[-1][0]
            while len(self.queue) < self.window:
                last = (last + 1) % len(self.layers)  # the forward after this one starts again at layer 0
                free = next(s for s in range(self.window) if s not in used)
                used.add(free)
                self._submit(last, free)

    def close(self) -> None:
        self.reader.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        if self.fds:
            self.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.{0 if n >= 100 * 2**20 else 2}f} MiB"


def layer_bytes(cls: type[nn.Module], config, dtype: torch.dtype) -> tuple[int, int, int]:
    """(bytes of one decoder layer, bytes of everything else, number of layers) for ``cls`` built from
    ``config`` in ``dtype``."""
    from ..hf.base import empty_model

    model = empty_model(cls, config)
    model.tie_weights()  # a tied head is the embedding: counted once
    size = torch.empty((), dtype=dtype).element_size()
    layers = model.get_decoder().layers
    per_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * size
    total = sum(p.numel() for p in dict.fromkeys(model.parameters())) * size
    return per_layer, total - sum(p.numel() for p in layers.parameters()) * size, len(layers)


def window_for(max_memory: int, cls: type[nn.Module], config, dtype: torch.dtype) -> int | None:
    """How many layers fit in ``max_memory`` bytes beside the resident weights (None: the whole model fits).
    The activations and the KV cache come on top."""
    per_layer, rest, layers = layer_bytes(cls, config, dtype)
    if rest + per_layer * layers <= max_memory:
        return None
    window = (max_memory - rest) // per_layer
    if window < 2:
        raise ValueError(f"max_memory {_mib(max_memory)} is too small: the embeddings, head and norms take "
                         f"{_mib(rest)} and streaming needs 2 layers of {_mib(per_layer)} each, "
                         f"{_mib(rest + 2 * per_layer)} in all (plus activations and the KV cache)")
    return int(window)


def offloaded(cls: type[nn.Module], directory: Path, config, dtype: torch.dtype | None, window: int | None = None,
              max_memory: int | None = None) -> nn.Module | None:
    """``cls`` with the checkpoint in ``directory``: the decoder layers streamed through ``window`` slots (or
    as many as fit in ``max_memory`` bytes beside the rest; None if the whole model fits), the rest read into
    memory. ``dtype=None`` keeps the checkpoint's floating dtype. A window as large as the model streams
    nothing: None, as for a budget the whole model fits in."""
    from ..hf.base import empty_model

    if window is not None and window < 2:
        raise ValueError(f"offload={window}: streaming keeps at least 2 layers resident (one computing, one being "
                         "read); use offload=True for 2")

    files = ckpt.weight_files(directory)
    for path in files:
        if path.suffix != ".safetensors":
            raise ckpt.CheckpointError(f"streaming layers reads safetensors files; {path} is not one — load it "
                                       "once and save_pretrained() it (optlm writes safetensors), then offload that")
    stored = ckpt.catalog(files)
    model = empty_model(cls, config)
    if window is not None and window >= len(model.get_decoder().layers):
        return None
    placeholders = {k: torch.empty(s.shape, dtype=DTYPES[s.dtype], device="meta") for k, s in stored.items()}
    names = ckpt.normalize_keys(placeholders, set(model.state_dict()), cls.base_model_prefix,
                                cls._ignore_checkpoint_keys)
    new_keys = ckpt.check_state_dict(model, names, set(model._optional_keys), str(directory))
    if [k for k in new_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise ckpt.CheckpointError(f"{directory} lacks weights of {cls.__name__} ({', '.join(new_keys)}); streaming "
                                   "layers needs a checkpoint with every weight of the model")
    by_id = {id(t): stored[k] for k, t in placeholders.items()}
    source = {k: by_id[id(t)] for k, t in names.items()}  # model name -> where it lies
    target = dtype or ckpt.storage_dtype(placeholders)
    if max_memory is not None:
        window = window_for(max_memory, cls, config, target)
        if window is None or window >= len(model.get_decoder().layers):
            return None
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder.layers) + "."
    layers = list(decoder.layers)
    sources: list[dict[str, Stored]] = [{} for _ in layers]
    fds = {p: os.open(p, os.O_RDONLY) for p in {s.path for s in stored.values()}}
    try:
        resident = {}
        for key, s in source.items():
            if key.startswith(prefix):
                index, _, name = key[len(prefix):].partition(".")
                sources[int(index)][name] = s
            elif key in model.state_dict():
                t = torch.empty(s.shape, dtype=target if DTYPES[s.dtype].is_floating_point else DTYPES[s.dtype])
                read_into(s, t, fds)
                resident[key] = t
    finally:
        for fd in fds.values():
            os.close(fd)
    model.load_state_dict(resident, strict=False, assign=True)
    model.tie_weights()
    model.offload = LayerStream(layers, sources, target, window)  # the layers' parameters become slot views
    for p in model.parameters():
        p.requires_grad_(False)  # no autograd graph may keep a slot's view: the slot is refilled
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"parameters left on the meta device: {meta}"
    return model.eval()
