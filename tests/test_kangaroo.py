"""Kangaroo: the early-exit adapter drafter is lossless, rolls its caches back correctly, handles
the all-accepted step, and refuses adapters that belong to another model."""

from __future__ import annotations

import json

import pytest
import torch

import joey
from joey.config import SamplingParams
from joey.drafters import KangarooDraft, KangarooDrafter
from joey.engine import Engine
from joey.errors import ModelFormatError
from joey.models.adapter import KangarooAdapter, load_adapter, save_adapter

PROMPTS = ["Hello there, how are you today?", "Write a poem about cats and dogs.", "Hi"]


def _engine(folder, deep_scale: float | None, vocab: torch.Tensor | None = None, seed: int = 0) -> Engine:
    """A tiny model with a Kangaroo adapter at exit layer 1.

    ``deep_scale`` scales what layers >= 1 add to the residual stream; with 0 they add nothing and
    an adapter whose attention outputs zero drafts exactly the target's distribution.
    """
    eng = joey.load(str(folder), device="cpu", prepack=False, progress=False, adapter=False)
    model = eng.model
    vocab = torch.arange(model.cfg.vocab_size) if vocab is None else vocab
    with torch.no_grad():
        if deep_scale is not None:
            for layer in model.model.layers[1:]:
                layer.self_attn.o_proj.weight.mul_(deep_scale)
                layer.mlp.down_proj.weight.mul_(deep_scale)
        torch.manual_seed(seed)
        adapter = KangarooAdapter.initialized_from(model, 1, vocab)
        if deep_scale == 0.0:
            adapter.self_attn.o_proj.weight.zero_()
    return Engine(model, eng.tokenizer, eng.source, adapter=adapter)


@pytest.fixture(scope="module")
def exact(tiny_folder) -> Engine:
    return _engine(tiny_folder, 0.0)


@pytest.fixture(scope="module")
def partial(tiny_folder) -> Engine:
    return _engine(tiny_folder, 0.3)


@pytest.fixture(scope="module")
def weak(tiny_folder) -> Engine:
    vocab = torch.randperm(49152, generator=torch.Generator().manual_seed(0))[:3000].sort().values
    return _engine(tiny_folder, None, vocab)


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_greedy_equals_ar_single(exact, partial, weak, threshold):
    for eng in (exact, partial, weak):
        for prompt in PROMPTS:
            ar = eng.generate(prompt, max_new_tokens=30, ignore_eos=True, method="ar")
            kg = eng.generate(prompt, max_new_tokens=30, ignore_eos=True, method="kangaroo", threshold=threshold,
                              max_draft=4)
            assert kg.token_ids == ar.token_ids
            assert kg.text == ar.text


def test_greedy_equals_ar_ragged_batch(partial, weak):
    for eng in (partial, weak):
        ar = [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=25, ignore_eos=True, method="ar")]
        kg = eng.generate(PROMPTS, max_new_tokens=25, ignore_eos=True, method="kangaroo", threshold=0.3)
        assert [g.token_ids for g in kg] == ar


def test_partial_drafts_are_partly_accepted(partial):
    # adaptive=False: every step drafts, whatever the budget would make of the first steps' luck
    g = partial.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True, method="kangaroo", threshold=0.0,
                         adaptive=False)
    assert 1.0 < g.stats.mean_accepted_tokens < 5.0
    assert g.stats.draft_time_s > 0 and g.stats.verify_time_s > 0


def test_all_accepted_steps(exact):
    """Every draft is accepted: the next step must feed the adapter the last draft and the bonus."""
    ar = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="ar")
    g = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="kangaroo", threshold=0.0,
                       max_draft=4, tree_nodes=0, adaptive=False)
    assert g.token_ids == ar.token_ids
    assert g.stats.acceptance_by_position == (1.0, 1.0, 1.0, 1.0)
    assert g.stats.steps == 7  # the prefill's token, then 6 steps of 4 drafts + 1 bonus
    assert g.stats.draft_tokens == 6 * 4


def test_tree_follows_accepted_paths_off_the_first_branch(exact):
    """A top-3 tree: accepted paths run through nodes that are not the tree's first ones, so the
    target's and the drafter's caches must be compacted, and the output stays AR's."""
    ar = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="ar")
    g = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="kangaroo", threshold=0.0,
                       max_draft=4, tree_nodes=12, tree_topk=3, adaptive=False)
    assert g.token_ids == ar.token_ids
    assert g.stats.draft_tokens == 12 * (g.stats.steps - 1)  # every step drafted a full tree
    assert g.stats.acceptance_by_position[0] == 1.0  # an exact drafter's top-1 child is the target's
    assert g.stats.mean_accepted_tokens > 2.0


def test_confidence_threshold_stops_drafting(exact):
    never = exact.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True, method="kangaroo", threshold=1.0,
                           adaptive=False)
    assert never.stats.acceptance_by_position[0] == 1.0
    assert len(never.stats.acceptance_by_position) == 1  # stopped after the first draft every step


