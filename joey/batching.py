"""Ragged batches and token trees (EMS-SD's "unpad input tokens"): positions, cache slots and
attention masks of a step are built only here.

In a speculative step every row feeds a different number of tokens (its pending token plus its
own draft, a chain or a tree). The dense layers, which are most of the cost, run on exactly the
rows' tokens packed into one ``[num_tokens, hidden]`` matrix; only attention scatters the queries
into a padded ``[rows, max_tokens]`` grid, where each row attends to its own cache slots.

A row's step tokens are ``[pending, node 0, node 1, ...]``: token j is written to cache slot
``lengths[b] + j`` (contiguous, in proposal order) but sits at RoPE position ``lengths[b] + depth``
(the pending token has depth 0, a node one more than its parent), and attends to the row's cached
prefix plus its own ancestors and itself. For a chain, depth == j and the mask is causal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def depths_of(parents: Sequence[int]) -> list[int]:
    """Depth of every step token [pending, nodes...]: 0 for the pending token, parent's + 1 for a node."""
    depths = [0]
    for parent in parents:
        depths.append(depths[parent + 1] + 1)
    return depths


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


@dataclass(frozen=True)
class Packing:
    """Where each packed token lives: its row, its cache slot, its position and its cell in the padded grid."""

    counts: tuple[int, ...]  # tokens per row
    rows: torch.Tensor  # [N] row of each packed token
    slots: torch.Tensor  # [N] cache slot of each packed token
    positions: torch.Tensor  # [N] RoPE position (== slots for chains)
    to_grid: torch.Tensor  # [B * T] packed index of each grid cell; 0 for empty cells (their output is dropped)
    from_grid: torch.Tensor  # [N] grid cell of each packed token
    # per row, on the host: its real tokens and the end of its slots after the step (lengths +
    # counts); joey's C attention takes them to serve every row of a step in one call
    row_counts: torch.Tensor  # [B] int64
    row_ends: torch.Tensor  # [B] int64

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.counts), max(self.counts)


def pack(
    lengths: list[int],
    counts: list[int],
    device: torch.device | str,
    parents: Sequence[Sequence[int]] | None = None,
) -> Packing:
    """Row b holds ``lengths[b]`` cached tokens and feeds ``counts[b]`` new ones at the next slots.
    ``parents[b]`` (one entry per draft node, ``counts[b] - 1`` of them) makes row b's tokens a tree."""
    b, t = len(counts), max(counts)
    rows = torch.repeat_interleave(torch.arange(b), torch.tensor(counts))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)[:-1]])
    within = torch.arange(int(sum(counts))) - offsets[rows]  # index of each token inside its row
    slots = torch.tensor(lengths)[rows] + within
    positions = slots
    if parents is not None and not all(is_chain(p) for p in parents):
        depth = torch.tensor([d for p in parents for d in depths_of(p)])
        positions = torch.tensor(lengths)[rows] + depth
    from_grid = rows * t + within
    to_grid = torch.zeros(b * t, dtype=torch.long)
    to_grid[from_grid] = torch.arange(int(sum(counts)))
    per_row = torch.tensor(counts)
    return Packing(
        tuple(counts), rows.to(device), slots.to(device), positions.to(device), to_grid.to(device),
        from_grid.to(device), per_row, torch.tensor(lengths) + per_row,
    )


def grid_positions(lengths: list[int], t: int, parents: Sequence[Sequence[int]] | None, device) -> torch.Tensor:
    """RoPE positions [B, t] of rows that all feed ``t`` tokens (no packing needed)."""
    if parents is None or all(is_chain(p) for p in parents):
        return grid_slots(lengths, t, device)  # a chain's positions are its slots
    return torch.tensor(lengths, device=device)[:, None] + torch.tensor([depths_of(p) for p in parents], device=device)


def grid_slots(lengths: list[int], t: int, device: torch.device | str) -> torch.Tensor:
    """Cache slots [B, t] of rows that all feed ``t`` tokens: right after each row's cached prefix."""
    return torch.tensor(lengths, device=device)[:, None] + torch.arange(t, device=device)[None]


