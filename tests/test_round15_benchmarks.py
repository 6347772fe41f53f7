"""Round 15: the benchmark suite measures what benchmarks/README.md says it measures.

* The unit (the plain PyTorch train step) is the same loss, model, batch and optimiser as the
  hyperstep's inner problem, and does no more work than ``hopt.step``: its backward runs for the
  weights only (it used to also differentiate the penalty w.r.t. the hyperparameters and pile up
  their ``.grad``, work a training step does not need, charged to the unit every ratio divides by).
* higher's timed call takes the K differentiable inner steps itself, where hg.Unrolled takes them
  apart (untimed ``prepare``) and replays them in the hyperstep: the suite now times those steps
  and reports higher against hg's hyperstep *plus* its K steps beside the hyperstep alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import models  # noqa: E402


def test_plain_train_step_differentiates_only_the_weights() -> None:
    torch.manual_seed(0)
    prob = models.make_problem("mlp", "tiny", torch.device("cpu"))
    w0 = [w.detach().clone() for w in prob.weights]
    # the gradient the unit must use: the training loss (with its penalty) at the weights before
    expected = torch.autograd.grad(models.train_loss(prob.model, prob.hp, prob.train_batch), prob.weights)
    for h in prob.hparams:
        h.grad = None
    prob.torch_step()
    # no hypergradient-sized work or memory in the unit: the hyperparameters' .grad is untouched
    assert all(h.grad is None for h in prob.hparams)
    for w, g, g0 in zip(prob.weights, expected, w0, strict=True):
        assert w.grad is not None
        torch.testing.assert_close(w.grad, g, rtol=1e-5, atol=1e-7)
        # and the step is SGD(lr, momentum) on it: the first momentum buffer is the gradient itself
        torch.testing.assert_close(w.detach(), g0 - models.LR * g, rtol=1e-5, atol=1e-7)


def _rows_ratio(cases: dict, peer: str) -> tuple[float, float]:
    row, hg_row = cases[peer], cases[cases[peer]["peer_of"]]
    (p,), (h,), (s,) = row["samples_ms"], hg_row["samples_ms"], hg_row["prepare_samples_ms"]
    return p / h, p / (h + s)


def test_higher_is_compared_with_unrolled_plus_its_inner_steps(tmp_path: Path) -> None:
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--models",
        "mlp",
        "--tiny",
        "--repeats",
        "1",
        "--min-repeats",
        "1",
        "--warm-train",
        "1",
        "--no-memory",
        "--no-variants",
        "--out",
        str(out),
        "--md",
        str(md),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["models"]["mlp"]["cases"]
    # Unrolled's K real steps (its prepare) are timed: K hopt.step calls, each a training step
    for k in (1, 5):
        row = cases[f"unrolled/k-{k}"]
        assert row["prepare_ms"] > 0 and len(row["prepare_samples_ms"]) == 1
        # in matmul FLOPs exactly K plain train steps (hopt.step is one)
        assert math.isclose(row["prepare_flops_ratio_to_train_step"], k, rel_tol=1e-9)
        higher_row = cases[f"higher/k-{k}"]
        if "error" not in higher_row:  # higher's call does the hyperstep's replay's FLOPs, no more
            assert higher_row["flops"] == row["flops"]
    assert "prepare_ms" not in cases["implicit/neumann-5"]  # Implicit needs no steps of its own
    for key in ("higher/k-1", "higher/k-5"):
        row = cases[key]
        if "error" in row:  # higher not importable: recorded, nothing to compare
            assert row["error"]
            continue
        alone, with_steps = _rows_ratio(cases, key)
        # one round: the medians are the round's ratios, computed from the same samples
        assert math.isclose(row["ratio_to_hypergrad"], alone, rel_tol=1e-3)
        assert math.isclose(row["ratio_to_hypergrad_with_steps"], with_steps, rel_tol=1e-3)
        assert row["ratio_to_hypergrad_with_steps"] < row["ratio_to_hypergrad"]
    assert "torchopt" not in "".join(k for k, v in cases.items() if "ratio_to_hypergrad_with_steps" in v)
    text = md.read_text()
    if "error" not in cases["higher/k-5"]:
        assert "higher ÷ (hypergrad + its K inner steps)" in text and "with hg's K steps" in text


def test_fits_counts_the_hypergradient_and_highers_outer_state_as_live(tmp_path: Path) -> None:
    """fits.py's total = bytes live before the hyperstep + the peak above them. The previous
    hypergradient (the hyperparameters' ``.grad``, as many bytes as the weights here) and higher's
    own outer Adam state were live in the allocator but left out of the total."""
    out = tmp_path / "fits.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "fits.py"),
        "--size",
        "tiny",
        "--batch",
        "2,4",
        "--methods",
        "neumann-2,higher-2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["method"] for r in rows}) == ["higher-2", "neumann-2"]
    for r in rows:
        live = r["live_bytes"]
        assert live["hparam_grads"] == live["hparams"] > 0, r["method"]
        assert 0 <= live["outer_state"] - 2 * live["hparams"] < 1000, r["method"]  # Adam's moments
        assert math.isclose(r["live_total_gib"] * 2**30, sum(live.values()))
        total = r["live_total_gib"] + r["hyperstep_peak_above_live_gib"]
        assert math.isclose(r["hyperstep_total_gib"], total)
