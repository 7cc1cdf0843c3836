"""joey bench: Spec-Bench metrics on hand-made numbers, question-file and argument errors, and one short
end-to-end run on the real default model (outputs, answer files, plots, resume)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from joey.bench import BenchSettings, metrics, report, run_bench
from joey.bench.batched import BatchRun, run_order, summarize
from joey.bench.questions import MT_BENCH, load_questions, select
from joey.bench.run import answer_question
from joey.bench.runners import EXTERNAL, TurnResult, all_methods
from joey.bench.store import MethodRun, QuestionRecord
from joey.cli import main
from joey.config import SamplingParams
from joey.engine import METHODS
from joey.errors import InvalidArgumentError, MissingDependencyError


def load_questions_from_lines(lines, folder: Path):
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_questions(path)


def _q(qid, cat, *turns):
    return json.dumps({"question_id": qid, "category": cat, "turns": list(turns)})


# -- metrics --------------------------------------------------------------------------------------


def test_tokens_per_s_sums_turns():
    assert metrics.tokens_per_s([10, 20], [1.0, 2.0]) == 10.0
    assert metrics.tokens_per_s([5], [0.0]) == 0.0
    with pytest.raises(ValueError):
        metrics.tokens_per_s([1, 2], [1.0])


def test_speedup_is_a_ratio_of_means_not_a_mean_of_ratios():
    assert metrics.speedup([20.0, 40.0], [10.0, 20.0]) == pytest.approx(2.0)
    # per-question ratios 2 and 1 (mean 1.5); Spec-Bench's ratio of means is 20 / 17.5
    assert metrics.speedup([10.0, 30.0], [5.0, 30.0]) == pytest.approx(20 / 17.5)
    with pytest.raises(ValueError):
        metrics.speedup([1.0], [1.0, 2.0])


def test_mean_accepted_tokens_pools_steps():
    assert metrics.mean_accepted_tokens([4, 6], [2, 3]) == pytest.approx(2.0)
    assert metrics.mean_accepted_tokens([7, 1], [7, 1]) == 1.0  # autoregressive
    assert metrics.mean_accepted_tokens([], []) == 0.0


def test_acceptance_by_position_pools_counts_and_ragged_depth():
    # generation 1: 3 steps drafted depth 1 (3 reached it), 2 drafted depth 2 (1 reached it); generation 2: 1 and 0
    assert metrics.acceptance_by_position([[3, 2], [1]], [[3, 1], [0]]) == pytest.approx((0.75, 0.5))
    assert metrics.acceptance_by_position([[], []], [[], []]) == ()
    assert metrics.acceptance_by_position([[0]], [[0]]) == (0.0,)
    with pytest.raises(ValueError):
        metrics.acceptance_by_position([[1]], [])


def test_spread_agreement_first_difference():
    assert metrics.spread([3.0, 1.0, 2.0]) == metrics.Spread(1.0, 2.0, 3.0)
    assert metrics.token_agreement([([1, 2, 3], [1, 2, 4]), ([5], [5, 6])]) == pytest.approx(3 / 5)
    assert metrics.token_agreement([([], [])]) == 1.0
    assert metrics.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert metrics.first_difference([1, 2], [1, 2, 3]) == 2


def _turn(ids, seconds, steps, accept=None, drafted=(), accepted=()):
    return TurnResult("x", tuple(ids), len(ids), seconds, "length", steps, accept, drafted, accepted)


def test_summary_and_lossless_on_hand_made_records():
    ar = (_turn([1, 2, 3, 4], 2.0, 4, (1, 1, 1, 1)),)
    fast = (_turn([1, 2, 3, 4], 1.0, 2, (3, 1), (2, 2), (2, 1)),)
    wrong = (_turn([1, 2, 9, 4], 1.0, 2, (3, 1), (2, 2), (2, 1)),)
    recs = [
        QuestionRecord(1, "writing", MT_BENCH, (MethodRun("ar", 0, 0, ar), MethodRun("pld", 0, 1, fast))),
        QuestionRecord(2, "rag", "rag", (MethodRun("ar", 0, 1, ar), MethodRun("pld", 0, 0, wrong))),
    ]
    summary = report.summarize(recs, ["ar", "pld"], repeats=1)
    assert list(summary["pld"]) == [MT_BENCH, "rag", "overall"]
    assert summary["ar"]["overall"].speedup == pytest.approx(1.0)
    assert summary["ar"]["overall"].mean_accepted_tokens == pytest.approx(1.0)
    assert summary["pld"]["overall"].speedup == pytest.approx(2.0)
    assert summary["pld"]["overall"].mean_accepted_tokens == pytest.approx(2.0)
    assert summary["pld"]["rag"].acceptance_by_position == pytest.approx((1.0, 0.5))
    assert summary["pld"]["overall"].speedup_spread == metrics.Spread(2.0, 2.0, 2.0)
    check = report.lossless(recs, ["ar", "pld"], repeats=1, exact=True)["pld"]
    assert check.lossless is False and check.identical == 1 and check.compared == 2
    assert check.mismatches == ({"question_id": 2, "category": "rag", "repeat": 0, "turn": 1,
                                 "first_difference": 2},)
    assert check.token_agreement == pytest.approx(7 / 8)
    assert report.lossless(recs, ["ar", "pld"], repeats=1, exact=False)["pld"].lossless is None


def test_later_turns_see_the_runners_own_answers(tmp_path):
    class Recorder:
        name, external = "fake", True

        def __init__(self):
            self.seen = []

        def answer(self, messages, params):
            self.seen.append([dict(m) for m in messages])
            return TurnResult(f"answer {len(self.seen)}", (1,), 1, 0.1, "length", 1, (1,))

    runner = Recorder()
    q = load_questions_from_lines([_q(1, "writing", "first", "second")], tmp_path)[0]
    answer_question(runner, q, SamplingParams(max_new_tokens=4))
    assert runner.seen[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer 1"},
                              {"role": "user", "content": "second"}]


# -- questions and argument errors ----------------------------------------------------------------

@pytest.mark.parametrize("lines, needle", [
    (["{not json"], ":1: not valid JSON"),
    ([_q(1, "qa", "a"), "[1, 2]"], ":2: expected a JSON object"),
    ([json.dumps({"question_id": 1, "category": "qa"})], "'turns'"),
    ([_q(1, "qa")], "'turns'"),
    ([_q(1, "qa", "  ")], "'turns'"),
    ([json.dumps({"category": "qa", "turns": ["a"]})], "'question_id'"),
    ([_q(1, "", "a")], "'category'"),
    ([_q(1, "qa", "a"), _q(1, "qa", "b")], "duplicate question_id"),
    (["", "  "], "has no questions"),
])
def test_malformed_question_files(tmp_path, lines, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        load_questions_from_lines(lines, tmp_path)


def test_missing_question_file(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        load_questions(tmp_path / "nope.jsonl")


def test_select_groups_mt_bench_round_robin_and_limits(tmp_path):
    qs = load_questions_from_lines([_q(1, "writing", "a", "b"), _q(2, "writing", "c", "d"), _q(3, "coding", "e", "f"),
                                    _q(4, "qa", "g"), _q(5, "qa", "h")], tmp_path)
    assert [q.group for q in qs] == [MT_BENCH, MT_BENCH, MT_BENCH, "qa", "qa"]
    assert [q.question_id for q in select(qs, None, 2)] == [1, 3, 4, 5]  # both MT-bench sub-categories sampled
    assert [q.question_id for q in select(qs, ["qa"], None)] == [4, 5]
    assert [q.question_id for q in select(qs, ["mt_bench"], 1)] == [1]
    assert [q.question_id for q in select(qs, ["coding"], None)] == [3]
    with pytest.raises(InvalidArgumentError, match="unknown category 'poetry'.*mt_bench"):
        select(qs, ["poetry"], None)
    with pytest.raises(InvalidArgumentError, match="--limit"):
        select(qs, None, 0)


def test_every_engine_method_is_offered():
    assert all_methods()[: len(METHODS)] == tuple(METHODS) and set(EXTERNAL) <= set(all_methods())


@pytest.fixture
def qfile(tmp_path) -> Path:
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join([
        _q(81, "writing", "Write one sentence about the sea.", "Now make it shorter."),
        _q(201, "summarization", "Summarize: The cat sat on the warm mat all afternoon, purring happily."),
        _q(202, "summarization", "Summarize: Rain fell on the town all day."),
    ]) + "\n")
    return path


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "ar,magic"], "unknown method 'magic'"),
    (["--methods", "sps"], "needs --draft-model"),
    (["--categories", "poetry"], "unknown category 'poetry'"),
    (["--repeats", "0"], "--repeats"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--limit", "0"], "--limit"),
    (["--threads", "0"], "--threads"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "2", "--batch-modes", "ragged"], "unknown batch mode ragged"),
    (["--batch-size", "2", "--methods", "ar,hf"], "joey's own methods only"),
    (["--batch-size", "4"], "needs at least that many questions"),
])
def test_cli_errors_before_any_work(qfile, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    assert main(["bench", "--questions", str(qfile), "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("joey: error:") and needle in err[0], err
    assert not out.exists()  # nothing was started


def test_cli_missing_and_malformed_question_file(tmp_path, capsys):
    assert main(["bench", "--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "question file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": "not a list"}\n')
    assert main(["bench", "--questions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: 'turns'" in capsys.readouterr().err


def test_llamacpp_missing_is_a_clear_error(qfile, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install llama-cpp-python"):
        run_bench(BenchSettings(questions=qfile, out=tmp_path / "o", methods=("ar", "llamacpp"), progress=False))
    assert not (tmp_path / "o").exists()


# -- end to end on the real default model ---------------------------------------------------------


def test_a_seeded_sampled_run_is_checked_token_for_token(default_engine, qfile, tmp_path):
    """Seeded sampling draws by position (joey.sampling), so every method must give AR's very tokens
    at T > 0 too, and the report says so (the check can fail: a mismatch is listed)."""
    settings = BenchSettings(questions=qfile, out=tmp_path / "bench", methods=("ar", "pld", "jakiro"), limit=1,
                             max_new_tokens=12, temperature=0.8, seed=3, threads=1, progress=False)
    saved = run_bench(settings, engine=default_engine)
    for method in ("pld", "jakiro"):
        check = saved["lossless"][method]
        assert check["kind"] == "lossless" and check["lossless"] is True and check["mismatches"] == []


def test_end_to_end_outputs_and_resume(default_engine, qfile, tmp_path):
    out = tmp_path / "bench"
    # One thread: this checks outputs, not speed, and two threads thrash on a machine with other work.
    settings = BenchSettings(questions=qfile, out=out, methods=("ar", "pld", "hf"), limit=1, max_new_tokens=4,
                             threads=1, progress=False)
    threads = torch.get_num_threads()
    res = run_bench(settings, engine=default_engine)
    assert torch.get_num_threads() == threads  # restored for the rest of the session

    # results.json
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == "joey-bench/1" and saved["methods"] == ["ar", "pld", "hf"]
    assert saved["categories"] == [MT_BENCH, "summarization", "overall"]
    assert saved["settings"]["question_ids"] == [81, 201] and saved["settings"]["max_new_tokens"] == 4
    assert {"torch", "transformers", "cpu", "gpu", "model", "device", "dtype"} <= saved["environment"].keys()
    for method in ("ar", "pld", "hf"):
        for cat in saved["categories"]:
            cell = saved["summary"][method][cat]
            assert cell["tokens_per_s"] > 0 and cell["speedup"] > 0
            assert {"min", "median", "max"} == cell["speedup_spread"].keys()
    assert saved["summary"]["ar"]["overall"]["speedup"] == pytest.approx(1.0)
    assert saved["summary"]["ar"]["overall"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert saved["summary"]["pld"]["overall"]["mean_accepted_tokens"] >= 1.0
    assert saved["lossless"]["pld"]["lossless"] is True and saved["lossless"]["pld"]["mismatches"] == []
    assert saved["lossless"]["hf"]["kind"] == "agreement"
    assert len(saved["per_question"]) == 2 * 3
    assert res["summary"] == saved["summary"]

    # report.md and answer files in Spec-Bench's format
    md = (out / "report.md").read_text()
    for heading in ("## Speedup vs joey AR", "## Mean accepted tokens τ", "## Lossless"):
        assert heading in md
    for method in ("ar", "pld", "hf"):
        answers = [json.loads(line) for line in (out / "answers" / f"{method}.jsonl").read_text().splitlines()]
        assert [a["question_id"] for a in answers] == [81, 201]
        first = answers[0]
        assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= first.keys()
        choice = first["choices"][0]
        assert choice["index"] == 0 and len(choice["turns"]) == 2 and len(choice["new_tokens"]) == 2
        assert len(choice["wall_time"]) == 2 and sum(choice["accept_lengths"]) >= sum(choice["new_tokens"])

    # plots
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("speedup_by_category.png", "mean_accepted_tokens.png", "acceptance_by_position.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in md

    # resume: a kill in the middle of writing the last question leaves half a line; only it runs again
    progress = out / "progress.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    again = run_bench(settings, engine=default_engine)
    assert again["timing"]["questions_this_session"] == 1
    assert [r["question_id"] for r in again["per_question"] if r["method"] == "ar"] == [81, 201]
    assert len(progress.read_text().splitlines()) == 2
    done = run_bench(settings, engine=default_engine)
    assert done["timing"]["questions_this_session"] == 0

    # other settings in the same folder: a clear error before anything runs
    with pytest.raises(InvalidArgumentError, match="different settings.*max_new_tokens.*--fresh"):
        run_bench(BenchSettings(**{**settings.__dict__, "max_new_tokens": 5}), engine=default_engine)


def test_quick_mode_from_the_cli(qfile, tmp_path):
    """The README's quick mode: --limit 2 --max-new-tokens 32, with Kangaroo (the default model's
    shipped adapter) and PLD; every output file exists and has the documented schema."""
    out = tmp_path / "quick"
    assert main(["bench", "--questions", str(qfile), "--out", str(out), "--limit", "2", "--max-new-tokens", "32",
                 "--methods", "ar,kangaroo,pld", "--no-progress"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == "joey-bench/1" and saved["methods"] == ["ar", "kangaroo", "pld"]
    assert saved["settings"]["question_ids"] == [81, 201, 202] and saved["settings"]["threshold"] == 0.6
    assert {"settings", "environment", "summary", "lossless", "per_question", "timing", "files"} <= saved.keys()
    for method in ("kangaroo", "pld"):
        assert saved["lossless"][method]["lossless"] is True
        assert saved["summary"][method]["overall"]["mean_accepted_tokens"] >= 1.0
        lines = (out / "answers" / f"{method}.jsonl").read_text().splitlines()
        assert [json.loads(x)["question_id"] for x in lines] == [81, 201, 202]
    assert (out / "report.md").read_text().startswith("# joey bench")
    for name in saved["files"]["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_batched_bench_outputs_identical_rows_and_resume(default_engine, qfile, tmp_path):
    """--batch-size 1 2: every (method, mode, size) has a row in the table, every row's tokens equal
    packed AR's, the plot is written, and a second run resumes everything from progress.jsonl."""
    out = tmp_path / "batched"
    settings = BenchSettings(questions=qfile, out=out, methods=("ar", "pld"), max_new_tokens=6, threads=1,
                             batch_sizes=(1, 2), progress=False)
    res = run_bench(settings, engine=default_engine)
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == "joey-bench-batched/1" and saved["table"] == res["table"]
    cells = {(r["method"], r["mode"], r["batch_size"]): r for r in saved["table"]}
    assert set(cells) == {(m, mode, b) for m in ("ar", "pld") for mode in ("packed", "padded") for b in (1, 2)}
    assert cells[("ar", "packed", 2)]["speedup"] == pytest.approx(1.0)
    for cell in cells.values():
        assert cell["identical_rows"] == cell["rows"] and cell["tokens_per_s"] > 0
    assert cells[("pld", "padded", 1)]["rows"] == 3 and cells[("pld", "padded", 2)]["rows"] == 2  # 3 // 2 batches
    assert len((out / "progress.jsonl").read_text().splitlines()) == 4 * (3 + 1)
    md = (out / "report.md").read_text()
    assert md.startswith("# joey bench: batches") and "| pld | padded |" in md
    for name in saved["files"]["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for batch in saved["per_batch"]:  # every batch's prefill is timed apart, inside its wall time
        assert 0 < batch["first_token_s"] < batch["wall_time_s"]
    assert cells[("ar", "packed", 2)]["decode_speedup"] == pytest.approx(1.0)
    assert "## Decoding alone" in md
    again = run_bench(settings, engine=default_engine)  # all done: nothing runs, same per-batch records
    assert again["per_batch"] == saved["per_batch"]


def _batch(method, wall, first, tokens, repeat=0):
    return BatchRun(method, "packed", 2, repeat, 0, (1, 2), tokens, tuple(len(t) for t in tokens), wall, first)


def test_decoding_alone_leaves_the_prefill_out():
    """Two rows of 5 tokens: AR takes 2.0 s (1.0 s to the first tokens), PLD 1.8 s (1.0 s): end to end
    PLD is 2.0 / 1.8 = 1.11x; decoding alone, 8 tokens in 1.0 s against 0.8 s, 1.25x."""
    toks = ((1, 2, 3, 4, 5), (6, 7, 8, 9, 10))
    runs = [_batch("ar", 2.0, 1.0, toks), _batch("pld", 1.8, 1.0, toks)]
    rows = {r["method"]: r for r in summarize(runs, [("ar", "packed"), ("pld", "packed")], [2], 1, True)}
    assert rows["pld"]["speedup"] == pytest.approx(2.0 / 1.8)
    assert rows["pld"]["decode_speedup"] == pytest.approx(1.25)
    assert rows["pld"]["decode_tokens_per_s"] == pytest.approx(10.0)
    assert rows["pld"]["identical_rows"] == 2


def test_the_run_order_rotates_and_reverses_every_other_repeat():
    pairs = [("ar", "packed"), ("pld", "packed"), ("jakiro", "packed")]
    assert run_order(pairs, 0, 0) == pairs
    assert run_order(pairs, 1, 0) == [pairs[1], pairs[2], pairs[0]]
    assert run_order(pairs, 1, 1) == [pairs[0], pairs[2], pairs[1]]
    two = pairs[:2]  # two pairs, the same batch index in both repeats: each goes first once
    assert [run_order(two, 5, r)[0] for r in (0, 1)] == [two[1], two[0]]
