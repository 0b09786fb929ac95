"""The main job's plan: a default run reuses the swept learning rates of an earlier report where the task and its
steps are unchanged, and sweeps the rest; ``--full`` sweeps everything; the plan is printed before any run."""

import argparse

from benchmarks.__main__ import plan, print_plan
from benchmarks.tasks import TASKS


def arguments(**overrides):
    values = dict(quick=False, full=False, ablation=False, tasks=["digits_mlp"], optimizers=["AdamW", "STAM", "adamw"],
                  frameworks=["torch", "jax"], seeds=3, workers=2, no_speed=False)
    return argparse.Namespace(**{**values, **overrides})


def earlier_report(steps, description=TASKS["torch"]["digits_mlp"].description):
    entry = {"best_lr": 0.01, "lr_source": "swept in this run", "sweep": {"0.003": 0.2, "0.01": 0.1, "0.03": 0.3},
             "run_cpu_seconds": 4.0}
    return {"date": "2026-12-01T10:00:00+00:00", "mode": "full", "machine": {"commit": "abc1234"},
            "quality": {"torch": {"digits_mlp": {"steps": steps, "description": description,
                                                 "optimizers": {"AdamW": entry}}}}}


def test_a_default_run_reuses_swept_rates_at_unchanged_steps_and_sweeps_the_rest():
    steps = TASKS["torch"]["digits_mlp"].steps
    pairs = {(p.framework, p.optimizer): p for p in plan(arguments(), earlier_report(steps))}
    adamw = pairs["torch", "AdamW"]
    assert (adamw.known_lr, adamw.lr_source, adamw.estimate_s) == (0.01, "swept on 2026-12-01 at abc1234", 4.0)
    assert adamw.reused_sweep["0.01"] == 0.1 and adamw.planned_runs == adamw.seeds == 3
    assert pairs["torch", "STAM"].known_lr is None and pairs["torch", "STAM"].planned_runs == 5
    assert pairs["jax", "adamw"].known_lr is None

    assert all(p.known_lr is None for p in plan(arguments(), earlier_report(steps + 1)))
    assert all(p.known_lr is None for p in plan(arguments(), earlier_report(steps, "an older task")))
    assert all(p.known_lr is None for p in plan(arguments(full=True), earlier_report(steps)))
    quick = plan(arguments(quick=True), earlier_report(steps))
    assert all(p.steps == 10 and p.seeds == 1 and p.planned_runs == 1 for p in quick)


def test_the_plan_names_tasks_optimizers_seeds_and_an_estimate(capsys):
    steps = TASKS["torch"]["digits_mlp"].steps
    print_plan(plan(arguments(), earlier_report(steps)), arguments(), 100.0, "earlier.json")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("plan: 2 tasks x 3 optimizers x 3 seeds = 18 runs on 2 worker process(es) of 1 thread, "
                        "then the speed benchmark")
    assert lines[2].startswith(f"  torch digits_mlp          {steps:5d} steps, 2 optimizers x 3 seeds")
    assert lines[2].endswith("learning rates: 1 swept now, 1 reused")
    assert lines[3] == "  reused learning rates come from earlier.json (--full sweeps them all again)"
    assert lines[4].startswith("  earlier.json has no swept rate for some pairs")
    assert lines[5].startswith("  estimated time: ")


def test_a_report_in_an_older_layout_is_swept_again_not_a_crash():
    steps = TASKS["torch"]["digits_mlp"].steps
    older = {"date": "2026-12-01T14:04:37+00:00", "quick": False, "seeds": 3, "quality": {"torch": {"digits_mlp": {
        "steps": steps, "AdamW": {"best_lr": 0.01, "sweep": {"0.01": 0.1}, "val_loss_mean": 0.1}}}}}
    assert all(p.known_lr is None for p in plan(arguments(), older))
