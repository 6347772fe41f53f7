"""Round 12: the paper reproductions as a newcomer runs them — the headline chooses what the
validation set chooses, the launcher and the headlines survive small settings, and the thin
scripts' measured numbers are the committed ones. Runs are ``--quick`` (seconds each)."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from hypergrad import cli
from hypergrad.experiments import baselines

ROOT = Path(__file__).resolve().parent.parent


def _run(name: str, out: Path, *extra: str) -> dict[str, Any]:
    with redirect_stdout(io.StringIO()):
        assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------ baselines


def test_baselines_headline_takes_the_search_that_validation_prefers_not_the_best_test_number(
    tmp_path: Path,
) -> None:
    """The headline's "best of random/TPE" was the larger *test* accuracy of the two searches
    (and the smaller validation loss, possibly the other search's): the test set chose what was
    reported. Committed hyperclean: random 88.3% reported, where TPE's best trial had the better
    validation accuracy (0.870 vs 0.863) and 88.1%. Quick: TPE's 81.5% with random's val loss."""
    rec = _run("baselines", tmp_path / "b", "--set", "targets=hyperclean")
    full = [r for r in rec["table"] if r["method"] in ("random @ full", "tpe @ full") and r["trials"]]
    assert len(full) == 2
    by_val = max(full, key=lambda r: r["val acc"])  # hyperclean's searches choose by val acc
    by_test = max(full, key=lambda r: r["test acc"])
    assert by_val is not by_test  # the case that tells the two apart (deterministic at this seed)
    assert f"{by_val['test acc']:.1%} (val loss {by_val['val loss']:.3f})" in rec["headline"]
    assert f"{by_test['test acc']:.1%}" not in rec["headline"].split("its inner steps")[1]
    m = rec["metrics"]
    assert m["hyperclean.best_search.test_acc"] == by_val["test acc"]
    assert m["hyperclean.best_search.val_acc"] == by_val["val acc"]
    assert m["hyperclean.best_search.val_loss"] == by_val["val loss"]


def test_baselines_choice_follows_each_targets_validation_criterion() -> None:
    rows = [
        {"method": "random @ full", "val loss": 0.30, "val acc": 0.90, "test acc": 0.95},
        {"method": "tpe @ full", "val loss": 0.31, "val acc": 0.92, "test acc": 0.97},
    ]
    assert baselines._chosen(rows, "val_loss")["method"] == "random @ full"  # lower loss
    assert baselines._chosen(rows, "val_acc")["method"] == "tpe @ full"  # higher accuracy
    tie = [dict(rows[0], **{"val acc": 0.92}), rows[1]]
    assert baselines._chosen(tie, "val_acc")["method"] == "random @ full"  # the first of ties


# ------------------------------------------------------------------------ small settings, edges


def test_ddp_digits_with_fewer_steps_than_a_hyperstep_says_so_instead_of_crashing() -> None:
    """``python experiments/ddp_digits.py --steps 5`` (a smoke run, before trying torchrun)
    raised UnboundLocalError on ``info`` after training: the first hyperstep comes at step 10.
    ``--steps 0`` now stops at the parser, naming the option."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['ddp_digits.py', '--steps', '5']\n"
        f"runpy.run_path({str(ROOT / 'experiments' / 'ddp_digits.py')!r}, run_name='__main__')\n"
        "sys.argv = ['ddp_digits.py', '--steps', '0']\n"
        f"runpy.run_path({str(ROOT / 'experiments' / 'ddp_digits.py')!r}, run_name='__main__')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "UnboundLocalError" not in p.stderr
    assert "1 rank(s): no hyperstep yet (one every 10 steps); test loss" in p.stdout
    assert p.returncode == 2 and "--steps and --batch must be >= 1 (got --steps 0" in p.stderr


def test_accuracy_headline_names_the_budgets_that_ran(tmp_path: Path) -> None:
    """With none of the paper's budgets (1/5/20/100) in ``steps`` the headline read
    "neumann : ; cg : ; unrolled : " (no numbers); it now gives the budgets that ran."""
    rec = _run("accuracy", tmp_path / "a", "--set", "steps=3")
    m = rec["metrics"]
    for method in ("neumann", "cg", "unrolled"):
        assert f"{method} 3: {m[f'ridge.{method}(3).rel_error']:.2g}" in rec["headline"]
    assert " : " not in rec["headline"]


def test_hyperclean_without_corrupted_labels_reports_no_nan_and_no_flagging_scores(tmp_path: Path) -> None:
    """``--set corrupt=0`` (a sanity run: does re-weighting hurt clean data?) wrote
    ``weight_corrupted_mean: NaN`` into results.json (not JSON) and an F1 of 0.00 for a flagging
    with nothing to flag, in the metrics, the trajectory and the headline."""
    rec = _run("hyperclean", tmp_path / "h", "--set", "corrupt=0")
    m = rec["metrics"]
    assert all(math.isfinite(v) for v in m.values()), m
    assert "weight_corrupted_mean" not in m and not any(k.startswith("flag.") for k in m)
    assert "no label corrupted" in rec["headline"] and "F1" not in rec["headline"]
    header = (tmp_path / "h" / "trajectory.csv").read_text().splitlines()[0].split(",")
    assert "weight_clean" in header and "weight_corrupted" not in header and "f1" not in header
    json.loads((tmp_path / "h" / "results.json").read_text(), parse_constant=_no_nan)


def _no_nan(name: str) -> float:
    raise AssertionError(f"results.json holds {name}, which is not JSON")


# ------------------------------------------------------------------------- documented numbers


def test_stn_mnist1d_script_documents_the_committed_default_run() -> None:
    """experiments/stn_mnist1d.py listed, as the measured default of seeds 0-2, the numbers from
    before the standardisation fix (seed 0's STN test loss 0.921; the committed run: 0.937) and
    said the retrained network won on every seed (seed 1 lost on validation, 0.924 to 0.922)."""
    doc = (ROOT / "experiments" / "stn_mnist1d.py").read_text()
    m = json.loads((ROOT / "experiments" / "reports" / "stn_mnist1d" / "results.json").read_text())["metrics"]
    runs = ("best_fixed", "stn", "retrain", "final_fixed", "retrain_mean", "final_fixed_mean")
    for seed in (0, 1, 2):
        row = re.search(rf"^\s+{seed}\s+default\s+((?:\d\.\d+/\d\.\d+\s*)+)$", doc, re.M)
        assert row is not None, f"no unmarked default row for seed {seed}"
        cells = row.group(1).split()
        assert len(cells) == len(runs)
        for cell, key in zip(cells, runs, strict=True):
            val, test = (float(t) for t in cell.split("/"))
            assert val == round(m[f"seed{seed}.{key}.val_loss"], 3), (seed, key)
            assert test == round(m[f"seed{seed}.{key}.test_loss"], 3), (seed, key)
    mean = f"{m['stn.val_loss']:.3f} / {m['stn.test_loss']:.3f} against {m['best_fixed.val_loss']:.3f}"
    assert mean in " ".join(doc.split())
    assert "on every seed 0-5" not in doc


def test_baselines_headline_says_when_no_trial_fits_the_budget(tmp_path: Path) -> None:
    """``--set budget_multiple=0.1`` left the headline (the README table's "ours") empty."""
    rec = _run("baselines", tmp_path / "b", "--set", "targets=overfit_val", "--set", "budget_multiple=0.1")
    assert all(r["trials"] == 0 for r in rec["table"] if "@" in r["method"])
    assert rec["headline"] == "no black-box trial fits in 0.1x the hypergradient's inner steps (overfit_val)"
