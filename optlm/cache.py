"""Paged key/value cache: the PagedAttention idea (Kwon et al. 2023, vLLM) in plain PyTorch.

Keys and values of every layer live in one pool of fixed-size blocks. Each sequence owns a block table (the
blocks that hold its tokens, in order) and its own length, so sequences of any lengths share one batch, join
and leave it at any step, and memory follows the tokens in use rather than slots x context. Blocks are taken
from the pool as tokens arrive and go back the moment a sequence is freed.

Blocks are reference-counted. ``fork`` gives a new sequence its parent's blocks (``n > 1`` samples of one
prompt); a full block whose tokens, and all tokens before them, equal those of a block seen earlier is shared
instead of recomputed (prefix caching: repeated system prompts). Writing into a shared block copies it first
(copy-on-write), so no sequence ever sees another's tokens. A freed block keeps its contents and its prefix
key until the pool hands it out again, so a prompt repeated later can still find it.

Local-attention layers (GPT-Neo's, which see only the last ``window`` tokens) keep their keys/values in a
second pool: a sequence holds blocks there only for the tokens its next step can still see, and gives back
each block the window has moved past, so their memory follows the window, not the sequence. Those blocks are
published under the same prefix keys, so a shared prefix is reused only where the local pool still has the
blocks at its end.

The caller owns the cache: it registers sequences, reserves slots for the tokens it is about to run
(``append``), and passes the model a :meth:`PagedKVCache.frame` of the batch; the model writes keys/values to
those slots and reads each sequence's past by its block table. Nothing here advances on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import huge_pages
from .paged_frame import PagedFrame


class CacheFull(RuntimeError):
    """The pool has no free block for a request; the caller waits, preempts another sequence, or fails it."""


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # token ids whose keys/values are (or are about to be) cached
    keys: list[int] = field(default_factory=list)  # prefix key of each full block, in order
    salt: object = 0  # starts the key chain: what else decides the keys/values (the adapter a sequence runs with)
    local: list[int] = field(default_factory=list)  # local-attention layers' blocks: the window's, oldest first
    first: int = 0  # which of the sequence's blocks local[0] is (those before it slid out of the window)


class BlockPool:
    """Which blocks are free, how many sequences hold each one, and the prefix key of full blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.refs = [0] * num_blocks
        # Free blocks, least recently freed first: blocks freed long ago are reused before recent ones, whose
        # contents a repeated prompt may still want (an LRU over the prefix cache).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.by_key: dict[int, int] = {}
        self.key_of: dict[int, int] = {}
        self.peak = 0  # most blocks in use at once

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        if not self.free:
            raise CacheFull("no free cache block")
        block, _ = self.free.popitem(last=False)
        self.unpublish(block)  # its old contents are about to be overwritten
        self.refs[block] = 1
        self.peak = max(self.peak, len(self.refs) - len(self.free))
        return block

    def retain(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]  # a cached block coming back into use
            self.peak = max(self.peak, len(self.refs) - len(self.free))
        self.refs[block] += 1

    def release(self, block: int) -> None:
        assert self.refs[block] > 0, f"block {block} released more often than taken"
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def unpublish(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.by_key[key]

    def publish(self, block: int, key: int) -> None:
        """Make a full block findable by its prefix key (the first block with a key keeps it)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key


class PagedKVCache:
    """Keys and values of all layers in ``num_blocks`` blocks of ``block_size`` token slots.

    ``k`` and ``v`` are ``(layers, num_blocks * block_size, heads, head_dim)``: slot ``b * block_size + i`` is
    token ``i`` of block ``b``. Sequences are named by any hashable id. With ``windows`` (per layer: a
    local-attention window, or None), the local layers live apart in ``lk`` / ``lv``, ``num_local_blocks``
    blocks of their own, and ``k`` / ``v`` hold the other layers only.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 windows: list[int | None] | None = None, num_local_blocks: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} windows given for {num_layers} layers")
        full = [i for i, w in enumerate(windows) if w is None]
        local = [i for i, w in enumerate(windows) if w is not None]
        # layer -> (True, its index in k/v) or (False, its index in lk/lv)
        self._where = {**{layer: (True, i) for i, layer in enumerate(full)},
                       **{layer: (False, i) for i, layer in enumerate(local)}}
        self.window = max(windows[i] for i in local) if local else None
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        shape = (len(full), num_blocks * block_size, num_heads, head_dim)
        self.k = huge_pages.zeros(shape, dtype, device)  # decoding reads each sequence's slots every step
        self.v = huge_pages.zeros(shape, dtype, device)
        self.local_pool = None
        self.lk = self.lv = None
        if local:
            n = num_blocks if num_local_blocks is None else num_local_blocks
            self.local_pool = BlockPool(n)
            self.lk = torch.zeros((len(local), n * block_size, num_heads, head_dim), dtype=dtype, device=device)
            self.lv = torch.zeros_like(self.lk)
        self.seqs: dict[object, _Seq] = {}
        self.prefix_hit_tokens = 0  # prompt tokens found already cached (for metrics)
        self._scratch: list[Tensor] = []  # reused gather buffers (see PagedFrame.update)

    @classmethod
    def for_memory(cls, config, memory_bytes: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, max_num_seqs: int | None = None,
                   step_tokens: int | None = None, heads: int | None = None) -> PagedKVCache:
        """As many blocks as ``memory_bytes`` holds for a model with ``config`` (keys and values, all layers).

        Local-attention layers get blocks enough for ``max_num_seqs`` sequences each holding its window plus
        one step of ``step_tokens`` new tokens, and the rest of the memory goes to the other layers; without
        those numbers (or when that is no fewer) both pools get the same number of blocks. ``heads``: the heads
        this process caches, when not all (a tensor-parallel rank's share)."""
        windows = config.layer_windows
        heads = config.num_attention_heads if heads is None else heads
        per_layer = 2 * block_size * heads * config.head_dim * dtype.itemsize
        n_local = sum(w is not None for w in windows)
        full_cost, local_cost = (len(windows) - n_local) * per_layer, n_local * per_layer
        if memory_bytes < full_cost + local_cost:
            raise ValueError(f"kv cache memory {memory_bytes} bytes is less than one block ({full_cost + local_cost} "
                             f"bytes: {block_size} tokens x {config.num_hidden_layers} layers x keys and values)")
        num_blocks = memory_bytes // (full_cost + local_cost)
        num_local = num_blocks
        if n_local and max_num_seqs is not None and step_tokens is not None and full_cost:
            window = max(w for w in windows if w is not None)
            per_seq = -(-(window - 1 + step_tokens) // block_size) + 1  # +1: the window rarely starts a block
            if max_num_seqs * per_seq < num_blocks:
                num_local = max_num_seqs * per_seq
                num_blocks = (memory_bytes - num_local * local_cost) // full_cost
        return cls(config.num_hidden_layers, heads, config.head_dim, num_blocks, block_size, dtype, device, windows,
                   num_local if n_local else None)

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype, heads: int | None = None) -> int:
        """Cache bytes one token takes: keys and values of every layer and head (or of ``heads`` per layer)."""
        heads = config.num_attention_heads if heads is None else heads
        return 2 * config.num_hidden_layers * heads * config.head_dim * dtype.itemsize

    # ---- bookkeeping ---------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.pool.refs)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.pool.num_free

    @property
    def local_blocks_in_use(self) -> int:
        """Blocks of the local-attention layers' pool held by sequences (0 without local layers)."""
        return 0 if self.local_pool is None else len(self.local_pool.refs) - self.local_pool.num_free

    def length(self, seq) -> int:
        return len(self.seqs[seq].tokens)

    def blocks_needed(self, seq, n_new: int) -> int:
        """Free blocks that adding ``n_new`` tokens to ``seq`` (registered or not) may take, copy-on-write
        included (an upper bound: prefix hits only lower it)."""
        s = self.seqs.get(seq)
        have = 0 if s is None else len(s.tokens)
        held = 0 if s is None else len(s.blocks)
        need = -(-(have + n_new) // self.block_size) - held
        if s is not None and have % self.block_size and self.pool.refs[s.blocks[-1]] > 1:
            need += 1  # the shared, partly filled last block is copied before it is written
        return need

    def local_blocks_needed(self, seq, n_new: int) -> int:
        """:meth:`blocks_needed` for the local-attention layers' pool (0 without local layers)."""
        s = self.seqs.get(seq)
        if self.local_pool is None:
            return 0
        have = 0 if s is None else len(s.tokens)
        held_to = 0 if s is None else s.first + len(s.local)
        need = -(-(have + n_new) // self.block_size) - held_to
        if s is not None and s.local and have % self.block_size and self.local_pool.refs[s.local[-1]] > 1:
            need += 1
        return need

    def fits(self, seq, n_new: int, spare: int = 0) -> bool:
        """Whether both pools have the blocks ``n_new`` more tokens of ``seq`` may take, plus ``spare`` each."""
        if self.blocks_needed(seq, n_new) + spare > self.pool.num_free:
            return False
        return self.local_pool is None or self.local_blocks_needed(seq, n_new) + spare <= self.local_pool.num_free

    def add(self, seq, prompt: list[int], reuse: bool = True, salt: object = 0) -> int:
        """Register ``seq`` with its prompt's token ids; returns how many leading tokens are already cached
        (whole blocks shared with an earlier prompt; none with ``reuse=False``). At least the last prompt token
        is always left to run. Blocks are shared only between sequences with the same ``salt`` (hashable): the
        same tokens run through a different adapter have different keys and values. With local-attention
        layers, a prefix counts only as far as the local pool also still holds the blocks its window needs."""
        if seq in self.seqs:
            raise ValueError(f"sequence {seq!r} is already in the cache")
        bs, key, found = self.block_size, salt, []
        for i in range((len(prompt) - 1) // bs if reuse else 0):
            key = hash((key, tuple(prompt[i * bs:(i + 1) * bs])))
            block = self.pool.by_key.get(key)
            if block is None:
                break
            found.append((block, key))
        local, first = self._local_prefix([k for _, k in found])
        found = found[:first + len(local)] if self.local_pool is not None else found
        s = self.seqs[seq] = _Seq(salt=salt, local=local, first=first)
        for block, key in found:
            self.pool.retain(block)
            s.blocks.append(block)
            s.keys.append(key)
        for block in local:
            self.local_pool.retain(block)
        s.tokens.extend(prompt[:len(found) * bs])
        self.prefix_hit_tokens += len(s.tokens)
        return len(s.tokens)

    def _local_prefix(self, keys: list[int]) -> tuple[list[int], int]:
        """The longest cached prefix (of the blocks named by ``keys``) whose last ``window - 1`` tokens the local
        pool still holds: those local blocks, and the index of the first."""
        if self.local_pool is None:
            return [], 0
        bs = self.block_size
        for h in range(len(keys), 0, -1):
            first = max(0, h * bs - (self.window - 1)) // bs
            blocks = [self.local_pool.by_key.get(k) for k in keys[first:h]]
            if all(b is not None for b in blocks):
                return blocks, first
        return [], 0

    def fork(self, parent, child) -> None:
        """``child`` starts as a copy of ``parent`` that shares its blocks until either writes."""
        if child in self.seqs:
            raise ValueError(f"sequence {child!r} is already in the cache")
        p = self.seqs[parent]
        for b in p.blocks:
            self.pool.retain(b)
        for b in p.local:
            self.local_pool.retain(b)
        self.seqs[child] = _Seq(list(p.blocks), list(p.tokens), list(p.keys), p.salt, list(p.local), p.first)

    def free(self, seq) -> None:
        """Give back ``seq``'s blocks (finished or cancelled); unknown ids are ignored."""
        s = self.seqs.pop(seq, None)
        for b in [] if s is None else s.blocks:
            self.pool.release(b)
        for b in [] if s is None else s.local:
            self.local_pool.release(b)

    def append(self, seq, token_ids: list[int]) -> Tensor:
        """Reserve slots for ``token_ids`` after ``seq``'s cached tokens; returns their slot indices ``(n,)``.

        All-or-nothing: when a pool runs out, :class:`CacheFull` is raised and ``seq`` is unchanged.
        """
        s, bs = self.seqs[seq], self.block_size
        if not self.fits(seq, len(token_ids)):
            if self.blocks_needed(seq, len(token_ids)) > self.pool.num_free:
                raise CacheFull(f"sequence {seq!r} needs {self.blocks_needed(seq, len(token_ids))} more cache blocks "
                                f"and {self.pool.num_free} are free")
            raise CacheFull(f"sequence {seq!r} needs {self.local_blocks_needed(seq, len(token_ids))} more blocks for "
                            f"its local-attention layers and {self.local_pool.num_free} are free")
        start = len(s.tokens)
        if start % bs and self.pool.refs[s.blocks[-1]] > 1:
            self._copy_last_block(self.pool, (self.k, self.v), s.blocks)
        while len(s.blocks) * bs < start + len(token_ids):
            s.blocks.append(self.pool.take())
        if self.local_pool is not None:
            if start % bs and s.local and self.local_pool.refs[s.local[-1]] > 1:
                self._copy_last_block(self.local_pool, (self.lk, self.lv), s.local)
            while (s.first + len(s.local)) * bs < start + len(token_ids):
                s.local.append(self.local_pool.take())
        s.tokens.extend(token_ids)
        return self.slots(seq, start, len(token_ids))

    def publish(self, seq) -> None:
        """Make ``seq``'s full blocks findable by later prompts, and give back the local-attention blocks the
        window has moved past. Call it once the step's keys/values are written: a block reserved but not yet
        computed must not be shared, and the next step reads the window from the sequence's length on."""
        s, bs = self.seqs[seq], self.block_size
        for i in range(len(s.keys), len(s.tokens) // bs):
            s.keys.append(hash((s.keys[-1] if s.keys else s.salt, tuple(s.tokens[i * bs:(i + 1) * bs]))))
            self.pool.publish(s.blocks[i], s.keys[-1])
            if self.local_pool is not None and i >= s.first:
                self.local_pool.publish(s.local[i - s.first], s.keys[-1])
        if self.local_pool is not None:
            # The next step's first query sits at len(tokens) and sees back to len(tokens) - (window - 1).
            while s.local and (s.first + 1) * bs <= len(s.tokens) - (self.window - 1):
                self.local_pool.release(s.local.pop(0))
                s.first += 1

    def truncate(self, seq, length: int) -> None:
        """Forget ``seq``'s tokens from ``length`` on (a preempted or rolled-back sequence), freeing blocks.
        Local-attention layers cannot go back past the blocks their window already gave up."""
        s, bs = self.seqs[seq], self.block_size
        if self.local_pool is not None and length and s.first * bs > max(0, length - (self.window - 1)):
            raise ValueError(f"sequence {seq!r} cannot be cut back to {length} tokens: its local-attention layers "
                             f"kept only the blocks from token {s.first * bs} on; free it and run it again")
        keep = -(-length // bs)
        for b in s.blocks[keep:]:
            self.pool.release(b)
        if length % bs and self.pool.refs[s.blocks[keep - 1]] == 1:
            self.pool.unpublish(s.blocks[keep - 1])  # it will be written again: no longer the prefix it was
        if self.local_pool is not None:
            local_keep = max(keep - s.first, 0)
            for b in s.local[local_keep:]:
                self.local_pool.release(b)
            if length % bs and local_keep and self.local_pool.refs[s.local[local_keep - 1]] == 1:
                self.local_pool.unpublish(s.local[local_keep - 1])
            del s.local[local_keep:]
            if not s.local:
                s.first = keep
        del s.blocks[keep:], s.tokens[length:], s.keys[length // bs:]

    def _copy_last_block(self, pool: BlockPool, buffers: tuple[Tensor, Tensor], table: list[int]) -> None:
        old, bs = table[-1], self.block_size
        new = pool.take()
        src, dst = slice(old * bs, (old + 1) * bs), slice(new * bs, (new + 1) * bs)
        for buf in buffers:
            buf[:, dst] = buf[:, src]
        pool.release(old)
        table[-1] = new

    # ---- what the model reads and writes ---------------------------------------------------------------------

    def slots(self, seq, start: int, n: int) -> Tensor:
        """Slot indices of ``seq``'s tokens ``start … start + n - 1``."""
        pos = torch.arange(start, start + n)
        table = torch.tensor(self.seqs[seq].blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def slot_table(self, seqs: list, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Slots of each sequence's cached tokens, right-padded: ``(B, S)`` indices (padding points at slot 0)
        and a ``(B, S)`` bool mask of real tokens; ``S`` is the longest length unless given."""
        lengths = torch.tensor([len(self.seqs[s].tokens) for s in seqs])
        S = int(lengths.max()) if length is None else length
        pos = torch.arange(S)
        nb = max(-(-S // self.block_size), 1)
        tables = torch.zeros(len(seqs), nb, dtype=torch.long)
        for row, s in enumerate(seqs):
            blocks = self.seqs[s].blocks[:nb]
            tables[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        slots = tables[:, pos // self.block_size] * self.block_size + pos % self.block_size  # (B, S)
        valid = pos[None, :] < lengths[:, None]
        return slots.masked_fill(~valid, 0).to(self.k.device), valid.to(self.k.device)

    def local_slot_table(self, seqs: list, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Slots in the local-attention pool of each sequence's tokens ``starts[b] … starts[b] + length - 1``
        (those it still holds), right-padded: ``(B, length)`` indices and a ``(B, length)`` bool mask of real
        tokens."""
        bs = self.block_size
        lengths = torch.tensor([len(self.seqs[s].tokens) for s in seqs])
        pos = starts[:, None] + torch.arange(length)[None, :]  # (B, length)
        valid = pos < lengths[:, None]
        slots = torch.zeros(len(seqs), length, dtype=torch.long)
        for row, s in enumerate(seqs):
            seq = self.seqs[s]
            table = torch.tensor(seq.local, dtype=torch.long)
            p = pos[row][valid[row]]
            slots[row, :len(p)] = table[p // bs - seq.first] * bs + p % bs
        return slots.to(self.k.device), valid.to(self.k.device)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s key and value buffers ``(slots, heads, head_dim)``, in whichever pool it lives."""
        full, i = self._where[layer]
        return (self.k[i], self.v[i]) if full else (self.lk[i], self.lv[i])

    def is_local(self, layer: int) -> bool:
        return not self._where[layer][0]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store keys/values ``(n, heads, head_dim)`` of ``n`` tokens at ``slots`` ``(n,)`` of a layer of the
        main pool."""
        kb, vb = self.buffers(layer)
        slots = slots.to(kb.device)
        kb.index_copy_(0, slots, k.to(kb.dtype))
        vb.index_copy_(0, slots, v.to(vb.dtype))

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at ``slots`` ``(B, S)``, as ``(B, heads, S, head_dim)`` each."""
        kb, vb = self.buffers(layer)
        return kb[slots].transpose(1, 2), vb[slots].transpose(1, 2)

    def scratch(self, n: int, shape: tuple[int, ...]) -> list[Tensor]:
        """``n`` buffers of ``shape`` reused from call to call (their contents are overwritten by the next
        caller). A gather into fresh memory costs ~7x a gather into memory already touched: the first write to
        each new page is a page fault."""
        numel = 1
        for d in shape:
            numel *= d
        while len(self._scratch) < n:
            self._scratch.append(self.k.new_empty(0))
        for i in range(n):
            if self._scratch[i].numel() < numel:
                self._scratch[i] = self.k.new_empty(max(numel, 2 * self._scratch[i].numel()))
        return [buf[:numel].view(shape) for buf in self._scratch[:n]]

    def frame(self, rows: list[tuple[object, int]]) -> PagedFrame:
        """The frame of one forward pass in which row ``b`` runs the last ``n_b`` tokens of sequence ``seq_b``
        (``rows = [(seq_b, n_b), ...]``, slots already reserved by :meth:`append`). Rows are right-padded to
        the longest ``n``; feed the model ``(B, T)`` ids laid out the same way."""
        return PagedFrame(self, rows)
