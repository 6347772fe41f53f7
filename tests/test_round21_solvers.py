"""Round 21, helper "solvers": Implicit's linear solvers and options in depth.

Each hypergradient is checked in float64 against a dense IFT reference (``torch.func.hessian`` of
the training loss, the solve by ``torch.linalg``) or a closed form.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergrad as hg
from hypergrad._solvers import SolveStatus

D = torch.float64


# --------------------------------------------------------------------------------------------
# CG: an entry of H p that is 0 by cancellation is no zero row of H
# --------------------------------------------------------------------------------------------

A_PD = torch.tensor([[2.0, -1.0], [-1.0, 2.0]], dtype=D)  # positive definite (eigenvalues 1, 3)
V_CANCEL = torch.tensor([1.0, 2.0], dtype=D)  # A_PD @ V_CANCEL = (0, 3): entry 0 is 2 - 2 = 0


def test_cg_cancelled_hvp_entry_is_not_a_zero_row() -> None:
    r = hg.CG(maxiter=10, tol=1e-12).solve(lambda u: (A_PD @ u[0],), (V_CANCEL,))
    exact = torch.linalg.solve(A_PD, V_CANCEL)  # (4/3, 5/3)
    torch.testing.assert_close(r.solution[0], exact, rtol=1e-10, atol=1e-12)
    assert r.status is SolveStatus.CONVERGED
    assert float(r.residual) <= 1e-12


def test_implicit_cg_hypergradient_with_cancelled_hvp_entry() -> None:
    # L_T = 1/2 w'Aw - lam'w  =>  w* = A^-1 lam;  L_V = c'w  =>  dL_V/dlam = A^-1 c (closed form)
    w = torch.zeros(2, dtype=D, requires_grad=True)
    lam = torch.tensor([0.3, -0.2], dtype=D, requires_grad=True)
    g, _, res = hg.implicit_hypergradient(
        lambda: 0.5 * w @ (A_PD @ w) - lam @ w,
        lambda: V_CANCEL @ w,
        [w],
        [lam],
        hg.CG(maxiter=10, tol=1e-12),
    )
    torch.testing.assert_close(g[0], torch.linalg.solve(A_PD, V_CANCEL), rtol=1e-10, atol=1e-12)
    assert res.status is SolveStatus.CONVERGED


def test_cg_genuine_zero_rows_still_least_squares_next_to_a_cancelled_entry() -> None:
    """(Passes on the current code; guards the fix:) a genuinely zero row (a weight no training
    term reaches) next to the PD block keeps round 19's least-squares treatment: its entry 0, the
    rest the exact solve of the PD block, status nonpositive_curvature."""
    H = torch.zeros(3, 3, dtype=D)
    H[:2, :2] = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    v = torch.tensor([1.0, -1.0, 4.0], dtype=D)
    r = hg.CG(maxiter=10, tol=1e-12).solve(lambda u: (H @ u[0],), (v,))
    expect = torch.cat([torch.linalg.solve(H[:2, :2], v[:2]), torch.zeros(1, dtype=D)])
    torch.testing.assert_close(r.solution[0], expect, rtol=1e-10, atol=1e-12)
    assert r.status is SolveStatus.NONPOSITIVE_CURVATURE
    torch.testing.assert_close(float(r.residual), 4.0 / float(v.norm()), rtol=1e-10, atol=0.0)


# --------------------------------------------------------------------------------------------
# Neumann(alpha=None): the fall-back from the learning rate to a kept power estimate
# --------------------------------------------------------------------------------------------


def _sse_problem(alpha: object, steps: int = 40, warm_start: bool = False) -> tuple:
    torch.manual_seed(0)
    X = torch.randn(16, 3, dtype=D)
    Y = torch.randn(16, 1, dtype=D)
    val = (torch.randn(8, 3, dtype=D), torch.randn(8, 1, dtype=D))
    sse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).sum()  # noqa: E731 (summed: curvature grows with the batch)
    mse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    tl = lambda m, h, b: sse(m, h, b) + h.penalty(m)  # noqa: E731
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1, dtype=D)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.5)

    def make(solver: hg.LinearSolver) -> hg.Implicit:
        return hg.Implicit(
            model,
            hp,
            tl,
            mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=solver,
        )

    return make(hg.Neumann(steps=steps, alpha=alpha, warm_start=warm_start)), make(hg.Direct()), (X, Y), val


@pytest.mark.parametrize("warm_start", [False, True])
def test_neumann_default_alpha_refreshes_a_stale_kept_estimate(warm_start: bool) -> None:
    ho, ref, (X, Y), val = _sse_problem(None, warm_start=warm_start)
    # hyperstep 1: lr * lambda_max = 2.2 on this batch: the series at lr grows, the default
    # falls back to power iteration (estimate kept)
    info = ho.hyper_step((X, Y), val)
    assert info.solver_status == "fixed"
    # hyperstep 2: the same batch 4 times under a summed loss, curvature x4: the lr series and
    # the kept estimate's both grow (alpha * lambda_max = 4); alpha='power' re-estimates here
    big = (X.repeat(4, 1), Y.repeat(4, 1))
    g_ref, _ = ref.hypergradient(big, val)
    g, info = ho.hypergradient(big, val)
    assert info.solver_status == "fixed", info
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-5, atol=0.0)


def test_neumann_power_alpha_refreshes_a_stale_kept_estimate() -> None:
    """(Passes: the reference behaviour that the default should match.)"""
    ho, ref, (X, Y), val = _sse_problem("power")
    ho.hyper_step((X, Y), val)
    big = (X.repeat(4, 1), Y.repeat(4, 1))
    g_ref, _ = ref.hypergradient(big, val)
    g, info = ho.hypergradient(big, val)
    assert info.solver_status == "fixed"
    assert info.solver_iterations == 40 + 20 + 40  # series at the kept estimate, a fresh estimate, series
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-5, atol=0.0)


# --------------------------------------------------------------------------------------------
# Neumann with many terms on an indefinite Hessian: the stale-step-size check itself
# --------------------------------------------------------------------------------------------


def _indefinite_quadratic(solver: hg.LinearSolver) -> hg.Implicit:
    """L_T = 1/2 w'diag(1, -0.2)w + d/2 |w|^2 with d = 0.1: H = diag(1.1, -0.1), indefinite."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False, dtype=D)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1)
    curv = torch.tensor([[1.0, -0.2]], dtype=D)
    return hg.Implicit(
        model,
        hp,
        lambda m, h, b: 0.5 * (curv * m.weight**2).sum() + h.penalty(m),
        lambda m, h, b: (m.weight * torch.tensor([[1.0, 2.0]], dtype=D)).sum(),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver,
    )


