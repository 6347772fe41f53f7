"""Linear solvers against dense solves, and the convergence shapes of Grazzi et al. (2020)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hypergrad as hg
import hypergrad.testing as ht
from hypergrad._solvers import SolveStatus

DT = torch.float64


def _spd(n: int, cond: float, seed: int = 0, log: bool = False) -> torch.Tensor:
    """Random rotation of eigenvalues from 1 to ``cond``, evenly or log-evenly spaced."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    if log:
        eig = torch.logspace(0.0, math.log10(cond), n, dtype=DT)
    else:
        eig = torch.linspace(1.0, cond, n, dtype=DT)
    return q @ torch.diag(eig) @ q.T


def _split_hvp(a: torch.Tensor, sizes: list[int]):
    """An HVP on a tuple of two blocks, to exercise multi-tensor code paths."""

    def hvp(u):
        flat = torch.cat([t.reshape(-1) for t in u])
        out = a @ flat
        return tuple(out.split(sizes))

    return hvp


def _reference_cg(
    a: torch.Tensor, b: torch.Tensor, maxiter: int, tol: float = 0.0, x0: torch.Tensor | None = None
) -> tuple[np.ndarray, int, str]:
    """Textbook dense CG in NumPy: ``(x_k, matrix-vector products, why it stopped)``.

    Same stopping rules as documented for ``hg.CG``: ``maxiter`` counts products (the one for the
    initial residual of ``x0`` included), tol is relative to ``||b||``, stop on ``p^T A p <= 0``.
    """
    am, bv = a.numpy(), b.numpy()
    x = np.zeros_like(bv) if x0 is None else x0.numpy().copy()
    products = 0
    r = bv.copy()
    if x0 is not None:
        r = bv - am @ x
        products += 1
    p = r.copy()
    rs = float(r @ r)
    stop = tol**2 * float(bv @ bv)
    while True:
        if rs <= stop:
            return x, products, "converged"
        if products >= maxiter:
            return x, products, "max_iterations"
        ap = am @ p
        products += 1
        pap = float(p @ ap)
        if pap <= 0:
            return x, products, "nonpositive_curvature"
        step = rs / pap
        x = x + step * p
        r = r - step * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new


def _rel(x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x.numpy() - ref) / max(np.linalg.norm(ref), 1e-300))


def _indefinite(n: int = 30, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.linspace(-1.0, 3.0, n, dtype=DT)) @ q.T


@pytest.mark.parametrize("solver", [hg.CG(maxiter=30, tol=1e-13), hg.Neumann(steps=400, alpha=0.1)])
def test_solvers_match_dense_solve(solver: hg.LinearSolver) -> None:
    a = _spd(12, 8.0)
    b = torch.randn(12, dtype=DT)
    res = solver.solve(_split_hvp(a, [5, 7]), tuple(b.split([5, 7])))
    x = torch.cat(res.solution)
    exact = torch.linalg.solve(a, b)
    assert float((x - exact).norm() / exact.norm()) < 1e-10
    assert float(res.residual) < 1e-9


def test_cg_damping_solves_shifted_system() -> None:
    a = _spd(6, 3.0)
    b = torch.randn(6, dtype=DT)
    res = hg.CG(maxiter=20, tol=1e-14, damping=0.7).solve(lambda u: (a @ u[0],), (b,))
    exact = torch.linalg.solve(a + 0.7 * torch.eye(6, dtype=DT), b)
    assert torch.allclose(res.solution[0], exact, rtol=1e-11, atol=1e-13)


def test_cg_stops_on_negative_curvature() -> None:
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    res = hg.CG(maxiter=10).solve(lambda u: (a @ u[0],), (torch.tensor([0.0, 1.0], dtype=DT),))
    assert res.iterations == 1
    assert res.status is SolveStatus.NONPOSITIVE_CURVATURE
    assert torch.equal(res.solution[0], torch.zeros(2, dtype=DT))  # the iterate so far: x = 0
    assert float(res.residual) == pytest.approx(1.0)


def test_neumann_equals_its_series() -> None:
    a = _spd(5, 4.0)
    v = torch.randn(5, dtype=DT)
    alpha, steps = 0.2, 7
    res = hg.Neumann(steps=steps, alpha=alpha).solve(lambda u: (a @ u[0],), (v,))
    m = torch.eye(5, dtype=DT) - alpha * a
    series = alpha * sum(torch.linalg.matrix_power(m, j) @ v for j in range(steps + 1))
    assert torch.allclose(res.solution[0], series, rtol=1e-13, atol=1e-14)
    assert res.iterations == steps
    assert res.status is SolveStatus.FIXED
    assert float(res.residual) == pytest.approx(
        float((torch.linalg.matrix_power(m, steps) @ v).norm() / v.norm()), rel=1e-10
    )


