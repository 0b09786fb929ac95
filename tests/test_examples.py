"""The seeds' quickstarts (kept verbatim in examples/) run against the package."""

import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name):
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_seed_000_quickstart_prints_the_trunk_and_the_cap():
    # Linear layers of nn.Sequential are registered as "0", "2", "4"; the last one is the cap.
    output = run_example("seed_000_quickstart.py")
    assert "trunk: ('0', '2')" in output or "trunk: ['0', '2']" in output, output
    assert "cap: ('4',)" in output or "cap: ['4']" in output, output


def test_seed_001_quickstart_prints_the_sign_and_adamw_layers():
    output = run_example("seed_001_quickstart.py")
    assert "sign layers: ('0', '2')" in output or "sign layers: ['0', '2']" in output, output
    assert "adamw layers: ('4',)" in output or "adamw layers: ['4']" in output, output


def test_seed_002_quickstart_trains_with_both_classes():
    output = run_example("seed_002_quickstart.py")
    for name in ("STAM", "STAMLite"):
        match = re.search(rf"^{name} loss: ([0-9.]+) -> ([0-9.]+)$", output, re.MULTILINE)
        assert match, output
        initial, final = map(float, match.groups())
        assert final < 0.9 * initial, output
