"""Hardening of what users touch above the API: the ``hypergrad`` command's settings, run folders,
report and show, progress bars, wandb sweeps' settings, and ``hg.log.Logger``'s values."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all
from hypergrad.experiments.common import Context, check_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "setting", "words"),
    [
        ("overfit_val", "epochs=-5", ["epochs=-5", "an integer >= 1"]),  # ran, silently, 0 steps
        ("overfit_val", "hyper_lr=nan", ["hyper_lr=nan", "a number > 0"]),  # was a torch traceback
        ("overfit_val", "hyper_every=0", ["hyper_every", ">= 1"]),
        ("overfit_val", "seed=-1", ["seed=-1", "an integer in [0,"]),
        ("accuracy", "steps=1,x", ["steps='1,x'", "comma-separated integers >= 1"]),
        ("accuracy", "problems=ridge,foo", ["problems", "ridge, logistic"]),
        ("baselines", "targets=overfit", ["targets", "overfit_val, hyperclean"]),
        ("hyperclean", "corrupt=1.0", ["corrupt=1.0", "[0, 1)"]),
        ("stn_mnist1d", "grid=0.1,1.5", ["grid='0.1,1.5'", "[0, 1)"]),
        ("stn_mnist1d", "shift_init=99", ["shift_init=99", "[0, 12]"]),
        ("marglik_precision", "seeds=0", ["seeds=0", ">= 1"]),  # was silently max(1, seeds)
        ("stn_mnist1d", "seeds=0,1,2", ["seeds", "expected an integer", "an integer >= 1"]),
        ("hd", "sgd_lrs=0.1,-1", ["sgd_lrs", "numbers > 0"]),
        # settings fine alone, wrong together (each used to run: a reversed grid, a NaN loss deep
        # in the run, a traceback after the start, 500 validation examples instead of 1,000)
        ("logreg_cv", "lam_min=1000", ["lam_min=1000.0, lam_max=100.0", "lam_min < lam_max"]),
        ("logreg_cv", "n_train=600", ["n_train=600, n_val=185", "<= 568", "breast_cancer"]),
        ("hyperclean", "n_train=1700", ["n_train=1700, n_val=100", "n_train + n_val <= 1796"]),
        ("distill", "n_train=1797", ["n_train=1797", "<= 1796"]),
        ("stn_mnist1d", "n_train=3500", ["setting n_train=3500 is not allowed", "n_train <= 3000"]),
        ("marglik_invariance", "subset=400", ["subset=400, n_train=300", "subset <= n_train"]),
        ("marglik_invariance", "canvas=9", ["canvas=9", "an even canvas"]),
    ],
)
def test_bad_settings_are_refused_before_running(name: str, setting: str, words: list[str]) -> None:
    load_all()
    with pytest.raises(SystemExit) as e:
        cli.build_config(REGISTRY[name], "quick", [setting])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_every_size_of_every_experiment_passes_its_own_checks() -> None:
    load_all()
    for exp in REGISTRY.values():
        for size in ("default", "quick", "paper"):
            cli.build_config(exp, size, [])  # raises SystemExit if a committed size were refused
    with pytest.raises(ValueError, match="solver_steps"):
        check_settings(REGISTRY["overfit_val"], {"solver_steps": 2.5})  # a float where an int goes


def test_bad_setting_exit_code_and_stderr(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hypergrad", "run", "overfit_val", "--quick", "--set", "epochs=0",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode != 0
    assert "epochs=0" in done.stderr and ">= 1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_show_prints_what_each_setting_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["show", "hyperclean"]) == 0
    out = capsys.readouterr().out
    assert "corrupt = 0.5  [a number in [0, 1)]" in out and "epochs = 60  (quick: 4)" in out
    assert "and: n_train + n_val <= 1796 (scikit-learn's digits has 1797 examples" in out
    with pytest.raises(SystemExit, match="no experiment 'nope'; experiments: accuracy, "):
        cli.main(["show", "nope"])


# ------------------------------------------------------------------------------------ run folders


def test_second_run_into_the_same_folder_replaces_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a folder with spaces"
    assert cli.main(["run", "accuracy", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert (out / "error_vs_steps.png").exists()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert "replacing the previous run" in capsys.readouterr().err
    rec = json.loads((out / "results.json").read_text())
    assert rec["experiment"] == "stn_ridge"
    # no plot of the first run left beside the second's results; the user's own file kept
    assert sorted(p.name for p in out.glob("*.png")) == sorted(rec["plots"]) == ["stn_ridge.png"]
    assert (out / "notes.txt").read_text() == "mine"
    with (out / "trajectory.csv").open() as f:
        assert "lambda" in next(csv.reader(f))


def test_same_command_twice_gives_identical_numbers(tmp_path: Path) -> None:
    for d in ("a", "b"):
        assert cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(tmp_path / d)]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["metrics"] == b["metrics"]
    assert (tmp_path / "a" / "trajectory.csv").read_text() == (tmp_path / "b" / "trajectory.csv").read_text()


def test_unusable_out_folder_is_refused_clearly(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        cli.main(["run", "stn_ridge", "--quick", "--out", str(afile)])
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        cli.main(["run", "stn_ridge", "--quick", "--out", str(afile / "sub")])


def test_report_of_missing_or_foreign_files_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="cannot read 'nope.json'"):
        cli.main(["report", "nope.json", "--stdout"])
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="is not a `hypergrad run` results.json"):
        cli.main(["report", str(other), "--stdout"])


# ---------------------------------------------------------------------------------- progress bars


def test_progress_bars_stay_out_of_non_terminal_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_all()
    ctx = Context(
        REGISTRY["stn_ridge"], {"seed": 0}, device=torch.device("cpu"), out=tmp_path,
        logger=hg.log.Logger(), progress=True,
    )  # fmt: skip
    assert list(ctx.bar(range(50), desc="steps")) == list(range(50))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""  # stderr is captured: not a TTY, no \r redraws


# ------------------------------------------------------------------------------------ wandb sweeps


class _FakeRun:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.summary: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []
        self.finished = False

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        self.logged.append(dict(row))

    def finish(self) -> None:
        self.finished = True


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any]) -> list[_FakeRun]:
    """A stand-in ``wandb`` module: ``init`` returns a run whose config is the passed config
    overridden by ``sweep`` (what an agent does); ``Histogram`` fails on non-finite data as
    ``np.histogram`` (and wandb's) does."""
    runs: list[_FakeRun] = []

    def init(*, config: dict[str, Any], **kwargs: Any) -> _FakeRun:
        runs.append(_FakeRun({**config, **sweep}))
        return runs[-1]

    mod = types.ModuleType("wandb")
    mod.init = init  # type: ignore[attr-defined]
    mod.Histogram = lambda a: np.histogram(a)  # type: ignore[attr-defined]
    mod.Image = lambda path: path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_sweep_config_reaches_the_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_wandb(monkeypatch, {"method": "cg", "solver_steps": 3.0, "hyper_lr": "0.3"})
    out = tmp_path / "run"
    assert cli.main(["run", "overfit_val", "--quick", "--wandb", "--no-progress", "--out", str(out)]) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["method"], cfg["solver_steps"], cfg["hyper_lr"]) == ("cg", 3, 0.3)
    assert isinstance(cfg["solver_steps"], int)
    assert runs[0].summary["val_loss"] == pytest.approx(
        json.loads((out / "results.json").read_text())["metrics"]["val_loss"]
    )


