"""The ``hypergrad`` command, the logger (wandb offline), sweeps as an agent runs them, and report."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "wandb-dir"
    d.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return d


def test_list_names_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    load_all()
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(REGISTRY) >= 2
    assert all(name in "\n".join(lines) for name in REGISTRY)
    assert cli.main(["show", "overfit_val"]) == 0
    shown = capsys.readouterr().out
    assert "methods: neumann, cg, identity, unrolled" in shown and "(quick: 40)" in shown


def test_python_dash_m_and_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hypergrad", "list"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "accuracy" in out.stdout
    script = Path(sys.executable).parent / "hypergrad"
    if script.exists():  # installed by pip install -e . (setup.cfg console_scripts)
        out = subprocess.run([str(script), "list"], capture_output=True, text=True, check=True)
        assert "overfit_val" in out.stdout


def test_run_writes_results_csv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["run", "accuracy", "--quick", "--no-progress", "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "rel error" in printed and "neumann(5)" in printed
    rec = json.loads((out / "results.json").read_text())
    assert rec["config"]["seed"] == 1 and rec["size"] == "quick"
    assert {"machine", "versions", "wall_seconds", "metrics", "headline", "command"} <= set(rec)
    assert rec["versions"]["torch"] == torch.__version__
    assert (out / "trajectory.csv").read_text().startswith("problem,method,steps,rel_error,cosine")
    assert (out / "error_vs_steps.png").stat().st_size > 1000


def test_settings_are_typed_and_checked() -> None:
    load_all()
    exp = REGISTRY["overfit_val"]
    cfg = cli.build_config(exp, "quick", ["--hyper_lr=0.3", "solver_steps=7"], method="cg", seed=4)
    assert cfg["hyper_lr"] == 0.3 and cfg["solver_steps"] == 7 and cfg["method"] == "cg" and cfg["seed"] == 4
    assert cfg["epochs"] == exp.quick["epochs"]
    with pytest.raises(SystemExit, match="no setting 'hyper_rl'"):
        cli.build_config(exp, "default", ["hyper_rl=0.1"])
    with pytest.raises(SystemExit, match="no method 'newman'"):
        cli.build_config(exp, "default", [], method="newman")
    with pytest.raises(SystemExit, match="solver_steps"):
        cli.build_config(exp, "default", ["solver_steps=2.5"])


def test_logger_wandb_offline_run(wandb_env: Path) -> None:
    model = torch.nn.Linear(3, 2)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)
    info = hg.HyperStepInfo(0.5, 1.0, 5, 0.2, "fixed", None, 0.01, False, 1)
    logger = hg.log.Logger(wandb=True, project="test", config={"a": 1}, dir=wandb_env)
    assert logger.run is not None and logger.config == {"a": 1}
    row = logger.hyper_step(info, hparams=hp, step=1, train_loss=0.7)
    assert row["hparams/value.mean"] == pytest.approx(0.1)
    logger.summary({"final": 1.0})
    logger.finish()
    runs = list((wandb_env / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_logger_passes_init_kwargs_to_wandb_and_refuses_its_own(wandb_env: Path) -> None:
    logger = hg.log.Logger(
        wandb=True,
        project="test",
        dir=wandb_env,
        init_kwargs={"group": "sweep-7", "tags": ["ift", "neumann"], "job_type": "tune", "id": "run123"},
    )
    try:
        assert logger.run.group == "sweep-7" and logger.run.job_type == "tune"
        assert list(logger.run.tags) == ["ift", "neumann"] and logger.run.id == "run123"
    finally:
        logger.finish()
    with pytest.raises(ValueError, match="init_kwargs sets name, project, which Logger sets itself"):
        hg.log.Logger(wandb=True, init_kwargs={"project": "p", "name": "n"})


def test_wandb_mode_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hg.log.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert hg.log.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert hg.log.wandb_mode() == "disabled"


def test_wandb_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install hypergrad\[wandb\]"):
        hg.log.Logger(wandb=True)


def test_cli_wandb_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match=r"pip install hypergrad\[wandb\]"):
        cli.main(["run", "accuracy", "--quick", "--wandb", "--out", str(tmp_path)])


def _agent_command(sweep: dict, choice: dict[str, object]) -> list[str]:
    """The command line a wandb agent runs: the sweep's ``command`` with its macros expanded."""
    args = [f"--{k}={v}" for k, v in choice.items()]
    cmd: list[str] = []
    for part in sweep["command"]:
        if part == "${env}":
            continue  # /usr/bin/env: nothing to add
        if part == "${interpreter}":
            cmd.append(sys.executable)
        elif part == "${args}":
            cmd.extend(args)
        else:
            cmd.append(part)
    return cmd


