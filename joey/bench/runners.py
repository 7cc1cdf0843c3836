"""One answer to one conversation turn, per decoding method: joey's methods and external baselines.

Every runner receives the conversation as chat messages and is timed from its first forward pass to
its last token (tokenization and the chat template are outside the timing, for all of them alike).
joey's methods go through ``Engine.stream()``; the baselines run the same model: ``hf`` is
transformers ``generate()`` on the same float weights, ``hf-pld`` transformers' prompt-lookup
assisted generation, ``llamacpp`` llama.cpp on the GGUF the weights came from (quantized, so its
tokens may differ: the report gives its agreement with AR instead of a lossless verdict).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from joey.config import SamplingParams, SpecConfig
from joey.engine import METHODS, Engine, Message
from joey.errors import InvalidArgumentError, MissingDependencyError

EXTERNAL = ("hf", "hf-pld", "llamacpp")


def all_methods() -> tuple[str, ...]:
    """joey's methods (read at run time, so new ones appear here unchanged) then the baselines."""
    return tuple(METHODS) + EXTERNAL


@dataclass(frozen=True)
class TurnResult:
    """One generated turn. ``steps`` and ``accept_lengths`` are None where a runner cannot see them
    (transformers' assisted generation); a finishing EOS counts as a committed token (as in
    Spec-Bench's accept lengths), so AR's τ is exactly 1."""

    text: str
    token_ids: tuple[int, ...]
    new_tokens: int
    wall_time_s: float
    finish_reason: str
    steps: int | None
    accept_lengths: tuple[int, ...] | None
    drafted_by_depth: tuple[int, ...] = ()  # steps whose draft reached each depth (GenerationStats)
    accepted_by_depth: tuple[int, ...] = ()  # ... and whose accepted path reached it