@pytest.mark.parametrize(
    ("sweep", "words"),
    [
        ({"solver_steps": 2.5}, ["solver_steps=2.5", "an integer >= 1"]),
        ({"hyper_lr": -1.0}, ["hyper_lr", "> 0"]),
        ({"n_train": 1700, "n_val": 200}, ["n_train=1700, n_val=200", "n_train + n_val <= 1796"]),
    ],
)
def test_bad_sweep_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any], words: list[str]
) -> None:
    runs = _fake_wandb(monkeypatch, sweep)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "overfit_val", "--quick", "--wandb", "--out", str(tmp_path / "run")])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert runs[0].finished  # the wandb run is closed, not left dangling
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments" / "sweeps").glob("*.yaml")))
def test_sweep_values_and_ranges_are_allowed_settings(name: str) -> None:
    load_all()
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / name).read_text())
    exp = REGISTRY[sweep["command"][sweep["command"].index("run") + 1]]
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec["min"], spec["max"]]
        for v in values:
            check_settings(exp, {**exp.defaults, key: v})  # raises naming the key otherwise
    assert sweep["metric"]["name"] in {k for k in ("val_loss", "val_acc", "test_loss", "test_acc")}


# ------------------------------------------------------------------------------------------ Logger


def test_logger_stores_plain_numbers_from_tensors_numpy_and_none(tmp_path: Path) -> None:
    logger = hg.log.Logger()
    row = logger.log(
        {"a": torch.tensor(1.5), "b": torch.tensor([2.0]), "c": np.float32(0.25), "d": None, "n": np.int64(3),
         "e": float("nan"), "s": "cg"},
        step=1,
    )  # fmt: skip
    assert row == {"a": 1.5, "b": 2.0, "c": 0.25, "n": 3, "e": row["e"], "s": "cg", "step": 1}
    assert math.isnan(row["e"]) and type(row["n"]) is int
    info = hg.HyperStepInfo(torch.tensor(0.5), 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    row = logger.hyper_step(info, step=2, acc=np.float64(0.9), t=torch.tensor(2.0), missing=None)
    assert row["outer_loss"] == 0.5 and row["acc"] == 0.9 and row["t"] == 2.0 and "missing" not in row
    row = logger.hyper_step({"outer_loss": 0.25, "solver_status": "converged"}, step=3)  # a dict works too
    assert row == {"outer_loss": 0.25, "solver_status": "converged", "step": 3}
    with pytest.raises(ValueError, match="'vec' has 2 elements"):
        logger.hyper_step(info, step=4, vec=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="'g' has 2 elements"):
        logger.log({"g": torch.ones(2)})
    text = logger.to_csv(tmp_path / "t.csv").read_text()
    assert "tensor" not in text
    rows = list(csv.DictReader(text.splitlines()))
    assert rows[0]["a"] == "1.5" and rows[0]["b"] == "2.0" and rows[1]["t"] == "2.0"
    assert len(rows) == 3  # the refused calls left no row behind


def test_logger_wandb_survives_nan_hyperparameters_and_numpy_summaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _fake_wandb(monkeypatch, {})
    logger = hg.log.Logger(wandb=True)
    hp = hg.hparams.Hparam(0.5, shape=(3,))
    info = hg.HyperStepInfo(0.25, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    with torch.no_grad():
        hp.raw[0] = float("nan")
    logger.hyper_step(info, hparams=hp, step=1)  # np.histogram raised on the NaN
    counts, _ = runs[0].logged[-1]["hparams/value.hist"]
    assert counts.sum() == 2  # the finite entries
    with torch.no_grad():
        hp.raw.fill_(float("nan"))
    logger.hyper_step(info, hparams=hp, step=2)
    assert "hparams/value.hist" not in runs[0].logged[-1]  # nothing finite: no histogram
    logger.summary({"acc": np.float32(0.5), "loss": torch.tensor(0.25), "name": "x", "vec": torch.ones(2)})
    assert runs[0].summary == {"acc": 0.5, "loss": 0.25, "name": "x"}
    logger.finish()
    assert runs[0].finished
