"""Round 26, the command line as a user runs it (helper "cli"): the recorded command of a sweep
run whose ``--method`` / ``--seed`` were abbreviated, ``--paper`` on every experiment, ``--project``
without ``--wandb``, what baselines charges a hyperclean trial, experiments/reproduce.py and the
committed runs its report tabulates, ``hypergrad report`` on a README whose markers are out of
order.

Every run is in-process (``cli.main``), at the smallest size, with wandb disabled or stood in.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    yield
    torch.set_num_threads(threads)


def _config_of(argv: list[str]) -> dict[str, Any]:
    """The settings ``hypergrad run`` builds from ``argv`` (``["run", NAME, ...]``), as
    :func:`hypergrad.cli._run` does, without running anything."""
    load_all()
    parser = cli._parser()
    args, extra = parser.parse_known_args(argv)
    given, bad = cli._settings_of(REGISTRY[args.name], extra)
    assert not bad, bad
    size = "quick" if args.quick else "paper" if args.paper else "default"
    return cli.build_config(
        REGISTRY[args.name], size, [*args.settings, *given], method=args.method, seed=args.seed
    )


# ------------------------------------------------------------------------ the recorded command


@pytest.mark.parametrize(
    ("argv", "sweep"),
    [
        (["run", "overfit_val", "--quick", "--meth", "cg"], {"method": "identity"}),
        (["run", "overfit_val", "--quick", "--meth=cg"], {"method": "unrolled"}),
        (["run", "stn_ridge", "--quick", "--see", "1"], {"seed": 2}),
    ],
)
def test_recorded_command_of_a_run_with_abbreviated_options_reruns_the_run(
    argv: list[str], sweep: dict[str, Any]
) -> None:
    # argparse takes the unique prefixes ``--meth`` / ``--see`` as --method / --seed; when a sweep's
    # wandb.config changes that setting, the recorded command must say the value that ran, once
    # (it kept ``--meth cg`` and added ``--set method=identity``: "given twice", the run cannot be
    # repeated from its results.json)
    asked = _config_of(argv)
    config = {**asked, **sweep}
    recorded = cli._recorded_argv(argv, asked, config)
    assert _config_of(recorded) == config


def test_recorded_command_of_a_sweep_run_reruns_it_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (passes: the whole path, a stand-in wandb whose config a sweep changed, results.json's
    # command run again without wandb gives the same settings and the same numbers)
    class Run:
        def __init__(self, config: dict[str, Any]) -> None:
            self.config, self.name = config, None
            self.summary: dict[str, Any] = {}

        def log(self, *a: Any, **k: Any) -> None:
            pass

        def finish(self, **k: Any) -> None:
            pass

    mod = types.ModuleType("wandb")
    mod.init = lambda *, config, mode, **kw: Run({**config, "lr": 0.01, "seed": 3})  # type: ignore[attr-defined]
    mod.Image = lambda p: p  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "a"
    argv = ["run", "stn_ridge", "--quick", "--seed", "1", "--set", "steps=60", "--wandb", "--no-progress"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["config"]["lr"] == 0.01 and rec["config"]["seed"] == 3 and rec["config"]["steps"] == 60
    monkeypatch.delitem(sys.modules, "wandb")
    again = [a for a in shlex.split(rec["command"])[1:] if a != "--wandb"]
    again[again.index("--out") + 1] = str(tmp_path / "b")
    assert cli.main(again) == 0
    rec2 = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rec2["config"] == rec["config"] and rec2["metrics"] == rec["metrics"]


# ------------------------------------------------------------------------------------- --paper


def test_paper_changes_the_settings_of_every_experiment() -> None:
    # ``--paper`` is "the paper-sized setting": a run that takes it and runs exactly the default
    # settings (while results.json says size "paper") ignored it. baselines' docstring: the
    # targets run at the size target_size names, which --quick sets (to quick); --paper left it
    # at "default"
    load_all()
    same = [
        name
        for name, exp in sorted(REGISTRY.items())
        if cli.build_config(exp, "paper", []) == cli.build_config(exp, "default", [])
    ]
    assert same == []
    assert cli.build_config(REGISTRY["baselines"], "paper", [])["target_size"] == "paper"


# ------------------------------------------------------------------------------------ --project


def test_project_without_wandb_is_refused(tmp_path: Path) -> None:
    # ``--project NAME`` is parsed and then dropped when --wandb is missing: the user who meant to
    # log into NAME finds nothing there, and nothing said so
    out = tmp_path / "r"
    with pytest.raises(SystemExit, match="--wandb"):
        cli.main(["run", "stn_ridge", "--quick", "--no-progress", "--project", "mine", "--out", str(out)])
    assert not (out / "results.json").exists()


# ---------------------------------------------------------------------------------- baselines


def test_baselines_charges_each_hyperclean_trial_the_steps_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Compute is counted in inner training steps: a search costs its trials' training steps"
    # (baselines' docstring). A trial that drops a fraction q of the examples trains on the rest:
    # epochs * ceil(kept / batch_size) steps, up to 5x fewer than the epochs * ceil(n / batch_size)
    # it was charged; the table's "budget (inner steps)" and the equal-compute comparison (fewer
    # trials fit the budget) were wrong. Counted here by wrapping the training function.
    from hypergrad.experiments import hyperclean as hc

    steps: list[int] = []
    train_fixed = hc.train_fixed

    def counting(x: Any, y: Any, weights: Any, cfg: dict[str, Any], device: Any, epochs: int) -> Any:
        steps.append(epochs * math.ceil(len(y) / cfg["batch_size"]))
        return train_fixed(x, y, weights, cfg, device, epochs)

    monkeypatch.setattr(hc, "train_fixed", counting)
    out = tmp_path / "r"
    argv = ["run", "baselines", "--quick", "--no-progress", "--set", "targets=hyperclean", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["table"]}
    # the calls: the tuned model's retraining, the shared first run, random's trials, TPE's trials
    n_random, n_tpe = rows["random @ full"]["trials"], rows["tpe @ full"]["trials"]
    assert len(steps) == 2 + n_random + n_tpe
    assert len(set(steps[2:])) > 1  # (trials of different sizes: the test can tell)
    assert rows["random @ full"]["budget (inner steps)"] == steps[1] + sum(steps[2 : 2 + n_random])
    assert rows["tpe @ full"]["budget (inner steps)"] == steps[1] + sum(steps[2 + n_random :])


# ------------------------------------------------------------------------ experiments/reproduce.py


def test_reproduce_reruns_every_committed_run_that_its_report_tabulates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # experiments/reproduce.py reruns the registered experiments into experiments/reports/NAME and
    # then `hypergrad report` tabulates experiments/reports/*/results.json: the committed
    # stn_mnist1d_delta run (a second setting of stn_mnist1d) was never rerun, so the regenerated
    # README table showed its old numbers beside fresh ones, with nothing to say so
    committed = sorted(p.parent.name for p in (ROOT / "experiments" / "reports").glob("*/results.json"))
    assert "stn_mnist1d_delta" in committed  # (the committed run that no experiment's name gives)
    for name in committed:
        dest = tmp_path / "experiments" / "reports" / name
        dest.mkdir(parents=True)
        (dest / "results.json").write_text(
            (ROOT / "experiments" / "reports" / name / "results.json").read_text()
        )
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(list(argv))
        return 0

    spec = importlib.util.spec_from_file_location("_round26_reproduce", ROOT / "experiments" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod.cli, "main", fake_main)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reproduce.py"])
    mod.main()
    assert calls[-1] == ["report"]
    outs = {}
    for argv in calls[:-1]:
        args, _ = cli._parser().parse_known_args(argv)
        assert args.out is not None
        outs[Path(args.out).name] = _config_of(argv)
    assert sorted(outs) == committed
    # each rerun has the settings its committed record ran with (the delta run: delta, one seed)
    for name in committed:
        rec = json.loads((tmp_path / "experiments" / "reports" / name / "results.json").read_text())
        assert outs[name] == rec["config"], name


# ------------------------------------------------------------------------------------- report


def _results(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text((ROOT / "experiments" / "reports" / "hd" / "results.json").read_text())
    return path


def test_report_into_a_readme_with_markers_out_of_order_is_a_clear_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    text = f"# runs\n{cli.REPORT_END}\nold table\n{cli.REPORT_START}\nnotes\n"
    readme.write_text(text)
    with pytest.raises(SystemExit, match="must come after"):
        cli.main(["report", str(_results(tmp_path)), "--readme", str(readme)])
    assert readme.read_text() == text  # untouched


def test_report_replaces_only_the_text_between_the_markers(tmp_path: Path) -> None:
    # (passes: the text around the markers is kept; running it twice gives the same file)
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{cli.REPORT_START}\nold\n{cli.REPORT_END}\ntail\n")
    path = _results(tmp_path)
    assert cli.main(["report", str(path), "--readme", str(readme)]) == 0
    first = readme.read_text()
    assert first.startswith(f"head\n{cli.REPORT_START}\n| experiment |") and first.endswith(
        f"{cli.REPORT_END}\ntail\n"
    )
    assert "old" not in first and "hypergrad run hd" in first
    assert cli.main(["report", str(path), "--readme", str(readme)]) == 0
    assert readme.read_text() == first
