"""Round 20, peers: checks translated from peer libraries' suites (torchopt's implicit tests,
jaxopt's implicit-diff tests, higher's differentiable optimisers, hypertorch's examples,
laplace-torch's marginal likelihood) to hypergrad's API, each against an independent reference
written here in plain torch (closed forms, dense algebra, central differences), float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _ridge_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randn(20, generator=g, dtype=DT)
    xv = torch.randn(10, 3, generator=g, dtype=DT)
    yv = torch.randn(10, generator=g, dtype=DT)
    return x, y, xv, yv


def _ridge_exact(
    lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor
) -> float:
    """d/dlam of the validation loss at the ridge solution (closed form through a solve)."""
    lam = lam.detach().clone().requires_grad_(True)
    h = x.T @ x / len(x) + lam * torch.eye(x.shape[1], dtype=DT)
    w = torch.linalg.solve(h, x.T @ y / len(x))
    return float(torch.autograd.grad(0.5 * ((xv @ w - yv) ** 2).mean(), lam)[0])


# ------------------------------------------------------------- 1. jaxopt / torchopt custom_root


def test_a_solution_computed_with_its_graph_is_named_and_its_detached_leaf_is_exact() -> None:
    """jaxopt's and torchopt's ``custom_root`` tests solve ridge regression with an iterative
    solver and differentiate the solution implicitly. Translated naively, the inner loop keeps
    its graph (``create_graph=True``, as for an unrolled hypergradient) and the solution, a
    non-leaf that depends on ``lam``, goes to ``implicit_hypergradient``. Every derivative w.r.t.
    ``lam`` then also runs back through that history: autograd's own error about a freed graph
    (a retained one would count the unrolled path on top of the IFT's). The error must say what
    is wrong and how to pass the solution; the detached leaf gives the closed form."""
    x, y, xv, yv = _ridge_data()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    for _ in range(300):
        g = torch.autograd.grad(
            0.5 * ((x @ w - y) ** 2).mean() + 0.5 * lam * (w**2).sum(), w, create_graph=True
        )[0]
        w = w - 0.5 * g
    exact = _ridge_exact(lam, x, y, xv, yv)

    def run(w: torch.Tensor) -> float:
        def train() -> torch.Tensor:
            return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * lam * (w**2).sum()

        def val() -> torch.Tensor:
            return 0.5 * ((xv @ w - yv) ** 2).mean()

        g, _, _ = hg.implicit_hypergradient(train, val, [w], [lam], hg.CG(maxiter=20, tol=1e-14))
        return float(g[0])

    leaf = w.detach().requires_grad_(True)
    assert run(leaf) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match=r"weights\[0\].*graph.*hparams\[0\].*detach"):
        run(w)


def test_a_transform_of_the_hyperparameter_shared_by_both_closures_gives_the_closed_form() -> None:
    """jaxopt's implicit-diff tests parametrise the ridge penalty (``l2reg = exp(theta)``) once
    and pass the derived value to both the optimality condition and the outer loss. Written for
    ``implicit_hypergradient``, ``d = raw.exp()`` is computed once and read by both closures:
    the validation gradient freed ``exp``'s saved result, and the mixed term then failed with
    autograd's "backward through the graph a second time". The hypergradient in ``raw`` must be
    the closed form (a direct term through ``d`` in the validation loss as well)."""
    x, y, xv, yv = _ridge_data()
    raw = torch.tensor(-0.3, dtype=DT, requires_grad=True)
    d = raw.exp()  # computed once, outside the closures
    h = x.T @ x / len(x) + d.detach() * torch.eye(3, dtype=DT)
    w = torch.linalg.solve(h, x.T @ y / len(x)).requires_grad_(True)

    def exact() -> float:
        r = raw.detach().clone().requires_grad_(True)
        dd = r.exp()
        ws = torch.linalg.solve(x.T @ x / len(x) + dd * torch.eye(3, dtype=DT), x.T @ y / len(x))
        return float(torch.autograd.grad(0.5 * ((xv @ ws - yv) ** 2).mean() + 0.01 * dd, r)[0])

    def train() -> torch.Tensor:
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * d * (w**2).sum()

    def val() -> torch.Tensor:
        return 0.5 * ((xv @ w - yv) ** 2).mean() + 0.01 * d

    g, _, res = hg.implicit_hypergradient(train, val, [w], [raw], hg.CG(maxiter=10, tol=1e-14))
    assert res.status is hg.SolveStatus.CONVERGED
    assert float(g[0]) == pytest.approx(exact(), rel=1e-9)


# ------------------------------------------------------------------ 2. laplace-torch evidence


class _Reordering(nn.Module):
    """An MLP that runs the batch in another order inside and puts its outputs back in the
    order of the inputs (a model that sorts its examples, e.g. by length, and unsorts them):
    per example, an ordinary MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x[:, 0])  # (sorted by a feature)
        out = self.l2(torch.tanh(self.l1(x[order])))
        return out[torch.argsort(order)]


