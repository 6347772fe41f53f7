"""Round 10: the documentation a newcomer reads, checked against the code.

README.md, experiments/README.md and benchmarks/README.md: their code blocks run as written (CPU,
small), the API names, arguments and defaults they mention exist and behave as stated, and the
numbers they quote from the committed benchmark JSONs are those JSONs'. The public docstrings:
every ``(default: ...)`` equals the signature's default, and the ``Raises`` entries are raised for
the stated inputs. DESIGN.md's "Public API contract": its names and promises exist.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg
import hypergrad.testing  # noqa: F401  (hg.testing is documented but not imported by hypergrad)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _blocks(path: Path, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def _json(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


@pytest.fixture(autouse=True)
def _one_thread_seeded() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ README.md: its code blocks


def test_readme_python_blocks_are_the_expected_ones() -> None:
    """The README holds four Python blocks: the drop-in example (run by test_repository and
    test_round9_papers), the one-line method swaps, the self-tuning and the marginal-likelihood
    examples (run below). A new block must be added to these tests."""
    blocks = _blocks(ROOT / "README.md")
    assert len(blocks) == 4
    assert "hg.Implicit(model, hp, train_loss, val_loss" in blocks[0]
    assert blocks[1].count("hg.") >= 4 and "..." in blocks[1]
    assert "hg.SelfTuning(" in blocks[2] and "hg.MarginalLikelihood(" in blocks[3]


def test_readme_selftuning_block_runs_as_written() -> None:
    """The self-tuning block defines its own stand-in batches and runs as printed: one hyperstep
    every T_train = 2 steps, the schedule has one row per hyperstep, every value in its domain."""
    ns: dict[str, Any] = {}
    exec(compile(_blocks(ROOT / "README.md")[2], "README-selftuning", "exec"), ns)
    hopt, hp = ns["hopt"], ns["hp"]
    rows = hp.history()
    assert len(ns["train_batches"]) == 20 and hopt.hyper_steps == len(rows) == 10
    for row in rows:
        assert 0.0 < row["dropout"] < 0.9 and 0 <= row["cutout"] <= 16
        assert float(row["cutout"]).is_integer() and row["sigma.dropout"] > 0
    assert [r["inner_step"] for r in rows] == [2.0 * (i + 1) for i in range(10)]


def test_readme_marginal_likelihood_block_runs_as_written() -> None:
    """The marginal-likelihood block runs as printed on scikit-learn's digits: after burn_in = 100
    steps a hyperstep every 5th step (180 steps: 17 hypersteps), and the per-layer precisions
    stay finite and positive; ``info.outer_loss`` is −bound / N, finite."""
    pytest.importorskip("sklearn")
    ns: dict[str, Any] = {}
    exec(compile(_blocks(ROOT / "README.md")[3], "README-marglik", "exec"), ns)
    hopt, hp, info = ns["hopt"], ns["hp"], ns["info"]
    assert hopt.hyper_steps == 17
    prec = hp["prior"].value
    assert prec.shape == (2,) and bool((prec > 0).all()) and bool(torch.isfinite(prec).all())
    assert math.isfinite(info.outer_loss) and not info.skipped


def _drop_in_context() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))  # 51 weights: forward mode is quick
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-3)

    def train_loss(model: nn.Module, hparams: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y) + hparams.penalty(model)

    def val_loss(model: nn.Module, hparams: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    vb = (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    return {
        "torch": torch,
        "hg": hg,
        "model": model,
        "hp": hp,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tb": tb,
        "vb": vb,
    }


@pytest.mark.parametrize("line", [ln for ln in _blocks(ROOT / "README.md")[1].splitlines() if ln.strip()])
def test_readme_method_swaps_run(line: str) -> None:
    """Each line of "Swap the method in one line", with ``...`` = the model, hyperparameters,
    losses and optimisers of the example above (as the README now says), constructs a method
    that steps and takes a finite hyperstep; the solver and mode are the ones the line names."""
    ctx = _drop_in_context()
    args = (
        "model, hp, train_loss, val_loss, "
        "inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "
        "outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2)"
    )
    code = line.split("#")[0].strip()
    assert code.count("...") == 1
    hopt = eval(code.replace("...", args), ctx)  # noqa: S307 - the README's own line
    for _ in range(5):
        hopt.step(ctx["tb"])
    info = hopt.hyper_step(train_batch=ctx["tb"], val_batch=ctx["vb"])
    assert math.isfinite(info.outer_loss) and math.isfinite(info.hypergrad_norm) and not info.skipped
    if "CG(" in code:
        assert isinstance(hopt.solver, hg.CG) and hopt.solver.maxiter == 20
    elif "Identity" in code:
        assert isinstance(hopt.solver, hg.Identity) and info.solver_iterations == 0
    else:
        assert isinstance(hopt, hg.Unrolled) and info.unrolled_steps == 5
        assert ("forward" in code) == (str(getattr(hopt.mode, "value", hopt.mode)) == "forward")


def test_experiments_readme_logging_block_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """experiments/README.md's "Logging your own loop" block, inside the drop-in example's loop
    (``cfg``, ``tb``, ``vb``, ``i``, ``loss`` from there); ``WANDB_MODE=disabled`` (which the
    README says keeps wandb out) so nothing is written or sent."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    (block,) = _blocks(ROOT / "experiments" / "README.md")
    ctx = _drop_in_context()
    m, hp = ctx["model"], ctx["hp"]
    ctx["hopt"] = hg.Implicit(
        m,
        hp,
        ctx["train_loss"],
        ctx["val_loss"],
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
    )
    ctx["loss"] = ctx["hopt"].step(ctx["tb"])
    ctx.update(cfg={"lr": 0.1}, i=1)
    exec(compile(block, "experiments-README-logging", "exec"), ctx)
    text = (tmp_path / "trajectory.csv").read_text().splitlines()
    header = text[0].split(",")
    assert len(text) == 2 and {"step", "outer_loss", "hypergrad_norm", "train_loss"} <= set(header)
    assert {"hparams/value.mean", "hparams/value.max"} <= set(header)
    row = dict(zip(header, text[1].split(","), strict=True))
    assert row["step"] == "1" and float(row["train_loss"]) == pytest.approx(float(ctx["loss"]))


# ---------------------------------------------------- experiments/README.md: its commands exist


def test_experiments_readme_commands_name_real_experiments_and_settings() -> None:
    """Every ``hypergrad run NAME`` / ``show NAME`` in experiments/README.md and README.md names a
    registered experiment, and every ``--set key=value`` in the bash block is one of its
    settings."""
    from hypergrad.experiments import REGISTRY, load_all

    load_all()
    text = (ROOT / "experiments" / "README.md").read_text() + (ROOT / "README.md").read_text()
    names = set(re.findall(r"hypergrad (?:run|show) ([a-z]\w*)", text))  # (not the NAME placeholder)
    assert {"overfit_val", "stn_mnist1d", "marglik_precision", "marglik_invariance"} <= names
    assert names <= set(REGISTRY), names - set(REGISTRY)
    (bash,) = [b for b in _blocks(ROOT / "experiments" / "README.md", "bash") if "hypergrad list" in b]
    for key in re.findall(r"--set (\w+)=", bash):
        assert key in REGISTRY["overfit_val"].defaults, key


