"""Round 27 (review): adversarial review of the fixes made earlier in round 27.

Bugs fixed with these tests (each failed before its fix):

1. ``Implicit`` treats the weights of a param group at a learning rate of 0 as constants of the
   solve (new in round 27, for a backbone frozen through its group's schedule). That holds for
   optimisers whose rate scales every step, not for ``torch.optim.Rprop``: Rprop reads ``lr``
   once, as the initial per-entry step size, and adapts its own step sizes from there, so a
   group whose rate is set to 0 later keeps training at full speed. Implicit then solved over
   the head only while the backbone kept moving to the joint rest point: a hypergradient of the
   wrong problem, silently (no warning).
2. The round-27 guard against custom ``autograd.Function`` backwards computed without recording
   (under ``no_grad``, from ``.detach()``, NumPy) checks only where the gradient flowing into the
   Function requires grad. At the top of the training loss's graph it is the seed of ones, a
   constant, so the commonest custom Function, a custom loss, went through unrefused: its
   curvature was missing from every HVP (Implicit: 0.168 for the true 0.0056, "converged";
   Unrolled's replay likewise), silently.

Passing tests here: correct custom loss Functions at the top of the graph (a differentiable
backward, and a linear one whose gradient is rightly a constant) are taken, with the plain loss's
hypergradient (new coverage: the controls for fix 2, which must not refuse them).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _ridge_batches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(48, 1, generator=g, dtype=DT)
    xv = torch.randn(24, 3, generator=g, dtype=DT)
    return (x, y), (xv, torch.sin(xv.sum(1, keepdim=True)))


def _train(m: nn.Module, h: hg.hparams.WeightDecay, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)


def _val(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _ift_all_weights(model: nn.Sequential, decays: list[float], train: tuple, val: tuple) -> torch.Tensor:
    """The IFT over every weight of the MLP at its current weights, written out with autograd:
    -(d grad_w L_T / d decay)' H^-1 grad_w L_V, per layer's decay (penalty d_l / 2 * ||w_l||^2)."""
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(theta: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s) for t, s in zip(theta.split(sizes), shapes, strict=True)]

    def fit(theta: torch.Tensor, b: tuple) -> torch.Tensor:
        w1, b1, w2, b2 = unflat(theta)
        out = nn.functional.linear(torch.tanh(nn.functional.linear(b[0], w1, b1)), w2, b2)
        return ((out - b[1]) ** 2).mean()

    def lt(theta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = unflat(theta)
        first = w1.square().sum() + b1.square().sum()
        pen = d[0] / 2 * first + d[1] / 2 * (w2.square().sum() + b2.square().sum())
        return fit(theta, train) + pen

    d = torch.tensor(decays, dtype=DT)
    h = torch.autograd.functional.hessian(lambda t: lt(t, d), theta0)
    theta = theta0.clone().requires_grad_()
    (v,) = torch.autograd.grad(fit(theta, val), theta)
    u = torch.linalg.solve(h, v)
    dd = d.clone().requires_grad_()
    theta = theta0.clone().requires_grad_()
    (g,) = torch.autograd.grad(lt(theta, dd), theta, create_graph=True)
    (mixed,) = torch.autograd.grad(g, dd, grad_outputs=u)
    return -mixed.detach()


# ------------------------------------------------------- 1. Rprop's group at lr 0 is not held


def test_implicit_rprop_group_set_to_lr_zero_still_trains_so_is_solved_over() -> None:
    """Rprop takes ``lr`` as the initial step size only (``state['step_size']``), so a group set
    to lr 0 after the first steps keeps training; the rest point the IFT solves for is the joint
    one, and Implicit must solve over the backbone too (as it does at any rate > 0). Against the
    IFT over all weights written out with autograd at the same weights."""
    train, val = _ridge_batches()
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.3)  # (raw = log(decay))
    opt = torch.optim.Rprop([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.01)
    hopt = hg.Implicit(
        model,
        hp,
        _train,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=80, tol=1e-13),
    )
    for _ in range(10):
        hopt.step(train)
    opt.param_groups[0]["lr"] = 0.0  # (as a LambdaLR returning 0 for the backbone would)
    backbone = [p.detach().clone() for p in model[0].parameters()]
    for _ in range(90):
        hopt.step(train)
    after = [p.detach() for p in model[0].parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(backbone, after, strict=True))
    assert moved > 1e-3  # Rprop kept training the backbone at lr 0 (torch's behaviour)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)
        grads, info = hopt.hypergradient(train_batch=train, val_batch=val)
    decays = hp.value.detach()
    assert torch.allclose(hp.raw[0].exp(), decays[0])
    expected = _ift_all_weights(model, decays.tolist(), train, val) * decays  # (d/d raw = d * d/d decay)
    assert info.solver_status == "converged"
    assert torch.allclose(torch.stack([g.reshape(()) for g in grads]), expected, rtol=1e-6, atol=1e-12), (
        [float(g) for g in grads],
        expected.tolist(),
    )


# ------------------------------------- 2. a custom loss Function with a graph-less backward


class _DetachedMSE(torch.autograd.Function):
    """A custom MSE loss whose backward computes its gradient without recording (no_grad): its
    derivative, the loss's curvature, is lost to a double backward."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(p, y)
        return ((p - y) ** 2).mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        p, y = ctx.saved_tensors
        with torch.no_grad():
            return g * 2 * (p - y) / p.numel(), None


