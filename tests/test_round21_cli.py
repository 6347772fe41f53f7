"""Round 21, the command line as a new user meets it: the scripts around ``hypergrad run``, the
numbers runs record and the logger's CSV (helper "cli").

Every run here writes into ``tmp_path`` (``monkeypatch.chdir``), never into the repository.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import hypergrad as hg
from hypergrad import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _script(name: str) -> ModuleType:
    """``experiments/NAME.py`` imported as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"_round21_{name}", ROOT / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ experiments/reproduce.py


@pytest.mark.parametrize("code", [130, 143])
def test_reproduce_stops_at_a_run_stopped_by_ctrl_c_or_sigterm(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hypergrad run`` turns Ctrl-C and SIGTERM into exit codes 130 / 143 (it returns them from
    ``cli.main``, the record of the stopped run in interrupted.json and no results.json). The
    reproduction script looped on: a user's Ctrl-C, meant for the 20-minute reproduction, only
    ended the experiment running then, the next one started, and at the end ``hypergrad report``
    rewrote experiments/README.md without the stopped experiment's row (its results.json was
    removed when it started). The script must stop with that exit code, and write no report."""
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(list(argv))
        return code if argv[0] == "run" else 0

    mod = _script("reproduce")
    monkeypatch.setattr(mod.cli, "main", fake_main)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "accuracy", "hd"])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert e.value.code == code
    assert [c[:2] for c in calls] == [["run", "accuracy"]]  # neither hd nor the report


def test_reproduce_runs_every_name_then_reports_when_runs_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Passes today; pins the fix of the test above to stopping on a failed run only.) The
    reproduction runs the experiments in the order given, each into experiments/reports/NAME,
    and regenerates the table once at the end; ``--quick`` writes into results/quick/ and writes
    no report."""
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(list(argv))
        return 0

    mod = _script("reproduce")
    monkeypatch.setattr(mod.cli, "main", fake_main)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "hd", "accuracy"])
    mod.main()
    assert calls == [
        ["run", "hd", "--no-progress", "--out", "experiments/reports/hd"],
        ["run", "accuracy", "--no-progress", "--out", "experiments/reports/accuracy"],
        ["report"],
    ]
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--quick", "hd"])
    mod.main()
    assert calls == [["run", "hd", "--quick", "--no-progress", "--out", str(Path("results/quick") / "hd")]]


# ------------------------------------------------------------------------------------- run records


