r"""Bilevel problems with exact hypergradients, shared by the tests and the benchmarks.

Each factory returns a :class:`BilevelProblem` in float64 whose hypergradient is known
independently of hypergrad's own code paths:

* :func:`ridge` — ridge regression with one L2 penalty per feature; closed form in NumPy.
* :func:`quadratic` — a quadratic inner problem with per-coordinate penalties and a validation
  loss that also depends on the hyperparameters directly; closed form in NumPy.
* :func:`logistic` — L2-penalised logistic regression solved by Newton's method to
  :math:`\|\nabla\| < 10^{-13}`; hypergradient by a dense Hessian solve.

For your own small model, :func:`dense_ift_hypergradient` is the implicit-function-theorem
hypergradient by dense Hessian and mixed Jacobians (what ``hg.Implicit`` approximates at an inner
optimum), and :func:`central_difference` differentiates any function of a tensor numerically.

All use ``hg.hparams.WeightDecay(per="parameter")`` (raw = log decay), so the exact
hypergradient is w.r.t. the raw log-decays: :math:`d L_V/d r_j = d_j \, dL_V/dd_j`.

>>> import hypergrad.testing as ht
>>> p = ht.ridge(n_features=5)
>>> p.solve_inner()
>>> p.exact_hypergradient()[0].shape
torch.Size([1, 5])
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import _attributes_kept, differentiable_twice
from ._implicit import coupled_decay
from ._types import LossFn
from .hparams import WeightDecay

__all__ = [
    "BatchNormMLP",
    "BilevelProblem",
    "ridge",
    "quadratic",
    "logistic",
    "central_difference",
    "dense_ift_hypergradient",
]

DT = torch.float64


@dataclasses.dataclass
class BilevelProblem:
    """A bilevel problem with everything a ``HyperOptimizer`` needs, and its exact answers.

    Attributes:
        model, hparams, train_loss, val_loss, train_batch, val_batch: as passed to hypergrad.
        solve_inner: sets the model's weights to the inner optimum for the current hparams.
        exact_hypergradient: :math:`dL_V(w^*(\\lambda),\\lambda)/d\\lambda` at the current hparams,
            a tuple shaped like ``tuple(hparams.parameters())``, computed without hypergrad.
        hessian: the dense inner Hessian :math:`H` at the current weights (``(P, P)``).
        outer_objective: :math:`L_V(w^*(\\lambda), \\lambda)` as a float (re-solves the inner
            problem; for finite differences).
    """

    model: nn.Module
    hparams: nn.Module
    train_loss: LossFn
    val_loss: LossFn
    train_batch: Any
    val_batch: Any
    solve_inner: Callable[[], None]
    exact_hypergradient: Callable[[], tuple[Tensor, ...]]
    hessian: Callable[[], Tensor]
    outer_objective: Callable[[], float]


def _penalty(h: nn.Module, m: nn.Module) -> Tensor:
    return cast(WeightDecay, h).penalty(m)


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    x, y = b
    return 0.5 * ((m(x).squeeze(-1) - y) ** 2).mean()


def _weight(model: nn.Module) -> Tensor:
    return next(model.parameters())


def _check_size(**sizes: Any) -> None:
    """Raise a ``ValueError`` naming each argument that is not an integer >= 1."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Invalid {name}: {v!r} (need an integer >= 1)")


