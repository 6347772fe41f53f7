"""The repository carries what its claims rest on: committed benchmark results."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_benchmark_results_are_there_and_name_their_machine() -> None:
    files = sorted(RESULTS.glob("*.json"))
    assert files, "benchmarks/results/*.json is missing: the README's cost table has nothing behind it"
    for f in files:
        data = json.loads(f.read_text())
        machine = data["machine"]
        assert machine["torch"] and machine["device"] and machine["cpu_count"] >= 1, f.name
        assert data["models"], f.name
        for model in data["models"].values():
            assert model["train_step"]["torch_step"]["median_ms"] > 0 and model["hypersteps"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_benchmark_results_are_not_ignored_by_git() -> None:
    for f in RESULTS.glob("*.json"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(f)], cwd=ROOT, check=False)
        assert ignored.returncode == 1, (
            f"{f.relative_to(ROOT)} is ignored by .gitignore, so it would not land"
        )