def test_identity_is_scaled_copy() -> None:
    v = (torch.randn(3, dtype=DT),)
    res = hg.Identity(scale=2.0).solve(lambda u: pytest.fail("no HVP expected"), v)
    assert torch.equal(res.solution[0], 2 * v[0])
    assert res.iterations == 0
    assert res.status is SolveStatus.FIXED


def _ridge_errors() -> dict[str, float]:
    """Relative hypergradient errors on ridge regression (condition number 6.7) at the optimum."""
    p = ht.ridge(n_train=200, n_features=40, cond=6.7)
    p.solve_inner()
    exact = p.exact_hypergradient()[0]
    lam_max = float(torch.linalg.eigvalsh(p.hessian()).max())
    errs = {}
    solvers: dict[str, hg.LinearSolver] = {"identity": hg.Identity()}
    for i in (1, 5, 20, 100):
        solvers[f"neumann{i}"] = hg.Neumann(steps=i, alpha=1.0 / lam_max)
    for k in (1, 5, 10, 20):
        solvers[f"cg{k}"] = hg.CG(maxiter=k, tol=0.0)
    w = list(p.model.parameters())
    h = list(p.hparams.parameters())
    for name, s in solvers.items():
        g, _, _ = hg.implicit_hypergradient(
            lambda: p.train_loss(p.model, p.hparams, p.train_batch),
            lambda: p.val_loss(p.model, p.hparams, p.val_batch),
            w,
            h,
            s,
        )
        errs[name] = float((g[0] - exact).norm() / exact.norm())
    return errs


def test_convergence_shapes_match_grazzi() -> None:
    e = _ridge_errors()
    # identity is a poor approximation; Neumann decays geometrically at rate ~(1 - 1/kappa);
    # CG much faster. (Grazzi et al.: identity .67; Neumann 1/5/20/100: .47/.15/7.6e-3/1.2e-8;
    # CG 1/5/10/20: .23/7.5e-3/8e-5/7e-9.)
    assert 0.2 < e["identity"] < 3.0
    assert e["neumann1"] > e["neumann5"] > e["neumann20"] > e["neumann100"]
    assert 1e-2 < e["neumann5"] < 0.6
    assert 1e-4 < e["neumann20"] < 0.1
    assert e["neumann100"] < 1e-6
    rate = (e["neumann100"] / e["neumann20"]) ** (1 / 80)
    assert abs(rate - (1 - 1 / 6.7)) < 0.03
    assert e["cg1"] > e["cg5"] > e["cg10"]
    assert e["cg5"] < e["neumann5"] and e["cg10"] < 1e-3
    assert e["cg20"] < 1e-6


@pytest.mark.parametrize(
    "make",
    [
        lambda: hg.Neumann(steps=-1),
        lambda: hg.Neumann(steps=True),
        lambda: hg.Neumann(steps=False),
        lambda: hg.Neumann(steps=2.0),
        lambda: hg.Neumann(warm_start=1),
        lambda: hg.CG(maxiter=True),
        lambda: hg.CG(warm_start="yes"),
        lambda: hg.Neumann(alpha=0.0),
        lambda: hg.Neumann(alpha=math.nan),
        lambda: hg.CG(maxiter=0),
        lambda: hg.CG(tol=-1.0),
        lambda: hg.CG(damping=-0.1),
        lambda: hg.Identity(scale=0.0),
    ],
)
def test_invalid_solver_arguments(make) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        make()


def test_neumann_without_alpha_explains() -> None:
    with pytest.raises(ValueError, match="alpha"):
        hg.Neumann().solve(lambda u: u, (torch.ones(1),))


def test_cg_on_an_indefinite_system_returns_the_iterate_before_nonpositive_curvature() -> None:
    """Truncated CG: the iterate so far and its true residual (which may exceed ||v||)."""
    a = _indefinite()
    stopped_late = 0
    for seed in range(20):
        b = torch.randn(30, generator=torch.Generator().manual_seed(seed), dtype=DT)
        res = hg.CG(maxiter=30, tol=0.0).solve(lambda u: (a @ u[0],), (b,))
        ref, products, why = _reference_cg(a, b, 30)
        assert why == "nonpositive_curvature" and res.status is SolveStatus.NONPOSITIVE_CURVATURE
        assert res.iterations == products
        assert _rel(res.solution[0], ref) < 1e-10
        true = float((a @ res.solution[0] - b).norm() / b.norm())
        assert true == pytest.approx(float(res.residual), rel=1e-8, abs=1e-12)
        stopped_late += products > 1
    assert stopped_late > 10  # most stop after some progress, not at x = 0