def _run(name: str, out: Path, *extra: str) -> dict[str, Any]:
    """``hypergrad run NAME --quick`` into ``out``; its results.json."""
    assert cli.main(["run", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _negative_counts(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row.get(k) for k in keys if isinstance(row.get(k), (int, float)) and row[k] < 0}


def test_logreg_cv_that_never_reaches_the_grid_records_no_negative_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two outer steps never reach the grid's best validation loss (the headline says so). The
    metrics said ``hypergrad.solves_to_grid_val = -1`` (and -1 loss evaluations, -1 HVPs), and
    the printed table "-1" in each cost column: a sweep or a seed average minimising the cost
    to the grid's loss takes -1 for the best run there is. Not reached must read as no value
    (absent, or null in results.json), never as a count."""
    monkeypatch.chdir(tmp_path)
    rec = _run("logreg_cv", tmp_path / "l", "--set", "outer_steps=2")
    assert "did not reach" in rec["headline"]
    keys = ("hypergrad.solves_to_grid_val", "hypergrad.loss_evals_to_grid_val", "hypergrad.hvps_to_grid_val")
    assert not _negative_counts(rec["metrics"], keys)
    (row,) = [r for r in rec["table"] if r["method"].startswith("hypergradient")]
    assert not _negative_counts(row, ("inner solves", "loss evaluations", "HVPs"))
    assert "| -1 |" not in cli.markdown_table(rec["table"])


# --------------------------------------------------------------------------------- hg.log.Logger


def _steps(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("logged_after", [1, 3])
def test_a_csv_flushed_from_a_history_trimmed_to_its_tail_holds_each_row_once(
    logged_after: int, tmp_path: Path
) -> None:
    """A long run flushes its rows every few hypersteps (``to_csv(..., append=True)``) and keeps
    only the latest rows in memory (``del logger.history[:-2]``). Clearing the history is handled
    (the next flush writes it whole); trimming it was not: the rows kept, already in the file,
    were appended again at the next flush (steps 1-5, 4, 5, 6, ...), without a word. Each step
    must be in the file once, whatever was trimmed."""
    logger = hg.log.Logger()
    path = tmp_path / "trajectory.csv"
    for s in range(1, 6):
        logger.log({"loss": s / 10}, step=s)
    logger.to_csv(path, append=True)
    del logger.history[:-2]  # keep the last two rows (steps 4 and 5), both written
    for s in range(6, 6 + logged_after):
        logger.log({"loss": s / 10}, step=s)
    logger.to_csv(path, append=True)
    assert _steps(path) == list(range(1, 6 + logged_after))
    logger.history.clear()  # (cleared: the next flush writes the new rows, as before)
    logger.log({"loss": 1.0}, step=20)
    logger.to_csv(path, append=True)
    assert _steps(path) == [*range(1, 6 + logged_after), 20]


def test_stn_ridge_trajectory_rows_are_at_the_inner_steps_their_hypersteps_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of stn_ridge's trajectory.csv were labelled ``warmup + i + 1`` for the i-th
    hyperstep, but ``hg.BestResponse`` takes its first hyperstep right after the warm-up's last
    step (inner step ``warmup``), one per step after: every row was one step late, and a run of
    15 inner steps ended its trajectory at step 16. The reference here counts the real calls."""
    seen: list[int] = []
    taken = [0]
    step, hyper_step = hg.BestResponse.step, hg.BestResponse.hyper_step

    def counting_step(self: Any, *a: Any, **k: Any) -> Any:
        taken[0] += 1
        return step(self, *a, **k)

    def recording_hyper_step(self: Any, *a: Any, **k: Any) -> Any:
        seen.append(taken[0])
        return hyper_step(self, *a, **k)

    monkeypatch.setattr(hg.BestResponse, "step", counting_step)
    monkeypatch.setattr(hg.BestResponse, "hyper_step", recording_hyper_step)
    monkeypatch.chdir(tmp_path)
    _run("stn_ridge", tmp_path / "r", "--set", "warmup=5", "--set", "steps=10")
    assert taken[0] == 15 and seen and seen[0] == 5
    assert _steps(tmp_path / "r" / "trajectory.csv") == seen


def test_a_resume_mid_second_run_keeps_the_first_runs_rows(tmp_path: Path) -> None:
    """One logger records two training runs, each counting its steps from 1 (what the module
    docstring allows, and what ``hypergrad run`` experiments do: hd's optimisers, marglik's
    runs). The job stops in run B after step 4, its checkpoint taken at B's step 3; the resumed
    job logs B's steps 3 and 4 again and appends with ``resumed_at=3``. Only B's rows 3 and 4
    were logged after the checkpoint; run A's rows at steps 3-5 were deleted with them, without
    a word: the file lost three rows of a finished run."""
    path = tmp_path / "trajectory.csv"
    first = hg.log.Logger()
    for s in range(1, 6):
        first.log({"run": "A", "loss": s / 10}, step=s)
    for s in range(1, 5):
        first.log({"run": "B", "loss": s / 10}, step=s)
    first.to_csv(path)
    resumed = hg.log.Logger()
    for s in range(3, 6):
        resumed.log({"run": "B", "loss": s / 10}, step=s)
    resumed.to_csv(path, append=True, resumed_at=3)
    with path.open(newline="") as f:
        got = [(r["run"], int(r["step"])) for r in csv.DictReader(f)]
    assert got == [*(("A", s) for s in range(1, 6)), *(("B", s) for s in range(1, 6))]


def test_a_resume_drops_the_rows_logged_after_the_checkpoint_of_a_single_run(tmp_path: Path) -> None:
    """(Passes today; pins the fix of the test above to the single-run case it must keep.) Steps
    that only go up: the rows at the resumed step or later go, rows without a step stay."""
    path = tmp_path / "trajectory.csv"
    first = hg.log.Logger()
    for s in range(1, 8):
        first.log({"loss": s / 10}, step=s)
    first.log({"note": 1.0})  # (no step: kept)
    first.to_csv(path)
    resumed = hg.log.Logger()
    for s in range(5, 9):
        resumed.log({"loss": s / 10}, step=s)
    resumed.to_csv(path, append=True, resumed_at=5)
    with path.open(newline="") as f:
        got = [r["step"] for r in csv.DictReader(f)]
    assert got == ["1", "2", "3", "4", "", "5", "6", "7", "8"]


def test_a_run_after_another_experiment_in_the_same_process_repeats_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Passes today; new coverage: earlier tests repeat one experiment, never another in
    between.) ``cli.main`` called from one Python process (a notebook, reproduce.py) runs one
    experiment after another: nothing one leaves behind (global RNG, default dtype, thread count,
    a cache) may change the next one's numbers; and ``--seed`` must change them (it is used)."""
    monkeypatch.chdir(tmp_path)
    small = ("--set", "warmup=5", "--set", "steps=10")
    first = _run("accuracy", tmp_path / "a1")
    _run("stn_ridge", tmp_path / "r", *small)
    again = _run("accuracy", tmp_path / "a2")
    assert first["metrics"] == again["metrics"] and first["table"] == again["table"]
    csv1, csv2 = ((tmp_path / d / "trajectory.csv").read_text() for d in ("a1", "a2"))
    assert csv1 == csv2
    seeded = _run("accuracy", tmp_path / "a3", "--seed", "1")
    assert seeded["config"]["seed"] == 1
    moved = [k for k in first["metrics"] if first["metrics"][k] != seeded["metrics"][k]]
    assert len(moved) >= len(first["metrics"]) - 2  # (unrolled(1) from w = 0 is 0 for any seed)


def test_hd_quick_run_logs_a_trajectory_for_every_optimiser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hypergrad run NAME --quick`` is the smoke test of a whole run: results.json, a
    trajectory.csv and plots. For hd the trajectory was a bare line ending (no header, no row) and
    the plot's lower panels (each HD optimiser's learning rate) empty, so a user checking what
    the logging would hold saw nothing, and the wandb test had to add epochs to see a row."""
    monkeypatch.chdir(tmp_path)
    _run("hd", tmp_path / "hd")
    with (tmp_path / "hd" / "trajectory.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"sgd", "sgd-hd", "adam", "adam-hd"}
    hd_rates = [float(r["lr"]) for r in rows if r["optimizer"] == "sgd-hd"]
    assert len(hd_rates) >= 2  # a learning-rate curve, not a point