def test_neumann_many_steps_diverging_series_reports_instead_of_overflowing() -> None:
    ho = _indefinite_quadratic(hg.Neumann(steps=1100, alpha="power"))
    batch = (torch.zeros(1, 2, dtype=D), torch.zeros(1, 1, dtype=D))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g, info = ho.hypergradient(batch, batch)
    # the series diverges along the eigenvalue -0.1 (factor 1 + 0.1/1.1 per term): said so
    assert info.solver_status == "diverging"
    assert info.solver_iterations == 20 + 1100  # power iteration, the series (grew 1.09 < 2 per term)


# --------------------------------------------------------------------------------------------
# hessian_subset against a dense reference with the same restriction (passes on current code)
# --------------------------------------------------------------------------------------------


class _Both(torch.nn.Module):
    """Model and hyperparameters under one module, for torch.func.functional_call."""

    def __init__(self, model: torch.nn.Module, hp: torch.nn.Module, loss) -> None:
        super().__init__()
        self.m, self.h, self.loss = model, hp, loss

    def forward(self, batch):  # type: ignore[no-untyped-def]
        return self.loss(self.m, self.h, batch)


def _dense_ift(model, hp, tl, vl, tb, vb, subset=None, decay=0.0, damping=0.0) -> torch.Tensor:
    r"""dL_V/dlam - d2L_T/dlam dw_S (H_SS + (decay + damping) I)^{-1} dL_V/dw_S, w_F held fixed."""
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # (torch.func.hessian: torch warns once when forward AD loads)
    names = [n for n, _ in model.named_parameters() if subset is None or subset(n)]
    fixed = {f"m.{n}": p.detach() for n, p in model.named_parameters()}
    hnames = [n for n, _ in hp.named_parameters()]
    ws = [dict(model.named_parameters())[n].detach() for n in names]
    hs = [dict(hp.named_parameters())[n].detach() for n in hnames]
    sizes, hsizes = [w.numel() for w in ws], [h.numel() for h in hs]

    def call(loss, x, y, batch):  # type: ignore[no-untyped-def]
        params = dict(fixed)
        params.update({f"m.{n}": t.view_as(w) for n, t, w in zip(names, x.split(sizes), ws, strict=True)})
        params.update({f"h.{n}": t.view_as(h) for n, t, h in zip(hnames, y.split(hsizes), hs, strict=True)})
        return torch.func.functional_call(_Both(model, hp, loss), params, (batch,))

    x = torch.cat([w.reshape(-1) for w in ws])
    y = torch.cat([h.reshape(-1) for h in hs])
    lt = lambda x, y: call(tl, x, y, tb)  # noqa: E731
    lv = lambda x, y: call(vl, x, y, vb)  # noqa: E731
    H = torch.func.hessian(lt, argnums=0)(x, y) + (decay + damping) * torch.eye(len(x), dtype=x.dtype)
    mixed = torch.func.jacrev(torch.func.grad(lt, argnums=0), argnums=1)(x, y)  # (P_S, n_hparams)
    gx, gy = torch.func.grad(lv, argnums=(0, 1))(x, y)
    return gy - mixed.T @ torch.linalg.solve(H, gx)


