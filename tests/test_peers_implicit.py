"""The implicit family (``hg.Implicit`` with ``CG``, ``Neumann``, ``Direct``, ``Identity``;
``hessian_subset``, warm starts, damping, the info it returns) on what peer libraries test,
translated into our API.

What is checked, and against what (all float64 unless the test is about float32):

* closed forms: ridge regression with one penalty per feature, a penalised bias and a scalar
  hyperparameter, a shift that enters the validation loss only, one unused hyperparameter (as in
  hypertorch's logistic-regression example with per-feature L2, and jaxopt's ridge tests); kernel
  ridge regression with a learned bandwidth that also enters the validation loss directly
  (jaxopt); a quadratic with an asymmetric mixed term, at a minimum and at a saddle; iMAML's
  proximal meta-gradient (hypertorch); ridge at the rest point of an inner optimiser with its
  own (coupled) weight decay;
* the dense IFT formula written out here with ``torch.autograd.functional`` (Hessian, mixed
  Jacobian), independently of hypergrad's code paths, for models with frozen weights, weights
  outside the inner optimiser, heads that only one of the losses reaches, a tied submodule, a
  weight used through its sum (autograd's expanded HVP), a penalty scaled by a hyperparameter;
* torchopt's ``custom_root`` with its conjugate gradient (``solve_cg``, ``ridge=``), truncated
  after a few iterations, on multiclass logistic regression: the same iterates, to 1e-10;
* solvers' statuses on singular and indefinite Hessians and on a zero right-hand side, float32
  against float64, param groups with different learning rates (Neumann's step size), warm
  starts across hypersteps, Identity as the one-step approximation, and the errors of
  :func:`hypergrad.implicit_hypergradient` and ``hessian_subset`` on inputs they cannot use.

The tests of the fixes (tied-name ``hessian_subset``, expanded HVPs, the pure function's
errors, zero right-hand sides, the inner optimiser's weight decay, the unreached subset's
error) failed before them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _dense_ift(
    train: Callable[[Tensor, Tensor], Tensor],
    val: Callable[[Tensor, Tensor], Tensor],
    w0: Tensor,
    l0: Tensor,
    damping: float = 0.0,
    singular: bool = False,
) -> Tensor:
    """dL_V/dlambda = d_lambda L_V - (d2 L_T / dlambda dw) (H + damping I)^-1 d_w L_V over flat
    vectors, by dense autograd Jacobians: independent of hypergrad. ``singular``: the
    pseudo-inverse (a consistent singular system)."""
    h = hessian(lambda w: train(w, l0), w0)
    mixed = jacobian(lambda lam: jacobian(lambda w: train(w, lam), w0, create_graph=True), l0)  # (P, H)
    gw, gl = jacobian(val, (w0, l0))
    eye = torch.eye(len(w0), dtype=w0.dtype)
    if singular:
        return gl - mixed.T @ (torch.linalg.pinv(h + damping * eye, hermitian=True) @ gw)
    return gl - mixed.T @ torch.linalg.solve(h + damping * eye, gw)


def _implicit(
    model: nn.Module, hp: nn.Module, train: Any, val: Any, solver: hg.LinearSolver, **kwargs: Any
) -> hg.Implicit:
    inner = kwargs.pop("inner", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    return hg.Implicit(
        model,
        hp,
        train,
        val,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver,
        **kwargs,
    )


# ----------------------------------------------------------------------------- ridge, closed form


class _RidgeHP(nn.Module):
    """Per-feature log-penalties, a scalar bias penalty, a shift that only the validation loss
    reads, and a tensor no loss reads."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.linspace(-2.0, 0.5, n, dtype=DT))
        self.bias_scale = nn.Parameter(torch.tensor(0.3, dtype=DT))
        self.unused = nn.Parameter(torch.zeros(2, dtype=DT))
        self.val_shift = nn.Parameter(torch.tensor(0.2, dtype=DT))


