"""Round 8, the experiments / command line / logging layer as researchers use it: wandb sweep
agents whose parameters do not match the experiment, list settings from YAML, ``--method`` where
there is none, a training loop that flushes its CSV every few steps and is killed and resumed,
steps read from an optimiser's state, nested rows, hyperparameter histograms of nearly equal
values, and a notebook's matplotlib backend."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all
from hypergrad.experiments.common import _coerce, check_settings, parse_value

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Run:
    """A stand-in wandb run: its config is what ``init`` got, overridden by a sweep's choices."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.summary: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.name: str | None = None
        self.finished = False

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        self.rows.append({**row, "_step": step})

    def finish(self, exit_code: int | None = None) -> None:
        self.finished = True


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any]) -> list[_Run]:
    """A stand-in ``wandb`` module (what an agent's ``wandb.init`` returns: the sweep's choices
    in ``run.config``), with wandb's real ``Histogram`` class."""
    import wandb

    runs: list[_Run] = []

    def init(*, config: dict[str, Any], mode: str, **kwargs: Any) -> _Run:
        runs.append(_Run({**config, **sweep}))
        return runs[-1]

    mod = types.ModuleType("wandb")
    mod.init = init  # type: ignore[attr-defined]
    mod.Histogram = wandb.Histogram  # type: ignore[attr-defined]
    mod.Image = lambda path: path  # type: ignore[attr-defined]
    mod.Table = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


# ------------------------------------------------------------------------------- sweeps, settings


@pytest.mark.parametrize(
    ("sweep", "words"),
    [
        ({"hyper_lrr": 0.3}, ["'hyper_lrr'", "did you mean 'hyper_lr'?", "settings:"]),
        ({"learning_rate": 0.3}, ["'learning_rate'", "overfit_val does not have", "hyper_lr, init_decay"]),
        ({"solver-step": 3}, ["'solver-step'", "did you mean 'solver_steps'?"]),
        ({"size": "paper"}, ["size='paper'", "'quick'", "--quick / --paper"]),
        ({"experiment": "hyperclean"}, ["experiment='hyperclean'", "'overfit_val'"]),
    ],
)
def test_a_sweep_parameter_the_experiment_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any], words: list[str]
) -> None:
    """A sweep whose ``command`` leaves out ``${args}`` hands its choices over in wandb.config
    only: a misspelt parameter was ignored, and every point of the sweep ran the defaults
    (``learning_rate`` 0.03, 0.1, 0.3 -> three identical runs with hyper_lr 0.1)."""
    runs = _fake_wandb(monkeypatch, sweep)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "overfit_val", "--quick", "--wandb", "--no-progress", "--out", str(out)])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert runs[0].finished and not (out / "results.json").exists()


def test_wandb_config_keys_of_the_run_itself_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``hypergrad run`` itself puts into wandb.config (experiment, size) and wandb's own
    ``_``-keys are not sweep parameters; a parameter written with dashes is the setting, as on
    the command line (``--solver-steps=2``), and wins over the command line's copy."""
    sweep = {"experiment": "overfit_val", "size": "quick", "_wandb": {}, "solver-steps": 2.0, "hyper_lr": 0.2}
    runs = _fake_wandb(monkeypatch, sweep)
    out = tmp_path / "run"
    argv = ["run", "overfit_val", "--quick", "--wandb", "--no-progress", "--solver-steps=4"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["solver_steps"], config["hyper_lr"]) == (2, 0.2) and "solver-steps" not in config
    assert runs[0].summary