class _ThreeKinds(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.scale = hg.hparams.Hparam(torch.full((3,), 0.8, dtype=D), "positive")
        self.ew = hg.hparams.ExampleWeights(n, init=0.6, dtype=D)
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.3, max=2.0)


def _three_kinds_train_loss(m, h, b):  # type: ignore[no-untyped-def]
    x, y, i = b
    per = ((m(x * h.scale()) - y) ** 2).squeeze(1)
    return (h.ew(i) * per).mean() + h.wd.penalty(m)


def _mse(m, h, b):  # type: ignore[no-untyped-def]
    return ((m(b[0]) - b[1]) ** 2).mean()


@pytest.mark.parametrize(
    "subset",
    [None, lambda n: n.startswith("4."), lambda n: n.endswith("weight")],
    ids=["all", "head", "weights_only"],
)
@pytest.mark.parametrize(
    "solver", [hg.Direct(damping=2.0), hg.CG(maxiter=200, tol=1e-13, damping=2.0)], ids=repr
)
def test_hessian_subset_matches_dense_restricted_ift(subset, solver) -> None:  # type: ignore[no-untyped-def]
    """Covers what earlier rounds did not combine: a ReLU + tanh network (weights of the subset
    feed on weights outside it), three hyperparameter kinds at once (an input scale reaching
    the subset only through the fixed layers, per-example weights, bounded per-layer decays),
    Adam's coupled weight_decay and solver damping, against torch.func.hessian restricted to
    the subset with the rest held fixed (the documented approximation)."""
    torch.manual_seed(0)
    X, Y = torch.randn(12, 3, dtype=D), torch.randn(12, 1, dtype=D)
    val = (torch.randn(9, 3, dtype=D), torch.randn(9, 1, dtype=D))
    tb = (X, Y, torch.arange(12))
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    ).to(D)
    hp = _ThreeKinds(model, 12)
    ho = hg.Implicit(
        model,
        hp,
        _three_kinds_train_loss,
        _mse,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=solver,
        hessian_subset=subset,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (decays of layers outside the subset: disconnected, 0)
        g, info = ho.hypergradient(tb, val)
    ref = _dense_ift(model, hp, _three_kinds_train_loss, _mse, tb, val, subset, decay=0.1, damping=2.0)
    got = torch.cat([t.reshape(-1) for t in g])
    assert info.solver_status == "converged"
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Neumann(alpha="lr") with hessian_subset and param groups at different rates
# --------------------------------------------------------------------------------------------


def _two_rate_problem(solver: hg.LinearSolver) -> tuple:
    torch.manual_seed(0)
    X, Y = torch.randn(20, 3, dtype=D), torch.randn(20, 1, dtype=D)
    val = (torch.randn(9, 3, dtype=D), torch.randn(9, 1, dtype=D))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(D)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.3, include=lambda n: n.startswith("2."))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[2].parameters(), "lr": 0.3}]
    )
    ho = hg.Implicit(
        model,
        hp,
        lambda m, h, b: _mse(m, h, b) + h.penalty(m),
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver,
        hessian_subset=lambda n: n.startswith("2."),  # the head: all of it in the group at lr 0.3
    )
    return ho, (X, Y), val


