"""The main job's quick mode runs end to end and writes a complete report."""

import json
import math
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_mode_writes_a_complete_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("curves.png", "memory_vs_quality.png", "step_time.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert report["machine"]["cpu_count"] and report["date"]

    sys.path.insert(0, str(ROOT))
    from benchmarks import jax_tasks, optimizers, torch_tasks

    for framework, tasks in (("torch", torch_tasks.TASKS), ("jax", jax_tasks.TASKS)):
        quality = report["quality"][framework]
        assert set(quality) == set(tasks)
        for task, entries in quality.items():
            assert set(entries) - {"steps"} == set(optimizers.registry(framework)), (framework, task)
            for name, entry in entries.items():
                if name == "steps":
                    continue
                assert entry["step_ms"] > 0 and entry["state_bytes"] >= 0
                assert len(entry["sweep"]) == 1 and entry["seeds"] == 1
    # What STAC is for: less optimizer state than AdamW, on every task.
    for task, entries in report["quality"]["torch"].items():
        assert entries["STAC"]["state_bytes"] < entries["AdamW"]["state_bytes"], task
        assert entries["STAC plain sign"]["state_bytes"] < entries["STAC bf16 state"]["state_bytes"] \
            < entries["STAC"]["state_bytes"], task

    for framework, yardstick in (("torch", "AdamW fused"), ("jax", "optax.adamw")):
        for shape, block in report["speed"][framework].items():
            assert block["optimizers"][yardstick]["ratio_to_yardstick"] == 1.0
            for name, entry in block["optimizers"].items():
                assert math.isfinite(entry["step_ms_median"]) and entry["step_ms_median"] > 0, (shape, name)
    for shape, block in report["speed"]["torch"].items():
        assert 0 < block["floor_gb_per_s"] < 10_000 and 0 < block["read_floor_gb_per_s"] < 10_000, shape
        # The non-finite read floor is one read of every gradient (4 bytes per parameter) at the read floor.
        assert block["nonfinite_read_floor_ms"] == pytest.approx(
            4 * block["n_params"] / block["read_floor_gb_per_s"] * 1e-6, rel=1e-9), shape
        assert block["nonfinite_check_ms"] > 0, shape
        assert {"AdamW8bit", "Adafactor"} & set(block["optimizers"]), shape
        for name, entry in block["optimizers"].items():
            # Every update reads no more than it moves, and at least p and g; its read-only pass is part of both.
            assert 8 * block["n_params"] <= entry["bytes_read_per_step"] <= entry["bytes_moved_per_step"], (shape, name)
            assert 0 <= entry["read_pass_bytes"] <= entry["bytes_read_per_step"], (shape, name)
            assert entry["read_floor_fraction"] > 0 and entry["floor_ms"] > 0, (shape, name)
            assert entry["ratio_to_floor"] == pytest.approx(entry["step_ms_median"] / entry["floor_ms"]), (shape, name)
        assert block["optimizers"]["AdamW fused"]["floor_ratio_to_yardstick"] == pytest.approx(1.0)
    for name, entry in report["speed"]["torch_first_step"].items():
        assert entry["cold_s"] > 0 and entry["warm_s"] > 0 and entry["median_step_s"] > 0, name
        assert entry["kernels"] in ("packaged", "built", "none"), name
    assert "STAC" in report["speed"]["torch_first_step"]
    fsdp2 = report["speed"]["torch_fsdp2"]
    assert fsdp2["world_size"] == 2 and fsdp2["optimizers"]["AdamW"]["ratio_to_yardstick"] == 1.0
    for name in ("STAC", "STAC recommended", "STAM", "STAMLite"):
        assert fsdp2["optimizers"][name]["step_ms_median"] > 0, name
        assert 0 < fsdp2["optimizers"][name]["state_bytes_per_rank"], name
    # JAX compile time: the median of one compile per round.
    for shape, block in report["speed"]["jax"].items():
        for name, entry in block["optimizers"].items():
            assert len(entry["compile_s_each"]) == report["speed"]["compile_rounds"] == 2, (shape, name)
            assert entry["compile_s"] == statistics.median(entry["compile_s_each"]) > 0, (shape, name)