def ridge(
    n_train: int = 100,
    n_val: int = 60,
    n_features: int = 10,
    cond: float = 6.7,
    decay: float = 0.05,
    seed: int = 0,
) -> BilevelProblem:
    r"""Ridge regression, one penalty per feature.

    :math:`L_T = \frac{1}{2n}\|Xw - y\|^2 + \frac12\sum_j d_j w_j^2`,
    :math:`L_V = \frac{1}{2m}\|X_V w - y_V\|^2`. The training design is built so that
    :math:`H = X^\top X/n + \mathrm{diag}(d)` has condition number ``cond`` at the initial decays.
    Closed form: :math:`w^* = H^{-1}X^\top y/n`,
    :math:`dL_V/dd_j = -w^*_j\,(H^{-1}\nabla_w L_V)_j`.

    Shapes: model ``nn.Linear(n_features, 1, bias=False)``; batches ``(X (n, F), y (n,))``.

    Raises:
        ValueError: ``n_features > n_train`` (no design of that rank), a size below 1, or
            ``decay`` outside ``(0, 1)`` or ``cond < 1`` (the design's eigenvalues
            ``linspace(1, cond) - decay`` must be positive).
    """
    _check_size(n_train=n_train, n_val=n_val, n_features=n_features)
    if n_features > n_train:
        raise ValueError(
            f"ridge needs n_train >= n_features (got n_train={n_train}, n_features={n_features}): "
            "the training design is built with n_features nonzero singular values"
        )
    if not (0 < decay < 1 and cond >= 1):  # (NaN fails too)
        raise ValueError(
            f"Invalid decay={decay!r} or cond={cond!r}: need 0 < decay < 1 and cond >= 1, so that the "
            "eigenvalues of X^T X / n, linspace(1, cond) - decay, are positive"
        )
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
    eig = np.linspace(1.0, cond, n_features) - decay  # eigenvalues of X^T X / n
    u, _ = np.linalg.qr(rng.standard_normal((n_train, n_features)))
    x = u @ np.diag(np.sqrt(eig * n_train)) @ q.T
    w_true = rng.standard_normal(n_features)
    y = x @ w_true + 0.5 * rng.standard_normal(n_train)
    xv = rng.standard_normal((n_val, n_features)) * np.sqrt(eig.mean())
    yv = xv @ w_true + 0.5 * rng.standard_normal(n_val)
    model = nn.Linear(n_features, 1, bias=False).to(DT)
    hp = WeightDecay(model, per="parameter", init=decay)

    def decays() -> np.ndarray:
        return hp.raw[0].detach().exp().reshape(-1).numpy()

    def h_mat() -> np.ndarray:
        return x.T @ x / n_train + np.diag(decays())

    def w_star() -> np.ndarray:
        return np.linalg.solve(h_mat(), x.T @ y / n_train)

    def solve_inner() -> None:
        with torch.no_grad():
            _weight(model).copy_(torch.from_numpy(w_star()).reshape(1, -1))

    def exact() -> tuple[Tensor, ...]:
        w = w_star()
        gv = xv.T @ (xv @ w - yv) / n_val
        dd = -w * np.linalg.solve(h_mat(), gv)
        return (torch.from_numpy(dd * decays()).reshape(1, -1),)

    def outer() -> float:
        w = w_star()
        return float(0.5 * np.mean((xv @ w - yv) ** 2))

    return BilevelProblem(
        model,
        hp,
        lambda m, h, b: _mse(m, h, b) + _penalty(h, m),
        _mse,
        (torch.from_numpy(x), torch.from_numpy(y)),
        (torch.from_numpy(xv), torch.from_numpy(yv)),
        solve_inner,
        exact,
        lambda: torch.from_numpy(h_mat()),
        outer,
    )


class _Vector(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=DT))

    def forward(self, x: Tensor | None = None) -> Tensor:
        return self.w


