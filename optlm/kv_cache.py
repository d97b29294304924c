"""Key/value cache: preallocated per-layer buffers indexed by slot.

Every row of the batch shares the slot index (slot ``s`` holds the ``s``-th token fed to the model); rows of
different lengths are expressed by the attention mask over slots (left padding), not by ragged buffers.
Attention reads only the filled prefix ``[:length]``, so a decode step costs O(length), never O(capacity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import huge_pages
from .models.core import Frame, KVLayout


class KVCache:
    """Static cache of keys and values for all layers.

    ``k`` and ``v`` are ``(layers, batch, heads, capacity, head_dim)`` for the layers that attend to everything
    before them. ``length`` is the number of filled slots. ``mask`` (``(batch, length)``, bool) remembers which
    filled slots are real tokens, so a caller that feeds only new tokens does not have to repeat the mask.

    Layers with a local-attention window ``W`` (``windows``, per layer; GPT-Neo's local layers) never look
    further back than ``W - 1`` slots, so their keys/values live in a ring of ``W`` slots instead (``ring_k``,
    ``ring_v``: ``(local layers, batch, heads, W, head_dim)``; slot ``s`` sits at ``s % W``): their memory
    stays the same however long the generation runs.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 windows: list[int | None] | None = None):
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} windows given for {num_layers} layers")
        self.windows = windows
        full = [i for i, w in enumerate(windows) if w is None]
        local = [i for i, w in enumerate(windows) if w is not None]
        # layer -> (True, index into k/v) for full layers, (False, index into ring_k/ring_v) for local ones
        self._where = {**{layer: (True, i) for i, layer in enumerate(full)},
                       **{layer: (False, i) for i, layer in enumerate(local)}}
        self.ring_size = max(w for w in windows if w is not None) if local else 0
        shape = (len(full), batch_size, num_heads, capacity, head_dim)
        self.k = huge_pages.zeros(shape, dtype, device)  # read whole every decoding step: 2 MiB pages
        self.v = huge_pages.zeros(shape, dtype, device)
        ring = (len(local), batch_size, num_heads, self.ring_size, head_dim)
        self.ring_k = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_v = torch.zeros(ring, dtype=dtype, device=device)
        self.length = 0
        self.mask: Tensor | None = None  # None: every filled slot is a real token (no padding seen)
        self._views = None

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype: torch.dtype,
                  device: torch.device | str | None = None, heads: int | None = None) -> KVCache:
        """A cache for a model with ``config``; ``heads``: the heads this process caches, when not all of them
        (a tensor-parallel rank's share; ``optlm.models.core.kv_heads``)."""
        heads = config.num_attention_heads if heads is None else heads
        return cls(config.num_hidden_layers, batch_size, heads, config.head_dim, capacity, dtype, device,
                   config.layer_windows)

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
        full, i = self._where[layer]
        if not full:
            return self._ring_update(i, k, v)
        start, T = self.length, k.shape[2]
        kl, vl = self._layer_views()[i]
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

    def _ring_update(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """A local layer: keep the newest ``ring_size`` keys/values in the ring and return what the pass reads,
        in the order :meth:`local_mask` describes. One new token (decoding) overwrites the slot that just left
        its window and reads the ring in place; several read the ring's old entries then their own."""
        L, T, R = self.length, k.shape[2], self.ring_size
        rk, rv = self.ring_k[i], self.ring_v[i]  # (B, nh, R, hs)
        if self._decoding(T):
            rk[:, :, L % R] = k[:, :, 0]
            rv[:, :, L % R] = v[:, :, 0]
            n = min(L + 1, R)
            return rk[:, :, :n], rv[:, :, :n]  # (B, nh, n, hs)
        # cat copies, so the ring can be overwritten below while this pass still reads the old entries
        keys, values = (k, v) if L == 0 else (torch.cat([rk, k], 2), torch.cat([rv, v], 2))  # (B, nh, R+T, hs)
        n = min(T, R)
        at = torch.arange(L + T - n, L + T, device=rk.device) % R
        with torch.no_grad():
            rk.index_copy_(2, at, k[:, :, T - n:].to(rk.dtype))
            rv.index_copy_(2, at, v[:, :, T - n:].to(rv.dtype))
        return keys, values

    @staticmethod
    def _decoding(T: int) -> bool:
        # In-place ring writes would cut the graph from this token's own key, so gradients take the copy path.
        return T == 1 and not torch.is_grad_enabled()

    def local_mask(self, frame: Frame, window: int) -> Tensor | None:
        """What each new token of ``frame`` may attend to in a local layer of this cache, over the keys
        :meth:`_ring_update` returns: ring entries (filled, real, less than ``window`` slots back) and then, for
        several new tokens, the new tokens themselves (causally, within the window). None: everything."""
        L, T, R = self.length, frame.positions.shape[1], self.ring_size
        dev = frame.positions.device
        valid = frame.valid  # (B, L + T) or None
        if self._decoding(T) and valid is None and window >= R:
            return None  # every entry of a ring no longer than the window is inside it, and real
        if self._decoding(T):
            r = torch.arange(min(L + 1, R), device=dev)
            slot = r + R * torch.div(L - r, R, rounding_mode="floor")  # (n,) the slot each entry now holds
            allowed = (L - slot < window)[None, None]  # (1, 1, n)
            key_valid = None if valid is None else valid[:, slot]  # (B, n)
        else:
            t = torch.arange(T, device=dev)
            allowed = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)  # (T, T) new keys
            key_valid = None if valid is None else valid[:, L:]
            if L > 0:
                r = torch.arange(R, device=dev)
                slot = r + R * torch.div(L - 1 - r, R, rounding_mode="floor")  # the newest slot at each entry
                ring = (r <= L - 1)[None, :] & ((L + t)[:, None] - slot[None, :] < window)  # (T, R)
                allowed = torch.cat([ring, allowed], 1)  # (T, R + T)
                if valid is not None:
                    key_valid = torch.cat([valid[:, slot.clamp(min=0)], key_valid], 1)
            allowed = allowed[None]  # (1, T, keys)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]  # (B, T, keys)
        elif bool(allowed.all()):
            return None
        return allowed[:, None]  # (B|1, 1, T, keys)

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
        self.ring_k = self.ring_k.index_select(1, index)
        self.ring_v = self.ring_v.index_select(1, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        """Repeat each row ``n`` times (expand a prompt's cache to beams or return sequences)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.ring_k = self.ring_k.repeat_interleave(n, dim=1)
        self.ring_v = self.ring_v.repeat_interleave(n, dim=1)
        if self.mask is not None:
            self.mask = self.mask.repeat_interleave(n, dim=0)

    def crop(self, length: int) -> None:
        """Forget slots past ``length`` (assisted decoding rolls back rejected candidates)."""
        if self.ring_size and length < self.length:
            raise ValueError("this cache keeps only the last window of its local-attention layers, so it cannot be "
                             "cropped back; start again from a cache of the shorter prefix")
        self.length = min(self.length, length)
        if self.mask is not None:
            self.mask = self.mask[:, : self.length]

    def copy_newest(self, rows: Tensor) -> None:
        """Overwrite every row's newest slot with that of ``rows[row]`` (contrastive search: each candidate copy
        of a sequence takes the chosen candidate's keys/values)."""
        newest = [(self.k, self.v, 3, self.length - 1)]
        if self.ring_size:
            newest.append((self.ring_k, self.ring_v, 3, (self.length - 1) % self.ring_size))
        for k, v, dim, index in newest:
            for buf in (k, v):
                slot = buf.select(dim, index)  # (layers, B, heads, hs)
                slot.copy_(slot.index_select(1, rows))

    def copy(self) -> KVCache:
        new = object.__new__(KVCache)
        new.k, new.v, new.length = self.k.clone(), self.v.clone(), self.length
        new.ring_k, new.ring_v, new.ring_size = self.ring_k.clone(), self.ring_v.clone(), self.ring_size
        new.windows, new._where = self.windows, self._where
        new._views = None
        new.mask = None if self.mask is None else self.mask.clone()
        return new


class _CacheFrame(Frame):
    """A frame whose keys/values go into a :class:`KVCache` after its filled slots."""

    def __init__(self, cache: KVCache, base: Frame):
        super().__init__(base.positions, base.allowed, base.valid, base.past)
        self.cache = cache
        self._local: dict[int, Tensor | None] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(layer, k, v)

    def kv_layout(self) -> KVLayout | None:
        # Decoding (one token per row) into float32 CPU buffers with no local-attention ring.
        k, v, T = self.cache.k, self.cache.v, self.positions.shape[1]
        if (T != 1 or k.dtype != torch.float32 or k.device.type != "cpu" or self.cache.ring_k.shape[0]
                or not (k.is_contiguous() and v.is_contiguous())):
            return None
        _, B, H, cap, D = k.shape  # (layers, B, nh, capacity, hs): row b's slot s is its s-th token
        lengths = torch.full((B,), self.past + 1, dtype=torch.long)
        return KVLayout(k, v, (B * H * cap * D, H * cap * D, cap * D, D), None, lengths, self.valid)

    def local(self, window: int) -> Tensor | None:
        if all(w is None for w in self.cache.windows):
            return super().local(window)  # a cache built without windows keeps every slot
        if window not in self._local:
            self._local[window] = self.cache.local_mask(self, window)
        return self._local[window]
