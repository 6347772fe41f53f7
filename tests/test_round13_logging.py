"""Round 13: what researchers use around the solvers, as they use it.

A wandb sweep run the way its agent runs it (the agent's environment, its parameter file and its
``${args}`` formatting, with a real wandb, offline); the Logger inside the training loop of every
family (each logged field read back against the HyperStepInfo and the hyperparameters), over
10,000 calls and on bf16 tensors; progress bars in a log that is not a terminal; the command a
run records, re-run from a path with spaces; ``hypergrad report`` on a hand-edited results.json;
``hypergrad show``'s values given back to ``run --set``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import shlex
import struct
import sys
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all
from hypergrad.experiments.common import Context, Experiment, Limit, Outcome, describe_setting

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ a wandb sweep, as its agent runs it


# wandb.init reads the agent's parameter file without closing it (wandb/sdk/lib/config_util.py
# dict_from_config_file, wandb 0.31): its ResourceWarning is wandb's, not ours
_WANDB_LEAKS_ITS_PARAM_FILE = (
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
)


def _leak(fn: Any) -> Any:
    for mark in _WANDB_LEAKS_ITS_PARAM_FILE:
        fn = mark(fn)
    return fn


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``agent(run_id, params)`` sets up what ``wandb agent`` sets up before it starts a run's
    command (wandb/wandb_agent.py: ``WANDB_SWEEP_ID``, ``WANDB_RUN_ID``, the parameter file at
    ``WANDB_SWEEP_PARAM_PATH`` that ``wandb.init`` reads into ``wandb.config``) and returns the
    ``${args}`` it would put on the command line (``--key=value``, as the agent formats them)."""
    import wandb
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib.config_util import save_config_file_from_dict

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{k}_DIR", str(tmp_path / f"wandb-{k.lower()}"))
    monkeypatch.chdir(tmp_path)

    def start(run_id: str, params: dict[str, Any]) -> list[str]:
        args = {k: {"value": v} for k, v in params.items()}
        path = tmp_path / "wandb" / "sweep-sw13" / f"config-{run_id}.yaml"
        save_config_file_from_dict(str(path), args)
        monkeypatch.setenv("WANDB_SWEEP_ID", "sw13")
        monkeypatch.setenv("WANDB_RUN_ID", run_id)
        monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(path))
        wandb.teardown()  # a fresh process per run, as the agent starts: settings read anew
        return list(create_sweep_command_args({"args": args})["args"])

    yield start
    wandb.teardown()


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``.wandb`` file (32 KiB blocks, 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _summary(out: Path) -> dict[str, Any]:
    (file,) = (out / "wandb").glob("offline-run-*/*.wandb")
    return {
        str(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
        for r in _wandb_records(file)
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }


@_leak
def test_sweep_points_keep_their_own_run_folders_and_report_the_metric(agent: Any) -> None:
    """The grid sweep's command (experiments/sweeps/overfit_val_grid.yaml) without ``--out``, for
    two points. Each point used to write into results/overfit_val/, replacing the one before it:
    after the sweep one results.json was left of two (and two agents on one machine mixed the
    files of two runs in that folder)."""
    import yaml

    sweep_file = Path(__file__).parents[1] / "experiments" / "sweeps" / "overfit_val_grid.yaml"
    sweep = yaml.safe_load(sweep_file.read_text())
    command = sweep["command"][sweep["command"].index("run") : -1]
    points = {"pt-a": {"method": "cg", "solver_steps": 1, "hyper_lr": 0.3},
              "pt-b": {"method": "unrolled", "solver_steps": 5.0, "hyper_lr": 0.03}}  # fmt: skip
    for run_id, point in points.items():
        argv = [*command, *agent(run_id, point), "--quick"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(argv) == 0
    for run_id, point in points.items():
        out = Path("results") / "overfit_val" / run_id
        rec = json.loads((out / "results.json").read_text())
        assert {k: rec["config"][k] for k in point} == point
        assert isinstance(rec["config"]["solver_steps"], int)
        metric = sweep["metric"]["name"]
        assert _summary(out)[metric] == pytest.approx(rec["metrics"][metric], rel=1e-12)
        assert (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert not (Path("results") / "overfit_val" / "results.json").exists()


def _echo(ctx: Context) -> Outcome:
    return Outcome({"val_loss": float(ctx.config["n"])}, [dict(ctx.config)], "echo")


ECHO = Experiment(
    "round13_echo", 99, "echo the settings", "-", "-",
    defaults={"n": 3, "lr": 0.1, "flag": True, "kind": "a", "sizes": "1,2", "rates": "0.1,0.2"},
    quick={}, paper_size={}, run=_echo,
    limits={"kind": Limit(choices=("a", "b")), "sizes": Limit(1, items=int), "rates": Limit(0, items=float),
            "lr": Limit(0, 1, low_open=True)},
)  # fmt: skip


@_leak
def test_wandb_config_values_of_every_type_win_over_the_command_line(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep whose command has no ``${args}``: its values reach the run through wandb.config
    alone, typed by YAML (int, float, bool, str, list), and win over the command line's. A single
    number for a list setting (a sweep's ``values: [0.1, 0.5]`` over it, each point one item) was
    refused: "setting rates=0.5 is not allowed: ... comma-separated numbers >= 0"."""
    monkeypatch.setitem(REGISTRY, ECHO.name, ECHO)
    agent("types", {"n": 7.0, "lr": 1, "flag": 0, "kind": "b", "sizes": [4, 5.0, 6], "rates": 0.5})
    argv = ["run", ECHO.name, "--wandb", "--no-progress", "--set", "n=2", "--set", "flag=true", "--out", "r"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    config = json.loads(Path("r/results.json").read_text())["config"]
    want = {"n": 7, "lr": 1.0, "flag": False, "kind": "b", "sizes": "4,5,6", "rates": "0.5", "seed": 0}
    assert config == want
    assert [type(config[k]) for k in ("n", "lr", "flag")] == [int, float, bool]


@_leak
@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"n": 2.5}, ["n=2.5", "an integer >= 0"]),
        ({"flag": 0.5}, ["flag=0.5", "a boolean"]),
        ({"lr": 1.5}, ["lr=1.5", "a number in (0, 1]"]),
        ({"sizes": [1, 0]}, ["sizes='1,0'", "comma-separated integers >= 1"]),
        ({"sizes": 0}, ["sizes='0'", "comma-separated integers >= 1"]),
        ({"kind": True}, ["kind=True", "one of a, b"]),
        ({"kind": "c"}, ["kind='c'", "one of a, b"]),
    ],
)
def test_a_sweep_value_of_the_wrong_type_or_range_is_refused_naming_the_key(
    agent: Any, monkeypatch: pytest.MonkeyPatch, params: dict[str, Any], words: list[str]
) -> None:
    monkeypatch.setitem(REGISTRY, ECHO.name, ECHO)
    agent("bad", params)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", ECHO.name, "--wandb", "--no-progress", "--out", "r"])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not Path("r/results.json").exists()


# --------------------------------------------------------------- the Logger in every family's loop


def _data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


class _Stn(nn.Module):
    def __init__(self, n_hparams: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n_hparams)
        self.l2 = hg.nn.StnLinear(8, 3, n_hparams)

    def forward(self, x: torch.Tensor, hp: nn.Module) -> torch.Tensor:
        d = hp.draw(len(x))  # type: ignore[operator]
        return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training), d)


def _family(name: str) -> tuple[hg.HyperOptimizer, nn.Module, dict[str, Any]]:
    """A HyperOptimizer of each family, and the batches its hyper_step takes."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    tb, vb = _data(), _data(seed=1)
    if name in ("implicit", "unrolled"):
        hp: nn.Module = hg.hparams.WeightDecay(mlp, per="parameter", init=1e-2)

        def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return _ce(m, h, b) + h.penalty(m)  # type: ignore[operator]

        inner = torch.optim.SGD(mlp.parameters(), lr=0.1)
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        if name == "implicit":
            solver = hg.CG(maxiter=4, damping=0.1)
            hopt: hg.HyperOptimizer = hg.Implicit(
                mlp, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, solver=solver
            )
            return hopt, hp, {"train_batch": tb, "val_batch": vb}
        hopt = hg.Unrolled(mlp, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, steps=2)
        return hopt, hp, {"val_batch": vb}
    if name == "selftuning":
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        net = _Stn(hp.size).to(DT)

        def stn(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return nn.functional.cross_entropy(m(b[0], h), b[1])

        hopt = hg.SelfTuning(
            net, hp, stn, stn, inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        )  # fmt: skip
        return hopt, hp, {"val_batch": vb}
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(mlp, per="layer", init=1.0)}).to(DT)
    hopt = hg.MarginalLikelihood(
        mlp, hp, likelihood="classification", data_size=24, subset_size=8,
        inner_optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    return hopt, hp, {"train_batch": tb}


@pytest.mark.parametrize("family", ["implicit", "unrolled", "selftuning", "marglik"])
def test_logger_records_every_hyperstep_of_each_family_as_it_happened(family: str, tmp_path: Path) -> None:
    hopt, hp, batches = _family(family)
    logger = hg.log.Logger()
    tb = _data()
    infos = []
    for step in range(1, 5):
        loss = hopt.step(tb)
        info = hopt.hyper_step(**batches)
        infos.append(info)
        row = logger.hyper_step(info, hparams=hp, step=step, inner_loss=loss)
        for field, value in vars(info).items():  # every field, as a float; None fields left out
            if value is None:
                assert field not in row
            elif isinstance(value, str):
                assert row[field] == value
            else:
                assert row[field] == float(value) and type(row[field]) is float, field
        assert row["inner_loss"] == float(loss) and row["step"] == step
        for name, v in hg.hparams.values(hp).items():  # the values after the hyperstep
            flat = v.reshape(-1).to(DT)
            if flat.numel() == 1:
                assert row[f"hparams/{name}"] == float(flat[0])
            else:  # 4 numbers for a tensor of any size, not one per entry
                keys = sorted(k for k in row if k.startswith(f"hparams/{name}."))
                assert keys == [f"hparams/{name}.{s}" for s in ("max", "mean", "min", "std")]
                assert row[f"hparams/{name}.min"] == float(flat.min())
                assert row[f"hparams/{name}.max"] == float(flat.max())
                assert row[f"hparams/{name}.mean"] == pytest.approx(float(flat.mean()), rel=1e-12)
    assert [r["hyper_steps"] for r in logger.history] == [1.0, 2.0, 3.0, 4.0]
    if family == "implicit":  # 195 per-entry decays, summarised in 4 columns
        assert sum(p.numel() for p in hp.parameters()) == 4 * 16 + 16 + 16 * 3 + 3
    if isinstance(hp, hg.hparams.SelfTuned):  # its own schedule agrees with the logged one
        history = hp.history()
        assert [h["hyper_step"] for h in history] == [1.0, 2.0, 3.0, 4.0]
        assert [h["dropout"] for h in history] == [r["hparams/dropout"] for r in logger.history]
    path = logger.to_csv(tmp_path / "t.csv")
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("step,")


def test_logger_keeps_no_tensor_alive_over_ten_thousand_calls() -> None:
    """Losses with their graphs, bf16 and float64 one-element tensors, a HyperStepInfo and a
    large hyperparameter: the rows hold Python numbers only, nothing the loop made stays alive."""
    model = nn.Linear(300, 300, dtype=DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-3)  # 90,300 entries
    logger = hg.log.Logger()
    info = hg.HyperStepInfo(0.25, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    w = torch.ones(3, requires_grad=True)
    gc.collect()
    before = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    refs = []
    for step in range(10_000):
        loss = (w * step).sum()  # with its graph
        bf = torch.tensor(step / 7, dtype=torch.bfloat16)
        if step % 1000 == 0:
            refs += [weakref.ref(loss), weakref.ref(bf)]
            row = logger.hyper_step(info, hparams=hp, step=step, inner_loss=loss, bf16=bf)
            assert row["bf16"] == float(bf) and row["inner_loss"] == 3.0 * step
            assert len(row) == 8 + 2 + 4 + 1  # fields not None, keywords, the decays' summary, step
        else:
            logger.log({"inner_loss": loss, "bf16": bf}, step=step)
    del loss, bf
    gc.collect()
    assert all(r() is None for r in refs)
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) <= before
    assert len(logger.history) == 10_000
    assert all(type(v) in (int, float, str) for row in logger.history for v in row.values())
    assert logger.history[7]["bf16"] == float(torch.tensor(1.0, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------ progress, commands


def test_progress_bars_add_nothing_to_a_log_that_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for flags in ([], ["--no-progress"]):
        assert cli.main(["run", "overfit_val", "--quick", *flags, "--out", str(tmp_path / "r")]) == 0
        cap = capsys.readouterr()
        outputs.append(cap.err)
        assert "\r" not in cap.out + cap.err and "it/s" not in cap.err
    # the second run says it replaces the first; nothing else was written to stderr by either
    assert outputs[0] == "" and outputs[1].startswith("hypergrad run: replacing the previous run")
    assert len(outputs[1].splitlines()) == 1


def test_the_recorded_command_reruns_the_same_run_from_a_path_with_spaces(tmp_path: Path) -> None:
    out = tmp_path / "my runs" / "it's here"
    argv = ["run", "accuracy", "--quick", "--no-progress", "--set", "steps=[1, 5]", f"--out={out}"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    words = shlex.split(first["command"])
    assert words == ["hypergrad", *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(words[1:]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["metrics"] == first["metrics"] and second["config"] == first["config"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"machine": "my laptop"}, ["machine", '"my laptop"', "not an object"]),
        ({"wall_seconds": "12"}, ["wall_seconds", "not a number"]),
        ({"table": ["a", "b"]}, ["table", "not a list of objects"]),
        ({"number": "2"}, ["number", "not an integer"]),
    ],
)
def test_report_names_the_file_and_the_field_of_a_hand_edited_results_json(
    tmp_path: Path, change: dict[str, Any], words: list[str]
) -> None:
    """Each of these stopped ``hypergrad report`` with a bare AttributeError, ValueError or
    TypeError that named neither the file nor the field."""
    good = {
        "experiment": "x", "number": 1, "title": "t", "paper": "p", "command": "c", "claim": "c",
        "headline": "h", "machine": {"cpu_count": 2, "torch_threads": 1}, "wall_seconds": 1.0,
        "table": [{"a": 1}],
    }  # fmt: skip
    other = tmp_path / "ok" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps(good))
    bad = tmp_path / "edited" / "results.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**good, **change}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["report", "--stdout", str(other)]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--stdout", str(other), str(bad)])
    assert str(bad) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_show_prints_values_and_bounds_that_run_accepts_back(capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``key = value`` line of ``hypergrad show`` (and its quick and paper sizes), typed back
    into a shell as ``--set key=value``, gives that value; and the bounds it prints are the
    checked ones: the seed's was printed as 2.14748e+09, 3,647 below the true 2147483647."""
    load_all()
    checked = 0
    for name, exp in REGISTRY.items():
        assert cli.main(["show", name]) == 0
        for line in capsys.readouterr().out.splitlines():
            m = re.match(r"  (\w+) = (.*?)(?:  \(quick: (.*?)\))?(?:  \(paper: (.*?)\))?  \[(.*)\]$", line)
            if not m:
                continue
            key, shown, quick, paper, accepts = m.groups()
            assert accepts == describe_setting(exp, key)
            for text, want in ((shown, exp.defaults.get(key, 0)), (quick, exp.quick.get(key)),
                               (paper, exp.paper_size.get(key))):  # fmt: skip
                if text is not None:
                    (setting,) = shlex.split(f"{key}={text}")
                    assert cli.build_config(exp, "default", [setting])[key] == want, (name, key, text)
                    checked += 1
    assert checked > 150
    exp = REGISTRY["overfit_val"]
    assert describe_setting(exp, "seed") == "an integer in [0, 2147483647]"
    assert cli.build_config(exp, "default", ["seed=2147483647"])["seed"] == 2**31 - 1
    with pytest.raises(SystemExit, match=r"seed=2147483648 is not allowed: .* in \[0, 2147483647\]"):
        cli.build_config(exp, "default", ["seed=2147483648"])


def test_run_called_from_python_leaves_the_callers_thread_count(tmp_path: Path) -> None:
    """``cli.main(["run", ...])`` from a notebook or a script set torch's threads to 1 (the
    ``--threads`` default) for the rest of the process; ``--threads`` holds for the run only."""
    torch.set_num_threads(2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["run", "accuracy", "--quick", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(SystemExit, match="no setting"):  # a refused run leaves it too
        cli.main(["run", "accuracy", "--threads", "3", "--set", "nope=1", "--out", str(tmp_path / "s")])
    assert torch.get_num_threads() == 2


class _Run:
    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = -1  # -1: not finished

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_code = exit_code


@pytest.mark.parametrize(("error", "code"), [(None, None), (RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_a_logger_block_left_by_an_exception_marks_the_wandb_run_failed(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException] | None, code: int | None
) -> None:
    """``with Logger(wandb=True) as logger:`` around a loop that crashed closed the wandb run as
    finished (exit code 0, read back from an offline run's exit record): wandb showed a crashed
    run as a successful one."""
    runs: list[_Run] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_Run()) or runs[-1]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = hg.log.Logger(wandb=True, mode="offline")
    with contextlib.suppress(RuntimeError, KeyboardInterrupt), logger:
        logger.log({"loss": 1.0}, step=1)
        if error is not None:
            raise error("stopped")
    assert runs[0].exit_code == code and logger.run is None and len(logger.history) == 1
