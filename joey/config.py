"""Frozen, validated settings shared by the engine, the CLI, the server and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from joey.errors import InvalidArgumentError

DEFAULT_MAX_DRAFT = 6  # most draft tokens on one path per step (Kangaroo's γ)
DEFAULT_THRESHOLD = 0.6  # Kangaroo's confidence stop η (the paper's single-sequence value)
METHODS = ("ar", "pld", "sps", "kangaroo", "kangaroo+pld", "jakiro", "jakiro+pld")  # drafting methods
MAX_DRAFT_LIMIT = 64  # keeps draft positions inside the RoPE table's margin past the context
MAX_TREE_NODES = 128
MAX_TREE_TOPK = 16


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the target's logits.

    ``temperature == 0`` means greedy decoding; top-k / top-p only matter when sampling.
    ``seed`` keys the randomness of sampling: the token at position t is drawn with a uniform that
    depends only on (seed, t) (``joey.sampling.keyed_uniform``), so the same request with the same
    seed gives the same tokens with every method, batch and load (on one machine and weight format).
    A request without a seed gets a random one, reported in its ``Generation``. ``rejection=True``
    verifies sampled drafts by rejection sampling instead (exact in distribution, but its draws
    depend on the method and the drafts: not token-reproducible).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    rejection: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgumentError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise InvalidArgumentError(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)) or any(not isinstance(x, str) or x == "" for x in stop):
            raise InvalidArgumentError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgumentError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.rejection, bool):
            raise InvalidArgumentError(f"rejection must be true or false, got {self.rejection!r}")

    @classmethod
    def with_overrides(cls, params: SamplingParams | None, overrides: dict) -> SamplingParams:
        """``params`` (default: SamplingParams()) with some fields replaced; an unknown keyword is a
        one-line error naming it and the accepted ones."""
        if params is not None and not isinstance(params, SamplingParams):
            raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = params or cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown keyword '{unknown[0]}'; sampling keywords are {', '.join(sorted(names))}"
            )
        return replace(params, **overrides) if overrides else params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def exact(self) -> bool:
        """Whether every method must give AR's very tokens: greedy decoding, or sampling whose draws
        are keyed by seed and position (not ``rejection``)."""
        return self.greedy or not self.rejection


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
        if not _is_int(self.max_draft) or not 1 <= self.max_draft <= MAX_DRAFT_LIMIT:
            raise InvalidArgumentError(
                f"max_draft must be an integer in [1, {MAX_DRAFT_LIMIT}], got {self.max_draft!r}"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0.0 <= self.threshold <= 1.0
        ):
            raise InvalidArgumentError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        nodes = self.tree_nodes
        if nodes is not None and (not _is_int(nodes) or not 0 <= nodes <= MAX_TREE_NODES):
            raise InvalidArgumentError(f"tree_nodes must be an integer in [0, {MAX_TREE_NODES}], got {nodes!r}")
        if not _is_int(self.tree_topk) or not 0 <= self.tree_topk <= MAX_TREE_TOPK:
            raise InvalidArgumentError(f"tree_topk must be an integer in [0, {MAX_TREE_TOPK}], got {self.tree_topk!r}")
        if not isinstance(self.adaptive, bool):
            raise InvalidArgumentError(f"adaptive must be true or false, got {self.adaptive!r}")


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
    seed: int | None = None  # the seed its sampling was keyed by (given or drawn): rerun with it to reproduce
    # from the request's start to its first token (its prefill, and in a batch the others' admitted with it)
    first_token_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0
