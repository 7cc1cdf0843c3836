"""The ``joey`` command line: generate, chat, serve, info, install, bench, train-adapter, train-drafter.
The only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from torch import nn

from joey.config import DEFAULT_MAX_DRAFT, DEFAULT_THRESHOLD, MAX_DRAFT_LIMIT, SamplingParams, SpecConfig
from joey.engine import BATCH_MODES, METHODS
from joey.errors import InvalidArgumentError, JoeyError, PromptError
from joey.models.gguf_file import BlockEmbedding
from joey.models.llama import Linear, LlamaModel
from joey.models.weight_formats import low_bit_kernels
from joey.models.weights import WEIGHT_CHOICES

if TYPE_CHECKING:  # the server (and Ray) are imported only by `joey serve`
    from collections.abc import Callable

    from joey.server import ServerSettings
    from joey.server.ray_serve import RayOptions


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"joey: error: {message} (see {self.prog} --help)\n")


def _model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a known name ('joey info --models'), HF folder, .gguf file, hub id, or 'default' "
                        "(SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    if not weights:  # training distils from the float target
        return
    p.add_argument("--weights", default="auto", choices=list(WEIGHT_CHOICES),
                   help="format of the linear layers on CPU (default auto: the fastest that keeps the source's "
                        "precision, e.g. a 4-bit GGUF on its own codes)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--rejection-sampling", action="store_true",
                   help="verify sampled drafts by rejection sampling: exact in distribution and higher acceptance "
                        "for --method sps, but NOT token-reproducible (the same seed may give other tokens than ar)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--method", default="auto", choices=["auto", *METHODS],
                   help="jakiro = a trained MoE head drafting token trees from the target's features; "
                        "kangaroo = early-exit self-drafting; X+pld = X's tree plus a prompt-lookup branch; "
                        "ar = autoregressive; pld = prompt lookup; sps = separate draft model. "
                        "All are lossless. auto (default): the fastest measured for the model (see 'joey info').")
    p.add_argument("--draft-model", default=None, help="small model sharing the tokenizer (for --method sps)")
    p.add_argument("--adapter", default=None, help="Kangaroo adapter file (default: the one shipped for the model)")
    p.add_argument("--head", default=None, help="Jakiro head file (default: the one shipped for the model)")
    p.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="most draft tokens per step (γ)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"Kangaroo: stop drafting a step when the draft's confidence is below this (η, default "
                        f"{DEFAULT_THRESHOLD})")
    _tree_args(p)


def _tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="most draft tokens per step in a token tree; 0 = a chain (default: chosen from the "
                        "measured cost of verification on this machine, see 'joey info')")
    p.add_argument("--tree-topk", type=int, default=0, help="children per expanded tree node (default: joey's choice)")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft the full depth (default: each step drafts only as deep as pays off)")


def _spec_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The drafting options, validated (SpecConfig raises a one-line error)."""
    return asdict(SpecConfig(args.max_draft, args.threshold, args.tree_nodes, args.tree_topk, args.adaptive))


def build_parser() -> argparse.ArgumentParser:
    from joey import __version__

    parser = _Parser(prog="joey", description="Lossless speculative decoding for Llama-family models.")
    parser.add_argument("--version", action="version", version=f"joey {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a reply to one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="a prompt; several prompts run as one batch")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    gen.add_argument("--batch-mode", default="packed", choices=list(BATCH_MODES),
                     help="several prompts: packed = ragged rows without padding (EMS-SD, default); padded = the "
                          "lock-step baseline, for comparison (same tokens)")

    chat = sub.add_parser("chat", help="interactive multi-turn chat (streaming)")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")

    info = sub.add_parser("info", help="show the model, device, dtype and cache")
    _model_args(info)
    info.add_argument("--models", action="store_true",
                      help="list the models joey knows by name and which are installed")

    install = sub.add_parser("install", help="install a model joey knows by name (see 'joey info --models')")
    install.add_argument("name", help="e.g. qwen2.5-coder-1.5b-instruct")
    _serve_parser(sub)
    _bench_parser(sub)
    _train_parser(sub)
    _train_drafter_parser(sub)
    return parser


