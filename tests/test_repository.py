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
