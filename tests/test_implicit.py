"""Implicit hypergradients proven against closed forms, dense solves and finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _implicit(p: ht.BilevelProblem, solver: hg.LinearSolver, lr: float = 0.1) -> hg.Implicit:
    return hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
        solver=solver,
    )


@pytest.mark.parametrize("make", [ht.ridge, ht.quadratic, ht.logistic])
def test_cg_matches_exact_hypergradient(make) -> None:
    p = make()
    p.solve_inner()
    hopt = _implicit(p, hg.CG(maxiter=100, tol=1e-14))
    info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    for h, exact in zip(p.hparams.parameters(), p.exact_hypergradient(), strict=True):
        assert h.grad is not None
        assert _rel(h.grad, exact) <= 1e-8
    assert info.solver_residual is not None and info.solver_residual < 1e-12
    assert info.outer_loss == pytest.approx(p.outer_objective(), rel=1e-12)


def test_logistic_hypergradient_matches_finite_differences() -> None:
    p = ht.logistic()
    p.solve_inner()
    hopt = _implicit(p, hg.CG(maxiter=100, tol=1e-14))
    hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    for h in p.hparams.parameters():
        fd = ht.central_difference(p.outer_objective, h, eps=1e-5)
        assert h.grad is not None
        assert _rel(h.grad, fd) < 1e-6


@pytest.mark.parametrize("i", [0, 1, 3, 8])
def test_neumann_i_terms_equals_unrolling_i_plus_1_sgd_steps_from_optimum(i: int) -> None:
    alpha = 0.15
    p = ht.ridge()
    p.solve_inner()
    imp = _implicit(p, hg.Neumann(steps=i, alpha=alpha), lr=alpha)
    imp.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    g_neumann = [h.grad.clone() for h in p.hparams.parameters()]  # type: ignore[union-attr]

    q = ht.ridge()  # a fresh copy of the same problem
    q.solve_inner()
    unr = hg.Unrolled(
        q.model,
        q.hparams,
        q.train_loss,
        q.val_loss,
        inner_optimizer=torch.optim.SGD(q.model.parameters(), lr=alpha),
        outer_optimizer=torch.optim.SGD(q.hparams.parameters(), lr=0.0),
        steps=i + 1,
    )
    for _ in range(i + 1):  # at the optimum these steps leave the weights where they are
        unr.step(q.train_batch)
    unr.hyper_step(val_batch=q.val_batch)
    for a, h in zip(g_neumann, q.hparams.parameters(), strict=True):
        assert h.grad is not None
        assert _rel(a, h.grad) < 1e-10


def test_neumann_alpha_follows_the_inner_learning_rate() -> None:
    grads = {}
    for name, solver in (("default", hg.Neumann(steps=3)), ("explicit", hg.Neumann(steps=3, alpha=0.03))):
        p = ht.ridge()
        p.solve_inner()
        hopt = _implicit(p, solver, lr=0.07)
        assert hopt.current_solver() == hg.Neumann(steps=3, alpha=0.07 if name == "default" else 0.03)
        hopt.inner_optimizer.param_groups[0]["lr"] = 0.03  # e.g. an LR scheduler stepped
        hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
        grads[name] = p.hparams.raw[0].grad
    assert torch.equal(grads["default"], grads["explicit"])


def _mlp_problem():
    model = ht.BatchNormMLP().to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1).to(DT)
    xt, yt = torch.randn(16, 3, dtype=DT), torch.randn(16, dtype=DT)
    xv, yv = torch.randn(12, 3, dtype=DT), torch.randn(12, dtype=DT)

    def mse(m, h, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    def train(m, h, b):
        return mse(m, h, b) + h.penalty(m)

    return model, hp, train, mse, (xt, yt), (xv, yv)


def _dense_ift(model, hp, tb, vb, damping: float) -> list[torch.Tensor]:
    """The IFT formula with a dense Hessian, written out independently of hypergrad: the losses
    are spelled out here (mse + 0.5 * sum exp(raw) * w^2) and evaluated by functional_call."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    assert list(hp.names) == names  # per-parameter decays, one raw tensor per weight tensor
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    l0 = torch.cat([p.detach().reshape(-1) for p in hp.parameters()])
    bufs = {n: b for n, b in model.named_buffers()}

    def out(w, batch):
        ws = {n: t.reshape(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        mapping = {**ws, **{k: v.clone() for k, v in bufs.items()}}
        return torch.func.functional_call(model, mapping, (batch[0],))

    def mse(w, batch):
        return ((out(w, batch) - batch[1]) ** 2).mean()

    def train(w, lam):
        return mse(w, tb) + 0.5 * (lam.exp() * w.square()).sum()

    hess = torch.autograd.functional.hessian(lambda w: train(w, l0), w0)
    mixed = torch.autograd.functional.jacobian(
        lambda lam: torch.autograd.functional.jacobian(lambda w: train(w, lam), w0, create_graph=True), l0
    )  # (P, H)
    gw = torch.autograd.functional.jacobian(lambda w: mse(w, vb), w0)
    eye = torch.eye(len(w0), dtype=DT)
    hg_flat = -mixed.T @ torch.linalg.solve(hess + damping * eye, gw)
    return list(hg_flat.split([q.numel() for q in hp.parameters()]))


@pytest.mark.parametrize("train_mode", [True, False])
def test_mlp_with_batchnorm_matches_dense_ift(train_mode: bool) -> None:
    model, hp, train, val, tb, vb = _mlp_problem()
    model.train(train_mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hopt = hg.Implicit(
        model,
        hp,
        train,
        val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=500, tol=1e-13, damping=5.0),
    )
    for _ in range(5):
        hopt.step(tb)
    before = {n: b.clone() for n, b in model.named_buffers()}
    hopt.hyper_step(train_batch=tb, val_batch=vb)
    for n, b in model.named_buffers():  # hypergradients never touch running statistics
        assert torch.equal(b, before[n]), n
    assert model.training is train_mode
    dense = _dense_ift(model, hp, tb, vb, damping=5.0)
    got = torch.cat([h.grad.reshape(-1) for h in hp.parameters()])  # type: ignore[union-attr]
    # one relative error over all hyperparameters: the bias before BatchNorm has no effect on the
    # output in train mode, so its own hypergradient is ~1e-17 and only rounding is left of it
    assert _rel(got, torch.cat(dense)) < 1e-10


def test_hessian_subset_is_exact_when_the_other_weights_do_not_depend_on_the_hyperparameters() -> None:
    """A trained feature layer, and a linear head with one decay per weight: with the head at its
    optimum for the current features, the IFT on the head alone equals differentiating the head's
    closed-form ridge solution (features held fixed), while the full IFT does not."""
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1, bias=False)).to(dt)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1, include=lambda n: n.startswith("2."))
    x, y = torch.randn(40, 3, dtype=dt), torch.randn(40, 1, dtype=dt)
    xv, yv = torch.randn(30, 3, dtype=dt), torch.randn(30, 1, dtype=dt)

    def mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return 0.5 * ((m(b[0]) - b[1]) ** 2).mean()

    def make(subset: Any) -> hg.Implicit:
        return hg.Implicit(
            model,
            hp,
            lambda m, h, b: mse(m, h, b) + h.penalty(m),
            mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=hg.CG(maxiter=50, tol=1e-14),
            hessian_subset=subset,
        )

    with torch.no_grad():
        feats = torch.tanh(model[0](x))
    raw = hp.raw[0]

    def head_optimum(r: torch.Tensor) -> torch.Tensor:  # (1, 6): argmin of the head's ridge loss
        a = feats.T @ feats / len(x) + torch.diag(r.exp().reshape(-1))
        return torch.linalg.solve(a, feats.T @ y / len(x)).T

    with torch.no_grad():
        model[2].weight.copy_(head_optimum(raw))
    r = raw.detach().clone().requires_grad_(True)
    w = head_optimum(r)
    val = 0.5 * ((torch.tanh(model[0](xv)).detach() @ w.T - yv) ** 2).mean()
    (exact,) = torch.autograd.grad(val, r)

    subset_grads, info = make(lambda n: n.startswith("2.")).hypergradient(
        train_batch=(x, y), val_batch=(xv, yv)
    )
    torch.testing.assert_close(subset_grads[0], exact, rtol=1e-9, atol=1e-12)
    full, _ = make(None).hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert not torch.allclose(full[0], exact, rtol=1e-3)  # the full IFT also moves the features
    with pytest.raises(ValueError, match="hessian_subset selects none"):
        make(lambda n: n.startswith("nothing"))


