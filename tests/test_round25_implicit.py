"""Round 25, ``hg.Implicit``: combinations of inner-optimiser settings, solvers and
``hessian_subset`` that earlier rounds checked one at a time, each against a reference written
here in plain torch (float64):

* ``Neumann`` at the default step size (the learning rate of plain SGD) equals differentiating
  ``i + 1`` real SGD steps from the optimum, also when the inner optimiser climbs the training
  loss (``maximize=True``) with a coupled ``weight_decay`` in one of two param groups and the
  penalty is a bounded per-entry ``WeightDecay`` (the by-hand second derivatives): the solve is
  then of the negated Hessian, the decay enters with the opposite sign, and the penalty's
  coefficient is -1.
* A BatchNorm network (training mode: batch statistics) with ``hessian_subset`` selecting the
  BatchNorm affine weights and the head, a coupled decay on the selected weights only, ``Direct``
  and ``CG``: the IFT with the other weights held fixed, against a dense Hessian built here.
* Warm-started ``CG`` / ``Neumann`` under ``maximize=True`` across hypersteps of real training:
  the kept solution is that of the un-negated system, so warm starts keep helping, and the
  hypergradients approach ``Direct``'s at the same weights.

Found and fixed: ``Neumann(alpha="lr")`` with
``hg.optim.SGDHD`` (torch's SGD with its rate tuned online) warned that the rate "is not on the
Hessian's scale" and told the user to switch to ``alpha='power'``; the check was
``type(optimizer) is torch.optim.SGD``. No wrong hypergradient was found: the other tests pass on
the current code.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import hypergrad as hg

DT = torch.float64


def _data(n: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


def _mse(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return 0.5 * ((m(batch[0]) - batch[1]) ** 2).mean()


# --------------------------------------------------------------------------------------------
# Neumann at the learning rate == unrolled SGD steps, under maximize + coupled decay + bounded
# per-entry WeightDecay (by-hand second derivatives). (Earlier rounds checked the Neumann/unroll
# identity for plain descent, and maximize against closed forms with CG; not the identity with
# the negated solve, the sign-flipped coupled decay and the default step-size rule together.)


@pytest.mark.parametrize("steps", [0, 3])
def test_neumann_default_equals_unrolled_sgd_under_maximize_with_coupled_decay(steps: int) -> None:
    x, y = _data(24, 3, 0)
    xv, yv = _data(12, 3, 1)
    lr, wd_w = 0.2, 0.3
    model = nn.Linear(3, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.2, max=2.0).to(DT)
    with torch.no_grad():  # distinct decays per entry
        for k, r in enumerate(hp.parameters()):
            r.add_(0.3 * torch.arange(r.numel(), dtype=DT).reshape(r.shape) - 0.2 * k)

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return -(_mse(m, b) + h.penalty(m))  # climbed by the inner optimiser

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return _mse(m, b)

    inner = torch.optim.SGD(
        [{"params": [model.weight], "weight_decay": wd_w}, {"params": [model.bias]}], lr=lr, maximize=True
    )
    hopt = hg.Implicit(
        model, hp, train_loss, val_loss, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=hg.Neumann(steps=steps),
    )  # fmt: skip
    raws = [r.detach().clone().requires_grad_() for r in hp.parameters()]

    # plain torch: the objective SGD(maximize=True, weight_decay) descends, at raw decays r
    def objective(w: Tensor, b: Tensor, rs: list[Tensor]) -> Tensor:
        d_w, d_b = (2.0 * torch.sigmoid(r) for r in rs)  # WeightDecay(max=2): 2 sigmoid(raw)
        fit = 0.5 * ((x @ w.reshape(-1) + b - y[:, 0]) ** 2).mean()
        return fit + 0.5 * (d_w * w**2).sum() + 0.5 * (d_b * b**2).sum() + 0.5 * wd_w * (w**2).sum()

    theta = torch.zeros(4, dtype=DT)  # the optimum by Newton (quadratic: exact)
    fixed = [r.detach() for r in raws]
    for _ in range(3):
        f = lambda t: objective(t[:3].reshape(1, 3), t[3:], fixed)  # noqa: E731
        g = torch.autograd.functional.jacobian(f, theta)
        theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(f, theta), g)
    with torch.no_grad():
        model.weight.copy_(theta[:3].reshape(1, 3))
        model.bias.copy_(theta[3:])
    # steps + 1 real SGD steps from the optimum, differentiated w.r.t. the raw decays
    w, b = theta[:3].reshape(1, 3).clone(), theta[3:].clone()
    for _ in range(steps + 1):
        w_, b_ = w if w.requires_grad else w.requires_grad_(), b if b.requires_grad else b.requires_grad_()
        gw, gb = torch.autograd.grad(objective(w_, b_, raws), [w_, b_], create_graph=True)
        w, b = w_ - lr * gw, b_ - lr * gb
    vl = 0.5 * ((xv @ w.reshape(-1) + b - yv[:, 0]) ** 2).mean()
    expect = torch.autograd.grad(vl, raws)

    grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    for got, ref in zip(grads, expect, strict=True):
        assert ref.abs().max() > 1e-6  # (a meaningful comparison)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    assert info.solver_status == "fixed"
    assert info.solver_iterations == steps + 1  # the series' HVPs + the one that reads the curvature


# --------------------------------------------------------------------------------------------
# BatchNorm (batch statistics) + hessian_subset (BatchNorm affine + head) + a coupled decay on the
# selected weights only: Direct and CG against a dense reference over the selected weights.


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bn(self.body(x))))


@pytest.mark.parametrize("solver", [hg.Direct(), hg.CG(maxiter=60, tol=1e-13)], ids=["direct", "cg"])
def test_batchnorm_subset_with_group_decay_matches_dense_reference(solver: hg.LinearSolver) -> None:
    torch.manual_seed(0)
    x, y = _data(16, 3, 2)
    xv, yv = _data(10, 3, 3)
    model = _Net().to(DT)
    chosen = lambda n: n.startswith(("bn.", "head."))  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    sub = [n for n in names if chosen(n)]
    wd, raw0 = 0.2, -2.0
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: t.clone() for n, t in model.named_buffers()}
    sizes = [base[n].numel() for n in sub]

    def params(flat: Tensor) -> dict[str, Tensor]:
        out = dict(base)
        for n, t in zip(sub, flat.split(sizes), strict=True):
            out[n] = t.reshape(base[n].shape)
        return out

    def run(flat: Tensor, inp: Tensor) -> Tensor:
        state = {**params(flat), **{n: t.clone() for n, t in buffers.items()}}
        return functional_call(model, state, (inp,))

    def objective(flat: Tensor, raw: Tensor) -> Tensor:  # the penalty covers the selected weights
        fit = 0.5 * ((run(flat, x) - y) ** 2).mean()
        return fit + 0.5 * raw.exp() * (flat**2).sum() + 0.5 * wd * (flat**2).sum()

    raw = torch.tensor(raw0, dtype=DT)
    flat = torch.cat([base[n].reshape(-1) for n in sub])
    for _ in range(30):  # Newton to the optimum over the selected weights (the rest fixed)
        f = lambda t: objective(t, raw)  # noqa: E731
        flat = flat - torch.linalg.solve(
            torch.autograd.functional.hessian(f, flat), torch.autograd.functional.jacobian(f, flat)
        )
    hess = torch.autograd.functional.hessian(lambda t: objective(t, raw), flat)
    assert torch.linalg.eigvalsh(hess).min() > 1e-3  # a minimum
    v = torch.autograd.functional.jacobian(lambda t: 0.5 * ((run(t, xv) - yv) ** 2).mean(), flat)
    sol = torch.linalg.solve(hess, v)
    fl, rw = flat.clone().requires_grad_(), raw.clone().requires_grad_()
    g = torch.autograd.grad(objective(fl, rw), fl, create_graph=True)[0]
    expect = -torch.autograd.grad(g @ sol, rw)[0]

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params(flat)[n])
    hp = hg.hparams.WeightDecay(model, per="global", init=float(torch.exp(raw)), include=sub).to(DT)
    inner = torch.optim.SGD(
        [
            {"params": [p for n, p in model.named_parameters() if n in sub], "weight_decay": wd},
            {"params": [p for n, p in model.named_parameters() if n not in sub], "lr": 0.01},
        ],
        lr=0.05,
    )
    hopt = hg.Implicit(
        model, hp, lambda m, h, b: _mse(m, b) + h.penalty(m), lambda m, h, b: _mse(m, b),
        inner_optimizer=inner, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=solver, hessian_subset=chosen,
    )  # fmt: skip
    (got,), info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert abs(float(expect)) > 1e-4
    torch.testing.assert_close(got.reshape(()), expect, rtol=1e-8, atol=0.0)
    assert info.solver_status == "converged"
    if isinstance(solver, hg.Direct):
        assert info.solver_iterations == sum(sizes)  # one HVP per selected entry (13), not all 29
    assert info.solver_residual < 1e-10
    # the real BatchNorm statistics were not moved by the hyperstep's forward passes
    for n, t in model.named_buffers():
        torch.testing.assert_close(t, buffers[n], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Warm starts under maximize: the kept solution solves H x = v (the negated system has the same
# solution), so across hypersteps of real training the warm-started hypergradients approach the
# exact one. (Warm starts were checked for descent only.)


@pytest.mark.parametrize(
    "solver", [hg.CG(maxiter=2, warm_start=True), hg.Neumann(steps=3, warm_start=True)], ids=["cg", "neumann"]
)
def test_warm_start_under_maximize_approaches_direct(solver: hg.LinearSolver) -> None:
    x, y = _data(20, 3, 4)
    xv, yv = _data(15, 3, 5)

    def build(s: hg.LinearSolver) -> tuple[nn.Module, nn.Module, hg.Implicit]:
        torch.manual_seed(0)
        m = nn.Linear(3, 1).to(DT)
        hp = hg.hparams.WeightDecay(m, per="parameter", init=0.1).to(DT)
        hopt = hg.Implicit(
            m, hp, lambda mm, h, b: -(_mse(mm, b) + h.penalty(mm)), lambda mm, h, b: _mse(mm, b),
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.3, maximize=True, weight_decay=0.05),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0), solver=s,
        )  # fmt: skip
        return m, hp, hopt

    model, hp, hopt = build(solver)
    ref_model, ref_hp, ref = build(hg.Direct())
    errors = []
    for _ in range(6):
        for _ in range(30):
            hopt.step((x, y))
        with torch.no_grad():
            ref_model.load_state_dict(model.state_dict())
            for a, b in zip(ref_hp.parameters(), hp.parameters(), strict=True):
                a.copy_(b)
        exact, ref_info = ref.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
        assert ref_info.solver_status == "converged"
        info = hopt.hyper_step(train_batch=(x, y), val_batch=(xv, yv))
        assert info.solver_status in ("fixed", "max_iterations", "converged")
        got = torch.cat([p.grad.reshape(-1) for p in hp.parameters()])
        want = torch.cat([g.reshape(-1) for g in exact])
        errors.append(float((got - want).norm() / want.norm()))
    # from 0 the first hyperstep is rough; warm starts carry the solution on
    assert errors[0] > 1e-2
    assert errors[-1] < 3e-3, errors  # (CG: 7e-5, Neumann: 8e-4)
    assert errors[-1] < errors[0] / 30, errors


# --------------------------------------------------------------------------------------------
# Neumann(alpha="lr") with hg.optim.SGDHD (torch's SGD, its rate tuned online; no momentum, one
# group): the current rate is the step size of SGD's steps, and the series at it is the one plain
# SGD at that rate gives. The warning meant for Adam / several rates ("that rate is not on the
# Hessian's scale and the series may converge to the wrong answer or diverge. Use alpha='power'")
# fired for it, telling the user to switch to a rule the rate did not need.


def test_neumann_lr_with_sgdhd_does_not_warn_about_the_scale() -> None:
    x, y = _data(32, 3, 6)
    xv, yv = _data(16, 3, 7)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT)
    hopt = hg.Implicit(
        model, hp, lambda m, h, b: _mse(m, b) + h.penalty(m), lambda m, h, b: _mse(m, b),
        inner_optimizer=hg.optim.SGDHD(model.parameters(), lr=0.1, hypergrad_lr=1e-3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=hg.Neumann(steps=5, alpha="lr"),
    )  # fmt: skip
    for _ in range(20):
        hopt.step((x, y))
    lr = float(hopt.inner_optimizer.param_groups[0]["lr"])
    assert lr != 0.1  # (the rate moved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    # the series ran at the current rate: the same as Neumann(alpha=lr) given as a number
    hopt.solver = hg.Neumann(steps=5, alpha=lr)
    again, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    torch.testing.assert_close(grads[0], again[0], rtol=1e-12, atol=0.0)
    assert info.solver_status == "fixed"
    assert not [w for w in caught if "alpha='lr'" in str(w.message)], [str(w.message)[:120] for w in caught]
