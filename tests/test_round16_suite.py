"""Round 16: the run suite as a researcher uses it from the README.

``hypergrad run`` on a machine where the device matters (an experiment that computes on the CPU
recorded as run on the GPU), wandb's own environment (``WANDB_PROJECT``), a sweep's command
macros, ``--help`` and the ranges it documents, and the experiments' splits.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all

load_all()


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)``: its exit code (a SystemExit's too), stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            err.write(str(e.code))
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------ devices


def test_an_experiment_that_computes_on_the_cpu_is_recorded_as_run_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU machine (CUDA seen), ``stn_ridge`` (like accuracy, stn_mnist1d and the two
    marginal-likelihood experiments) builds its data and model on the CPU whatever the context's
    device is: the run computed on the CPU while ``results.json`` said ``"device": "cuda"`` and
    named the GPU, and the README's machine column with it (and ``--threads`` was not applied,
    being for CPU runs). Now the run gets the CPU, and ``--device cuda`` says it is ignored."""
    monkeypatch.setattr(cli, "_cuda_available", lambda: True)  # what a GPU machine's torch says
    for flag in ([], ["--device", "cuda"]):
        out = tmp_path / ("default" if not flag else "cuda")
        code, _, err = _run(["run", "stn_ridge", "--quick", "--no-progress", "--out", str(out), *flag])
        assert code == 0, err
        machine = json.loads((out / "results.json").read_text())["machine"]
        assert machine["device"] == "cpu" and "gpu" not in machine
        assert ("--device cuda is ignored" in err) == bool(flag)


def test_the_experiments_marked_cpu_only_are_those_that_never_use_the_device() -> None:
    """The mark follows the code: an experiment that never reads ``ctx.device`` computes on the
    CPU (and is marked so), and one marked CPU-only never reads it."""
    for exp in REGISTRY.values():
        source = Path(sys.modules[exp.run.__module__].__file__ or "").read_text()
        assert exp.cpu_only == ("ctx.device" not in source), exp.name


def test_device_cuda_without_cuda_is_refused_before_the_run_folder_is_touched(tmp_path: Path) -> None:
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    code, _, err = _run(["run", "overfit_val", "--quick", "--device", "cuda", "--out", str(out)])
    assert code != 0 and "--device cuda, but torch sees no CUDA device" in err
    assert not out.exists()
    # an experiment that computes on the CPU runs there, with the note
    code, _, err = _run(
        ["run", "stn_ridge", "--quick", "--no-progress", "--device", "cuda", "--out", str(out)]
    )
    assert code == 0 and "--device cuda is ignored" in err


# ------------------------------------------------------------------------------------ wandb project