@pytest.mark.parametrize(
    "case", ["parameter", "layer", "global", "max", "scaled-twice", "two-containers", "subset"]
)
def test_analytic_penalty_derivatives_equal_autograd(case: str) -> None:
    """WeightDecay's second derivatives added without autograd give the autograd hypergradient,
    whatever coefficient the loss puts on the penalty and however the containers are arranged."""
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 3)).to(dt)
    per = case if case in ("parameter", "layer", "global") else "parameter"
    hp: nn.Module = hg.hparams.WeightDecay(model, per=per, init=0.05, max=0.5 if case == "max" else None)
    if case == "two-containers":
        hp = nn.ModuleDict(
            {
                "a": hg.hparams.WeightDecay(model, per="parameter", include=lambda n: n.startswith("0.")),
                "b": hg.hparams.WeightDecay(model, per="layer", include=lambda n: not n.startswith("0.")),
            }
        )

    def penalty(h: nn.Module, m: nn.Module) -> torch.Tensor:
        if case == "two-containers":
            return h["a"].penalty(m) + 2.0 * h["b"].penalty(m)
        if case == "scaled-twice":
            return 0.3 * h.penalty(m) + 0.2 * h.penalty(m)
        return h.penalty(m)

    def ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    hopt = hg.Implicit(
        model,
        hp,
        lambda m, h, b: ce(m, h, b) + penalty(h, m),
        ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Neumann(steps=4, alpha=0.2),
        hessian_subset=(lambda n: not n.startswith("3.")) if case == "subset" else None,
    )
    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(32, 4, generator=g, dtype=dt), torch.randint(0, 3, (32,), generator=g))
    vb = (torch.randn(32, 4, generator=g, dtype=dt), torch.randint(0, 3, (32,), generator=g))
    for _ in range(3):
        hopt.step(tb)
    if case == "subset":  # decays of the excluded layer have no path left: said once
        with pytest.warns(hg.DisconnectedWarning, match="hessian_subset"):
            fast, info_fast = hopt.hypergradient(train_batch=tb, val_batch=vb)
    else:
        fast, info_fast = hopt.hypergradient(train_batch=tb, val_batch=vb)
    hopt.analytic_penalties = False
    slow, info_slow = hopt.hypergradient(train_batch=tb, val_batch=vb)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert info_fast.outer_loss == info_slow.outer_loss
    assert any(float(a.abs().max()) > 0 for a in fast)


