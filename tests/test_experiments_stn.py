"""The self-tuning experiments and benchmark: the ridge toy's claim, and smoke runs (``--quick``)."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypergrad.experiments import stn_ridge as toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_response_recovers_the_validation_optimal_ridge_penalty(seed: int) -> None:
    r = toy.best_response(seed, warmup=150, steps=500)  # a shorter schedule than the experiment's
    assert r.error_decades <= toy.TOLERANCE_DECADES, (r.log_lambda, r.log_lambda_star)
    assert r.val_learned <= r.val_star * (1 + 1e-3)  # and its validation loss is the optimum's
    # not a vacuous claim: the optimum is far from where the penalty started (lambda = 1)
    assert abs(r.log_lambda_star) / math.log(10) > 0.5


def test_ridge_optimum_is_a_minimum_of_the_closed_form() -> None:
    data = toy.make_data(0)
    star = toy.optimal_log_lambda(data)
    best = toy.ridge_val_loss(data, star)
    assert best <= toy.ridge_val_loss(data, star - 0.05) and best <= toy.ridge_val_loss(data, star + 0.05)


def _run(script: str, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``script --quick``-style in this process (no interpreter start-up); torch's thread
    count, which the scripts set to 1, is restored."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.chdir(ROOT)
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_ridge_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert "validation optimum" in _run(
        "experiments/stn_ridge.py",
        "--quick",
        "--out",
        "results/quick/stn_ridge",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )


def test_mnist1d_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mnist1d")
    text = _run(
        "experiments/stn_mnist1d.py",
        "--quick",
        "--out",
        "results/quick/stn_mnist1d",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert "self-tuning" in text and "retrained with the STN schedule" in text and "fixed dropout 0.0" in text


def test_benchmark_quick_and_committed_results(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _run("benchmarks/selftuning.py", "--quick", monkeypatch=monkeypatch, capsys=capsys)
    assert "parameters" in text
    path = ROOT / "benchmarks" / "results" / "selftuning-cpu-2core.json"
    report = json.loads(path.read_text())
    assert report["machine"]["torch_threads"] == 1 and not report["settings"]["quick"]
    assert {r["model"] for r in report["results"]} >= {"mlp-40-256-256-10", "cnn1d-2x32"}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
    assert ignored.returncode == 1, "the benchmark results must not be git-ignored"