def quadratic(dim: int = 8, rho: float = 0.1, seed: int = 0) -> BilevelProblem:
    r"""A quadratic with per-coordinate penalties and a direct validation term.

    :math:`L_T = \frac12 w^\top A w - b^\top w + \frac12\sum_j d_j w_j^2` (A positive definite),
    :math:`L_V = \frac12\|Cw - c\|^2 + \rho\sum_j d_j`. Closed form:
    :math:`w^* = (A + D)^{-1} b`, :math:`dL_V/dd_j = \rho - w^*_j\,((A+D)^{-1} C^\top(Cw^* - c))_j`.

    Shapes: model holds one vector ``w (dim,)``; batches ``(A (dim, dim), b (dim,))`` and
    ``(C (dim, dim), c (dim,))``.
    """
    _check_size(dim=dim)
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((dim, dim))
    a = m @ m.T / dim + 0.5 * np.eye(dim)
    b = rng.standard_normal(dim)
    c_mat = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    c_vec = rng.standard_normal(dim)
    model = _Vector(dim)
    hp = WeightDecay(model, per="parameter", init=0.3)

    def train_loss(mod: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        a_t, b_t = batch
        w = mod()
        return 0.5 * w @ a_t @ w - b_t @ w + _penalty(h, mod)

    def val_loss(mod: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        c_t, cv = batch
        w = mod()
        return 0.5 * ((c_t @ w - cv) ** 2).sum() + rho * cast(WeightDecay, h).raw[0].exp().sum()

    def decays() -> np.ndarray:
        return hp.raw[0].detach().exp().numpy()

    def w_star() -> np.ndarray:
        return np.linalg.solve(a + np.diag(decays()), b)

    def solve_inner() -> None:
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(w_star()))

    def exact() -> tuple[Tensor, ...]:
        w = w_star()
        gv = c_mat.T @ (c_mat @ w - c_vec)
        dd = rho - w * np.linalg.solve(a + np.diag(decays()), gv)
        return (torch.from_numpy(dd * decays()),)

    def outer() -> float:
        w = w_star()
        return float(0.5 * np.sum((c_mat @ w - c_vec) ** 2) + rho * decays().sum())

    return BilevelProblem(
        model,
        hp,
        train_loss,
        val_loss,
        (torch.from_numpy(a), torch.from_numpy(b)),
        (torch.from_numpy(c_mat), torch.from_numpy(c_vec)),
        solve_inner,
        exact,
        lambda: torch.from_numpy(a + np.diag(decays())),
        outer,
    )


def logistic(n_train: int = 80, n_val: int = 60, n_features: int = 6, seed: int = 0) -> BilevelProblem:
    r"""Binary logistic regression with one L2 penalty per weight (bias included).

    :math:`L_T = \frac1n\sum_i \ell(x_i^\top w + b, y_i) + \frac12\sum_j d_j \theta_j^2`,
    :math:`L_V` the mean validation log-loss. The inner problem is solved by Newton's method to a
    gradient norm below :math:`10^{-13}`; the hypergradient is the IFT formula with the dense
    Hessian :math:`X^\top S X / n + D` solved directly (valid at the exact optimum).

    Shapes: model ``nn.Linear(n_features, 1)``; batches ``(X (n, F), y (n,))`` with y in {0, 1}.
    """
    _check_size(n_train=n_train, n_val=n_val, n_features=n_features)
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(n_features, generator=g, dtype=DT)
    x = torch.randn(n_train, n_features, generator=g, dtype=DT)
    xv = torch.randn(n_val, n_features, generator=g, dtype=DT)
    y = (torch.rand(n_train, generator=g, dtype=DT) < torch.sigmoid(x @ w_true)).to(DT)
    yv = (torch.rand(n_val, generator=g, dtype=DT) < torch.sigmoid(xv @ w_true)).to(DT)
    model = nn.Linear(n_features, 1).to(DT)
    hp = WeightDecay(model, per="parameter", init=0.05)
    xa, xva = (
        torch.cat([x, torch.ones(n_train, 1, dtype=DT)], 1),
        torch.cat([xv, torch.ones(n_val, 1, dtype=DT)], 1),
    )

    def nll(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])

    def decays() -> Tensor:
        return torch.cat([hp.raw[0].detach().exp().reshape(-1), hp.raw[1].detach().exp().reshape(-1)])

    def theta() -> Tensor:
        return torch.cat([model.weight.detach().reshape(-1), model.bias.detach().reshape(-1)])

    def hess(th: Tensor) -> Tensor:
        p = torch.sigmoid(xa @ th)
        return xa.T @ (xa * (p * (1 - p))[:, None]) / n_train + torch.diag(decays())

    def grad(th: Tensor) -> Tensor:
        return xa.T @ (torch.sigmoid(xa @ th) - y) / n_train + decays() * th

    def newton() -> Tensor:
        th = torch.zeros(n_features + 1, dtype=DT)
        for _ in range(100):
            gr = grad(th)
            if float(gr.norm()) < 1e-13:
                break
            th = th - torch.linalg.solve(hess(th), gr)
        return th

    def solve_inner() -> None:
        th = newton()
        with torch.no_grad():
            model.weight.copy_(th[:n_features].reshape(1, -1))
            model.bias.copy_(th[n_features:])

    def exact() -> tuple[Tensor, ...]:
        th = newton()
        gv = xva.T @ (torch.sigmoid(xva @ th) - yv) / n_val
        dd = -th * torch.linalg.solve(hess(th), gv) * decays()
        return (dd[:n_features].reshape(1, -1), dd[n_features:].clone())

    def outer() -> float:
        th = newton()
        z = xva @ th
        return float(nn.functional.binary_cross_entropy_with_logits(z, yv))

    return BilevelProblem(
        model,
        hp,
        lambda m, h, b: nll(m, h, b) + _penalty(h, m),
        nll,
        (x, y),
        (xv, yv),
        solve_inner,
        exact,
        lambda: hess(theta()),
        outer,
    )


