"""Round 19 (the session's own changes): Unrolled's per-step overheads, kept exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _mlp(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o)).to(DT)


def test_a_fused_optimizer_other_than_the_outer_one_is_seen_by_the_replay() -> None:
    """Unrolled notices hyperparameters moved by any fused ``torch.optim`` step (whose kernels do
    not bump version counters), not only by its own outer optimiser: here the run's outer
    optimiser is plain SGD and the user steps the hyperparameters with a separate fused Adam on
    ``hypergradient()``'s output. Before, only a fused *outer* optimiser was checked (by comparing
    every value at every step: 0.5 ms a step for 269k decays), and this run replayed the steps
    taken after the outer step with the old values (3e-6 off). Its hypergradients must equal those of the
    same run stepping with a non-fused Adam (whose writes bump version counters)."""
    torch.manual_seed(0)
    xs, ys = torch.randn(10, 6, 3, dtype=DT), torch.randn(10, 6, 1, dtype=DT)
    val = (torch.randn(7, 3, dtype=DT), torch.randn(7, 1, dtype=DT))

    def loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    def run(fused: bool) -> list[Tensor]:
        torch.manual_seed(3)
        model = _mlp(3, 4, 1)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        outer = torch.optim.SGD(hp.parameters(), lr=0.1)  # never stepped
        mine = torch.optim.Adam(hp.parameters(), lr=0.2, fused=fused, foreach=None if fused else False)
        hopt = hg.Unrolled(model, hp, loss, loss, inner_optimizer=inner, outer_optimizer=outer, steps=3)
        out = []
        for i in range(10):
            hopt.step((xs[i], ys[i]))
            if i % 2 == 1:  # (every 2 steps, K = 3: a move inside a window)
                grads, _ = hopt.hypergradient(val_batch=val)
                out.append(torch.cat([g.reshape(-1) for g in grads]))
                for p, g in zip(hp.parameters(), grads, strict=True):
                    p.grad = g
                mine.step()
        grads, _ = hopt.hypergradient(val_batch=val)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
        return out

    plain, fused = run(fused=False), run(fused=True)
    assert len(plain) == 6
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(plain[0], plain[-1])  # (the outer steps did move them)


def test_fused_steps_are_counted_per_tensor() -> None:
    """The write counter moves with a fused optimiser's step (the version counter does not) and
    with an in-place write, and stays for a non-fused optimiser that holds other tensors."""
    from hypergrad._functional import write_count

    p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    p.grad, q.grad = torch.randn(5), torch.randn(5)
    before = write_count(p)
    torch.optim.Adam([p], lr=0.1, fused=True).step()
    after = write_count(p)
    assert after != before and after[0] == before[0]  # (the fused kernel left _version alone)
    torch.optim.SGD([q], lr=0.1).step()
    assert write_count(p) == after
    with torch.no_grad():
        p.add_(1.0)
    assert write_count(p) != after


def _weighted_ridge(s: Tensor, x: Tensor, y: Tensor, decay: Tensor) -> Tensor:
    """The minimiser of mean(s ⊙ (Xw + b - y)²)/... in closed form: the loss below, with the
    per-example weights s applied to the prediction's gradient (a hook), is the gradient of
    (1/n) Σ s_i (x_i w + b - y_i)² + ½ d |w|² (the bias undecayed)."""
    n = x.shape[0]
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    a = xa.T @ (s[:, None] * xa) * (2 / n)
    a[:-1, :-1] += torch.diag(decay)
    rhs = xa.T @ (s * y[:, 0]) * (2 / n)
    return torch.linalg.solve(a, rhs)


def test_implicit_with_a_gradient_hook_in_train_loss_matches_the_closed_form() -> None:
    """A hook that train_loss puts on an activation (here per-example importance weights applied
    to the prediction's gradient, as a reweighting script does with ``pred.register_hook``) shapes
    the training gradient, whose fixed point the inner optimiser reaches. The Hessian-vector
    products differentiate that gradient again through the same forward graph, where the hook
    ran a second time on their cotangents (the Hessian X^T S² X instead of X^T S X: 20% off here,
    silently). Checked against weighted ridge regression in closed form."""
    torch.manual_seed(0)
    n, k = 24, 3
    x, y = torch.randn(n, k, dtype=DT), torch.randn(n, 1, dtype=DT)
    xv, yv = torch.randn(10, k, dtype=DT), torch.randn(10, 1, dtype=DT)
    s = torch.rand(n, dtype=DT) * 3 + 0.2
    model = nn.Linear(k, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.3, include=["weight"])

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        pred = m(b[0])
        if pred.requires_grad:
            pred.register_hook(lambda g: g * s[:, None])
        return ((pred - b[1]) ** 2).mean() + h.penalty(m)

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    raw = hp.raw[0].detach().clone().reshape(-1)

    def outer(r: Tensor) -> Tensor:
        wb = _weighted_ridge(s, x, y, r.exp())
        return ((xv @ wb[:-1, None] + wb[-1] - yv) ** 2).mean()

    wb = _weighted_ridge(s, x, y, raw.exp())
    with torch.no_grad():
        model.weight.copy_(wb[:-1][None])
        model.bias.copy_(wb[-1:])
    for solver in (hg.Direct(), hg.CG(maxiter=50, tol=1e-13)):
        hopt = hg.Implicit(
            model, hp, train_loss, val_loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=solver,
        )
        (got,), _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
        ref = torch.func.grad(outer)(raw)
        torch.testing.assert_close(got.reshape(-1), ref, rtol=1e-8, atol=1e-11)


def test_weight_decay_include_takes_a_list_of_names() -> None:
    """``include=["weight"]`` was a ``TypeError: 'list' object is not callable`` from inside the
    constructor; a list (or one name) now selects those parameters, like the predicate, and a
    name the model lacks is an error that names it and lists the model's parameters."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    by_list = hg.hparams.WeightDecay(model, per="layer", include=["0.weight", "2.weight"])
    by_fn = hg.hparams.WeightDecay(model, per="layer", include=lambda n: n.endswith("weight"))
    assert list(by_list.names) == list(by_fn.names) == ["0.weight", "2.weight"]
    assert list(hg.hparams.WeightDecay(model, include="2.bias").names) == ["2.bias"]
    with pytest.raises(ValueError, match=r"include names parameter\(s\) \['1.weight'\].*0.weight"):
        hg.hparams.WeightDecay(model, include=["1.weight"])
    with pytest.raises(TypeError, match="include must be a function of a parameter name"):
        hg.hparams.WeightDecay(model, include=3)  # type: ignore[arg-type]


class _RunningAug(nn.Module):
    """An augmentation network (the hyperparameters) that keeps a running mean of its inputs as a
    plain attribute, updated by every forward pass in training mode, and subtracts it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DT)
        self.mean = torch.zeros(3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return x - self.mean + 0.1 * torch.tanh(self.lin(x))


@pytest.mark.parametrize("mode,checkpoint", [("reverse", False), ("reverse", True), ("forward", False)])
def test_unrolled_hypersteps_leave_the_hyperparameter_modules_plain_attributes_alone(
    mode: str, checkpoint: bool
) -> None:
    """A run with hypersteps at outer learning rate 0 ends exactly where the same run without
    them does, the hyperparameter module's plain attribute state included: the replay ran the
    augmentation network's forward again and advanced its running mean K extra times per
    hyperstep (the model's own plain attributes were already kept; the Implicit counterpart is in
    test_round19_implicit)."""
    torch.manual_seed(0)
    xs, ys = torch.randn(9, 6, 3, dtype=DT), torch.randn(9, 6, 1, dtype=DT)
    val = (torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT))

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(h(b[0])) - b[1]) ** 2).mean()

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    def run(hyper: bool) -> tuple[list[Tensor], Tensor]:
        torch.manual_seed(1)
        model, aug = _mlp(3, 4, 1), _RunningAug()
        hopt = hg.Unrolled(
            model, aug, train_loss, val_loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(aug.parameters(), lr=0.0),
            steps=3,
            mode=mode,
            checkpoint=checkpoint,
        )
        for i in range(9):
            hopt.step((xs[i], ys[i]))
            if hyper and i % 3 == 2:
                hopt.hyper_step(val_batch=val)
        return [p.detach().clone() for p in model.parameters()], aug.mean.clone()

    (w0, m0), (w1, m1) = run(False), run(True)
    torch.testing.assert_close(m1, m0, rtol=0, atol=0)
    for a, b in zip(w1, w0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_heavy_ball_node_is_torch_sgd_and_differentiates_like_its_ops(dampening: float) -> None:
    """The replay's one-node SGD momentum step: its values are torch.optim.SGD's bit for bit, and
    its derivatives (reverse, reverse-over-reverse, forward, under torch.func) those of the ops."""
    from hypergrad._inner import _HeavyBall

    torch.manual_seed(0)
    p, b, d = (torch.randn(7, dtype=DT, requires_grad=True) for _ in range(3))

    def node(p: Tensor, b: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        return _HeavyBall.apply(p, b, d, 0.1, 0.9, dampening)

    assert torch.autograd.gradcheck(node, (p, b, d), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(node, (p, b, d))
    # torch.optim.SGD with a momentum buffer already there
    w = nn.Parameter(p.detach().clone())
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=dampening)
    opt.state[w]["momentum_buffer"] = b.detach().clone()
    w.grad = d.detach().clone()
    opt.step()
    new_p, new_b = node(p.detach(), b.detach(), d.detach())
    assert torch.equal(new_p, w.detach()) and torch.equal(new_b, opt.state[w]["momentum_buffer"])

    def scalar(p: Tensor, b: Tensor, d: Tensor) -> Tensor:
        a, c = node(p, b, d)
        return (a**2).sum() + (c**3).sum()

    def by_ops(p: Tensor, b: Tensor, d: Tensor) -> Tensor:
        c = b.mul(0.9).add(d, alpha=1 - dampening)
        return (p.add(c, alpha=-0.1) ** 2).sum() + (c**3).sum()

    for a, c in zip(
        torch.func.grad(scalar, argnums=(0, 1, 2))(p, b, d),
        torch.func.grad(by_ops, argnums=(0, 1, 2))(p, b, d),
        strict=True,
    ):
        torch.testing.assert_close(a, c, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_loss_that_casts_a_float64_batch_is_accepted_and_one_that_does_not_is_named(method: str) -> None:
    """float64 data straight from NumPy (``torch.from_numpy``) with a float32 model and a loss that
    casts it, ``model(x.float())``, as plain PyTorch allows: it was refused up front ("convert the
    batch"). Now it runs, with the same results as a batch converted beforehand; a loss that does
    not cast still gets the clear error naming the batch (from the loss's dtype failure)."""
    torch.manual_seed(0)
    x64, y64 = torch.randn(16, 3, dtype=DT), torch.randn(16, 1, dtype=DT)
    xv64, yv64 = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)

    def casting(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0].float()) - b[1].float()) ** 2).mean() + h.penalty(m)

    def run(loss: Callable[..., Tensor], cast_first: bool) -> list[Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        kw = dict(inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1))  # fmt: skip
        hopt = (
            hg.Implicit(model, hp, loss, loss, **kw)
            if method == "implicit"
            else hg.Unrolled(model, hp, loss, loss, steps=2, **kw)
        )
        tb, vb = (x64, y64), (xv64, yv64)
        if cast_first:
            tb, vb = (x64.float(), y64.float()), (xv64.float(), yv64.float())
        for _ in range(3):
            hopt.step(tb)
        hopt.hyper_step(train_batch=tb, val_batch=vb)
        return [p.detach().clone() for p in (*model.parameters(), *hp.parameters())]

    for a, b in zip(run(casting, False), run(casting, True), strict=True):
        assert torch.equal(a, b)

    def plain(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    with pytest.raises(ValueError, match=r"batch holds a torch.float64 tensor, but the model.s parameters"):
        run(plain, False)
