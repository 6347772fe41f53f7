"""The repository carries what its claims rest on: committed benchmark results."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _numbers(x: object) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [v for item in x.values() for v in _numbers(item)]
    if isinstance(x, list):
        return [v for item in x for v in _numbers(item)]
    return []


def test_benchmark_results_are_there_and_name_their_machine() -> None:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "benchmarks/results/*.json is missing: the README's cost table has nothing behind it"
    for f in files:
        data = json.loads(f.read_text())
        machine = data["machine"]
        assert machine["torch"] and machine["cpu_count"] >= 1 and machine["hostname"], f.name
        assert data["benchmark"] and data["date"], f.name
        numbers = _numbers({k: v for k, v in data.items() if k != "machine"})
        assert len(numbers) > 10, f"{f.name} holds no measurements"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_benchmark_results_are_not_ignored_by_git() -> None:
    for f in RESULTS.glob("*.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(f)], cwd=ROOT, check=False)
        assert ignored.returncode == 1, (
            f"{f.relative_to(ROOT)} is ignored by .gitignore, so it would not land"
        )


def test_readme_drop_in_example_runs(tmp_path: Path) -> None:
    """The README's first Python block (the drop-in example) runs as printed, from another folder,
    and prints finite outer losses, hypergradient norms and solver residuals."""
    import re
    import sys

    text = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + block)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[float(v) for v in line.split()] for line in out.stdout.strip().splitlines()]
    assert len(rows) >= 5 and all(len(r) == 3 for r in rows)
    assert all(all(v == v and abs(v) < float("inf") for v in r) for r in rows)