class _Run:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.summary, self.name = dict(config), {}, None

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, sweep: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A stand-in ``wandb`` module recording the keyword arguments of each ``wandb.init``; its
    runs' config is the one passed with ``sweep`` over it (what a sweep agent's run gets)."""
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> _Run:
        calls.append(kwargs)
        return _Run({**(kwargs.get("config") or {}), **(sweep or {})})

    mod = types.ModuleType("wandb")
    mod.init = init  # type: ignore[attr-defined]
    mod.Image = lambda path: path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_wandb_project_from_the_environment_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WANDB_PROJECT=mine hypergrad run ... --wandb`` logged to the project ``hypergrad``: wandb
    lets an argument win over its environment variable (checked with wandb 0.31 offline:
    ``wandb.init(project="hypergrad")`` under ``WANDB_PROJECT=envproj`` gives ``run.project ==
    "hypergrad"``), and Logger and ``--project`` always passed one."""
    calls = _fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    hg.log.Logger(wandb=True).finish()
    hg.log.Logger(wandb=True, project="given").finish()
    code, _, err = _run(
        ["run", "stn_ridge", "--quick", "--no-progress", "--wandb", "--out", str(tmp_path / "a")]
    )
    assert code == 0, err
    code, _, err = _run(
        [
            "run",
            "stn_ridge",
            "--quick",
            "--no-progress",
            "--wandb",
            "--project",
            "p2",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0, err
    monkeypatch.delenv("WANDB_PROJECT")
    hg.log.Logger(wandb=True).finish()
    assert [c["project"] for c in calls] == ["mine", "given", "mine", "p2", "hypergrad"]


# ----------------------------------------------------------------------------------------- --help


def test_run_help_documents_the_ranges_that_run_enforces(tmp_path: Path) -> None:
    """``hypergrad run --help`` states each option's range, and the bounds it states are the
    ones enforced: the seed's ends are accepted, one past them refused; threads >= 1."""
    code, out, _ = _run(["run", "--help"])
    assert code == 0
    text = " ".join(out.split())
    seed = re.search(r"--seed SEED an integer in \[(\d+), (\d+)\]", text)
    assert seed is not None, text
    lo, hi = int(seed.group(1)), int(seed.group(2))
    assert "--threads THREADS torch CPU threads, an integer >= 1" in text
    assert "hypergrad show NAME" in text  # where the settings are listed
    for value, ok in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
        cfg_ok = True
        try:
            cli.build_config(REGISTRY["stn_ridge"], "quick", [], seed=value)
        except SystemExit as e:
            cfg_ok = False
            assert f"seed={value}" in str(e)
        assert cfg_ok == ok, value
    code, _, err = _run(["run", "stn_ridge", "--quick", "--threads", "0", "--out", str(tmp_path)])
    assert code != 0 and "--threads 0" in err


# ------------------------------------------------------------------------------ a sweep's macros


def _macro_args(params: dict[str, Any]) -> dict[str, list[str]]:
    """What wandb's agent puts on the command line for ``params`` with each of its macros."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    made = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    return {m: list(made[m]) for m in ("args", "args_no_hyphens", "args_no_boolean_flags")}


def test_every_argument_macro_of_a_sweep_command_reaches_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep whose ``command`` uses ``${args_no_boolean_flags}`` (wandb's macro for argparse
    ``store_true`` flags: a true boolean as ``--delta`` alone, a false one left out) or
    ``${args_no_hyphens}`` (``hyper_lr=0.02``) failed every point with "unrecognised arguments".
    Each macro now gives the settings ``${args}`` gives; the booleans it leaves out come from
    ``wandb.config``."""
    exp = REGISTRY["stn_mnist1d"]
    params = {"delta": True, "shift": False, "hyper_lr": 0.02, "grid": "0.0,0.5"}
    macros = _macro_args(params)
    flags = macros["args_no_boolean_flags"]
    assert flags[0] == "--delta" and not any(a.startswith("--shift") for a in flags)  # (wandb's)
    want = cli.build_config(exp, "quick", [f"{k}={v}" for k, v in params.items()])
    for name, argv in macros.items():
        given, bad = cli._settings_of(exp, argv)
        assert not bad, name
        got = cli.build_config(exp, "quick", given)
        if name == "args_no_boolean_flags":  # the false boolean is left out: the default
            assert got["shift"] is exp.defaults["shift"] and {**got, "shift": False} == want
        else:
            assert got == want, name
    # as the agent runs it: the left-out false boolean arrives in wandb.config
    calls = _fake_wandb(monkeypatch, {**params, "plot": False, "epochs": 1, "grid": "0.0"})
    out = tmp_path / "point"
    argv = ["run", "stn_mnist1d", "--quick", "--wandb", "--no-progress", "--out", str(out)]
    code, _, err = _run([*argv, *macros["args_no_boolean_flags"]])
    assert code == 0, err
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["delta"], config["shift"], config["hyper_lr"], config["epochs"]) == (True, False, 0.02, 1)
    assert calls[0]["config"]["delta"] is True  # the command line's, sent to wandb.init
    # a bare flag that is no boolean setting is still a usage error
    code, _, err = _run(["run", "stn_mnist1d", "--quick", "--hyper_lr", "--out", str(tmp_path / "x")])
    assert code == 2 and "unrecognised arguments: --hyper_lr" in err


# ------------------------------------------------------------------ settings that show allows, run refuses


STANDARDISED = ("overfit_val", "hyperclean", "augment", "hd", "distill", "logreg_cv")


@pytest.mark.parametrize("name", STANDARDISED)
def test_one_training_example_is_refused_where_the_inputs_are_standardised(name: str) -> None:
    """``--set n_train=1`` was allowed (``show``: "an integer >= 1"), but these experiments
    standardise their inputs with the training examples' standard deviation, NaN for one
    example: ``hd`` then reported every optimiser as diverged at chance accuracy, the others
    stopped on a non-finite loss. Refused now, naming the setting; 2 is allowed."""
    exp = REGISTRY[name]
    with pytest.raises(SystemExit, match=r"n_train=1 is not allowed: .* an integer >= 2"):
        cli.build_config(exp, "quick", ["n_train=1"])
    assert cli.build_config(exp, "quick", ["n_train=2"])["n_train"] == 2


def test_digits_split_refuses_one_training_image_and_two_are_finite() -> None:
    from hypergrad.experiments.common import digits_split

    with pytest.raises(ValueError, match="n_train = 1: .*at least 2"):
        digits_split(0, 1, 10, torch.device("cpu"))
    for part in digits_split(0, 2, 10, torch.device("cpu")):
        assert torch.isfinite(part[0]).all()


def test_hd_with_two_training_images_trains_instead_of_diverging(tmp_path: Path) -> None:
    code, _, err = _run(
        ["run", "hd", "--quick", "--no-progress", "--set", "n_train=2", "--out", str(tmp_path)]
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    diverged = {k: v for k, v in metrics.items() if k.endswith(".diverged")}
    assert diverged and not any(diverged.values()), diverged


def test_every_translation_range_the_setting_allows_is_one_the_hyperparameter_takes() -> None:
    """marglik_invariance's ``init_range`` was documented (and checked) as "a number in (0, 4]",
    but ``hg.hparams.RandomTranslation`` needs init < max = 4: ``--set init_range=4`` ran the
    whole no-augmentation run, then stopped with a ValueError. Now (0, 4)."""
    exp = REGISTRY["marglik_invariance"]
    with pytest.raises(SystemExit, match=r"init_range=4.0 is not allowed: .*a number in \(0, 4\)"):
        cli.build_config(exp, "quick", ["init_range=4"])
    for value in (1e-3, 2.0, 3.99):
        cli.build_config(exp, "quick", [f"init_range={value!r}"])
        hg.hparams.RandomTranslation((12, 12), init=value, max=4.0)


# ------------------------------------------------------------------------------ a stdout without λ


def test_a_stdout_that_cannot_encode_greek_letters_gets_escapes_not_a_crash(tmp_path: Path) -> None:
    """``hypergrad run logreg_cv > log.txt`` on Windows (a redirected stdout is cp1252) or under a
    Latin-1 locale: the run finished and wrote its results, then printing its table ("grid (8 λ)")
    raised UnicodeEncodeError: exit code 1 and a traceback; ``hypergrad show stn_ridge`` (its
    claim says λ*) likewise. Now the letter is written as ``\\u03bb``, as Python's stderr does,
    and the stream's own error handling is restored afterwards."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")  # errors="strict", as a redirected stdout's
    err = io.StringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(err):
        assert cli.main(["show", "stn_ridge"]) == 0
        assert cli.main(["run", "logreg_cv", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    stream.flush()
    text = raw.getvalue().decode("cp1252")
    assert "tunes \\u03bb to the validation optimum" in text and "grid (8 \\u03bb)" in text
    assert stream.errors == "strict"


def test_a_nested_sweep_parameter_is_refused_as_nested_not_as_a_misspelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep grouping parameters (``solver: {parameters: {method: ..., solver_steps: ...}}``,
    wandb's "nested parameters") reaches the command as ``--solver={'method': 'cg', ...}`` and
    ``wandb.config`` as a dict. Refused, rightly, but with "did you mean 'solver_steps'?": a
    rename would not help. Now the message says the settings are flat and what to do, on the
    command line and from ``wandb.config`` alike."""
    nested = {"method": "cg", "solver_steps": 5}
    macros = _macro_args({"solver": nested, "hyper_lr": 0.1})
    out = tmp_path / "point"
    code, _, err = _run(["run", "overfit_val", "--quick", "--out", str(out), *macros["args"]])
    assert code != 0 and "did you mean" not in err, err
    assert "no setting 'solver' (its value {'method': 'cg', 'solver_steps': 5} is a sweep's nested" in err
    assert "list the parameters inside 'solver' at the top level" in err
    assert not out.exists()
    _fake_wandb(monkeypatch, {"solver": nested})
    code, _, err = _run(["run", "overfit_val", "--quick", "--wandb", "--out", str(out)])
    assert code != 0 and "did you mean" not in err and "sweep's nested parameters" in err, err


# ---------------------------------------------------------------------------- results.json is JSON


def _strict(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_results_json_of_a_search_with_no_trial_is_strict_json(tmp_path: Path) -> None:
    """baselines with no black-box trial in its budget fills the searches' table cells with NaN,
    which results.json held as the bare literal ``NaN`` (12 of them): not JSON (jq, JavaScript's
    ``JSON.parse`` and ``parse_constant`` refuse it; round 12 fixed one such metric of
    hyperclean by hand). Every non-finite number is now ``null``, and ``hypergrad report``
    shows it as "-"."""
    out = tmp_path / "b"
    argv = ["run", "baselines", "--quick", "--no-progress", "--set", "targets=overfit_val"]
    code, _, err = _run([*argv, "--set", "budget_multiple=0.01", "--out", str(out)])
    assert code == 0, err
    rec = _strict((out / "results.json").read_text())
    searches = [r for r in rec["table"] if r["trials"] == 0]
    assert len(searches) == 4 and all(r["val loss"] is None and r["test acc"] is None for r in searches)
    code, table, _ = _run(["report", str(out / "results.json"), "--stdout"])
    assert code == 0 and re.search(
        r"\| tpe @ full \| one global weight decay \| \d+ \| 0 \| - \| - \| - \|", table
    )
    assert "nan" not in table.lower()
