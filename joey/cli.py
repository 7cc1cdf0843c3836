"""The ``joey`` command line: generate, chat, info. The only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from joey.config import SamplingParams
from joey.engine import DEFAULT_MAX_DRAFT, MAX_DRAFT_LIMIT, METHODS
from joey.errors import InvalidArgumentError, JoeyError, PromptError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"joey: error: {message} (see {self.prog} --help)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="HF folder, .gguf file, hub id, or 'default' (SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--method", default="ar", choices=list(METHODS),
                   help="ar = autoregressive; pld = prompt lookup; sps = separate draft model (all lossless)")
    p.add_argument("--draft-model", default=None, help="small model sharing the tokenizer (for --method sps)")
    p.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="most draft tokens per step")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="joey", description="Lossless speculative decoding for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a reply to one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="a prompt; several prompts run as one batch")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")

    chat = sub.add_parser("chat", help="interactive multi-turn chat (streaming)")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")

    info = sub.add_parser("info", help="show the model, device, dtype and cache")
    _model_args(info)
    return parser


def _params(args: argparse.Namespace) -> SamplingParams:
    if args.method == "sps" and not args.draft_model:
        raise InvalidArgumentError("--method sps needs --draft-model (a smaller model sharing the tokenizer)")
    if not 1 <= args.max_draft <= MAX_DRAFT_LIMIT:
        raise InvalidArgumentError(f"--max-draft must be in [1, {MAX_DRAFT_LIMIT}], got {args.max_draft}")
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _load(args: argparse.Namespace):
    import joey

    draft = getattr(args, "draft_model", None)
    return joey.load(args.model, device=args.device, dtype=args.dtype, draft_model=draft)


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
    for event in engine.stream(batch, params, method=args.method, chat=not args.raw, max_draft=args.max_draft):
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
                "finish_reason": g.finish_reason,
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
        for event in engine.stream(history, params, method=args.method, max_draft=args.max_draft):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            reply = event.generation or reply
        print()
        assert reply is not None
        print(f"[{reply.new_tokens} tokens, {reply.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.text})


def cmd_info(args: argparse.Namespace) -> int:
    from joey.models.llama import param_count
    from joey.models.registry import cache_dir

    engine = _load(args)
    cfg = engine.model.cfg
    info = {
        "model": engine.name,
        "folder": str(engine.source.folder) if engine.source else None,
        "gguf": str(engine.source.gguf) if engine.source and engine.source.gguf else None,
        "architecture": cfg.architecture,
        "parameters": param_count(engine.model),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "cache": str(cache_dir()),
    }
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info}
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
