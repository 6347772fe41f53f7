"""The linear solvers and the implicit hypergradient on what peer libraries' implicit-
differentiation tests check, translated into our API (jaxopt's ``implicit_diff`` tests: ridge,
a smooth lasso-like problem, root / fixed-point conditions, normal-equation CG; torchopt's
``diff.implicit`` tests: ``solve_cg`` with ``ridge=``, ``solve_inv(ns=True)``; hypertorch's
``fixed_point`` / ``CG`` / ``neumann`` hypergradients with ``tol`` and ``K``).

Everything exact is in float64 against a closed form, a dense solve or central differences.
What is covered here and not in tests/test_solvers.py or tests/test_peers_implicit.py:

* non-finite HVPs in Neumann (status ``nonfinite``, no silent re-solve, state untouched);
* Neumann's divergence on a slightly indefinite Hessian, said; no false alarm on a nearly
  singular positive definite one nor on a non-symmetric contraction (a fixed-point condition);
* scale: CG, Neumann and Direct on right-hand sides of 1e-25 ... 1e21 in float32 (and 1e-170
  ... 1e160 in float64), ``tol`` relative to ``|v|`` and the reported residual checked against
  the true one;
* damping against the closed form :math:`(H + \\delta I)^{-1}` at the hypergradient level;
* the functional API on a smooth lasso (pseudo-Huber penalty) against central differences, and
  with a user-given operator for a fixed-point condition (Neumann, and CG on normal equations);
* warm starts across hypersteps when ``hessian_subset`` or the batch size changes.

The tests of the fixes (marked "failed before") failed before them.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian

import hypergrad as hg
import hypergrad.testing as ht
from hypergrad._solvers import SolveStatus

DT = torch.float64


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _spd(n: int, cond: float, dtype: torch.dtype, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    a = (q * torch.logspace(0, math.log10(cond), n, dtype=DT)) @ q.T
    return (0.5 * (a + a.T)).to(dtype)


# ------------------------------------------------------------------ non-finite HVPs in Neumann


def _nan_on_call(h: Tensor, bad_call: int) -> Any:
    calls = [0]

    def hvp(u: Any) -> tuple[Tensor]:
        calls[0] += 1
        out = h @ u[0]
        return (out * float("nan"),) if calls[0] == bad_call else (out,)

    return hvp


@pytest.mark.parametrize("warm", [False, True])
def test_neumann_says_nonfinite_when_an_hvp_is_nan_mid_solve(warm: bool) -> None:
    """Failed before: from 0 the status was ``fixed`` (a NaN solution reported as a normal
    truncated series), warm-started ``diverging`` (so Implicit solved again from 0)."""
    h = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=DT))
    x0 = (torch.ones(3, dtype=DT),) if warm else None
    r = hg.Neumann(steps=5, alpha=0.3).solve(_nan_on_call(h, 3), (torch.ones(3, dtype=DT),), x0=x0)
    assert r.status is SolveStatus.NONFINITE and r.iterations == 5
    assert torch.isnan(r.solution[0]).all() and math.isnan(float(r.residual))
    # an infinite right-hand side too (CG already said so)
    r = hg.Neumann(steps=3, alpha=0.3).solve(
        lambda u: (h @ u[0],), (torch.tensor([1.0, math.inf, 0.0], dtype=DT),)
    )
    assert r.status is SolveStatus.NONFINITE


_CALLS = [0]


class _FlakySecondDerivative(torch.autograd.Function):
    """Identity forward; its backward (used by the HVPs) gives NaN on call ``_CALLS == 3``."""

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        return w.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        _CALLS[0] += 1
        return g * float("nan") if _CALLS[0] == 3 else g


class _HalfSquare(torch.autograd.Function):
    """``0.5 * |w|^2`` whose gradient goes through :class:`_FlakySecondDerivative`."""

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return 0.5 * (w**2).sum()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        return g * _FlakySecondDerivative.apply(w)


def test_warm_neumann_with_a_nan_hvp_refuses_the_hyperstep_and_keeps_the_state() -> None:
    """Failed before: the warm solve's NaN read as ``diverging``, Implicit solved again from 0
    (10 HVPs), and the hyperstep was accepted with status ``fixed``: the NaN was never said."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)

    class HP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_scale = nn.Parameter(torch.zeros(3, dtype=DT))

    hp = HP()
    x, y = torch.randn(20, 3, dtype=DT), torch.randn(20, dtype=DT)

    def mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return mse(m, h, b) + _HalfSquare.apply(m.weight[0] * h.log_scale.exp())

    hopt = hg.Implicit(
        model, hp, train, mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Neumann(steps=5, alpha=0.1, warm_start=True), on_nonfinite="skip",
    )  # fmt: skip
    _CALLS[0] = -1000
    hopt.hyper_step(train_batch=(x, y), val_batch=(x, y))
    x0, before = hopt._x0, hp.log_scale.detach().clone()
    assert x0 is not None
    _CALLS[0] = 0
    with pytest.warns(hg.NonFiniteWarning):
        info = hopt.hyper_step(train_batch=(x, y), val_batch=(x, y))
    assert info.skipped and info.solver_status == "nonfinite" and info.solver_iterations == 5
    assert hopt._x0 is x0 and torch.equal(hp.log_scale, before)