def test_experiments_readme_settings_line_runs_quick(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's ``hypergrad run overfit_val --method cg --set solver_steps=10 --set
    hyper_lr=0.03 --seed 1`` (with ``--quick``): accepted, and recorded as given."""
    from hypergrad import cli

    out = tmp_path / "ov"
    argv = [
        "run",
        "overfit_val",
        "--quick",
        "--method",
        "cg",
        "--set",
        "solver_steps=10",
        "--set",
        "hyper_lr=0.03",
        "--seed",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    rec = json.loads((out / "results.json").read_text())
    s = rec["config"]
    assert (s["method"], s["solver_steps"], s["hyper_lr"], s["seed"]) == ("cg", 10, 0.03, 1)
    assert (out / "trajectory.csv").exists()
    # experiments/README.md: what results.json holds, under these keys; wall-clock numbers
    # (names ending in _ms or _seconds) under timings, not metrics
    assert {
        "config",
        "metrics",
        "table",
        "headline",
        "machine",
        "versions",
        "wall_seconds",
        "timings",
    } <= set(rec)
    assert not [k for k in rec["metrics"] if k.endswith(("_ms", "_seconds"))]


# ------------------------------------------------------ defaults: docstrings and prose vs code


def _public_callables() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in hg.__all__:
        o = getattr(hg, n)
        if callable(o) and not inspect.ismodule(o):
            out[f"hg.{n}"] = o
    for mod in (hg.hparams, hg.nn, hg.optim, hg.log, hg.data, importlib.import_module("hypergrad.testing")):
        for n in getattr(mod, "__all__", []):
            o = getattr(mod, n)
            if callable(o):
                out[f"{mod.__name__}.{n}"] = o
    for cname in (
        "Implicit",
        "Unrolled",
        "SelfTuning",
        "BestResponse",
        "MarginalLikelihood",
        "HyperOptimizer",
    ):
        cls = getattr(hg, cname)
        for mn, m in vars(cls).items():
            if callable(m) and not mn.startswith("_"):
                out[f"hg.{cname}.{mn}"] = m
    return out


def _documented_defaults() -> list[tuple[str, str, str, Any]]:
    """(object, parameter, documented text, signature default) for every ``(default: X)`` in an
    Args section whose parameter has a signature default."""
    found = []
    for name, o in sorted(_public_callables().items()):
        try:
            sig = inspect.signature(o)
        except (TypeError, ValueError):
            continue
        doc = inspect.getdoc(o) or ""
        if inspect.isclass(o):
            doc += "\n" + (inspect.getdoc(o.__init__) or "")
        m = re.search(r"\nArgs:\n(.*?)(?:\n\S|\Z)", "\n" + doc, re.S)
        if not m:
            continue
        for entry in re.split(r"\n    (?=\*{0,2}\w+(?:, \w+)*(?: \([^)]*\))?:)", "\n" + m.group(1)):
            mm = re.match(r"\s*\*{0,2}(\w+(?:, \w+)*)(?: \([^)]*\))?:(.*)", entry, re.S)
            if not mm:
                continue
            params = mm.group(1).split(", ")
            text = " ".join(mm.group(2).split())
            for d in re.findall(r"\(default:? (.*?)\)(?:[,.;:]|\s|$)", text):
                # "warmup, train_steps, val_steps: ... (default: 0, 2, 1 — ...)": one value each
                values = d.split(" — ")[0].split(", ") if len(params) > 1 else [d]
                if len(values) != len(params):
                    continue
                for p_, v in zip(params, values, strict=True):
                    if p_ in sig.parameters:
                        found.append((name, p_, v, sig.parameters[p_].default))
    return found


def _literal(text: str) -> Any:
    """The documented default as a Python value, or ``NotImplemented`` when it is prose."""
    t = re.split(r"[;,] (?![^()]*\))", text)[0].strip().strip("`").strip()
    t = {"math.inf": "inf"}.get(t, t)
    if t == "inf":
        return math.inf
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return NotImplemented


def test_docstring_defaults_equal_the_signatures() -> None:
    """Every literal ``(default: X)`` in a public docstring's Args equals the signature's default
    (enums by value); at least 60 of them are checked, so the parser cannot silently find none."""
    checked, wrong = 0, []
    for name, param, text, actual in _documented_defaults():
        doc = _literal(text)
        if doc is NotImplemented or actual is inspect.Parameter.empty:
            continue
        value = actual.value if isinstance(actual, enum.Enum) else actual
        checked += 1
        if not (doc == value and type(doc) in (type(value), int, float) or (doc is None and value is None)):
            wrong.append(f"{name}({param}): documented {text!r}, signature {actual!r}")
    assert not wrong, wrong
    assert checked >= 60, checked


@pytest.mark.parametrize(
    ("obj", "param", "value"),
    [
        # README.md
        (hg.Neumann, "alpha", None),  # "By default (alpha=None) ..."
        (hg.CG, "warm_start", False),
        (hg.hparams.WeightDecay, "max", None),  # WeightDecay(model, per=..., max=None)
        (hg.hparams.LearningRate, "relative", False),  # LearningRate(optimizer, relative=False)
        (hg.optim.SGDHD, "lr_min", 0.0),  # "[lr_min, lr_max] (default [0, ∞))"
        (hg.optim.SGDHD, "lr_max", math.inf),
        (hg.optim.AdamHD, "lr_min", 0.0),
        (hg.optim.AdamHD, "lr_max", math.inf),
        (hg.SelfTuning, "train_steps", 2),  # "paper layer, T_train = 2 (default)"
        (hg.SelfTuning, "val_steps", 1),
        (hg.SelfTuning, "delta", False),
        (hg.BestResponse, "warmup", 0),  # BestResponse's Args: "(defaults: 0, 1, 1)"
        (hg.BestResponse, "train_steps", 1),
        (hg.BestResponse, "val_steps", 1),
        (hg.BestResponse, "sampling", "local"),  # '"local" (default)'
        (hg.MarginalLikelihood, "outputs", "all"),  # README: outputs="each" is the option
        (hg.SelfTuning, "linearize", True),  # "linearize=False to skip it"
        (hg.nn.StnLinear, "rank", None),  # the paper's layer unless rank=r
        (hg.nn.StnConv1d, "rank", None),
        (hg.nn.StnConv2d, "rank", None),
        (hg.nn.StnLSTMCell, "rank", None),
        (hg.hparams.Rate, "per_batch", False),
        (hg.Unrolled, "checkpoint", False),
        (hg.Unrolled, "mode", "reverse"),
        (hg.MarginalLikelihood, "through_map", False),  # experiments/README: "the library's default"
        (hg.Implicit, "on_nonfinite", "raise"),
        (hg.Implicit, "divergence", None),
        (hg.HyperOptimizer.step, "max_grad_norm", None),
        (hg.HyperOptimizer.zero_grad, "set_to_none", True),  # STYLE: zero_grad(set_to_none=True)
        (hg.log.Logger, "wandb", False),
        (hg.hparams.ExampleWeights, "init", 0.5),
    ],
)
def test_prose_defaults_equal_the_signatures(obj: Callable[..., Any], param: str, value: Any) -> None:
    d = inspect.signature(obj).parameters[param].default
    assert (d.value if isinstance(d, enum.Enum) else d) == value


def test_readme_solver_defaults_and_statuses() -> None:
    """README/DESIGN: Implicit's default solver is Neumann-5 (the docstring's "5 terms");
    MarginalLikelihood's through-MAP default CG(maxiter=20, tol=1e-6, damping=1e-3 / data_size: the
    MAP objective is a mean over the data, round 27); every status
    the README lists is a SolveStatus; bound="exact" and outputs="each" are accepted values."""
    from hypergrad._marglik import Bound, Outputs

    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    hp = hg.hparams.WeightDecay(m)

    def loss(m_: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return m_(b).pow(2).mean() + h.penalty(m_)

    imp = hg.Implicit(
        m,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
    )
    assert isinstance(imp.solver, hg.Neumann) and imp.solver.steps == 5 and imp.solver.alpha is None
    pp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(m)})
    ml = hg.MarginalLikelihood(
        m,
        pp,
        likelihood="classification",
        data_size=10,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(pp.parameters()),
        through_map=True,
    )
    assert isinstance(ml.solver, hg.CG)
    assert (ml.solver.maxiter, ml.solver.tol, ml.solver.damping) == (20, 1e-6, 1e-3 / 10)
    statuses = re.search(
        r"`info.solver_status` says why the solver\s+stopped \((.*?)\)\.\s",
        (ROOT / "README.md").read_text(),
        re.S,
    )
    assert statuses is not None
    named = set(re.findall(r"`(\w+)`", statuses.group(1)))
    assert named == {s.value for s in hg.SolveStatus}
    assert "exact" in {b.value for b in Bound} and "each" in {o.value for o in Outputs}


def test_design_public_api_contract_names_exist() -> None:
    """DESIGN.md's contract: the methods, solvers, containers, pure functions and optimisers it
    names are public, with the argument names it uses."""
    for name in (
        "Implicit",
        "Unrolled",
        "SelfTuning",
        "BestResponse",
        "MarginalLikelihood",
        "HyperOptimizer",
        "Neumann",
        "CG",
        "Identity",
        "implicit_hypergradient",
        "unrolled_hypergradient",
        "log_evidence",
        "log_evidence_bound",
        "NonFiniteError",
    ):
        assert name in hg.__all__, name
    assert {"steps", "alpha"} <= set(inspect.signature(hg.Neumann).parameters)
    assert {"maxiter", "tol", "damping"} <= set(inspect.signature(hg.CG).parameters)
    for cls in (hg.Implicit, hg.Unrolled, hg.SelfTuning, hg.BestResponse, hg.MarginalLikelihood):
        params = inspect.signature(cls).parameters
        assert {"inner_optimizer", "outer_optimizer"} <= set(params), cls
        assert issubclass(cls, hg.HyperOptimizer)
    assert "solver" in inspect.signature(hg.Implicit).parameters
    assert "steps" in inspect.signature(hg.Unrolled).parameters
    for n in (
        "step",
        "hyper_step",
        "hypergradient",
        "state_dict",
        "load_state_dict",
        "zero_grad",
        "start_episode",
    ):
        assert callable(getattr(hg.HyperOptimizer, n)), n
    fields = {f.name for f in dataclasses.fields(hg.HyperStepInfo)}
    assert {
        "outer_loss",
        "hypergrad_norm",
        "solver_iterations",
        "solver_residual",
        "solver_status",
        "seconds",
    } <= fields
    # hg.hparams: weight decay per model / layer / entry, per-example weights, learning rates,
    # dropout rates, prior precision; hg.optim: SGD and Adam hypergradient-descent variants
    for n in (
        "WeightDecay",
        "ExampleWeights",
        "LearningRate",
        "Momentum",
        "Rate",
        "PriorPrecision",
        "Hparam",
    ):
        assert n in hg.hparams.__all__, n
    m = nn.Linear(2, 2)
    for per in ("global", "layer", "parameter"):
        hg.hparams.WeightDecay(m, per=per)
    assert issubclass(hg.optim.SGDHD, torch.optim.Optimizer) and issubclass(
        hg.optim.AdamHD, torch.optim.Optimizer
    )


def _ridge_problem() -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    xv, yv = torch.randn(15, 3, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.3)

    def train_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return 0.5 * (m(b[0]).squeeze(-1) - b[1]).pow(2).mean() + h.penalty(m)

    def val_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return 0.5 * (m(b[0]).squeeze(-1) - b[1]).pow(2).mean()

    return {"x": x, "y": y, "xv": xv, "yv": yv, "model": model, "hp": hp, "tl": train_loss, "vl": val_loss}


def test_design_hyper_step_zeroes_grad_then_writes_the_closed_form_hypergradient() -> None:
    """DESIGN/README: ``hyper_step`` zeroes each hyperparameter's ``.grad`` first and writes the
    hypergradient (stale ``.grad`` of 1e3 is not added to); ``hypergradient()`` returns the same
    without touching ``.grad`` or the values. Checked in float64 at the ridge optimum against the
    closed form dL_V/dr = −d ⊙ w* ⊙ A⁻¹ ∇_w L_V (d = e^r, A = XᵀX/n + diag(d))."""
    p = _ridge_problem()
    model, hp = p["model"], p["hp"]
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    hopt = hg.Implicit(
        model,
        hp,
        p["tl"],
        p["vl"],
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=10, tol=1e-14),
    )
    # the inner optimum: the penalty is d·w²/2 (WeightDecay's docstring), so
    # (X^T X / n + diag(d)) w* = X^T y / n
    d = hp.decays()["0.weight"].reshape(-1)
    a = p["x"].T @ p["x"] / 20 + torch.diag(d)
    w = torch.linalg.solve(a, p["x"].T @ p["y"] / 20)
    with torch.no_grad():
        model[0].weight.copy_(w[None])
    # closed form: dw*/dd = -A^{-1} diag(w*), g_v = Xv^T (Xv w* - yv) / m, and d = exp(raw)
    gv = p["xv"].T @ (p["xv"] @ w - p["yv"]) / 15
    truth = -(torch.diag(w) @ torch.linalg.solve(a, gv)) * d
    raw = next(iter(hp.parameters()))
    raw.grad = torch.full_like(raw, 1e3)
    before = raw.detach().clone()
    (g,), _ = hopt.hypergradient(train_batch=(p["x"], p["y"]), val_batch=(p["xv"], p["yv"]))
    assert torch.equal(raw.grad, torch.full_like(raw, 1e3)) and torch.equal(raw, before)
    torch.testing.assert_close(g.reshape(-1), truth, rtol=1e-8, atol=1e-12)
    info = hopt.hyper_step(train_batch=(p["x"], p["y"]), val_batch=(p["xv"], p["yv"]))
    torch.testing.assert_close(raw.grad.reshape(-1), truth, rtol=1e-8, atol=1e-12)
    assert info.solver_status == "converged" and info.hypergrad_norm == pytest.approx(
        float(truth.norm()), rel=1e-5
    )


@pytest.mark.parametrize(
    ("method", "kwargs", "call", "needs"),
    [
        ("Implicit", {}, {"train_batch": "B"}, "val_batch"),
        ("Implicit", {}, {"val_batch": "B"}, "train_batch"),
        ("Unrolled", {"steps": 2}, {"train_batch": "B"}, "val_batch"),
    ],
)
def test_design_missing_batch_is_named(
    method: str, kwargs: dict[str, Any], call: dict[str, str], needs: str
) -> None:
    """DESIGN: "Each method ... raises a clear error when [a batch] is missing": the message names
    the missing argument, and nothing moved."""
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    hp = hg.hparams.WeightDecay(m, init=1e-2)
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def tl(m_: nn.Module, h: Any, bb: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(bb[0]), bb[1]) + h.penalty(m_)

    hopt = getattr(hg, method)(
        m,
        hp,
        tl,
        tl,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
        **kwargs,
    )
    hopt.step(b)
    state = [t.detach().clone() for t in [*m.parameters(), *hp.parameters()]]
    with pytest.raises(ValueError, match=needs):
        hopt.hyper_step(**{k: b for k in call})
    assert all(torch.equal(a, t) for a, t in zip(state, [*m.parameters(), *hp.parameters()], strict=True))


def test_readme_hparam_domains_and_errors() -> None:
    """README: ``Hparam(init, low=a)`` alone is (a, ∞) (no raw value leaves it), an out-of-domain
    initial value raises a ValueError that names it, ``.value`` is detached;
    ``hg.hparams.summary`` gives ``{name.mean, name.min, name.max, name.std}``."""
    h = hg.hparams.Hparam(2.0, low=1.0)
    with torch.no_grad():
        h.raw.fill_(-60.0)
    assert float(h.value) >= 1.0 and not h.value.requires_grad
    with torch.no_grad():
        h.raw.fill_(60.0)
    assert math.isfinite(float(h.value)) and float(h.value) > 1.0
    with pytest.raises(ValueError, match="0.5"):
        hg.hparams.Hparam(0.5, low=1.0)
    with pytest.raises(ValueError, match="-1"):
        hg.hparams.Hparam(-1.0, "positive")
    m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    s = hg.hparams.summary(nn.ModuleDict({"wd": hg.hparams.WeightDecay(m, per="layer", init=0.01)}))
    assert set(s) == {"wd.mean", "wd.min", "wd.max", "wd.std"}
    assert s["wd.mean"] == pytest.approx(0.01) and s["wd.std"] == 0.0


def test_readme_neumann_lr_rule_warns_with_adam() -> None:
    """README: ``alpha="lr"`` warns with Adam (or several learning rates)."""
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    hp = hg.hparams.WeightDecay(m, init=1e-2)
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def tl(m_: nn.Module, h: Any, bb: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(bb[0]), bb[1]) + h.penalty(m_)

    hopt = hg.Implicit(
        m,
        hp,
        tl,
        tl,
        inner_optimizer=torch.optim.Adam(m.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
        solver=hg.Neumann(3, alpha="lr"),
    )
    hopt.step(b)
    with pytest.warns(UserWarning, match="lr"):
        hopt.hyper_step(train_batch=b, val_batch=b)


def test_readme_marginal_likelihood_refuses_dropout_in_training_mode() -> None:
    """README: "BatchNorm or Dropout in training mode ... are refused at hyper_step: call
    model.eval() around it" — refused with a message saying so, and accepted after eval()."""
    m = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.1), nn.Tanh(), nn.Linear(6, 3))
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(m, per="layer")})
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    hopt = hg.MarginalLikelihood(
        m,
        hp,
        likelihood="classification",
        data_size=100,
        inner_optimizer=torch.optim.Adam(m.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    hopt.step(b)
    with pytest.raises(ValueError, match=r"Dropout in training mode.*model\.eval\(\)"):
        hopt.hyper_step(train_batch=b)
    m.eval()
    assert math.isfinite(hopt.hyper_step(train_batch=b).outer_loss)


# ------------------------------------------------------------------ Raises entries, triggered

_M = lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # noqa: E731


def _implicit(**kw: Any) -> Any:
    m = _M()
    hp = hg.hparams.WeightDecay(m, init=1e-2)

    def tl(m_: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(b[0]), b[1]) + h.penalty(m_)

    args: dict[str, Any] = {
        "inner_optimizer": torch.optim.SGD(m.parameters(), lr=0.1),
        "outer_optimizer": torch.optim.Adam(hp.parameters()),
    }
    cls = kw.pop("cls", hg.Implicit)
    args.update(kw)
    return cls(args.pop("model", m), args.pop("hparams", hp), args.pop("train_loss", tl), tl, **args)


_B = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
_W, _LAM = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)


def _sparse_step(opt_cls: type) -> None:
    emb = nn.Embedding(5, 2, sparse=True)
    opt = opt_cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    opt.step()


class _Iterable(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter([])


def _stepped_implicit_step_under_inference_mode() -> None:
    h = _implicit()
    with torch.inference_mode():
        h.step(_B)


_RAISES: list[tuple[str, type[BaseException], Callable[[], Any]]] = [
    # HyperOptimizer (hypergrad/_base.py)
    ("model not a Module", TypeError, lambda: _implicit(model="m")),
    ("loss not callable", TypeError, lambda: _implicit(train_loss=3)),
    ("LBFGS inner", TypeError, lambda: _implicit(inner_optimizer=torch.optim.LBFGS(_M().parameters()))),
    ("invalid divergence", ValueError, lambda: _implicit(divergence=-1.0)),
    (
        "outer misses hparams",
        ValueError,
        lambda: _implicit(outer_optimizer=torch.optim.Adam([torch.zeros(1, requires_grad=True)])),
    ),
    ("step(None)", ValueError, lambda: _implicit().step(None)),
    ("invalid max_grad_norm", ValueError, lambda: _implicit().step(_B, max_grad_norm=-1.0)),
    ("batch of another dtype", ValueError, lambda: _implicit().step((_B[0].double(), _B[1]))),
    ("step under inference_mode", RuntimeError, _stepped_implicit_step_under_inference_mode),
    (
        "state of another method",
        ValueError,
        lambda: _implicit(cls=hg.Unrolled).load_state_dict(_implicit().state_dict()),
    ),
    # Implicit
    ("solver not a LinearSolver", TypeError, lambda: _implicit(solver="cg")),
    ("hessian_subset a Module", TypeError, lambda: _implicit(hessian_subset=nn.Linear(1, 1))),
    ("hessian_subset selects nothing", ValueError, lambda: _implicit(hessian_subset=lambda n: False)),
    # Unrolled
    ("steps 0", ValueError, lambda: _implicit(cls=hg.Unrolled, steps=0)),
    ("unknown mode", ValueError, lambda: _implicit(cls=hg.Unrolled, mode="sideways")),
    (
        "checkpoint with forward",
        ValueError,
        lambda: _implicit(cls=hg.Unrolled, mode="forward", checkpoint=True),
    ),
    ("checkpoint not a bool", TypeError, lambda: _implicit(cls=hg.Unrolled, checkpoint=1)),
    ("hyper_step before a step", ValueError, lambda: _implicit(cls=hg.Unrolled).hyper_step(val_batch=_B)),
    # solvers
    ("Neumann alpha=None solve", ValueError, lambda: hg.Neumann().solve(lambda v: v, [torch.ones(2)])),
    ("CG x0 shape", ValueError, lambda: hg.CG().solve(lambda v: v, [torch.ones(2)], x0=[torch.ones(3)])),
    ("Direct above max_size", ValueError, lambda: hg.Direct(max_size=1).solve(lambda v: v, [torch.ones(2)])),
    (
        "implicit_hypergradient: train_loss not reaching the weights' gradient",
        ValueError,
        lambda: hg.implicit_hypergradient(
            lambda: _W.sum() + _LAM.sum(), lambda: (_W**2).sum(), [_W], [_LAM], hg.CG()
        ),
    ),
    (
        "implicit_hypergradient: no weights",
        ValueError,
        lambda: hg.implicit_hypergradient(lambda: (_W**2).sum(), lambda: (_W**2).sum(), [], [_LAM], hg.CG()),
    ),
    (
        "implicit_hypergradient: solver a str",
        TypeError,
        lambda: hg.implicit_hypergradient(lambda: (_W**2).sum(), lambda: (_W**2).sum(), [_W], [_LAM], "cg"),
    ),
    # hparams
    ("Hparam low >= high", ValueError, lambda: hg.hparams.Hparam(0.5, low=1.0, high=0.0)),
    (
        "Hparam bounds given to positive",
        ValueError,
        lambda: hg.hparams.Hparam(0.5, "positive", low=0.0, high=1.0),
    ),
    ("WeightDecay unknown per", ValueError, lambda: hg.hparams.WeightDecay(_M(), per="neuron")),
    ("WeightDecay init 0", ValueError, lambda: hg.hparams.WeightDecay(_M(), init=0.0)),
    ("WeightDecay init above max", ValueError, lambda: hg.hparams.WeightDecay(_M(), init=1.0, max=0.5)),
    ("WeightDecay nothing to penalise", ValueError, lambda: hg.hparams.WeightDecay(nn.ReLU())),
    (
        "penalty on a model lacking the names",
        KeyError,
        lambda: hg.hparams.WeightDecay(_M()).penalty(nn.Linear(2, 2)),
    ),
    ("ExampleWeights float index", TypeError, lambda: hg.hparams.ExampleWeights(5)(torch.tensor([0.0]))),
    (
        "ExampleWeights (B, 1) index",
        ValueError,
        lambda: hg.hparams.ExampleWeights(5)(torch.tensor([[0], [1]])),
    ),
    ("ExampleWeights negative index", IndexError, lambda: hg.hparams.ExampleWeights(5)(torch.tensor([-1]))),
    ("ExampleWeights index >= n", IndexError, lambda: hg.hparams.ExampleWeights(5)(torch.tensor([5]))),
    (
        "OptimizerSetting unknown name",
        ValueError,
        lambda: hg.hparams.OptimizerSetting(torch.optim.SGD(_M().parameters(), lr=0.1), "nosuch", "positive"),
    ),
    (
        "LearningRate relative not bool",
        TypeError,
        lambda: hg.hparams.LearningRate(torch.optim.SGD(_M().parameters(), lr=0.1), relative=1),
    ),
    (
        "OptimizerSetting on betas",
        TypeError,
        lambda: hg.hparams.OptimizerSetting(torch.optim.Adam(_M().parameters()), "betas", "unit"),
    ),
    (
        "LearningRate init out of domain",
        ValueError,
        lambda: hg.hparams.LearningRate(torch.optim.SGD(_M().parameters(), lr=0.1), init=-1.0),
    ),
    (
        "LearningRate integer dtype",
        TypeError,
        lambda: hg.hparams.LearningRate(torch.optim.SGD(_M().parameters(), lr=0.1), dtype=torch.int64),
    ),
    ("Rate high > 1", ValueError, lambda: hg.hparams.Rate(0.1, high=1.5)),
    ("Rate init outside", ValueError, lambda: hg.hparams.Rate(0.95, high=0.9)),
    ("Rate size 0", ValueError, lambda: hg.hparams.Rate(0.1, size=0)),
    ("Positive init 0", ValueError, lambda: hg.hparams.Positive(0.0)),
    ("Positive unknown transform", ValueError, lambda: hg.hparams.Positive(1.0, transform="cube")),
    ("Integer non-integer", ValueError, lambda: hg.hparams.Integer(1.5, 0, 3)),  # type: ignore[arg-type]
    ("Integer init outside", ValueError, lambda: hg.hparams.Integer(5, 0, 3)),
    ("SelfTuned no specs", ValueError, lambda: hg.hparams.SelfTuned()),
    ("SelfTuned reserved name", ValueError, lambda: hg.hparams.SelfTuned(sigma=hg.hparams.Rate(0.1))),
    ("SelfTuned name with a dot", ValueError, lambda: hg.hparams.SelfTuned(**{"a.b": hg.hparams.Rate(0.1)})),
    (
        "SelfTuned scale_range",
        ValueError,
        lambda: hg.hparams.SelfTuned(p=hg.hparams.Rate(0.1), scale_range=(1.0, 0.5)),
    ),
    ("SelfTuned.draw(-1)", ValueError, lambda: hg.hparams.SelfTuned(p=hg.hparams.Rate(0.1)).draw(-1)),
    ("PriorPrecision init 0", ValueError, lambda: hg.hparams.PriorPrecision(_M(), init=0.0)),
    ("ObservationNoise init < 0", ValueError, lambda: hg.hparams.ObservationNoise(init=-1.0)),
    ("RandomTranslation side < 2", ValueError, lambda: hg.hparams.RandomTranslation((1, 8))),
    (
        "RandomTranslation init > max",
        ValueError,
        lambda: hg.hparams.RandomTranslation((8, 8), init=5.0, max=2.0),
    ),
    # nn
    ("StnLinear n_hparams 0", ValueError, lambda: hg.nn.StnLinear(3, 4, 0)),
    ("StnLinear rank 0", ValueError, lambda: hg.nn.StnLinear(3, 4, 2, rank=0)),
    ("StnLinear without hparams", TypeError, lambda: hg.nn.StnLinear(3, 4, 2)(torch.randn(2, 3))),
    (
        "StnLinear x 3-D",
        ValueError,
        lambda: hg.nn.StnLinear(3, 4, 2)(torch.randn(2, 3, 1), torch.zeros(2, 2)),
    ),
    ("StnConv2d groups not dividing", ValueError, lambda: hg.nn.StnConv2d(3, 4, 3, 1, groups=2)),
    ("StnConv2d groups with rank", ValueError, lambda: hg.nn.StnConv2d(2, 4, 3, 1, groups=2, rank=2)),
    (
        "StnLSTMCell a whole sequence",
        ValueError,
        lambda: hg.nn.StnLSTMCell(3, 4, 1)(torch.randn(2, 5, 3), None, torch.zeros(2, 1)),
    ),
    ("dropout rate 1", ValueError, lambda: hg.nn.dropout(torch.randn(3), 1.0)),
    ("dropout integer x", TypeError, lambda: hg.nn.dropout(torch.ones(3, dtype=torch.long), 0.5)),
    ("gaussian_noise std < 0", ValueError, lambda: hg.nn.gaussian_noise(torch.randn(3), -1.0)),
    (
        "gaussian_noise integer x",
        TypeError,
        lambda: hg.nn.gaussian_noise(torch.ones(3, dtype=torch.long), 1.0),
    ),
    ("cutout size < 0", ValueError, lambda: hg.nn.cutout(torch.randn(2, 1, 4, 4), -1)),
    ("random_shift 1-D x", ValueError, lambda: hg.nn.random_shift(torch.randn(3), 1)),
    ("HyperNet n_hparams 0", ValueError, lambda: hg.nn.HyperNet(nn.Linear(2, 2), 0)),
    (
        "HyperNet rank and hypernet",
        ValueError,
        lambda: hg.nn.HyperNet(nn.Linear(2, 2), 1, rank=2, hypernet=nn.Linear(1, 6)),
    ),
    ("HyperNet init_std < 0", ValueError, lambda: hg.nn.HyperNet(nn.Linear(2, 2), 1, init_std=-1.0)),
    ("HyperNet base without parameters", ValueError, lambda: hg.nn.HyperNet(nn.ReLU(), 1)),
    # optim
    ("SGDHD hypergrad_lr < 0", ValueError, lambda: hg.optim.SGDHD(_M().parameters(), hypergrad_lr=-1.0)),
    ("SGDHD lr_min < 0", ValueError, lambda: hg.optim.SGDHD(_M().parameters(), lr_min=-1.0)),
    ("SGDHD lr above lr_max", ValueError, lambda: hg.optim.SGDHD(_M().parameters(), lr=2.0, lr_max=1.0)),
    ("SGDHD Tensor lr", ValueError, lambda: hg.optim.SGDHD(_M().parameters(), lr=torch.tensor(0.1))),
    ("SGDHD every group empty", ValueError, lambda: hg.optim.SGDHD([{"params": []}])),
    ("SGDHD sparse gradients", RuntimeError, lambda: _sparse_step(hg.optim.SGDHD)),
    ("AdamHD hypergrad_lr < 0", ValueError, lambda: hg.optim.AdamHD(_M().parameters(), hypergrad_lr=-1.0)),
    (
        "AdamHD Tensor betas",
        ValueError,
        lambda: hg.optim.AdamHD(_M().parameters(), betas=(torch.tensor(0.9), 0.999)),
    ),
    ("AdamHD sparse gradients", RuntimeError, lambda: _sparse_step(hg.optim.AdamHD)),
    # log, data
    ("scalar of several elements", ValueError, lambda: hg.log.scalar("k", torch.ones(2))),
    ("Logger histogram_every < 0", ValueError, lambda: hg.log.Logger(histogram_every=-1)),
    ("Logger init_kwargs sets project", ValueError, lambda: hg.log.Logger(init_kwargs={"project": "x"})),
    ("Logger.hyper_step of an int", TypeError, lambda: hg.log.Logger().hyper_step(3)),
    (
        "Logger.hyper_step non-scalar field",
        ValueError,
        lambda: hg.log.Logger().hyper_step({"a": torch.ones(2)}),
    ),
    (
        "Logger.hyper_step non-integer step",
        ValueError,
        lambda: hg.log.Logger().hyper_step({"a": 1.0}, step=1.5),
    ),
    (
        "to_csv resumed_at without append",
        ValueError,
        lambda: hg.log.Logger().to_csv("unused.csv", resumed_at=3),
    ),
    ("WithIndex of an IterableDataset", TypeError, lambda: hg.data.WithIndex(_Iterable())),
]


@pytest.mark.parametrize(("what", "exc", "call"), _RAISES, ids=[r[0] for r in _RAISES])
def test_docstring_raises_entries_are_raised(
    what: str, exc: type[BaseException], call: Callable[[], Any]
) -> None:
    """Each documented ``Raises`` entry, triggered by the input its docstring states, raises
    exactly that exception type (not a different one from deeper down)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as e:
            call()
    assert type(e.value) is exc or issubclass(type(e.value), exc)
    assert str(e.value), f"{what}: an empty message"


def test_raises_messages_name_the_bad_value() -> None:
    """The messages the docstrings quote: ``Invalid hypergrad_lr: -1.0``, ``Invalid lr_min: -1.0``,
    ``scalar`` names its key."""
    with pytest.raises(ValueError, match=r"Invalid hypergrad_lr: -1\.0"):
        hg.optim.SGDHD(_M().parameters(), hypergrad_lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid lr_min: -1\.0"):
        hg.optim.AdamHD(_M().parameters(), lr_min=-1.0)
    with pytest.raises(ValueError, match="my_key"):
        hg.log.scalar("my_key", torch.ones(2))


# ------------------------------------------------ numbers quoted from the committed benchmarks


def _report() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("report")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_benchmarks_readme_summary_is_report_summary_of_the_committed_json() -> None:
    """benchmarks/README.md says its summary table "is `report.summary()`" of
    results/suite-cpu-2core.json, and names the run's commit, duration and date: all three match
    the JSON (the table was a previous run's until round 10)."""
    data = _json("suite-cpu-2core.json")
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert _report().summary(data).strip() in text
    sec = text.split("### Results (CPU): summary", 1)[1].split("\n\n", 2)[1]
    assert f"hypergrad at `{data['machine']['git_commit'][:7]}`" in sec
    assert f"{round(data['seconds'])} s" in sec
    date = data["date"][:16].replace("T", " ") + " UTC"
    assert date in sec


def test_benchmarks_results_md_is_generated_from_the_jsons() -> None:
    """benchmarks/README.md: RESULTS.md is `report.py benchmarks/results/suite-*.json`."""
    rep = _report()
    paths = sorted(RESULTS.glob("suite-*.json"))
    assert rep.render_files(paths).strip() == (ROOT / "benchmarks" / "RESULTS.md").read_text().strip()


def _c(
    model: str, case: str, field: str = "ratio_to_train_step", name: str = "suite-cpu-2core.json"
) -> float:
    return float(_json(name)["models"][model]["cases"][case][field])


def test_readme_cost_table_matches_the_committed_json() -> None:
    """Every cell of README.md's "What it costs" table is the committed JSON's value, rounded as
    printed (the columns: MLP, ResNet-18 width 16, GPT from suite-cpu-2core.json; full-width
    ResNet-18 from suite-cpu-2core-resnet18-full-b8.json)."""
    text = (ROOT / "README.md").read_text()
    cols = ["mlp", "resnet18", "gpt"]
    full = "suite-cpu-2core-resnet18-full-b8.json"
    higher = "suite-cpu-2core.json"

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    n5 = [
        f"{_c(m, 'implicit/neumann-5'):.1f} ({_c(m, 'implicit/neumann-5', 'ratio_to_floor'):.2f})"
        for m in cols
    ]
    n5.append(
        f"{_c('resnet18', 'implicit/neumann-5', name=full):.1f} "
        f"({_c('resnet18', 'implicit/neumann-5', 'ratio_to_floor', full):.2f})"
    )
    expected = [
        row("Implicit, Neumann-5 (÷ its floor)", n5),
        row(
            "its matmul FLOPs ÷ a train step's",
            [f"{_c(m, 'implicit/neumann-5', 'flops_ratio_to_train_step'):.1f}" for m in cols] + ["–"],
        ),
        row(
            "Implicit, Neumann-5, last layer only (`hessian_subset`)",
            [f"{_c(m, 'implicit/neumann-5-head'):.2g}" for m in cols]
            + [f"{_c('resnet18', 'implicit/neumann-5-head', name=full):.2g}"],
        ),
        row(
            "Unrolled, K = 5",
            [f"{_c(m, 'unrolled/k-5'):.1f}" for m in cols]
            + [f"{_c('resnet18', 'unrolled/k-5', name=full):.1f}"],
        ),
        row(
            "Unrolled, K = 5, `checkpoint=True`", [f"{_c(m, 'unrolled/k-5-ckpt'):.1f}" for m in cols] + ["–"]
        ),
        row(
            "torchopt, same Neumann-5 hypergradient",
            [f"{_c(m, 'torchopt/neumann-5', 'ratio_to_hypergrad'):.2f}× slower" for m in cols] + ["–"],
        ),
        row(
            "higher, same Unrolled K = 5 hypergradient: its call ÷ (Unrolled's hyperstep + the 5 "
            "train steps it replays)*",
            [f"{_c(m, 'higher/k-5', 'ratio_to_hypergrad_with_steps', higher):.2f}" for m in cols] + ["–"],
        ),
        row(
            "peak memory ÷ training's: Neumann-5 (torchopt)",
            [
                f"{_c(m, 'implicit/neumann-5', 'peak_ratio_to_train_step'):.2f} "
                f"({_c(m, 'torchopt/neumann-5', 'peak_ratio_to_train_step'):.2f})"
                for m in cols
            ]
            + [f"{_c('resnet18', 'implicit/neumann-5', 'peak_ratio_to_train_step', full):.2f}"],
        ),
        row(
            "peak memory ÷ training's: Unrolled K = 5 (higher)",
            [
                f"{_c(m, 'unrolled/k-5', 'peak_ratio_to_train_step'):.1f} "
                f"({_c(m, 'higher/k-5', 'peak_ratio_to_train_step'):.1f})"
                for m in cols
            ]
            + [f"{_c('resnet18', 'unrolled/k-5', 'peak_ratio_to_train_step', full):.1f}"],
        ),
        row(
            "peak memory ÷ training's: Unrolled K = 5, `checkpoint=True`",
            [f"{_c(m, 'unrolled/k-5-ckpt', 'peak_ratio_to_train_step'):.1f}" for m in cols] + ["–"],
        ),
    ]
    for r in expected:
        assert r in text, r


def _sci(x: float) -> str:
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def test_agreement_bounds_quoted_in_the_readmes_match_the_json() -> None:
    """ "Hypergradients equal torchopt's to ≤ X and higher's to ≤ Y": X and Y are the largest
    relative differences in the committed run (rounded to two figures), in both READMEs; the
    two CG disagreements are where hg.CG stopped at non-positive curvature."""
    models = _json("suite-cpu-2core.json")["models"]
    ag = {m: r["agreement"] for m, r in models.items()}
    torchopt = max(a[k]["rel_diff"] for a in ag.values() for k in a if k.startswith("torchopt/neumann"))
    higher = max(a[k]["rel_diff"] for a in ag.values() for k in a if k.startswith("higher/"))
    readme = (ROOT / "README.md").read_text()
    assert f"torchopt's to ≤ {_sci(torchopt)} (relative) and higher's to ≤ {_sci(higher)}" in readme
    bench = " ".join((ROOT / "benchmarks" / "README.md").read_text().split())
    assert f"torchopt's Neumann to ≤ {_sci(torchopt)} relative" in bench
    assert f"higher's unrolled to ≤ {_sci(higher)}" in bench
    cg = max(ag[m]["torchopt/cg-5"]["rel_diff"] for m in ("mlp", "cnn"))
    assert f"its CG to ≤ {_sci(cg)} on the MLP and the CNN" in bench
    for m in ("resnet18", "gpt"):
        assert ag[m]["torchopt/cg-5"]["hg_solver_status"] == "nonpositive_curvature"
    assert (
        f"({ag['resnet18']['torchopt/cg-5']['rel_diff']:.3g} and "
        f"{ag['gpt']['torchopt/cg-5']['rel_diff']:.3g} relative)"
    ) in bench


def test_benchmarks_readme_full_width_and_fits_tables_match_their_jsons() -> None:
    """The full-width ResNet-18 table and the two fits.py figures in benchmarks/README.md (and
    README.md's memory sentence) are the committed JSONs' values."""
    text = (ROOT / "benchmarks" / "README.md").read_text().split("**The biggest model this CPU can run", 1)[1]
    full = "suite-cpu-2core-resnet18-full-b8.json"
    n = [_c("resnet18", f"implicit/neumann-{k}", name=full) for k in (1, 3, 5)]
    f = [_c("resnet18", f"implicit/neumann-{k}", "ratio_to_floor", full) for k in (1, 3, 5)]
    assert (
        f"| Implicit Neumann-1 / 3 / 5 | {n[0]:.2f} / {n[1]:.2f} / {n[2]:.1f} | "
        f"{f[0]:.2f} / {f[1]:.2f} / {f[2]:.2f} |" in text
    )
    assert f"| Implicit CG-5 | {_c('resnet18', 'implicit/cg-5', name=full):.1f} |" in text
    fits = _json("fits-resnet18-full-cpu.json")["rows"]
    labels = [
        "Unrolled K = 5, `checkpoint=True`",
        "Unrolled K = 5",
        "higher, K = 5 (same hypergradient)",
        "Implicit Neumann-5",
    ]
    for label, r in zip(labels, fits, strict=True):
        live, peak, tot = r["live_total_gib"], r["hyperstep_peak_above_live_gib"], r["hyperstep_total_gib"]
        cells = re.search(rf"\| {re.escape(label)} \| ([\d.]+) \| ([\d.]+) \| \**([\d.]+)\** \|", text)
        assert cells is not None, label
        assert [float(c) for c in cells.groups()] == [round(live, 2), round(peak, 2), round(tot, 2)], label
    gpt = _json("fits-gpt-full-cpu.json")["fit"]
    for t in ((ROOT / "benchmarks" / "README.md").read_text(), (ROOT / "README.md").read_text()):
        assert f"{gpt['intercept_gib']:.1f} GiB + {gpt['slope_gib_per_sequence']:.2f} GiB per" in " ".join(
            t.split()
        )


def test_readme_selftuning_and_marglik_costs_match_their_jsons() -> None:
    """README.md's self-tuning cost table (FLOP and CPU-time ratios, plain step ms, parameter
    ratios) and marginal-likelihood timings are those of selftuning-cpu-2core.json and
    marglik-cpu-2core.json."""
    text = " ".join((ROOT / "README.md").read_text().split())
    st = _json("selftuning-cpu-2core.json")
    paper, low = st["results"][0], st["results"][1]
    rows = [
        ("paper layer, T_train = 2 (default)", paper["flop_ratio"]["epoch"], paper["time_ratio"]["stn"]),
        ("paper layer, `train_steps=5`", paper["flop_ratio"]["epoch_t5"], paper["time_ratio"]["stn_t5"]),
        ("`StnLinear(..., rank=16)`, T_train = 2", low["flop_ratio"]["epoch"], low["time_ratio"]["stn"]),
        ("`rank=16`, `train_steps=5`", low["flop_ratio"]["epoch_t5"], low["time_ratio"]["stn_t5"]),
    ]
    for label, flops, time in rows:
        assert f"| {label} | {flops:.2f} | {time:.2f} |" in text, label
    plain_ms = st["models"]["mlp-40-256-256-10"]["train_step"]["torch_step"]["median_ms"]
    assert f"takes {plain_ms:.1f} ms" in text
    assert (
        f"{low['parameters']['ratio']:.2f}× the parameters here instead of "
        f"{paper['parameters']['ratio']:.2f}×" in text
    )
    assert f"({paper['flop_ratio']['delta_epoch']:.1f}× its FLOPs" in text
    ml = _json("marglik-cpu-2core.json")
    h = ml["models"]["digits-mlp-64-128-10"]["hypersteps"]
    full_ms, each_ms = (
        h["bound M=100 layerwise float32"]["median_ms"],
        h["bound M=100 layerwise, outputs=each float32"]["median_ms"],
    )
    assert f"M = 100 takes {full_ms:.0f} ms" in text and f'and {each_ms:.1f} ms with `outputs="each"`' in text
    kron = ml["laplace_kron"]
    assert f"({kron['seconds'] * 1e3:.0f} ms, gap {kron['gap_to_exact']:.0f} nats)" in text
    exact_s = ml["exact"]["seconds"]
    assert f"{exact_s / full_ms * 1e3:,.0f}"[:2] == "1,"  # "1,200×": 1,221
    assert round(exact_s * 1e3 / full_ms, -2) == 1200 and round(exact_s * 1e3 / each_ms, -3) == 12000
    assert round(kron["seconds"] * 1e3 / full_ms) == 2 and round(kron["seconds"] * 1e3 / each_ms) == 21


def test_benchmarks_readme_option_defaults_match_run_py() -> None:
    """The option table of benchmarks/README.md: the defaults it states are run.py's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    a = run.parse_args([])
    assert (a.device, a.repeats, a.min_repeats, a.budget, a.warm_train, a.clock) == (
        "cpu",
        5,
        3,
        90.0,
        10,
        "cpu",
    )
    assert a.size == "small" and a.between == [1, 10, 30] and a.cycles == 3
    assert a.peers and a.memory and a.variants and a.threads is None
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert (
        "(defaults 5, 3, 90)" in text
        and "(default 10)" in text
        and "`--between 1,10,30`, `--cycles 3`" in text
    )


def _small_implicit(momentum: float) -> Any:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    hp = hg.hparams.WeightDecay(m, init=1e-2)

    def tl(m_: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(b[0]), b[1]) + h.penalty(m_)

    return hg.Implicit(
        m,
        hp,
        tl,
        tl,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
    )


def test_readme_neumann_default_alpha_schedule() -> None:
    """README: with ``alpha=None``, plain SGD takes the inner learning rate (5 HVPs per Neumann-5
    hyperstep, no power iteration); otherwise 1/λ̂_max from power iteration, "20 the first time,
    5 every 10 hypersteps", counted in ``info.solver_iterations``."""
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    for momentum, expected in ((0.0, [5] * 12), (0.9, [25] + [5] * 9 + [10, 5])):
        hopt = _small_implicit(momentum)
        its = []
        for _ in range(12):
            hopt.step(b)
            its.append(hopt.hyper_step(train_batch=b, val_batch=b).solver_iterations)
        assert its == expected, (momentum, its)


@pytest.mark.parametrize(
    "name", "SGD Adam AdamW RMSprop Adagrad Adamax NAdam RAdam Adadelta ASGD Rprop".split()
)
def test_readme_unrolled_replays_every_listed_optimiser(name: str) -> None:
    """README's table: ``hg.Unrolled(steps=K)`` replays "a differentiable copy of SGD / Adam /
    AdamW / RMSprop / Adagrad / Adamax / NAdam / RAdam / Adadelta / ASGD / Rprop": each is accepted
    and differentiated through all K steps (finite, non-zero hypergradient; no ReplayWarning under
    filterwarnings=error)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    hp = hg.hparams.WeightDecay(m, init=1e-2)
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def tl(m_: nn.Module, h: Any, bb: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(bb[0]), bb[1]) + h.penalty(m_)

    inner = getattr(torch.optim, name)(m.parameters(), lr=0.01)
    hopt = hg.Unrolled(
        m, hp, tl, tl, inner_optimizer=inner, outer_optimizer=torch.optim.Adam(hp.parameters()), steps=3
    )
    for _ in range(3):
        hopt.step(b)
    info = hopt.hyper_step(val_batch=b)
    assert info.unrolled_steps == 3 and 0.0 < info.hypergrad_norm < math.inf


def test_commands_named_in_the_readmes_exist() -> None:
    """``make demo`` / ``make test`` / ``make gpu-wheels`` are Makefile targets, every
    ``benchmarks/gpu.sh PART`` of benchmarks/README.md is a part the script handles, and the
    scripts' options the READMEs use (``fits.py --device --batch``) are accepted."""
    make = (ROOT / "Makefile").read_text()
    text = (ROOT / "README.md").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    for target in set(re.findall(r"make (?:TORCH_SPEC= )?([a-z][\w-]*)", text)):
        assert re.search(rf"^{re.escape(target)}:", make, re.M), target
    gpu = (ROOT / "benchmarks" / "gpu.sh").read_text()
    parts = set(re.findall(r"benchmarks/gpu\.sh (\w+)", text))
    assert {"tests", "suite", "gpt", "bf16", "fits", "stn"} <= parts
    for part in parts:
        assert re.search(rf"^\s*{part}\)", gpu, re.M), part
    fits = (ROOT / "benchmarks" / "fits.py").read_text()
    assert '"--device"' in fits and '"--batch"' in fits
