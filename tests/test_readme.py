"""The README is for users: every Python block in it runs as written, it stays short, and its headline table is
the committed benchmark report's."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_the_readme_is_short_and_has_python_blocks():
    assert len(README.encode("utf-8")) <= 12 * 1024 + 512  # "at most about 12 KB"
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_runs_as_written(index, tmp_path):
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"block {index} failed:\n{BLOCKS[index]}\n{result.stderr}"


def test_the_headline_table_is_the_committed_reports():
    committed = json.loads((ROOT / "docs" / "benchmark" / "report.json").read_text())
    table = re.search(r"<!-- headline:start -->\n(.*?)<!-- headline:end -->", README, re.DOTALL)
    assert table, "README lacks the headline markers"
    assert table.group(1).strip() == report.headline_table(committed).strip()