# ------------------------------------------------------------------------ Neumann's divergence


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_neumann_says_diverging_on_a_slightly_indefinite_hessian(dtype: torch.dtype) -> None:
    """H = diag(1, -0.05), alpha = 0.9: the series grows by 1.045 per term along the negative
    direction. Failed before: status ``fixed`` with residual 0.12 (the last term was still
    smaller than v), for a solution [1, 0.60] where H^-1 v = [1, -2]."""
    h = torch.diag(torch.tensor([1.0, -0.05], dtype=dtype))
    v = (torch.tensor([1.0, 0.1], dtype=dtype),)
    r = hg.Neumann(steps=5, alpha=0.9).solve(lambda u: (h @ u[0],), v)
    assert r.status is SolveStatus.DIVERGING and float(r.residual) < 1
    # the same series on the positive definite diag(1, 0.05): fixed, and it converges
    hp = torch.diag(torch.tensor([1.0, 0.05], dtype=dtype))
    r = hg.Neumann(steps=400, alpha=0.9).solve(lambda u: (hp @ u[0],), v)
    assert r.status is SolveStatus.FIXED
    assert _rel(r.solution[0].double(), torch.tensor([1.0, 2.0], dtype=DT)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_neumann_no_false_alarm_on_a_nearly_singular_hessian(dtype: torch.dtype) -> None:
    """Eigenvalues down to 1e-7 (factors 1 - 1e-7 per term) and an exactly flat direction: the
    terms stop shrinking, up to rounding, and that is not divergence."""
    h = _spd(30, 1e7, dtype) * (1e-7 if dtype == DT else 1.0)  # (any scale: alpha follows it)
    h = h / torch.linalg.eigvalsh(h.double()).max().to(dtype)
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(30, generator=g, dtype=DT).to(dtype),)
    for steps in (1, 5, 50):
        r = hg.Neumann(steps=steps, alpha=1.0).solve(lambda u: (h @ u[0],), v)
        assert r.status is SolveStatus.FIXED, steps
    flat = torch.diag(torch.tensor([1.0, 0.0], dtype=dtype))
    r = hg.Neumann(steps=20, alpha=0.5).solve(lambda u: (flat @ u[0],), (torch.ones(2, dtype=dtype),))
    assert r.status is SolveStatus.FIXED


# --------------------------------------------------------------------------- scale and tol


