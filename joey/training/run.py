"""``joey train-adapter`` end to end: prompts → the target's answers → a trained, saved adapter.

The run folder holds ``data/`` (distilled shards), ``checkpoint.pt``, ``adapter.safetensors`` and
``report.json``; running the same command again resumes whatever step was interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from joey.errors import InvalidArgumentError
from joey.training.adapter_training import TrainSettings, load_sequences, train_adapter
from joey.training.distill import DistillSettings, collect
from joey.training.prompts import read_prompts


def train_from_prompts(
    model: str | None,
    prompt_files: list[str],
    out: str | Path,
    *,
    num_prompts: int = 960,
    derived: int = 240,
    distill: DistillSettings | None = None,
    train: TrainSettings | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Distill, train and save; returns the report (also written to ``out/report.json``)."""
    import joey

    distill = distill or DistillSettings()
    train = train or TrainSettings()
    out = Path(out)
    prompts = read_prompts(prompt_files, limit=num_prompts, derived=derived, seed=seed)  # fails before the load
    engine = joey.load(model, device=device, dtype=dtype, adapter=False, progress=progress)
    layers = engine.model.cfg.num_layers
    if not 1 <= train.exit_layer < layers:
        raise InvalidArgumentError(f"--exit-layer must be in [1, {layers - 1}] for this {layers}-layer model")
    exits = tuple(sorted({e for e in distill.exit_layers if e < layers} | {train.exit_layer}))
    if exits != distill.exit_layers:
        distill = DistillSettings(**{**asdict(distill), "exit_layers": exits})
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards = collect(engine.model, engine.encode, prompts, engine.eos_ids, out / "data", distill, progress)
    t1 = time.perf_counter()
    seqs = load_sequences(shards, train.exit_layer)
    adapter, ev = train_adapter(engine.model, seqs, out, train, progress)
    t2 = time.perf_counter()
    from joey.models.adapter import save_adapter

    save_adapter(adapter, engine.model, out / "adapter.safetensors", {
        "base_model": engine.name, "train_settings": asdict(train), "prompts": len(prompts),
        "heldout_agreement": round(ev.agreement, 4),
    })
    report = {
        "model": engine.name,
        "prompts": len(prompts),
        "sequences": len(seqs),
        "distill_settings": asdict(distill),
        "train_settings": asdict(train),
        "distill_seconds": round(t1 - t0, 1),
        "train_seconds": round(t2 - t1, 1),
        "heldout_top1_agreement": ev.agreement,
        "heldout_positions": ev.positions,
        "simulated_mean_accepted_tokens": {str(k): v for k, v in ev.mean_accepted.items()},
        "max_draft": ev.max_draft,
        "adapter": str(out / "adapter.safetensors"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"adapter saved to {out / 'adapter.safetensors'}: held-out top-1 agreement {ev.agreement:.1%}; "
          f"simulated mean accepted tokens (γ={ev.max_draft}) "
          + ", ".join(f"η={k}: {v:.2f}" for k, v in ev.mean_accepted.items()))
    return report