def _sample(spec: dict, rng: random.Random) -> object:
    if "values" in spec:
        return rng.choice(spec["values"])
    if spec["distribution"] == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if spec["distribution"] == "log_uniform_values":
        import math

        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    raise AssertionError(spec)


@pytest.mark.parametrize("name", ["overfit_val_grid.yaml", "overfit_val_random.yaml"])
def test_sweep_files_parse_and_name_real_settings(name: str) -> None:
    load_all()
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / name).read_text())
    exp_name = sweep["command"][sweep["command"].index("run") + 1]
    exp = REGISTRY[exp_name]
    for key, spec in sweep["parameters"].items():
        assert key in exp.defaults, key
        if key == "method":
            assert set(spec["values"]) <= set(exp.methods)
    assert sweep["metric"]["name"] in {"val_loss", "val_acc"}


def test_one_sweep_configuration_as_an_agent_runs_it(tmp_path: Path, wandb_env: Path) -> None:
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / "overfit_val_random.yaml").read_text())
    choice = {k: _sample(v, random.Random(3)) for k, v in sweep["parameters"].items()}
    choice["method"] = "cg"
    out = tmp_path / "agent-run"
    cmd = [*_agent_command(sweep, choice), "--quick", "--out", str(out)]  # smoke size, our folder
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["config"]["method"] == "cg"
    assert rec["config"]["solver_steps"] == choice["solver_steps"]
    assert rec["config"]["hyper_lr"] == pytest.approx(float(choice["hyper_lr"]))  # type: ignore[arg-type]
    assert list((out / "wandb").glob("offline-run-*"))


def _fake_results(path: Path, number: int, name: str) -> Path:
    path.mkdir(parents=True)
    rec = {
        "experiment": name,
        "number": number,
        "title": f"title {name}",
        "paper": "Someone 2020",
        "claim": "a claim",
        "command": f"hypergrad run {name}",
        "headline": f"ours {number}",
        "machine": {"cpu_count": 2, "torch_threads": 1},
        "wall_seconds": 12.3,
    }
    (path / "results.json").write_text(json.dumps(rec))
    return path / "results.json"


def test_report_regenerates_the_readme_table(tmp_path: Path) -> None:
    b = _fake_results(tmp_path / "b", 7, "bbb")
    a = _fake_results(tmp_path / "a", 2, "aaa")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{cli.REPORT_START}\nstale row\n{cli.REPORT_END}\noutro\n")
    assert cli.main(["report", str(b), str(a), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale row" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    table = text.split(cli.REPORT_START)[1].split(cli.REPORT_END)[0]
    assert table.index("aaa") < table.index("bbb")  # sorted by experiment number
    assert "| 2. title aaa | Someone 2020 | `hypergrad run aaa` | a claim | ours 2 |" in table
    assert cli.main(["report", str(a), "--readme", str(readme)]) == 0  # idempotent markers
    assert "bbb" not in readme.read_text()


def test_committed_readme_table_is_the_generated_one() -> None:
    paths = sorted(ROOT.glob(cli.DEFAULT_RESULTS))
    text = (ROOT / "experiments" / "README.md").read_text()
    table = text.split(cli.REPORT_START)[1].split(cli.REPORT_END)[0].strip()
    if not paths:
        assert table == ""
        return
    assert table == cli.report(paths).strip(), "run `hypergrad report` after committing results"