@pytest.mark.parametrize(
    ("dtype", "scales"),
    [(torch.float32, [2.0**-83, 2.0**-60, 2.0**60, 2.0**70]), (DT, [2.0**-565, 2.0**532])],
)
def test_solvers_are_scale_invariant(dtype: torch.dtype, scales: list[float]) -> None:
    """Failed before: in float32, CG on v = 2^-83 [1, 1, 1] (1e-25) returned x = 0 as
    ``converged`` with residual 0 (v^T v underflowed to 0, read as v = 0), on v = 2^70 [1, 1, 1]
    (1e21) NaN as ``nonfinite`` (v^T v overflowed); warm-started Neumann returned 0 for the tiny
    v; Neumann's and Direct's residuals read 0. The same in float64 at 2^-565 and 2^532. Scaling
    by a power of two is exact, so every solver must give exactly the scaled result of v = 1."""
    h = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=dtype))
    exact = torch.tensor([0.5, 1.0, 2.0], dtype=DT)

    def hvp(u: Any) -> tuple[Tensor]:
        return (h @ u[0],)

    one = torch.ones(3, dtype=dtype)
    solvers: list[tuple[hg.LinearSolver, bool]] = [
        (hg.CG(maxiter=5, tol=1e-4), False),
        (hg.CG(maxiter=5, tol=1e-4), True),
        (hg.Neumann(steps=60, alpha=0.5), False),
        (hg.Neumann(steps=60, alpha=0.5), True),
        (hg.Direct(), False),
    ]
    for solver, warm in solvers:
        ref = solver.solve(hvp, (one,), x0=(0.5 * one,) if warm else None)
        assert _rel(ref.solution[0].double(), exact) < 1e-5 and 0 <= float(ref.residual) < 1e-4
        for s in scales:
            got = solver.solve(hvp, (one * s,), x0=(0.5 * one * s,) if warm else None)
            assert got.status is ref.status and got.iterations == ref.iterations, (solver, warm, s)
            assert torch.equal(got.solution[0], ref.solution[0] * s), (solver, warm, s)
            assert float(got.residual) == float(ref.residual), (solver, warm, s)


def test_cg_tol_is_relative_and_its_residual_honest_in_float64() -> None:
    """``tol`` is relative to |v| (documented): v and 1e6 v take the same iterations. The
    reported residual (CG's recurrence) is the true |Hx - v|/|v| to 1e-3 (relative) down to a
    tol of 1e-8 at condition number 1e4; below the first tol it stops at once."""
    h = _spd(40, 1e4, DT)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(40, generator=g, dtype=DT)

    def hvp(u: Any) -> tuple[Tensor]:
        return (h @ u[0],)

    for tol in (1e-2, 1e-5, 1e-8):
        r = hg.CG(maxiter=200, tol=tol).solve(hvp, (b,))
        big = hg.CG(maxiter=200, tol=tol).solve(hvp, (2.0**20 * b,))  # (exactly scaled: the same path)
        assert r.status is SolveStatus.CONVERGED and big.iterations == r.iterations
        assert float(big.residual) == float(r.residual)
        true = float((h @ r.solution[0] - b).norm() / b.norm())
        assert true <= tol and float(r.residual) == pytest.approx(true, rel=1e-3)
        # not a power of two: another rounding path, the same guarantee
        odd = hg.CG(maxiter=200, tol=tol).solve(hvp, (1e6 * b,))
        true = float((h @ odd.solution[0] - 1e6 * b).norm() / (1e6 * b).norm())
        assert odd.status is SolveStatus.CONVERGED and true <= tol * 1.001


def test_cg_residual_in_float32_is_the_true_one_when_it_stops_early() -> None:
    """Condition number 1e4 in float32, 30 iterations (status ``max_iterations``): the reported
    residual is within 5% of the true one, computed in float64."""
    h = _spd(40, 1e4, torch.float32)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(40, generator=g, dtype=DT).float()
    r = hg.CG(maxiter=30, tol=1e-6).solve(lambda u: (h @ u[0],), (b,))
    true = float((h.double() @ r.solution[0].double() - b.double()).norm() / b.double().norm())
    assert r.status is SolveStatus.MAX_ITERATIONS and 1e-4 < true
    assert float(r.residual) == pytest.approx(true, rel=0.05)


