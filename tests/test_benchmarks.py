"""The benchmark suite runs end to end at a tiny size and writes finite numbers (not a timed test:
nothing here is about speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _numbers(x: Any) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [v for y in x.values() for v in _numbers(y)]
    if isinstance(x, list):
        return [v for y in x for v in _numbers(y)]
    return []


def test_suite_tiny_writes_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--models",
        "mlp",
        "--tiny",
        "--repeats",
        "1",
        "--between",
        "1,2",
        "--cycles",
        "2",
        "--warm-train",
        "2",
        "--out",
        str(out),
        "--md",
        str(md),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["device"] == "cpu" and m["torch"] and m["torch_threads"] == 1
    assert "git_commit" in m and "cuda" in m
    r = data["models"]["mlp"]
    cases = r["cases"]
    for key in (
        "train_step",
        "grad",
        "hvp",
        "implicit/neumann-1",
        "implicit/neumann-3",
        "implicit/neumann-5",
        "implicit/cg-5",
        "implicit/neumann-5-head",
        "unrolled/k-1",
        "unrolled/k-5",
    ):
        row = cases[key]
        assert row["median_ms"] > 0 and math.isfinite(row["ratio_to_train_step"]), key
        assert row["peak_bytes"] >= 0 and math.isfinite(row["peak_ratio_to_train_step"]), key
    for key in ("hvp_no_penalty", "hvp_fwd_over_rev", "outer_step_unfused"):  # issue 9's alternatives
        assert cases[key]["median_ms"] > 0, key
    for key in ("implicit/neumann-5", "unrolled/k-5"):
        assert math.isfinite(cases[key]["ratio_to_floor"]) and cases[key]["floor_ms"] > 0
    # a peer either ran (with a ratio to hypergrad and an agreement) or says why not
    for key in ("torchopt/neumann-5", "higher/k-5"):
        row = cases[key]
        if "error" in row:
            assert row["error"]
        else:
            assert math.isfinite(row["ratio_to_hypergrad"])
            assert r["agreement"][key]["rel_diff"] < 1e-4
    # a hyperstep holds a graph, so its peak is above zero; the training step's is the unit
    assert cases["implicit/neumann-5"]["peak_bytes"] > 0 and cases["train_step"]["peak_bytes"] > 0
    b = r["between_hypersteps"]
    assert [x["inner_steps"] for x in b["implicit_peak_vs_inner_steps"]] == [1, 2]
    assert b["unrolled/k-5"]["cycles"][-1]["held_before_hyperstep_bytes"] > 0
    # hypersteps after every step: still within two snapshots (+ hyperparameter copies)
    every = b["unrolled/k-5/every-1"]
    assert every["steps_between_hypersteps"] == 1 and len(every["cycles"]) >= 7
    for x in (b["unrolled/k-5"], every):
        assert 0 < x["cycles"][-1]["held_before_hyperstep_bytes"] <= x["documented_bound_bytes"]
    nums = _numbers(data["models"])
    assert nums and all(math.isfinite(v) for v in nums)
    text = md.read_text()
    assert "| Implicit, Neumann-5 |" in text and "Unrolled, K = 5" in text and "nan" not in text.lower()


def test_suite_runs_every_loss_under_bf16_autocast(tmp_path: Path) -> None:
    """``--autocast bf16``: the plain step, hypergrad and the peers all run their losses under
    autocast (the issue's bf16 figures); the JSON says so and the numbers are finite."""
    out = tmp_path / "bf16.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--models",
        "cnn",
        "--tiny",
        "--repeats",
        "1",
        "--warm-train",
        "2",
        "--no-memory",
        "--autocast",
        "bf16",
        "--out",
        str(out),
        "--md",
        str(tmp_path / "bf16.md"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["autocast"] == "bf16"
    cases = data["models"]["cnn"]["cases"]
    for key in ("train_step", "hvp", "implicit/neumann-5", "unrolled/k-5"):
        assert cases[key]["median_ms"] > 0 and math.isfinite(cases[key]["ratio_to_train_step"]), key
    assert cases["hvp_fwd_over_rev"]["error"] == "not run under --autocast"
    agreement = data["models"]["cnn"]["agreement"]
    if "torchopt/neumann-5" in agreement:  # same autocast losses, same hypergradient
        assert agreement["torchopt/neumann-5"]["rel_diff"] < 1e-3


def test_fits_measures_the_gpt_hyperstep_memory_and_extrapolates(tmp_path: Path) -> None:
    """``benchmarks/fits.py`` (the ~100M GPT's memory question) at the tiny size: live bytes
    counted, peaks above them measured, and a positive slope in the batch."""
    out = tmp_path / "fits.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "fits.py"),
        "--size",
        "tiny",
        "--batch",
        "2,8",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [2, 8]
    for r in rows:
        live = r["live_bytes"]
        assert (
            live["weights"] == live["hparams"] == live["momentum"] > 0
        )  # one decay per weight, SGD momentum
        assert 0 <= live["outer_state"] - 2 * live["hparams"] < 1000  # Adam's two moments (and steps)
        assert 0 < r["train_step_peak_above_live_gib"] < r["hyperstep_peak_above_live_gib"]
    assert data["fit"]["slope_gib_per_sequence"] > 0
