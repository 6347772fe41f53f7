"""Round 23 (hooks): module hooks and reparametrisations under every family.

Found and fixed (each test failed before its fix):

1. Gradient hooks that the *model* registers (``Tensor.register_hook`` in a forward, a module's
   ``register_full_backward_hook`` / ``register_full_backward_pre_hook``: gradient scaling,
   clipping or reversal built into the network) also run in the forward pass of ``val_loss``,
   and acted on the validation loss's gradient, the hypergradient's cotangent. Round 19 removed
   them from the training loss's graph once its gradient is taken; the validation loss's own
   were left on. ``Unrolled`` (reverse, ``checkpoint=True``): 22-50% off the central differences
   of the real training (forward mode, which takes no backward pass, matched them: the two modes
   disagreed); ``Implicit`` (every solver): exactly half the closed form of a ridge regression
   whose output gradient a hook halves; ``SelfTuning`` / ``selftuning_hypergradient``: half the
   central differences. (A hook that ``val_loss``'s own code registers on its output, as
   test_round12_stn's NaN injection, is the caller's say on that gradient and stays.)
2. ``MarginalLikelihood`` / ``log_evidence``: the same hooks scaled the network's Jacobians (both
   kernels), so the evidence and its hypergradient were those of another network (-9.22 for the
   closed form's -11.09 on Bayesian linear regression); round 19 fixed hooks on the weights only.
3. ``Implicit``: a post-accumulate-grad hook masking the gradient (pruned entries held at 0)
   moves training's rest point; no derivative Implicit takes runs it, and the hypergradient was
   75% off the closed form, without a word (``Unrolled`` warns about such hooks).
4. Every family: a hyperstep deleted a plain list attribute that a forward hook fills (features
   collected in eval mode, empty at the start so not "state", state once filled): the user's
   next forward pass crashed with ``AttributeError`` (in forward mode, the hyperstep itself).
   And what the hyperstep's own forward passes appended to such a list stayed there (Unrolled's
   validation passes; MarginalLikelihood's vmapped passes, whose escaped tensors crash any use).

Passing tests cover what earlier rounds did not: ``torch.nn.utils.prune`` and hooks registered
``with_kwargs`` / ``always_call`` in the three replay modes, forward mode with a model's gradient
hook, and a gradient mask written as a gradient hook on a pruned ridge.

Every hypergradient is checked in float64 against ground truth independent of the library:
central differences of plain ``torch.optim`` training, or a closed form.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64
S = 0.5  # the factor a gradient hook multiplies a gradient by

_VAL_HOOKS_BUG = (
    "gradient hooks the model's forward registers in val_loss act on the validation gradient "
    "(the hypergradient's cotangent)"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1).to(DT) for t in ts])


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


# ----------------------------------------------------------------------------- models with hooks


class _GradScaled(nn.Module):
    """An MLP whose hidden activation's gradient is scaled by ``S``, by a tensor hook its forward
    registers (``kind="tensor"``) or by a full backward pre-hook on the output layer
    (``kind="module"``): the function is the plain MLP's, only its gradients are shaped."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        if kind == "module":
            self.b.register_full_backward_pre_hook(lambda m, go: (S * go[0],))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.kind == "tensor" and h.requires_grad:
            h.register_hook(lambda g: S * g)
        return self.b(h)


def _data(n: int = 12) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)
    xv, yv = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    return [(x[i::3], y[i::3]) for i in range(3)], (xv, yv)


def _penalised_mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.mse_loss(m(b[0]), b[1])


def _unrolled_vs_real_training(
    make: Callable[[], nn.Module], eps: float = 1e-6, **kw: Any
) -> tuple[Tensor, Tensor]:
    """(Unrolled's hypergradient w.r.t. per-layer weight decays through all 3 steps, central
    differences of the same 3 steps of plain torch.optim training, hooks in force)."""
    batches, val = _data()

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = make().to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)
        return model, hp, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)

    model, hp, inner = build()
    hopt = hg.Unrolled(
        model, hp, _penalised_mse, _mse, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=len(batches), **kw,
    )  # fmt: skip
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=val)[0])

    def run(k: int, s: float) -> float:
        model, hp, inner = build()
        with torch.no_grad():
            list(hp.parameters())[k] += s  # (one decay per layer: one 0-dim raw tensor each)
        for b in batches:
            inner.zero_grad()
            _penalised_mse(model, hp, b).backward()
            inner.step()
        with torch.no_grad():
            return float(_mse(model, hp, val))

    n = len(list(hp.parameters()))
    fd = torch.tensor([(run(k, eps) - run(k, -eps)) / (2 * eps) for k in range(n)], dtype=DT)
    return got, fd


# ----------------------------------------------------------------------------- Unrolled