def _ridge_problem() -> tuple[nn.Module, _RidgeHP, Any, Any, Any, Any, tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    n, m, f = 50, 30, 6
    x, y = torch.randn(n, f, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    xv, yv = torch.randn(m, f, generator=g, dtype=DT), torch.randn(m, generator=g, dtype=DT)
    model = nn.Linear(f, 1).to(DT)
    hp = _RidgeHP(f)

    def train(mod: nn.Module, h: nn.Module, b: Any) -> Tensor:
        r = mod(b[0]).squeeze(-1) - b[1]
        return (
            0.5 * (r**2).mean()
            + 0.5 * (h.log_l2.exp() * mod.weight[0] ** 2).sum()
            + 0.5 * h.bias_scale * (mod.bias**2).sum()
        )

    def val(mod: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((mod(b[0]).squeeze(-1) - b[1] - h.val_shift) ** 2).mean()

    def w_star(log_l2: Tensor, scale: Tensor) -> Tensor:  # [weight, bias] = A^-1 Z^T y / n
        z = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
        a = z.T @ z / n + torch.diag(torch.cat([log_l2.exp(), scale.reshape(1)]))
        return torch.linalg.solve(a, z.T @ y / n)

    def outer(log_l2: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        zv = torch.cat([xv, torch.ones(m, 1, dtype=DT)], 1)
        return 0.5 * ((zv @ w_star(log_l2, scale) - yv - shift) ** 2).mean()

    lam = [t.detach().clone().requires_grad_(True) for t in (hp.log_l2, hp.bias_scale, hp.val_shift)]
    exact = torch.autograd.grad(outer(*lam), lam)
    with torch.no_grad():
        w = w_star(hp.log_l2, hp.bias_scale)
        model.weight.copy_(w[:f])
        model.bias.copy_(w[f:])
    return model, hp, train, val, (x, y), (xv, yv), exact


@pytest.mark.parametrize(
    "solver",
    [
        hg.CG(maxiter=100, tol=1e-14),
        hg.CG(maxiter=100, tol=1e-14, warm_start=True),
        hg.Direct(),
        hg.Neumann(steps=1500, alpha=0.5),
    ],
    ids=["cg", "cg-warm", "direct", "neumann"],
)
def test_ridge_with_scalar_unused_and_validation_only_hyperparameters_matches_closed_form(
    solver: hg.LinearSolver,
) -> None:
    """Four hyperparameter tensors: per-feature log-penalties, a 0-dim bias penalty, a shift read
    by the validation loss only (its hypergradient is the direct term alone) and one read by no
    loss (exactly 0, said by a DisconnectedWarning). Twice, so a warm start is used."""
    model, hp, train, val, tb, vb, exact = _ridge_problem()
    hopt = _implicit(model, hp, train, val, solver)
    for _ in range(2):
        with pytest.warns(hg.DisconnectedWarning, match="'unused'"):
            info = hopt.hyper_step(train_batch=tb, val_batch=vb)
        hopt._warned_disconnected.clear()
        assert hp.log_l2.grad is not None and hp.bias_scale.grad is not None
        assert _rel(hp.log_l2.grad, exact[0]) < 1e-10
        assert hp.bias_scale.grad.shape == () and _rel(hp.bias_scale.grad, exact[1]) < 1e-10
        assert hp.val_shift.grad is not None and _rel(hp.val_shift.grad, exact[2]) < 1e-12
        assert hp.unused.grad is not None and torch.equal(hp.unused.grad, torch.zeros(2, dtype=DT))
    assert info.solver_status == ("fixed" if isinstance(solver, hg.Neumann) else "converged")
    if isinstance(solver, hg.CG) and solver.warm_start:  # started from the previous solution
        assert info.solver_iterations == 1 and info.solver_residual is not None
        assert info.solver_residual < 1e-13


# ----------------------------------------------------------------------------- kernel ridge


class _KernelRidge(nn.Module):
    """Dual coefficients of kernel ridge regression; the kernel's log-bandwidth and the log
    regularisation are the hyperparameters (``hp``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n, dtype=DT))


def _rbf(a: Tensor, b: Tensor, log_gamma: Tensor) -> Tensor:
    return torch.exp(-log_gamma.exp() * torch.cdist(a, b) ** 2)


def test_kernel_ridge_with_learned_bandwidth_matches_closed_form() -> None:
    """jaxopt's kernel ridge: L_T = a^T (K + e^r I) a / 2 - a^T y, so a* = (K + e^r I)^-1 y;
    L_V = |K_V a - y_V|^2 / 2m. The bandwidth enters the Hessian, the mixed term and (through
    K_V) the validation loss directly. Exact hypergradient: autograd through the closed form."""
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(25, 2, generator=g, dtype=DT), torch.randn(15, 2, generator=g, dtype=DT)
    y, yv = torch.sin(x.sum(1)), torch.sin(xv.sum(1))
    hp = nn.ParameterDict(
        {
            "log_reg": nn.Parameter(torch.tensor(-1.0, dtype=DT)),
            "log_gamma": nn.Parameter(torch.tensor(-0.5, dtype=DT)),
        }
    )
    model = _KernelRidge(len(x))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        k = _rbf(b[0], b[0], h["log_gamma"]) + h["log_reg"].exp() * torch.eye(len(b[0]), dtype=DT)
        return 0.5 * m.alpha @ (k @ m.alpha) - m.alpha @ b[1]

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((_rbf(b[0], x, h["log_gamma"]) @ m.alpha - b[1]) ** 2).mean()

    def outer(log_reg: Tensor, log_gamma: Tensor) -> Tensor:
        a = torch.linalg.solve(_rbf(x, x, log_gamma) + log_reg.exp() * torch.eye(len(x), dtype=DT), y)
        return 0.5 * ((_rbf(xv, x, log_gamma) @ a - yv) ** 2).mean()

    lam = [
        hp["log_reg"].detach().clone().requires_grad_(True),
        hp["log_gamma"].detach().clone().requires_grad_(True),
    ]
    exact = torch.autograd.grad(outer(*lam), lam)
    with torch.no_grad():
        model.alpha.copy_(
            torch.linalg.solve(
                _rbf(x, x, hp["log_gamma"]) + hp["log_reg"].exp() * torch.eye(len(x), dtype=DT), y
            )
        )
    for solver in (hg.CG(maxiter=200, tol=1e-14), hg.Direct()):
        grads, info = _implicit(model, hp, train, val, solver).hypergradient(
            train_batch=(x, y), val_batch=(xv, yv)
        )
        assert info.solver_status == "converged"
        names = [n for n, _ in hp.named_parameters()]  # (a ParameterDict sorts its keys)
        for name, got in zip(names, grads, strict=True):
            want = exact[["log_reg", "log_gamma"].index(name)]
            assert got.shape == () and abs(float(got - want)) <= 1e-9 * abs(float(want)), name


# ----------------------------------------------------------------------------- quadratic, mixed term


_A_SPD = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]], dtype=DT)
_A_SADDLE = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=DT))
_B = torch.tensor([[1.0, 0.3], [0.0, 2.0], [0.5, -1.0]], dtype=DT)  # asymmetric: 3 weights, 2 hparams
_C = torch.tensor([1.0, -1.0, 2.0], dtype=DT)


def _quadratic(a: Tensor) -> tuple[nn.Module, nn.Module, Any, Any, Tensor]:
    """L_T = w^T A w / 2 - w^T B lam, L_V = |w - c|^2 / 2 + |lam|^2: at the stationary point
    w* = A^-1 B lam, dL_V/dlam = B^T A^-1 (w* - c) + 2 lam (A symmetric)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(3, dtype=DT))
    hp = nn.Module()
    hp.lam = nn.Parameter(torch.tensor([0.4, -0.2], dtype=DT))
    with torch.no_grad():
        model.w.copy_(torch.linalg.solve(a, _B @ hp.lam))
    exact = _B.T @ torch.linalg.solve(a, model.w.detach() - _C) + 2 * hp.lam.detach()

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * m.w @ (a @ m.w) - m.w @ (_B @ h.lam)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((m.w - _C) ** 2).sum() + (h.lam**2).sum()

    return model, hp, train, val, exact


_NO_DATA = (torch.zeros(1, dtype=DT),)


@pytest.mark.parametrize(
    "solver",
    [hg.CG(maxiter=10, tol=1e-14), hg.Direct(), hg.Neumann(steps=400, alpha=0.3)],
    ids=["cg", "direct", "neumann"],
)
def test_quadratic_with_asymmetric_mixed_term_and_direct_term_matches_closed_form(
    solver: hg.LinearSolver,
) -> None:
    model, hp, train, val, exact = _quadratic(_A_SPD)
    grads, info = _implicit(model, hp, train, val, solver).hypergradient(
        train_batch=_NO_DATA, val_batch=_NO_DATA
    )
    assert _rel(grads[0], exact) < 1e-12
    assert info.solver_status in ("converged", "fixed")


def test_solvers_at_a_saddle_report_their_status_honestly() -> None:
    """At a saddle (A with eigenvalue -0.5) the IFT still holds: Direct gives the exact
    hypergradient but says the system is not positive definite; CG stops at once on negative
    curvature (its solution is 0, the hypergradient the direct term alone); Neumann with the
    inner learning rate diverges (|1 - 0.3 (-0.5)| > 1) and says so; damped CG converges on
    the shifted system (a different, biased answer)."""
    model, hp, train, val, exact = _quadratic(_A_SADDLE)
    direct_term = 2 * hp.lam.detach()

    def run(solver: hg.LinearSolver) -> tuple[Tensor, hg.HyperStepInfo]:
        hopt = _implicit(model, hp, train, val, solver, inner=torch.optim.SGD(model.parameters(), lr=0.3))
        grads, info = hopt.hypergradient(train_batch=_NO_DATA, val_batch=_NO_DATA)
        return grads[0], info

    g, info = run(hg.Direct())
    assert info.solver_status == "nonpositive_curvature" and _rel(g, exact) < 1e-12
    g, info = run(hg.CG(maxiter=10))
    assert info.solver_status == "nonpositive_curvature" and info.solver_iterations == 1
    assert torch.equal(g, direct_term)
    _, info = run(hg.Neumann(steps=10))
    assert info.solver_status == "diverging" and info.solver_residual is not None and info.solver_residual > 1
    g, info = run(hg.CG(maxiter=10, tol=1e-14, damping=1.0))
    damped = (
        _B.T @ torch.linalg.solve(_A_SADDLE + torch.eye(3, dtype=DT), model.w.detach() - _C) + direct_term
    )
    assert info.solver_status == "converged" and _rel(g, damped) < 1e-12


def test_singular_hessian_with_a_consistent_system_gives_the_exact_hypergradient() -> None:
    """Two identical features without a penalty: H is singular (null space e0 - e1), but the
    validation gradient lies in its range and the penalties act off the null space, so the
    hypergradient is well defined. CG converges in rank(H) steps, Direct says the matrix is not
    positive definite and still gets it, a converged Neumann series too."""
    g = torch.Generator().manual_seed(0)
    n, f = 60, 5
    x, xv = torch.randn(n, f, generator=g, dtype=DT), torch.randn(40, f, generator=g, dtype=DT)
    x[:, 1], xv[:, 1] = x[:, 0], xv[:, 0]
    y, yv = torch.randn(n, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    model, hp = nn.Module(), nn.Module()
    model.w = nn.Parameter(torch.zeros(f, dtype=DT))
    hp.r = nn.Parameter(torch.full((f - 2,), -1.0, dtype=DT))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((b[0] @ m.w - b[1]) ** 2).mean() + 0.5 * (h.r.exp() * m.w[2:] ** 2).sum()

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((b[0] @ m.w - b[1]) ** 2).mean()

    def w_star(r: Tensor) -> Tensor:  # the minimum-norm minimiser
        a = x.T @ x / n + torch.diag(torch.cat([torch.zeros(2, dtype=DT), r.exp()]))
        return torch.linalg.pinv(a, hermitian=True) @ (x.T @ y / n)

    r = hp.r.detach().clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(0.5 * ((xv @ w_star(r) - yv) ** 2).mean(), r)
    with torch.no_grad():
        model.w.copy_(w_star(hp.r))
    for solver, status in (
        (hg.CG(maxiter=50, tol=1e-13), "converged"),
        (hg.Direct(), "nonpositive_curvature"),
        (hg.Neumann(steps=3000, alpha=0.2), "fixed"),
    ):
        grads, info = _implicit(model, hp, train, val, solver).hypergradient(
            train_batch=(x, y), val_batch=(xv, yv)
        )
        assert info.solver_status == status, type(solver).__name__
        assert _rel(grads[0], exact) < 1e-10, type(solver).__name__
    assert info.solver_residual is not None and info.solver_residual < 1e-12  # Neumann's last term


# ----------------------------------------------------------------------------- which weights count


class _Heads(nn.Module):
    """A trunk, a frozen layer, a layer outside the inner optimiser, a head only the training
    loss reads (auxiliary task) and one only the validation loss reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.frozen = nn.Linear(3, 4)
        self.outside = nn.Linear(3, 4)
        self.main = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 1)
        self.val_head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.tanh(self.a(x) + self.frozen(x) + self.outside(x))
        return self.main(h), self.aux(h), self.val_head(h)


def test_frozen_outside_and_one_sided_weights_match_the_dense_ift() -> None:
    """The IFT differentiates through the weights the inner optimiser trains (frozen ones and
    ones it does not hold are constants); a head only the training loss reads couples through
    H although the validation gradient is 0 there; a head only the validation loss reads has a
    zero row in H and stays out of the solve. Against the dense formula over the trained,
    reached weights; no .grad of the model is written."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y, y2 = (torch.randn(40, k, generator=g, dtype=DT) for k in (3, 2, 1))
    xv, yv = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, 2, generator=g, dtype=DT)
    model = _Heads().to(DT)
    model.frozen.requires_grad_(False)
    trained = ("a.", "main.", "aux.")
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1, include=lambda n: n.startswith(trained))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        out, aux, _ = m(b[0])
        return F.mse_loss(out, b[1]) + F.mse_loss(aux, b[2]) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        out, _, side = m(b[0])
        return F.mse_loss(out + side, b[1])

    inner = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("outside")], lr=0.3)
    for _ in range(200):
        inner.zero_grad()
        train(model, hp, (x, y, y2)).backward()
        inner.step()
    model.zero_grad()  # (the loop's backward also reached the layer outside the optimiser)

    params = dict(model.named_parameters())
    names = [n for n in params if n.startswith(trained)]
    shapes, sizes = [params[n].shape for n in names], [params[n].numel() for n in names]

    def call(w: Tensor, inp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ws = {n: t.reshape(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(model, ws, (inp,))

    def train_flat(w: Tensor, lam: Tensor) -> Tensor:
        out, aux, _ = call(w, x)
        return F.mse_loss(out, y) + F.mse_loss(aux, y2) + 0.5 * (lam.exp() * w**2).sum()

    def val_flat(w: Tensor, lam: Tensor) -> Tensor:
        out, _, side = call(w, xv)
        return F.mse_loss(out + side, yv)

    ref = _dense_ift(
        train_flat, val_flat, _flat(params[n].detach() for n in names), _flat(hp.parameters()).detach()
    )
    for solver in (hg.Direct(), hg.CG(maxiter=300, tol=1e-14)):
        hopt = _implicit(model, hp, train, val, solver, inner=inner)
        grads, info = hopt.hypergradient(train_batch=(x, y, y2), val_batch=(xv, yv))
        assert info.solver_status == "converged"
        assert _rel(_flat(grads), ref) < 1e-10
        if isinstance(solver, hg.Direct):  # one HVP per entry: outside, val_head, frozen left out
            assert info.solver_iterations == sum(sizes)
    assert all(p.grad is None for p in model.parameters())


def _tied() -> tuple[nn.Module, nn.Linear, hg.hparams.WeightDecay, Any, Any, Any, Any, Tensor]:
    """One Linear used twice (a weight-tied two-layer map), near the optimum of the training
    loss; the dense IFT by hand (the forward written out with the shared matrix)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(40, 3, generator=g, dtype=DT)
    xv, yv = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, 3, generator=g, dtype=DT)
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1])

    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(100):
        opt.zero_grad()
        train(model, hp, (x, y)).backward()
        opt.step()
    opt.zero_grad()

    def fwd(w: Tensor, inp: Tensor) -> Tensor:
        mat, bias = w[:9].reshape(3, 3), w[9:]
        return torch.tanh(inp @ mat.T + bias) @ mat.T + bias

    ref = _dense_ift(
        lambda w, lam: F.mse_loss(fwd(w, x), y) + 0.5 * (lam.exp() * w**2).sum(),
        lambda w, lam: F.mse_loss(fwd(w, xv), yv),
        _flat([lin.weight.detach(), lin.bias.detach()]),
        _flat(hp.parameters()).detach(),
    )
    return model, lin, hp, train, val, (x, y), (xv, yv), ref


@pytest.mark.parametrize("subset", [None, "2.", "0."], ids=["all", "by-second-name", "by-first-name"])
def test_tied_submodule_matches_the_dense_ift_and_hessian_subset_finds_it_by_either_name(subset: Any) -> None:
    """The shared Linear is listed once by named_parameters ("0.weight"), but it is also
    "2.weight": hessian_subset=lambda n: n.startswith("2.") (the last layer) used to raise
    "selects none of the trained weights"; it selects the tied weight, here all of them."""
    model, lin, hp, train, val, tb, vb, ref = _tied()
    pick = None if subset is None else (lambda n: n.startswith(subset))
    hopt = _implicit(model, hp, train, val, hg.Direct(), hessian_subset=pick)
    grads, info = hopt.hypergradient(train_batch=tb, val_batch=vb)
    assert info.solver_iterations == 12 and info.solver_status == "converged"
    assert _rel(_flat(grads), ref) < 1e-10
    assert model[0] is lin and model[2] is lin and isinstance(lin.weight, nn.Parameter)
    with pytest.raises(ValueError, match="selects none"):
        _implicit(model, hp, train, val, hg.Direct(), hessian_subset=lambda n: n.startswith("1."))


# ----------------------------------------------------------------------------- expanded HVPs


class _SumShift(nn.Module):
    """A linear map plus a shift vector used through its sum: autograd returns the gradient (and
    the HVP) of ``shift`` expanded from a scalar, a tensor that cannot be written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.shift = nn.Parameter(torch.full((5,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + self.shift.sum()


@pytest.mark.parametrize("penalised", ["all", "lin"])
@pytest.mark.parametrize(
    "solver",
    [hg.CG(maxiter=60, tol=1e-14, damping=0.1), hg.Neumann(steps=600), hg.Direct(damping=0.1)],
    ids=["cg-damped", "neumann-power", "direct"],
)
def test_a_weight_used_through_its_sum_matches_the_dense_ift(solver: hg.LinearSolver, penalised: str) -> None:
    """Damped CG (damping added in place), the analytic WeightDecay terms (added in place to
    each HVP) and the power iteration that picks Neumann's step size under Adam (normalised in
    place) all crashed with "more than one element of the written-to tensor refers to a single
    memory location" on such a weight."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(40, 2, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = _SumShift().to(DT)
    hp = hg.hparams.WeightDecay(
        model, per="parameter", init=0.5, include=lambda n: penalised == "all" or "lin" in n
    )

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1] + 1.0)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    which = [names.index(n) for n in hp.names]

    def call(w: Tensor, inp: Tensor) -> Tensor:
        ws = {n: t.reshape(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(model, ws, (inp,))

    def train_flat(w: Tensor, lam: Tensor) -> Tensor:
        parts = w.split(sizes)
        pen = sum(
            0.5 * (r.exp() * parts[k] ** 2).sum()
            for r, k in zip(lam.split([sizes[k] for k in which]), which, strict=True)
        )
        return F.mse_loss(call(w, x), y) + pen

    ref = _dense_ift(
        train_flat,
        lambda w, lam: F.mse_loss(call(w, x[:20]), y[:20] + 1.0),
        _flat(model.parameters()).detach(),
        _flat(hp.parameters()).detach(),
        damping=getattr(solver, "damping", 0.0),
        singular=penalised == "lin",  # only sum(shift) matters: H is singular along the rest
    )
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)  # Neumann: step size by power iteration
    for analytic in (True, False):
        hopt = _implicit(model, hp, train, val, solver, inner=inner)
        hopt.analytic_penalties = analytic
        grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(x[:20], y[:20]))
        assert info.solver_status in ("converged", "fixed"), info.solver_status
        assert _rel(_flat(grads), ref) < (1e-6 if isinstance(solver, hg.Neumann) else 1e-10), analytic


def test_cg_damping_on_an_hvp_that_returns_an_expanded_tensor() -> None:
    """The solver on its own: an HVP handing back ``s.expand(n)`` (read-only) with damping."""
    ones = torch.ones(5, dtype=DT)
    h = 2 * torch.ones(5, 5, dtype=DT) + 0.5 * torch.eye(5, dtype=DT)
    r = hg.CG(maxiter=5, tol=1e-14, damping=0.5).solve(lambda u: ((2 * u[0].sum()).expand(5),), (ones,))
    assert r.status.value == "converged"
    torch.testing.assert_close(r.solution[0], torch.linalg.solve(h, ones), rtol=1e-13, atol=0)


def test_penalty_scaled_by_another_hyperparameter_matches_autograd_and_the_dense_ift() -> None:
    """L_T = mse + s * WeightDecay.penalty with s itself a hyperparameter: the analytic penalty
    path reads s as the coefficient and must still give s its mixed term sum(d w x)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(40, 2, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    scale = nn.Module()
    scale.s = nn.Parameter(torch.tensor(0.7, dtype=DT))
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=0.1), "scale": scale})

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1]) + h["scale"].s * h["wd"].penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1])

    names = [n for n, _ in model.named_parameters()]
    shapes, sizes = [p.shape for p in model.parameters()], [p.numel() for p in model.parameters()]

    def train_flat(w: Tensor, lam: Tensor) -> Tensor:
        ws = dict(
            zip(names, [t.reshape(s) for t, s in zip(w.split(sizes), shapes, strict=True)], strict=True)
        )
        pen = 0.5 * (lam[0].exp() * (ws["0.weight"] ** 2).sum() + lam[0].exp() * (ws["0.bias"] ** 2).sum())
        pen = pen + 0.5 * lam[1].exp() * ((ws["2.weight"] ** 2).sum() + (ws["2.bias"] ** 2).sum())
        return F.mse_loss(torch.func.functional_call(model, ws, (x,)), y) + lam[2] * pen

    def val_flat(w: Tensor, lam: Tensor) -> Tensor:
        ws = {n: t.reshape(s) for n, t, s in zip(names, w.split(sizes), shapes, strict=True)}
        return F.mse_loss(torch.func.functional_call(model, ws, (x[:20],)), y[:20])

    assert [n for n, _ in hp.named_parameters()] == ["wd.raw.0", "wd.raw.1", "scale.s"]
    ref = _dense_ift(
        train_flat, val_flat, _flat(model.parameters()).detach(), _flat(hp.parameters()).detach()
    )
    for analytic in (True, False):
        hopt = _implicit(model, hp, train, val, hg.Direct())
        hopt.analytic_penalties = analytic
        grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(x[:20], y[:20]))
        assert _rel(_flat(grads), ref) < 1e-10, analytic


