"""Jakiro: the MoE feature head drafts trees that are lossless (greedy and sampled, batch 1 and
ragged batches, with and without the retrieval branch), reads exactly the target's features, hangs
the hybrid last level under the right nodes, and its files and training behave."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import joey
from joey.config import SamplingParams
from joey.drafters import JakiroDraft, JakiroDrafter
from joey.drafters.draft_head import DraftVocabHead
from joey.drafters.jakiro import Scored
from joey.drafters.tree import DraftTree
from joey.engine import Engine
from joey.errors import InvalidArgumentError, ModelFormatError
from joey.models.adapter import KangarooAdapter, save_adapter
from joey.models.jakiro_head import JakiroHead, load_head, save_head

PROMPTS = ["Hello there, how are you today?", "Write a poem about cats and dogs.", "Hi"]


def _engine(folder, scale: float | None, seed: int = 0) -> Engine:
    """A tiny model with a Jakiro head.

    ``scale`` multiplies what every target layer adds to the residual stream. With 0 the target's
    feature is its input token's embedding, normalised; a head that passes the embedding of its
    input token through (fc = [I, 0], nothing added) then predicts the target's next token exactly
    (the norm only rescales it). With 0.03 that head is partly right; with None it is random.
    """
    eng = joey.load(str(folder), device="cpu", prepack=False, progress=False, adapter=False, head=False)
    model = eng.model
    h = model.cfg.hidden_size
    torch.manual_seed(seed)
    head = JakiroHead(model.cfg, torch.arange(model.cfg.vocab_size), experts=2)
    with torch.no_grad():
        if scale is not None:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(scale)
                layer.mlp.down_proj.weight.mul_(scale)
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h)
            head.fc.bias.zero_()
            head.self_attn.o_proj.weight.zero_()
            for e in head.experts:
                e.down_proj.weight.zero_()
    return Engine(model, eng.tokenizer, eng.source, head=head.eval())


@pytest.fixture(scope="module")
def exact(tiny_folder) -> Engine:
    return _engine(tiny_folder, 0.0)


@pytest.fixture(scope="module")
def partial(tiny_folder) -> Engine:
    return _engine(tiny_folder, 0.03)


@pytest.fixture(scope="module")
def weak(tiny_folder) -> Engine:
    return _engine(tiny_folder, None)


@pytest.mark.parametrize("method", ["jakiro", "jakiro+pld"])
@pytest.mark.parametrize("nodes", [0, 7])
def test_greedy_equals_ar_single_and_ragged_batch(exact, partial, weak, method, nodes):
    for eng in (exact, partial, weak):
        kw = dict(max_new_tokens=24, ignore_eos=True)
        ar = [g.token_ids for g in eng.generate(PROMPTS, method="ar", **kw)]
        jk = eng.generate(PROMPTS, method=method, tree_nodes=nodes, tree_topk=2, max_draft=4, **kw)
        assert [g.token_ids for g in jk] == ar
        one = eng.generate(PROMPTS[1], method=method, tree_nodes=nodes, tree_topk=2, max_draft=4, **kw)
        assert one.token_ids == ar[1]


def test_exact_head_is_accepted_deep_in_the_tree(exact, partial):
    ar = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="ar")
    chain = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="jakiro", max_draft=4,
                           tree_nodes=0, adaptive=False)
    assert chain.token_ids == ar.token_ids
    assert chain.stats.acceptance_by_position[:3] == (1.0, 1.0, 1.0)  # three head levels: all right
    g = exact.generate(PROMPTS[0], max_new_tokens=31, ignore_eos=True, method="jakiro", max_draft=4,
                       tree_nodes=8, tree_topk=2, adaptive=False)
    assert g.token_ids == ar.token_ids
    assert g.stats.acceptance_by_position[0] == 1.0  # the best node of a tree is the exact head's top-1
    assert g.stats.mean_accepted_tokens > 2.5
    p = partial.generate(PROMPTS, max_new_tokens=40, ignore_eos=True, method="jakiro", adaptive=False,
                         tree_nodes=6, tree_topk=2)
    tau = sum(x.new_tokens for x in p) / sum(x.stats.steps for x in p)
    assert 1.0 < tau < g.stats.mean_accepted_tokens


def test_drafter_reads_exactly_the_targets_features(partial, monkeypatch):
    """What the engine hands the drafter (prefill, then pending + accepted path each step) equals the
    final-norm features of a fresh forward over the committed tokens."""
    seen: list[torch.Tensor] = []
    original = JakiroDrafter.observe

    def spy(self, features):
        seen.append(features.clone())
        original(self, features)

    monkeypatch.setattr(JakiroDrafter, "observe", spy)
    g = partial.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, method="jakiro", tree_topk=2,
                         tree_nodes=6, adaptive=False)
    got = torch.cat(seen)
    ids = partial.encode(PROMPTS[1]) + list(g.token_ids)
    n = len(ids) - 1  # the last token was never fed to the target
    model = partial.model
    with torch.inference_mode():
        cache = model.new_cache(1, n)
        want = model.forward_from(model.embed(torch.tensor([ids[:n]])), torch.arange(n)[None], cache, 0, n, None, 0,
                                  head=False)[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hybrid_last_level_hangs_under_the_node_it_was_computed_from(partial):
    """The contrastive branch of frontier node r's forward gives depth-D candidates under r's best
    child — not under the r-th best child overall (the released code's indexing)."""
    drafter = JakiroDrafter(partial.jakiro, SamplingParams(temperature=0.0), 64, topk=2)
    vocab_size = 50
    # a "feature" is a code in element 0; each code has its own favourite tokens
    def log_probs(features):
        out = torch.full((features.shape[0], vocab_size), -20.0)
        for r, code in enumerate(features[:, 0].long().tolist()):
            base = code % vocab_size
            out[r, base], out[r, (base + 1) % vocab_size] = -0.1 - 0.01 * (code % 7), -2.5
        return out

    def scored(nxt, after):  # what a head forward hands back: predictions and their scores
        return Scored(nxt, after, log_probs(nxt), log_probs(after))

    expanded = []

    def expand(tree, nodes, features, after):
        expanded.append(list(nodes))
        for node in nodes:
            tree.assign_slot(node)
        return list(nodes)  # the request, answered below in place of a head forward

    drafter._expand = expand
    drafter.draft = JakiroDraft(partial.model, partial.jakiro.head,
                                DraftVocabHead(torch.arange(vocab_size), torch.zeros(1), None))
    tree = DraftTree(base=5)
    grow = drafter._grow(tree, scored(torch.full((1, 4), 0.0), torch.full((1, 4), 3.0)), 3, 100)
    try:
        nodes = next(grow)
        while True:
            k = len(expanded)
            codes_next = torch.tensor([[10.0 * k + i] for i in range(len(nodes))])
            codes_after = torch.tensor([[30.0 + 10.0 * k + i] for i in range(len(nodes))])
            nodes = grow.send(scored(codes_next.expand(-1, 4).clone(), codes_after.expand(-1, 4).clone()))
    except StopIteration:
        pass
    # depth 1: root children; depth 2: children of the two expanded depth-1 nodes; depth 3: hybrid
    assert expanded == [[0, 1]]
    depth3 = [n for n in range(len(tree.tokens)) if tree.depths[n] == 3]
    assert depth3
    for node in depth3:
        parent = tree.parents[node]
        grand = tree.parents[parent]
        siblings = [c for c in range(len(tree.tokens)) if tree.parents[c] == grand and tree.depths[c] == 2]
        assert parent == max(siblings, key=lambda c: tree.scores[c])  # the best child of its own frontier node
        row = [0, 1].index(grand)
        code = 30 + 10 + row  # the contrastive output of that frontier node's forward
        assert tree.tokens[node] in (code % vocab_size, (code + 1) % vocab_size)


def test_sampling_first_drafted_position_matches_ar(partial):
    from conftest import first_token_histogram, total_variation

    n, kw = 200, dict(max_new_tokens=2, temperature=1.0, top_k=4, ignore_eos=True)
    a = first_token_histogram(partial, "alpha beta", "ar", n, **kw)
    b = first_token_histogram(partial, "alpha beta", "jakiro", n, tree_topk=2, tree_nodes=5, adaptive=False, **kw)
    assert total_variation(a, b, n) < 0.2, (a, b)


def test_sampled_tree_runs_in_a_ragged_batch(partial):
    """Sampled decoding with a tree and the retrieval branch in a batch: every row runs to length,
    and each row's first token (sampled at the prefill, before any draft) equals AR's for the seed."""
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    ar = partial.generate(PROMPTS, method="ar", **kw)
    jk = partial.generate(PROMPTS, method="jakiro+pld", tree_topk=2, tree_nodes=6, **kw)
    assert [g.token_ids[0] for g in jk] == [g.token_ids[0] for g in ar]
    assert all(g.new_tokens == 12 for g in jk)


def test_head_file_roundtrip_and_refusals(tmp_path, partial, tiny_folder, default_source):
    from conftest import make_tiny

    path = tmp_path / "h.safetensors"
    save_head(partial.jakiro.head, partial.model, path, {"base_model": "tiny"})
    loaded = load_head(path, partial.model)
    assert torch.equal(loaded.vocab, partial.jakiro.head.vocab)
    for name, tensor in partial.jakiro.head.state_dict().items():
        if name == "vocab":
            continue
        torch.testing.assert_close(loaded.state_dict()[name], tensor.half().float())  # fp16 on disk
    other = make_tiny(tmp_path / "other", "qwen2" if "qwen2" in tiny_folder.name else "llama",
                      default_source.folder, seed=3)
    other_model = joey.load(str(other), device="cpu", prepack=False, progress=False, adapter=False).model
    with pytest.raises(ModelFormatError, match="different model"):
        load_head(path, other_model)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFormatError):
        load_head(corrupt, partial.model)
    adapter_path = tmp_path / "adapter.safetensors"
    save_adapter(KangarooAdapter(partial.model.cfg, 1, torch.arange(10)), partial.model, adapter_path)
    with pytest.raises(ModelFormatError, match="not a joey Jakiro head"):
        load_head(adapter_path, partial.model)