def test_drafter_rollback_matches_fresh_drafter(partial):
    """After any accept count, a reused drafter proposes exactly what a fresh one does."""
    kd = partial.kangaroo
    params = SamplingParams(temperature=0.0)
    ctx = partial.encode(PROMPTS[1])
    torch.set_grad_enabled(False)  # the engine drafts under inference mode too
    reused = KangarooDrafter(kd, params, None, 256, threshold=0.0)
    first = reused.propose(ctx, 5)
    for keep in range(len(first.tokens) + 1):  # accept `keep` drafts, then a different bonus token
        nxt = ctx + list(first.tokens[:keep]) + [17 + keep]
        again = reused.propose(nxt, 3)
        fresh = KangarooDrafter(kd, params, None, 256, threshold=0.0).propose(nxt, 3)
        assert again.tokens == fresh.tokens
        # equal up to float rounding (one-token vs several-token matmuls)
        torch.testing.assert_close(again.hidden, fresh.hidden, rtol=1e-4, atol=1e-4)
        reused.propose(ctx, 5)  # back to the original context for the next case
    torch.set_grad_enabled(True)


def test_first_draft_takes_the_prompt_from_the_prefill(partial, monkeypatch):
    """The prefill hands Kangaroo the prompt's layer-l states and first layers' K/V: its first draft
    runs the shallow layers on the pending token only, and proposes what a drafter that ran them over
    the whole prompt proposes. Splitting the prefill at layer l leaves the target's features as they were."""
    from joey.target_runner import TargetRunner

    kd, model = partial.kangaroo, partial.model
    ids = partial.encode(PROMPTS[1])
    runner = TargetRunner(model)
    params = SamplingParams(temperature=0.0)
    with torch.inference_mode():
        whole, none = runner.prefill(model.new_cache(1, 256), [ids], False)
        cache = model.new_cache(1, 256)
        split, shallow = runner.prefill(cache, [ids], False, split=kd.exit_layer)
        assert none == [] and len(shallow) == 1 and shallow[0].shape == (len(ids), model.cfg.hidden_size)
        assert torch.equal(whole[0], split[0])
        shallow_tokens = []
        run = model.run_layers_rows

        def counting(hidden, positions, rows, start=0, end=None):
            if start == 0 and end == kd.exit_layer:
                shallow_tokens.append(len(hidden))
            return run(hidden, positions, rows, start, end)

        monkeypatch.setattr(model, "run_layers_rows", counting)
        context = ids + [int(model.head(split[0][-1]).argmax())]
        taken = KangarooDrafter(kd, params, None, 256, threshold=0.0)
        assert taken.prompt_layer == kd.exit_layer
        taken.take_prompt(ids, shallow[0], cache, 0)
        got = taken.propose(context, 4)
        assert shallow_tokens[0] == 1  # the pending token only
        shallow_tokens.clear()
        fresh = KangarooDrafter(kd, params, None, 256, threshold=0.0).propose(context, 4)
        assert shallow_tokens[0] == len(context)
    assert len(got.tokens) == 4 and got.tokens == fresh.tokens
    torch.testing.assert_close(got.hidden, fresh.hidden, rtol=1e-4, atol=1e-4)


def test_sampling_first_drafted_position_matches_ar(partial):
    from conftest import first_token_histogram, total_variation

    n, kw = 200, dict(max_new_tokens=2, temperature=1.0, top_k=4, ignore_eos=True)
    a = first_token_histogram(partial, "alpha beta", "ar", n, **kw)
    b = first_token_histogram(partial, "alpha beta", "kangaroo", n, **kw)
    tv = total_variation(a, b, n)
    assert tv < 0.2, (a, b)


