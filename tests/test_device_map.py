"""``--device-map``: the distillation target loaded by transformers/accelerate (here ``device_map="auto"``
on a CPU-only machine puts it all on the CPU) writes the shards joey's own decoder writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import joey
from joey.models.registry import ModelSource
from joey.training.distill import FEATURE, DistillSettings, answer_batch
from joey.training.hf_target import answer_batch_hf, load_hf_target


@pytest.fixture(scope="module")
def folder(tmp_path_factory, default_source) -> Path:
    from conftest import make_tiny

    return make_tiny(tmp_path_factory.mktemp("devmap") / "tiny", "llama", default_source.folder)


def test_device_mapped_target_answers_as_joey_does(folder):
    engine = joey.load(str(folder), device="cpu", prepack=False, progress=False, adapter=False, head=False,
                       weights="fp32")
    hf = load_hf_target(ModelSource("tiny", folder), "auto")
    # prompts of different lengths (padding on both sides) and an early end-of-sequence for one row
    prompts = [engine.encode(f"Tell me about the number {i}." + " Please." * i) for i in range(3)]
    s = DistillSettings(exit_layers=(1, 2), max_new_tokens=8, top_k=8, features=True)
    eos = frozenset(engine.eos_ids)
    ref = answer_batch(engine.model, prompts, eos, s)
    mine = answer_batch_hf(hf, prompts, eos, s)
    stop = ref[0]["ids"][len(prompts[0]) + 2].item()  # rows that stop at different steps
    short = answer_batch(engine.model, prompts, eos | {stop}, s), answer_batch_hf(hf, prompts, eos | {stop}, s)
    for a, b in [*zip(ref, mine, strict=True), *zip(*short, strict=True)]:
        assert a["ids"].tolist() == b["ids"].tolist() and a["prompt_len"] == b["prompt_len"]
        assert a["hidden"].keys() == b["hidden"].keys() == {1, 2, FEATURE}
        for k in a["hidden"]:
            assert a["hidden"][k].shape == b["hidden"][k].shape == (len(a["ids"]) - 1, 64)
            # stored in fp16: equal to within one fp16 rounding of the float32 values
            assert torch.allclose(a["hidden"][k].float(), b["hidden"][k].float(), atol=1e-3, rtol=1e-3), k
        assert torch.equal(a["top_ids"], b["top_ids"])
        assert torch.allclose(a["top_p"].float(), b["top_p"].float(), atol=1e-4)
    assert len({len(r["ids"]) for r in short[0]}) > 1


def test_train_adapter_with_device_map(folder, tmp_path):
    from joey.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say something about number {i}.", "output":
                                             f"Number {i} is a number. " * 20}) for i in range(6)))
    out = tmp_path / "run"
    assert main(["train-adapter", "--model", str(folder), "--prompts", str(prompts), "--out", str(out),
                 "--device", "cpu", "--device-map", "auto", "--num-prompts", "6", "--derived", "1",
                 "--max-new-tokens", "4", "--batch-size", "3", "--exit-layer", "1", "--draft-vocab", "512",
                 "--epochs", "1", "--batch-tokens", "256"]) == 0
    assert (out / "adapter.safetensors").exists()
    assert json.loads((out / "report.json").read_text())["sequences"] == 6


@torch.inference_mode()
def test_hidden_state_indices_match_joeys_layers_in_float32(folder):
    """transformers' ``hidden_states[l]`` is the output of joey's layer l, and the last entry is after
    the final norm (joey's feature), to float32 tolerance."""
    engine = joey.load(str(folder), device="cpu", prepack=False, progress=False, adapter=False, head=False,
                       weights="fp32")
    model, hf = engine.model, load_hf_target(ModelSource("tiny", folder), "auto")
    ids = torch.tensor([engine.encode("Count to three.")])
    t = ids.shape[1]
    out = hf(input_ids=ids, output_hidden_states=True)
    cache, positions = model.new_cache(1, t + 1), torch.arange(t)[None]
    x, prev = model.embed(ids), 0
    for end in range(1, model.cfg.num_layers + 1):
        x = model.run_layers(x, positions, cache, 0, t, None, start=prev, end=end)
        prev = end
        if end < model.cfg.num_layers:
            assert torch.allclose(x, out.hidden_states[end], atol=1e-4, rtol=1e-4), end
    assert torch.allclose(model.model.norm(x), out.hidden_states[-1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(model.head(model.model.norm(x)), out.logits, atol=1e-4, rtol=1e-4)
