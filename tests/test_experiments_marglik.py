"""Smoke tests: the marginal-likelihood experiments run end to end (``--quick``, seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--quick", "--no-plot", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_prior_precision_experiment_prints_both_tables() -> None:
    pytest.importorskip("sklearn")
    out = _run("marglik_prior_precision.py")
    assert "A. log evidence and its bounds" in out and "best precision:" in out
    assert "marginal likelihood, global, M=250" in out and "marginal likelihood, layer" in out


@pytest.mark.slow
def test_invariance_experiment_learns_a_range() -> None:
    pytest.importorskip("sklearn")
    out = _run("marglik_invariance.py")
    assert "learned translation range" in out and "no augmentation" in out