def test_jakiro_needs_a_head(tiny_engine):
    with pytest.raises(InvalidArgumentError, match="Jakiro head"):
        tiny_engine.generate("Hi", method="jakiro", max_new_tokens=4)


def test_train_drafter_end_to_end_and_resume(tmp_path, tiny_folder):
    """Distil a few prompts with features, train, save a loadable head that drafts losslessly; a
    second run resumes (nothing re-distilled, the finished checkpoint is picked up)."""
    from joey.training.distill import DistillSettings
    from joey.training.jakiro_training import HeadTrainSettings
    from joey.training.run import train_from_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say something about number {i}.", "output":
                                             f"Number {i} is a number. " * 20}) for i in range(12)))
    kw = dict(num_prompts=10, derived=2, distill=DistillSettings(max_new_tokens=8, batch_size=4),
              train=HeadTrainSettings(epochs=2, draft_vocab=512, batch_tokens=256, eval_sequences=2),
              progress=False)
    out = tmp_path / "run"
    report = train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu", **kw)
    assert report["kind"] == "jakiro" and report["sequences"] == 10
    assert 0.0 <= report["agreement"] <= 1.0 and report["chain_tau"] >= 1.0
    shard = torch.load(out / "data" / "shard_00000.pt", weights_only=True)[0]
    assert shard["hidden"]["feature"].shape[0] == len(shard["ids"]) - 1
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False,
                    head=out / "head.safetensors")
    assert eng.jakiro.head.vocab.numel() == 512
    ar = eng.generate(PROMPTS, max_new_tokens=12, ignore_eos=True, method="ar")
    jk = eng.generate(PROMPTS, max_new_tokens=12, ignore_eos=True, method="jakiro")
    assert [g.token_ids for g in jk] == [g.token_ids for g in ar]
    stamp = (out / "data" / "shard_00000.pt").stat().st_mtime_ns
    first = (out / "head.safetensors").read_bytes()
    again = train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu", **kw)
    assert (out / "data" / "shard_00000.pt").stat().st_mtime_ns == stamp
    assert (out / "head.safetensors").read_bytes() == first  # resumed from the finished checkpoint
    assert again["agreement"] == report["agreement"]