@pytest.mark.parametrize("make", [ht.ridge, ht.quadratic, ht.logistic])
def test_direct_solve_matches_exact_hypergradient(make) -> None:
    """hg.Direct (the dense Hessian from P HVPs, then Cholesky) gives the closed forms' exact
    hypergradients to rounding."""
    p = make()
    p.solve_inner()
    hopt = _implicit(p, hg.Direct())
    info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    for h, exact in zip(p.hparams.parameters(), p.exact_hypergradient(), strict=True):
        assert h.grad is not None
        assert _rel(h.grad, exact) <= 1e-10
    n = sum(w.numel() for w in p.model.parameters())
    assert info.solver_iterations == n and info.solver_status == "converged"
    assert info.solver_residual is not None and info.solver_residual < 1e-12


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize("top", [None, 0.5])
def test_penalty_mixed_term_by_hand_equals_autograd(per: str, top: float | None) -> None:
    """Implicit's mixed second derivative of WeightDecay penalties, written by hand (d' = d for
    e^r, d (1 - d/M) for M sigmoid(r)), equals autograd's, for every grouping and with max=."""
    from hypergrad._implicit import _DiagonalPenalties

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    hp = hg.hparams.WeightDecay(model, per=per, init=0.1, max=top)
    with torch.no_grad():
        for r in hp.raw:
            r.normal_(0, 0.5)
    weights, hparams = list(model.parameters()), list(hp.parameters())
    x = [torch.randn_like(w) for w in weights]

    class Sub(hg.hparams.WeightDecay):  # same decays, but not the base class's _decay: autograd
        def _decay(self, raw: torch.Tensor) -> torch.Tensor:
            return super()._decay(raw)

    out = []
    for by_hand in (True, False):
        pen = _DiagonalPenalties(hp, hparams)
        if not by_hand:
            hp.__class__ = Sub
        try:
            pen.recording(lambda: 1.7 * hp.penalty(model))()
        finally:
            hp.__class__ = hg.hparams.WeightDecay
        pen.set_coefficients([torch.tensor(1.7)] * len(pen.calls))
        if not by_hand:
            hp.__class__ = Sub
        try:
            out.append(pen.mixed(x, weights, hparams))
        finally:
            hp.__class__ = hg.hparams.WeightDecay
    for a, b in zip(*out, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_with_hessian_subset_and_warm_start_equals_converged_cg(dtype: torch.dtype) -> None:
    """hg.Direct on the last layer of an MLP (hessian_subset), with warm_start on the CG side:
    the same hypergradient as CG run to convergence on the same damped subsystem."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g, dtype=dtype), torch.randint(0, 3, (64,), generator=g)

    def train(m, h, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

    def val(m, h, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    grads = []
    for solver in (hg.Direct(damping=0.05), hg.CG(maxiter=200, tol=1e-12, damping=0.05, warm_start=True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
        hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2)
        hopt = hg.Implicit(
            model,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=solver,
            hessian_subset=lambda n: n.startswith("2."),
        )
        with pytest.warns(hg.DisconnectedWarning):  # the first layer's decays: exactly 0 by design
            info = hopt.hyper_step(train_batch=(x, y), val_batch=(x[:32], y[:32]))
        assert info.solver_status == "converged"
        grads.append([p.grad.clone() for p in hp.parameters()])
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-3)
    assert float(grads[0][2].abs().max()) > 0 and float(grads[0][0].abs().max()) == 0


def test_nan_curvature_goes_to_the_nonfinite_guard_not_a_solver_error() -> None:
    """A loss with a finite value and gradient but a NaN second derivative (|w|^1.5 at w = 0):
    the power iteration that picks Neumann's step size sees NaN; the hyperstep is refused as
    non-finite (nothing changes), not failed with 'Invalid Neumann alpha: nan'."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    hp = hg.hparams.WeightDecay(model, init=0.1)

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1]) + h.penalty(m) + (m.weight.abs() ** 1.5).sum()

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    hopt = hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Neumann(steps=3), on_nonfinite="skip",
    )  # fmt: skip
    b = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    raw = [p.detach().clone() for p in hp.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        info = hopt.hyper_step(train_batch=b, val_batch=b)
    assert info.skipped
    assert all(torch.equal(p, q) for p, q in zip(hp.parameters(), raw, strict=True))