class Runner(Protocol):
    name: str
    external: bool

    def answer(self, messages: Sequence[Message], params: SamplingParams) -> TurnResult: ...


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_available(methods: Sequence[str], has_draft_model: bool) -> None:
    """Fail before any model is loaded if a method cannot run here."""
    known = all_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InvalidArgumentError(f"unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if "sps" in methods and not has_draft_model:
        raise InvalidArgumentError("method 'sps' needs --draft-model (a smaller model sharing the tokenizer)")
    if "llamacpp" in methods and not llamacpp_installed():
        raise MissingDependencyError("method 'llamacpp' needs llama-cpp-python: pip install llama-cpp-python")


def make_runner(method: str, engine: Engine, spec: SpecConfig | None = None) -> Runner:
    spec = spec or SpecConfig()
    if method == "hf":
        return HFRunner(engine, prompt_lookup=None)
    if method == "hf-pld":
        return HFRunner(engine, prompt_lookup=spec.max_draft)
    if method == "llamacpp":
        return LlamaCppRunner(engine)
    return JoeyRunner(engine, method, spec)


def _ended_by_eos(reason: str) -> int:
    # The bench sets no stop strings, so "stop" means the model emitted EOS in its last step.
    return 1 if reason == "stop" else 0


class JoeyRunner:
    """A joey method through ``Engine.stream()``; each stream event is one step's committed tokens."""

    external = False

    def __init__(self, engine: Engine, method: str, spec: SpecConfig | None = None) -> None:
        self.engine, self.name, self.spec = engine, method, spec or SpecConfig()

    def answer(self, messages: Sequence[Message], params: SamplingParams) -> TurnResult:
        lengths: list[int] = []
        gen = None
        for event in self.engine.stream(list(messages), params, method=self.name, **asdict(self.spec)):
            lengths.append(len(event.token_ids))
            gen = event.generation or gen
        assert gen is not None  # the last event of a row always carries its Generation
        if lengths and _ended_by_eos(gen.finish_reason):
            lengths[-1] += 1
        return TurnResult(
            text=gen.text, token_ids=gen.token_ids, new_tokens=gen.new_tokens, wall_time_s=gen.wall_time_s,
            finish_reason=gen.finish_reason, steps=gen.stats.steps, accept_lengths=tuple(lengths),
            drafted_by_depth=gen.stats.drafted_by_depth, accepted_by_depth=gen.stats.accepted_by_depth,
        )


class HFRunner:
    """transformers ``generate()`` on the engine's own float weights (optionally with prompt lookup)."""

    external = True

    def __init__(self, engine: Engine, prompt_lookup: int | None) -> None:
        from transformers.utils import logging as hf_logging

        if engine.source is None:
            raise InvalidArgumentError("the transformers baselines need a model loaded from a folder or GGUF")
        hf_logging.set_verbosity_error()  # assisted generation warns on every call otherwise
        hf_logging.disable_progress_bar()  # a "Loading weights" bar would interleave with the bench's
        self.engine = engine
        self.name = "hf" if prompt_lookup is None else "hf-pld"
        self.prompt_lookup = prompt_lookup
        self.model = engine.source.transformers_model(dtype=engine.dtype)
        self.model.to(engine.device).eval()
        self.eos = sorted(engine.eos_ids)

    def answer(self, messages: Sequence[Message], params: SamplingParams) -> TurnResult:
        from transformers import GenerationConfig

        ids = self.engine.encode(list(messages))
        budget = min(params.max_new_tokens, self.engine.context_length - len(ids))
        sampling: dict[str, Any] = {"do_sample": False}
        if not params.greedy:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_k": params.top_k or None,
                        "top_p": params.top_p}
            torch.manual_seed(params.seed if params.seed is not None else 0)
        # An explicit config, so nothing (sampling defaults, repetition penalty) comes from the folder.
        cfg = GenerationConfig(max_new_tokens=budget, eos_token_id=self.eos or None,
                               pad_token_id=self.eos[0] if self.eos else 0,
                               prompt_lookup_num_tokens=self.prompt_lookup, **sampling)
        x = torch.tensor([ids], device=self.engine.device)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
            seconds = time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        reason = "length"
        if new and new[-1] in self.engine.eos_ids:  # joey leaves EOS out of its tokens; so do we
            new.pop()
            reason = "stop"
        steps = len(new) + _ended_by_eos(reason)
        ar = self.prompt_lookup is None
        return TurnResult(
            text=self.engine.tokenizer.decode(new, skip_special_tokens=True), token_ids=tuple(new),
            new_tokens=len(new), wall_time_s=seconds, finish_reason=reason,
            steps=steps if ar else None, accept_lengths=(1,) * steps if ar else None,
        )


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the model's GGUF, with as many threads as torch uses."""

    name = "llamacpp"
    external = True

    def __init__(self, engine: Engine) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingDependencyError("method 'llamacpp' needs llama-cpp-python: pip install llama-cpp-python")
        if engine.source is None or engine.source.gguf is None:
            raise InvalidArgumentError("method 'llamacpp' needs a model loaded from a .gguf file (or the default)")
        self.engine = engine
        self.llm = Llama(model_path=str(engine.source.gguf), n_threads=torch.get_num_threads(),
                         n_ctx=engine.context_length, verbose=False)

    def answer(self, messages: Sequence[Message], params: SamplingParams) -> TurnResult:
        ids = self.engine.encode(list(messages))
        budget = min(params.max_new_tokens, self.engine.context_length - len(ids))
        self.llm.reset()  # forget the KV cache: every turn pays its own prefill, as the others do
        if not params.greedy:
            self.llm.set_seed(params.seed if params.seed is not None else 0)
        knobs = dict(top_k=1, top_p=1.0, temp=0.0) if params.greedy else dict(
            top_k=params.top_k, top_p=params.top_p, temp=params.temperature)
        new: list[int] = []
        reason = "length"
        start = time.perf_counter()
        for tok in self.llm.generate(ids, min_p=0.0, repeat_penalty=1.0, **knobs):
            if tok in self.engine.eos_ids:
                reason = "stop"
                break
            new.append(tok)
            if len(new) >= budget:
                break
        seconds = time.perf_counter() - start
        steps = len(new) + _ended_by_eos(reason)
        return TurnResult(
            text=self.engine.tokenizer.decode(new, skip_special_tokens=True), token_ids=tuple(new),
            new_tokens=len(new), wall_time_s=seconds, finish_reason=reason, steps=steps,
            accept_lengths=(1,) * steps,
        )