def test_adapter_file_roundtrip_and_mismatches(tmp_path, partial, tiny_folder, default_source):
    from conftest import make_tiny

    path = tmp_path / "a.safetensors"
    save_adapter(partial.kangaroo.adapter, partial.model, path)
    loaded = load_adapter(path, partial.model)
    assert loaded.exit_layer == 1
    assert torch.equal(loaded.vocab, partial.kangaroo.adapter.vocab)
    # same shapes, other weights: a different model
    other = make_tiny(tmp_path / "other", "qwen2" if "qwen2" in tiny_folder.name else "llama",
                      default_source.folder, seed=3)
    other_model = joey.load(str(other), device="cpu", prepack=False, progress=False, adapter=False).model
    with pytest.raises(ModelFormatError, match="different model"):
        load_adapter(path, other_model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError):
        load_adapter(bad, partial.model)
    with pytest.raises(ModelFormatError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors", partial.model)


def test_adapter_for_other_hidden_size_is_rejected(tmp_path, partial, default_engine):
    path = tmp_path / "tiny.safetensors"
    save_adapter(partial.kangaroo.adapter, partial.model, path)
    with pytest.raises(ModelFormatError, match="hidden_size"):
        load_adapter(path, default_engine.model)


def test_kangaroo_needs_an_adapter(tiny_engine):
    with pytest.raises(joey.errors.InvalidArgumentError, match="adapter"):
        tiny_engine.generate("Hi", method="kangaroo", max_new_tokens=4)


def test_kangaroo_draft_head_is_the_target_head_rows(partial):
    kd: KangarooDraft = partial.kangaroo
    assert torch.equal(kd.head.weight, partial.model.lm_head.weight[kd.adapter.vocab])


def test_train_adapter_end_to_end_and_resume(tmp_path, tiny_folder):
    """Distil a few prompts, train one epoch, save a loadable adapter; a second run resumes."""
    from joey.training.adapter_training import TrainSettings
    from joey.training.distill import DistillSettings
    from joey.training.run import train_from_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say something about number {i}.", "output":
                                             f"Number {i} is a number. " * 20}) for i in range(12)))
    kw = dict(num_prompts=10, derived=2, distill=DistillSettings(max_new_tokens=6, batch_size=4),
              train=TrainSettings(exit_layer=1, epochs=1, draft_vocab=512, batch_tokens=256), progress=False)
    out = tmp_path / "run"
    report = train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu", **kw)
    assert report["sequences"] == 10
    assert 0.0 <= report["heldout_top1_agreement"] <= 1.0
    assert len(list((out / "data").glob("shard_*.pt"))) == 3
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=out / "adapter.safetensors")
    assert eng.kangaroo.adapter.vocab.numel() == 512
    ar = eng.generate("Hello", max_new_tokens=12, ignore_eos=True, method="ar")
    assert eng.generate("Hello", max_new_tokens=12, ignore_eos=True, method="kangaroo").token_ids == ar.token_ids
    stamp = (out / "data" / "shard_00000.pt").stat().st_mtime_ns
    train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu", **kw)  # resumes: nothing re-distilled
    assert (out / "data" / "shard_00000.pt").stat().st_mtime_ns == stamp
    with pytest.raises(joey.errors.InvalidArgumentError, match="other prompts or settings"):
        train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu",
                           **{**kw, "distill": DistillSettings(max_new_tokens=7, batch_size=4)})


def test_train_adapter_cli_on_teacher_forced_answers_with_bf16(tmp_path, tiny_folder, capsys):
    """``joey train-adapter --answers data --distill-weights bf16 --bf16``: the files' own answers are
    distilled by the bf16 target (features only), the adapter's exit states are computed from the
    tokens by that same bf16 copy, and the saved adapter drafts losslessly."""
    from joey.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say something about number {i}.", "output":
                                             f"Number {i} is a number. " * 6}) for i in range(10)))
    out = tmp_path / "run"
    args = ["train-adapter", "--model", str(tiny_folder), "--device", "cpu", "--prompts", str(prompts),
            "--out", str(out), "--answers", "data", "--distill-weights", "bf16", "--bf16", "--num-prompts", "10",
            "--derived", "0", "--max-new-tokens", "16", "--exit-layer", "1", "--epochs", "1",
            "--draft-vocab", "256", "--batch-tokens", "256", "--attention-only"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["answers"] == "data" and report["train_settings"]["bf16"] is True
    shard = torch.load(next((out / "data-fixed").glob("shard_*.pt")), weights_only=True)[0]
    assert 1 not in shard["hidden"]  # no exit states distilled: they were computed from the tokens
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=out / "adapter.safetensors")
    assert eng.kangaroo.adapter.mlp is None and eng.kangaroo.adapter.vocab.numel() == 256
    ar = eng.generate("Hello", max_new_tokens=12, ignore_eos=True, method="ar")
    assert eng.generate("Hello", max_new_tokens=12, ignore_eos=True, method="kangaroo").token_ids == ar.token_ids
    assert main([*args[:-1], "--distill-minutes", "0"]) == 2
    assert "--distill-minutes must be positive" in capsys.readouterr().err


def test_default_model_ships_an_adapter_and_kangaroo_is_lossless(default_engine):
    """The shipped adapter loads automatically; Kangaroo equals AR on the real model."""
    assert default_engine.kangaroo is not None
    assert default_engine.default_method == "pld"  # measured fastest on Spec-Bench (README)
    prompts = ["Explain in three sentences why the sky is blue.", "Write a Python function that adds two numbers.",
               "What is 17 times 3? Think step by step."]
    steps = 0
    for prompt in prompts:
        ar = default_engine.generate(prompt, max_new_tokens=40, method="ar")
        kg = default_engine.generate(prompt, max_new_tokens=40, method="kangaroo")
        assert kg.method == "kangaroo"
        assert kg.token_ids == ar.token_ids
        steps += kg.stats.steps
        assert kg.stats.mean_accepted_tokens == pytest.approx(kg.new_tokens / kg.stats.steps)
    assert steps < 3 * 40  # the drafts saved target passes
    batch = default_engine.generate(prompts, max_new_tokens=24, method="kangaroo")
    assert [g.token_ids for g in batch] == [g.token_ids for g in default_engine.generate(prompts, max_new_tokens=24,
                                                                                          method="ar")]
