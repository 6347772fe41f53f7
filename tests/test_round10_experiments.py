"""Round 10: the paper reproductions audited as a reviewer would — compute counted as claimed,
no validation data in the normalisation, sizes that a ``--set`` shrinks still run or say why.
Each test runs an experiment at its ``--quick`` size (seconds)."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all


def _run(name: str, out: Path, *extra: str) -> dict[str, Any]:
    with redirect_stdout(io.StringIO()):
        assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------ baselines


def test_baselines_hyperclean_pays_the_shared_ranking_run_once_not_per_trial(tmp_path: Path) -> None:
    """Every hyperclean trial reuses one first run (it ranks the examples by loss); the search was
    charged two runs per trial (trial 3 at 144 inner steps instead of 96), so the black box got
    about half the trials that equal compute buys it."""
    rec = _run("baselines", tmp_path / "b", "--set", "targets=hyperclean")
    hc = {**REGISTRY["hyperclean"].defaults, **REGISTRY["hyperclean"].quick}
    run_steps = hc["epochs"] * math.ceil(hc["n_train"] / hc["batch_size"])
    rows = [r for r in rec["table"] if "@" in r["method"] and r["trials"]]
    assert rows
    for r in rows:  # (a trial trains on the examples it keeps: at most run_steps, round 26)
        assert run_steps < r["budget (inner steps)"] <= run_steps * (1 + r["trials"]), r
    hg_cost = rec["metrics"]["hyperclean.hg_cost"]
    full = next(r for r in rows if r["method"] == "random @ full")
    budget = rec["config"]["budget_multiple"] * hg_cost
    # as many trials as the budget (or max_trials) allows, and no more
    allowed = min(int((budget - run_steps) // run_steps), rec["config"]["max_trials"])
    assert full["trials"] >= allowed  # (charged what each trial took, more may fit)


def test_baselines_target_size_follows_the_size_not_max_trials(tmp_path: Path) -> None:
    """``--quick --set max_trials=4`` silently ran the targets at their default size (the size was
    guessed from ``max_trials <= 3``): hyperclean's cost was that of 60 epochs, not 4."""
    a = _run("baselines", tmp_path / "a", "--set", "targets=hyperclean")
    b = _run("baselines", tmp_path / "b", "--set", "targets=hyperclean", "--set", "max_trials=4")
    assert b["metrics"]["hyperclean.hg_cost"] == a["metrics"]["hyperclean.hg_cost"]
    assert b["config"]["target_size"] == "quick"
    # and the default size keeps the targets' defaults
    assert REGISTRY["baselines"].defaults["target_size"] == "default"


def test_baselines_refuses_an_unknown_target_size(tmp_path: Path) -> None:
    with redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        cli.main(["run", "baselines", "--quick", "--no-progress", "--out", str(tmp_path / "x"),
                  "--set", "target_size=huge"])  # fmt: skip
    assert not (tmp_path / "x" / "results.json").exists()


# ---------------------------------------------------------------------------------- stn_mnist1d


def test_stn_mnist1d_standardises_with_training_signals_only() -> None:
    """The mean and standard deviation came from all 4,000 generated training signals, the 1,000
    validation signals (and the unused rest) included: with 300 training signals their mean and
    std came out -0.0013 and 0.984 (at the default 1,500: 0.0059 and 1.005) rather than 0 and 1."""
    load_all()
    from hypergrad.experiments import stn_mnist1d

    d = stn_mnist1d.load_data(0, 300)
    x = d.train[0].double()
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-5
    assert len(d.val[0]) == 1000 and len(d.train[0]) == 300


# -------------------------------------------------------------------------------------- distill


def test_distill_with_few_training_digits_picks_a_real_image_of_each_class(tmp_path: Path) -> None:
    """With ``--set n_train=60`` a class has fewer than 10 digits and the baseline's pick
    (a random one of the first 10) raised IndexError."""
    rec = _run("distill", tmp_path / "d", "--set", "n_train=60")
    assert all(math.isfinite(v) for v in rec["metrics"].values())


def test_distill_names_a_class_missing_from_a_tiny_training_set(tmp_path: Path) -> None:
    from hypergrad.experiments.common import digits_split

    n = 12
    y = digits_split(0, n, 0, torch.device("cpu"))[0][1]
    missing = sorted(set(range(10)) - set(y.tolist()))
    assert missing  # 12 shuffled digits miss a class
    with redirect_stdout(io.StringIO()), pytest.raises(ValueError, match=f"no example of class {missing[0]}"):
        cli.main(["run", "distill", "--quick", "--no-progress", "--out", str(tmp_path / "t"),
                  "--set", f"n_train={n}"])  # fmt: skip


# --------------------------------------------------------------------------- marglik_invariance