def test_train_drafter_continues_from_a_head_with_the_chosen_answering_weights(tmp_path, tiny_folder, capsys):
    """``init`` fine-tunes a given head (its vocabulary, experts and width are kept, its weights are the
    start); ``distill.weights`` answers with the target in that format and is part of the shards'
    identity; a file that is not a head for this model is refused before anything is distilled."""
    from joey.training.distill import DistillSettings
    from joey.training.jakiro_training import HeadTrainSettings
    from joey.training.run import train_from_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about the number {i}."}) for i in range(8)))
    base = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False, head=False)
    torch.manual_seed(0)
    start = JakiroHead(base.model.cfg, torch.arange(1, 700, 3), 3, 48)
    save_head(start, base.model, tmp_path / "start.safetensors")
    kw = dict(num_prompts=8, derived=0, distill=DistillSettings(max_new_tokens=6, batch_size=4, weights="int8"),
              progress=False)
    train = HeadTrainSettings(epochs=1, draft_vocab=64, batch_tokens=128, eval_sequences=1,
                              init=str(tmp_path / "start.safetensors"))
    out = tmp_path / "run"
    report = train_from_prompts(str(tiny_folder), [str(prompts)], out, device="cpu", train=train, **kw)
    assert report["distill_settings"]["weights"] == "int8"
    assert json.loads((out / "data" / "manifest.json").read_text())["settings"]["weights"] == "int8"
    tuned = load_head(out / "head.safetensors", base.model)
    assert torch.equal(tuned.vocab, start.vocab)  # not a new 64-token vocabulary
    assert (tuned.num_experts, tuned.cfg.intermediate_size) == (3, 48)
    moved = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values())]
    assert any(moved)  # it trained from the given weights
    # the starting head was evaluated on the same held-out split before training, then every epoch
    logged = capsys.readouterr().out
    assert logged.index("before fine-tuning (the --init head): held-out top-1") < logged.index("epoch 1: held-out")
    save_adapter(KangarooAdapter.initialized_from(base.model, 1, torch.arange(64), False), base.model,
                 tmp_path / "adapter.safetensors")
    bad = replace(train, init=str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ModelFormatError, match="not a joey Jakiro head"):
        train_from_prompts(str(tiny_folder), [str(prompts)], tmp_path / "bad", device="cpu", train=bad, **kw)
    assert not (tmp_path / "bad" / "data").exists()


