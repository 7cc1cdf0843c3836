"""``joey train-adapter`` / ``joey train-drafter`` end to end: prompts → the target's answers → a
trained, saved draft network (a Kangaroo adapter or a Jakiro head).

The run folder holds ``data/`` (distilled shards), ``checkpoint.pt``, the trained file
(``adapter.safetensors`` or ``head.safetensors``) and ``report.json``; running the same command
again resumes whatever step was interrupted. A distillation time budget stops answering between
shards and trains on what exists; a later run with the same prompts continues the distillation.

Under ``torchrun`` / ``accelerate launch`` every rank loads the target once (on its own GPU), answers
its share of the prompts and trains its share of every batch; rank 0 alone writes the checkpoint,
the trained file and the report, and alone prints. The run folder must be shared by all ranks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from joey.errors import InvalidArgumentError
from joey.models.draft_files import model_cache_key
from joey.models.jakiro_head import load_head
from joey.training import distributed
from joey.training.adapter_training import TrainSettings, load_sequences, train_adapter
from joey.training.distill import FEATURE, DistillSettings, collect, generated, prompt_items, shard_sequences
from joey.training.jakiro_training import HeadTrainSettings, train_head
from joey.training.prompts import read_prompts
from joey.training.stored_answers import answer_or_read, export_answers, prompt_key, read_answers
from joey.training.teacher_forced import forced_batch, forced_items, read_examples

ANSWERS = ("target", "data")  # who writes the answers distilled: the target itself, or the prompt files
DATA_FOLDERS = {"target": "data", "data": "data-fixed"}  # in the run folder; training reads every one


def train_from_prompts(
    model: str | None,
    prompt_files: list[str],
    out: str | Path,
    *,
    num_prompts: int = 960,
    derived: int = 240,
    distill: DistillSettings | None = None,
    train: TrainSettings | HeadTrainSettings | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    distill_minutes: float | None = None,
    device_map: str | None = None,
    answers: str = "target",
    distill_only: bool = False,
    stored: str | Path | None = None,
    export: str | Path | None = None,
) -> dict:
    """Distill, train and save; ``train`` says which kind (default: a Kangaroo adapter). Returns the
    report (also written to ``out/report.json``; under a launcher only rank 0's is complete).

    ``answers="target"``: the target answers the prompts itself (greedy), into ``out/data``;
    ``"data"``: it reads the files' own answers (teacher forcing, ``joey.training.teacher_forced``;
    one prefill per batch), into ``out/data-fixed``. Training uses every data folder in ``out``, so
    runs of both kinds into one folder train on the union. ``distill_only`` stops after distilling.
    ``stored``: a file of the target's earlier answers (``joey.training.stored_answers``): with
    ``answers="target"`` the prompts it answers are read from it at prefill speed, the rest answered,
    so a new machine continues a distillation where the file ends; ``export``: a file to write (or
    extend) with the target's answers in ``out/data`` after distilling.

    With ``device_map`` (``auto``, ``balanced``, ...) the distillation runs the target as a transformers
    model whose layers accelerate places over the available devices and CPU memory; joey's own copy,
    which training reuses (embedding, LM head, the adapter's starting layers), still loads on ``device``.
    ``distill.weights`` other than fp32 distills with the target in that format: ``auto`` is the
    low-bit weights joey decodes with (the drafter then learns that target's features; faster where
    joey's low-bit kernel runs); ``bf16`` runs plain bf16 matrix products over the whole batch (the
    same weights, fastest on CPUs with AMX; joey's decoding bf16 path works in 16-row blocks for batch
    invariance, which distillation does not need)."""
    import joey

    if answers not in ANSWERS:
        raise InvalidArgumentError(f"answers must be one of {', '.join(ANSWERS)}")
    distill = distill or DistillSettings()
    train = train or TrainSettings()
    jakiro = isinstance(train, HeadTrainSettings)
    out = Path(out)
    # the inputs are read before any model loads: a bad file fails at once
    if stored is not None and (answers != "target" or device_map is not None):
        raise InvalidArgumentError("stored answers are the target's own, read by joey's target: they go with "
                                   "--answers target, without --device-map")
    if answers == "data":
        examples = read_examples(prompt_files, limit=num_prompts, seed=seed)
    else:
        prompts = read_prompts(prompt_files, limit=num_prompts, derived=derived, seed=seed)
    if stored is not None:
        answered, kept_answers = read_answers(stored)
    device = distributed.init(device)  # a no-op without a launcher
    if device_map is not None and distributed.world_size() > 1:
        raise InvalidArgumentError("--device-map places one target over all devices: run it in a single process")
    if device_map is not None and answers == "data":
        raise InvalidArgumentError("--device-map distills the target's own answers only (not --answers data)")
    main = distributed.is_main()
    progress = progress and main

    def float_engine():
        # the float target: its features and distributions are what the drafter learns, and its float
        # layers are where a Kangaroo adapter starts; the result works on low-bit targets unchanged
        return joey.load(model, device=device, dtype=dtype, adapter=False, head=False, progress=progress,
                         weights="fp32")

    if distill.weights == "bf16":  # plain bf16 products over whole batches (not the 16-row decode path)
        engine = joey.load(model, device=device, dtype="bf16", adapter=False, head=False, progress=progress,
                           prepack=False)
    elif distill.weights != "fp32" and device_map is None:
        engine = joey.load(model, device=device, dtype=dtype, adapter=False, head=False, progress=progress,
                           weights=distill.weights)
    else:
        engine = float_engine()
    layers = engine.model.cfg.num_layers
    if jakiro or answers == "data":
        # features only: a Kangaroo adapter's states after its exit layer are computed from the
        # tokens when it trains (load_sequences), so one teacher-forced distillation serves both
        # drafters and every exit layer
        distill = replace(distill, exit_layers=(), features=True)
    if jakiro:
        if train.init:  # a wrong or foreign head file fails now, not after the distillation
            load_head(train.init, engine.model)
    else:
        if not 1 <= train.exit_layer < layers:
            raise InvalidArgumentError(f"--exit-layer must be in [1, {layers - 1}] for this {layers}-layer model")
        if answers == "target":  # generating keeps the states of a few exit layers at no extra cost
            exits = tuple(sorted({e for e in distill.exit_layers if e < layers} | {train.exit_layer}))
            distill = replace(distill, exit_layers=exits)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    budget = None if distill_minutes is None else 60 * distill_minutes
    target, answer = engine.model, None
    if answers == "data":
        tok = engine.tokenizer
        items = forced_items(engine.encode, lambda text: tok(text, add_special_tokens=False).input_ids, examples,
                             tok.eos_token_id, distill)
        answer = forced_batch
    else:
        items = prompt_items(engine.encode, prompts, distill.max_prompt_tokens)
    if stored is not None:
        if answered.get("target") != model_cache_key(engine.model):
            raise InvalidArgumentError(f"{stored} holds answers of {answered.get('model')}, not of {engine.name}")
        if not any(prompt_key(it.ids) in kept_answers for it in items):
            raise InvalidArgumentError(f"none of these prompts has an answer in {stored}: give the --prompts, "
                                       "--num-prompts, --derived and --seed of the run that answered them")
        answer = answer_or_read(kept_answers)
    if device_map is not None:
        from joey.training.hf_target import answer_batch_hf, load_hf_target

        target, answer = load_hf_target(engine.source, device_map), generated(answer_batch_hf)
    collect(target, items, engine.eos_ids, out / DATA_FOLDERS[answers], distill, progress, budget, answer)
    del target  # the answering copy is only for distilling
    if export is not None and main:
        own = sorted((out / DATA_FOLDERS["target"]).glob("shard_*.pt"))
        if not own:
            raise InvalidArgumentError(f"no answers of the target's own in {out / DATA_FOLDERS['target']} to export")
        head = export_answers(own, Path(export), engine.name, model_cache_key(engine.model))
        print(f"exported {head['answers']} answers ({head['answer_tokens']} tokens) to {export}")
    shards = [p for folder in DATA_FOLDERS.values() for p in sorted((out / folder).glob("shard_*.pt"))]
    if not shards:
        raise InvalidArgumentError("no distilled data yet: give the distillation more time (--distill-minutes)")
    t1 = time.perf_counter()
    report = {"model": engine.name, "kind": "jakiro" if jakiro else "kangaroo", "answers": answers,
              "items": len(items), "distill_settings": asdict(distill), "distill_seconds_this_run": round(t1 - t0, 1)}
    if distill_only:
        report.update(shards=len(shards), **data_size(shards))
        if main:
            (out / "distill-report.json").write_text(json.dumps(report, indent=2))
            print(f"distilled: {report['sequences']} sequences, {report['answer_tokens']} answer tokens "
                  f"in {len(shards)} shards under {out}")
        return report
    # a Kangaroo adapter starts from the target's float layers and trains on the states after its exit
    # layer, computed from the tokens (load_sequences): the bf16 copy that distilled holds those
    # layers and computes the states at AMX speed (fp32 took ~10x longer on the 1.5B), so it stays
    keep = not jakiro and distill.weights == "bf16" and device_map is None
    if (distill.weights != "fp32" or device_map is not None) and not keep:
        del engine
        if jakiro:
            # a head reads only the target's embeddings and LM-head rows (its features come from the
            # shards), which every format gives exactly: the one joey decodes with is the lightest
            engine = joey.load(model, device=device, dtype=dtype, adapter=False, head=False, progress=progress)
        else:
            # float layers, where the adapter starts, unpacked: no second copy of a large target
            engine = joey.load(model, device=device, dtype=dtype, adapter=False, head=False, progress=progress,
                               weights="fp32", prepack=False)
    seqs = load_sequences(shards, FEATURE if jakiro else train.exit_layer, engine.model)
    answer_tokens = sum(len(s.ids) - s.prompt_len for s in seqs)
    report.update(sequences=len(seqs), answer_tokens=answer_tokens, train_settings=asdict(train))
    if jakiro:
        report.update(_train_jakiro(engine, seqs, out, train, progress, answer_tokens))
    else:
        report.update(_train_kangaroo(engine, seqs, out, train, progress, len(items)))
    report["train_seconds"] = round(time.perf_counter() - t1, 1)
    if main:
        (out / "report.json").write_text(json.dumps(report, indent=2))
    distributed.barrier()  # no rank finishes before the trained file and the report are written
    return report


def data_size(shards: list[Path]) -> dict:
    """Sequences and answer tokens (those with soft labels) held in ``shards``."""
    seqs = tokens = 0
    for ids, prompt_len in shard_sequences(shards):
        seqs += 1
        tokens += len(ids) - prompt_len
    return {"sequences": seqs, "answer_tokens": tokens}


def _log(message: str) -> None:
    """Training logs: rank 0's only."""
    if distributed.is_main():
        print(message)


def _train_kangaroo(engine, seqs, out: Path, train: TrainSettings, progress: bool, prompts: int) -> dict:
    from joey.models.adapter import save_adapter

    adapter, ev = train_adapter(engine.model, seqs, out, train, progress, _log)
    if ev is None:  # not rank 0: it saves and reports
        return {}
    save_adapter(adapter, engine.model, out / "adapter.safetensors", {
        "base_model": engine.name, "train_settings": asdict(train), "prompts": prompts,
        "heldout_agreement": round(ev.agreement, 4),
    })
    print(f"adapter saved to {out / 'adapter.safetensors'}: held-out top-1 agreement {ev.agreement:.1%}; "
          f"simulated mean accepted tokens (γ={ev.max_draft}) "
          + ", ".join(f"η={k}: {v:.2f}" for k, v in ev.mean_accepted.items()))
    return {
        "heldout_top1_agreement": ev.agreement,
        "heldout_positions": ev.positions,
        "simulated_mean_accepted_tokens": {str(k): v for k, v in ev.mean_accepted.items()},
        "max_draft": ev.max_draft,
        "adapter": str(out / "adapter.safetensors"),
    }


def _train_jakiro(engine, seqs, out: Path, train: HeadTrainSettings, progress: bool, answer_tokens: int) -> dict:
    from joey.models.jakiro_head import save_head

    head, ev = train_head(engine.model, seqs, out, train, progress, _log)
    if ev is None:  # not rank 0: it saves and reports
        return {}
    save_head(head, engine.model, out / "head.safetensors", {
        "base_model": engine.name, "train_settings": asdict(train), "answer_tokens": answer_tokens,
        "heldout_agreement": round(ev.agreement, 4), "simulated_tau_chain": round(ev.chain_tau, 3),
        "simulated_tau_tree": round(ev.tree_tau, 3),
    })
    print(f"head saved to {out / 'head.safetensors'}: held-out top-1 {ev.agreement:.1%} "
          f"(t+2 branch {ev.agreement_after:.1%}); simulated mean accepted tokens: chain of {ev.depth} "
          f"{ev.chain_tau:.2f}, tree of {ev.tree_nodes} nodes {ev.tree_tau:.2f}")
    return {**asdict(ev), "head": str(out / "head.safetensors")}