@pytest.mark.parametrize("system", ["diag-ones", "diag-10-1", "kappa1e4"])
def test_cg_returns_every_textbook_iterate(system: str) -> None:
    """hg.CG(maxiter=k) is x_k of textbook CG for each k (not the smallest-residual iterate)."""
    if system == "kappa1e4":
        a = _spd(200, 1e4, seed=3, log=True)
        b = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=DT)
    else:
        a = torch.diag(torch.tensor([1.0, 100.0], dtype=DT))
        b = torch.ones(2, dtype=DT) if system == "diag-ones" else torch.tensor([10.0, 1.0], dtype=DT)
    for k in range(1, 31):
        res = hg.CG(maxiter=k, tol=1e-12).solve(lambda u: (a @ u[0],), (b,))
        ref, products, why = _reference_cg(a, b, k, tol=1e-12)
        assert res.iterations == products and res.status.value == why
        assert _rel(res.solution[0], ref) < 1e-10, k
        true = float((a @ res.solution[0] - b).norm() / b.norm())
        assert float(res.residual) == pytest.approx(true, rel=1e-6, abs=1e-13)


def test_cg_first_iterate_on_diag_1_100() -> None:
    a = torch.diag(torch.tensor([1.0, 100.0], dtype=DT))
    for b in (torch.ones(2, dtype=DT), torch.tensor([10.0, 1.0], dtype=DT)):
        res = hg.CG(maxiter=1).solve(lambda u: (a @ u[0],), (b,))
        step = float(b @ b) / float(b @ a @ b)  # x_1 = (r.r / p.Ap) v
        assert torch.allclose(res.solution[0], step * b, rtol=1e-14, atol=0)
        assert res.status is SolveStatus.MAX_ITERATIONS
        true = float((a @ res.solution[0] - b).norm() / b.norm())
        assert float(res.residual) == pytest.approx(true, rel=1e-12)
    assert float(res.residual) > 1.0  # for v = (10, 1) x_1 has a residual above ||v||: not x = 0


def test_cg_ill_conditioned_makes_progress() -> None:
    """kappa = 1e4, 20 iterations: a nonzero x_20, closer to the solution in the A-norm than 0."""
    a = _spd(200, 1e4, seed=3, log=True)
    for seed in range(5):
        b = torch.randn(200, generator=torch.Generator().manual_seed(10 + seed), dtype=DT)
        res = hg.CG(maxiter=20).solve(lambda u: (a @ u[0],), (b,))
        x = res.solution[0]
        assert res.status is SolveStatus.MAX_ITERATIONS and res.iterations == 20
        assert float(x.norm()) > 0.5  # ||x*|| is 2.6 to 4.3; the old code returned 0
        exact = torch.linalg.solve(a, b)
        # CG minimises the A-norm error over the Krylov space: monotone, unlike the residual
        err0, err20 = exact, exact - x
        assert float(err20 @ a @ err20) < 0.75 * float(err0 @ a @ err0)  # 0.45 to 0.6


def test_cg_status_converged() -> None:
    a = _spd(12, 8.0)
    b = torch.randn(12, dtype=DT)
    res = hg.CG(maxiter=50, tol=1e-8).solve(_split_hvp(a, [5, 7]), tuple(b.split([5, 7])))
    assert res.status is SolveStatus.CONVERGED and res.status == "converged"
    assert res.iterations < 50
    true = float((a @ torch.cat(res.solution) - b).norm() / b.norm())
    assert float(res.residual) <= 1e-8 and true < 2e-8


def test_cg_nonfinite_hvp_poisons_the_solution() -> None:
    a = _spd(6, 3.0)
    b = torch.randn(6, dtype=DT)
    calls = []

    def hvp(u):  # NaN from the third product on: after some progress, still no partial answer
        calls.append(1)
        out = a @ u[0]
        return (out * math.nan,) if len(calls) >= 3 else (out,)

    for solver in (hg.CG(maxiter=10, tol=0.0), hg.CG(maxiter=10, tol=0.0, damping=0.5)):
        calls.clear()
        res = solver.solve(hvp, (b,))
        assert res.status is SolveStatus.NONFINITE
        assert res.iterations == 3
        assert torch.all(torch.isnan(res.solution[0])) and math.isnan(float(res.residual))