def causal_mask(lengths: list[int], t: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """Mask for rows whose ``t`` new tokens sit right after each row's cached prefix.

    Row b holds ``lengths[b]`` cached slots and writes its new tokens at the next slots; query j of
    row b may attend to slots ``< lengths[b] + j + 1``. Returns [B, 1, t, kv_len] bool.
    """
    start = torch.tensor(lengths, device=device)[:, None, None]  # [B, 1, 1]
    q = torch.arange(t, device=device)[None, :, None]  # [1, t, 1]
    k = torch.arange(kv_len, device=device)[None, None, :]  # [1, 1, kv_len]
    return (k < start + q + 1).unsqueeze(1)


def window_mask(
    mask: torch.Tensor | None, window: int, t: int, kv_len: int, device: torch.device | str
) -> torch.Tensor:
    """Restrict a mask [B, 1, t, kv_len] (None: causal with the queries on the last ``t`` slots) to
    a sliding window: a query at position p keeps only keys at positions > p - ``window``.

    Every query of a step sees exactly its own history, one key per position, in slot order (the
    cached prefix, whose slots are its positions, or Lockstep's holes skipped; then its ancestors in
    the tree, which sit before it). So a key's position is its rank among the slots the query sees,
    and the window keeps the query's last ``window`` visible keys, trees and padded batches included.
    """
    if mask is None:
        mask = causal_mask([kv_len - t], t, kv_len, device)
    later = mask.flip(-1).cumsum(-1).flip(-1)  # visible keys at or after each slot
    return mask & (later <= window)


def ancestors(parents: Sequence[int]) -> torch.Tensor:
    """[1 + k, 1 + k] bool over step tokens [pending, nodes...]: entry (i, j) says j is i or an ancestor of i."""
    n = len(parents) + 1
    seen = torch.eye(n, dtype=torch.bool)
    seen[:, 0] = True  # every node descends from the pending token
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i + 1] |= seen[parent + 1]
    return seen


def step_mask(
    lengths: list[int], t: int, kv_len: int, parents: Sequence[Sequence[int]] | None, device: torch.device | str
) -> torch.Tensor:
    """Mask [B, 1, t, kv_len] of a step: every token sees its row's cached prefix, its ancestors in
    the row's tree and itself. Chains (or ``parents`` None) give ``causal_mask``."""
    if parents is None or all(is_chain(p) for p in parents):
        return causal_mask(lengths, t, kv_len, device)
    mask = torch.zeros(len(lengths), 1, t, kv_len, dtype=torch.bool)
    for b, (start, row_parents) in enumerate(zip(lengths, parents)):
        n = len(row_parents) + 1
        mask[b, 0, :n, :start] = True
        mask[b, 0, :n, start : start + n] = ancestors(row_parents)
    return mask.to(device)


def row_mask(length: int, count: int, parents: Sequence[int] | None, device: torch.device | str) -> torch.Tensor | None:
    """Mask [1, 1, count, length + count] of one row's step (its cached prefix, then its own tokens
    as a chain or a tree), or None where attention needs none (a single new token sees everything)."""
    if count == 1:
        return None
    return step_mask([length], count, length + count, [parents] if parents is not None else None, device)


