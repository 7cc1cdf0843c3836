"""Teacher-forced distillation: reading fixed answers gives the rows self-distillation writes, and a
``--answers data`` run distills, resumes and trains on every data folder of its run folder."""

from __future__ import annotations

import json

import pytest
import torch

import joey
from joey.errors import InvalidArgumentError
from joey.training.adapter_training import exit_states
from joey.training.distill import FEATURE, DistillSettings, Item, answer_batch, batches_of
from joey.training.teacher_forced import forced_batch, forced_items, read_examples


def test_fixed_answers_equal_to_the_targets_own_give_its_rows(tiny_folder):
    """When the fixed answer is the target's own greedy answer, one prefill over it gives the features
    and top-k labels that answering token by token gave."""
    eng = joey.load(str(tiny_folder), device="cpu", prepack=False, progress=False, adapter=False, head=False,
                    weights="fp32")
    prompts = [eng.encode(f"Tell me about the number {i}." + " Please." * i) for i in range(3)]
    s = DistillSettings(exit_layers=(1,), max_new_tokens=8, top_k=8, features=True)
    ref = answer_batch(eng.model, prompts, frozenset(eng.eos_ids), s)
    items = [Item(tuple(r["ids"].tolist()), r["prompt_len"]) for r in ref]
    mine = forced_batch(eng.model, items, frozenset(), s)
    computed = exit_states(eng.model, [r["ids"] for r in ref], 1, batch_tokens=40)  # a Kangaroo adapter's inputs
    for r, c in zip(ref, computed, strict=True):
        torch.testing.assert_close(r["hidden"][1].float(), c.float(), atol=2e-3, rtol=2e-3)
    for a, b in zip(ref, mine, strict=True):
        assert a["ids"].tolist() == b["ids"].tolist() and a["prompt_len"] == b["prompt_len"]
        assert a["hidden"].keys() == b["hidden"].keys() == {1, FEATURE}
        for k in a["hidden"]:
            assert a["hidden"][k].shape == b["hidden"][k].shape
            torch.testing.assert_close(a["hidden"][k].float(), b["hidden"][k].float(), atol=2e-3, rtol=2e-3)
        assert a["top_ids"].shape == b["top_ids"].shape == (len(a["ids"]) - a["prompt_len"], 8)
        assert torch.equal(a["top_ids"][:, 0], b["top_ids"][:, 0])  # the greedy token itself
        torch.testing.assert_close(a["top_p"].float(), b["top_p"].float(), atol=2e-3, rtol=2e-3)


def test_examples_items_and_batches(tmp_path):
    data = tmp_path / "d.jsonl"
    recs = [{"instruction": f"Say {i}.", "output": f"{i} " * (i + 1)} for i in range(6)]
    recs += [{"instruction": "no answer"}, {"question": "What is 2+2?", "answer": "4"}, {"instruction": "Say 1."}]
    data.write_text("\n".join(json.dumps(r) for r in recs))
    ex = read_examples([data], seed=1)
    assert len(ex) == 7 and ("What is 2+2?", "4") in ex and read_examples([data], seed=1) == ex
    assert len(read_examples([data], limit=3)) == 3
    s = DistillSettings(max_new_tokens=4, max_prompt_tokens=3, batch_size=3, batch_tokens=12)
    encode = lambda text: [1] * (len(text) // 4 + 1)  # noqa: E731
    tokenize = lambda text: [5] * len(text.split())  # noqa: E731
    items = forced_items(encode, tokenize, [("ab", "x y"), ("abcdefghijklmnop", "x"), ("ab", "a b c d e")], 9, s)
    assert items == [Item((1, 5, 5, 9), 1), Item((1, 5, 5, 5, 5), 1)]  # long prompt skipped, long answer cut
    many = [Item((1,) * n, 1) for n in (2, 3, 4, 5, 6, 7)]
    batches = batches_of(many, s)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) <= 3 and len(b) * max(len(many[i].ids) for i in b) <= 12 for b in batches)
    with pytest.raises(InvalidArgumentError, match="prompt and an answer"):
        empty = tmp_path / "e.jsonl"
        empty.write_text(json.dumps({"instruction": "x"}))
        read_examples([empty])


def test_answers_data_run_resumes_and_trains_on_both_folders(tmp_path, tiny_folder):
    from joey.training.jakiro_training import HeadTrainSettings
    from joey.training.run import train_from_prompts

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))})
                              for i in range(1, 13)))
    out = tmp_path / "run"
    train = HeadTrainSettings(draft_vocab=64, experts=2, intermediate=32, epochs=1, batch_tokens=256,
                              eval_sequences=2)
    kw = dict(device="cpu", train=train, progress=False, num_prompts=12, derived=0)
    d = DistillSettings(max_new_tokens=6, batch_size=4, batch_tokens=64)
    first = train_from_prompts(str(tiny_folder), [str(data)], out, answers="data", distill=d, distill_only=True,
                               distill_minutes=1e-6, **kw)
    assert first["shards"] == 1 and not (out / "head.safetensors").exists()  # the budget stopped it after one
    done = train_from_prompts(str(tiny_folder), [str(data)], out, answers="data", distill=d, distill_only=True, **kw)
    assert done["sequences"] == 12 and done["shards"] >= 3
    own = train_from_prompts(str(tiny_folder), [str(data)], out, answers="target",
                             distill=DistillSettings(max_new_tokens=4, batch_size=4), **kw)
    assert own["sequences"] == 12 + 12 and (out / "head.safetensors").exists()  # both folders trained on
    # the same teacher-forced data trains a Kangaroo adapter: its exit layer's states come from the tokens
    from joey.training.adapter_training import TrainSettings

    ad = train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "run", answers="data", distill=d,
                            **{**kw, "train": TrainSettings(exit_layer=1, draft_vocab=64, epochs=1, batch_tokens=256)})
    assert ad["kind"] == "kangaroo" and ad["sequences"] == 24 and (out / "adapter.safetensors").exists()
    with pytest.raises(InvalidArgumentError, match="other prompts or settings"):
        train_from_prompts(str(tiny_folder), [str(data)], out, answers="data", distill_only=True,
                           distill=DistillSettings(max_new_tokens=5, batch_size=4, batch_tokens=64), **kw)