def test_cg_nonfinite_right_hand_side_poisons_the_solution() -> None:
    b = torch.tensor([1.0, math.nan], dtype=DT)
    res = hg.CG(maxiter=5).solve(lambda u: (2 * u[0],), (b,))
    assert res.status is SolveStatus.NONFINITE
    assert torch.all(torch.isnan(res.solution[0]))
    res = hg.CG(maxiter=5).solve(lambda u: (u[0] * math.inf,), (torch.ones(2, dtype=DT),), x0=(b.clone(),))
    assert res.status is SolveStatus.NONFINITE and torch.all(torch.isnan(res.solution[0]))


def test_cg_zero_right_hand_side() -> None:
    res = hg.CG(maxiter=5).solve(lambda u: (2 * u[0],), (torch.zeros(3, dtype=DT),))
    assert res.status is SolveStatus.CONVERGED and res.iterations == 0
    assert torch.equal(res.solution[0], torch.zeros(3, dtype=DT)) and float(res.residual) == 0.0


def test_cg_warm_start_from_the_solution_stops_at_once() -> None:
    a = _spd(12, 8.0)
    b = torch.randn(12, dtype=DT)
    exact = torch.linalg.solve(a, b)
    x0 = tuple(exact.split([5, 7]))
    res = hg.CG(maxiter=10).solve(_split_hvp(a, [5, 7]), tuple(b.split([5, 7])), x0=x0)
    assert res.status is SolveStatus.CONVERGED
    assert res.iterations == 1  # the product for r0 = v - H x0
    assert float(res.residual) < 1e-13
    assert torch.equal(torch.cat(res.solution), exact)


@pytest.mark.parametrize("damping", [0.0, 2.0])
def test_cg_warm_start_matches_reference_and_saves_iterations(damping: float) -> None:
    a = _spd(200, 1e4, seed=3, log=True)
    b = torch.randn(200, generator=torch.Generator().manual_seed(5), dtype=DT)
    ad = a + damping * torch.eye(200, dtype=DT)
    exact = torch.linalg.solve(ad, b)
    x0 = exact + 1e-3 * exact.norm() / math.sqrt(200) * torch.randn(
        200, generator=torch.Generator().manual_seed(6), dtype=DT
    )
    for k in range(1, 31):
        res = hg.CG(maxiter=k, tol=0.0, damping=damping).solve(lambda u: (a @ u[0],), (b,), x0=(x0,))
        ref, products, why = _reference_cg(ad, b, k, x0=x0)
        assert res.iterations == products == k and res.status.value == why
        assert _rel(res.solution[0], ref) < 1e-10, k
    solver = hg.CG(maxiter=2000, tol=1e-6, damping=damping)
    cold = solver.solve(lambda u: (a @ u[0],), (b,))
    warm = solver.solve(lambda u: (a @ u[0],), (b,), x0=(x0,))
    assert cold.status is warm.status is SolveStatus.CONVERGED
    assert warm.iterations < cold.iterations
    for res in (cold, warm):
        true = float((ad @ res.solution[0] - b).norm() / b.norm())
        assert float(res.residual) <= 1e-6 and true < 2e-6


def test_cg_warm_start_counts_the_residual_product_against_maxiter() -> None:
    a = _spd(12, 8.0)
    b = torch.randn(12, dtype=DT)
    x0 = torch.randn(12, dtype=DT)
    res = hg.CG(maxiter=1).solve(lambda u: (a @ u[0],), (b,), x0=(x0,))
    assert res.iterations == 1 and res.status is SolveStatus.MAX_ITERATIONS
    assert torch.equal(res.solution[0], x0)
    true = float((a @ x0 - b).norm() / b.norm())
    assert float(res.residual) == pytest.approx(true, rel=1e-12)