@pytest.mark.parametrize("checkpoint", [False, True], ids=["reverse", "ckpt"])
@pytest.mark.parametrize("kind", ["tensor", "module"])
def test_unrolled_gradient_hooks_of_the_model_do_not_scale_the_validation_gradient(
    kind: str, checkpoint: bool
) -> None:
    got, fd = _unrolled_vs_real_training(lambda: _GradScaled(kind), checkpoint=checkpoint)
    assert fd.abs().min() > 1e-3
    assert _rel(got, fd) < 1e-6, (got, fd)  # (bug: 0.22 off with the tensor hook, 0.50 with the module's)


def test_unrolled_forward_mode_with_a_gradient_hook_of_the_model_matches_the_real_training() -> None:
    # passes: forward mode takes no backward pass through the validation loss, so it is the
    # reference reverse mode must agree with (a module's backward hooks are refused there: tested
    # in round 19)
    got, fd = _unrolled_vs_real_training(lambda: _GradScaled("tensor"), mode="forward")
    assert fd.abs().min() > 1e-3
    assert _rel(got, fd) < 1e-6, (got, fd)


class _PrunedWithKwargHooks(nn.Module):
    """A layer pruned by ``torch.nn.utils.prune`` (``weight_orig`` trained, ``weight_mask`` a
    buffer, ``weight`` recomputed by a forward pre-hook), a forward pre-hook registered
    ``with_kwargs=True`` that rewrites the input from a parameter, and an ``always_call=True``
    forward hook (with kwargs) that rescales the output by a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        prune.l1_unstructured(self.a, "weight", amount=0.4)
        self.a.register_forward_pre_hook(
            lambda m, args, kwargs: ((1.5 * args[0] + m.bias.sum(),), kwargs), with_kwargs=True
        )
        self.b.register_forward_hook(
            lambda m, args, kwargs, out: out * m.weight.sum(), with_kwargs=True, always_call=True
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "kw", [{}, {"checkpoint": True}, {"mode": "forward"}], ids=["reverse", "ckpt", "forward"]
)
def test_unrolled_through_a_pruned_layer_and_kwarg_hooks_matches_the_real_training(
    kw: dict[str, Any],
) -> None:
    # passes; new coverage: torch.nn.utils.prune (only ever refused on STN layers before) and
    # hooks registered with_kwargs / always_call, in the three replay modes
    got, fd = _unrolled_vs_real_training(_PrunedWithKwargHooks, **kw)
    assert fd.abs().min() > 1e-3
    assert _rel(got, fd) < 1e-6, (got, fd)


# ----------------------------------------------------------------------------- Implicit


class _Ridge(nn.Module):
    """z = X w with the gradient reaching z scaled by ``S`` (a tensor hook, or a full backward
    pre-hook on an identity module after the layer)."""

    def __init__(self, kind: str, d: int) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(d, 1, bias=False)
        self.scale = nn.Identity()
        if kind == "module":
            self.scale.register_full_backward_pre_hook(lambda m, go: (S * go[0],))

    def forward(self, x: Tensor) -> Tensor:
        z = self.lin(x)
        if self.kind == "tensor" and z.requires_grad:
            z.register_hook(lambda g: S * g)
        return self.scale(z)


def _ridge_train(m: _Ridge, h: Any, b: Any) -> Tensor:
    return F.mse_loss(m(b[0]), b[1]) + 0.5 * h() * (m.lin.weight**2).sum()


@pytest.mark.parametrize("solver", [hg.Direct(), hg.CG(maxiter=50, tol=1e-12)], ids=["direct", "cg"])
@pytest.mark.parametrize("kind", ["tensor", "module"])
def test_implicit_gradient_hooks_of_the_model_do_not_scale_the_validation_gradient(
    kind: str, solver: Any
) -> None:
    # Training with the hook in force rests where S * (2/n) X^T (X w - y) + lam w = 0, so
    # w*(lam) = (S (2/n) X^T X + lam I)^-1 S (2/n) X^T y in closed form; the hypergradient is the
    # derivative of the validation loss at w*(lam) w.r.t. the raw log(lam).
    g = torch.Generator().manual_seed(0)
    n, d, lam = 10, 3, 0.3
    x, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)
    xv, yv = torch.randn(8, d, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)

    def w_star(lam_: Tensor) -> Tensor:
        a = S * 2 / n * x.T @ x + lam_ * torch.eye(d, dtype=DT)
        return torch.linalg.solve(a, S * 2 / n * x.T @ y)

    raw = torch.tensor(lam, dtype=DT).log().requires_grad_(True)
    want = torch.autograd.grad(F.mse_loss(xv @ w_star(raw.exp()), yv), raw)[0]

    model = _Ridge(kind, d).to(DT)
    with torch.no_grad():
        model.lin.weight.copy_(w_star(torch.tensor(lam, dtype=DT)).T)
    hp = hg.hparams.Hparam(lam, "positive", dtype=DT)
    hopt = hg.Implicit(
        model, hp, _ridge_train, _mse, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=solver,
    )  # fmt: skip
    got = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))[0][0]
    assert abs(float(want)) > 0.1
    torch.testing.assert_close(got.reshape(()), want, rtol=1e-8, atol=0)  # (bug: exactly S * want)


# ----------------------------------------------------------------------------- SelfTuning


@pytest.mark.parametrize("kind", ["tensor", "module"])
def test_selftuning_gradient_hooks_of_the_model_do_not_scale_the_validation_gradient(kind: str) -> None:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3), learn_scale=False).to(DT)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = hg.nn.StnLinear(3, 5, hp.size), nn.Linear(5, 1)
            if kind == "module":
                self.b.register_full_backward_pre_hook(lambda m, go: (S * go[0],))

        def forward(self, x: Tensor, h: Any) -> Tensor:
            z = torch.tanh(self.a(x, h.draw(len(x))))
            if kind == "tensor" and z.requires_grad:
                z.register_hook(lambda g: S * g)
            return self.b(z)

    net = Net().to(DT)
    with torch.no_grad():  # (a response that is not 0 at initialisation)
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)
    got = hg.selftuning_hypergradient(lambda: F.mse_loss(net(x, hp), y), hp, 0.0)[0][0]

    def f() -> float:
        with torch.no_grad():
            return float(F.mse_loss(net(x, hp), y))

    want = central_difference(f, hp.raw, eps=1e-6)
    assert want.abs().min() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # (bug: exactly S * want)


# ----------------------------------------------------------------------------- MarginalLikelihood


@pytest.mark.parametrize("kernel", ["auto", "dense"])
@pytest.mark.parametrize("kind", ["tensor", "module"])
def test_marginal_likelihood_jacobians_are_the_networks_whatever_its_gradient_hooks(
    kind: str, kernel: str
) -> None:
    # Bayesian linear regression: at the MAP weights the linearised-Laplace evidence is the exact
    # one, log N(y; 0, sigma^2 I + X X^T / delta), and so is its derivative w.r.t. log delta (the
    # log joint is stationary in the weights there). A hook halving the output's gradient shapes
    # the MAP steps only (round 19 checked hooks on the weights; these the forward registers
    # were not covered). (Bug: log evidence -9.22 for the closed form's -11.09.)
    g = torch.Generator().manual_seed(0)
    n, d, delta, sigma = 7, 3, 0.7, 0.6
    x, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    model = _Ridge(kind, d).to(DT)
    with torch.no_grad():
        a = x.T @ x / sigma**2 + delta * torch.eye(d, dtype=DT)
        model.lin.weight.copy_(torch.linalg.solve(a, x.T @ y / sigma**2).reshape(1, d))
    raw = torch.tensor(delta, dtype=DT).log().requires_grad_(True)
    cov = sigma**2 * torch.eye(n, dtype=DT) + x @ x.T / raw.exp()
    want = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), cov).log_prob(y)
    (dwant,) = torch.autograd.grad(want, raw)

    prior = hg.hparams.PriorPrecision(model, init=delta).to(DT)
    got = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=sigma, kernel=kernel)
    (dgot,) = torch.autograd.grad(got, list(prior.parameters()))
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dgot.reshape(()), dwant, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- post-accumulate hooks


def _masked_ridge(how: str) -> tuple[Tensor, Tensor, hg.Implicit]:
    """A ridge regression whose entries 1 and 3 are pruned: their gradient masked by a gradient
    hook (``how="hook"``) or by a post-accumulate-grad hook (``"post"``), so training holds them
    at 0; the weights start at training's rest point. Returns (hypergradient, closed form, hopt)."""
    g = torch.Generator().manual_seed(0)
    n, d, lam = 10, 4, 0.3
    x, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)
    xv, yv = torch.randn(8, d, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=DT)
    free = mask.bool()

    def w_star(lam_: Tensor) -> Tensor:  # the free entries' ridge solution, the others 0
        a = 2 / n * x[:, free].T @ x[:, free] + lam_ * torch.eye(int(free.sum()), dtype=DT)
        w = torch.zeros(d, 1, dtype=DT)
        w[free] = torch.linalg.solve(a, 2 / n * x[:, free].T @ y)
        return w

    raw = torch.tensor(lam, dtype=DT).log().requires_grad_(True)
    want = torch.autograd.grad(F.mse_loss(xv @ w_star(raw.exp()), yv), raw)[0]

    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(w_star(torch.tensor(lam, dtype=DT)).T)
    if how == "hook":
        model.weight.register_hook(lambda g: g * mask)
    else:

        def post(p: Tensor) -> None:
            assert p.grad is not None
            p.grad.mul_(mask)

        model.weight.register_post_accumulate_grad_hook(post)
    hp = hg.hparams.Hparam(lam, "positive", dtype=DT)
    hopt = hg.Implicit(
        model, hp, lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + 0.5 * h() * (m.weight**2).sum(), _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=hg.Direct(),
    )  # fmt: skip
    rest = model.weight.detach().clone()
    for _ in range(2):  # training rests there: the masked entries do not move
        hopt.step((x, y))
    torch.testing.assert_close(model.weight.detach(), rest, rtol=0, atol=1e-12)
    got = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))[0][0]
    return got.reshape(()), want, hopt