# ----------------------------------------------------------------------------- torchopt


def test_truncated_damped_cg_equals_torchopts_custom_root_with_solve_cg() -> None:
    """Multiclass logistic regression with one log-decay per weight entry (jaxopt's and
    torchopt's implicit-diff example), a few inner steps from the optimum: hg.CG(maxiter=k,
    tol=0, damping=d) and torchopt's custom_root with solve_cg(ridge=d, maxiter=k, rtol=0) run
    the same textbook CG from 0 on H + d I, truncated, so the hypergradients agree to rounding
    although neither has converged."""
    torchopt = pytest.importorskip("torchopt")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(60, 4, generator=g, dtype=DT), torch.randint(0, 3, (60,), generator=g)
    xv, yv = torch.randn(40, 4, generator=g, dtype=DT), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
    with torch.no_grad():
        for r in hp.raw:
            r.add_(torch.randn(r.shape, generator=g, dtype=DT))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    k, d = 3, 0.1
    hopt = _implicit(model, hp, train, val, hg.CG(maxiter=k, tol=0.0, damping=d))
    for _ in range(30):
        hopt.step((x, y))
    grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert info.solver_status == "max_iterations" and info.solver_iterations == k
    assert info.solver_residual is not None and info.solver_residual > 1e-6  # truly truncated

    def inner_objective(params: tuple[Tensor, Tensor], raws: tuple[Tensor, Tensor]) -> Tensor:
        (wt, bias), (rw, rb) = params, raws
        pen = 0.5 * ((rw.exp() * wt**2).sum() + (rb.exp() * bias**2).sum())
        return F.cross_entropy(x @ wt.T + bias, y) + pen

    solve = torchopt.linear_solve.solve_cg(ridge=d, maxiter=k, rtol=0.0, atol=0.0)

    @torchopt.diff.implicit.custom_root(torch.func.grad(inner_objective, argnums=0), argnums=1, solve=solve)
    def solution(params: tuple[Tensor, Tensor], raws: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return params

    raws = tuple(hp.parameters())
    wt, bias = solution((model.weight.detach(), model.bias.detach()), raws)
    ref = torch.autograd.grad(F.cross_entropy(xv @ wt.T + bias, yv), raws)
    for mine, theirs in zip(grads, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- precision, groups, warm


def test_float32_hypergradient_is_close_to_the_float64_closed_form() -> None:
    """The same ridge problem in float32 (weights, hyperparameters, batches): CG and Direct give
    a hypergradient in float32 within float32's reach of the float64 closed form."""
    p = ht.ridge()
    p.solve_inner()
    exact = p.exact_hypergradient()[0].float()
    model, hp = p.model.float(), p.hparams.float()
    tb = tuple(t.float() for t in p.train_batch)
    vb = tuple(t.float() for t in p.val_batch)
    for solver in (hg.CG(maxiter=30), hg.Direct()):
        grads, info = _implicit(model, hp, p.train_loss, p.val_loss, solver).hypergradient(
            train_batch=tb, val_batch=vb
        )
        assert grads[0].dtype == torch.float32
        assert _rel(grads[0], exact) < 1e-4
        assert info.solver_residual is not None and info.solver_residual < 1e-5


def test_neumann_step_size_with_param_groups_of_different_learning_rates() -> None:
    """Weight and bias in two param groups with learning rates 10 and 1e-4: neither is on the
    Hessian's scale (10 makes the series diverge, 1e-4 leaves it near alpha v). The default
    (alpha=None) takes 1/lambda_max by power iteration and converges to the closed form; "lr"
    warns and takes the first group's rate, and the series says it diverges."""
    model, hp, train, val, tb, vb, exact = _ridge_problem()

    def make(alpha: Any, steps: int) -> hg.Implicit:
        inner = torch.optim.SGD(
            [{"params": [model.weight], "lr": 10.0}, {"params": [model.bias], "lr": 1e-4}]
        )
        return _implicit(model, hp, train, val, hg.Neumann(steps=steps, alpha=alpha), inner=inner)

    with pytest.warns(hg.DisconnectedWarning, match="'unused'"):
        grads, info = make(None, 800).hypergradient(train_batch=tb, val_batch=vb)
    assert info.solver_status == "fixed" and info.solver_iterations == 800 + 20  # + power iteration
    assert _rel(grads[0], exact[0]) < 1e-8 and _rel(grads[1], exact[1]) < 1e-8
    hopt = make("lr", 5)
    with pytest.warns(UserWarning, match="several learning rates"):
        with pytest.warns(hg.DisconnectedWarning):
            _, info = hopt.hypergradient(train_batch=tb, val_batch=vb)
    assert info.solver_status == "diverging"


def test_warm_started_solvers_follow_moving_hyperparameters_across_hypersteps() -> None:
    """hypertorch/iMAML-style outer loop: the hyperparameters move, the weights are re-solved
    to the new optimum, and a warm-started CG and a warm-started Neumann (Richardson, whose
    iterations accumulate over hypersteps) match the closed form at every hyperstep;
    hypergradient() alone leaves the warm start as it was."""
    for solver, tol in (
        (hg.CG(maxiter=100, tol=1e-12, warm_start=True), 1e-9),
        (hg.Neumann(steps=30, alpha=0.3, warm_start=True), None),
    ):
        q = ht.ridge(n_features=8, cond=4.0)
        hopt = hg.Implicit(
            q.model,
            q.hparams,
            q.train_loss,
            q.val_loss,
            inner_optimizer=torch.optim.SGD(q.model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(q.hparams.parameters(), lr=0.3),
            solver=solver,
        )
        errors = []
        for _ in range(5):
            q.solve_inner()
            exact = q.exact_hypergradient()[0]
            x0 = hopt._x0
            hopt.hypergradient(train_batch=q.train_batch, val_batch=q.val_batch)
            assert hopt._x0 is x0  # not committed
            info = hopt.hyper_step(train_batch=q.train_batch, val_batch=q.val_batch)
            assert info.solver_status in ("converged", "fixed")
            errors.append(_rel(q.hparams.raw[0].grad, exact))
        if tol is not None:
            assert max(errors) < tol, errors
        else:  # Richardson goes on from the last solution: far better than the first, cold, solve
            assert max(errors[1:]) < 1e-3 * errors[0], errors


# ----------------------------------------------------------------------------- the pure function


def test_implicit_hypergradient_names_what_it_cannot_differentiate() -> None:
    """The pure function used to fail inside autograd ("One of the differentiated Tensors does
    not require grad", "grad can be implicitly created only for scalar outputs", "`inputs`
    argument to `grad()` cannot be empty"); it says which argument is wrong."""
    w = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    lam = torch.tensor([0.5, 0.1], dtype=DT, requires_grad=True)

    def train() -> Tensor:
        return 0.5 * ((w - lam) ** 2).sum() + 0.1 * (w**4).sum()

    def val() -> Tensor:
        return (w**2).sum()

    with pytest.raises(ValueError, match=r"weights\[0\] must be a tensor with requires_grad=True"):
        hg.implicit_hypergradient(train, val, [w.detach()], [lam], hg.CG())
    with pytest.raises(ValueError, match=r"hparams\[1\] must be a tensor with requires_grad=True"):
        hg.implicit_hypergradient(train, val, [w], [lam, torch.ones(2)], hg.CG())
    with pytest.raises(ValueError, match="at least one weight"):
        hg.implicit_hypergradient(train, val, [], [lam], hg.CG())
    with pytest.raises(ValueError, match=r"val_loss must return a scalar tensor, got shape \(2,\)"):
        hg.implicit_hypergradient(train, lambda: w**2, [w], [lam], hg.CG())
    with pytest.raises(ValueError, match="train_loss must return a scalar tensor"):
        hg.implicit_hypergradient(lambda: (w - lam) ** 2, val, [w], [lam], hg.CG())
    with pytest.raises(TypeError, match="LinearSolver"):
        hg.implicit_hypergradient(train, val, [w], [lam], "cg")  # type: ignore[arg-type]
    # and the valid call: H = I + 1.2 diag(w^2), mixed = -I, so dL_V/dlam = H^-1 2w
    grads, _, res = hg.implicit_hypergradient(train, val, [w], [lam], hg.CG(maxiter=5, tol=1e-14))
    want = 2 * w.detach() / (1 + 1.2 * w.detach() ** 2)
    torch.testing.assert_close(grads[0], want, rtol=1e-13, atol=0)
    assert res.status.value == "converged"


def test_warm_started_solvers_on_a_zero_right_hand_side_return_the_exact_zero() -> None:
    """v = 0 (a validation loss flat in the weights at this hyperstep) after a hyperstep that
    left a non-zero warm start: the solution is x = 0. CG used to spend every HVP and report
    max_iterations with an infinite residual (so Implicit dropped its warm start), Neumann
    reported diverging with a residual of 1e306 (so Implicit solved again from 0)."""
    h = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=DT))
    v, x0 = (torch.zeros(3, dtype=DT),), (torch.ones(3, dtype=DT),)
    r = hg.CG(maxiter=10).solve(lambda u: (h @ u[0],), v, x0=x0)
    assert (r.status.value, r.iterations, float(r.residual)) == ("converged", 0, 0.0)
    assert torch.equal(r.solution[0], torch.zeros(3, dtype=DT))
    r = hg.Neumann(steps=5, alpha=0.5).solve(lambda u: (h @ u[0],), v, x0=x0)
    assert (r.status.value, r.iterations, float(r.residual)) == ("fixed", 5, 0.0)
    assert torch.equal(r.solution[0], torch.zeros(3, dtype=DT))


# ----------------------------------------------------------------------------- inner weight decay


@pytest.mark.parametrize(
    "inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.5),
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.5),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.5, maximize=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.5),
        lambda ps: torch.optim.SGD(
            [{"params": ps, "weight_decay": 0.5}, {"params": [], "weight_decay": 0.0}]
        ),
        lambda ps: torch.optim.Adadelta(ps, weight_decay=0.5),
        lambda ps: torch.optim.ASGD(ps, lr=1e-3, weight_decay=0.3, lambd=0.2),
        lambda ps: torch.optim.ASGD(ps, lr=1e-3, lambd=0.5, maximize=True),
    ],
    ids=[
        "sgd",
        "adam",
        "rmsprop",
        "sgd-maximize",
        "adamw-decoupled",
        "sgd-groups",
        "adadelta",
        "asgd-decay-and-lambd",
        "asgd-lambd-maximize",
    ],
)
def test_the_inner_optimisers_own_weight_decay_is_part_of_the_inner_problem(inner: Any) -> None:
    """SGD(weight_decay=d) (and Adam's, RMSprop's coupled L2) makes the weights settle where
    grad L_T + d w = 0, the optimum of L_T + d/2 |w|^2: the IFT must use H + d I. Implicit used
    H alone, a hypergradient 35% off with status 'converged'. Under maximize=True the rest point
    is grad L_T = d w (H - d I); AdamW's decoupled decay is not an L2 term: H alone, as documented.
    Adadelta's decay is coupled too (it was left out), and ASGD's lambd shrinks the weights by
    1 - lambd * eta a step, decay lambd on top of weight_decay (it was ignored).
    Closed form: ridge with per-feature penalties at that rest point."""
    p = ht.ridge()
    x, y = p.train_batch
    xv, yv = p.val_batch
    opt = inner(list(p.model.parameters()))
    group = opt.param_groups[0]
    total = group["weight_decay"] + (group["lambd"] if isinstance(opt, torch.optim.ASGD) else 0.0)
    assert total == 0.5
    d = 0.0 if group.get("decoupled_weight_decay", False) else 0.5 * (-1 if group.get("maximize") else 1)

    def w_star(r: Tensor, shift: float) -> Tensor:
        a = x.T @ x / len(y) + torch.diag(r.exp().reshape(-1)) + shift * torch.eye(x.shape[1], dtype=DT)
        return torch.linalg.solve(a, x.T @ y / len(y))

    r = p.hparams.raw[0].detach().clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(0.5 * ((xv @ w_star(r, 0.5 if d == 0 else d) - yv) ** 2).mean(), r)
    with torch.no_grad():  # the rest point of this optimiser (AdamW: that of SGD with decay 0.5)
        p.model.weight.copy_(w_star(r, 0.5 if d == 0 else d).reshape(1, -1))
    hopt = _implicit(p.model, p.hparams, p.train_loss, p.val_loss, hg.CG(maxiter=100, tol=1e-14), inner=opt)
    grads, info = hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
    assert info.solver_status == "converged"
    if d != 0:
        assert _rel(grads[0], exact) < 1e-10
    else:  # decoupled: the plain-H formula at these weights, v1 and mixed term as they are
        w = p.model.weight.detach().reshape(-1)
        h = x.T @ x / len(y) + torch.diag(p.hparams.raw[0].detach().exp().reshape(-1))
        v1 = xv.T @ (xv @ w - yv) / len(yv)
        plain = -(p.hparams.raw[0].detach().exp().reshape(-1) * w) * torch.linalg.solve(h, v1)
        assert _rel(grads[0].reshape(-1), plain) < 1e-10 and _rel(grads[0], exact) > 1e-2