class _MSE(torch.autograd.Function):
    """The same loss with a backward of differentiable operations (a correct custom loss)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(p, y)
        return ((p - y) ** 2).mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        p, y = ctx.saved_tensors
        return g * 2 * (p - y) / p.numel(), None


class _Mean(torch.autograd.Function):
    """A linear custom reduction that saves its input (for its shape) and returns a constant
    gradient: rightly graph-less, its second derivative is 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return (g / x.numel()).expand_as(x)


def _linear_run(method: str, loss: str) -> torch.Tensor:
    """Hypergradient of a ridge regression's decay, with the training loss written as ``loss``."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, dtype=DT)
    y = torch.randn(32, 1, dtype=DT)
    model = nn.Linear(3, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1)

    def tl(m: nn.Module, h: hg.hparams.WeightDecay, b: tuple) -> torch.Tensor:
        p = m(b[0])
        data = {
            "plain": lambda: ((p - b[1]) ** 2).mean(),
            "detached": lambda: _DetachedMSE.apply(p, b[1]),
            "custom": lambda: _MSE.apply(p, b[1]),
            "linear": lambda: _Mean.apply((p - b[1]) ** 2),
        }[loss]()
        return data + h.penalty(m)

    kw = {"solver": hg.CG(maxiter=50, tol=1e-12)} if method == "implicit" else {"steps": 5}
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(
        model,
        hp,
        tl,
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        **kw,
    )
    for _ in range(40 if method == "implicit" else 5):
        hopt.step((x, y))
    grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(x[:16], y[:16]))
    return grads[0].detach()


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_custom_loss_function_with_a_graph_less_backward_is_refused(method: str) -> None:
    """A custom loss ``autograd.Function`` whose backward runs under ``no_grad`` (not marked
    once_differentiable) loses the loss's curvature in every double backward. The round-27 guard
    refuses it only where the gradient flowing into the Function requires grad, never at the top
    of the graph, where the commonest custom Function, the loss, sits (the seed of ones): Implicit
    gave 0.168 for the true 0.0056, "converged"."""
    truth = _linear_run(method, "plain")
    assert abs(float(truth)) > 1e-4
    with pytest.raises(RuntimeError, match="without an autograd graph"):
        got = _linear_run(method, "detached")
        raise AssertionError(f"not refused: {float(got)} for {float(truth)}")


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize("loss", ["custom", "linear"])
def test_correct_custom_loss_functions_at_the_top_of_the_graph_are_taken(method: str, loss: str) -> None:
    """(Passes on the current code; new coverage, the control for the fix of the test above.)
    Custom Functions at the top of the training loss whose backward is differentiable (an MSE) or
    rightly constant (a linear reduction saving its input for its shape) are not refused, and
    give the plain loss's hypergradient."""
    truth = _linear_run(method, "plain")
    got = _linear_run(method, loss)
    assert torch.allclose(got, truth, rtol=1e-9, atol=1e-14), (float(got), float(truth))