# ---------------------------------------------------------------- damping, hypergradient level


def _dense_damped(p: ht.BilevelProblem, damping: float) -> Tensor:
    """d_lambda L_V - mixed^T (H + damping I)^-1 d_w L_V, by dense autograd (independent)."""
    ws = [q for q in p.model.parameters()]
    hs = list(p.hparams.parameters())
    gt = torch.autograd.grad(p.train_loss(p.model, p.hparams, p.train_batch), ws, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in gt])
    rows = [
        torch.autograd.grad(flat[i], ws + hs, retain_graph=True, allow_unused=True) for i in range(len(flat))
    ]
    jac = torch.stack(
        [
            torch.cat(
                [
                    (torch.zeros_like(x) if r is None else r).reshape(-1)
                    for r, x in zip(row, ws + hs, strict=True)
                ]
            )
            for row in rows
        ]
    )
    n = len(flat)
    gv = torch.autograd.grad(p.val_loss(p.model, p.hparams, p.val_batch), ws + hs, allow_unused=True)
    gv_flat = torch.cat(
        [(torch.zeros_like(x) if g is None else g).reshape(-1) for g, x in zip(gv, ws + hs, strict=True)]
    )
    hess = jac[:, :n] + damping * torch.eye(n, dtype=DT)
    return gv_flat[n:] - jac[:, n:].T @ torch.linalg.solve(hess, gv_flat[:n])


def test_damping_zero_and_positive_against_the_closed_form() -> None:
    """torchopt's ``solve_cg(ridge=...)`` and hypertorch's CG: CG and Direct with damping
    delta give d_lambda L_V - mixed^T (H + delta I)^-1 d_w L_V to 1e-10; with delta = 0 the
    exact hypergradient (Newton-solved logistic regression) to 1e-8; and delta = 0.5 moves it
    by more than 10% (so the comparison can fail)."""
    p = ht.logistic()
    p.solve_inner()
    exact = torch.cat([t.reshape(-1) for t in p.exact_hypergradient()])
    for delta in (0.0, 0.5):
        ref = _dense_damped(p, delta)
        for solver in (hg.CG(maxiter=200, tol=1e-14, damping=delta), hg.Direct(damping=delta)):
            g, _, res = hg.implicit_hypergradient(
                lambda: p.train_loss(p.model, p.hparams, p.train_batch),
                lambda: p.val_loss(p.model, p.hparams, p.val_batch),
                list(p.model.parameters()), list(p.hparams.parameters()), solver,
            )  # fmt: skip
            flat = torch.cat([t.reshape(-1) for t in g])
            assert res.status is SolveStatus.CONVERGED
            assert _rel(flat, ref) < 1e-10, (type(solver).__name__, delta)
            assert _rel(flat, exact) < 1e-8 if delta == 0 else _rel(flat, exact) > 0.1


# -------------------------------------------- functional API: smooth lasso, fixed-point condition


