"""Smoke tests of the marginal-likelihood experiments (``--quick``, seconds) with direction checks:
cheap consequences of the claims that fail when the machinery or the protocol breaks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hypergrad import cli


def _quick(name: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / name
    assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), "--set", "plot=false"]) == 0
    rec: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(v) for v in rec["metrics"].values()), rec["metrics"]
    return rec


@pytest.mark.slow
def test_prior_precision_experiment_directions(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    rec = _quick("marglik_precision", tmp_path)
    m, cfg = rec["metrics"], rec["config"]
    grid = [float(v) for v in cfg["grid"].split(",")]
    assert m["best.M=100.factor"] <= 3 and m["best.M=250.factor"] <= 3
    for delta in grid:  # Fischer: smaller blocks, a lower bound (M = 50 blocks refine M = 100's)
        g = f"grid.{delta:g}"
        assert m[f"{g}.M=50"] <= m[f"{g}.M=100"] + 1e-6 <= m[f"{g}.exact"] + 2e-6
        assert m[f"{g}.M=250"] <= m[f"{g}.exact"] + 1e-6
    # the diagnosis of part B: weights trained at a small precision make the fixed-weights bound
    # prefer a larger one (the curve lies above y = x there), and at a large one a smaller one
    assert m[f"grid.{grid[0]:g}.fixed_weights_best"] > 2 * grid[0]
    assert m[f"grid.{grid[-1]:g}.fixed_weights_best"] < grid[-1]
    # learned online the global precision rises from its init (1) toward that fixed point
    learned, target = m["ml.global.M=100.precision.0"], m["ml.global.M=100.fixed_weights_best"]
    assert learned > 1.1 and abs(math.log(learned / target)) < abs(math.log(target))
    # the learned runs are reported with the validation-chosen grid, per seed and as the mean
    methods = {row["method"] for row in rec["table"]}
    assert {"grid, best validation accuracy", "marginal likelihood, global, M=100"} <= methods
    assert "marginal likelihood, layer, M=100 (training images only)" in methods
    assert "marginal likelihood, global, M=250 (training images only)" in methods
    assert "mean.ml.global.M=100.gap_points" in m and "best precision:" in rec["headline"]
    mean = [r for r in rec["table"] if r["method"] == "marginal likelihood, global, M=100"]
    assert len(mean) == 1 and mean[0]["test acc"] == m["mean.ml.global.M=100.test_acc"]


@pytest.mark.slow
def test_invariance_experiment_learns_a_range(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    rec = _quick("marglik_invariance", tmp_path)
    m, cfg = rec["metrics"], rec["config"]
    # the range grows from its init on both axes (the data hold translations of up to 2 px)
    assert m["range.y"] > 2 * cfg["init_range"] and m["range.x"] > 2 * cfg["init_range"]
    assert m["range.y"] < 4.0 and m["range.x"] < 4.0
    # one global precision, learned: it leaves its init and stays finite in both runs
    assert 1.5 < m["plain.precision.0"] < 100 and 1.5 < m["augmented.precision.0"] < 100
    assert "plain.precision.1" not in m
    assert 0.1 <= m["augmented.test_acc"] <= 1.0 and 0.1 <= m["plain.test_acc"] <= 1.0
