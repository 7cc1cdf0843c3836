"""benchmarks/pld_ceiling.py: PLD's steps replayed on a known answer (the lookup, the accepted prefix,
the next step after it) and priced by a verify curve."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from joey.budget import CostCurve

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "pld_ceiling.py"
spec = importlib.util.spec_from_file_location("pld_ceiling", SCRIPT)
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)

# the answer copies the prompt's 10 .. 15 after its first token; the prompt's tail (7) has no match
PROMPT = [7, 10, 11, 12, 13, 14, 15, 8, 7]
ANSWER = [10, 11, 12, 13, 14, 15, 9]
FLAT = CostCurve((1, 64), (10.0, 10.0), "cpu", "x", 1)  # verifying any number of tokens costs one step


def test_the_lookup_reports_the_longest_ngram_and_its_continuation():
    assert ceiling.first_match([5, 6, 7, 5, 6], 3) == (2, [7, 5, 6])
    assert ceiling.first_match([1, 2, 3], 3) is None


def test_replay_follows_the_steps_a_drafting_run_would_take():
    # depth 1 everywhere: after the prefill's 10, "7 10" then "10 11 12" and "12 13 14" are found in the
    # prompt and each one-token draft is accepted: 11 + bonus 12, 13 + 14, 15 + 9: 6 tokens in 3 steps
    tau, speedup = ceiling.replay([(PROMPT, ANSWER)], FLAT, lambda n, follow, a: 1)
    assert tau == pytest.approx(2.0)
    assert speedup == pytest.approx(2.0)  # a flat curve: the speed-up is the steps' ratio (6 plain steps)


def test_the_oracle_drafts_exactly_what_is_accepted():
    tau, speedup = ceiling.replay([(PROMPT, ANSWER)], FLAT, ceiling.best_known(FLAT))
    assert tau == pytest.approx(6.0) and speedup == pytest.approx(6.0)  # 11-15 and the bonus 9 in one step
    steep = CostCurve((1, 2, 8), (10.0, 30.0, 200.0), "cpu", "x", 1)  # drafting never pays
    assert ceiling.replay([(PROMPT, ANSWER)], steep, ceiling.best_known(steep)) == (1.0, 1.0)
