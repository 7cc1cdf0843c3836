"""The drafting methods by name: how each drafts (chain or tree, its branching) and what makes a
row's drafter. ``Engine.tree_shape`` and ``Engine.drafter_factory`` read this table; a new method is
one entry here (and its name in ``joey.config.METHODS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from joey.config import METHODS, SamplingParams, SpecConfig, TreeShape
from joey.drafters import Drafter, DraftModelDrafter, JakiroDrafter, KangarooDrafter, PromptLookupDrafter
from joey.errors import InvalidArgumentError

KANGAROO_TOPK = 3  # children per expanded node of Kangaroo's tree (benchmarks/tree_sweep.py)
JAKIRO_TOPK = 2  # children per expanded node of Jakiro's tree (benchmarks/tree_sweep.py)
PLD_BRANCHES = 3  # distinct continuations prompt lookup may offer at once, when asked for a tree

# what makes a row's drafter: f(max_len, generator, params) -> Drafter
DrafterFactory = Callable[[int, "torch.Generator | None", SamplingParams], Drafter]
# (engine, spec, shape) → the factory; the engine is joey.engine.Engine (not imported: it imports this)
FactoryMaker = Callable[[Any, SpecConfig, TreeShape], DrafterFactory]


@dataclass(frozen=True)
class Method:
    """How a method drafts. ``trees``: "chain" (chains only), "asked" (a tree when ``tree_nodes``
    asks for one) or "measured" (a tree sized from the measured verification cost unless
    ``tree_nodes`` says otherwise); ``topk``: children per expanded node of its trees by default;
    ``make``: its drafter factory's maker (None: plain decoding)."""

    trees: str
    topk: int
    make: FactoryMaker | None


def _pld(engine: Any, spec: SpecConfig, shape: TreeShape) -> DrafterFactory:
    return lambda max_len, generator, params: PromptLookupDrafter(branches=shape.topk)


def _sps(engine: Any, spec: SpecConfig, shape: TreeShape) -> DrafterFactory:
    if engine.draft_model is None:
        raise InvalidArgumentError("method 'sps' needs a draft model: joey.load(..., draft_model=...)")
    draft = engine.draft_model
    return lambda max_len, generator, params: DraftModelDrafter(draft, params, generator, max_len)


def _trained(engine: Any, attr: str, method: str, how: str) -> Any:
    """The engine's trained draft network ``attr`` (its Jakiro head or Kangaroo adapter), or a
    one-line error saying how to get one."""
    net = getattr(engine, attr)
    if net is None:
        raise InvalidArgumentError(f"method '{method}' needs {how}")
    return net


def _jakiro(lookup: bool) -> FactoryMaker:
    name = "jakiro+pld" if lookup else "jakiro"

    def make(engine: Any, spec: SpecConfig, shape: TreeShape) -> DrafterFactory:
        jd = _trained(engine, "jakiro", name, "a Jakiro head for this model: joey.load(..., head=...); train one "
                      "with `joey train-drafter`")
        hybrid = engine.jakiro_hybrid
        return lambda max_len, generator, params: JakiroDrafter(
            jd, params, max_len, shape.topk, PromptLookupDrafter() if lookup else None, hybrid
        )

    return make


def _kangaroo(lookup: bool) -> FactoryMaker:
    name = "kangaroo+pld" if lookup else "kangaroo"

    def make(engine: Any, spec: SpecConfig, shape: TreeShape) -> DrafterFactory:
        kd = _trained(engine, "kangaroo", name, "an adapter for this model: joey.load(..., adapter=...)")
        return lambda max_len, generator, params: KangarooDrafter(
            kd, params, generator, max_len, spec.threshold, shape.topk, PromptLookupDrafter() if lookup else None
        )

    return make


TABLE: dict[str, Method] = {
    "ar": Method("chain", 1, None),
    "pld": Method("asked", PLD_BRANCHES, _pld),
    "sps": Method("chain", 1, _sps),
    "kangaroo": Method("measured", KANGAROO_TOPK, _kangaroo(False)),
    "kangaroo+pld": Method("measured", KANGAROO_TOPK, _kangaroo(True)),
    "jakiro": Method("measured", JAKIRO_TOPK, _jakiro(False)),
    "jakiro+pld": Method("measured", JAKIRO_TOPK, _jakiro(True)),
}


def method(name: str) -> Method:
    """The table's entry; a one-line error for an unknown name."""
    if name not in TABLE:
        raise InvalidArgumentError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return TABLE[name]