def test_smooth_lasso_hypergradient_matches_central_differences() -> None:
    """jaxopt's lasso-like smooth problem: least squares + sum_j e^{r_j} sqrt(w_j^2 + eps^2)
    (pseudo-Huber, a non-constant Hessian), inner problem solved by Newton's method to a
    gradient below 1e-13; the validation MSE's hypergradient w.r.t. r by CG, warm CG, Direct and
    Neumann through :func:`hypergrad.implicit_hypergradient` against central differences."""
    g = torch.Generator().manual_seed(4)
    n, f, eps = 40, 5, 0.1
    x, y = torch.randn(n, f, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    xv, yv = torch.randn(30, f, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    r = torch.linspace(-3.0, -1.0, f, dtype=DT).requires_grad_(True)

    def inner(w: Tensor, lam: Tensor) -> Tensor:
        return 0.5 * ((x @ w - y) ** 2).mean() + (lam.exp() * torch.sqrt(w**2 + eps**2)).sum()

    def outer(w: Tensor) -> Tensor:
        return 0.5 * ((xv @ w - yv) ** 2).mean()

    def solve(lam: Tensor) -> Tensor:
        w = torch.zeros(f, dtype=DT)
        for _ in range(100):
            wg = w.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(inner(wg, lam), wg)
            if gr.norm() < 1e-13:
                return w
            w = w - torch.linalg.solve(hessian(lambda u: inner(u, lam), w), gr)
        raise AssertionError("Newton did not converge")

    w = solve(r.detach()).requires_grad_(True)
    lam = r.detach().clone()  # (central_difference perturbs it in place)
    fd = ht.central_difference(lambda: float(outer(solve(lam))), lam)
    solvers = [hg.CG(maxiter=100, tol=1e-13), hg.Direct(), hg.Neumann(steps=3000, alpha=0.5)]
    x0 = None
    for solver in [*solvers, hg.CG(maxiter=100, tol=1e-13)]:
        hgrad, _, res = hg.implicit_hypergradient(
            lambda: inner(w, r), lambda: outer(w), [w], [r], solver, x0=x0
        )
        assert _rel(hgrad[0], fd) < 1e-7, solver
        assert res.status in (SolveStatus.CONVERGED, SolveStatus.FIXED)
        x0 = res.solution  # the last CG starts from Neumann's solution
    assert res.iterations <= 3  # warm: the residual HVP and at most two more


def test_fixed_point_condition_with_a_user_operator() -> None:
    """jaxopt's fixed-point / root conditions and hypertorch's ``fixed_point``: w = tanh(A w +
    B lam) with |A| < 1, a non-symmetric Jacobian J. dL/dlam = (dT/dlam)^T x with
    (I - J)^T x = dL/dw, solved through ``solver.solve`` with the user's operator: Neumann (a
    contraction: status ``fixed``, no false ``diverging``) and CG on the normal equations
    (jaxopt's ``solve_normal_cg``), both against central differences of the solved fixed point."""
    g = torch.Generator().manual_seed(5)
    n, k = 6, 3
    a = torch.randn(n, n, generator=g, dtype=DT)
    a = 0.6 * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(n, k, generator=g, dtype=DT)
    c = torch.randn(n, generator=g, dtype=DT)
    lam = torch.randn(k, generator=g, dtype=DT)

    def t_map(w: Tensor, lm: Tensor) -> Tensor:
        return torch.tanh(a @ w + b @ lm)

    def fixed_point(lm: Tensor) -> Tensor:
        w = torch.zeros(n, dtype=DT)
        for _ in range(300):
            w = t_map(w, lm)
        return w

    def loss(w: Tensor) -> Tensor:
        return ((w - c) ** 2).sum()

    w = fixed_point(lam)
    slope = 1 - w**2  # tanh' at the fixed point: J = diag(slope) A, dT/dlam = diag(slope) B
    v = 2 * (w - c)

    def op(u: Any) -> tuple[Tensor]:  # (I - J)^T u
        return (u[0] - a.T @ (slope * u[0]),)

    def op_t(u: Any) -> tuple[Tensor]:  # (I - J) u
        return (u[0] - slope * (a @ u[0]),)

    fd = ht.central_difference(lambda: float(loss(fixed_point(lam))), lam, eps=1e-6)
    nm = hg.Neumann(steps=200, alpha=1.0).solve(op, (v,))
    assert nm.status is SolveStatus.FIXED
    # normal equations of (I - J)^T x = v: (I - J)(I - J)^T x = (I - J) v
    normal = hg.CG(maxiter=50, tol=1e-14).solve(lambda u: op_t(op(u)), op_t((v,)))
    assert normal.status is SolveStatus.CONVERGED
    for sol in (nm.solution[0], normal.solution[0]):
        hgrad = b.T @ (slope * sol)
        assert _rel(hgrad, fd) < 1e-7


# ------------------------------------------------------------- warm starts across hypersteps


def _mlp_problem() -> tuple[nn.Module, nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return val(m, h, b) + h.penalty(m)

    return model, hp, train, val


def _hopt(
    model: nn.Module, hp: nn.Module, train: Any, val: Any, warm: bool, subset: Any = None
) -> hg.Implicit:
    return hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=300, tol=1e-13, damping=10.0, warm_start=warm), hessian_subset=subset,
    )  # fmt: skip


def test_warm_start_follows_a_changed_hessian_subset_and_batch_size() -> None:
    """Failed before: setting ``hopt.hessian_subset`` between hypersteps of a warm-started CG
    raised ``ValueError: x0 must be shaped like v`` (the kept solution covered all four weight
    tensors, the new solve the two matrices). Now a kept solution shaped for other weights is dropped, and
    every warm hyperstep equals a cold one (CG damped by 10, to 1e-13) while the batch size changes."""
    model, hp, train, val = _mlp_problem()
    warm = _hopt(model, hp, train, val, True)
    g = torch.Generator().manual_seed(6)

    def batch(m: int) -> tuple[Tensor, Tensor]:
        return torch.randn(m, 3, generator=g, dtype=DT), torch.randn(m, 1, generator=g, dtype=DT)

    for m, subset in (
        (20, None),
        (7, None),
        (33, lambda n: n.endswith("weight")),
        (11, lambda n: n.endswith("weight")),
    ):
        tb, vb = batch(m), batch(m + 3)
        warm.hessian_subset = subset
        info = warm.hyper_step(train_batch=tb, val_batch=vb)
        got = hp.raw[0].grad.clone(), hp.raw[1].grad.clone()
        cold = _hopt(model, hp, train, val, False, subset)
        cold_info = cold.hyper_step(train_batch=tb, val_batch=vb)
        assert info.solver_status == cold_info.solver_status == "converged"
        for a, b in zip(got, (hp.raw[0].grad, hp.raw[1].grad), strict=True):
            assert _rel(a, b) < 1e-9, m
    assert warm._x0 is not None and len(warm._x0) == 2


def test_neumann_no_false_alarm_once_converged_to_rounding_in_float32() -> None:
    """Logistic regression in float32, alpha = 1.9 / lambda_max, 1000 terms: the terms shrink
    to 1e-43 (subnormal numbers), where their norms are rounding noise. Failed before the
    eps |v| floor of the growth test (once growth was tested at all): ``diverging``."""
    p = ht.logistic()
    p.solve_inner()
    lam_max = float(torch.linalg.eigvalsh(p.hessian()).max())
    p.model.float()
    p.hparams.float()
    tb = tuple(t.float() for t in p.train_batch)
    ws = list(p.model.parameters())
    grads = torch.autograd.grad(p.train_loss(p.model, p.hparams, tb), ws, create_graph=True)

    def hvp(u: Any) -> tuple[Tensor, ...]:
        return torch.autograd.grad(grads, ws, u, retain_graph=True)

    g = torch.Generator().manual_seed(1)  # (one whose last, subnormal, term "grew")
    v = [torch.randn(w.shape, generator=g) for w in ws]
    for steps, scale in ((5, 0.5), (200, 1.0), (1000, 1.9)):
        r = hg.Neumann(steps=steps, alpha=scale / lam_max).solve(hvp, v)
        assert r.status is SolveStatus.FIXED, (steps, scale, float(r.residual))
    r = hg.Neumann(steps=5, alpha=2.2 / lam_max).solve(hvp, v)  # |1 - alpha lambda_max| = 1.2
    assert r.status is SolveStatus.DIVERGING
