"""What a researcher hits running experiments: repeated and list-valued settings, run folders that
are not ours, Ctrl-C and crashes mid-run, timings in results, and what wandb receives (read back
from an offline run's ``.wandb`` file), wandb broken or offline, sweeps run as an agent would."""

from __future__ import annotations

import importlib.abc
import io
import json
import random
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all
from hypergrad.experiments.common import Context, Experiment, Outcome, _coerce, normalise_setting, write_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for k in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{k}_DIR", str(tmp_path / f"wandb-{k.lower()}"))


class _FakeRun:
    def __init__(self, config: dict[str, Any], mode: str) -> None:
        self.config, self.mode = dict(config), mode
        self.summary: dict[str, Any] = {}
        self.steps: list[int | None] = []
        self.exit_code: int | None = -1  # -1: not finished

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        self.steps.append(step)

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_code = exit_code


def _fake_wandb(
    monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any], fail_online: bool = False
) -> list[_FakeRun]:
    """A stand-in ``wandb``: ``init`` returns a run whose config is ``sweep`` over the passed one
    (what an agent does); with ``fail_online``, an online ``init`` raises as wandb does without a
    network."""
    runs: list[_FakeRun] = []

    def init(*, config: dict[str, Any], mode: str, **kwargs: Any) -> _FakeRun:
        if fail_online and mode == "online":
            raise ConnectionError("Timed out while retrying: no such host")
        runs.append(_FakeRun({**config, **sweep}, mode))
        return runs[-1]

    mod = types.ModuleType("wandb")
    mod.init = init  # type: ignore[attr-defined]
    mod.Histogram = lambda a: a  # type: ignore[attr-defined]
    mod.Image = lambda path: path  # type: ignore[attr-defined]
    mod.Table = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


# ------------------------------------------------------------------------------------- settings


def test_a_setting_given_twice_with_different_values_is_refused() -> None:
    load_all()
    exp = REGISTRY["overfit_val"]
    cases = [
        (["hyper_lr=0.1", "--hyper_lr=0.3"], {}, ["hyper_lr", "hyper_lr=0.1", "hyper_lr=0.3"]),
        (["method=neumann"], {"method": "cg"}, ["method", "method=neumann", "--method cg"]),
        (["seed=2"], {"seed": 1}, ["seed", "seed=2", "--seed 1"]),
    ]  # each ran with whichever came last (or the option), silently
    for sets, kw, words in cases:
        with pytest.raises(SystemExit) as e:
            cli.build_config(exp, "quick", sets, **kw)
        assert all(w in str(e.value) for w in words) and "twice" in str(e.value), str(e.value)
    cfg = cli.build_config(exp, "quick", ["hyper_lr=0.1", "--hyper-lr=1e-1", "method= cg"], method="cg")
    assert cfg["hyper_lr"] == 0.1 and cfg["method"] == "cg"  # the same value twice is fine; spaces too
    with pytest.raises(SystemExit, match="did you mean 'hyper_lr'"):
        cli.build_config(exp, "quick", ["hyper_rl=0.1"])


def test_list_settings_written_as_lists() -> None:
    load_all()
    exp = REGISTRY["accuracy"]
    cfg = cli.build_config(exp, "quick", ["steps=[1, 5, 10]", "problems= ridge , logistic"])
    assert cfg["steps"] == "1,5,10" and cfg["problems"] == "ridge,logistic"  # "[1" was refused
    assert normalise_setting(exp, "steps", _coerce([2, 3], exp.defaults["steps"])) == "2,3"  # a sweep's list
    with pytest.raises(SystemExit, match="comma-separated integers >= 1"):
        cli.build_config(exp, "quick", ["steps=[1, 0]"])


