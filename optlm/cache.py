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

The caller owns the cache: it registers sequences, reserves slots for the tokens it is about to run
(``append``), and passes the model a :meth:`PagedKVCache.frame` of the batch; the model writes keys/values to
those slots and reads each sequence's past by its block table. Nothing here advances on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import kernels
from .models.core import Frame


class CacheFull(RuntimeError):
    """The pool has no free block for a request; the caller waits, preempts another sequence, or fails it."""


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # token ids whose keys/values are (or are about to be) cached
    keys: list[int] = field(default_factory=list)  # prefix key of each full block, in order
    salt: object = 0  # starts the key chain: what else decides the keys/values (the adapter a sequence runs with)


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
    token ``i`` of block ``b``. Sequences are named by any hashable id.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        shape = (num_layers, num_blocks * block_size, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqs: dict[object, _Seq] = {}
        self.prefix_hit_tokens = 0  # prompt tokens found already cached (for metrics)
        self._scratch: list[Tensor] = []  # reused gather buffers (see PagedFrame.update)

    @classmethod
    def for_memory(cls, config, memory_bytes: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> PagedKVCache:
        """As many blocks as ``memory_bytes`` holds for a model with ``config`` (keys and values, all layers)."""
        per_block = block_size * cls.bytes_per_token(config, dtype)
        if memory_bytes < per_block:
            raise ValueError(f"kv cache memory {memory_bytes} bytes is less than one block ({per_block} bytes: "
                             f"{block_size} tokens x {config.num_hidden_layers} layers x keys and values)")
        return cls(config.num_hidden_layers, config.num_attention_heads, config.head_dim, memory_bytes // per_block,
                   block_size, dtype, device)

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype) -> int:
        """Cache bytes one token takes: keys and values of every layer and head."""
        return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * dtype.itemsize

    # ---- bookkeeping ---------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.pool.refs)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.pool.num_free

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

    def add(self, seq, prompt: list[int], reuse: bool = True, salt: object = 0) -> int:
        """Register ``seq`` with its prompt's token ids; returns how many leading tokens are already cached
        (whole blocks shared with an earlier prompt; none with ``reuse=False``). At least the last prompt token
        is always left to run. Blocks are shared only between sequences with the same ``salt`` (hashable): the
        same tokens run through a different adapter have different keys and values."""
        if seq in self.seqs:
            raise ValueError(f"sequence {seq!r} is already in the cache")
        s = self.seqs[seq] = _Seq(salt=salt)
        bs, key = self.block_size, salt
        for i in range((len(prompt) - 1) // bs if reuse else 0):
            key = hash((key, tuple(prompt[i * bs:(i + 1) * bs])))
            block = self.pool.by_key.get(key)
            if block is None:
                break
            self.pool.retain(block)
            s.blocks.append(block)
            s.keys.append(key)
            s.tokens.extend(prompt[i * bs:(i + 1) * bs])
        self.prefix_hit_tokens += len(s.tokens)
        return len(s.tokens)

    def fork(self, parent, child) -> None:
        """``child`` starts as a copy of ``parent`` that shares its blocks until either writes."""
        if child in self.seqs:
            raise ValueError(f"sequence {child!r} is already in the cache")
        p = self.seqs[parent]
        for b in p.blocks:
            self.pool.retain(b)
        self.seqs[child] = _Seq(list(p.blocks), list(p.tokens), list(p.keys), p.salt)

    def free(self, seq) -> None:
        """Give back ``seq``'s blocks (finished or cancelled); unknown ids are ignored."""
        s = self.seqs.pop(seq, None)
        for b in [] if s is None else s.blocks:
            self.pool.release(b)

    def append(self, seq, token_ids: list[int]) -> Tensor:
        """Reserve slots for ``token_ids`` after ``seq``'s cached tokens; returns their slot indices ``(n,)``.

        All-or-nothing: when the pool runs out, :class:`CacheFull` is raised and ``seq`` is unchanged.
        """
        s, bs = self.seqs[seq], self.block_size
        if self.blocks_needed(seq, len(token_ids)) > self.pool.num_free:
            raise CacheFull(f"sequence {seq!r} needs {self.blocks_needed(seq, len(token_ids))} more cache blocks "
                            f"and {self.pool.num_free} are free")
        start = len(s.tokens)
        if start % bs and self.pool.refs[s.blocks[-1]] > 1:
            self._copy_last_block(s)
        while len(s.blocks) * bs < start + len(token_ids):
            s.blocks.append(self.pool.take())
        s.tokens.extend(token_ids)
        return self.slots(seq, start, len(token_ids))

    def publish(self, seq) -> None:
        """Make ``seq``'s full blocks findable by later prompts. Call it once their keys/values are written: a
        block reserved but not yet computed must not be shared."""
        s, bs = self.seqs[seq], self.block_size
        for i in range(len(s.keys), len(s.tokens) // bs):
            s.keys.append(hash((s.keys[-1] if s.keys else s.salt, tuple(s.tokens[i * bs:(i + 1) * bs]))))
            self.pool.publish(s.blocks[i], s.keys[-1])

    def truncate(self, seq, length: int) -> None:
        """Forget ``seq``'s tokens from ``length`` on (a preempted or rolled-back sequence), freeing blocks."""
        s, bs = self.seqs[seq], self.block_size
        keep = -(-length // bs)
        for b in s.blocks[keep:]:
            self.pool.release(b)
        if length % bs and self.pool.refs[s.blocks[keep - 1]] == 1:
            self.pool.unpublish(s.blocks[keep - 1])  # it will be written again: no longer the prefix it was
        del s.blocks[keep:], s.tokens[length:], s.keys[length // bs:]

    def _copy_last_block(self, s: _Seq) -> None:
        old, bs = s.blocks[-1], self.block_size
        new = self.pool.take()
        src, dst = slice(old * bs, (old + 1) * bs), slice(new * bs, (new + 1) * bs)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.pool.release(old)
        s.blocks[-1] = new

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

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store keys/values ``(n, heads, head_dim)`` of ``n`` tokens at ``slots`` ``(n,)``."""
        slots = slots.to(self.k.device)
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at ``slots`` ``(B, S)``, as ``(B, heads, S, head_dim)`` each."""
        return self.k[layer][slots].transpose(1, 2), self.v[layer][slots].transpose(1, 2)

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


class PagedFrame(Frame):
    """A batch of sequences at different lengths running different numbers of new tokens over one paged cache.

    The keys/values :meth:`update` returns live in the cache's scratch buffers: valid until the next call
    (attention consumes them at once; gradients do not flow through a paged cache).

    Row ``b`` has ``past_b`` cached tokens and ``n_b`` new ones at positions ``past_b … past_b + n_b - 1``;
    new token ``t`` attends to the row's keys ``0 … past_b + t``. Padding queries (``t >= n_b``) get position
    -1 and attend to the row's real keys; their outputs are ignored and their keys/values are never stored.
    """

    def __init__(self, cache: PagedKVCache, rows: list[tuple[object, int]]):
        self.cache = cache
        dev = cache.k.device
        seqs = [seq for seq, _ in rows]
        n = torch.tensor([count for _, count in rows])  # (B,)
        lengths = torch.tensor([cache.length(seq) for seq in seqs])  # (B,) after this pass
        past = lengths - n
        T = int(n.max())
        S = int(lengths.max())
        self.slots, key_valid = cache.slot_table(seqs, S)  # (B, S) each
        t = torch.arange(T)
        self.new = (t[None, :] < n[:, None]).to(dev)  # (B, T) real new tokens
        self.padded = bool((n < T).any())  # False: every (row, column) is a real new token
        q_pos = past[:, None] + t[None, :]  # (B, T)
        self.write_slots = self.slots.gather(1, q_pos.clamp(max=S - 1).to(dev))[self.new]  # (N,)
        positions = q_pos.masked_fill(~self.new.cpu(), -1).to(dev)
        # Only the new tokens themselves, from an empty past: their own keys, causally (no gather needed).
        self.own = bool((past == 0).all()) and T == S
        # One new token per row on a float32 CPU cache: optlm's kernel reads each row's slots in place.
        self.lengths = lengths
        self.kernel = (T == 1 and dev.type == "cpu" and cache.k.dtype == torch.float32 and not self.own
                       and kernels.enabled())
        self.positions, self.valid = positions, None
        self._mask_inputs = (n, lengths, q_pos, key_valid)
        self._allowed: Tensor | None | bool = False  # built on first use: the kernel path never needs it
        self._local: dict[int, Tensor] = {}

    @property
    def allowed(self) -> Tensor | None:
        if self._allowed is False:
            n, lengths, q_pos, key_valid = self._mask_inputs
            T, S = q_pos.shape[1], self.slots.shape[1]
            if T == 1 and bool((lengths == S).all()):
                self._allowed = None  # one query per row and every row's keys all real: attend to everything
            elif self.own and bool((n == T).all()):
                self._allowed = None  # plain causal attention over equal-length prompts
            else:
                self._allowed = self._mask(None)
        return self._allowed

    def local(self, window: int) -> Tensor | None:
        if int(self.lengths.max()) <= window:
            return self.allowed  # no row has a key far enough back to leave the window
        if window not in self._local:
            self._local[window] = self._mask(window)
        return self._local[window]

    def _mask(self, window: int | None) -> Tensor:
        n, lengths, q_pos, key_valid = self._mask_inputs
        S = self.slots.shape[1]
        s = torch.arange(S)
        q = q_pos.clamp(max=S - 1)[:, :, None]  # (B, T, 1)
        allowed = s[None, None, :] <= q  # (B, T, S)
        if window is not None:
            allowed = allowed & (q - s[None, None, :] < window)
        # Padding queries attend to the row's real keys (any non-empty set, so softmax stays finite).
        mask = (allowed | ~self.new.cpu()[:, :, None]) & key_valid.cpu()[:, None, :]
        return mask[:, None].to(self.cache.k.device)  # (B, 1, T, S)

    def _store(self, layer: int, k: Tensor, v: Tensor) -> None:
        c = self.cache
        if self.padded:
            new_k = k.transpose(1, 2)[self.new]  # (N, nh, hs): the real new tokens, in row order
            new_v = v.transpose(1, 2)[self.new]
        else:  # no padding (decoding rows): a reshape, not a boolean gather
            new_k = k.transpose(1, 2).reshape(-1, *k.shape[1:2], k.shape[3])
            new_v = v.transpose(1, 2).reshape(-1, *v.shape[1:2], v.shape[3])
        c.k[layer].index_copy_(0, self.write_slots, new_k.to(c.k.dtype))
        c.v[layer].index_copy_(0, self.write_slots, new_v.to(c.v.dtype))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor | None:
        if not self.kernel:
            return None
        self._store(layer, k, v)
        c = self.cache
        slots, lengths = self.slots, self.lengths
        if window is not None and int(lengths.max()) > window:
            # A local layer reads each row's last `window` keys: shift every row's slot table to start there.
            start = (lengths - window).clamp(min=0)  # (B,)
            cols = (start[:, None] + torch.arange(window)).clamp(max=slots.shape[1] - 1)  # (B, window)
            slots, lengths = slots.gather(1, cols.to(slots.device)), lengths - start
        # check=False: the slots and lengths come from the cache's own tables
        out = kernels.paged_decode_attention(q[:, :, 0].float().contiguous(), c.k[layer], c.v[layer], slots,
                                             lengths, check=False)
        return out[:, :, None]  # (B, nh, 1, hs)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cache
        self._store(layer, k, v)
        if self.own:
            return k.to(c.k.dtype), v.to(c.v.dtype)
        B, S = self.slots.shape
        flat = self.slots.reshape(-1)
        k_all, v_all = c.scratch(2, (B * S, *c.k.shape[2:]))
        torch.index_select(c.k[layer], 0, flat, out=k_all)
        torch.index_select(c.v[layer], 0, flat, out=v_all)
        return k_all.view(B, S, *c.k.shape[2:]).transpose(1, 2), v_all.view(B, S, *c.v.shape[2:]).transpose(1, 2)
