"""Training under ``torchrun``: two CPU processes (gloo) train the same adapter as one process does on
the same data and global batches, and a run interrupted after a checkpoint resumes under two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TIMEOUT = 120  # seconds per command; each takes well under a minute on two cores


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_source) -> tuple[Path, Path]:
    """A tiny llama folder both processes load, and a prompt file."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("dist")
    folder = make_tiny(root / "tiny", "llama", default_source.folder)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say something about number {i}.", "output":
                                             f"Number {i} is a number. " * 20}) for i in range(12)))
    return folder, prompts


def _args(folder: Path, prompts: Path, out: Path) -> list[str]:
    # batch_tokens 256: global batches of several sequences, a few steps per epoch
    return ["train-adapter", "--model", str(folder), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
            "--num-prompts", "10", "--derived", "2", "--max-new-tokens", "6", "--batch-size", "4",
            "--exit-layer", "1", "--draft-vocab", "512", "--epochs", "2", "--batch-tokens", "256"]


def _run(args: list[str], processes: int) -> str:
    """``joey`` in one plain process, or under torchrun with ``processes`` ranks; returns its output."""
    launch = [sys.executable, "-m", "joey"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone", "-m", "joey"]
    # one thread per process in both cases: the same arithmetic whatever the launcher
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _assert_same_adapter(a: Path, b: Path) -> None:
    """The trained weights (the checkpoints' fp32 copies) agree to float tolerance, and so do the saved
    adapters, within one fp16 rounding."""
    x = torch.load(a / "checkpoint.pt", weights_only=False)["net"]
    y = torch.load(b / "checkpoint.pt", weights_only=False)["net"]
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k].float(), y[k].float(), atol=1e-5), k
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k].float(), y[k].float(), atol=1e-5, rtol=1e-3), k


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory) -> Path:
    """The reference: the same command in one process."""
    folder, prompts = setup
    out = tmp_path_factory.mktemp("single") / "run"
    _run(_args(folder, prompts, out), 1)
    return out


def test_two_processes_train_what_one_does(setup, single, tmp_path):
    folder, prompts = setup
    out = tmp_path / "run"
    log = _run(_args(folder, prompts, out), 2)
    assert log.count("adapter saved") == 1  # rank 0 alone reports
    shards = sorted(p.name for p in (out / "data").glob("shard_*.pt"))
    assert shards == sorted(p.name for p in (single / "data").glob("shard_*.pt")) and len(shards) == 3
    for name in shards:  # each rank answered its share of the batches, exactly as one process would
        mine = torch.load(out / "data" / name, weights_only=True)
        ref = torch.load(single / "data" / name, weights_only=True)
        assert [r["ids"].tolist() for r in mine] == [r["ids"].tolist() for r in ref]
    report = json.loads((out / "report.json").read_text())
    assert report["sequences"] == 10
    _assert_same_adapter(out, single)


def test_interrupted_run_resumes_under_two_processes(setup, single, tmp_path, monkeypatch):
    """One process trains, checkpointing every step, and is stopped after its first epoch; two processes
    resume from that checkpoint and end where the uninterrupted run ended."""
    from joey.cli import main
    from joey.training import loop, run

    folder, prompts = setup
    out = tmp_path / "run"
    shutil.copytree(single / "data", out / "data")  # the same answers: this test is about training

    class Stop(Exception):
        pass

    def interrupt(message: str) -> None:
        if message.startswith("epoch 1:"):
            raise Stop

    monkeypatch.setattr(loop, "CHECKPOINT_EVERY", 1)
    monkeypatch.setattr(run, "_log", interrupt)
    with pytest.raises(Stop):
        main(_args(folder, prompts, out))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    finished = torch.load(single / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < state["step"] < finished
    assert not (out / "adapter.safetensors").exists()
    log = _run(_args(folder, prompts, out), 2)
    assert f"resuming from {out / 'checkpoint.pt'} at step {state['step']}/{finished}" in log
    _assert_same_adapter(out, single)


def test_two_processes_train_the_jakiro_head_one_process_does(setup, tmp_path):
    """train-drafter too, feature noise on: it is seeded per sequence, so the split does not change it."""
    folder, prompts = setup
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        args = _args(folder, prompts, out)
        args[0] = "train-drafter"
        args[args.index("--exit-layer") : args.index("--exit-layer") + 2] = ["--experts", "2"]
        _run(args, processes)
        runs[processes] = torch.load(out / "checkpoint.pt", weights_only=False)["net"]
    for k in runs[1]:
        assert torch.allclose(runs[1][k].float(), runs[2][k].float(), atol=1e-5), k
