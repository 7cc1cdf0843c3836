"""Ragged batches (EMS-SD's "unpad input tokens"), built only here.

In a speculative step every row feeds a different number of tokens (its pending token plus its
own draft). The dense layers, which are most of the cost, run on exactly the rows' tokens packed
into one ``[num_tokens, hidden]`` matrix; only attention scatters the queries into a padded
``[rows, max_tokens]`` grid, where each row attends to its own cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where each packed token lives: its row, its cache slot, and its cell in the padded grid."""

    counts: tuple[int, ...]  # tokens per row
    rows: torch.Tensor  # [N] row of each packed token
    slots: torch.Tensor  # [N] cache slot (= position) of each packed token
    to_grid: torch.Tensor  # [B * T] packed index of each grid cell; N (a zero row) for empty cells
    from_grid: torch.Tensor  # [N] grid cell of each packed token

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.counts), max(self.counts)


def pack(lengths: list[int], counts: list[int], device: torch.device | str) -> Packing:
    """Row b holds ``lengths[b]`` cached tokens and feeds ``counts[b]`` new ones at the next slots."""
    b, t = len(counts), max(counts)
    rows = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)[:-1]])
    within = torch.arange(int(sum(counts))) - offsets[rows]  # index of each token inside its row
    slots = torch.tensor(lengths)[rows] + within
    from_grid = rows * t + within
    to_grid = torch.full((b * t,), int(sum(counts)), dtype=torch.long)
    to_grid[from_grid] = torch.arange(int(sum(counts)))
    return Packing(tuple(counts), rows.to(device), slots.to(device), to_grid.to(device), from_grid.to(device))
