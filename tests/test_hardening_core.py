"""Hardening of the core (Implicit's solve, solvers, containers, logger): each test pins a silent
wrong answer or a poor error found by an adversarial pass, and fails without its fix."""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hypergrad as hg
import hypergrad.testing as ht
from hypergrad._solvers import SolveStatus

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- complex weights


class _ComplexLinear(nn.Module):
    """y = x @ w with complex weights and real inputs (a complex layer on real data)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.cdouble))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.w.dtype) @ self.w


def _cmse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]).abs() ** 2).mean()


@pytest.mark.parametrize(
    "solver", [hg.CG(maxiter=30, tol=1e-14), hg.Neumann(steps=60)], ids=["cg", "neumann"]
)
def test_complex_weights_with_real_inputs_match_finite_differences(solver: hg.LinearSolver) -> None:
    """Complex weights: real float64 batches used to be refused (told to convert them to complex),
    and CG crashed turning a complex dot product into a float. Now the IFT hypergradient of a complex
    ridge problem equals central differences of its closed form."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(12, 3, generator=g, dtype=DT)
    y, yv = (
        torch.randn(16, generator=g, dtype=torch.cdouble),
        torch.randn(12, generator=g, dtype=torch.cdouble),
    )
    model = _ComplexLinear()
    hp = hg.hparams.Hparam(torch.tensor([0.1, 0.3, 0.2], dtype=DT))

    def solve_inner() -> None:
        a = x.to(torch.cdouble)
        h = a.mH @ a / len(x) + torch.diag(hp().detach().to(torch.cdouble))
        with torch.no_grad():
            model.w.copy_(torch.linalg.solve(h, a.mH @ y / len(x)))

    def outer() -> float:
        solve_inner()
        with torch.no_grad():
            return float(_cmse(model, hp, (xv, yv)))

    fd = ht.central_difference(outer, hp.raw, eps=1e-6)
    solve_inner()
    hopt = hg.Implicit(
        model,
        hp,
        lambda m, h, b: _cmse(m, h, b) + (h() * m.w.abs() ** 2).sum(),
        _cmse,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver,
    )
    grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert _rel(grads[0], fd) < 1e-7
    assert info.solver_residual is not None and info.solver_residual < 1e-10
    assert hopt.step((x, y)).dtype == DT  # real batches train the complex model too


