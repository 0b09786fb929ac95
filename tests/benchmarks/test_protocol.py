"""The benchmark's sweep protocol: a winning edge of the grid is extended along the ladder, then seeds run there."""

import math

from benchmarks.__main__ import run_protocol


def fake_training(best_lr, calls):
    def train_one(lr, seed):
        calls.append((lr, seed))
        loss = abs(math.log10(lr) - math.log10(best_lr)) + 0.01 * seed
        return {"val_loss": loss, "val_accuracy": None, "curve": [loss], "state_bytes": 0, "step_ms": 1.0}
    return train_one


def test_a_winning_edge_is_extended_until_the_best_rate_is_inside():
    calls = []
    outcome = run_protocol(fake_training(1e-2, calls), (3e-4, 1e-3, 3e-3), seeds=3, quick=False)
    assert outcome["best_lr"] == 1e-2
    assert list(outcome["sweep"]) == ["0.0003", "0.001", "0.003", "0.01", "0.03"]
    assert calls[-2:] == [(1e-2, 1), (1e-2, 2)]


def test_extension_stops_after_two_rungs_and_an_inner_best_extends_nothing():
    calls = []
    assert run_protocol(fake_training(1e-5, calls), (3e-4, 1e-3, 3e-3), seeds=1, quick=False)["best_lr"] == 3e-5
    assert len(calls) == 5
    calls.clear()
    assert run_protocol(fake_training(1e-3, calls), (3e-4, 1e-3, 3e-3), seeds=1, quick=False)["best_lr"] == 1e-3
    assert len(calls) == 3