def test_neumann_warm_start_is_richardson() -> None:
    a = _spd(7, 4.0)
    v = torch.randn(7, dtype=DT)
    x0 = torch.randn(7, dtype=DT)
    alpha, steps = 0.2, 9
    am, vn = a.numpy(), v.numpy()

    def richardson(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        r = vn - am @ x
        for _ in range(n):
            r = vn - am @ x
            x = x + alpha * r
        return x, r

    res = hg.Neumann(steps=steps, alpha=alpha).solve(
        _split_hvp(a, [3, 4]), tuple(v.split([3, 4])), x0=x0.split([3, 4])
    )
    x, r = richardson(x0.numpy(), steps)
    assert _rel(torch.cat(res.solution), x) < 1e-13
    assert res.iterations == steps and res.status is SolveStatus.FIXED
    assert float(res.residual) == pytest.approx(np.linalg.norm(r) / np.linalg.norm(vn), rel=1e-10)
    # from 0, `steps` terms are steps + 1 Richardson iterations (the first, alpha v, is free)
    cold = hg.Neumann(steps=steps, alpha=alpha).solve(lambda u: (a @ u[0],), (v,))
    assert _rel(cold.solution[0], richardson(np.zeros(7), steps + 1)[0]) < 1e-13
    zero = hg.Neumann(steps=steps, alpha=alpha).solve(
        lambda u: (a @ u[0],), (v,), x0=(torch.zeros(7, dtype=DT),)
    )
    assert _rel(zero.solution[0], richardson(np.zeros(7), steps)[0]) < 1e-13


def test_neumann_warm_start_with_zero_steps_returns_x0() -> None:
    x0 = torch.randn(3, dtype=DT)
    res = hg.Neumann(steps=0, alpha=0.5).solve(
        lambda u: pytest.fail("no HVP expected"), (torch.ones(3, dtype=DT),), x0=(x0,)
    )
    assert torch.equal(res.solution[0], x0) and res.solution[0] is not x0
    assert res.iterations == 0 and math.isnan(float(res.residual))


@pytest.mark.parametrize(
    "solver", [hg.CG(maxiter=5, damping=0.3), hg.Neumann(steps=4, alpha=0.1), hg.Identity(scale=2.0)]
)
def test_x0_is_neither_mutated_nor_aliased(solver: hg.LinearSolver) -> None:
    a = _spd(6, 3.0)
    b = torch.randn(6, dtype=DT)
    x0 = (torch.randn(6, dtype=DT),)
    before = x0[0].clone()
    res = solver.solve(lambda u: (a @ u[0],), (b,), x0=x0)
    assert torch.equal(x0[0], before)
    assert res.solution[0].data_ptr() != x0[0].data_ptr()
    res.solution[0].add_(1.0)  # writing to the result does not reach x0
    assert torch.equal(x0[0], before)


def test_identity_ignores_x0() -> None:
    v = (torch.randn(3, dtype=DT),)
    res = hg.Identity(scale=3.0).solve(lambda u: u, v, x0=(torch.randn(3, dtype=DT),))
    assert torch.equal(res.solution[0], 3.0 * v[0])


@pytest.mark.parametrize("solver", [hg.CG(), hg.Neumann(alpha=0.1)])
def test_x0_must_be_shaped_like_v(solver: hg.LinearSolver) -> None:
    v = (torch.ones(3, dtype=DT), torch.ones(2, dtype=DT))
    for x0 in ((torch.ones(3, dtype=DT),), (torch.ones(3, dtype=DT), torch.ones(3, dtype=DT))):
        with pytest.raises(ValueError, match="x0 must be shaped like v"):
            solver.solve(lambda u: tuple(u), v, x0=x0)


def test_warm_start_flag() -> None:
    assert hg.CG(warm_start=True).warm_start is True and hg.CG().warm_start is False
    assert hg.Neumann(warm_start=True).warm_start is True and hg.Neumann().warm_start is False
    assert hg.Identity().warm_start is False  # the base class default


def test_direct_solves_spd_indefinite_and_singular_systems() -> None:
    # positive definite: Cholesky, the exact solution, P HVPs, over several blocks
    a = _spd(12, 1e6, log=True)
    b = torch.randn(12, dtype=DT)
    res = hg.Direct().solve(_split_hvp(a, [5, 7]), tuple(b.split([5, 7])))
    exact = torch.linalg.solve(a, b)
    assert _rel(torch.cat(res.solution), exact.numpy()) < 1e-8
    assert res.iterations == 12 and res.status is SolveStatus.CONVERGED and float(res.residual) < 1e-9
    # damping shifts the system
    res = hg.Direct(damping=0.7).solve(lambda u: (a @ u[0],), (b,))
    assert _rel(res.solution[0], torch.linalg.solve(a + 0.7 * torch.eye(12, dtype=DT), b).numpy()) < 1e-10
    # indefinite: LU gives H^-1 v, flagged
    c = _indefinite()
    bc = torch.randn(30, dtype=DT)
    res = hg.Direct().solve(lambda u: (c @ u[0],), (bc,))
    assert res.status is SolveStatus.NONPOSITIVE_CURVATURE
    assert _rel(res.solution[0], torch.linalg.solve(c, bc).numpy()) < 1e-9
    # singular: the minimum-norm least-squares solution
    s = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=DT))
    res = hg.Direct().solve(lambda u: (s @ u[0],), (torch.tensor([1.0, 1.0, 1.0], dtype=DT),))
    assert res.status is SolveStatus.NONPOSITIVE_CURVATURE
    torch.testing.assert_close(res.solution[0], torch.tensor([0.5, 1.0, 0.0], dtype=DT))
    assert float(res.residual) == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    # non-finite HVPs: NaN, said so
    res = hg.Direct().solve(lambda u: (u[0] * math.nan,), (torch.ones(2, dtype=DT),))
    assert res.status is SolveStatus.NONFINITE and bool(res.solution[0].isnan().all())


