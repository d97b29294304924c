"""A model's CPU weights moved into memory backed by 2 MiB pages (Linux transparent huge pages), in place.

Why: decoding reads every weight once per token, and with 4 KiB pages the processor's address translation
misses on most of them. One pass over opt-125m's weights, one row of activations, took 23.1 ms in int8, 54.9 ms
in fp32 and 32.7 ms in bf16 with optlm's kernels; in 2 MiB pages 10.7, 37.7 and 20.2 ms
(``python benchmarks/kernels.py --rows 1 --repeats 3``, then with ``--huge-pages``). Linux gives huge pages to
memory that asks for them with ``madvise(MADV_HUGEPAGE)`` before it is first touched (the usual ``madvise``
setting of ``/sys/kernel/mm/transparent_hugepage/enabled``); PyTorch's allocator and memory-mapped checkpoint
files do not.

:func:`place` copies every parameter and buffer of a model into one such region and points the same tensor
objects at it (``Tensor.set_``): parameters stay the objects optimizers and modules hold, views of one storage
(fused q/k/v, a tied head) stay views of one another, values are unchanged. Nothing happens — the weights stay
where they are — on other systems, where huge pages are off, for models under 2 MiB, or when the copy would not
fit in the memory available (it is made before the old storage is let go). :func:`zeros` allocates a key/value
cache there, reusing the memory of caches no longer in use (up to ``KEEP_FREE`` of them stay mapped).
"""

from __future__ import annotations

import mmap
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

HUGE = 2 << 20  # bytes in one huge page on x86-64 and arm64 Linux
ALIGN = 64  # each storage starts on a cache line (and on a multiple of every element size)
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system hands out transparent huge pages to memory that asks (``always`` or ``madvise``)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP.read_text(encoding="ascii")
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tensors(model: nn.Module, extra: list[Tensor]) -> list[Tensor]:
    seen, out = set(), []
    for t in (*model.parameters(), *model.buffers(), *extra):
        if id(t) not in seen and t.device.type == "cpu" and not t.is_meta and t.numel():
            seen.add(id(t))
            out.append(t)
    return out


def _map(nbytes: int) -> mmap.mmap:
    """A private anonymous mapping with room for ``nbytes`` from a huge page boundary, asking for huge pages."""
    # private: shared anonymous memory is shmem, which Linux gives huge pages under another setting (often never)
    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the pages come huge
    return region


def _aligned(region: mmap.mmap, nbytes: int) -> Tensor:
    arena = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -arena.data_ptr() % HUGE
    return arena[start:start + nbytes]


def _region(nbytes: int) -> Tensor:
    """``nbytes`` zeroed bytes (uint8) starting on a huge page boundary, in memory that asked for huge pages."""
    return _aligned(_map(nbytes), nbytes)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``, in huge pages where :func:`available` and the tensor
    is a CPU one of at least 2 MiB (a key/value cache: decoding reads all of it every step)."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if (device is not None and torch.device(device).type != "cpu") or nbytes < HUGE or not available():
        return torch.zeros(shape, dtype=dtype, device=device)
    return _reused_region(nbytes).view(dtype).view(shape)


# Caches come and go with every generate() call. A fresh region costs its page faults on first touch, and with
# the usual ``defrag`` setting (``madvise``) a huge-page fault may wait for the kernel to compact memory, which
# made a prompt's cache writes slow by a varying amount. So the last few regions whose tensors are all gone
# stay mapped and are handed out again, zeroed.
KEEP_FREE = 2  # unused regions kept for reuse at each allocation (the memory they hold stays resident)
_pool: list[tuple[mmap.mmap, int]] = []  # (mapping, its usable bytes), least recently handed out first
_pool_lock = threading.Lock()


def _in_use(entry: tuple[mmap.mmap, int]) -> bool:
    # Every tensor made from a mapping keeps a reference to it (torch.frombuffer). Unused, only the pool's
    # entry and getrefcount's argument refer to it (callers never bind the mapping itself before asking).
    return sys.getrefcount(entry[0]) > 2


def _reused_region(nbytes: int) -> Tensor:
    with _pool_lock:
        return _reuse_or_map(nbytes)


def _reuse_or_map(nbytes: int) -> Tensor:
    entry = next((e for e in _pool if nbytes <= e[1] <= 2 * nbytes and not _in_use(e)), None)
    reused = entry is not None
    if reused:
        _pool.remove(entry)
    else:
        entry = (_map(nbytes), nbytes)
    out = _aligned(entry[0], nbytes)  # in use from here on
    _pool.append(entry)  # most recently handed out last
    free = [e for e in _pool if not _in_use(e)]
    for e in free[:max(0, len(free) - KEEP_FREE)]:  # the oldest unused ones go (unmapped once unreferenced)
        _pool.remove(e)
    if reused:
        out.zero_()  # fresh anonymous memory starts zeroed
    return out


@torch.no_grad()
def place(model: nn.Module, extra: list[Tensor] = ()) -> int:
    """Move the storage of ``model``'s CPU parameters and buffers (and of the tensors in ``extra``) into one
    region of huge pages, in place; returns the bytes moved (0 when it did nothing; see the module docstring)."""
    if not available():
        return 0
    by_storage: dict[int, tuple[torch.UntypedStorage, list[Tensor]]] = {}
    for t in _tensors(model, list(extra)):
        storage = t.untyped_storage()
        by_storage.setdefault(storage.data_ptr(), (storage, []))[1].append(t)
    offsets, total = {}, 0
    for key, (storage, _) in by_storage.items():
        offsets[key] = total
        total += -(-storage.nbytes() // ALIGN) * ALIGN
    if total < HUGE or 2 * total > _available_memory():
        return 0
    arena = _region(total)
    target = arena.untyped_storage()
    for key, (storage, tensors) in by_storage.items():
        arena[offsets[key]:offsets[key] + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        at = arena.storage_offset() + offsets[key]  # bytes into the mapping
        for t in tensors:
            t.set_(target, at // t.element_size() + t.storage_offset(), t.size(), t.stride())
    return total
