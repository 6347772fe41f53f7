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
    from hypergrad.experiments import stn_mnist1d as exp

    out = "results/quick/stn_mnist1d"
    text = _run("experiments/stn_mnist1d.py", "--quick", "--out", out, monkeypatch=monkeypatch, capsys=capsys)
    assert "self-tuning" in text and "retrained on the STN's schedule (sampled)" in text
    assert "fixed dropout 0.0" in text and "its final held fixed (sampled" in text
    m = json.loads((ROOT / out / "results.json").read_text())["metrics"]
    # equal compute: every run (grid, STN, retraining) took the same 2 epochs x 12 inner steps
    assert m["equal_inner_steps"] == 1.0 and m["inner_steps"] == 24
    # direction: at the start the network underfits, so the STN first lowers its regularisation
    # (the default schedule's first ~20 epochs): both dropout rates fall below their initial 0.1
    # and the shift's continuous value below its initial 6.5 (the middle of integer 6's interval)
    assert m["stn.dropout.0"] < 0.1 and m["stn.dropout.1"] < 0.1
    assert m["stn.shift.continuous"] < exp.MAX_SHIFT // 2 + 0.5


def test_mnist1d_schedule_replays_the_values_in_force_and_their_draws() -> None:
    from hypergrad.experiments import stn_mnist1d as exp

    hp = exp.stn_hparams()
    sch = exp.Schedule.start(hp)
    rows = [hp.raw.detach().clone()]
    for step, shift in ((2, 3), (4, 9)):  # two hypersteps, 2 and 4 inner steps in
        with torch.no_grad():
            hp.raw.copy_(hp.raw - 0.5)
            hp.raw[2] = hp.specs["shift"].raw(torch.tensor(float(shift)))
        sch.record(step)
        rows.append(hp.raw.detach().clone())
    gen = torch.Generator().manual_seed(0)
    mean, frozen = sch.setting(sample=False), sch.setting(sample=False, frozen=True)
    for step, row in ((0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (50, 2)):
        rates, shift = mean(step, 8, gen)
        v = hp.values_of(rows[row])
        assert rates == pytest.approx((float(v["dropout"][0]), float(v["dropout"][1]))), step
        assert shift == int(v["shift"]) == (6, 3, 9)[row]
        assert frozen(step, 8, gen)[1] == 9
    # sampled: per-example draws from N(lambda, sigma^2) mapped through the transforms; their
    # mean shift is the schedule's exact expectation, and with sigma -> 0 the mean values
    (r0, r1), shifts = sch.setting(sample=True)(2, 20_000, gen)
    assert isinstance(shifts, torch.Tensor) and shifts.shape == (20_000,) and r0.shape == (20_000,)
    assert len(set(shifts.tolist())) > 2 and float(r0.std()) > 0.01
    assert float(shifts.float().mean()) == pytest.approx(float(sch.expected("shift", 1)), abs=0.05)
    assert abs(float(sch.expected("shift", 1)) - 3) > 0.05  # not vacuous: the draws are not the mean
    sch.scale = torch.zeros_like(sch.scale)
    (r0, _), shifts = sch.setting(sample=True)(3, 16, gen)
    assert set(shifts.tolist()) == {3} and float(r0.std()) == 0.0


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