def test_direct_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="max_size=4"):
        hg.Direct(max_size=4).solve(lambda u: u, (torch.ones(5, dtype=DT),))
    with pytest.raises(ValueError, match="real systems"):
        hg.Direct().solve(lambda u: u, (torch.ones(2, dtype=torch.complex128),))
    bads = (lambda: hg.Direct(damping=-1.0), lambda: hg.Direct(max_size=0), lambda: hg.Direct(max_size=True))
    for bad in bads:
        with pytest.raises(ValueError, match="Invalid Direct"):
            bad()


def test_solver_settings_from_sweep_configs() -> None:
    """Settings arrive from sweep configs as NumPy scalars or strings: NumPy numbers are taken
    (as Python ones), anything else is refused by name, never a raw TypeError."""
    cg = hg.CG(maxiter=np.int64(7), tol=np.float32(1e-6), damping=np.float64(0.1))
    assert (cg.maxiter, type(cg.maxiter), type(cg.tol), type(cg.damping)) == (7, int, float, float)
    assert hg.Neumann(steps=np.int32(3), alpha=np.float64(0.5)).steps == 3
    assert hg.Direct(max_size=np.int64(9)).max_size == 9
    for bad in (
        lambda: hg.CG(tol="1e-3"),
        lambda: hg.CG(damping=None),
        lambda: hg.Neumann(steps="5"),
        lambda: hg.Identity(scale=True),
        lambda: hg.Identity(scale=math.inf),
    ):
        with pytest.raises(ValueError, match="Invalid"):
            bad()


def test_warm_neumann_says_when_its_iterate_is_worse_than_zero() -> None:
    a = _spd(6, 4.0)
    b = torch.randn(6, dtype=DT)
    exact = torch.linalg.solve(a, b)
    good = hg.Neumann(steps=3, alpha=0.2).solve(lambda u: (a @ u[0],), (b,), x0=(exact + 1e-3,))
    assert good.status is SolveStatus.FIXED and float(good.residual) < 1
    c = _indefinite(6)
    bad = hg.Neumann(steps=3, alpha=1.0).solve(lambda u: (c @ u[0],), (b,), x0=(10 * b,))
    assert bad.status is SolveStatus.DIVERGING and float(bad.residual) > 1


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-25),  # squares underflow in float32
        (torch.float32, 1e21),  # squares overflow in float32
        (torch.float32, 1.0),
        (torch.bfloat16, 1e30),
        (torch.float16, 100.0),  # squares overflow float16's 65504
        (torch.float64, 1e-170),
        (torch.float64, 1e170),
        (torch.complex64, 1e-25),
    ],
)
def test_solver_norm_is_accurate_across_dtypes_and_extreme_scales(dtype, scale):
    """The norm the solvers use for their residuals and divergence tests: within rounding of the
    float64 (or exact-scaling) reference at any scale the dtype holds, NaN for a NaN entry."""
    from hypergrad._solvers import _scaled_norm

    g = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(300, 7, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    ]
    ts = [(p * scale).to(dtype) for p in parts]
    wide = torch.complex128 if dtype.is_complex else torch.float64
    ref = math.sqrt(sum(float((t.to(wide) / scale).abs().pow(2).sum()) for t in ts)) * scale
    got = float(_scaled_norm(ts))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got == pytest.approx(ref, rel=tol)
    ts[1][2] = float("nan")
    assert math.isnan(float(_scaled_norm(ts)))
    assert float(_scaled_norm([torch.zeros(3, dtype=dtype)])) == 0.0