def test_identity_and_zero_term_neumann_are_the_one_step_approximation() -> None:
    """Identity(scale=s) and Neumann(steps=0, alpha=s) both take H^-1 ~ s I: on the quadratic,
    dL_V/dlam = 2 lam + s B^T (w - c) exactly, with no HVP."""
    model, hp, train, val, _ = _quadratic(_A_SPD)
    want = 2 * hp.lam.detach() + 0.3 * _B.T @ (model.w.detach() - _C)
    for solver in (hg.Identity(scale=0.3), hg.Neumann(steps=0, alpha=0.3)):
        grads, info = _implicit(model, hp, train, val, solver).hypergradient(
            train_batch=_NO_DATA, val_batch=_NO_DATA
        )
        assert info.solver_iterations == 0 and info.solver_status == "fixed"
        torch.testing.assert_close(grads[0], want, rtol=1e-14, atol=0)


def test_a_hessian_subset_the_training_loss_does_not_reach_is_named_in_the_error() -> None:
    """Selecting only a head that train_loss never uses left no Hessian; the error said "is
    train_loss linear?", which it is not."""
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "v": nn.Linear(3, 2)}).to(DT)
    hp = nn.Module()
    hp.lam = nn.Parameter(torch.tensor(0.1, dtype=DT))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m["a"](b[0]), b[1]) + h.lam * (m["a"].weight ** 2).sum()

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m["a"](b[0]) + m["v"](b[0]), b[1])

    hopt = _implicit(model, hp, train, val, hg.CG(maxiter=5), hessian_subset=lambda n: n.startswith("v."))
    b = (torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT))
    with pytest.raises(ValueError, match=r"does not reach them.*hessian_subset"):
        hopt.hypergradient(train_batch=b, val_batch=b)


