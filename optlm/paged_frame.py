"""The frame a batch of sequences runs in over a paged cache (:class:`optlm.cache.PagedKVCache`): which slots
each row's new keys/values go to, which keys each new token reads (in the main pool, and in the local pool for
local-attention layers), the masks, and optlm's decode-attention kernel reading a row's slots in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import kernels
from .models.core import Frame, KVLayout

if TYPE_CHECKING:
    from .cache import PagedKVCache


@dataclass
class _Keys:
    """The keys one pool gives a pass: row ``b``'s keys are its tokens ``start[b] … start[b] + S - 1``."""

    slots: Tensor  # (B, S) slot of each key in the pool (padding points at slot 0)
    valid: Tensor  # (B, S) real keys
    start: Tensor  # (B,) position of each row's first key
    write: Tensor  # (N,) slots of the new tokens, in row order


class PagedFrame(Frame):
    """A batch of sequences at different lengths running different numbers of new tokens over one paged cache.

    The keys/values :meth:`update` returns live in the cache's scratch buffers: valid until the next call
    (attention consumes them at once; gradients do not flow through a paged cache).

    Row ``b`` has ``past_b`` cached tokens and ``n_b`` new ones at positions ``past_b … past_b + n_b - 1``;
    new token ``t`` attends to the row's keys ``0 … past_b + t`` (a local layer: the last ``window`` of those,
    read from the local pool from ``past_b - (window - 1)`` on). Padding queries (``t >= n_b``) get position
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
        t = torch.arange(T)
        self.new = (t[None, :] < n[:, None]).to(dev)  # (B, T) real new tokens
        self.padded = bool((n < T).any())  # False: every (row, column) is a real new token
        self.q_pos = past[:, None] + t[None, :]  # (B, T)
        slots, valid = cache.slot_table(seqs, S)  # (B, S) each
        self.keys = self._keys(slots, valid, torch.zeros_like(past))
        self.local_keys = None
        if cache.local_pool is not None:
            start = (past - (cache.window - 1)).clamp(min=0)  # the oldest token a new one can still see
            self.local_keys = self._keys(*cache.local_slot_table(seqs, start, int((lengths - start).max())), start)
        positions = self.q_pos.masked_fill(~self.new.cpu(), -1).to(dev)
        # Only the new tokens themselves, from an empty past: their own keys, causally (no gather needed).
        self.own = bool((past == 0).all()) and T == S
        # One new token per row on a float32 CPU cache: optlm's kernel reads each row's slots in place.
        self.lengths = lengths
        self.kernel = (T == 1 and dev.type == "cpu" and cache.k.dtype == torch.float32 and not self.own
                       and kernels.enabled())
        self.positions, self.valid = positions, None
        self._n = n
        self._allowed: Tensor | None | bool = False  # built on first use: the kernel path never needs it
        self._local: dict[int, Tensor | None] = {}

    def _keys(self, slots: Tensor, valid: Tensor, start: Tensor) -> _Keys:
        cols = (self.q_pos - start[:, None]).clamp(max=slots.shape[1] - 1).to(slots.device)  # (B, T)
        return _Keys(slots, valid, start, slots.gather(1, cols)[self.new])

    @property
    def slots(self) -> Tensor:
        """The main pool's slots of every row's tokens ``(B, S)``."""
        return self.keys.slots

    @property
    def allowed(self) -> Tensor | None:
        if self._allowed is False:
            T, S = self.q_pos.shape[1], self.keys.slots.shape[1]
            if T == 1 and bool((self.lengths == S).all()):
                self._allowed = None  # one query per row and every row's keys all real: attend to everything
            elif self.own and bool((self._n == T).all()):
                self._allowed = None  # plain causal attention over equal-length prompts
            else:
                self._allowed = self._mask(self.keys, None)
        return self._allowed

    def local(self, window: int) -> Tensor | None:
        # a cache without a local pool keeps every key of local layers with the others
        keys = self.keys if self.local_keys is None else self.local_keys
        if window not in self._local:
            span = self.lengths - keys.start  # (B,) keys each row reads
            if self.q_pos.shape[1] == 1 and bool((span == keys.slots.shape[1]).all()) and int(span.max()) <= window:
                self._local[window] = None  # one query per row, every key real and inside the window
            else:
                self._local[window] = self._mask(keys, window)
        return self._local[window]

    def _mask(self, keys: _Keys, window: int | None) -> Tensor:
        S = keys.slots.shape[1]
        k_pos = keys.start[:, None] + torch.arange(S)[None, :]  # (B, S) position of each key
        q = self.q_pos[:, :, None]  # (B, T, 1)
        allowed = k_pos[:, None, :] <= q  # (B, T, S)
        if window is not None:
            allowed = allowed & (q - k_pos[:, None, :] < window)
        # Padding queries attend to the row's real keys (any non-empty set, so softmax stays finite).
        mask = (allowed | ~self.new.cpu()[:, :, None]) & keys.valid.cpu()[:, None, :]
        return mask[:, None].to(self.cache.k.device)  # (B, 1, T, S)

    def _pool(self, layer: int) -> tuple[Tensor, Tensor, _Keys]:
        local = self.local_keys is not None and self.cache.is_local(layer)
        return (*self.cache.buffers(layer), self.local_keys if local else self.keys)

    def _store(self, layer: int, k: Tensor, v: Tensor) -> None:
        kb, vb, keys = self._pool(layer)
        if self.padded:
            new_k = k.transpose(1, 2)[self.new]  # (N, nh, hs): the real new tokens, in row order
            new_v = v.transpose(1, 2)[self.new]
        else:  # no padding (decoding rows): a reshape, not a boolean gather
            new_k = k.transpose(1, 2).reshape(-1, *k.shape[1:2], k.shape[3])
            new_v = v.transpose(1, 2).reshape(-1, *v.shape[1:2], v.shape[3])
        kb.index_copy_(0, keys.write, new_k.to(kb.dtype))
        vb.index_copy_(0, keys.write, new_v.to(vb.dtype))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, window: int | None = None) -> Tensor | None:
        if not self.kernel:
            return None
        self._store(layer, k, v)
        kb, vb, keys = self._pool(layer)
        slots, lengths = keys.slots, self.lengths - keys.start
        if window is not None and int(lengths.max()) > window:
            # A local layer reads each row's last `window` keys: shift every row's slot table to start there.
            start = (lengths - window).clamp(min=0)  # (B,)
            cols = (start[:, None] + torch.arange(window)).clamp(max=slots.shape[1] - 1)  # (B, window)
            slots, lengths = slots.gather(1, cols.to(slots.device)), lengths - start
        # check=False: the slots and lengths come from the cache's own tables
        out = kernels.paged_decode_attention(q[:, :, 0].float().contiguous(), kb, vb, slots, lengths, check=False)
        return out[:, :, None]  # (B, nh, 1, hs)

    def kv_layout(self) -> KVLayout | None:
        k = self.cache.k
        if not self.kernel or self.local_keys is not None or not k.is_contiguous():
            return None
        _, N, H, D = k.shape  # (layers, slots, nh, hs): one pool shared by every row
        return KVLayout(k, self.cache.v, (N * H * D, 0, D, H * D), self.keys.slots, self.lengths, None)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._store(layer, k, v)
        kb, vb, keys = self._pool(layer)
        if self.own:
            return k.to(kb.dtype), v.to(vb.dtype)
        B, S = keys.slots.shape
        flat = keys.slots.reshape(-1)
        k_all, v_all = self.cache.scratch(2, (B * S, *kb.shape[1:]))
        torch.index_select(kb, 0, flat, out=k_all)
        torch.index_select(vb, 0, flat, out=v_all)
        return k_all.view(B, S, *kb.shape[1:]).transpose(1, 2), v_all.view(B, S, *vb.shape[1:]).transpose(1, 2)