def test_method_for_an_experiment_without_methods_is_refused(tmp_path: Path) -> None:
    """``hypergrad run stn_ridge --method cg`` ran, and results.json said ``"method": "cg"`` for a
    run that has no method switch (``--set method=cg`` was refused)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stn_ridge has no --method"):
        cli.main(["run", "stn_ridge", "--quick", "--method", "cg", "--out", str(out)])
    assert not (out / "results.json").exists()
    load_all()
    assert cli.build_config(REGISTRY["overfit_val"], "quick", [], method="cg")["method"] == "cg"


@pytest.mark.parametrize("given", ["--steps=1,1e1", "--steps=[1.0, 10.0]", "--set=steps=1, 10.0,"])
def test_integer_list_items_written_as_floats_run(tmp_path: Path, given: str) -> None:
    """``steps=1,1e1`` (or YAML's ``[1.0, 10.0]``) passed the checks, then the experiment crashed
    after starting on ``int('1e1')``: list items are now written as the integers they mean."""
    load_all()
    args = [given] if given.startswith("--steps") else ["--set", given.split("=", 1)[1]]
    settings = [a for a in args if a != "--set"]
    assert cli.build_config(REGISTRY["accuracy"], "quick", settings)["steps"] == "1,10"
    out = tmp_path / "run"
    assert cli.main(["run", "accuracy", "--quick", "--no-progress", "--out", str(out), *args]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["config"]["steps"] == "1,10"
    assert {r["method"] for r in rec["table"]} >= {"cg(1)", "cg(10)", "unrolled(1)", "unrolled(10)"}


def test_sweep_values_that_do_not_mean_the_setting_type_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wandb.config's ``seed: true`` ran with seed 1, and ``plot: 0.5`` with plot on."""
    load_all()
    exp = REGISTRY["marglik_precision"]
    for value in (0.5, 2, "maybe"):
        with pytest.raises(ValueError, match=r"plot|boolean"):
            check_settings(exp, {**exp.defaults, "plot": _coerce(value, True)})
    assert _coerce(1, True) is True and _coerce(0.0, True) is False and _coerce("off", True) is False
    assert _coerce(4.0, 1) == 4 and isinstance(_coerce(4.0, 1), int) and _coerce(3, 0.1) == 3.0
    runs = _fake_wandb(monkeypatch, {"seed": True})
    with pytest.raises(SystemExit, match=r"seed=True"):
        cli.main(["run", "stn_ridge", "--quick", "--wandb", "--no-progress", "--out", str(tmp_path / "r")])
    assert runs[0].finished


def test_integer_settings_keep_every_digit() -> None:
    assert parse_value("9007199254740993", 1) == 9007199254740993  # 2**53 + 1: float() loses it
    assert parse_value("1e3", 1) == 1000 and parse_value(" 7 ", 1) == 7 and parse_value("-3", 1) == -3
    with pytest.raises(ValueError, match="expected an integer"):
        parse_value("2.5", 1)


def test_plt_keeps_the_backend_of_a_pyplot_already_in_use() -> None:
    """plt() switched a notebook's (or any user's) matplotlib backend to Agg for the rest of the
    session; it now only chooses Agg when pyplot is not imported yet."""
    import matplotlib.pyplot as pyplot

    from hypergrad.experiments.common import plt

    before = pyplot.get_backend()
    pyplot.switch_backend("svg")
    try:
        mine = pyplot.figure()
        p = plt()
        fig, ax = p.subplots()
        ax.plot([0, 1])
        p.close(fig)
        assert pyplot.get_backend() == "svg"
        assert pyplot.fignum_exists(mine.number)
        pyplot.close(mine)
    finally:
        pyplot.switch_backend(before)


# ------------------------------------------------------------------------------------- Logger


def test_step_from_a_tensor_or_numpy_is_stored_as_an_int(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``step=opt.state[p]["step"]`` (a float tensor) was stored as the tensor: the CSV said
    ``tensor(7.)``; a step of 2.5 was sent to wandb as 2."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(7):
        w.grad = torch.ones(2)
        opt.step()
    step = opt.state[w]["step"]
    assert isinstance(step, torch.Tensor)
    logger = hg.log.Logger()
    assert logger.log({"loss": 1.0}, step=step) == {"loss": 1.0, "step": 7}
    info = hg.HyperStepInfo(0.5, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    row = logger.hyper_step(info, step=np.int64(8))
    assert type(row["step"]) is int and row["step"] == 8
    with open(logger.to_csv(tmp_path / "t.csv"), newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["7", "8"]
    for bad in (2.5, "3", torch.tensor([1, 2]), True, float("nan")):
        with pytest.raises(ValueError, match="step must be an integer"):
            logger.log({"loss": 1.0}, step=bad)
    assert len(logger.history) == 2  # a refused row is not recorded
    runs = _fake_wandb(monkeypatch, {})
    wb = hg.log.Logger(wandb=True, mode="offline")
    wb.log({"a": 1.0}, step=torch.tensor(3.0))
    wb.hyper_step(info, step=torch.tensor(4))
    assert [r["_step"] for r in runs[0].rows] == [3, 4] and runs[0].rows[1]["step"] == 4
    assert all(type(r["_step"]) is int for r in runs[0].rows)


def test_nested_rows_are_flattened_with_slashes() -> None:
    logger = hg.log.Logger()
    row = logger.log(
        {"train": {"loss": torch.tensor(0.5), "lr": np.float32(0.25)}, "val": {"acc": 0.75}}, step=1
    )
    assert row == {"train/loss": 0.5, "train/lr": 0.25, "val/acc": 0.75, "step": 1}
    info = hg.HyperStepInfo(0.5, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    row = logger.hyper_step(info, val={"deep": {"acc": torch.tensor([0.5])}})
    assert row["val/deep/acc"] == 0.5
    with pytest.raises(ValueError, match="'val/acc' is given twice"):
        logger.log({"val/acc": 0.1, "val": {"acc": 0.2}})
    with pytest.raises(ValueError, match="'val/x' has 2 elements"):
        logger.log({"val": {"x": torch.ones(2)}})


def test_histograms_of_nearly_equal_hyperparameters_do_not_crash_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two per-layer decays one float32 ulp apart made ``wandb.Histogram`` raise ("Too many bins
    for data range") inside ``hyper_step``: a run with wandb crashed at its first histogram."""
    runs = _fake_wandb(monkeypatch, {})
    import wandb

    logger = hg.log.Logger(wandb=True, mode="offline", histogram_every=1)
    info = hg.HyperStepInfo(0.5, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    a = np.float32(0.0105)
    cases = {
        "ulp32": torch.tensor([a, np.nextafter(a, np.float32(1))]),
        "ulp64": torch.tensor([0.0105, np.nextafter(0.0105, 1.0)], dtype=DT),
        "huge": torch.tensor([-1e308, 1e308, float("nan")], dtype=DT),
        "plain": torch.linspace(0, 1, 11, dtype=DT),
    }
    for name, v in cases.items():
        hp = nn.Module()
        hp.register_parameter(name, nn.Parameter(v.clone()))
        logger.hyper_step(info, hparams=hp, step=len(runs[0].rows))
        hist = runs[0].rows[-1][f"hparams/{name}.hist"]
        assert isinstance(hist, wandb.Histogram)
        finite = v[torch.isfinite(v)].double().numpy()
        assert sum(hist.histogram) == len(finite)
        assert hist.bins[0] == pytest.approx(finite.min()) and hist.bins[-1] == pytest.approx(finite.max())
    assert len(runs[0].rows[-1]["hparams/plain.hist"].histogram) == 64  # wandb's own bins when they work


def _flushed_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_csv_flushed_every_few_steps_holds_each_row_once(tmp_path: Path) -> None:
    """``to_csv(path, append=True)`` every few steps wrote the whole history again each time:
    steps 0, 0, 1, 0, 1, 2, ..."""
    path = tmp_path / "t.csv"
    path.write_text("step,loss,note\n-1,9.0,before\n")  # another run's row, kept
    logger = hg.log.Logger()
    for i in range(7):
        logger.log({"loss": float(i)}, step=i)
        if i % 2 == 1:
            logger.to_csv(path, append=True)
    logger.to_csv(path, append=True)
    rows = _flushed_rows(path)
    assert [r["step"] for r in rows] == [str(i) for i in range(-1, 7)]
    assert rows[0]["note"] == "before" and [r["loss"] for r in rows[1:]] == [str(float(i)) for i in range(7)]
    logger.to_csv(path)  # an overwrite, then an append: still once each
    logger.to_csv(path, append=True)
    assert [r["step"] for r in _flushed_rows(path)] == [str(i) for i in range(7)]
    with pytest.raises(ValueError, match="resumed_at needs append=True"):
        logger.to_csv(path, resumed_at=3)


def test_two_loggers_appending_to_one_csv_keep_each_others_rows(tmp_path: Path) -> None:
    """Two runs of one script (two seeds in lockstep) flushing into one file, and a run that
    clears its history after each flush to bound its memory: every row once, none lost."""
    path = tmp_path / "t.csv"
    a, b = hg.log.Logger(), hg.log.Logger()
    for i in range(4):
        a.log({"seed": 0, "loss": float(i)}, step=i)
        b.log({"seed": 1, "loss": -float(i)}, step=i)
        if i % 2 == 1:
            a.to_csv(path, append=True)
            b.to_csv(path, append=True)
    rows = _flushed_rows(path)
    assert [(r["seed"], r["step"]) for r in rows] == [
        (s, str(i)) for pair in ((0, 1), (2, 3)) for s in ("0", "1") for i in pair
    ]
    c = hg.log.Logger()
    for i in range(6):
        c.log({"seed": 2, "loss": 0.5}, step=i)
        if i % 2 == 1:
            c.to_csv(path, append=True)
            c.history.clear()
    assert [r["step"] for r in _flushed_rows(path) if r["seed"] == "2"] == [str(i) for i in range(6)]


def _ridge_run(
    path: Path, steps: range, every: int, state: dict[str, Any] | None = None, **to_csv: Any
) -> dict[str, Any]:
    """Train the ridge problem with hg.Implicit (hyperstep every 2 steps) over ``steps``,
    flushing the CSV every ``every`` steps; ``state``: a checkpoint to resume from. Returns a
    checkpoint taken after the last step."""
    torch.manual_seed(0)
    p = hg.testing.ridge(n_train=40, n_val=20, n_features=5)
    inner = torch.optim.SGD(p.model.parameters(), lr=0.2, momentum=0.5)
    outer = torch.optim.Adam(p.hparams.parameters(), lr=0.05)
    hopt = hg.Implicit(
        p.model, p.hparams, p.train_loss, p.val_loss, inner_optimizer=inner, outer_optimizer=outer,
        solver=hg.CG(maxiter=5),
    )  # fmt: skip
    if state is not None:
        p.model.load_state_dict(state["model"])
        p.hparams.load_state_dict(state["hparams"])
        hopt.load_state_dict(state["hopt"])
    logger = hg.log.Logger()
    for i in steps:
        loss = hopt.step(p.train_batch)
        row: dict[str, Any] = {"train_loss": loss}
        if i % 2 == 1:
            info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
            row.update({"outer_loss": info.outer_loss, "hypergrad_norm": info.hypergrad_norm})
        logger.log({**row, "hparams": hg.hparams.summary(p.hparams)}, step=i)
        if (i + 1) % every == 0:
            logger.to_csv(path, append=True, **to_csv)
    logger.to_csv(path, append=True, **to_csv)
    return {"model": p.model.state_dict(), "hparams": p.hparams.state_dict(), "hopt": hopt.state_dict()}


def test_a_run_killed_after_its_checkpoint_and_resumed_writes_the_uninterrupted_csv(tmp_path: Path) -> None:
    """A run checkpointed after step 5 and killed after flushing step 8; resumed from the
    checkpoint it redoes steps 6-8. ``append=True`` kept both copies of those steps (two
    outer losses per step in every plot); ``resumed_at=6`` gives the uninterrupted run's file."""
    whole = tmp_path / "whole.csv"
    _ridge_run(whole, range(12), every=3)
    interrupted = tmp_path / "resumed.csv"
    checkpoint = _ridge_run(interrupted, range(6), every=3)
    _ridge_run(interrupted, range(6, 9), every=3, state=checkpoint)  # logged after it, then killed
    assert [r["step"] for r in _flushed_rows(interrupted)] == [str(i) for i in range(9)]
    duplicated = tmp_path / "duplicated.csv"
    duplicated.write_bytes(interrupted.read_bytes())
    _ridge_run(duplicated, range(6, 12), every=3, state=checkpoint)
    assert len(_flushed_rows(duplicated)) == 15  # what plain append gives: steps 6-8 twice
    _ridge_run(interrupted, range(6, 12), every=3, state=checkpoint, resumed_at=6)
    assert interrupted.read_text() == whole.read_text()
    rows = _flushed_rows(whole)
    assert [r["step"] for r in rows] == [str(i) for i in range(12)]
    assert all(r["outer_loss"] for r in rows[1::2]) and "hparams/value.mean" in rows[0]


_SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all
from hypergrad.experiments.common import register

def run(ctx):
    for i in range(3):
        ctx.logger.log({"loss": 1.0 / (i + 1)}, step=i)
    os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a scheduler's time limit sends
    time.sleep(30)
    raise AssertionError("SIGTERM did not stop the run")

load_all()
register("killed", number=99, title="t", paper="p", claim="c", defaults={"steps": 3}, quick={})(run)
before = signal.getsignal(signal.SIGTERM)
code = cli.main(["run", "killed", "--no-progress", "--out", sys.argv[1]])
assert signal.getsignal(signal.SIGTERM) == before, "the SIGTERM handler was not restored"
sys.exit(code)
"""


def test_sigterm_mid_run_leaves_the_record_and_the_rows_as_ctrl_c_does(tmp_path: Path) -> None:
    """``kill`` (or a scheduler's preemption) ended a run at once: no interrupted.json, no
    trajectory, the wandb run left open; now it ends as Ctrl-C does, with exit code 143."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 143, proc.stderr
    assert "killed stopped (SIGTERM)" in proc.stderr and "interrupted.json" in proc.stderr
    rec = json.loads((out / "interrupted.json").read_text())
    assert rec["stopped_by"] == "Terminated" and "SIGTERM" in rec["error"] and rec["rows_logged"] == 3
    assert [r["step"] for r in _flushed_rows(out / "trajectory.csv")] == ["0", "1", "2"]
    assert not (out / "results.json").exists()


def test_a_sweep_agent_run_without_wandb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep whose command lacks ``--wandb`` ran every point to the end and reported nothing to
    the sweep (no metric: a Bayesian sweep learns nothing, every point shows no result)."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"WANDB_SWEEP_ID=abc123.*add --wandb to the sweep's command"):
        cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(out)])
    assert not out.exists()
    runs = _fake_wandb(monkeypatch, {"lr": 0.05, "seed": 2})
    assert cli.main(["run", "stn_ridge", "--quick", "--wandb", "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert runs[0].summary and (config["lr"], config["seed"]) == (0.05, 2)
    assert runs[0].name == "stn_ridge-s2"  # the sweep's seed names the run, not the command line's 0


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_hypergrads_own_not_the_users_repository(tmp_path: Path) -> None:
    """hypergrad installed into ``.venv`` inside the user's research repository: results.json's
    ``versions.git_commit`` was the user's commit, recorded as hypergrad's."""
    from hypergrad.experiments.common import _git_commit

    user = tmp_path / "research"
    installed = user / ".venv" / "lib" / "site-packages" / "hypergrad"
    installed.mkdir(parents=True)
    (user / "train.py").write_text("print(1)\n")
    _git(user, "init", "-q")
    _git(user, "add", "train.py")
    _git(user, "commit", "-q", "-m", "user")
    assert _git_commit(installed) is None
    checkout = tmp_path / "hypergrad-src"
    (checkout / "hypergrad").mkdir(parents=True)
    (checkout / "hypergrad" / "__init__.py").write_text("")
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-q", "-m", "ours")
    assert _git_commit(checkout / "hypergrad") == _git(checkout, "rev-parse", "--short", "HEAD")
    assert _git_commit(tmp_path) is None  # no repository at all


def test_out_with_a_tilde_from_a_sweep_agent_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out=~/runs/x`` passed without a shell (a sweep's command) made a folder named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out=~/runs/x"]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "results.json").exists()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("backend", ["module://matplotlib_inline.backend_inline", "TkAg"])
def test_plots_are_written_whatever_backend_the_environment_names(tmp_path: Path, backend: str) -> None:
    """A notebook's ``!hypergrad run`` inherits ``MPLBACKEND=module://matplotlib_inline...``; where
    matplotlib refuses it (matplotlib_inline not installed there; or a typo), ``import matplotlib``
    raised inside plt(), after the whole run."""
    script = (
        "import os, sys\n"
        "from hypergrad.experiments.common import plt\n"
        "p = plt()\n"
        "fig, ax = p.subplots()\n"
        "ax.plot([0, 1])\n"
        "fig.savefig(sys.argv[1])\n"
        "assert p.get_backend().lower() == 'agg', p.get_backend()\n"
        "assert os.environ['MPLBACKEND'] == sys.argv[2]\n"
    )
    png = tmp_path / "plot.png"
    env = {**os.environ, "MPLBACKEND": backend, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(png), backend],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
