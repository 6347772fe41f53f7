"""Round 11, the core as research scripts meet it: a training script's own checkpoint dict resumed in
a new process, the hyperparameter containers at the edges of their domains, a hypergradient that is
infinite in one entry only, what a hyperstep reports and how it is logged, and the command line's
usage errors.

Fixed here (each test says what a user saw before):

* ``Hparam`` / ``ExampleWeights`` / ``WeightDecay`` accepted an ``init`` inside the domain whose
  raw value maps onto the domain's edge in the tensor's dtype (``Hparam(0.99999994, "unit")`` in
  float32 had the value 1.0 exactly: ``log(1 - p)`` was ``-inf`` and the derivative 0), and an
  interval whose width ``high - low`` overflows (the value was ``inf``).
* A hyperstep refused for a non-finite hypergradient with finite losses did not say which
  hyperparameter's hypergradient was not finite (nor an inner step which weight's gradient).
* ``Logger`` stored a ``str`` enum (``hg.SolveStatus.CONVERGED``) as the enum, and sent it to
  wandb under the key ``solver_status/SolveStatus.CONVERGED``.
* ``hypergrad list --bogus`` and ``hypergrad run NAME --bogus`` exited with code 1 and no usage
  line (argparse's usage errors, e.g. ``--seed abc``, exit with 2 and the usage).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad import cli
from hypergrad.hparams import Constraint, ExampleWeights, Hparam, WeightDecay, from_raw, to_raw

DT = torch.float64


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _penalised(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h["wd"].penalty(m)


def _batch(seed: int, dtype: torch.dtype = DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # (the same numbers in every dtype)
    return torch.randn(16, 4, generator=g, dtype=DT).to(dtype), torch.randint(0, 3, (16,), generator=g)


def _mlp(dtype: torch.dtype = DT) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _equal(a: Any, b: Any) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


# ----------------------------------------------------------------------------- a script's own checkpoint

_SCRIPT = """
import sys, torch, torch.nn.functional as F
from torch import nn
import hypergrad as hg
torch.set_num_threads(1)

def tl(m, h, b):
    return F.cross_entropy(m(b[0]), b[1]) + h["wd"].penalty(m)

def vl(m, h, b):
    return F.cross_entropy(m(b[0]), b[1])

def batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)

def make(solver, seed):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()  # (convex: CG's solutions are kept as warm starts)
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="parameter", init=1e-2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hopt = hg.Implicit(
        model, hp, tl, vl, inner_optimizer=opt,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        solver=hg.CG(maxiter=4, warm_start=True) if solver == "cg" else hg.Neumann(steps=4, warm_start=True),
    )
    return model, hp, opt, hopt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

def train(objs, start, stop):
    model, hp, opt, hopt, sched = objs
    seen = []
    for i in range(start, stop):
        seen.append(float(hopt.step(batch(i))))
        sched.step()
        if (i + 1) % 2 == 0:
            info = hopt.hyper_step(train_batch=batch(i), val_batch=batch(99))
            seen += [info.hypergrad_norm, info.solver_iterations, info.solver_residual, info.solver_status]
    return seen

S, N = 5, 11
mode, path = sys.argv[1], sys.argv[2]
if mode == "save":
    ckpt = {}
    for solver in ("cg", "neumann"):
        model, hp, opt, hopt, sched = objs = make(solver, 0)
        train(objs, 0, S)
        ckpt[solver] = {"model": model.state_dict(), "opt": opt.state_dict(), "hopt": hopt.state_dict(),
                        "hparams": hp.state_dict(), "sched": sched.state_dict(), "step": S}
    torch.save(ckpt, path)
else:
    ckpt, out = torch.load(path, weights_only=True, map_location="cpu"), {}
    for solver in ("cg", "neumann"):
        c = ckpt[solver]
        model, hp, opt, hopt, sched = objs = make(solver, 123)  # other weights: everything from the file
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        hp.load_state_dict(c["hparams"])
        hopt.load_state_dict(c["hopt"])
        sched.load_state_dict(c["sched"])
        warm = hopt.state_dict()["method"]["x0"] is not None
        resumed = train(objs, c["step"], N)
        straight_objs = make(solver, 0)  # uninterrupted, in this process (same thread count)
        straight = train(straight_objs, 0, N)[-len(resumed):]
        out[solver] = {
            "warm": warm, "resumed": resumed, "straight": straight,
            "tensors": [model.state_dict(), hp.state_dict(), opt.state_dict()["state"]],
            "reference": [straight_objs[0].state_dict(), straight_objs[1].state_dict(),
                          straight_objs[2].state_dict()["state"]],
        }
    torch.save(out, path)