def test_threads_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--threads 0: need an integer >= 1"):  # was silently 1
        cli.main(["run", "stn_ridge", "--quick", "--threads", "0", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ run folders


def test_a_results_json_we_did_not_write_is_never_deleted(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"accuracy": 0.9}')  # another tool's results
    (tmp_path / "trajectory.csv").write_text("mine\n")
    with pytest.raises(SystemExit, match="holds a results.json that `hypergrad run` did not write"):
        cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").read_text() == '{"accuracy": 0.9}'  # was deleted, and csv too
    assert (tmp_path / "trajectory.csv").read_text() == "mine\n"


def _previous_run(out: Path) -> None:
    out.mkdir(parents=True)
    rec = {"experiment": "stn_ridge", "command": "hypergrad run stn_ridge", "plots": ["stn_ridge.png"]}
    (out / "results.json").write_text(json.dumps(rec))
    (out / "stn_ridge.png").write_bytes(b"png")


def test_a_refused_wandb_run_keeps_the_previous_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    _previous_run(out)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(SystemExit, match=r"pip install hypergrad\[wandb\]"):
        cli.main(["run", "overfit_val", "--quick", "--wandb", "--out", str(out)])
    runs = _fake_wandb(monkeypatch, {"solver_steps": 2.5})  # a sweep's bad value
    with pytest.raises(SystemExit, match="solver_steps=2.5"):
        cli.main(["run", "overfit_val", "--quick", "--wandb", "--out", str(out)])
    assert runs[0].exit_code is None  # closed
    # both deleted the previous run before refusing to start
    assert (out / "results.json").exists() and (out / "stn_ridge.png").exists()


# ------------------------------------------------------------------------------- interrupted runs


def _stopping_experiment(error: BaseException) -> Experiment:
    def run(ctx: Context) -> Outcome:
        for i in range(3):
            ctx.logger.log({"loss": 1.0 / (i + 1)}, step=i + 1)
        fig = hg.experiments.common.plt().figure()
        ctx.savefig(fig, "partial")
        raise error

    return Experiment("peers_stop", 99, "stops", "-", "-", {"steps": 3}, {}, {}, run)


def test_ctrl_c_mid_run_leaves_a_record_and_says_no_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    load_all()
    monkeypatch.setitem(REGISTRY, "peers_stop", _stopping_experiment(KeyboardInterrupt()))
    runs = _fake_wandb(monkeypatch, {})
    out = tmp_path / "run"
    assert (
        cli.main(["run", "peers_stop", "--wandb", "--no-progress", "--out", str(out)]) == 130
    )  # was a traceback
    err = capsys.readouterr().err
    assert "stopped (Ctrl-C)" in err and "does not resume" in err and "interrupted.json" in err
    rec = json.loads((out / "interrupted.json").read_text())
    assert rec["stopped_by"] == "KeyboardInterrupt" and rec["resumable"] is False and rec["rows_logged"] == 3
    assert rec["plots"] == ["partial.png"] and rec["config"]["steps"] == 3
    assert len((out / "trajectory.csv").read_text().splitlines()) == 4  # the rows logged so far
    assert not (out / "results.json").exists()
    assert runs[0].exit_code == 130  # the wandb run is marked failed, not finished as a success
    # a crash: the same record, then the traceback
    monkeypatch.setitem(REGISTRY, "peers_stop", _stopping_experiment(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["run", "peers_stop", "--no-progress", "--out", str(out)])
    rec = json.loads((out / "interrupted.json").read_text())
    assert (rec["stopped_by"], rec["error"]) == ("RuntimeError", "boom")
    # the next run into the folder replaces the half run's files
    assert cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert (
        "replacing the previous run in" in (err := capsys.readouterr().err)
        and "peers_stop (interrupted)" in err
    )
    assert not (out / "interrupted.json").exists() and not (out / "partial.png").exists()
    assert json.loads((out / "results.json").read_text())["experiment"] == "stn_ridge"


def test_wall_clock_metrics_are_kept_apart_from_results(tmp_path: Path) -> None:
    load_all()
    ctx = Context(
        REGISTRY["stn_ridge"], {"seed": 0}, device=torch.device("cpu"), out=tmp_path, logger=hg.log.Logger()
    )
    outcome = Outcome({"val_loss": 0.5, "plain.hyperstep_ms": 3.7}, [], "h")
    write_run(ctx, outcome, wall_seconds=1.0, command="c", size="quick")
    rec = json.loads((tmp_path / "results.json").read_text())
    # marglik_* put hyperstep_ms into metrics: two runs of one seed had different metrics
    assert rec["metrics"] == {"val_loss": 0.5} and rec["timings"] == {"plain.hyperstep_ms": 3.7}
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ wandb


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def _wandb_records(path: Path) -> list[Any]:
    """The records of a ``.wandb`` file (a LevelDB-style log of protobuf ``Record``s in 32 KiB
    blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_offline_wandb_run_holds_config_every_row_plots_and_the_table(
    tmp_path: Path, wandb_env: None
) -> None:
    out = tmp_path / "run"
    assert (
        cli.main(["run", "hd", "--quick", "--set", "epochs=4", "--wandb", "--no-progress", "--out", str(out)])
        == 0
    )
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (file,) = run_dir.glob("*.wandb")
    recs = _wandb_records(file)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert config["experiment"] == "hd" and config["size"] == "quick" and config["epochs"] == 4
    rows = [
        {_key(i): i.value_json for i in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [r for r in rows if "loss" in r]
    trajectory = (out / "trajectory.csv").read_text().splitlines()[1:]
    # hd trains 4 optimisers, each from step 1: wandb dropped every row after the first one's
    assert len(logged) == len(trajectory) > 0
    steps = [int(r["_step"]) for r in rows]
    assert steps == sorted(steps)
    assert any(r.get("hd/_type") == '"image-file"' for r in rows)  # the plot, as an image
    assert any(r.get("results/_type") == '"table-file"' for r in rows)  # the final table (was not sent)
    summary = {_key(i) for r in recs if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert "wall_seconds" in summary and any(k.endswith(".lr_end") for k in summary)


def test_wandb_disabled_runs_without_a_wandb_folder(
    tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    assert cli.main(["run", "stn_ridge", "--quick", "--wandb", "--no-progress", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and not list((out / "wandb").glob("*run-*"))


class _BrokenWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "wandb":
            raise TypeError("Descriptors cannot be created directly")  # protobuf too new
        return None


def test_a_wandb_that_fails_to_import_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenWandb(), *sys.meta_path])
    with pytest.raises(SystemExit, match="wandb is installed but failed to import .TypeError"):  # a traceback
        cli.main(["run", "stn_ridge", "--quick", "--wandb", "--out", str(tmp_path / "r")])


def test_online_wandb_without_a_network_goes_on_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key, so online; but no network
    runs = _fake_wandb(monkeypatch, {}, fail_online=True)
    logger = hg.log.Logger(wandb=True)  # raised wandb's CommError after ~90 s
    assert runs[0].mode == "offline" and "logging offline instead" in capsys.readouterr().err
    logger.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(
        sys.modules["wandb"].__dict__, "init", lambda **kw: (_ for _ in ()).throw(OSError("disk"))
    )
    with pytest.raises(SystemExit, match="wandb.init failed in offline mode: OSError: disk"):
        cli.main(["run", "stn_ridge", "--quick", "--wandb", "--out", str(tmp_path / "r")])


def test_logger_steps_sent_to_wandb_never_go_back(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_wandb(monkeypatch, {})
    logger = hg.log.Logger(wandb=True)
    for _ in range(2):  # two training runs, each counting from 1
        for step in (1, 2, 2, 3):
            logger.log({"loss": 1.0}, step=step)
    logger.log({"no step": 1.0})
    logger.image("plot", "p.png")
    assert runs[0].steps == [1, 2, 2, 3, 4, 5, 5, 6, 7, 8]  # were 1, 2, 2, 3, 1, ...: wandb drops those
    assert [r["step"] for r in logger.history[:8]] == [1, 2, 2, 3] * 2  # our own record keeps them


# ------------------------------------------------------------------------------------------ sweeps


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments" / "sweeps").glob("*.yaml")))
def test_each_sweep_point_runs_as_the_agent_runs_it_and_logs_its_metric(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / name).read_text())
    assert sweep["method"] in {"grid", "random", "bayes"} and sweep["metric"]["goal"] in {
        "minimize",
        "maximize",
    }
    rng = random.Random(0)
    choice: dict[str, Any] = {}
    for key, spec in sweep["parameters"].items():
        if "values" in spec:
            choice[key] = rng.choice(spec["values"])
        else:
            choice[key] = spec["min"] if spec["distribution"] == "int_uniform" else float(spec["min"])
    cmd = sweep["command"]
    assert cmd[:4] == ["${env}", "${interpreter}", "-m", "hypergrad"] and cmd[-1] == "${args}"
    argv = [*cmd[4:-1], *(f"--{k}={v}" for k, v in choice.items()), "--quick", "--out", str(tmp_path / "r")]
    runs = _fake_wandb(monkeypatch, choice)  # the agent also puts its choice into wandb.config
    assert cli.main(argv) == 0
    rec = json.loads((tmp_path / "r" / "results.json").read_text())
    assert all(rec["config"][k] == pytest.approx(v) if isinstance(v, float) else rec["config"][k] == v
               for k, v in choice.items())  # fmt: skip
    assert sweep["metric"]["name"] in rec["metrics"] and sweep["metric"]["name"] in runs[0].summary


# ----------------------------------------------------------------------------------- progress bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_silences_bars_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_all()
    for progress, shown in ((True, True), (False, False)):
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        ctx = Context(
            REGISTRY["stn_ridge"], {"seed": 0}, device=torch.device("cpu"), out=tmp_path,
            logger=hg.log.Logger(), progress=progress,
        )  # fmt: skip
        assert list(ctx.bar(range(5), desc="steps")) == list(range(5))
        assert ("steps" in term.getvalue()) is shown
