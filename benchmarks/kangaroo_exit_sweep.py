"""Choose a Kangaroo adapter's exit layer by measurement: for each exit layer, train an adapter on a
slice of a distillation run's shards, then report its held-out top-1 agreement and simulated mean
accepted tokens τ (by confidence threshold η), and what one draft token costs on the machine at hand
(the target's first layers in the weights joey decodes with, the adapter and the draft-vocabulary
head) as a share of one target step.

A shallow exit is cheap per draft token and accepted less often; a deep one the reverse. The expected
gain of a chain that accepts τ tokens per step with γ drafts is roughly τ / (1 + γ·c + v), c the
draft share and v the extra verify cost, so the table prints τ and c side by side.

    python benchmarks/kangaroo_exit_sweep.py --model qwen2.5-coder-1.5b-instruct \\
        --data ~/.cache/joey/train/qwen2.5-coder-1.5b --shards 120 --layers 1 2 3 4 --epochs 2

The shards are a ``joey train-drafter`` / ``train-adapter`` run's (``--answers data`` needs no states
of any exit layer: they are computed here from the tokens with the bf16 target).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import joey
from joey.budget import CONTEXT, measure
from joey.drafters.kangaroo import KangarooDraft
from joey.measurements import cpu_name
from joey.models.adapter import KangarooAdapter, save_adapter
from joey.training.adapter_training import TrainSettings, load_sequences, train_adapter
from joey.training.run import DATA_FOLDERS

sys.path.insert(0, str(Path(__file__).parent))
from kangaroo_cost import median_ms  # noqa: E402  (benchmarks/ is not a package: the same timing loop)


def draft_token_ms(model, adapter: KangarooAdapter, context: int = CONTEXT, repeats: int = 30) -> float:
    """Median ms of one draft token: layers [0, l), the adapter and the draft-vocabulary head, for one
    token after ``context`` cached ones (the budget's target step is measured at the same context)."""
    draft = KangarooDraft.build(model, adapter)
    layer = adapter.exit_layer
    dev = model.device
    ids = torch.randint(100, 1000, (1, context + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    pos = torch.arange(context + 1, device=dev)[None]
    shallow = model.new_cache(1, context + 1, layers=layer)
    acache = draft.adapter.new_cache(1, context + 1)

    def one_draft() -> None:
        x = model.run_layers(model.embed(ids[:, context:]), pos[:, context:], shallow, context, context + 1, None,
                             end=layer)
        cos, sin = model.rope(pos[:, context:])
        h = draft.adapter(x.reshape(1, -1), (1, 1), cos, sin, acache, context, context + 1, None)
        draft.logits(h)

    with torch.inference_mode():
        # the context first: both caches hold ``context`` positions before the timed token
        x = model.run_layers(model.embed(ids[:, :context]), pos[:, :context], shallow, 0, context, None, end=layer)
        cos, sin = model.rope(pos[:, :context])
        draft.adapter(x.reshape(context, -1), (1, context), cos, sin, acache, 0, context, None)
        return median_ms(one_draft, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a training run folder (its data/ and data-fixed/ shards)")
    ap.add_argument("--shards", type=int, default=120, help="the first N shards (a slice: the sweep is a comparison)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--mlp", action="store_true", help="adapters with the target layer's MLP (default: attention only)")
    ap.add_argument("--out", default="kangaroo_exit_sweep.json")
    ap.add_argument("--save", default=None, metavar="DIR", help="also save each adapter as DIR/exit<l>.safetensors")
    args = ap.parse_args()
    shards = [p for folder in DATA_FOLDERS.values() for p in sorted((Path(args.data) / folder).glob("shard_*.pt"))]
    if not shards:
        sys.exit(f"kangaroo_exit_sweep.py: error: no shards under {args.data}/data*/")
    shards = shards[: args.shards]
    # bf16 layers compute the exit states fast (AMX) and are where the adapter starts; the decoding
    # engine (joey's low-bit weights) is what a draft token costs at inference
    trainer = joey.load(args.model, dtype="bf16", adapter=False, head=False, prepack=False)
    decoder = joey.load(args.model, adapter=False, head=False)
    step_ms = measure(decoder.model, (1,), repeats=30).ms[0]  # one target step, after CONTEXT cached tokens
    rows = []
    for layer in args.layers:
        t0 = time.perf_counter()
        seqs = load_sequences(shards, layer, trainer.model)
        settings = TrainSettings(exit_layer=layer, mlp=args.mlp, draft_vocab=args.draft_vocab, epochs=args.epochs,
                                 bf16=True)
        with tempfile.TemporaryDirectory() as tmp:
            adapter, ev = train_adapter(trainer.model, seqs, Path(tmp), settings)
        del seqs
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            save_adapter(adapter, trainer.model, Path(args.save) / f"exit{layer}.safetensors", {
                "base_model": trainer.name, "train_settings": asdict(settings), "shards": len(shards),
                "heldout_agreement": round(ev.agreement, 4)})
        adapter = adapter.to(decoder.model.device, decoder.model.dtype)
        draft_ms = draft_token_ms(decoder.model, adapter)
        rows.append({"exit_layer": layer, "top1": ev.agreement, "tau": {str(k): v for k, v in ev.mean_accepted.items()},
                     "draft_ms": draft_ms, "step_ms": step_ms, "draft_share": draft_ms / step_ms,
                     "seconds": time.perf_counter() - t0})
        print(f"exit layer {layer}: held-out top-1 {ev.agreement:.1%}, τ "
              + ", ".join(f"η={k}: {v:.2f}" for k, v in ev.mean_accepted.items())
              + f"; a draft token {draft_ms:.2f} ms = {draft_ms / step_ms:.1%} of a {step_ms:.1f} ms step", flush=True)
    report = {"model": args.model, "cpu": cpu_name(), "shards": len(shards), "settings": vars(args),
              "train_settings": asdict(settings), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{cpu_name()}, {len(shards)} shards, {args.epochs} epochs, draft vocabulary {args.draft_vocab}")
    print("| exit layer | held-out top-1 | τ (η=0) | τ (η=0.6) | draft token / target step |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['exit_layer']} | {r['top1']:.1%} | {r['tau']['0.0']:.2f} | {r['tau']['0.6']:.2f} | "
              f"{r['draft_ms']:.2f} / {r['step_ms']:.1f} ms ({r['draft_share']:.1%}) |")


if __name__ == "__main__":
    main()
