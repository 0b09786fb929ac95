"""The benchmark's protocol: the sweep extends a winning (or nearly winning) edge along the ladder, then seeds run there; and the
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


def test_an_edge_within_one_percent_of_the_winner_is_searched_past():
    # A flat top on seed 0 (3e-3 and 1e-2 within 0.4%) hid a better rate beyond it; a clear loser is not extended.
    losses = {1e-3: 1.0, 3e-3: 0.5, 1e-2: 0.502, 3e-2: 0.3, 1e-1: 2.0}
    calls = []
    train_one = lambda lr, seed: calls.append(lr) or {"val_loss": losses[lr]}  # noqa: E731
    best, sweep, _ = run_serially(tune((1e-3, 3e-3, 1e-2), seeds=1), train_one)
    assert best == 3e-2 and sorted(sweep) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and len(calls) == 5
    losses[1e-2] = 0.51  # 2% behind the winner: the sweep stops at its grid
    calls.clear()
    assert run_serially(tune((1e-3, 3e-3, 1e-2), seeds=1), train_one)[0] == 3e-3 and len(calls) == 3


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

    # Without seeds in common, a gap's SE is that of a difference of independent means.
    reference, entry = {"mean": 2.0, "se": 0.02}, {"mean": 2.1, "se": 0.01}
    gap, gap_se = relative_gap(entry, reference)
    assert gap == pytest.approx(0.05)
    assert gap_se == pytest.approx(math.hypot(0.01, 0.02) / 2.0)
    assert verdict(gap, gap_se) == "worse" and verdict(-gap, gap_se) == "better"
    assert verdict(2 * gap_se, gap_se) == "tie" and verdict(gap, None) is None


def seeded(losses, seeds=None):
    finite = [v for v in losses if v is not None]
    mean, se = mean_and_se(finite)
    return {"val_losses": losses, "val_loss_seeds": seeds or list(range(len(losses))), "mean": mean, "se": se}


def test_a_gap_is_paired_by_seed_and_the_check_and_resolution_use_the_paired_errors():
    # Seeds move both optimizers together: the per-seed differences are 0.10, 0.12, 0.11 (seed 3 diverged for one).
    reference = seeded([1.0, 1.5, 2.0, 1.2])
    entry = seeded([1.10, 1.62, 2.11, None])
    differences = [0.10, 0.12, 0.11]
    gap, gap_se = relative_gap(entry, reference)
    assert gap == pytest.approx(entry["mean"] / reference["mean"] - 1)
    assert gap_se == pytest.approx(statistics.stdev(differences) / math.sqrt(3) / reference["mean"])
    assert gap_se < 0.1 * math.hypot(entry["se"], reference["se"]) / reference["mean"]
    # Seeds are matched by name, not by position.
    shuffled = seeded([2.11, 1.10, 1.62], seeds=[2, 0, 1])
    assert relative_gap(shuffled, reference)[1] == pytest.approx(gap_se)

    check = discrimination({"ref": reference, "entry": entry, "one seed": {"mean": 9.0, "se": None}})
    assert (check["best"], check["worst"], check["passes"]) == ("ref", "entry", True)
    assert check["standard_errors"] == pytest.approx(
        (entry["mean"] - reference["mean"]) / (statistics.stdev(differences) / math.sqrt(3)))
    noisy = seeded([1.0, 2.0, 1.4, None])  # differences 0.0, 0.5, -0.6: no consistent gap
    assert not discrimination({"ref": reference, "noisy": noisy})["passes"]

    third = seeded([1.2, 1.7, 2.2, 1.4])  # differences 0.2 on every seed: a gap with no error
    ses = sorted([gap_se, relative_gap(noisy, reference)[1], relative_gap(third, reference)[1]])
    assert ses[0] == pytest.approx(0.0, abs=1e-12)
    assert resolution({"ref": reference, "entry": entry, "noisy": noisy, "third": third}, "ref") == \
        pytest.approx(2 * ses[1])
    assert resolution({"ref": reference}, "ref") is None