def _laplace_evidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prior: Any) -> torch.Tensor:
    """laplace-torch's ``FullLaplace(...).log_marginal_likelihood()`` written out: the log
    likelihood, the Gaussian prior at the weights, and the log determinant of the GGN posterior
    precision, with the Jacobian of the whole batch's outputs (cross terms included)."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [t.numel() for t in theta.values()]

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(
            zip(
                names,
                (c.view_as(theta[n]) for c, n in zip(flat.split(sizes), names, strict=True)),
                strict=True,
            )
        )
        return torch.func.functional_call(model, parts, (x,))

    flat = torch.cat([t.reshape(-1) for t in theta.values()])
    f = outputs(flat).detach()
    jac = torch.autograd.functional.jacobian(outputs, flat)  # (B, C, P)
    p = f.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (B, C, C)
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, lam, jac)
    prec = prior.precisions()
    p0 = torch.cat([(prec[n] * torch.ones_like(theta[n])).reshape(-1) for n in names])
    loglik = f.log_softmax(-1).gather(1, y[:, None]).sum()
    return (
        loglik - 0.5 * (p0 * flat**2).sum() + 0.5 * p0.log().sum() - 0.5 * torch.logdet(torch.diag(p0) + ggn)
    )


def test_evidence_of_a_model_that_reorders_its_batch_is_laplace_torchs() -> None:
    """laplace-torch's marginal-likelihood tests compare ``log_marginal_likelihood`` with a
    written-out Laplace evidence; here for a model that processes its batch in sorted order and
    returns the outputs in the original one (each example's output depends on it alone, as
    the evidence requires). ``kernel="auto"`` takes the layerwise kernel, whose layer rows it
    took for the examples at those positions (-11.822 nats for -11.838, and another prior
    gradient); the dense kernel and the reference agree."""
    model = _Reordering().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=2.0).double()
    with torch.no_grad():
        prior.raw[1].fill_(-0.5)
    ref = _laplace_evidence(model, x, y, prior)
    ref_grad = torch.autograd.grad(ref, list(prior.parameters()))
    dense = hg.log_evidence(model, x, y, prior, kernel="dense")
    assert float(dense.detach()) == pytest.approx(float(ref.detach()), abs=1e-9)
    auto = hg.log_evidence(model, x, y, prior)
    got = torch.autograd.grad(auto, list(prior.parameters()))
    assert float(auto.detach()) == pytest.approx(float(ref.detach()), abs=1e-9)
    for a, b in zip(got, ref_grad, strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-9)


# -------------------------------------------------------------- 3. higher's differentiable loop


def _higher_style_outer(h: Any, differentiable: bool) -> torch.Tensor:
    """Three steps on (w - lam)^2 / 2 from w = 0, lr 0.5, then w^2: a written-out update (what
    higher's differentiable optimiser does), or the real torch.optim.SGD (in-place steps under
    no_grad, what higher exists to replace)."""
    w = torch.zeros(1, dtype=DT, requires_grad=True)
    if differentiable:
        for _ in range(3):
            g = torch.autograd.grad((0.5 * (w - h[0]) ** 2).sum(), w, create_graph=True)[0]
            w = w - 0.5 * g
    else:
        opt = torch.optim.SGD([w], lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            (0.5 * (w - h[0]) ** 2).sum().backward()
            opt.step()
    return (w**2).sum()


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_an_inner_loop_that_steps_torch_optim_is_named_not_a_silent_zero(mode: str) -> None:
    """higher's tests check its differentiable optimisers against the real ones; a translation
    to ``unrolled_hypergradient`` that keeps the real ``torch.optim.SGD`` inside ``outer`` has
    the same value and no derivative path. The written-out loop gives the closed form
    ``2 w_3 (1 - 0.5^3)`` with ``w_3 = (1 - 0.5^3) lam``; the torch.optim one returned 0 without
    a word, where every HyperOptimizer warns ``DisconnectedWarning`` for a hyperparameter that
    reaches no loss."""
    lam = torch.tensor([0.5], dtype=DT, requires_grad=True)
    k = 1 - 0.5**3
    g, value = hg.unrolled_hypergradient(lambda h: _higher_style_outer(h, True), [lam], mode=mode)
    assert float(g[0]) == pytest.approx(2 * k * k * 0.5, rel=1e-12)
    assert float(value) == pytest.approx((k * 0.5) ** 2, rel=1e-12)
    with pytest.warns(hg.DisconnectedWarning, match=r"hparams\[0\].*torch\.optim"):
        g, value = hg.unrolled_hypergradient(lambda h: _higher_style_outer(h, False), [lam], mode=mode)
    assert float(value) == pytest.approx((k * 0.5) ** 2, rel=1e-12)
    assert float(g[0]) == 0.0


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize(("form", "kernel"), [("ntk", "auto"), ("ntk", "dense"), ("parametric", "auto")])
def test_evidence_and_prior_gradient_of_an_mlp_are_laplace_torchs(per: str, form: str, kernel: str) -> None:
    """laplace-torch's ``FullLaplace.log_marginal_likelihood`` and its gradient in the log prior
    precisions (what its ``optimize_prior_precision(method="marglik")`` follows), written out
    above, for each prior structure, kernel and form. (New here: test_hardening_peers makes this
    comparison against laplace-torch itself and is skipped where that is not installed.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=g)
    prior = hg.hparams.PriorPrecision(model, per=per, init=1.5).double()
    with torch.no_grad():
        for r in prior.raw:
            r.add_(0.3 * torch.randn(r.shape, generator=g, dtype=DT))
    ref = _laplace_evidence(model, x, y, prior)
    ref_grad = torch.autograd.grad(ref, list(prior.parameters()))
    got = hg.log_evidence(model, x, y, prior, form=form, kernel=kernel)
    grads = torch.autograd.grad(got, list(prior.parameters()))
    assert float(got.detach()) == pytest.approx(float(ref.detach()), abs=1e-10)
    for a, b in zip(grads, ref_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- 4. Betty's DARTS example


class _MixedOp(nn.Module):
    """DARTS's cell in miniature: candidate operations mixed by softmax(alpha), alpha the
    architecture (a hyperparameter, passed in by the loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ops = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        mix = alpha.softmax(0)
        acts = (torch.tanh, torch.relu, lambda t: t)
        return self.head(sum(m * act(op(x)) for m, act, op in zip(mix, acts, self.ops, strict=True)))


def test_darts_second_order_architecture_gradient_is_one_unrolled_step() -> None:
    """Betty's (and DARTS's) second-order architecture gradient: the validation loss after one
    virtual SGD step w' = w - xi (grad_w L_T(w, alpha) + wd w), differentiated in alpha through
    w' and directly (alpha is read by both losses). Unrolled(steps=1) after that real step is
    the same quantity; the reference is the step written out in plain autograd."""
    g = torch.Generator().manual_seed(3)
    xt, yt = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    xv, yv = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    xi, wd = 0.3, 3e-2
    arch = nn.ParameterDict({"alpha": nn.Parameter(torch.tensor([0.2, -0.1, 0.4], dtype=DT))})

    def train_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h["alpha"]), b[1])

    model = _MixedOp().double()
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    alpha = arch["alpha"].detach().clone().requires_grad_(True)

    def run(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x, alpha))

    grads = torch.autograd.grad(F.cross_entropy(run(w0, xt), yt), w0, create_graph=True)
    w1 = [w - xi * (gw + wd * w) for w, gw in zip(w0, grads, strict=True)]
    ref = torch.autograd.grad(F.cross_entropy(run(w1, xv), yv), alpha)[0]

    hopt = hg.Unrolled(
        model,
        arch,
        train_loss,
        train_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=xi, weight_decay=wd),
        outer_optimizer=torch.optim.Adam(arch.parameters(), lr=3e-3),
        steps=1,
    )
    hopt.step((xt, yt))
    got, info = hopt.hypergradient(val_batch=(xv, yv))
    torch.testing.assert_close(got[0], ref, rtol=1e-10, atol=1e-13)
    assert info.unrolled_steps == 1