def test_stored_answers_round_trip_and_refusals(tmp_path):
    from joey.training.stored_answers import export_answers, prompt_key, read_answers

    rows = [{"ids": torch.tensor([1, 2, 3, 7, 8], dtype=torch.int32), "prompt_len": 3},
            {"ids": torch.tensor([4, 5, 9], dtype=torch.int32), "prompt_len": 2}]
    torch.save(rows[:1], tmp_path / "shard_00000.pt")
    torch.save(rows[1:], tmp_path / "shard_00001.pt")
    out = tmp_path / "a.jsonl.gz"
    head = export_answers([tmp_path / "shard_00000.pt"], out, "m", "llama-2x8:abc")
    assert head["answers"] == 1 and head["answer_tokens"] == 2
    head = export_answers([tmp_path / "shard_00001.pt"], out, "m", "llama-2x8:abc")  # extends the file
    assert head["answers"] == 2 and head["answer_tokens"] == 3
    written = out.read_bytes()
    export_answers([tmp_path / "shard_00000.pt"], out, "m", "llama-2x8:abc")
    assert out.read_bytes() == written  # nothing new: the same bytes (no timestamp in the file)
    header, answers = read_answers(out)
    assert header["model"] == "m" and header["target"] == "llama-2x8:abc"
    assert answers == {prompt_key([1, 2, 3]): (7, 8), prompt_key([4, 5]): (9,)}
    with pytest.raises(InvalidArgumentError, match="holds answers of m, not of other"):
        export_answers([tmp_path / "shard_00001.pt"], out, "other", "llama-2x8:def")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_text("not gzip")
    with pytest.raises(InvalidArgumentError, match="not a file of stored answers"):
        read_answers(bad)
    with pytest.raises(InvalidArgumentError, match="no distilled sequences"):
        torch.save([], tmp_path / "empty.pt")
        export_answers([tmp_path / "empty.pt"], tmp_path / "new.jsonl.gz", "m", "llama-2x8:abc")


def test_stored_answers_are_read_and_the_rest_answered(tmp_path, tiny_folder, monkeypatch):
    """A run over more prompts than a file of stored answers holds reads those (teacher forcing) and
    answers the rest: its rows equal a plain run's, and exporting extends the file. A file of another
    target, or one that answers none of the prompts, is refused in one line."""
    from joey.training.jakiro_training import HeadTrainSettings
    from joey.training.run import train_from_prompts
    from joey.training.stored_answers import export_answers, read_answers

    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Count to {i}."}) for i in range(1, 9)))
    train = HeadTrainSettings(draft_vocab=64, experts=2, intermediate=32, epochs=1, batch_tokens=256)
    kw = dict(device="cpu", train=train, progress=False, derived=0, distill_only=True,
              distill=DistillSettings(max_new_tokens=5, batch_size=4))
    file = tmp_path / "answers.jsonl.gz"
    train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "a", num_prompts=4, export=file, **kw)
    assert read_answers(file)[0]["answers"] == 4
    from joey.training import stored_answers

    read = []  # the sequences read from the file rather than answered
    real = stored_answers.forced_batch
    monkeypatch.setattr(stored_answers, "forced_batch", lambda m, items, *a: read.extend(items) or real(m, items, *a))
    train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "b", num_prompts=8, stored=file, export=file, **kw)
    assert read_answers(file)[0]["answers"] == 8 and len(read) == 4
    train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "c", num_prompts=8, **kw)

    def rows(folder):
        return sorted((r for p in sorted(folder.glob("shard_*.pt")) for r in torch.load(p, weights_only=True)),
                      key=lambda r: r["ids"].tolist())

    for a, b in zip(rows(tmp_path / "c" / "data"), rows(tmp_path / "b" / "data"), strict=True):
        assert a["ids"].tolist() == b["ids"].tolist() and a["prompt_len"] == b["prompt_len"]
        torch.testing.assert_close(a["hidden"][FEATURE].float(), b["hidden"][FEATURE].float(), atol=2e-3, rtol=2e-3)
        assert torch.equal(a["top_ids"][:, 0], b["top_ids"][:, 0])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"instruction": "Something else entirely."}))
    with pytest.raises(InvalidArgumentError, match="none of these prompts has an answer"):
        train_from_prompts(str(tiny_folder), [str(other)], tmp_path / "d", num_prompts=8, stored=file, **kw)
    foreign = tmp_path / "foreign.jsonl.gz"
    export_answers(sorted((tmp_path / "a" / "data").glob("shard_*.pt")), foreign, "another-model", "llama-2x8:abc")
    with pytest.raises(InvalidArgumentError, match="holds answers of another-model"):
        train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "e", num_prompts=8, stored=foreign, **kw)
    with pytest.raises(InvalidArgumentError, match="go with --answers target"):
        train_from_prompts(str(tiny_folder), [str(data)], tmp_path / "f", num_prompts=8, stored=file,
                           answers="data", **kw)
