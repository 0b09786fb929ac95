"""The benchmark's protocol: the sweep extends a winning edge along the ladder, then seeds run there; and the
statistics the report draws (standard errors, ties, the discrimination check)."""

import math
import statistics

import pytest

from benchmarks.protocol import (discrimination, lr_factor, mean_and_se, relative_gap, resolution, run_serially,
                                 tune, verdict)


def fake_training(best_lr, calls):
    def train_one(lr, seed):
        calls.append((lr, seed))
        return {"val_loss": abs(math.log10(lr) - math.log10(best_lr)) + 0.01 * seed}
    return train_one


def test_a_winning_edge_is_extended_until_the_best_rate_is_inside():
    calls = []
    best, sweep, runs = run_serially(tune((3e-4, 1e-3, 3e-3), seeds=3), fake_training(1e-2, calls))
    assert best == 1e-2
    assert sorted(sweep) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert calls[-2:] == [(1e-2, 1), (1e-2, 2)]
    assert runs[0] is sweep[1e-2] and len(runs) == 3


def test_extension_stops_after_two_rungs_and_an_inner_best_extends_nothing():
    calls = []
    assert run_serially(tune((3e-4, 1e-3, 3e-3), seeds=1), fake_training(1e-5, calls))[0] == 3e-5
    assert len(calls) == 5
    calls.clear()
    assert run_serially(tune((3e-4, 1e-3, 3e-3), seeds=1), fake_training(1e-3, calls))[0] == 1e-3
    assert len(calls) == 3


def test_a_known_rate_runs_only_the_seeds_and_a_sweep_that_always_fails_runs_no_seeds():
    calls = []
    best, sweep, runs = run_serially(tune((1e-3, 3e-3, 1e-2), seeds=3, known_lr=3e-3), fake_training(1e-3, calls))
    assert (best, sweep, calls) == (3e-3, {}, [(3e-3, 0), (3e-3, 1), (3e-3, 2)]) and len(runs) == 3
    calls.clear()
    failing = lambda lr, seed: calls.append(lr) or {"error": "TypeError: boom"}  # noqa: E731
    best, sweep, runs = run_serially(tune((1e-3, 3e-3, 1e-2), seeds=3), failing)
    assert best is None and runs == [] and len(calls) == 3


def test_the_schedule_warms_up_linearly_then_decays_to_zero_by_a_cosine():
    steps = 100  # warmup: 5 steps
    assert [lr_factor(s, steps) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, steps) == 1.0
    assert lr_factor(5 + 95 // 2, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert 0 < lr_factor(99, steps) < 1e-3
    assert lr_factor(0, 1) == 1.0


def test_standard_errors_ties_and_the_discrimination_check():
    values = [1.0, 1.2, 1.1, None]  # a diverged seed (None) is left out of the mean
    mean, se = mean_and_se(values)
    assert mean == pytest.approx(1.1) and se == pytest.approx(statistics.stdev([1.0, 1.2, 1.1]) / math.sqrt(3))
    assert mean_and_se([2.0]) == (2.0, None)

    reference, entry = {"mean": 2.0, "se": 0.02}, {"mean": 2.1, "se": 0.01}
    gap, gap_se = relative_gap(entry, reference)
    assert gap == pytest.approx(0.05)
    assert gap_se == pytest.approx(math.hypot(0.01, 1.05 * 0.02) / 2.0)
    assert verdict(gap, gap_se) == "worse" and verdict(-gap, gap_se) == "better"
    assert verdict(2 * gap_se, gap_se) == "tie" and verdict(gap, None) is None
    assert resolution(reference) == pytest.approx(2 * math.sqrt(2) * 0.02 / 2.0)

    entries = {"a": {"mean": 1.0, "se": 0.01}, "b": {"mean": 1.05, "se": 0.01}, "c": {"mean": 1.2, "se": 0.02},
               "one seed": {"mean": 9.0, "se": None}}
    check = discrimination(entries)
    assert (check["best"], check["worst"], check["passes"]) == ("a", "c", True)
    assert check["standard_errors"] == pytest.approx(0.2 / math.hypot(0.01, 0.02))
    entries["c"]["se"] = 0.1
    assert not discrimination(entries)["passes"]
