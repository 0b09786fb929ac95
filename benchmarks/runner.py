"""The main job's engine: each optimizer's protocol on each task, its runs spread over worker processes, and a
line a person can follow for every finished run (with an overall ETA), at least every 30 seconds.

A run is one training of one optimizer on one task at one rate and seed, in a
worker process with one thread (small models train faster that way than
sharing threads, and two runs at once fill a 2-core machine). The longest
waiting run starts first, so the workers finish together. A run that raises
comes back as an error and the rest goes on; a worker that dies takes its
runs with it, and they run once more on a fresh pool before they are marked
failed.
"""

import concurrent.futures
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

from benchmarks import protocol
from benchmarks.tasks import TASKS

HEARTBEAT_S = 25.0  # a line at least this often while runs are going


@dataclass
class Pair:
    """One optimizer on one task: how to tune it, and what the plan expects it to cost."""
    framework: str
    task: str
    optimizer: str
    steps: int
    seeds: int
    grid: tuple
    known_lr: float = None  # reused from an earlier sweep: no sweep now
    lr_source: str = "swept in this run"
    reused_sweep: dict = field(default_factory=dict)
    estimate_s: float = 1.0  # seconds per run

    @property
    def planned_runs(self):
        return self.seeds if self.known_lr is not None else len(self.grid) + self.seeds - 1


def _worker_setup():
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu",
                      XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    for name in ("torchao", "torch.utils._pytree", "transformers"):  # import-time notices, not results
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="OptimState8bit does not implement _stable_hash_for_caching")


_BUILT = {}  # (framework, task, steps) -> the task, built once per worker


def run_one(framework, task_name, steps, optimizer_name, lr, seed):
    """One run (in a worker): the task's result dict, or ``error`` with the exception; and its ``seconds`` and
    ``cpu_seconds`` (the estimate of a run on an idle machine, which the plan uses)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        from benchmarks import optimizers
        if (framework, task_name, steps) not in _BUILT:
            _BUILT[framework, task_name, steps] = optimizers.resolve(TASKS[framework][task_name].factory)(steps)
        task = _BUILT[framework, task_name, steps]
        make = optimizers.registry(framework, ("default", "ablation"))[optimizer_name].make
        if framework == "torch":
            from benchmarks.torch_tasks import train
            result = train(task, make, lr, seed)
        else:
            from benchmarks.jax_tasks import train
            result = train(task, optimizer_name, make, lr, seed)
    except Exception as error:  # noqa: BLE001 (any failure of one run is reported, and the rest goes on)
        result = {"error": f"{type(error).__name__}: {error}",
                  "traceback": "".join(traceback.format_exception(error)[-3:])}
    result.update(seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started)
    return result


class InlineExecutor:
    """Runs each submitted run at once in this process (``workers=0``: for debugging and tests)."""

    def submit(self, function, *args):
        future = concurrent.futures.Future()
        future.set_result(function(*args))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _executor(workers):
    if workers == 0:
        return InlineExecutor()
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_setup)


def clock(seconds):
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The lines a person follows: one per finished run with the overall ETA, and a heartbeat in between."""

    def __init__(self, after_s=0.0, stream=None):
        self.after_s, self.stream = after_s, stream or sys.stdout  # after_s: the time planned after the runs
        self.started = time.perf_counter()
        self.lock = threading.Lock()
        self.last_line = self.started
        self.activity = lambda: "starting"  # what is going on, for the heartbeat
        self.remaining = lambda: 0.0
        self.stopped = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def print(self, text):
        with self.lock:
            print(text, file=self.stream, flush=True)
            self.last_line = time.perf_counter()

    def status(self):
        elapsed = time.perf_counter() - self.started
        return f"{clock(elapsed)} elapsed, ETA {clock(self.remaining() + self.after_s)}"

    def _heartbeat(self):
        while not self.stopped.wait(1.0):
            if time.perf_counter() - self.last_line >= HEARTBEAT_S:
                try:
                    text = f"  ... {self.activity()} | {self.status()}"
                except RuntimeError:  # the runs changed while this thread read them: try again in a second
                    continue
                self.print(text)

    def stop(self):
        self.stopped.set()


@dataclass
class _Pending:
    pair: Pair
    lr: float
    seed: int
    batch: tuple = None  # (its pair's generator, the batch's result slots, its index there)
    attempts: int = 0
    started: float = None


