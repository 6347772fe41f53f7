"""Round 24, logging: what users log and plot (HyperStepInfo, Logger rows, CSV, wandb, the CLI's
results files) against independently computed values."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import hypergrad as hg
from hypergrad import cli


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _SweepRun:
    """A stand-in wandb run whose config is what a sweep agent sets over the one passed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.summary: dict[str, Any] = {}
        self.name: str | None = None

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any]) -> None:
    mod = types.ModuleType("wandb")

    def init(*, config: dict[str, Any], mode: str, **kwargs: Any) -> _SweepRun:
        return _SweepRun({**config, **sweep})

    mod.init = init  # type: ignore[attr-defined]
    mod.Histogram = lambda a: a  # type: ignore[attr-defined]
    mod.Image = lambda path: path  # type: ignore[attr-defined]
    mod.Table = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)


# ------------------------------------------------------------------------- the recorded command


def test_the_recorded_command_of_a_sweep_point_reruns_the_settings_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep point whose choice reaches the run through ``wandb.config`` only (a sweep command
    without ``${args}``, or a false boolean that ``${args_no_boolean_flags}`` leaves out: the
    cli's docstring supports both) ran with it, and results.json's ``config`` says so; but its
    ``command``, the way to rerun it, was the bare argv: rerun, it trained seed 0 instead of 3
    and gave other metrics, silently."""
    out = tmp_path / "point"
    argv = ["run", "accuracy", "--quick", "--wandb", "--no-progress", "--seed", "0", f"--out={out}"]
    _fake_wandb(monkeypatch, {"seed": 3})  # the sweep's choice
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["config"]["seed"] == 3  # what ran
    _fake_wandb(monkeypatch, {})  # rerun by hand, outside the sweep, as the record says
    words = shlex.split(first["command"])
    assert words[:3] == ["hypergrad", "run", "accuracy"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(words[1:]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["config"] == first["config"]
    assert second["metrics"] == first["metrics"]


# --------------------------------------------------------------- stn_mnist1d's trajectory steps


def test_stn_mnist1d_trajectory_rows_are_at_the_inner_steps_of_their_hypersteps() -> None:
    """stn_mnist1d's trajectory.csv (and wandb x axis) labelled the i-th hyperstep's row with
    step ``len(history) + i``, a running row count: with ``warmup=W`` and ``train_steps=2`` the
    hyperstep taken at inner step ``W + 2(i - 1)`` sat at step ``i`` (a trajectory of 1,200 inner
    steps ended near step 600), and a second seed went on at the first's last row count instead of
    its own step 1. Every other experiment (stn_ridge's was fixed in round 21, marglik's runs,
    hd's optimisers) logs a row at the step its model had taken, each run counting its own steps
    (experiments/README: "the row's own step is in its step column"); the schedule itself records
    the inner step of every hyperstep, which is the reference here."""
    from hypergrad.experiments import stn_mnist1d as m

    logger = hg.log.Logger()
    ctx = types.SimpleNamespace(logger=logger)
    recorded: dict[int, list[int]] = {0: [4, 6, 8, 10], 1: [4, 6, 8]}
    for seed, steps in recorded.items():
        hp = m.stn_hparams(shift=True).double()
        sch = m.Schedule.start(hp)
        for k, step in enumerate(steps):
            with torch.no_grad():
                hp.raw.add_(0.1 * (k + 1))  # (a hyperstep moved the values)
            sch.record(step)
        m._log_schedule(ctx, m.SeedRun(seed, {}, sch))  # type: ignore[arg-type]
    rows = logger.history
    assert [int(r["seed"]) for r in rows] == [0] * 4 + [1] * 3
    assert [int(r["inner_step"]) for r in rows] == [*recorded[0], *recorded[1]]  # (as recorded)
    assert [r["step"] for r in rows] == [*recorded[0], *recorded[1]]


# ----------------------------------------------------------------- CSV flushes, randomised


def test_random_flushes_trims_and_clears_leave_every_row_in_the_csv_once(tmp_path: Path) -> None:
    """NEW (passes): a randomised check of ``to_csv(append=True)`` against the plain rule that the
    file ends up holding every row ever logged, once, in order, whatever the sequence of logging,
    flushing, trimming already-flushed rows from the front (``del logger.history[:k]``, to bound
    memory) and clearing a fully flushed history (the tests so far each follow one hand-written
    sequence)."""
    import csv
    import random

    for seed in range(150):
        rng = random.Random(seed)
        path = tmp_path / f"t{seed}.csv"
        logger = hg.log.Logger()
        logged: list[int] = []
        flushed = 0  # rows at the front of history already in the file
        for _ in range(rng.randint(1, 12)):
            op = rng.choice(["log", "log", "flush", "trim", "clear"])
            if op == "log":
                for _ in range(rng.randint(1, 3)):
                    logged.append(len(logged) + 1)
                    logger.log({"v": float(logged[-1]) / 3}, step=logged[-1])
            elif op == "flush":
                logger.to_csv(path, append=True)
                flushed = len(logger.history)
            elif op == "trim":
                k = rng.randint(0, flushed)
                del logger.history[:k]
                flushed -= k
            elif op == "clear" and flushed == len(logger.history):
                logger.history.clear()
                flushed = 0
        logger.to_csv(path, append=True)
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == logged, seed
        assert [float(r["v"]) for r in rows] == [s / 3 for s in logged], seed  # (exact round trip)