def _params(args: argparse.Namespace) -> SamplingParams:
    if args.method == "sps" and not args.draft_model:
        raise InvalidArgumentError("--method sps needs --draft-model (a smaller model sharing the tokenizer)")
    if not 0.0 <= args.threshold <= 1.0:
        raise InvalidArgumentError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 1 <= args.max_draft <= MAX_DRAFT_LIMIT:
        raise InvalidArgumentError(f"--max-draft must be in [1, {MAX_DRAFT_LIMIT}], got {args.max_draft}")
    _spec_kwargs(args)
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        rejection=args.rejection_sampling,
    )


def _load(args: argparse.Namespace):
    import joey

    draft = getattr(args, "draft_model", None)
    adapter, head = getattr(args, "adapter", None), getattr(args, "head", None)
    return joey.load(args.model, device=args.device, dtype=args.dtype, draft_model=draft, adapter=adapter, head=head,
                     weights=args.weights)


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before the (possibly slow) model load
    if any(not p.strip() for p in args.prompts):
        raise PromptError("the prompt is empty")
    engine = _load(args)
    prompts: list[Any] = [p if args.raw else _messages(p, args.system) for p in args.prompts]
    batch = prompts if len(prompts) > 1 else prompts[0]
    stream_text = not args.json and len(prompts) == 1
    results = {}
    for event in engine.stream(batch, params, method=args.method, chat=not args.raw, batch_mode=args.batch_mode,
                               **_spec_kwargs(args)):
        if stream_text and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.generation is not None:
            results[event.row] = event.generation
    for row in sorted(results):
        g = results[row]
        if args.json:
            print(json.dumps({
                "text": g.text, "token_ids": list(g.token_ids), "new_tokens": g.new_tokens,
                "wall_time_s": round(g.wall_time_s, 4), "tokens_per_s": round(g.tokens_per_s, 2),
                "method": g.method, "steps": g.stats.steps, "mean_accepted_tokens": g.stats.mean_accepted_tokens,
                "finish_reason": g.finish_reason, "seed": g.seed,
            }))
            continue
        if not stream_text:
            print(f"--- [{row}] {args.prompts[row][:60]}\n{g.text}")
        else:
            print()
        print(f"[{g.new_tokens} tokens in {g.wall_time_s:.2f} s: {g.tokens_per_s:.1f} tokens/s, "
              f"method {g.method}, finish {g.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    engine = _load(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"joey chat on {engine.name} ({engine.device}); /reset clears the history, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = None
        for event in engine.stream(history, params, method=args.method, **_spec_kwargs(args)):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            reply = event.generation or reply
        print()
        assert reply is not None
        print(f"[{reply.new_tokens} tokens, {reply.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.text})


def cmd_install(args: argparse.Namespace) -> int:
    from joey.models.registry import install

    print(f"joey: {args.name} is installed: {install(args.name)}", file=sys.stderr)
    return 0


def _known_models() -> int:
    from joey.models.registry import KNOWN_MODELS, installed_gguf

    for m in KNOWN_MODELS:
        where = installed_gguf(m)
        state = f"installed ({where})" if where else f"not installed: {m.install_command}"
        print(f"{m.name:<30} {m.size / 1e9:5.2f} GB  {m.about}\n{'':<30} {state}")
    return 0


def param_count(model: nn.Module) -> int:
    """Parameters of a module, counting the weights of linears that keep only a kernel (a GGUF read
    in place) and an embedding kept in blocks by their shapes; shared (tied) tensors count once."""
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tied = isinstance(model, LlamaModel) and model.cfg.tie_word_embeddings
    for m in model.modules():
        if isinstance(m, Linear) and m.weight is None and not (tied and m is model.lm_head):
            count += m.in_features * m.out_features
        elif isinstance(m, BlockEmbedding) and not (tied and model.lm_head.weight is not None):
            count += m.rows.shape[0] * m.rows.shape[1]  # (a tied float head already counted it)
    return count


def _folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def cmd_info(args: argparse.Namespace) -> int:
    from joey.models.registry import cache_dir

    if args.models:
        return _known_models()
    engine = _load(args)
    cfg = engine.model.cfg
    info = {
        "model": engine.name,
        "folder": str(engine.source.folder) if engine.source else None,
        "gguf": str(engine.source.gguf) if engine.source and engine.source.gguf else None,
        "family": cfg.architecture,
        "features": ", ".join(cfg.features()) or "none beyond a plain Llama decoder",
        "parameters": param_count(engine.model),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "weights": f"{engine.model.weight_format}, {engine.model.weight_bytes() / 1e6:.1f} MB read per token",
        "cache": f"{cache_dir()} ({_folder_size(cache_dir()) / 1e9:.2f} GB; JOEY_CACHE moves it)",
        "default method": engine.default_method,
    }
    if "int" in engine.model.weight_format:
        info["low-bit kernels"] = (
            "joey's AVX512-VNNI kernel (activations in 8 bits per group of 32, as llama.cpp)"
            if low_bit_kernels() == "vnni" else "PyTorch's (bf16 activations)")
    if engine.kangaroo is not None:
        kd = engine.kangaroo
        info["kangaroo adapter"] = (f"exit layer {kd.exit_layer}, {param_count(kd.adapter)} parameters, "
                                    f"draft vocabulary {kd.head.vocab.numel()}")
    else:  # adapters are trained per model
        info["kangaroo adapter"] = "none for this model (joey train-adapter makes one)"
    if engine.jakiro is not None:
        jd = engine.jakiro
        info["jakiro head"] = (f"{jd.head.num_experts} experts, {param_count(jd.head)} parameters, "
                               f"draft vocabulary {jd.vocab_head.vocab.numel()}")
    curve = engine.cost_curve()
    info["verify cost (ms)"] = "  ".join(f"k={k}: {ms:.1f}" for k, ms in zip(curve.tokens, curve.ms))
    info["verify cost (×k=1)"] = "  ".join(f"k={k}: {ms / curve.ms[0]:.2f}" for k, ms in zip(curve.tokens, curve.ms))
    info["tree nodes (auto)"] = f"{curve.tree_nodes()} (largest draft whose verification costs <= 1.3x one token)"
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _model_args(p)
    p.add_argument("--method", default="auto", choices=["auto", *METHODS],
                   help="the drafting method of every request (auto: the fastest measured for the model)")
    p.add_argument("--draft-model", default=None, help="small model sharing the tokenizer (for --method sps)")
    p.add_argument("--adapter", default=None, help="Kangaroo adapter file (default: the one shipped for the model)")
    p.add_argument("--head", default=None, help="Jakiro head file (default: the one shipped for the model)")
    p.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="most draft tokens per step (γ)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="Kangaroo's confidence stop η")
    _tree_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JOEY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $JOEY_API_KEY; none = open)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoding at once (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for the batch; past it requests get 429 (default 64)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="length limit of a chat request without max_tokens (default 1024)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("replicas on Ray Serve", 'needs pip install "joey[ray]"; see docs/serving.md')
    ray.add_argument("--replicas", type=int, default=None,
                     help="serve N replicas behind Ray Serve's proxy, each with its own model, batch and queue "
                          "(default: one process, no Ray)")
    ray.add_argument("--address", default=None,
                     help="join this Ray cluster: 'auto' (the one 'ray start' made here) or HOST:PORT (default: "
                          "start a new local Ray, stopped on exit)")
    ray.add_argument("--cpus-per-replica", type=float, default=None,
                     help="CPUs Ray reserves for each replica, also its PyTorch threads (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs for each replica (default 0)")


def _serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The server's settings from ``joey serve``'s options, validated (one-line errors)."""
    from joey.server import ServerSettings

    if args.method == "sps" and not args.draft_model:
        raise InvalidArgumentError("--method sps needs --draft-model (a smaller model sharing the tokenizer)")
    for name in ("max_batch", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise InvalidArgumentError("--max-queue must be >= 0")
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {args.port}")
    return ServerSettings(method=args.method, spec=SpecConfig(**_spec_kwargs(args)), max_batch=args.max_batch,
                          max_queue=args.max_queue, api_key=args.api_key or None,
                          model_name=args.served_model_name, default_max_tokens=args.default_max_tokens)


def _ray_options(args: argparse.Namespace) -> RayOptions:
    """``--replicas`` and the rest, validated; 1 replica where ``--replicas`` is absent (Ray's app builder)."""
    from joey.server.ray_serve import RayOptions

    cpus, gpus = args.cpus_per_replica, args.gpus_per_replica
    return RayOptions(replicas=1 if args.replicas is None else args.replicas, address=args.address,
                      cpus_per_replica=1.0 if cpus is None else cpus, gpus_per_replica=0.0 if gpus is None else gpus)


def serve_setup(argv: list[str]) -> tuple[Callable[[], Any], ServerSettings, RayOptions]:
    """What Ray's app builder needs from ``joey serve`` options (``argv`` starts with "serve"): the
    model's loader, the server's settings and the Ray options (1 replica unless ``--replicas``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse printed the reason
        raise InvalidArgumentError(f"bad joey serve options: {' '.join(argv[1:])}")
    return partial(_load, args), _serve_settings(args), _ray_options(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from joey.server import serve

    settings = _serve_settings(args)
    load = partial(_load, args)  # a module-level function: Ray pickles it for its replicas
    if args.replicas is None:
        for name in ("address", "cpus_per_replica", "gpus_per_replica"):
            if getattr(args, name) is not None:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} needs --replicas")
        return serve(load, settings, host=args.host, port=args.port, log_level=args.log_level)
    from joey.server.ray_serve import serve_replicas

    return serve_replicas(load, settings, _ray_options(args), host=args.host, port=args.port,
                          log_level=args.log_level)


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="run a Spec-Bench question file with several methods; write a report")
    bench.add_argument("--questions", "-q", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench",
                       "data", "spec_bench", "question.jsonl"),
                       help="Spec-Bench question file (JSONL; default: Spec-Bench's 480 questions, shipped with joey)")
    bench.add_argument("--out", "-o", required=True, help="output folder (results.json, report.md, plots, answers)")
    bench.add_argument("--categories", nargs="+", default=[], metavar="CAT",
                       help="categories to run (file categories or mt_bench; comma- or space-separated; default all)")
    bench.add_argument("--limit", type=int, default=None, help="at most N questions per category")
    bench.add_argument("--methods", default=None,
                       help="comma-separated: joey methods (ar, pld, sps, ...) and baselines hf, hf-pld, llamacpp "
                            "(default: every joey method needing no extra input, plus the installed baselines)")
    bench.add_argument("--max-new-tokens", "-n", type=int, default=128)
    bench.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    bench.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    bench.add_argument("--repeats", type=int, default=1, help="run every question R times (speedup spread)")
    bench.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="most draft tokens per step (γ)")
    bench.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="Kangaroo's confidence stop η")
    _tree_args(bench)
    bench.add_argument("--adapter", default=None, help="Kangaroo adapter file (default: the one shipped)")
    bench.add_argument("--head", default=None, help="Jakiro head file (default: the one shipped)")
    _model_args(bench)
    bench.add_argument("--draft-model", default=None, help="small model sharing the tokenizer (for method sps)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp")
    bench.add_argument("--batch-size", type=int, nargs="+", default=[], metavar="B",
                       help="answer first turns in batches of B (several: a sweep, e.g. 1 2 4 8 16) and plot the "
                            "speedup over batched AR against batch size")
    bench.add_argument("--batch-modes", default="packed,padded",
                       help="with --batch-size: comma-separated batch modes to compare (packed, padded)")
    bench.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from joey.bench import BenchSettings, run_bench

    def split(values: list[str]) -> tuple[str, ...]:
        return tuple(v.strip() for item in values for v in item.split(",") if v.strip())

    run_bench(BenchSettings(
        questions=Path(args.questions), out=Path(args.out),
        methods=split([args.methods]) if args.methods is not None else None,
        categories=split(args.categories), limit=args.limit, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, repeats=args.repeats, max_draft=args.max_draft,
        threshold=args.threshold, tree_nodes=args.tree_nodes, tree_topk=args.tree_topk, adaptive=args.adaptive,
        adapter=args.adapter, head=args.head,
        model=args.model, draft_model=args.draft_model, device=args.device, dtype=args.dtype, weights=args.weights,
        threads=args.threads, batch_sizes=tuple(args.batch_size), batch_modes=split([args.batch_modes]),
        fresh=args.fresh, progress=not args.no_progress,
    ))
    return 0


def _train_common(p: argparse.ArgumentParser, t: Any, what: str, prompts: int, derived: int) -> None:
    """The options both training commands share: prompts, distillation and the optimiser."""
    from joey.training.distill import DistillSettings

    d = DistillSettings()
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                   help="prompt files (.json list or .jsonl; alpaca/gsm8k/gpteacher/self-instruct/plain 'prompt')")
    p.add_argument("--out", "-o", required=True, help=f"run folder: data shards, checkpoint, {what}")
    _model_args(p, weights=False)
    p.add_argument("--num-prompts", type=int, default=prompts, help=f"prompts to distill (default {prompts})")
    p.add_argument("--derived", type=int, default=derived,
                   help="of which summarization / passage-QA / translation prompts derived from the files' answers")
    p.add_argument("--distill-minutes", type=float, default=None,
                   help="stop answering after this long and train on what exists (run again to continue)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="length of the target's answers (--answers data: cut there)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts answered at once")
    p.add_argument("--draft-vocab", type=int, default=t.draft_vocab, help="tokens in the draft's LM head")
    p.add_argument("--batch-tokens", type=int, default=t.batch_tokens,
                   help="padded positions per optimizer step: the global batch, shared out over torchrun's ranks")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="distill with the target loaded by transformers/accelerate with this device_map "
                        "(auto, balanced, ...): its layers spread over the GPUs and CPU memory")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while training (fast on CPUs with AMX)")
    p.add_argument("--distill-weights", default="fp32", choices=list(WEIGHT_CHOICES),
                   help="weights the target distills with (default fp32; auto = those joey decodes with, so "
                        "the drafter learns that target's features, fast where joey's low-bit kernel runs; bf16 = "
                        "the same weights in plain bf16 products, fastest on CPUs with AMX)")
    p.add_argument("--answers", choices=["target", "data"], default="target",
                   help="target: the target answers the prompts (self-distillation, token by token); data: "
                        "it reads the files' own answers (teacher forcing, one prefill per batch, much faster)")
    p.add_argument("--stored-answers", default=None, metavar="FILE",
                   help="with --answers target: the target's earlier answers (a file --export-answers wrote) are "
                        "read from FILE at prefill speed instead of generated; give the same --prompts, "
                        "--num-prompts, --derived and --seed as the run that answered")
    p.add_argument("--export-answers", default=None, metavar="FILE",
                   help="after distilling, write (or extend) FILE with the target's own answers in --out (token "
                        "ids, ~1.6 bytes a token), so that another machine continues with --stored-answers FILE")
    p.add_argument("--distill-batch-tokens", type=int, default=4096,
                   help="with --answers data: padded positions per distillation forward (default 4096)")
    p.add_argument("--distill-only", action="store_true",
                   help="stop after distilling (run again without it to train on every data folder in --out)")
    p.add_argument("--seed", type=int, default=0)


def _train_parser(sub: Any) -> None:
    from joey.training.adapter_training import TrainSettings

    t = TrainSettings()
    p = sub.add_parser("train-adapter", help="train a Kangaroo adapter by self-distillation (resumable)")
    _train_common(p, t, "adapter.safetensors", 960, 240)
    p.add_argument("--exit-layer", type=int, default=t.exit_layer, help="the draft uses layers [0, l)")
    p.add_argument("--attention-only", action="store_true",
                   help="the paper's adapter (attention + norms, no MLP); default adds an MLP, measured better")


def _check_counts(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.derived <= args.num_prompts:
        raise InvalidArgumentError("--derived must be between 0 and --num-prompts")
    if args.lr <= 0:
        raise InvalidArgumentError("--lr must be positive")
    if args.distill_minutes is not None and args.distill_minutes <= 0:
        raise InvalidArgumentError("--distill-minutes must be positive")
    if args.distill_batch_tokens < 1:
        raise InvalidArgumentError("--distill-batch-tokens must be at least 1")


def _train(args: argparse.Namespace, train: Any, counts: tuple[str, ...] = ()) -> int:
    """Both training commands' run: distill as the options say, then train ``train``'s network
    (``counts``: the command's own options that must be at least 1)."""
    from joey.training.distill import DistillSettings
    from joey.training.run import train_from_prompts

    _check_counts(args, (*counts, "num_prompts", "max_new_tokens", "batch_size", "draft_vocab", "epochs",
                         "batch_tokens"))
    train_from_prompts(
        args.model, args.prompts, args.out, num_prompts=args.num_prompts, derived=args.derived,
        answers=args.answers, distill_only=args.distill_only, stored=args.stored_answers,
        export=args.export_answers,
        distill=DistillSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                weights=args.distill_weights,
                                batch_tokens=args.distill_batch_tokens if args.answers == "data" else 0),
        train=train, device=args.device, dtype=args.dtype, seed=args.seed, distill_minutes=args.distill_minutes,
        device_map=args.device_map,
    )
    return 0


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from joey.training.adapter_training import TrainSettings

    return _train(args, TrainSettings(exit_layer=args.exit_layer, mlp=not args.attention_only,
                                      draft_vocab=args.draft_vocab, epochs=args.epochs,
                                      batch_tokens=args.batch_tokens, lr=args.lr, bf16=args.bf16, seed=args.seed),
                  counts=("exit_layer",))


def _train_drafter_parser(sub: Any) -> None:
    from joey.training.jakiro_training import HeadTrainSettings

    t = HeadTrainSettings()
    p = sub.add_parser("train-drafter", help="train a Jakiro draft head by self-distillation (resumable)")
    p.add_argument("--kind", choices=["jakiro"], default="jakiro",
                   help="the draft network (Kangaroo adapters: `joey train-adapter`)")
    _train_common(p, t, "head.safetensors", 14000, 3000)
    p.add_argument("--experts", type=int, default=t.experts, help="SwiGLU experts in the head's mixture")
    p.add_argument("--intermediate", type=int, default=t.intermediate, help="each expert's width (0 = the target's)")
    p.add_argument("--init", default=None, metavar="HEAD",
                   help="continue from this head file (e.g. the shipped one, joey/heads/...): fine-tune it on "
                        "this run's data, keeping its draft vocabulary, experts and width")


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from joey.training.jakiro_training import HeadTrainSettings

    if args.experts < 2:
        raise InvalidArgumentError("--experts must be at least 2 (the contrastive branch needs two)")
    if args.intermediate < 0:
        raise InvalidArgumentError("--intermediate must be 0 (the target's width) or positive")
    return _train(args, HeadTrainSettings(draft_vocab=args.draft_vocab, experts=args.experts,
                                          intermediate=args.intermediate, epochs=args.epochs,
                                          batch_tokens=args.batch_tokens, lr=args.lr, bf16=args.bf16,
                                          seed=args.seed, init=args.init))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "bench": cmd_bench,
                "install": cmd_install,
                "train-adapter": cmd_train_adapter, "train-drafter": cmd_train_drafter}
    try:
        return handlers[args.command](args)
    except JoeyError as exc:
        print(f"joey: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
