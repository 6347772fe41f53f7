"""Smoke tests: every experiment at its ``--quick`` size writes finite results, a CSV and its plots,
and moves in the direction its paper claims (a cheap check, not the claim itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / name
    assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    rec = json.loads((out / "results.json").read_text())
    metrics = rec["metrics"]
    assert metrics and all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()), (
        metrics
    )
    assert rec["plots"] and all((out / p).stat().st_size > 1000 for p in rec["plots"])
    assert (out / "trajectory.csv").stat().st_size > 0
    assert rec["size"] == "quick" and rec["headline"]
    return metrics


def test_every_experiment_has_a_quick_test_here() -> None:
    load_all()
    text = Path(__file__).read_text()
    missing = [n for n in REGISTRY if f'run_quick("{n}"' not in text]
    assert not missing, f"experiments without a smoke test: {missing}"


def test_accuracy(tmp_path: Path) -> None:
    m = run_quick("accuracy", tmp_path)
    assert m["ridge.neumann(5).rel_error"] < m["ridge.neumann(1).rel_error"]
    assert m["ridge.cg(5).rel_error"] < m["ridge.cg(1).rel_error"]
    assert m["ridge.cg(5).cosine"] > 0.99


@pytest.mark.parametrize("method", ["neumann", "unrolled"])
def test_overfit_val(tmp_path: Path, method: str) -> None:
    m = run_quick("overfit_val", tmp_path, "--method", method)
    assert m["n_hparams"] > 1000
    assert m["val_loss"] <= m["baseline.val_loss"] * 1.01  # tuned on validation: no worse there


def test_hyperclean(tmp_path: Path) -> None:
    m = run_quick("hyperclean", tmp_path)
    assert m["weight_corrupted_mean"] < m["weight_clean_mean"]


def test_logreg_cv(tmp_path: Path) -> None:
    m = run_quick("logreg_cv", tmp_path)
    lam0 = REGISTRY["logreg_cv"].defaults["lam0"]
    # the hypergradient moved lambda towards the grid's best
    assert abs(math.log(m["hypergrad.lambda"] / m["grid.best_lambda"])) < abs(
        math.log(lam0 / m["grid.best_lambda"])
    )


def test_hd(tmp_path: Path) -> None:
    m = run_quick("hd", tmp_path)
    assert m["sgd-hd@0.001.lr_end"] > 0.001  # too small a learning rate rises on its own
    assert m["adam-hd@1e-05.lr_end"] > 1e-05


def test_distill(tmp_path: Path) -> None:
    m = run_quick("distill", tmp_path)
    assert 0.0 <= m["learned.test_acc"] <= 1.0
    rows = [line.split(",") for line in (tmp_path / "distill" / "trajectory.csv").read_text().splitlines()]
    loss = [float(r[rows[0].index("outer_loss")]) for r in rows[1:]]
    assert min(loss[-3:]) < loss[0]  # the learned images lower the loss on real digits


def test_baselines(tmp_path: Path) -> None:
    m = run_quick("baselines", tmp_path)
    for target in ("overfit_val", "hyperclean"):
        assert m[f"{target}.hg_cost"] > 0
        assert f"{target}.random@full.test_acc" in m and f"{target}.tpe@full.test_acc" in m
    rec = json.loads((tmp_path / "baselines" / "results.json").read_text())
    searched = {r["searches"] for r in rec["table"]}
    assert {"one global weight decay", "drop fraction q (loss threshold)"} <= searched


def test_augment(tmp_path: Path) -> None:
    m = run_quick("augment", tmp_path)
    assert m["n_hparams"] > 1000
    rows = [line.split(",") for line in (tmp_path / "augment" / "trajectory.csv").read_text().splitlines()]
    loss = [float(r[rows[0].index("outer_loss")]) for r in rows[1:]]
    assert loss[-1] < loss[0]  # the classifier learns on augmented images: clean validation loss falls


def test_lstm_lm(tmp_path: Path) -> None:
    m = run_quick("lstm_lm", tmp_path)
    assert m["corpus_chars"] > 40_000  # scikit-learn's bundled text, read offline
    assert m["per_weight.val_ppl"] < m["vocab"]  # better than a uniform guess over the characters


def test_stn_ridge(tmp_path: Path) -> None:
    m = run_quick("stn_ridge", tmp_path)
    # the quick schedule is too short to judge the claim, but lambda moves from 1 toward lambda*
    assert abs(math.log(m["lambda"] / m["lambda_star"])) < abs(math.log(1.0 / m["lambda_star"]))


def test_stn_mnist1d(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    m = run_quick("stn_mnist1d", tmp_path)
    assert m["stn.nonfinite"] == 0.0
    assert 0.0 < m["stn.dropout.0"] < 0.9 and 0.0 < m["stn.dropout.1"] < 0.9
    assert m["stn.val_loss"] < math.log(10)  # better than a uniform guess over the 10 classes


def test_marglik_precision(tmp_path: Path) -> None:
    m = run_quick("marglik_precision", tmp_path)
    assert m["best.M=250.factor"] <= 10  # the bound's best precision near the exact evidence's
    assert m["ml.global.M=100.precision.0"] > 0 and m["ml.layer.M=100.precision.1"] > 0
    rows = (tmp_path / "marglik_precision" / "trajectory.csv").read_text().splitlines()
    assert rows[0].startswith("step,run,") and len(rows) > 3


def test_marglik_invariance(tmp_path: Path) -> None:
    m = run_quick("marglik_invariance", tmp_path)
    assert m["range.y"] > 0 and m["range.x"] > 0
    assert 0.1 <= m["augmented.test_acc"] <= 1.0 and 0.1 <= m["plain.test_acc"] <= 1.0
