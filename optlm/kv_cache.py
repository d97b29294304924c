"""Key/value cache: preallocated per-layer buffers indexed by slot.

Every row of the batch shares the slot index (slot ``s`` holds the ``s``-th token fed to the model); rows of
different lengths are expressed by the attention mask over slots (left padding), not by ragged buffers.
Attention reads only the filled prefix ``[:length]``, so a decode step costs O(length), never O(capacity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import Frame


class KVCache:
    """Static cache of keys and values for all layers.

    ``k`` and ``v`` are ``(layers, batch, heads, capacity, head_dim)``. ``length`` is the number of filled
    slots. ``mask`` (``(batch, length)``, bool) remembers which filled slots are real tokens, so a caller that
    feeds only new tokens does not have to repeat the attention mask.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.mask: Tensor | None = None  # None: every filled slot is a real token (no padding seen)
        self._views = None

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        return cls(config.num_hidden_layers, batch_size, config.num_attention_heads, config.head_dim,
                   capacity, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def get_seq_length(self) -> int:
        """Filled slots (transformers' name, so façade users can call it)."""
        return self.length

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more slots, doubling the buffers when full (amortised O(1))."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], cap, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def frame(self, T: int, mask: Tensor | None = None) -> _CacheFrame:
        """The frame of a forward pass over ``T`` new tokens after the filled slots.

        ``mask`` ``(B, length + T)`` marks real tokens; None means the padding seen so far and ``T`` real new
        tokens. The caller runs the model with the frame and then calls :meth:`advance` with it.
        """
        B = self.batch_size
        if mask is None and self.mask is not None:
            mask = torch.cat([self.mask, self.mask.new_ones(B, T)], dim=1)  # earlier padding persists
        self.reserve(T)
        base = Frame.causal(B, T, self.k.device, mask, past=self.length)
        return _CacheFrame(self, base)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` (``(B, nh, T, hs)``) after the filled slots; return all keys/values so far.

        The caller advances :attr:`length` once per forward (``advance``), after every layer has written.
        """
        start, T = self.length, k.shape[2]
        kl, vl = self._layer_views()[layer]
        if not torch.is_grad_enabled():
            kl.narrow(2, start, T).copy_(k)
            vl.narrow(2, start, T).copy_(v)
            return kl.narrow(2, 0, start + T), vl.narrow(2, 0, start + T)
        # With gradients on (a training forward that left use_cache at its default) the buffers store
        # detached copies and this pass attends to its own k, v, so the loss differentiates through them;
        # keys cached by earlier passes are constants here.
        with torch.no_grad():
            kl.narrow(2, start, T).copy_(k)
            vl.narrow(2, start, T).copy_(v)
        if start == 0:
            return k, v
        return torch.cat([kl.narrow(2, 0, start), k], 2), torch.cat([vl.narrow(2, 0, start), v], 2)

    def _layer_views(self) -> list[tuple[Tensor, Tensor]]:
        # Per-layer (B, nh, capacity, hs) views, made once per buffer (a decode step indexes them per layer).
        views = self._views
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = self._views = (self.k, self.v, list(zip(self.k.unbind(0), self.v.unbind(0), strict=True)))
        return views[2]

    def advance(self, n: int, mask: Tensor | None = None) -> None:
        """Mark ``n`` new slots filled; ``mask`` is the (B, length + n) validity mask or None (no padding)."""
        self.length += n
        self.mask = None if mask is None else mask[:, : self.length].bool()

    def commit(self, frame: _CacheFrame) -> None:
        """Mark the tokens of ``frame`` (run through the model) as filled."""
        self.advance(frame.positions.shape[1], frame.valid)

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search: keep the surviving beams' histories)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        """Repeat each row ``n`` times (expand a prompt's cache to beams or return sequences)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        if self.mask is not None:
            self.mask = self.mask.repeat_interleave(n, dim=0)

    def crop(self, length: int) -> None:
        """Forget slots past ``length`` (contrastive search rolls back rejected candidates)."""
        self.length = min(self.length, length)
        if self.mask is not None:
            self.mask = self.mask[:, : self.length]

    def copy(self) -> KVCache:
        new = object.__new__(KVCache)
        new.k, new.v, new.length = self.k.clone(), self.v.clone(), self.length
        new._views = None
        new.mask = None if self.mask is None else self.mask.clone()
        return new


class _CacheFrame(Frame):
    """A frame whose keys/values go into a :class:`KVCache` after its filled slots."""

    def __init__(self, cache: KVCache, base: Frame):
        super().__init__(base.positions, base.allowed, base.valid)
        self.cache = cache

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(layer, k, v)
