"""Preallocated key/value cache with a separate length per batch row.

Rows of a batch hold sequences of different lengths without padding (EMS-SD's "unpad KV cache"):
row ``b`` owns slots ``[0, lengths[b])`` of every layer; new keys are written at the slots the
caller names, and rolling back a row is just lowering its length (stale slots are overwritten
later). After a tree step the accepted path's keys/values are moved to contiguous slots
(``move``). Lengths are kept on the host as a list, so bookkeeping never forces a device sync.

All layers live in one tensor per keys and values, so a compaction moves every layer in one op;
``k[i]`` / ``v[i]`` are views of layer i. The storage may hold more rows than the batch uses
(``capacity``): a continuous batch adds rows into spare ones (``add_rows``) and a row that leaves is
replaced by moving one other row into its place (``keep_rows``), so joining and leaving copy only
the rows involved, not the whole cache.
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
        self._use(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), batch)
        self.max_len = max_len
        self.lengths: list[int] = [0] * batch

    def _use(self, keys: torch.Tensor, values: torch.Tensor, rows: int) -> None:
        """Make ``keys``/``values`` [layers, capacity, ...] the storage, of which the first ``rows`` are the batch."""
        self._store = (keys, values)
        self._set(keys[:, :rows], values[:, :rows])

    @property
    def capacity(self) -> int:
        return self._store[0].shape[1]

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
        return self._rows_view(b, b + 1)

    def _rows_view(self, start: int, end: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view._use(self._store[0][:, start:end], self._store[1][:, start:end], end - start)
        view.max_len = self.max_len
        view.lengths = self.lengths[start:end]
        return view

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` slots per row, keeping what is stored (a padded batch's holes use
        slots, so its cache cannot be sized from the token budget alone)."""
        self.reserve(self.capacity, max_len)

    def reserve(self, rows: int, max_len: int) -> None:
        """Storage for at least ``rows`` rows of ``max_len`` slots; reallocates (one copy of the
        batch's rows) only when the current storage is too small."""
        if rows <= self.capacity and max_len <= self.max_len:
            return
        keys, values = self._store
        shape = (keys.shape[0], max(rows, self.capacity), keys.shape[2], max(max_len, self.max_len), keys.shape[4])
        new_k = keys.new_zeros(shape)
        new_v = values.new_zeros(shape)
        n = self.batch
        new_k[:, :n, :, : self.max_len] = self.keys
        new_v[:, :n, :, : self.max_len] = self.values
        self._use(new_k, new_v, n)
        self.max_len = shape[3]

    def add_rows(self, count: int, max_len: int) -> KVCache:
        """Append ``count`` empty rows of at least ``max_len`` slots to the batch, and return them as
        a cache of their own sharing this one's storage (a joining request is prefilled there; copy
        its lengths back with ``set_lengths``). Storage grows by doubling, so joins rarely copy."""
        n = self.batch
        rows = self.capacity if n + count <= self.capacity else max(n + count, 2 * self.capacity)
        slots = self.max_len if max_len <= self.max_len else max(max_len, self.max_len * 3 // 2)
        self.reserve(rows, slots)
        self._set(self._store[0][:, : n + count], self._store[1][:, : n + count])
        self.lengths = self.lengths + [0] * count
        return self._rows_view(n, n + count)

    def set_lengths(self, start: int, lengths: list[int]) -> None:
        """Rows ``start...`` now hold ``lengths`` tokens (written through a view from ``add_rows``)."""
        self.lengths[start : start + len(lengths)] = lengths

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the rows ``rows`` (old indices), in that order: finished sequences stop costing
        compute. Only rows whose index changes are copied (``rows`` may be any order: a caller that
        fills each gap with a row from the end moves as few rows as leave)."""
        if rows == list(range(self.batch)):
            return
        moves = [(i, r) for i, r in enumerate(rows) if r != i]
        if moves:
            dev = self.keys.device
            dst = torch.tensor([i for i, _ in moves], device=dev)
            src = torch.tensor([r for _, r in moves], device=dev)
            for store in self._store:  # the sources are gathered before any destination is written
                store[:, dst] = store[:, src]
        self._set(self._store[0][:, : len(rows)], self._store[1][:, : len(rows)])
        self.lengths = [self.lengths[r] for r in rows]