def test_distillation_time_budget_stops_between_shards(tmp_path, tiny_folder):
    from joey.training.distill import DistillSettings, collect, prompt_items
    from joey.training.prompts import read_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Count to {i}."}) for i in range(8)))
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False)
    s = DistillSettings(exit_layers=(), features=True, max_new_tokens=4, batch_size=2)
    texts = prompt_items(eng.encode, read_prompts([prompts]), s.max_prompt_tokens)
    first = collect(eng.model, texts, eng.eos_ids, tmp_path / "d", s, False, time_budget=0.0)
    assert len(first) == 1  # the first shard runs, then the spent budget stops the rest
    rest = collect(eng.model, texts, eng.eos_ids, tmp_path / "d", s, False)
    assert len(rest) == 4 and rest[0] == first[0]


def test_each_shipped_head_is_found_for_its_own_model_only(default_engine):
    """joey/heads holds one head per model (the default's and Qwen2.5-Coder-1.5B's): the default model
    finds its own, and any other head given to it is refused with a one-line error."""
    from joey.models.jakiro_head import find_head

    folder = Path(joey.__file__).resolve().parent / "heads"
    own = find_head(default_engine.model)
    assert own is not None and own.name == "smollm2-135m-instruct.safetensors"
    others = [p for p in sorted(folder.glob("*.safetensors")) if p != own]
    assert [p.name for p in others] == ["qwen2.5-coder-1.5b-instruct.safetensors"]
    for path in others:
        assert path.stat().st_size <= 40_000_000  # the package's budget for a drafter
        with pytest.raises(ModelFormatError) as info:
            load_head(path, default_engine.model)
        assert "\n" not in str(info.value) and "hidden_size" in str(info.value)


def test_default_model_ships_a_head_and_jakiro_is_lossless(default_engine):
    """The shipped head loads automatically; Jakiro (with and without the retrieval branch) equals
    AR on the real model at batch 1 and in a ragged batch, and its drafts are accepted."""
    assert default_engine.jakiro is not None
    prompts = ["Explain in three sentences why the sky is blue.", "Write a Python function that adds two numbers.",
               "What is 17 times 3? Think step by step."]
    steps = tokens = 0
    for prompt in prompts:
        ar = default_engine.generate(prompt, max_new_tokens=40, method="ar")
        jk = default_engine.generate(prompt, max_new_tokens=40, method="jakiro", adaptive=False)
        assert jk.token_ids == ar.token_ids
        steps += jk.stats.steps
        tokens += jk.new_tokens
    assert tokens / steps > 1.25  # a trained head's drafts are accepted (full-depth trees)
    ar = [g.token_ids for g in default_engine.generate(prompts, max_new_tokens=24, method="ar")]
    assert [g.token_ids for g in default_engine.generate(prompts, max_new_tokens=24, method="jakiro+pld")] == ar