def test_neumann_lr_alpha_uses_the_rate_of_the_solved_weights() -> None:
    ho, tb, val = _two_rate_problem(hg.Neumann(steps=20, alpha="lr"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, _ = ho.hypergradient(tb, val)
    same, _ = _two_rate_problem(hg.Neumann(steps=20, alpha=0.3))[0].hypergradient(tb, val)
    exact, _ = _two_rate_problem(hg.Direct())[0].hypergradient(tb, val)
    assert not [w for w in caught if "Neumann(alpha='lr')" in str(w.message)]
    torch.testing.assert_close(g[0], same[0], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(g[0], exact[0], rtol=0.05, atol=0.0)  # (20 terms: 3% truncation)


# --------------------------------------------------------------------------------------------
# mixed precisions in one solve: a half-precision body beside a float64 head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_neumann_solves_half_precision_beside_float64(low: torch.dtype) -> None:
    H = torch.diag(torch.tensor([2.0, 1.0, 4.0, 2.0, 1.0], dtype=D))

    def hvp(u):  # type: ignore[no-untyped-def]
        f = torch.cat([u[0].to(D), u[1]])
        o = H @ f
        return (o[:2].to(low), o[2:])

    v = (torch.tensor([1.0, -1.0]).to(low), torch.tensor([4.0, 1.0, -2.0], dtype=D))
    r = hg.Neumann(steps=60, alpha=0.25).solve(hvp, v)
    assert r.status is SolveStatus.FIXED
    x = torch.cat([r.solution[0].to(D), r.solution[1]])
    exact = torch.linalg.solve(H, torch.cat([v[0].to(D), v[1]]))
    torch.testing.assert_close(x, exact, rtol=1e-2, atol=1e-2)  # (half precision storage)
    assert r.solution[0].dtype == low and r.solution[1].dtype == D


# --------------------------------------------------------------------------------------------
# warm start with a solver that spends no iteration past it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "warm,cold",
    [
        (hg.Neumann(steps=0, alpha=0.1, warm_start=True), hg.Neumann(steps=0, alpha=0.1)),
        (hg.CG(maxiter=1, warm_start=True), hg.CG(maxiter=1)),
    ],
    ids=["neumann_steps0", "cg_maxiter1"],
)
def test_warm_start_without_iterations_does_not_return_the_previous_solution(warm, cold) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1, dtype=D)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.5)

    def make(solver):  # type: ignore[no-untyped-def]
        return hg.Implicit(
            model,
            hp,
            lambda m, h, b: _mse(m, h, b) + h.penalty(m),
            _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=solver,
        )

    ho, ref = make(warm), make(cold)
    torch.manual_seed(0)
    for _ in range(4):  # new batches each hyperstep (no outer or inner steps: same weights)
        tb = (torch.randn(10, 3, dtype=D), torch.randn(10, 1, dtype=D))
        vb = (torch.randn(10, 3, dtype=D), torch.randn(10, 1, dtype=D))
        g_cold, _ = ref.hypergradient(tb, vb)
        ho.hyper_step(tb, vb)
        # with no iteration to spend, the warm start can only be the answer of another batch;
        # the cold answer (alpha v1, one CG step) is what such a budget buys
        torch.testing.assert_close(hp.raw[0].grad, g_cold[0], rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------------------------
# truthful residuals and statuses across solvers (passes on current code)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_reported_residuals_are_the_documented_quantities(seed: int) -> None:
    """A property check over random small systems (two tensors, SPD / indefinite / singular /
    with an exactly-zero row, damping, warm starts), not covered as one before: CG's and
    Direct's residual is the true ||(H + dI)x - v|| / ||v|| of the returned x, a CG "converged"
    means it is within tol, CG never spends more than maxiter HVPs (warm start included), and a
    warm-started Neumann's residual is that of the iterate before its last correction."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(12):
        n1, n2 = (int(k) for k in torch.randint(1, 4, (2,), generator=gen))
        n = n1 + n2
        q = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=gen))[0]
        ev = torch.rand(n, dtype=D, generator=gen) * 3 + 0.1
        kind = trial % 4
        if kind == 1:
            ev[0] = -0.5
        if kind == 2:
            ev[0] = 0.0
        H = q @ torch.diag(ev) @ q.T
        if kind == 3:
            H[0, :] = 0
            H[:, 0] = 0
        H = 0.5 * (H + H.T)

        def hvp(u, H=H, n1=n1):  # type: ignore[no-untyped-def]
            o = H @ torch.cat([u[0], u[1]])
            return (o[:n1], o[n1:])

        v = (torch.randn(n1, dtype=D, generator=gen), torch.randn(n2, dtype=D, generator=gen))
        vf = torch.cat(v)
        x0 = None if trial % 3 == 0 else tuple(torch.randn(t.shape, dtype=D, generator=gen) for t in v)
        damping = 0.3 * (trial % 2)
        eye = torch.eye(n, dtype=D)
        for solver in (hg.CG(maxiter=1 + trial % 6, tol=1e-6, damping=damping), hg.Direct(damping=damping)):
            r = solver.solve(hvp, v, x0=x0)
            x = torch.cat(r.solution)
            true = float(((H + damping * eye) @ x - vf).norm() / vf.norm())
            assert float(r.residual) == pytest.approx(true, rel=1e-6, abs=1e-12), (seed, trial, solver)
            if isinstance(solver, hg.CG):
                assert r.iterations <= solver.maxiter
                if r.status is SolveStatus.CONVERGED:
                    assert true <= 1.01 * solver.tol
        if x0 is not None:
            steps = 1 + trial % 4
            r = hg.Neumann(steps=steps, alpha=0.2).solve(hvp, v, x0=x0)
            before = (
                x0 if steps == 1 else hg.Neumann(steps=steps - 1, alpha=0.2).solve(hvp, v, x0=x0).solution
            )
            true = float((H @ torch.cat(before) - vf).norm() / vf.norm())
            assert float(r.residual) == pytest.approx(true, rel=1e-10, abs=1e-14), (seed, trial)