def test_imaml_proximal_meta_gradient_matches_closed_form() -> None:
    """iMAML (hypertorch's example, Rajeswaran et al. 2019): the task loss plus a proximal term
    reg/2 |w - phi|^2 around meta-parameters phi (the hyperparameters). For linear regression,
    w*(phi) = A^-1 (X^T y / n + reg phi) with A = X^T X / n + reg I, so the meta-gradient is
    reg A^-1 grad_w L_V: the mixed term is -reg I, a hyperparameter of the weights' own shape."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)  # few shots
    xv, yv = torch.randn(20, 5, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    reg = 2.0
    model, meta = nn.Module(), nn.Module()
    model.w = nn.Parameter(torch.zeros(5, dtype=DT))
    meta.phi = nn.Parameter(torch.randn(5, generator=g, dtype=DT))
    a = x.T @ x / len(y) + reg * torch.eye(5, dtype=DT)
    with torch.no_grad():
        model.w.copy_(torch.linalg.solve(a, x.T @ y / len(y) + reg * meta.phi))

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((b[0] @ m.w - b[1]) ** 2).mean() + 0.5 * reg * ((m.w - h.phi) ** 2).sum()

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((b[0] @ m.w - b[1]) ** 2).mean()

    exact = reg * torch.linalg.solve(a, xv.T @ (xv @ model.w.detach() - yv) / len(yv))
    for solver in (hg.CG(maxiter=20, tol=1e-14), hg.Neumann(steps=300, alpha=0.2)):
        grads, info = _implicit(model, meta, train, val, solver).hypergradient(
            train_batch=(x, y), val_batch=(xv, yv)
        )
        assert _rel(grads[0], exact) < 1e-11, type(solver).__name__
        assert info.solver_status in ("converged", "fixed")


@pytest.mark.parametrize("warm", [False, True])
def test_damped_cg_leaves_an_hvp_that_returns_its_input_alone(warm: bool) -> None:
    """H = I given as ``lambda u: u``: damped CG added the damping in place to the HVP's output,
    which was its own search direction (or, warm-started, its iterate), and returned 0.909 v
    (status max_iterations) instead of v / 1.5."""
    v = (torch.tensor([1.0, 2.0], dtype=DT),)
    x0 = (torch.zeros(2, dtype=DT),) if warm else None
    r = hg.CG(maxiter=5, tol=1e-14, damping=0.5).solve(lambda u: u, v, x0=x0)
    assert r.status.value == "converged"
    torch.testing.assert_close(r.solution[0], v[0] / 1.5, rtol=1e-14, atol=0)
    assert v[0].tolist() == [1.0, 2.0]


def test_a_detached_validation_loss_is_named_not_an_autograd_error() -> None:
    # raised autograd's "element 0 of tensors does not require grad" (Unrolled names it already)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    hp = hg.hparams.WeightDecay(model, per="layer").double()
    g = torch.Generator().manual_seed(1)
    b = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 2, generator=g, dtype=torch.float64),
    )

    def train(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1]) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1]).detach()

    hopt = hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    hopt.step(b)
    with pytest.warns(hg.DisconnectedWarning, match="hypergradient is exactly 0"):
        grads, info = hopt.hypergradient(train_batch=b, val_batch=b)
    assert not info.skipped and all(float(t.abs().max()) == 0.0 for t in grads)
