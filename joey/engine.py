"""A loaded model and its tokenizer: prompts in, streamed text out, for one or many sequences at once.

``Engine.stream()`` encodes prompts and runs them through the decoding step machine
(``joey.continuous.ContinuousBatch``), which the server drives directly; ``generate()``, the CLI and
the benchmark are built on ``stream()``. The engine also says how each method drafts on this model
(``tree_shape``, ``drafter_factory``) and what verification costs on this machine (``cost_curve``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Union

import torch

from joey import methods
from joey.budget import CostCurve, cached_curve
from joey.config import (
    DEFAULT_MAX_DRAFT,
    DEFAULT_THRESHOLD,
    METHODS,
    Generation,
    SamplingParams,
    SpecConfig,
    TreeShape,
)
from joey.continuous import BATCH_MODES, ContinuousBatch
from joey.drafters import JakiroDraft, KangarooDraft
from joey.errors import InvalidArgumentError, PromptError
from joey.models.adapter import KangarooAdapter
from joey.models.jakiro_head import JakiroHead
from joey.models.llama import LlamaModel
from joey.models.registry import ModelSource
from joey.models.weights import read_config
from joey.payoff import Payoff
from joey.request import StreamEvent

__all__ = ["BATCH_MODES", "METHODS", "Engine", "StreamEvent"]

Message = dict[str, str]
ROLES = ("system", "user", "assistant")  # chat roles every supported template takes
Prompt = Union[str, Sequence[Message]]


def _is_messages(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


class Engine:
    """A loaded target model with its tokenizer; generates text autoregressively or speculatively."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Any,
        source: ModelSource | None = None,
        draft_model: LlamaModel | None = None,
        adapter: KangarooAdapter | None = None,
        head: JakiroHead | None = None,
    ) -> None:
        if draft_model is not None and draft_model.cfg.vocab_size != model.cfg.vocab_size:
            raise InvalidArgumentError(
                f"the draft model's vocabulary ({draft_model.cfg.vocab_size}) differs from the target's "
                f"({model.cfg.vocab_size}); a draft model must share the tokenizer"
            )
        self.model = model
        self.draft_model = draft_model
        self.kangaroo = KangarooDraft.build(model, adapter) if adapter is not None else None
        self.jakiro = JakiroDraft.build(model, head) if head is not None else None
        # Jakiro's hybrid inference (the last tree level from the contrastive branch); a setting so
        # that benchmarks/tree_sweep.py can measure what it is worth
        self.jakiro_hybrid = True
        self.tokenizer = tokenizer
        self.source = source
        self.name = source.name if source else "model"
        self.eos_ids = self._eos_ids()
        self._curve: CostCurve | None = None
        self._payoffs: dict[tuple[str, SpecConfig], Payoff] = {}

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def default_method(self) -> str:
        """The fastest lossless method measured for this model whose drafter is loaded (the
        registry's ``KnownModel.methods``, from Spec-Bench runs), else prompt lookup: training-free,
        so it applies to every model, and where the context offers no match a step is plain
        decoding (PLD was the fastest method measured on both named targets)."""
        from joey.models.registry import known_model

        known = known_model(self.name) if self.source is not None else None
        for name in known.methods if known is not None else ():
            make = methods.method(name).make
            try:
                if make is not None:
                    make(self, SpecConfig(), TreeShape(1, 1))  # raises when its drafter is missing
                return name
            except InvalidArgumentError:
                continue
        return "pld"

    def resolve_method(self, method: str | None) -> str:
        """A method name as asked (None or "auto": ``default_method``)."""
        return self.default_method if method in (None, "auto") else method

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if self.source is not None:
            eos = read_config(self.source.folder)[1].get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return frozenset(ids)

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (wrapped as one user message when ``chat``) or messages."""
        if _is_messages(prompt):
            messages = list(prompt)
            for i, m in enumerate(messages):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidArgumentError("each message needs string 'role' and 'content' fields")
                if m["role"] not in ROLES:
                    raise InvalidArgumentError(f"message {i} has role '{m['role']}'; roles are {', '.join(ROLES)}")
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            raise InvalidArgumentError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
        if not any(m["content"].strip() for m in messages):
            raise PromptError("the prompt is empty")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "\n".join(m["content"] for m in messages)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
        if isinstance(prompts, str) or _is_messages(prompts):
            return [prompts], False
        if isinstance(prompts, (list, tuple)):
            if not prompts:
                raise PromptError("no prompt given")
            return list(prompts), True
        raise InvalidArgumentError(
            f"a prompt must be a string, a list of messages or a list of prompts, got {type(prompts).__name__}"
        )

    # -- generation ------------------------------------------------------------------------------
    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        method: str | None = None,
        chat: bool = True,
        max_draft: int = DEFAULT_MAX_DRAFT,
        threshold: float = DEFAULT_THRESHOLD,
        tree_nodes: int | None = None,
        tree_topk: int = 0,
        adaptive: bool = True,
        batch_mode: str = "packed",
        **overrides: Any,
    ) -> Iterator[StreamEvent]:
        """Generate for one prompt or a batch, yielding text deltas as tokens are committed.

        ``method``: one of ``METHODS`` (default: ``default_method``). ``max_draft`` is
        the most draft tokens on one path per step (Kangaroo's γ); ``threshold`` is Kangaroo's η, the
        draft confidence below which drafting of a step stops; ``tree_nodes`` (0 = chain, None =
        chosen from the measured verification cost) and ``tree_topk`` shape a draft tree (see
        ``SpecConfig``); ``adaptive`` lets each step draft less, or nothing, when the row's acceptance
        so far cannot pay for drafting (``joey.budget``). ``batch_mode``: ``"packed"`` (rows keep their
        own lengths, no padding anywhere) or ``"padded"``, the vanilla baseline EMS-SD measures
        against (``joey.batching.Lockstep``); both give the same tokens. ``overrides`` are SamplingParams fields
        (``max_new_tokens=64, temperature=0.7, ...``).
        """
        method = self.resolve_method(method)
        params = SamplingParams.with_overrides(params, overrides)
        if not isinstance(chat, bool):
            raise InvalidArgumentError(f"chat must be true or false, got {chat!r}")
        if method not in METHODS:
            raise InvalidArgumentError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        if batch_mode not in BATCH_MODES:
            raise InvalidArgumentError(f"unknown batch mode '{batch_mode}'; choose from {', '.join(BATCH_MODES)}")
        spec = SpecConfig(max_draft, threshold, tree_nodes, tree_topk, adaptive)
        batch = ContinuousBatch(self, method, spec, batch_mode=batch_mode)
        prompts_, _ = self._as_batch(prompts)
        encoded = [self.encode(p, chat=chat) for p in prompts_]
        for i, ids in enumerate(encoded):
            # a seeded batch: row i draws from seed + i, so row 0 samples what the prompt would alone
            row_params = replace(params, seed=params.seed + i) if params.seed is not None and i else params
            batch.add(ids, row_params, key=i)
        while batch.busy:
            for event in batch.step():
                if event.error is not None:
                    raise event.error
                yield event

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Generation | list[Generation]:
        """Run ``stream()`` to the end; one ``Generation`` per prompt (a list for a list of prompts)."""
        _, is_batch = self._as_batch(prompts)
        done: dict[int, Generation] = {}
        for event in self.stream(prompts, params, **kwargs):
            if event.generation is not None:
                done[event.row] = event.generation
        results = [done[i] for i in sorted(done)]
        return results if is_batch else results[0]

    def cost_curve(self) -> CostCurve:
        """What verifying k tokens costs on this machine (measured once, then cached; joey.budget)."""
        if self._curve is None:
            from joey.models.draft_files import model_cache_key
            from joey.models.registry import cache_dir

            self._curve = cached_curve(self.model, model_cache_key(self.model), cache_dir())
        return self._curve

    # whether drafted steps are gated by their measured payoff (``joey.payoff``); JOEY_PAYOFF=0 turns
    # the gate off (to measure what it is worth); tests that count drafts switch it off, since a
    # wall-clock decision is not deterministic
    measured_payoff: bool = os.environ.get("JOEY_PAYOFF", "1") != "0"

    def payoff(self, method: str, spec: SpecConfig) -> Payoff | None:
        """The wall-clock gate of ``method`` under ``spec`` on this engine, kept across batches and
        requests (None when ``measured_payoff`` is off)."""
        if not self.measured_payoff:
            return None
        return self._payoffs.setdefault((method, spec), Payoff())

    def tree_shape(self, method: str, spec: SpecConfig) -> TreeShape:
        """How a method drafts under ``spec``: chain or tree, its node budget and branching
        (``joey.methods``)."""
        m = methods.method(method)
        if m.trees == "measured":
            topk = spec.tree_topk or m.topk
            nodes = spec.tree_nodes if spec.tree_nodes is not None else self.cost_curve().tree_nodes()
        elif m.trees == "asked":
            topk, nodes = spec.tree_topk or m.topk, spec.tree_nodes or 0
        else:
            if m.make is not None and spec.tree_nodes:
                raise InvalidArgumentError(f"method '{method}' drafts chains only; use --tree-nodes 0")
            topk, nodes = 1, 0
        if nodes == 0 or topk == 1:
            return TreeShape(nodes=spec.max_draft, topk=1)
        return TreeShape(nodes=nodes, topk=topk)

    def drafter_factory(self, method: str, spec: SpecConfig, shape: TreeShape) -> methods.DrafterFactory | None:
        """What makes each row's drafter: f(max_len, generator, params) -> Drafter; None for AR."""
        make = methods.method(method).make
        return None if make is None else make(self, spec, shape)