"""


def test_a_scripts_own_checkpoint_dict_resumes_bit_exact_in_a_new_process(tmp_path: Path) -> None:
    """A script saving ``{'model', 'opt', 'hopt', 'hparams', 'sched'}`` mid-run (Implicit with a
    warm-started CG and a warm-started Neumann, a StepLR on the inner optimiser), loaded with
    ``torch.load(weights_only=True, map_location='cpu')`` by a new process into objects built from
    another seed, in the order a script loads them, repeats the uninterrupted run bit for bit:
    every loss, hypergradient norm, solver count, residual and status, the final weights,
    hyperparameters and momentum buffers."""
    path = str(tmp_path / "ckpt.pt")
    for mode in ("save", "load"):
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, mode, path], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(path, weights_only=True)
    for solver in ("cg", "neumann"):
        r = out[solver]
        assert r["warm"], solver  # the warm start was in the checkpoint, and was used
        assert len(r["resumed"]) > 10 and r["resumed"] == r["straight"], solver
        assert _equal(r["tensors"], r["reference"]), solver


def _implicit(solver: hg.LinearSolver, dtype: torch.dtype, seed: int = 0) -> hg.Implicit:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).to(dtype)  # (convex: the solves converge, and warm starts are kept)
    hp = nn.ModuleDict({"wd": WeightDecay(model, per="layer", init=1e-2)})
    return hg.Implicit(
        model,
        hp,
        _penalised,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        solver=solver,
    )


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_a_float64_checkpoint_loads_into_a_float32_run(solver: str) -> None:
    """A float64 run's checkpoint loaded into float32 objects (a cheaper continuation): the warm
    start (CG's last solution; Neumann's last solution and power-iteration vector) is cast to the
    weights' dtype, and the first hypergradient equals the float64 one to float32 precision."""
    make = (
        (lambda: hg.CG(maxiter=6, warm_start=True))
        if solver == "cg"
        else (lambda: hg.Neumann(steps=6, warm_start=True))
    )
    hi = _implicit(make(), DT)
    for i in range(4):
        hi.step(_batch(i))
        if i % 2:
            hi.hyper_step(train_batch=_batch(i), val_batch=_batch(99))
    assert hi.state_dict()["method"]["x0"] is not None
    lo = _implicit(make(), torch.float32, seed=5)
    lo.load_state_dict(copy.deepcopy(hi.state_dict()))
    assert all(p.dtype == torch.float32 for p in lo.model.parameters())
    g_hi, info_hi = hi.hypergradient(train_batch=_batch(4), val_batch=_batch(99))
    g_lo, info_lo = lo.hypergradient(
        train_batch=_batch(4, torch.float32), val_batch=_batch(99, torch.float32)
    )
    assert info_lo.solver_iterations == info_hi.solver_iterations
    for a, b in zip(g_lo, g_hi, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    lo.hyper_step(train_batch=_batch(4, torch.float32), val_batch=_batch(99, torch.float32))
    x0 = lo.state_dict()["method"]["x0"]
    assert x0 is not None and all(t.dtype == torch.float32 for t in x0)


# ----------------------------------------------------------------------------- containers at the edges


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Hparam(0.99999994, "unit"), "must lie in (0, 1)"),  # sigmoid(16.64) == 1.0 in float32
        (lambda: Hparam(0.99999994, low=0.0, high=1.0), "must lie in (0.0, 1.0)"),
        (lambda: Hparam(torch.tensor([0.5, 0.99999994]), "unit"), "must lie in (0, 1)"),
        (lambda: ExampleWeights(3, init=torch.tensor(0.99999994)), "must lie in (0, 1)"),
        (lambda: WeightDecay(nn.Linear(2, 2), init=1e-46), "must be > 0"),  # exp(-105.9) == 0 in float32
        (lambda: WeightDecay(nn.Linear(2, 2), init=1 - 1e-9, max=1.0), "must lie in (0.0, 1.0)"),
    ],
    ids=["unit", "interval", "unit-entry", "example-weights", "decay-0", "decay-max"],
)
def test_an_init_that_rounds_onto_the_domains_edge_is_refused(make: Any, words: str) -> None:
    """Before: accepted, with a value exactly on the edge of the open domain (a unit value of 1.0,
    a decay of 0 or of max), where the transform's derivative is 0: the hyperparameter could never
    move, and a loss like ``log(1 - p)`` was ``-inf`` from the first step."""
    with pytest.raises(ValueError, match=r"maps onto the edge of the domain") as e:
        make()
    assert words in str(e.value)


