"""Frozen, validated settings shared by the engine, the CLI, the server and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

from joey.errors import InvalidArgumentError


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
class GenerationStats:
    """Counters of one generation. Autoregressive decoding has steps == new tokens and τ == 1.

    ``acceptance_by_position[i]`` is the fraction of steps with a draft token at position i whose
    token was accepted (filled by the speculative methods; empty for AR).
    """

    steps: int = 0
    mean_accepted_tokens: float = 1.0
    acceptance_by_position: tuple[float, ...] = ()
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0


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
