"""The main job: should I switch from AdamW? Every task with every optimizer under one protocol, then the speed
benchmark, into ``report.json``, a generated ``README.md`` and plots in ``--out``.

It prints its plan first (tasks x optimizers x seeds, with an estimate of the
time), then a line per finished run with the overall ETA. By default it reuses
the learning rates of the last full sweep (``--lrs-from``, the committed
``docs/benchmark/report.json``) where the task and its steps are unchanged and
sweeps the rest; ``--full`` sweeps everything (see ``benchmarks.protocol``).
The committed report is ``--full --ablation --out docs/benchmark``.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from benchmarks import optimizers, protocol, report, runner
from benchmarks.tasks import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK_STEPS = 10
SPEED_ESTIMATE_S = {True: 30.0, False: 180.0}  # when no earlier report says how long it took


def earlier_report(path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return {}


def reusable_entry(earlier, framework, task, optimizer, steps):
    """The earlier report's entry for this pair if its rate came from a sweep of the same task (description and
    steps) in this report layout, else None."""
    block = earlier.get("quality", {}).get(framework, {}).get(task, {})
    entry = block.get("optimizers", {}).get(optimizer) if isinstance(block.get("optimizers"), dict) else None
    if (earlier.get("mode") not in ("full", "default") or block.get("steps") != steps
            or block.get("description") != TASKS[framework][task].description or not isinstance(entry, dict)
            or not entry.get("best_lr") or "lr_source" not in entry):
        return None
    return entry


def plan(args, earlier):
    """The pairs to run, each with its tuning (a sweep, or a rate reused from ``earlier``) and estimate."""
    suites = ("default", "ablation") if args.ablation else ("default",)
    swept_at = f"swept on {earlier.get('date', '?')[:10]} at {earlier.get('machine', {}).get('commit')}"
    pairs = []
    for framework in args.frameworks:
        rows = optimizers.registry(framework, suites)
        for task, spec in TASKS[framework].items():
            if args.tasks and task not in args.tasks:
                continue
            steps = QUICK_STEPS if args.quick else spec.steps
            for name, row in rows.items():
                if args.optimizers and name not in args.optimizers:
                    continue
                pair = runner.Pair(framework, task, name, steps, 1 if args.quick else args.seeds or spec.seeds,
                                   row.grid, estimate_s=spec.estimate_s * steps / spec.steps)
                entry = None if args.full or args.quick else reusable_entry(earlier, framework, task, name, steps)
                if args.quick:
                    pair.known_lr, pair.lr_source = row.grid[1], "quick mode: the grid's middle rate"
                elif entry:
                    pair.known_lr, pair.reused_sweep = entry["best_lr"], entry["sweep"]
                    pair.lr_source = swept_at if entry["lr_source"] == "swept in this run" else entry["lr_source"]
                    pair.estimate_s = entry.get("run_cpu_seconds") or pair.estimate_s
                pairs.append(pair)
    return pairs


def print_plan(pairs, args, speed_estimate_s, lrs_from):
    tasks = sorted({(p.framework, p.task) for p in pairs})
    names = {p.optimizer for p in pairs}
    runs = sum(p.planned_runs for p in pairs)
    seeds = sorted({p.seeds for p in pairs})
    print(f"plan: {len(tasks)} tasks x {len(names)} optimizers x {'-'.join(map(str, seeds or [0]))} seeds = "
          f"{runs} runs on {args.workers or 'no'} worker process(es) of 1 thread"
          f"{', then the speed benchmark' if not args.no_speed else ''}")
    for framework, task in tasks:
        group = [p for p in pairs if (p.framework, p.task) == (framework, task)]
        swept = sum(p.known_lr is None for p in group)
        print(f"  {framework:5s} {task:19s} {group[0].steps:5d} steps, {len(group)} optimizers x {group[0].seeds} "
              f"seeds, ~{group[0].estimate_s:.0f} s a run; learning rates: "
              + (f"{swept} swept now, {len(group) - swept} reused" if not args.quick else "the grid's middle"))
    if not args.quick and not args.full:
        if any(p.known_lr is not None for p in pairs):
            print(f"  reused learning rates come from {lrs_from} (--full sweeps them all again)")
        if any(p.known_lr is None for p in pairs):
            print(f"  {lrs_from} has no swept rate for some pairs (missing, older layout, or the task changed): "
                  "those are swept now")
    work = sum(p.planned_runs * p.estimate_s for p in pairs) / max(args.workers, 1)
    print(f"  estimated time: {runner.clock(work + (0 if args.no_speed else speed_estimate_s))}"
          " (sweeps that extend past their grid add runs)", flush=True)


def machine():
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    for package in ("torch", "jax", "optax", "torchao", "transformers", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT, timeout=10).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def quality_section(pairs, outcomes):
    """``{framework: {task: {steps, seeds, description, discrimination, optimizers: {name: entry}}}}``."""
    quality = {}
    for pair in pairs:
        spec = TASKS[pair.framework][pair.task]
        block = quality.setdefault(pair.framework, {}).setdefault(pair.task, {
            "steps": pair.steps, "seeds": pair.seeds, "description": spec.description, "optimizers": {}})
        entry = runner.summarize(pair, *outcomes[pair.framework, pair.task, pair.optimizer])
        entry["suite"] = optimizers.registry(pair.framework, ("default", "ablation"))[pair.optimizer].suite
        block["optimizers"][pair.optimizer] = entry
    for tasks in quality.values():
        for block in tasks.values():
            block["discrimination"] = protocol.discrimination(block["optimizers"])
    return quality


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"{QUICK_STEPS} steps a run, 1 seed, the middle rate of each grid, small speed shapes")
    mode.add_argument("--full", action="store_true", help="sweep every learning rate again (the committed run)")
    parser.add_argument("--ablation", action="store_true", help="add STAC's ablation rows (PyTorch tasks)")
    parser.add_argument("--tasks", nargs="+", help="task names (default: all)")
    parser.add_argument("--optimizers", nargs="+", help="names from benchmarks/optimizers.py (default: all)")
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    parser.add_argument("--seeds", type=int, help="seeds per task (default: each task's own)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: run in this process)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed benchmark")
    parser.add_argument("--lrs-from", default=str(ROOT / "docs" / "benchmark" / "report.json"),
                        help="the report whose swept learning rates a default run reuses")
    parser.add_argument("--out", default="results", help="output folder (default: results/)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")

    started = time.perf_counter()
    earlier = earlier_report(args.lrs_from)
    pairs = plan(args, earlier)
    speed_estimate_s = earlier.get("speed_elapsed_s") if not args.quick else None
    speed_estimate_s = speed_estimate_s or SPEED_ESTIMATE_S[args.quick]
    print_plan(pairs, args, speed_estimate_s, args.lrs_from)
    progress = runner.Progress(after_s=0 if args.no_speed else speed_estimate_s)
    try:
        outcomes = runner.Runner(pairs, args.workers, progress).run()
        progress.activity = lambda: "all runs done; writing the report"
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "mode": "quick" if args.quick else "full" if args.full else "default",
                  "workers": args.workers, "protocol": protocol.__doc__, "quality": quality_section(pairs, outcomes)}
        if not args.no_speed:
            speed_started = time.perf_counter()
            progress.activity, progress.after_s = (lambda: "speed benchmark"), 0.0
            progress.remaining = lambda: max(speed_estimate_s - (time.perf_counter() - speed_started), 0.0)
            progress.print(f"speed benchmark (~{runner.clock(speed_estimate_s)}) | {progress.status()}")
            try:
                from benchmarks.speed import run_speed
                result["speed"] = run_speed(result["mode"], tuple(args.frameworks))
            except Exception as error:  # noqa: BLE001 (the quality results are still worth writing)
                result["speed"] = {"error": f"{type(error).__name__}: {error}"}
                progress.print(f"speed benchmark FAILED: {result['speed']['error']}")
            result["speed_elapsed_s"] = time.perf_counter() - speed_started
    finally:
        progress.stop()
    result["elapsed_s"] = time.perf_counter() - started
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "README.md").write_text(report.readme(result))
    from benchmarks import plots  # matplotlib, once the runs are done
    written = plots.write_all(result, out)
    print(report.headline_table(result))
    print(f"wrote {out / 'report.json'}, {out / 'README.md'} and {', '.join(written)} in "
          f"{runner.clock(result['elapsed_s'])}", flush=True)
    failed = [(fw, task, name) for fw, tasks in result["quality"].items() for task, block in tasks.items()
              for name, entry in block["optimizers"].items() if entry["failures"]]
    if failed:
        print(f"{len(failed)} optimizer-task pairs had failed runs (marked in the report)", file=sys.stderr)


if __name__ == "__main__":
    main()