def test_the_same_inits_are_held_in_float64() -> None:
    h = Hparam(0.99999994, "unit", dtype=DT)
    assert 0 < float(h.value) < 1 and float(h.value) == pytest.approx(0.99999994, abs=1e-15)
    w = ExampleWeights(3, init=1 - 1e-12, dtype=DT)
    assert bool((w.value < 1).all())
    d = WeightDecay(nn.Linear(2, 2).double(), init=1e-46)
    assert float(d.value.min()) == pytest.approx(1e-46, rel=1e-12)
    # and the edge values float32 does hold stay accepted
    assert float(Hparam(1.4e-45, "positive").value) > 0
    assert float(Hparam(0.9999999, low=0.0, high=1.0).value) < 1.0
    # an interval whose width overflows had the value inf (low + inf * sigmoid(raw)) at any init
    with pytest.raises(ValueError, match=r"the width high - low overflows, got low=-1e\+308"):
        Hparam(0.0, low=-1e308, high=1e308, dtype=DT)


@pytest.mark.parametrize(
    ("constraint", "bounds", "values"),
    [
        ("positive", {}, [1e-300, 1e-8, 1.0, 1e8, 1e300]),
        ("unit", {}, [1e-300, 1e-12, 0.5, 1 - 1e-12]),
        ("real", {}, [-1e300, 0.0, 1e300]),
        ("interval", {"low": -2.0, "high": 3.0}, [-2.0 + 1e-12, 0.0, 3.0 - 1e-12]),
        ("greater_than", {"low": 1.0}, [1.0 + 1e-12, 2.0, 1e300]),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_every_transform_round_trips_and_its_derivative_matches_central_differences(
    constraint: str, bounds: dict[str, float], values: list[float]
) -> None:
    """Float64: ``from_raw(to_raw(v)) == v`` to a few ulps from the middle of each domain to its
    edges (and back to the raw value inside, ``|raw| < 20``); the derivative of ``Hparam.forward``
    w.r.t. ``raw`` (what every hypergradient goes through) equals its closed form at every point
    (written from ``raw``, free of the cancellation of ``v - low`` near a bound), and central
    differences at the points inside (where differences of the values keep their digits)."""
    v = torch.tensor(values, dtype=DT)
    h = Hparam(v, constraint, **bounds)
    torch.testing.assert_close(h.value, v, rtol=1e-10, atol=0)
    raw = h.raw.detach()
    inside = [i for i in range(len(values)) if abs(float(raw[i])) < 20]
    assert inside
    back = to_raw(h.value, constraint, **bounds)
    torch.testing.assert_close(back[inside], raw[inside], rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(h().sum(), h.raw)
    low, high = bounds.get("low", 0.0), bounds.get("high", 1.0)
    closed = {
        "positive": raw.exp(),
        "unit": torch.sigmoid(raw) * torch.sigmoid(-raw),
        "real": torch.ones_like(raw),
        "interval": (high - low) * torch.sigmoid(raw) * torch.sigmoid(-raw),
        "greater_than": raw.exp(),
    }[constraint]
    # (torch's sigmoid backward, y (1 - y), keeps an absolute error of an ulp of 1 near y = 1)
    torch.testing.assert_close(grad, closed, rtol=1e-12, atol=1e-15)
    for i in inside:
        eps = 1e-6
        up, down = raw.clone(), raw.clone()
        up[i] += eps
        down[i] -= eps
        fd = (from_raw(up, constraint, **bounds)[i] - from_raw(down, constraint, **bounds)[i]) / (2 * eps)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-7), (constraint, values[i])


def test_containers_survive_deepcopy_pickle_dtype_moves_and_strict_loads() -> None:
    """Containers registered inside a user's module: ``.to(float64)`` of that module converts
    them (values kept), ``copy.deepcopy`` / ``pickle`` give containers with the same values and
    meanings, and ``load_state_dict`` names a missing or unexpected key."""
    torch.manual_seed(0)
    model = _mlp(torch.float32)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hp = nn.ModuleDict(
                {
                    "s": Hparam(torch.tensor([0.2, 0.7]), low=0.1, high=0.9),
                    "wd": WeightDecay(model, per="parameter", init=1e-3, max=0.5),
                    "ew": ExampleWeights(5, init=0.3),
                    "lr": hg.hparams.LearningRate(inner),
                    "mom": hg.hparams.Momentum(inner),
                }
            )

    run = Run()
    before = hg.hparams.summary(run.hp)
    run.to(DT)
    assert all(p.dtype == DT for p in run.hp.parameters())
    after = hg.hparams.summary(run.hp)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] == pytest.approx(before[k], rel=1e-6), k
    for clone in (copy.deepcopy(run.hp), pickle.loads(pickle.dumps(run.hp))):
        assert hg.hparams.summary(clone) == after
        assert hg.hparams._meanings(clone) == hg.hparams._meanings(run.hp)
    fresh = Run().hp.to(DT)
    state = run.hp.state_dict()
    fresh.load_state_dict(state)
    assert hg.hparams.summary(fresh) == after
    missing = {k: v for k, v in state.items() if k != "wd.raw.1"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "wd.raw.1"'):
        fresh.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "s.extra"'):
        fresh.load_state_dict({**state, "s.extra": torch.zeros(1)})


# ----------------------------------------------------------------------------- a non-finite hypergradient


def _sqrt_val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    # finite (0) at raw = 0, with an infinite derivative there: d sqrt(r) / dr = 1 / (2 sqrt(r))
    return _ce(m, h, b) + 1e-3 * h["s"].raw.sqrt().sum()


def _adam_run(kind: str, mode: str) -> hg.HyperOptimizer:
    torch.manual_seed(0)
    model = _mlp()
    hp = nn.ModuleDict(
        {
            "wd": WeightDecay(model, per="layer", init=1e-2),
            "s": Hparam(torch.tensor([1.0, 0.5, 2.0]), "real", dtype=DT),
        }
    )
    common: dict[str, Any] = {
        "inner_optimizer": torch.optim.Adam(model.parameters(), lr=0.01),
        "outer_optimizer": torch.optim.Adam(hp.parameters(), lr=0.01),
        "on_nonfinite": mode,
    }
    if kind == "unrolled":
        return hg.Unrolled(model, hp, _penalised, _sqrt_val, steps=2, **common)
    solver = hg.CG(maxiter=3, warm_start=True) if kind == "cg" else hg.Neumann(steps=3, warm_start=True)
    return hg.Implicit(model, hp, _penalised, _sqrt_val, solver=solver, **common)


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("kind", ["cg", "neumann", "unrolled"])
def test_a_hypergradient_infinite_in_one_entry_changes_nothing_and_is_named(kind: str, mode: str) -> None:
    """Finite losses, a hypergradient infinite in one entry of one hyperparameter: weights,
    hyperparameters, both Adam states (step counts included), the warm start / recorded steps and
    the counters stay bit for bit, the hyperparameters' ``.grad`` keeps the last accepted
    hypergradient, and the message names the hyperparameter and how many entries (before: "a loss
    or the hypergradient is not finite", with both losses finite, and no name)."""
    hopt = _adam_run(kind, mode)
    for i in range(3):
        hopt.step(_batch(i))
    hopt.hyper_step(train_batch=_batch(2), val_batch=_batch(99))
    hopt.step(_batch(3))
    hopt.step(_batch(4))
    with torch.no_grad():
        hopt.hparams["s"].raw[1] = 0.0
    before = copy.deepcopy(hopt.state_dict())
    grads = [p.grad.clone() for p in hopt.hparams.parameters()]
    words = r"outer loss = [0-9.]+.*not finite for 's\.raw': 1 of 3 entries.*left untouched"
    if mode == "raise":
        with pytest.raises(hg.NonFiniteError, match=words):
            hopt.hyper_step(train_batch=_batch(4), val_batch=_batch(99))
    else:
        with pytest.warns(hg.NonFiniteWarning, match=words):
            info = hopt.hyper_step(train_batch=_batch(4), val_batch=_batch(99))
        assert info.skipped and info.hyper_steps == 1 and math.isfinite(info.outer_loss)
        assert info.hypergrad_norm == math.inf
    after = hopt.state_dict()
    for key in before:
        if key != "rng":
            assert _equal(before[key], after[key]), key
    assert after["counters"]["hyper_steps"] == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(hopt.hparams.parameters(), grads, strict=True))
    # the same entry finite again: the run goes on, and the outer Adam counts one more step
    with torch.no_grad():
        hopt.hparams["s"].raw[1] = 0.25
    info = hopt.hyper_step(train_batch=_batch(4), val_batch=_batch(99))
    assert not info.skipped and info.hyper_steps == 2
    steps = [float(s["step"]) for s in hopt.outer_optimizer.state_dict()["state"].values()]
    assert steps and all(s == 2.0 for s in steps)


def test_an_inner_gradient_infinite_in_one_entry_leaves_adams_step_count_and_is_named() -> None:
    """The inner step's guard: a finite loss whose gradient is not finite in one weight entry is
    refused before ``optimizer.step()``: Adam's step counts, moments and the weights unchanged;
    the message names the weight (before: "the training loss or its gradient is not finite",
    with the loss finite, and no name)."""
    hopt = _adam_run("cg", "skip")
    hopt.step(_batch(0))
    before = copy.deepcopy(hopt.state_dict())
    with torch.no_grad():
        hopt.model[0].weight[0, 0] = 0.0

    def rooted(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return _ce(m, h, b) + m[0].weight[0, 0].abs().sqrt()  # finite (0 term), derivative NaN/inf

    hopt.train_loss = rooted
    weight = hopt.model[0].weight.detach().clone()
    words = r"inner step 1: the training loss or its gradient.*not finite for '0\.weight': 1 of 32 entries"
    with pytest.warns(hg.NonFiniteWarning, match=words):
        loss = hopt.step(_batch(1))
    assert math.isfinite(float(loss))
    after = hopt.state_dict()
    assert _equal(before["inner_optimizer"], after["inner_optimizer"])
    assert torch.equal(hopt.model[0].weight, weight) and hopt.inner_steps == 1


# ----------------------------------------------------------------------------- what a hyperstep reports


def _method(kind: str) -> hg.HyperOptimizer:
    torch.manual_seed(0)
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "marglik":
        hp: nn.Module = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        return hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=64, inner_optimizer=inner, outer_optimizer=outer
        )
    hp = nn.ModuleDict({"wd": WeightDecay(model, per="layer", init=1e-2)})
    common: dict[str, Any] = {
        "inner_optimizer": inner,
        "outer_optimizer": torch.optim.Adam(hp.parameters(), lr=0.05),
    }
    if kind == "unrolled":
        return hg.Unrolled(model, hp, _penalised, _ce, steps=2, **common)
    solver = {"cg": hg.CG(maxiter=3), "neumann": hg.Neumann(steps=3), "identity": hg.Identity()}[kind]
    return hg.Implicit(model, hp, _penalised, _ce, solver=solver, **common)


def test_hyper_step_info_of_each_method_and_its_log_rows(tmp_path: Path) -> None:
    """The fields each method fills (and leaves ``None``), plain Python types; ``hypergrad_norm``
    is the norm of the ``.grad`` written; the rows logged from them (NaN residual of the identity
    solver included) come back from the CSV file with every field, and a run logged by a second
    logger after a resume (``append=True, resumed_at=``) holds each step once."""
    kinds = ["cg", "neumann", "identity", "unrolled", "marglik"]
    logger = hg.log.Logger()
    expected: dict[int, dict[str, Any]] = {}
    for step, kind in enumerate(kinds):
        hopt = _method(kind)
        hopt.step(_batch(0))
        hopt.step(_batch(1))
        info = hopt.hyper_step(train_batch=_batch(1), val_batch=_batch(99))
        d = dataclasses.asdict(info)
        assert all(v is None or type(v) in (int, float, str, bool) for v in d.values()), d
        assert info.hyper_steps == 1 and not info.skipped and info.seconds > 0
        norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in hopt.hparams.parameters()]))
        assert info.hypergrad_norm == pytest.approx(float(norm), rel=1e-12)
        implicit = kind in ("cg", "neumann", "identity")
        assert (info.solver_iterations is not None) == implicit and (
            info.solver_status is not None
        ) == implicit
        assert (info.unrolled_steps == 2) == (kind == "unrolled")
        assert (info.train_loss is None) == (kind == "unrolled")
        row = logger.hyper_step(info, hparams=hopt.hparams, step=step)
        assert row["step"] == step and row["outer_loss"] == info.outer_loss
        expected[step] = row
    path = logger.to_csv(tmp_path / "log.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(len(kinds)))
    for r in rows:
        want = expected[int(r["step"])]
        for k, v in want.items():
            if isinstance(v, str):
                assert r[k] == v
            else:
                got = float(r[k])
                assert got == v or (math.isnan(got) and math.isnan(v)), (k, r[k], v)
        assert {k for k, v in r.items() if v != ""} == set(want)
    # a resumed run re-logs steps 3 and 4: the file holds each step once, the new values kept
    resumed = hg.log.Logger()
    for step in (3, 4, 5):
        resumed.log({"outer_loss": float(step) * 10}, step=step)
    resumed.to_csv(path, append=True, resumed_at=3)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [float(r["outer_loss"]) for r in rows[3:]] == [30.0, 40.0, 50.0]


class _Run:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        self.rows.append(dict(row))


def test_a_str_enum_is_logged_as_its_plain_string() -> None:
    """Before: ``Logger`` kept the enum itself (a ``str`` subclass) in its history and sent
    ``solver_status/SolveStatus.CONVERGED`` to wandb (``f"{enum}"`` is its qualified name), so
    one status had two keys depending on how it reached the logger."""
    logger = hg.log.Logger()
    logger.run = _Run()  # (a stand-in wandb run: what log() sends)
    row = logger.hyper_step({"outer_loss": 1.0, "solver_status": hg.SolveStatus.CONVERGED}, step=0)
    assert type(row["solver_status"]) is str and row["solver_status"] == "converged"
    assert "solver_status/converged" in logger.run.rows[-1]
    kept = logger.log({"constraint": Constraint.UNIT}, step=1)
    assert type(kept["constraint"]) is str and kept["constraint"] == "unit"
    assert type(hg.log.scalar("k", torch.tensor(True))) is bool


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("argv", "usage", "words"),
    [
        (["list", "--bogus"], "usage: hypergrad list", "unrecognised arguments: --bogus"),
        (["list", "extra"], "usage: hypergrad list", "unrecognised arguments: extra"),
        (["report", "--stdout", "--bogus"], "usage: hypergrad report", "unrecognised arguments: --bogus"),
        (["run", "overfit_val", "--bogus"], "usage: hypergrad run", "settings are --key=value"),
        (["run", "overfit_val", "-q"], "usage: hypergrad run", "unrecognised arguments: -q"),
        ([], "usage: hypergrad", "required: {list,run,show,report}"),
        (["run", "overfit_val", "--seed", "abc"], "usage: hypergrad run", "invalid int value: 'abc'"),
    ],
    ids=["list-flag", "list-word", "report-flag", "run-flag", "run-short", "no-command", "run-seed"],
)
def test_bad_flags_are_usage_errors_with_exit_code_2(
    argv: list[str], usage: str, words: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Before: an unknown flag of ``list`` / ``report`` / ``run`` exited with code 1 and no usage
    line (argparse's own usage errors, like ``--seed abc``, exit with 2 and print the usage), and
    a missing command was reported as "required: cmd" (the parser's internal name)."""
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--out", str(tmp_path / "run")] if argv[:1] == ["run"] else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert usage in err and words in err, err
    assert not (tmp_path / "run").exists()


def test_help_of_the_command_and_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["list", "--help"], ["run", "--help"], ["show", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith("usage: hypergrad"), (argv, out)
    # `python -m hypergrad` is the same command, end to end
    done = subprocess.run(
        [sys.executable, "-m", "hypergrad", "list", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "usage: hypergrad list" in done.stderr and "Traceback" not in done.stderr