class Runner:
    """Drives every pair's ``protocol.tune`` generator, its runs on ``workers`` processes."""

    def __init__(self, pairs, workers, progress):
        self.pairs, self.workers, self.progress = pairs, workers, progress
        self.total = sum(pair.planned_runs for pair in pairs)
        self.done = 0
        self.measured = {}  # (framework, task) -> (actual, planned) seconds of its finished runs
        self.requested = {id(pair): 0 for pair in pairs}
        self.ready, self.running = [], {}
        self.outcomes = {}
        progress.remaining, progress.activity = self.remaining_s, self.describe

    def expected_s(self, pair):
        """Seconds a run of ``pair`` should take: the plan's estimate, scaled by how the finished runs of its task
        (or, before any, of every task) went against their estimates."""
        actual, planned = self.measured.get((pair.framework, pair.task), (0.0, 0.0))
        if not planned:
            actual = sum(seconds for seconds, _ in self.measured.values())
            planned = sum(seconds for _, seconds in self.measured.values())
        return pair.estimate_s * (actual / planned if planned else 1.0)

    def remaining_s(self):
        """Estimated seconds left on the workers."""
        now = time.perf_counter()
        left = sum(self.expected_s(run.pair) for run in self.ready)
        left += sum(max(self.expected_s(run.pair) - (now - run.started), 0.0) for run in self.running.values())
        left += sum(max(pair.planned_runs - self.requested[id(pair)], 0) * self.expected_s(pair) for pair in self.pairs)
        return left / max(self.workers, 1)

    def _request(self, pair, generator, results=None):
        try:
            requests = next(generator) if results is None else generator.send(results)
        except StopIteration as finished:
            self.outcomes[pair.framework, pair.task, pair.optimizer] = finished.value
            return
        slots = [None] * len(requests)
        self.requested[id(pair)] += len(requests)
        self.ready += [_Pending(pair, lr, seed, (generator, slots, index))
                       for index, (lr, seed) in enumerate(requests)]

    def _finish(self, run, result):
        pair = run.pair
        result.update(lr=run.lr, seed=run.seed)
        self.done += 1
        actual, planned = self.measured.get((pair.framework, pair.task), (0.0, 0.0))
        self.measured[pair.framework, pair.task] = (actual + result["seconds"], planned + pair.estimate_s)
        self.total = max(self.total, sum(max(p.planned_runs, self.requested[id(p)]) for p in self.pairs))
        if "error" in result:
            outcome = f"FAILED: {result['error']}"
        else:
            outcome = "diverged" if result["val_loss"] is None else f"val {result['val_loss']:.4f}"
        self.progress.print(f"[{self.done:4d}/{self.total}] {pair.framework:5s} {pair.task:19s} {pair.optimizer:30s} "
                            f"lr {run.lr:<6g} seed {run.seed}  {outcome:14s} {result['seconds']:5.1f}s | "
                            f"{self.progress.status()}")
        generator, slots, index = run.batch
        slots[index] = result
        if all(slot is not None for slot in slots):
            self._request(pair, generator, slots)

    def run(self, tune=protocol.tune):
        """Every pair's outcome ``{(framework, task, optimizer): (best_lr, sweep, runs)}``."""
        for pair in self.pairs:
            self._request(pair, tune(pair.grid, pair.seeds, pair.known_lr))
        executor = _executor(self.workers)
        try:
            while self.ready or self.running:
                while self.ready and len(self.running) < max(self.workers, 1):
                    run = max(self.ready, key=lambda r: r.pair.estimate_s)  # the longest first
                    self.ready.remove(run)
                    run.started = time.perf_counter()
                    pair = run.pair
                    future = executor.submit(run_one, pair.framework, pair.task, pair.steps, pair.optimizer,
                                             run.lr, run.seed)
                    self.running[future] = run
                finished, _ = concurrent.futures.wait(self.running, return_when=concurrent.futures.FIRST_COMPLETED)
                broken = False
                for future in finished:
                    run = self.running.pop(future)
                    try:
                        result = future.result()
                    except concurrent.futures.process.BrokenProcessPool as error:
                        broken = True
                        run.attempts += 1
                        if run.attempts < 2:
                            self.ready.append(run)
                            continue
                        result = {"error": f"the worker process died: {error}"}
                    except Exception as error:  # noqa: BLE001 (e.g. a result that cannot be pickled)
                        result = {"error": f"{type(error).__name__}: {error}"}
                    self._finish(run, {"seconds": time.perf_counter() - run.started, **result})
                if broken:
                    executor.shutdown(wait=False, cancel_futures=True)
                    executor = _executor(self.workers)
                    for future, run in list(self.running.items()):  # lost with the pool: run once more
                        self.ready.append(run)
                    self.running.clear()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        return self.outcomes

    def describe(self):
        now = time.perf_counter()
        running = ", ".join(f"{run.pair.task}/{run.pair.optimizer} seed {run.seed} ({clock(now - run.started)})"
                            for run in list(self.running.values()))
        return f"{self.done}/{self.total} runs done; running {running or 'nothing'}"


def summarize(pair, best_lr, sweep, runs):
    """The report's entry for one pair, from ``protocol.tune``'s outcome."""
    every_run = list({id(run): run for run in [*sweep.values(), *runs]}.values())  # seed 0 is in both
    succeeded = [run for run in runs if "error" not in run]
    losses = [run["val_loss"] for run in succeeded]
    mean, se = protocol.mean_and_se(losses)
    accuracies = [run["val_accuracy"] for run in succeeded if run.get("val_accuracy") is not None]
    return {
        "best_lr": best_lr, "lr_source": pair.lr_source,
        "sweep": pair.reused_sweep or {f"{lr:g}": run.get("val_loss") for lr, run in sorted(sweep.items())},
        "val_losses": losses, "val_loss_seeds": [run["seed"] for run in succeeded], "mean": mean, "se": se,
        "seeds": len(succeeded),
        "diverged": sum(loss is None for loss in losses),
        "val_accuracy_mean": sum(accuracies) / len(accuracies) if accuracies else None,
        "state_bytes": next((run["state_bytes"] for run in every_run if "state_bytes" in run), None),
        "run_cpu_seconds": (sum(run.get("cpu_seconds", run["seconds"]) for run in every_run) / len(every_run)
                            if every_run else None),
        "failures": [{key: run.get(key) for key in ("lr", "seed", "error", "traceback")}
                     for run in every_run if "error" in run],
    }