def test_implicit_follows_a_gradient_mask_written_as_a_gradient_hook() -> None:
    # (the advice of the warning below; the mask hook's closed form was covered in round 7 for a
    # weight decay's own masked entries, here on a pruned ridge's)
    got, want, _ = _masked_ridge("hook")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_implicit_names_a_post_accumulate_grad_hook_it_cannot_follow() -> None:
    with pytest.warns(UserWarning, match=r"\['weight'\].*register_post_accumulate_grad_hook"):
        got, want, hopt = _masked_ridge("post")
    assert abs(float(got - want)) > 0.5 * abs(float(want))  # (what the warning is about: 0.0088 vs 0.035)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        hopt.hypergradient(train_batch=(torch.randn(4, 4, dtype=DT), torch.randn(4, 1, dtype=DT)),
                           val_batch=(torch.randn(4, 4, dtype=DT), torch.randn(4, 1, dtype=DT)))  # fmt: skip


# ----------------------------------------------------------------------------- a list a hook fills


class _Collecting(nn.Module):
    """Collects the hidden features of every evaluation pass in a plain list attribute, by a
    forward hook (for analysis after validation: the list starts empty)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, out)
        self.features: list[Tensor] = []
        self.a.register_forward_hook(lambda m, i, o: None if m.training else self.features.append(o.detach()))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


_METHODS = ["implicit", "unrolled", "forward", "ckpt", "marglik"]


def _val_in_eval(m: nn.Module, h: Any, b: Any) -> Tensor:
    m.eval()
    try:
        return F.mse_loss(m(b[0]), b[1])
    finally:
        m.train()


# (fixed: a hyperstep deleted a plain list attribute that a forward hook filled, empty and so no
# state at the start, and left what its own forward passes appended to a filled one)


@pytest.mark.parametrize(
    "method, seen",
    [
        *(pytest.param(m, 0) for m in _METHODS),
        pytest.param("implicit", 1),  # (passes: its losses run on copies of the list)
        *(pytest.param(m, 1) for m in _METHODS[1:]),
    ],
)
def test_a_hyperstep_leaves_a_list_a_forward_hook_fills_in_eval_mode(method: str, seen: int) -> None:
    torch.manual_seed(0)
    batches, val = _data()
    model = _Collecting(3 if method == "marglik" else 2).to(DT)
    features = model.features
    if seen:  # the user evaluated once already
        model.eval()
        with torch.no_grad():
            model(val[0])
        model.train()
    hopt: hg.HyperOptimizer
    if method == "marglik":
        hp: nn.Module = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0)})
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=12,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), subset_size=4, burn_in=1, every=1,
        )  # fmt: skip
        labelled = [(x, y.argmax(1)) for x, y in batches]
        for b in labelled:
            hopt.step(b)
        model.eval()  # (the bound needs the model deterministic: its usual setting)
        hopt.hyper_step(train_batch=labelled[0])
    else:
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)
        kw: dict[str, Any] = {"solver": hg.CG(maxiter=3)} if method == "implicit" else {"steps": 2}
        if method == "forward":
            kw["mode"] = "forward"
        elif method == "ckpt":
            kw["checkpoint"] = True
        cls = hg.Implicit if method == "implicit" else hg.Unrolled
        hopt = cls(
            model, hp, _penalised_mse, _val_in_eval,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), **kw,
        )  # fmt: skip
        for b in batches:
            hopt.step(b)
        hopt.hyper_step(train_batch=batches[0], val_batch=val)
    # the hyperstep left the attribute as it was: the same list, with what the user's own
    # evaluations put there only, which the next one extends
    assert model.__dict__.get("features") is features and len(features) == seen
    model.eval()
    with torch.no_grad():
        model(val[0])
    assert len(features) == seen + 1
    assert float(torch.stack([f.abs().mean() for f in features]).sum()) > 0