class BatchNormMLP(nn.Module):
    """A small nonlinear regression net with BatchNorm, for finite-difference and buffer tests.

    ``Linear(in, hidden) -> BatchNorm1d -> Tanh -> Linear(hidden, 1)``; input ``(B, in)``,
    output ``(B,)``.

    >>> import torch, hypergrad.testing as ht
    >>> ht.BatchNormMLP()(torch.randn(4, 3)).shape
    torch.Size([4])
    """

    def __init__(self, in_features: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def central_difference(f: Callable[[], float], tensor: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Central finite differences of ``f()`` w.r.t. each entry of ``tensor`` (perturbed in place and
    restored). Returns a tensor shaped like ``tensor``; ``2 * tensor.numel()`` calls of ``f``.

    :math:`\partial f/\partial t_i \approx (f(t + \epsilon e_i) - f(t - \epsilon e_i)) / 2\epsilon`,
    error :math:`O(\epsilon^2)` plus rounding :math:`O(u/\epsilon)`: use float64.

    Args:
        f: a function of nothing that reads ``tensor`` (e.g. :attr:`BilevelProblem.outer_objective`)
            and returns a number (a float, or a tensor of one element).
        tensor: the floating-point tensor to perturb (a hyperparameter's ``raw``; any layout, a
            transposed one too); its values are written through ``.data``, so autograd's version
            counter is not bumped.
        eps: the step :math:`\epsilon`, a finite number > 0 (default: 1e-5).

    Raises:
        TypeError: ``tensor`` is not a floating-point tensor (an integer one cannot hold
            :math:`t \pm \epsilon`), or ``f`` returns something that is not one number.
        ValueError: ``eps`` is not a finite number > 0.

    >>> import torch
    >>> t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> [round(g, 6) for g in central_difference(lambda: float((t ** 3).sum()), t).tolist()]  # 3 t^2
    [3.0, 12.0]
    """
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        what = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise TypeError(f"central_difference perturbs a floating-point tensor, got {what}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise ValueError(f"Invalid eps: {eps!r} (need a finite number > 0)")

    def value() -> float:
        v = f()
        if isinstance(v, Tensor) and v.numel() == 1:
            return float(v.detach())
        if isinstance(v, numbers.Real) and not isinstance(v, bool):  # (NumPy's scalars too)
            return float(v)
        got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
        raise TypeError(
            f"central_difference: f must return one number (a float or a one-element tensor), got {got}"
        )

    out = torch.zeros_like(tensor, memory_format=torch.contiguous_format)
    data = tensor.data
    # (entries by index, not through .view(-1): a transposed tensor has no flat view)
    for i, idx in enumerate(np.ndindex(*tensor.shape)):
        old = float(data[idx])
        try:
            data[idx] = old + eps
            fp = value()
            data[idx] = old - eps
            fm = value()
        finally:  # (an f that raises leaves the tensor as it was)
            data[idx] = old
        out.view(-1)[i] = (fp - fm) / (2 * eps)
    return out


def dense_ift_hypergradient(
    model: nn.Module,
    hparams: nn.Module,
    train_loss: LossFn,
    val_loss: LossFn,
    train_batch: Any,
    val_batch: Any,
    inner_optimizer: torch.optim.Optimizer | None = None,
) -> list[Tensor]:
    r"""The implicit-function-theorem hypergradient at the model's current weights, dense:

    .. math::
        \frac{dL_V}{d\lambda} = \partial_\lambda L_V - (\partial^2_{w\lambda} L_T)^\top H^{-1}
        \partial_w L_V, \qquad H = \partial^2_{ww} L_T,

    with :math:`w` the weights that require grad and :math:`L_T`, :math:`L_V` the user's losses
    on the real model (so hooks, parametrisations and buffers act as in training). A reference for
    tests and for checking a setup on a small model: it builds the :math:`P \times (P + H)`
    Jacobian of the training gradient row by row (:math:`P` backward passes) and solves densely,
    :math:`O(P^3)`; use float64 and a few hundred weights at most. Exact at an inner optimum
    (:math:`\partial_w L_T = 0`); elsewhere it is what ``hg.Implicit(solver=hg.Direct())``
    computes.

    Pass the ``inner_optimizer`` that trains the weights, as ``hg.Implicit`` is given it: the
    weights are then the ones it trains (not every parameter that requires grad), and a coupled
    ``weight_decay`` of it (SGD's, Adam's; not AdamW's) is part of the problem they solve, so the
    Hessian is :math:`H + \delta I`. (Left out, the reference was of another problem: 80% off
    ``Implicit`` with SGD's ``weight_decay=0.05`` on a small MLP, 30% off with its first layer
    outside the optimiser.)

    Returns:
        A list shaped like ``list(hparams.parameters())``.

    Raises:
        ValueError: no weight of ``model`` requires grad, a loss is not a scalar tensor, or
            the Hessian is singular (the weights are not at a strict minimum of ``train_loss``).

    >>> import torch, hypergrad.testing as ht
    >>> p = ht.ridge(n_features=3)
    >>> p.solve_inner()
    >>> ref = dense_ift_hypergradient(p.model, p.hparams, p.train_loss, p.val_loss,
    ...                               p.train_batch, p.val_batch)
    >>> torch.allclose(ref[0], p.exact_hypergradient()[0], rtol=1e-8)
    True
    """

    def grads(out: Tensor, xs: list[Tensor], **kw: Any) -> Tensor:
        gs = torch.autograd.grad(out, xs, allow_unused=True, **kw)
        return torch.cat(
            [(torch.zeros_like(x) if g is None else g).reshape(-1) for g, x in zip(gs, xs, strict=True)]
        )

    def scalar(out: Any, name: str) -> Tensor:
        if not isinstance(out, Tensor) or out.numel() != 1:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"dense_ift_hypergradient: {name} must return a scalar tensor, got {got}")
        return out.reshape(())

    ws: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    if inner_optimizer is not None:  # (the weights it trains: those hg.Implicit solves for)
        trained = {id(p) for group in inner_optimizer.param_groups for p in group["params"]}
        ws = [p for p in ws if id(p) in trained]
    hps: list[Tensor] = list(hparams.parameters())
    if not ws:
        raise ValueError("dense_ift_hypergradient: no parameter of model requires grad (no weights)")
    # Each loss runs on the buffers (BatchNorm's running statistics), train/eval modes and plain
    # state attributes (a carried hidden state) as they are now, as hg.Implicit's do, and leaves
    # them so: the training loss's update of the running statistics reached a validation loss
    # evaluated in eval mode (a reference 33% off Implicit(Direct) on a BatchNorm MLP), and the
    # model was left with other statistics (and in eval mode after such a val_loss)
    modules = [*model.modules(), *hparams.modules()]
    modes = [(m, m.training) for m in modules]
    kept = []
    for m in modules:
        kept += [(m._buffers, k, b, b.detach().clone()) for k, b in m._buffers.items() if b is not None]

    def restore() -> None:
        with torch.no_grad():
            for d, k, obj, value in kept:
                d[k] = obj
                obj.copy_(value)
        for m, flag in modes:
            m.training = flag

    # (operations whose kernels have a wrong second derivative, weight norm's, replaced: without
    # it a weight-normalised model's reference was 1.3% off the true hypergradient)
    try:
        with differentiable_twice(at_fixed_point=True):
            with _attributes_kept(modules):
                lt = scalar(train_loss(model, hparams, train_batch), "train_loss")
            g = grads(lt, ws, create_graph=True)
            jac = torch.stack([grads(g[i], ws + hps, retain_graph=True) for i in range(g.numel())])
            n_w = g.numel()
            hess, mixed = jac[:, :n_w], jac[:, n_w:]
            decay = None if inner_optimizer is None else coupled_decay(inner_optimizer, ws)
            if decay is not None:
                hess = hess + torch.diag(
                    torch.cat(
                        [
                            torch.full((w.numel(),), d, dtype=hess.dtype)
                            for w, d in zip(ws, decay, strict=True)
                        ]
                    )
                )
            del lt, g  # (the training graph, which may have saved the buffers, is done)
            restore()
            with _attributes_kept(modules):
                lv = scalar(val_loss(model, hparams, val_batch), "val_loss")
            gv = grads(lv, ws + hps)
    finally:
        restore()
    try:
        solved = torch.linalg.solve(hess, gv[:n_w])
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"dense_ift_hypergradient: the Hessian of train_loss w.r.t. the weights is singular "
            f"({error}): the weights are not at a strict minimum (solve the inner problem, or "
            "add a penalty that makes it strictly convex)"
        ) from error
    out = gv[n_w:] - mixed.T @ solved
    return [t.reshape(p.shape) for t, p in zip(torch.split(out, [p.numel() for p in hps]), hps, strict=True)]
