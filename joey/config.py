"""Frozen, validated settings shared by the engine, the CLI, the server and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

from joey.errors import InvalidArgumentError

DEFAULT_MAX_DRAFT = 6  # most draft tokens on one path per step (Kangaroo's γ)
DEFAULT_THRESHOLD = 0.6  # Kangaroo's confidence stop η (the paper's single-sequence value)
METHODS = ("ar", "pld", "sps", "kangaroo", "kangaroo+pld", "jakiro", "jakiro+pld")  # drafting methods
MAX_DRAFT_LIMIT = 64  # keeps draft positions inside the RoPE table's margin past the context
MAX_TREE_NODES = 128
MAX_TREE_TOPK = 16


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the target's logits.

    ``temperature == 0`` means greedy decoding; top-k / top-p only matter when sampling.
    ``seed`` seeds a private ``torch.Generator`` so runs are reproducible.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidArgumentError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0):  # also rejects NaN
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidArgumentError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpecConfig:
    """How a speculative method drafts.

    ``max_draft``: the most draft tokens on one path per step (Kangaroo's γ, the tree's depth).
    ``threshold``: Kangaroo's η; drafting of a step stops once the most confident new draft token
    is below it. ``tree_nodes``: the most draft tokens per step in all; 0 drafts a chain, None lets
    joey choose from the measured cost of verification on this machine (``joey.budget``).
    ``tree_topk``: children per expanded node and nodes expanded per depth; 0 = joey's choice.
    ``adaptive``: each step may draft less deep, or not at all, when the row's acceptance so far
    cannot pay for drafting (``joey.budget``). The fields are ``Engine.stream()``'s keywords of the
    same names, so ``stream(..., **asdict(spec))`` passes a whole config.
    """

    max_draft: int = DEFAULT_MAX_DRAFT
    threshold: float = DEFAULT_THRESHOLD
    tree_nodes: int | None = None
    tree_topk: int = 0
    adaptive: bool = True

    def __post_init__(self) -> None:
        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_draft) or not 1 <= self.max_draft <= MAX_DRAFT_LIMIT:
            raise InvalidArgumentError(
                f"max_draft must be an integer in [1, {MAX_DRAFT_LIMIT}], got {self.max_draft!r}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0.0 <= self.threshold <= 1.0
        ):
            raise InvalidArgumentError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        nodes = self.tree_nodes
        if nodes is not None and (not is_int(nodes) or not 0 <= nodes <= MAX_TREE_NODES):
            raise InvalidArgumentError(f"tree_nodes must be an integer in [0, {MAX_TREE_NODES}], got {nodes!r}")
        if not is_int(self.tree_topk) or not 0 <= self.tree_topk <= MAX_TREE_TOPK:
            raise InvalidArgumentError(f"tree_topk must be an integer in [0, {MAX_TREE_TOPK}], got {self.tree_topk!r}")


@dataclass(frozen=True)
class TreeShape:
    """A drafter's per-step budget as resolved for a run: at most ``nodes`` draft tokens, ``topk``
    children per expanded node (1 = a chain of up to ``nodes`` tokens)."""

    nodes: int
    topk: int


@dataclass(frozen=True)
class GenerationStats:
    """Counters of one generation. Autoregressive decoding has steps == new tokens and τ == 1.

    ``drafted_by_depth[d]`` counts the steps whose draft (chain or tree) reached depth d + 1 and
    ``accepted_by_depth[d]`` those whose accepted path reached it; counts, so that runs pool
    exactly. ``draft_tokens`` is the number of draft tokens (tree nodes) proposed in all.
    """

    steps: int = 0
    mean_accepted_tokens: float = 1.0
    drafted_by_depth: tuple[int, ...] = ()
    accepted_by_depth: tuple[int, ...] = ()
    draft_tokens: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    @property
    def acceptance_by_position(self) -> tuple[float, ...]:
        """Per draft depth: the fraction of steps that drafted it whose accepted path reached it."""
        return tuple(a / d for a, d in zip(self.accepted_by_depth, self.drafted_by_depth))


@dataclass(frozen=True)
class Generation:
    """The result of one prompt: text, ids and timing."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    wall_time_s: float
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    method: str = "ar"
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
