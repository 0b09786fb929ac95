"""The main job: should I use STAC or STAM instead of AdamW, Lion or SGD? One command, real data, one report.

``python -m benchmarks`` runs every task with every optimizer under one fair
protocol, then the speed/memory microbenchmark, and writes ``report.json``,
``summary.md`` and PNG plots into ``--out``.

Protocol, identical for every optimizer: a learning-rate sweep over the
optimizer's own grid of 3 rates on seed 0, scored by final validation loss and
extended by one rate past an edge that wins (at most twice), so the best rate
is never the grid's limit; then ``--seeds`` seeds at the best rate. Within a
seed, every optimizer sees the same initialization, data order and batch
schedule. Reported: mean and range of final validation loss (and accuracy
where it applies), the mean validation curve, optimizer-state bytes and the
median time of ``optimizer.step()``.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

from benchmarks import optimizers as optimizer_table
from benchmarks import report
from benchmarks.speed import run_speed


def progress_bar(iterable, total, description):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, disable=not sys.stderr.isatty(), leave=False)


# Every sweep grid lies on this ladder; a sweep whose best rate is at an edge of its grid goes one rung further.
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
MAX_EXTENSIONS = 2


def run_protocol(train_one, grid, seeds, quick):
    """Sweep the grid on seed 0 (extending it past an edge that wins), then run the other seeds at the best rate."""
    grid = list(grid[1:2] if quick else grid)
    score = lambda run: run["val_loss"] if run["val_loss"] is not None else float("inf")  # noqa: E731
    sweep = {lr: train_one(lr, 0) for lr in grid}
    for _ in range(0 if quick else MAX_EXTENSIONS):
        best_lr = min(grid, key=lambda lr: score(sweep[lr]))
        rung = LR_LADDER.index(best_lr)
        if best_lr == grid[0] and rung > 0:
            grid.insert(0, LR_LADDER[rung - 1])
            sweep[grid[0]] = train_one(grid[0], 0)
        elif best_lr == grid[-1] and rung + 1 < len(LR_LADDER):
            grid.append(LR_LADDER[rung + 1])
            sweep[grid[-1]] = train_one(grid[-1], 0)
        else:
            break
    best_lr = min(grid, key=lambda lr: score(sweep[lr]))
    runs = [sweep[best_lr]] + [train_one(best_lr, seed) for seed in range(1, seeds)]
    losses = [score(run) for run in runs]
    accuracies = [run["val_accuracy"] for run in runs if run["val_accuracy"] is not None]
    curves = [run["curve"] for run in runs if None not in run["curve"]]
    return {
        "sweep": {f"{lr:g}": sweep[lr]["val_loss"] for lr in grid},
        "best_lr": best_lr,
        "val_loss_mean": float(np.mean(losses)), "val_loss_min": float(np.min(losses)),
        "val_loss_max": float(np.max(losses)), "val_loss_std": float(np.std(losses)),
        "val_accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
        "curve_mean": np.mean(curves, axis=0).tolist() if curves else None,
        "state_bytes": runs[0]["state_bytes"],
        "step_ms": float(np.median([run["step_ms"] for run in runs if run["step_ms"] is not None])),
        "seeds": len(runs),
    }


def run_quality(framework, task_names, optimizer_names, seeds, quick, suite="default"):
    if framework == "torch":
        import torch

        from benchmarks import torch_tasks as tasks_module
        torch.set_num_threads(2)
    else:
        from benchmarks import jax_tasks as tasks_module
    table = optimizer_table.registry(framework, suite)
    results = {}
    for task_name in task_names:
        if task_name not in tasks_module.TASKS:
            continue
        factory, steps = tasks_module.TASKS[task_name]
        task = factory(10 if quick else steps)
        names = [n for n in table if optimizer_names is None or n in optimizer_names]
        results[task_name] = {"steps": task.steps}
        for name in progress_bar(names, len(names), f"{framework} {task_name}"):
            make, grid = table[name]
            if framework == "torch":
                train_one = lambda lr, seed: tasks_module.train(task, make, lr, seed)  # noqa: E731
            else:
                train_one = lambda lr, seed: tasks_module.train(task, name, make, lr, seed)  # noqa: E731
            started = time.perf_counter()
            results[task_name][name] = run_protocol(train_one, grid, seeds, quick)
            outcome = results[task_name][name]
            print(f"{framework:5s} {task_name:20s} {name:16s} lr={outcome['best_lr']:<7g} "
                  f"val_loss={outcome['val_loss_mean']:.4f} ({time.perf_counter() - started:.1f}s)", flush=True)
    return results


def machine():
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    for module in ("torch", "jax", "optax", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps per run, 1 seed, 1 learning rate, small speed shapes (~1-2 min)")
    parser.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist_cnn", "shakespeare_lm",
                                                       "residual_regression", "nonstationary"])
    parser.add_argument("--optimizers", nargs="+", default=None, help="names from benchmarks/optimizers.py")
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="skip the speed/memory microbenchmark")
    parser.add_argument("--out", default="results", help="output folder (default: results/)")
    parser.add_argument("--suite", choices=["default", "ablation"], default="default",
                        help="ablation: STAC's candidate changes against AdamW (PyTorch only, no speed run)")
    args = parser.parse_args(argv)
    if args.suite == "ablation":
        args.frameworks, args.no_speed = ["torch"], True
    seeds = 1 if args.quick else args.seeds
    if seeds < 1:
        parser.error("--seeds must be >= 1")

    started = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "quick": args.quick, "seeds": seeds, "protocol": __doc__.split("\n\n", 2)[2],
              "suite": args.suite, "quality": {}}
    for framework in args.frameworks:
        result["quality"][framework] = run_quality(framework, args.tasks, args.optimizers, seeds, args.quick,
                                                   args.suite)
    if not args.no_speed:
        print("speed and memory microbenchmark", flush=True)
        result["speed"] = run_speed(args.quick, tuple(args.frameworks))
    result["elapsed_s"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    summary = report.summary_markdown(result)
    (out / "summary.md").write_text(summary)
    report.plots(result, out)
    print(summary)
    print(f"wrote {out / 'report.json'}, {out / 'summary.md'} and plots in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