def test_marglik_invariance_with_no_hyperstep_reports_the_initial_precision(tmp_path: Path) -> None:
    """``--set steps=10`` (within the burn-in of 20): no hyperstep ran and the headline raised
    KeyError 'augmented.precision.0' after the whole run."""
    rec = _run("marglik_invariance", tmp_path / "m", "--set", "steps=10")
    m = rec["metrics"]
    assert m["plain.precision.0"] == pytest.approx(1.0) and m["augmented.precision.0"] == pytest.approx(1.0)
    init = rec["config"]["init_range"]
    assert m["range.y"] == pytest.approx(init) and m["range.x"] == pytest.approx(init)


# ------------------------------------------------------------------------------------ logreg_cv


def test_logreg_cv_reports_the_loss_evaluations_of_the_grid_and_of_the_hypergradient(tmp_path: Path) -> None:
    """Solves are not equal work (the hypergradient's are warm-started, and each hyperstep adds
    CG's HVPs): the evaluations are counted, and the grid's match an independent count."""
    load_all()
    import numpy as np

    from hypergrad.experiments import logreg_cv as lc

    rec = _run("logreg_cv", tmp_path / "l", "--set", "outer_steps=20")  # reaches the grid's best
    m, cfg = rec["metrics"], rec["config"]
    train, _, _ = lc._data(cfg["seed"], cfg["n_train"], cfg["n_val"], torch.device("cpu"))
    evals = 0
    for lam in np.logspace(math.log10(cfg["lam_min"]), math.log10(cfg["lam_max"]), cfg["grid"]):
        model = torch.nn.Linear(train[0].shape[1], 1).double()
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        evals += lc.solve_inner(model, lc.hg.hparams.WeightDecay(model, per="global", init=float(lam)), train)
    assert m["grid.loss_evals"] == evals > cfg["grid"]
    rows = {r["method"].split(" (")[0]: r for r in rec["table"]}
    assert rows["grid"]["loss evaluations"] == evals
    solves = m["hypergrad.solves_to_grid_val"]
    assert solves > 0
    assert m["hypergrad.loss_evals_to_grid_val"] >= solves
    assert rows["hypergradient"]["loss evaluations"] == m["hypergrad.loss_evals_to_grid_val"]
    assert rows["hypergradient"]["HVPs"] == m["hypergrad.hvps_to_grid_val"] > 0
    assert f"{int(m['hypergrad.hvps_to_grid_val'])} HVPs" in rec["headline"]


def test_stn_mnist1d_names_and_reports_a_two_decimal_grid_rate_exactly(tmp_path: Path) -> None:
    """``--set grid=0.05,0.25``: the runs were named 'fixed dropout 0.1' and 'fixed dropout 0.2'
    (``{p:.1f}``), and ``best_fixed.rate``, read back from the name, said 0.1 or 0.2 instead of
    0.05 or 0.25."""
    rec = _run("stn_mnist1d", tmp_path / "s", "--set", "grid=0.05,0.25", "--set", "epochs=1",
               "--set", "plot=false")  # fmt: skip
    m = rec["metrics"]
    names = {r["run"] for r in rec["table"]}
    assert {"fixed dropout 0.05", "fixed dropout 0.25"} <= names
    best = min((0.05, 0.25), key=lambda p: m[f"seed0.fixed@{p:g}.val_loss"])
    assert m["seed0.best_fixed.rate"] == best


# ------------------------------------------------------------------------------------------- hd


def test_hd_table_and_metrics_agree_on_a_diverged_run(tmp_path: Path) -> None:
    """From α₀ = 100 SGD blows up without a NaN: the table said train loss 1.4e18 while
    results.json's metric said 1e6, and a run that did hit a NaN got a test accuracy of 0.1
    written in rather than measured."""
    rec = _run("hd", tmp_path / "h", "--set", "sgd_lrs=100")
    m = rec["metrics"]
    for row in rec["table"]:
        name = f"{row['optimizer']}@{row['lr0']:g}"
        assert row["train loss"] == m[f"{name}.train_loss"]
        assert row["test acc"] == m[f"{name}.test_acc"]
        assert (row["diverged"] == "yes") == (m[f"{name}.diverged"] == 1.0)
    assert m["sgd@100.diverged"] == 1.0 and m["sgd@100.train_loss"] == 1e6
    assert m["adam@1e-05.diverged"] == 0.0


# -------------------------------------------------------------------------------------- lstm_lm


def test_lstm_lm_refuses_a_window_longer_than_the_validation_text_before_training(tmp_path: Path) -> None:
    """``--set seq_len=6000``: the untuned and grid runs trained first, then drawing validation
    windows raised "random_ expects 'from' to be less than 'to'"."""
    with redirect_stdout(io.StringIO()), pytest.raises(ValueError, match=r"seq_len=6000 .*seq_len <= \d+"):
        cli.main(["run", "lstm_lm", "--quick", "--no-progress", "--out", str(tmp_path / "l"),
                  "--set", "seq_len=6000"])  # fmt: skip
    assert not list((tmp_path / "l").glob("*.png"))  # nothing trained, nothing plotted