def test_real_model_still_refuses_a_batch_of_another_precision() -> None:
    model = nn.Linear(3, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer")
    hopt = hg.Implicit(
        model,
        hp,
        lambda m, h, b: m(b[0]).sum(),
        lambda m, h, b: m(b[0]).sum(),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    with pytest.raises(ValueError, match="float32 tensor"):
        hopt.step((torch.randn(4, 3),))


# ----------------------------------------------------------------------------- singular Hessians


class _ValHead(nn.Module):
    """``body`` is trained; ``vhead`` only enters the validation loss (an auxiliary probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 1)
        self.vhead = nn.Linear(2, 1)


def _val_head_problem(solver: hg.LinearSolver, subset: Any = None) -> tuple[hg.Implicit, Any, Any]:
    torch.manual_seed(0)
    model = _ValHead().to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1, include=lambda n: n.startswith("body"))
    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(64, 2, generator=g, dtype=DT), torch.randn(64, generator=g, dtype=DT))
    vb = (torch.randn(32, 2, generator=g, dtype=DT), torch.randn(32, generator=g, dtype=DT))

    def train_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return 0.5 * ((m.body(b[0]).squeeze(-1) - b[1]) ** 2).mean() + h.penalty(m)

    def val_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return 0.5 * ((m.body(b[0]).squeeze(-1) + m.vhead(b[0]).squeeze(-1) - b[1]) ** 2).mean()

    hopt = hg.Implicit(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver,
        hessian_subset=subset,
    )
    return hopt, tb, vb


@pytest.mark.parametrize("warm", [False, True])
def test_weights_only_the_validation_loss_reaches_do_not_break_cg(warm: bool) -> None:
    """A weight the training loss does not reach has a zero row in H while dL_V/dw is not zero
    there: CG took a step of size 1/rounding and the hyperstep died with a NonFiniteError blaming
    'a loss or the hypergradient'. Such weights cannot move with the hyperparameters: the answer is
    the IFT over the weights the training loss reaches (here: what hessian_subset=body gives)."""
    exact_hopt, tb, vb = _val_head_problem(
        hg.CG(maxiter=50, tol=1e-14), subset=lambda n: n.startswith("body")
    )
    exact, _ = exact_hopt.hypergradient(train_batch=tb, val_batch=vb)
    hopt, tb, vb = _val_head_problem(hg.CG(maxiter=50, tol=1e-14, warm_start=warm))
    for _ in range(2 if warm else 1):  # the second hyperstep starts from the first's solution
        info = hopt.hyper_step(train_batch=tb, val_batch=vb)
        assert info.solver_status == "converged"
        for h, e in zip(hopt.pair.hparam_tensors, exact, strict=True):
            assert h.grad is not None
            torch.testing.assert_close(h.grad, e, rtol=1e-9, atol=1e-13)
    neumann, tb, vb = _val_head_problem(hg.Neumann(steps=400, alpha=0.5))
    grads, info = neumann.hypergradient(train_batch=tb, val_batch=vb)
    assert info.solver_status == "fixed"
    for a, e in zip(grads, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)


def test_cg_stops_when_curvature_is_lost_in_rounding() -> None:
    """H singular and v not in its range (weights of ReLU units dead on the training batch, with no
    penalty): CG's curvature along the null space is rounding noise, and it returned a solution of
    size 1e192 as 'max_iterations' -- finite, so no guard caught the hypergradient built from it."""
    h = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=DT))
    res = hg.CG(maxiter=50, tol=1e-12).solve(lambda u: (h @ u[0],), (torch.ones(3, dtype=DT),))
    assert res.status is SolveStatus.NONPOSITIVE_CURVATURE
    assert float(res.solution[0].norm()) < 10.0
    assert res.iterations < 50
    # a consistent singular system and an ill-conditioned regular one still converge
    res = hg.CG(maxiter=50, tol=1e-12).solve(
        lambda u: (h @ u[0],), (torch.tensor([1.0, 1.0, 0.0], dtype=DT),)
    )
    assert res.status is SolveStatus.CONVERGED
    torch.testing.assert_close(res.solution[0], torch.tensor([0.5, 1.0, 0.0], dtype=DT))
    d = torch.logspace(0, -10, 12, dtype=DT)
    res = hg.CG(maxiter=500, tol=1e-12).solve(lambda u: (d * u[0],), (torch.ones(12, dtype=DT),))
    assert res.status is SolveStatus.CONVERGED
    torch.testing.assert_close(res.solution[0], 1 / d, rtol=1e-6, atol=0)


def test_neumann_reports_a_diverging_series() -> None:
    """An alpha beyond 2/lambda_max made the series blow up while the status said 'fixed'."""
    h = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=DT))
    v = (torch.ones(3, dtype=DT),)
    bad = hg.Neumann(steps=10, alpha=1.5).solve(lambda u: (h @ u[0],), v)
    assert bad.status is SolveStatus.DIVERGING and float(bad.residual) > 1
    good = hg.Neumann(steps=10, alpha=0.5).solve(lambda u: (h @ u[0],), v)
    assert good.status is SolveStatus.FIXED and float(good.residual) < 1
    # through Implicit: a ridge problem with alpha far above 2 / lambda_max
    p = ht.ridge()
    p.solve_inner()
    lam_max = float(torch.linalg.eigvalsh(p.hessian()).max())
    for alpha, status in ((3.0 / lam_max, "diverging"), (1.0 / lam_max, "fixed")):
        hopt = hg.Implicit(
            p.model,
            p.hparams,
            p.train_loss,
            p.val_loss,
            inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
            solver=hg.Neumann(steps=20, alpha=alpha),
        )
        _, info = hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
        assert info.solver_status == status


# ----------------------------------------------------------------------------- containers


def test_hparam_tensor_init_keeps_its_precision() -> None:
    """A float64 tensor init was silently cast to float32 (the default dtype), so float64
    gradient checks of a hand-built Hparam were off by float32 rounding."""
    init = torch.tensor([0.1, 0.3], dtype=DT)
    assert hg.hparams.Hparam(init).raw.dtype == DT
    assert hg.hparams.Hparam(init, dtype=torch.float32).raw.dtype == torch.float32
    assert hg.hparams.Hparam(0.5).raw.dtype == torch.get_default_dtype()
    assert hg.hparams.Hparam(torch.tensor([1, 2])).raw.dtype == torch.get_default_dtype()
    torch.testing.assert_close(hg.hparams.Hparam(init).value, init, rtol=1e-15, atol=0)


def test_example_weights_refuse_negative_and_boolean_indices() -> None:
    """A negative index silently weighted the example counted from the end; a boolean mask
    returned as many weights as True entries, not one per example."""
    ew = hg.hparams.ExampleWeights(5)
    with pytest.raises(IndexError, match="negative example index"):
        ew(torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="integer example indices"):
        ew(torch.tensor([True, False, True, False, False]))
    assert ew(torch.tensor([4, 4, 0])).shape == (3,)
    assert hg.hparams.ExampleWeights(np.int64(5)).raw.shape == (5,)


def test_example_weights_with_repeated_indices_match_finite_differences() -> None:
    """Implicit hypergradient of per-example weights with repeated indices in one batch, against
    central differences of the closed-form weighted ridge solution."""
    g = torch.Generator().manual_seed(0)
    n = 10
    x, y = torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    xv, yv = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    idx = torch.tensor([0, 1, 2, 2, 3, 0, 5, 7, 7, 7])
    model = nn.Linear(3, 1).to(DT)
    ew = hg.hparams.ExampleWeights(n, dtype=DT)
    with torch.no_grad():
        ew.raw.add_(torch.randn(n, generator=g, dtype=DT))

    def tl(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        xb, yb, i = b
        return (h(i) * (m(xb).squeeze(-1) - yb) ** 2).mean() + 0.05 * sum(
            (p**2).sum() for p in m.parameters()
        )

    def vl(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()

    def solve_inner() -> None:
        w = ew(idx).detach()
        a = torch.cat([x[idx], torch.ones(len(idx), 1, dtype=DT)], 1)
        th = torch.linalg.solve(
            2 * a.T @ (w[:, None] * a) / len(idx) + 0.1 * torch.eye(4, dtype=DT),
            2 * a.T @ (w * y[idx]) / len(idx),
        )
        with torch.no_grad():
            model.weight.copy_(th[:3].reshape(1, 3))
            model.bias.copy_(th[3:])

    def outer() -> float:
        solve_inner()
        with torch.no_grad():
            return float(vl(model, ew, (xv, yv)))

    fd = ht.central_difference(outer, ew.raw, eps=1e-6)
    solve_inner()
    hopt = hg.Implicit(
        model,
        ew,
        tl,
        vl,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-14),
    )
    grads, _ = hopt.hypergradient(train_batch=(x[idx], y[idx], idx), val_batch=(xv, yv))
    assert _rel(grads[0], fd) < 1e-7
    unseen = torch.ones(n, dtype=torch.bool)
    unseen[idx] = False
    assert bool((grads[0][unseen] == 0).all()) and bool((grads[0][~unseen] != 0).all())


# ----------------------------------------------------------------------------- logger


def test_logger_appends_to_the_csv_of_a_resumed_run(tmp_path: Any) -> None:
    """A resumed run's new Logger overwrote the trajectory written before the checkpoint."""
    path = tmp_path / "trajectory.csv"
    info = hg.HyperStepInfo(0.5, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
    first = hg.log.Logger()
    for i in range(3):
        first.hyper_step(info, step=i)
    first.to_csv(path)
    resumed = hg.log.Logger()
    for i in range(3, 5):
        resumed.hyper_step(info, step=i, val_acc=0.9)
    resumed.to_csv(path, append=True)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [r["val_acc"] for r in rows] == ["", "", "", "0.9", "0.9"]
    assert all(float(r["outer_loss"]) == 0.5 for r in rows)
    resumed.to_csv(path)  # the default still overwrites
    with path.open(newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 4]
    with pytest.raises(ValueError, match="histogram_every"):
        hg.log.Logger(histogram_every=1.5)  # type: ignore[arg-type]
