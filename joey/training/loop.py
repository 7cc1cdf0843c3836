"""The optimisation loop shared by draft-network training (Kangaroo adapters, Jakiro heads): AdamW
with warm-up and a cosine schedule, value clipping, a progress bar, checkpoints every 200 steps and
at the end, resume from a checkpoint written with the same settings, and an evaluation per epoch.

Under a launcher the network trains as DistributedDataParallel: every rank runs the same plan of
global batches (a step's loss is the rank's share, see ``joey.training.distributed.share``), rank 0
alone writes checkpoints, evaluates and shows progress. The plan does not depend on the world size,
so a checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from joey.training import distributed

CHECKPOINT_EVERY = 200


def fit(
    net: torch.nn.Module,
    plan: Sequence[Sequence[Any]],  # per epoch: its batches, in order
    # (batch, step, the module to call: ``net`` or its DDP wrapper) → (loss, value to show)
    step_loss: Callable[[Any, int, torch.nn.Module], tuple[torch.Tensor, float]],
    end_of_epoch: Callable[[int], None],  # after each epoch that ran in this call (1-based epoch), rank 0 only
    *,
    lr: float,
    weight_decay: float,
    clip: float,
    warmup: int,
    checkpoint: Path,
    settings: dict,  # a resume needs the same settings
    kind: str,
    desc: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
    find_unused: bool = False,  # DDP: some parameters may get no gradient in a step (e.g. unrouted experts)
) -> bool:
    """Train ``net`` through ``plan``; returns whether any epoch finished in this call."""
    main = distributed.is_main()
    if not main:
        log = _quiet
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    total = sum(len(p) for p in plan)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / max(1, warmup))
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / max(1, total)))))
    )
    done = 0
    if checkpoint.exists():
        # on the CPU first: every rank reads it, whatever device rank 0 saved it from
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        if state.get("settings") == settings and state.get("kind", "kangaroo") == kind:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            done = state["step"]
            log(f"resuming from {checkpoint} at step {done}/{total}")
        else:
            log(f"{checkpoint} was written with other settings; starting over")
    # wrapped after the resume: DDP starts from rank 0's weights, which every rank loaded anyway
    call = distributed.wrap(net, find_unused)
    bar = tqdm(total=total, initial=done, desc=desc, unit="step", disable=not (progress and main))
    step, ema, ran = 0, None, False
    for epoch, batches in enumerate(plan):
        for batch in batches:
            step += 1
            if step <= done:
                continue
            loss, shown = step_loss(batch, step, call)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(net.parameters(), clip)
            opt.step()
            sched.step()
            ema = shown if ema is None else 0.95 * ema + 0.05 * shown
            bar.set_postfix(epoch=epoch + 1, loss=f"{ema:.3f}")
            bar.update(1)
            if main and (step % CHECKPOINT_EVERY == 0 or step == total):
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"kind": kind, "net": net.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step, "settings": settings}, tmp)
                tmp.replace(checkpoint)
        if step <= done:  # an epoch finished before a resume: its weights are gone, nothing to report
            continue
        ran = True
        if main:  # the other ranks go on and wait for rank 0 in the next step's gradient exchange
            net.eval()
            end_of_epoch(epoch + 1)
            net.train()
    bar.close()
    distributed.barrier()  # the last checkpoint is written before any rank moves on
    net.eval()
    return ran


def _quiet(message: str) -> None:
    """The log of ranks other than 0: one voice is enough."""