def rows_pay_off(lengths: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether attention row by row beats one padded grid: the grid computes every row's queries
    against the longest row's keys, so rows of very different lengths (a long prompt among short
    ones) waste most of it; a call per row costs a little overhead, so the grid must waste at least
    half its work."""
    grid = len(counts) * max(counts) * (max(lengths) + max(counts))
    real = sum(c * (n + c) for n, c in zip(lengths, counts))
    return grid > 2 * real


def visible_slots_mask(
    prefix: int, visible: Sequence[Sequence[int]], kv_len: int, device: torch.device | str
) -> torch.Tensor:
    """Mask [1, 1, len(visible), kv_len] for one row whose query i sees slots ``[0, prefix)`` and the
    slots ``visible[i]`` (a draft node's own and its ancestors', wherever a drafter put them)."""
    mask = torch.zeros(1, 1, len(visible), kv_len, dtype=torch.bool)
    mask[..., :prefix] = True
    for i, slots in enumerate(visible):
        mask[0, 0, i, list(slots)] = True
    return mask.to(device)


def prefix_causal_mask(start: int, n: int, device: torch.device | str) -> torch.Tensor | None:
    """Mask for one row's ``n`` new tokens written right after ``start`` cached ones; None where
    attention's own causal handling is already right (no cached prefix, or a single new token)."""
    return causal_mask([start], n, start + n, device) if start and n > 1 else None


def path_moves(lengths: list[int], paths: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Cache moves that make each row's accepted tree path contiguous after a step.

    Row b's step wrote node i at slot ``lengths[b] + 1 + i``; its accepted nodes ``paths[b]`` must
    end up at ``lengths[b] + 1, + 2, ...``. Returns (rows, from_slots, to_slots), only for the nodes
    that actually move (a chain's accepted prefix is already in place).
    """
    rows, src, dst = [], [], []
    for b, (start, path) in enumerate(zip(lengths, paths)):
        for m, node in enumerate(path):
            if node != m:
                rows.append(b)
                src.append(start + 1 + node)
                dst.append(start + 1 + m)
    return rows, src, dst


class Lockstep:
    """The vanilla padded batch that EMS-SD measures itself against (arXiv 2405.07542, §3.2): every
    row feeds the same number of tokens per step (shorter drafts padded), and all rows share one
    cache length that advances by the step's largest commit, so the slots a row did not fill (the
    padding of a shorter prompt, of a shorter draft, or tokens it rejected) stay in its cache as
    holes that every later query must mask out. joey's default (packed) batches have neither cost;
    this exists to be measured against (``batch_mode="padded"``).

    ``width`` is the shared cache length; ``real[b]`` the number of real tokens of row b (its next
    RoPE position); ``valid`` [B, capacity] marks the slots that hold real tokens.
    """

    def __init__(self, lengths: list[int], capacity: int, device: torch.device | str) -> None:
        self.width = max(lengths)
        self.real = list(lengths)
        self.valid = (torch.arange(capacity)[None] < torch.tensor(lengths)[:, None]).to(device)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots per row (the cache grows with it: holes take slots too)."""
        extra = capacity - self.valid.shape[1]
        if extra > 0:
            self.valid = torch.cat([self.valid, self.valid.new_zeros(len(self.real), extra)], 1)

    def step(
        self, counts: list[int], parents: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions [B, t] and mask [B, 1, t, width + t] of a step where row b feeds
        ``counts[b]`` real tokens (``parents[b]``: its draft tree) padded to ``t = max(counts)``.
        A padding cell's output is never read; it sees at least itself, since no query may see nothing."""
        b, t = len(counts), max(counts)
        device = self.valid.device
        depth = torch.tensor([depths_of(p) + list(range(len(p) + 1, t)) for p in parents])
        positions = (torch.tensor(self.real)[:, None] + depth).to(device)
        new = step_mask([0] * b, t, t, parents, device) | torch.eye(t, dtype=torch.bool, device=device)
        cached = self.valid[:, None, None, : self.width].expand(b, 1, t, self.width)
        return positions, torch.cat([cached, new], -1)

    def commit(self, counts: list[int]) -> int:
        """Rows keep their first ``counts[b]`` step tokens; all advance by the largest count, which
        is returned (what the cache's shared length grows by)."""
        advance = max(counts)
        for b, n in enumerate(counts):
            self.valid[b, self.width : self.width + n] = True
            self.real[b] += n
        self.width += advance
        return advance

    def keep_rows(self, rows: list[int]) -> None:
        self.valid = self.valid[rows]
        self.real = [self.real[r] for r in rows]
