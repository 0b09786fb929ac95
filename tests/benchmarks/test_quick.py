"""The main job's quick mode, for what it prints and writes: its plan first, a line per finished run with the ETA,
a report whose README is generated from report.json, a failing run marked while the rest goes on; and the speed
benchmark's quick section."""

import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

from benchmarks import optimizers, report
from benchmarks.__main__ import main
from benchmarks.speed import QUICK_SHAPES, _per_process_ratios, run_jax, run_speed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_mode_prints_its_plan_then_a_line_per_run_and_writes_its_report(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--quick", "--no-speed", "--out", str(tmp_path),
               "--tasks", "nonstationary", "--optimizers", "AdamW", "adamw"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "plan: 2 tasks x 2 optimizers x 1 seeds = 2 runs on 2 worker process(es) of 1 thread"
    assert lines[3].startswith("  estimated time: ")
    progress = [line for line in lines if line.startswith("[")]
    assert [int(re.match(r"\[ *(\d+)/2\]", line).group(1)) for line in progress] == [1, 2]
    assert all(re.search(r" val \d\.\d{4} .*\| \S+ elapsed, ETA \S+$", line) for line in progress), progress

    written = json.loads((tmp_path / "report.json").read_text())
    assert written["mode"] == "quick" and written["machine"]["cpu_count"]
    assert set(written["quality"]) == {"torch", "jax"}
    for framework, names in (("torch", {"AdamW"}), ("jax", {"adamw"})):
        assert set(written["quality"][framework]) == {"nonstationary"}
        for block in written["quality"][framework].values():
            assert block["steps"] == 10 and set(block["optimizers"]) == names
            for entry in block["optimizers"].values():
                assert entry["seeds"] == 1 and math.isfinite(entry["mean"]) and entry["se"] is None
                assert entry["state_bytes"] > 0 and not entry["failures"]
    assert (tmp_path / "README.md").read_text() == report.readme(written)
    assert report.headline_table(written) in (tmp_path / "README.md").read_text()
    assert (tmp_path / "final_loss.png").stat().st_size > 10_000


def test_a_failing_run_is_marked_and_the_rest_goes_on(tmp_path, monkeypatch, capsys):
    registry = optimizers.torch_registry
    broken = optimizers.Row("torch.optim:AdamW", options={"momentum": 0.9})  # AdamW takes no momentum
    monkeypatch.setattr(optimizers, "torch_registry", lambda: {**registry(), "Broken": broken})
    main(["--quick", "--workers", "0", "--no-speed", "--frameworks", "torch", "--tasks", "digits_mlp",
          "--optimizers", "Broken", "AdamW", "--out", str(tmp_path)])
    assert re.search(r"\] torch digits_mlp +Broken .* FAILED: TypeError", capsys.readouterr().out)
    entries = json.loads((tmp_path / "report.json").read_text())["quality"]["torch"]["digits_mlp"]["optimizers"]
    assert entries["Broken"]["mean"] is None and "momentum" in entries["Broken"]["failures"][0]["error"]
    assert math.isfinite(entries["AdamW"]["mean"])
    readme = (tmp_path / "README.md").read_text()
    assert "| torch | digits_mlp | Broken | 0.003 | 0 | TypeError:" in readme
    assert "| Broken | - | failed | 0 / 0 / 0 |" in readme


def test_each_process_keeps_its_own_ratio_of_medians_and_a_single_process_none():
    runs = [{"times": {"STAC": [2.0, 2.2, 9.0], "AdamW": [1.0, 1.0, 1.1]}},
            {"times": {"STAC": [3.0, 3.0, 3.3], "AdamW": [2.0, 2.0, 2.0]}}]
    assert _per_process_ratios(runs, "STAC", "AdamW") == pytest.approx([2.2, 1.5])
    assert _per_process_ratios(runs[:1], "STAC", "AdamW") is None


def test_jax_times_are_pooled_over_fresh_processes_with_each_ones_ratio_kept():
    block = run_jax({"large": QUICK_SHAPES["large"]}, 2, False, ["optax.adamw", "STAC"], 2)["large"]
    assert block["processes"] == 2
    for name, entry in block["optimizers"].items():
        assert len(entry["compile_s_each"]) == 2, name  # one compile in each process
        assert len(entry["ratio_to_yardstick_per_process"]) == 2 and entry["step_ms_median"] > 0, name
    assert block["optimizers"]["optax.adamw"]["ratio_to_yardstick_per_process"] == [1.0, 1.0]


def test_the_speed_benchmarks_quick_section():
    speed = run_speed("quick", progress=False)
    for framework, yardstick in (("torch", "AdamW fused"), ("jax", "optax.adamw")):
        for shape, block in speed[framework].items():
            assert block["optimizers"][yardstick]["ratio_to_yardstick"] == 1.0
            for name, entry in block["optimizers"].items():
                assert math.isfinite(entry["step_ms_median"]) and entry["step_ms_median"] > 0, (shape, name)
    for shape, block in speed["torch"].items():
        assert 0 < block["floor_gb_per_s"] < 10_000 and 0 < block["read_floor_gb_per_s"] < 10_000, shape
        assert block["read_floor_probe"] in ("torch sum", "C finite_read") and block["threads"] == 1, shape
        assert block["nonfinite_check_ms"] > 0 and block["nonfinite_bookkeeping_ms"] > 0, shape
        assert block["processes"] == 1 and block["nonfinite_read_floor_ms"] > 0, shape
        assert block["nonfinite_check_ratio_to_floor"] == pytest.approx(
            block["nonfinite_check_ms"] / block["nonfinite_read_floor_ms"]), shape
        assert {"AdamW8bit", "Adafactor"} & set(block["optimizers"]), shape
        for name, entry in block["optimizers"].items():
            # Every update reads no more than it moves, and at least p and g; its read-only pass is part of both.
            assert 8 * block["n_params"] <= entry["bytes_read_per_step"] <= entry["bytes_moved_per_step"], (shape, name)
            assert 0 <= entry["read_pass_bytes"] <= entry["bytes_read_per_step"], (shape, name)
            assert entry["read_floor_fraction"] > 0 and entry["floor_ms"] > 0, (shape, name)
            assert entry["ratio_to_floor"] == pytest.approx(entry["step_ms_median"] / entry["floor_ms"]), (shape, name)
            # The physical floor: the read-only pass at the read floor, the rest of the update at the bandwidth floor.
            update_bytes = entry["bytes_moved_per_step"] - entry["read_pass_bytes"]
            seconds = (update_bytes / block["floor_gb_per_s"] + entry["read_pass_bytes"] / block["read_floor_gb_per_s"])
            assert entry["physical_floor_ms"] == pytest.approx(1e-6 * seconds, rel=1e-9), (shape, name)
        assert block["optimizers"]["AdamW fused"]["floor_ratio_to_yardstick"] == pytest.approx(1.0)
    for name, entry in speed["torch_first_step"].items():
        assert entry["cold_s"] > 0 and entry["warm_s"] > 0 and entry["median_step_s"] > 0, name
        assert entry["cold_construct_s"] > 0 and entry["warm_construct_s"] > 0, name
        assert entry["kernels"] in ("packaged", "built", "none"), name
        assert entry["repeats"] == 1, name  # the quick mode's one pair of processes
    assert "STAC" in speed["torch_first_step"]
    fsdp2 = speed["torch_fsdp2"]
    assert fsdp2["world_size"] == 2 and fsdp2["optimizers"]["AdamW"]["ratio_to_yardstick"] == 1.0
    for name in ("STAC", "STAC recommended", "STAM", "STAMLite"):
        assert fsdp2["optimizers"][name]["step_ms_median"] > 0, name
        assert 0 < fsdp2["optimizers"][name]["state_bytes_per_rank"], name
    # JAX compile time: the median of each process's one compile.
    for shape, block in speed["jax"].items():
        assert block["processes"] == 1, shape
        for name, entry in block["optimizers"].items():
            assert len(entry["compile_s_each"]) == block["processes"], (shape, name)
            assert entry["compile_s"] == statistics.median(entry["compile_s_each"]) > 0, (shape, name)
            assert entry["ratio_to_yardstick_per_process"] is None, (shape, name)
            # STAM is held to the all-or-nothing floor measured in the same rounds (optax.adamw + a gradient read).
            if name == "STAM":
                assert entry["floor"] == "optax.adamw + gradient read", shape
                assert entry["floor_ms"] == block["nonfinite_floor_ms"] > 0, shape
                assert entry["ratio_to_floor"] == pytest.approx(entry["step_ms_median"] / entry["floor_ms"]), shape
            else:
                assert entry["floor"] is None and entry["ratio_to_floor"] is None, (shape, name)
        assert block["nonfinite_floor_ratio_to_yardstick"] == pytest.approx(
            block["nonfinite_floor_ms"] / block["optimizers"]["optax.adamw"]["step_ms_median"])


def test_the_non_finite_probes_read_the_models_gradients_in_one_buffer():
    import torch

    from benchmarks.speed import QUICK_SHAPES, nonfinite_probes, torch_model

    model = torch_model(QUICK_SHAPES["stack"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    probes = nonfinite_probes(model)
    assert probes["check"]() is True
    total = sum(p.grad.double().sum() for p in model.parameters())
    assert probes["gradient read"]().double().item() == pytest.approx(total.item(), abs=1e-3)
    next(model.parameters()).grad[0] = math.nan
    assert nonfinite_probes(model)["check"]() is False and probes["check"]() is True  # a copy, taken when made
    probes["gradient read"].__self__[-1] = math.nan  # the buffer torch's sum reads: the check reads it too
    assert probes["check"]() is False
