"""Preallocated key/value cache with a separate length per batch row.

Rows of a batch hold sequences of different lengths without padding (EMS-SD's "unpad KV cache"):
row ``b`` owns slots ``[0, lengths[b])`` of every layer; new keys are written at the slots the
caller names, and rolling back a row is just lowering its length (stale slots are overwritten
later). After a tree step the accepted path's keys/values are moved to contiguous slots
(``move``). Lengths are kept on the host as a list, so bookkeeping never forces a device sync.

All layers live in one tensor per keys and values, so a compaction moves every layer in one op;
``k[i]`` / ``v[i]`` are views of layer i.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for ``num_layers`` layers, ``batch`` rows and up to ``max_len`` slots each."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self._set(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self.max_len = max_len
        self.lengths: list[int] = [0] * batch

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # [layers, B, kv_heads, max_len, head_dim]
        # plain indexing (not unbind) so training, with autograd on, may write into the views
        self.k = [keys[i] for i in range(keys.shape[0])]
        self.v = [values[i] for i in range(values.shape[0])]

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def advance(self, counts: list[int]) -> None:
        """Commit ``counts[b]`` more slots of row b (after a forward that wrote them)."""
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]

    def truncate(self, lengths: list[int]) -> None:
        """Roll rows back to the given lengths; keys past them become free slots."""
        if any(new > old for new, old in zip(lengths, self.lengths)):
            raise ValueError("truncate() can only shorten rows")
        self.lengths = list(lengths)

    def move(self, rows: list[int], src: list[int], dst: list[int]) -> None:
        """Copy every layer's K/V of (rows[i], src[i]) to (rows[i], dst[i]) — the compaction of an
        accepted tree path. All sources are read before any destination is written."""
        if not rows:
            return
        dev = self.keys.device
        r, s, d = (torch.tensor(x, device=dev) for x in (rows, src, dst))
        self.keys[:, r, :, d] = self.keys[:, r, :, s]
        self.values[:, r, :, d] = self.values[:, r, :, s]

    def row(self, b: int) -> KVCache:
        """Row b as a batch-1 cache sharing this one's storage (writes land here): for work done
        row by row, such as attention over rows of very different lengths."""
        view = KVCache.__new__(KVCache)
        view._set(self.keys[:, b : b + 1], self.values[:, b : b + 1])
        view.max_len = self.max_len
        view.lengths = [self.lengths[b]]
        return view

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` slots per row, keeping what is stored (a padded batch's holes use
        slots, so its cache cannot be sized from the token budget alone)."""
        extra = max_len - self.max_len
        if extra <= 0:
            return
        pad = (0, 0, 0, extra)  # the slot axis, second to last
        self._set(torch.nn.functional.pad(self.keys, pad), torch.nn.functional.pad(self.values, pad))
        self.max_len = max_len

    def extend(self, other: KVCache) -> None:
        """Append ``other``'s rows after this cache's (requests that join a running batch are
        prefilled in a cache of their own); both are widened to the larger ``max_len``."""
        self.grow(other.max_len)
        other.grow(self.max_len)
        self._set(torch.cat([self.keys, other.keys], 1), torch.cat([self.values, other.values], 1))
        self.lengths = self.lengths + other.lengths

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), so they stop costing compute."""
        if rows == list(range(self.batch)):
            return
        index = torch.tensor(rows, device=self.keys.device, dtype=torch.long)
        self._set(self.keys.index_select(1, index), self.values.index_select(1, index))
        self.lengths = [self.lengths[r] for r in rows]
