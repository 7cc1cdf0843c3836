"""Preallocated key/value cache with a separate length per batch row.

Rows of a batch hold sequences of different lengths without padding (EMS-SD's "unpad KV cache"):
row ``b`` owns slots ``[0, lengths[b])`` of every layer; new keys are written at the slots the
caller names, and rolling back a row is just lowering its length (stale slots are overwritten
later). Lengths are kept on the host as a list, so bookkeeping never forces a device sync.
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
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.lengths: list[int] = [0] * batch

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

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), so they stop costing compute."""
        if rows == list(range(self.batch)):
            return
        index = torch.tensor(rows, device=self.k[0].device, dtype=torch.long)
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.lengths = [self.lengths[r] for r in rows]
