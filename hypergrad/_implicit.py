r"""Implicit-function-theorem hypergradients (Lorraine et al. 2020; Pedregosa 2016).

At a stationary point of the inner problem, :math:`\nabla_w L_T(w^*(\lambda), \lambda) = 0`, so

.. math::
    \frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial \lambda}
        - \frac{\partial^2 L_T}{\partial\lambda\,\partial w^\top} H^{-1} \frac{\partial L_V}{\partial w},
    \qquad H = \frac{\partial^2 L_T}{\partial w\,\partial w^\top}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._base import HyperOptimizer, OnNonFinite, _Hypergradient
from ._functional import clone_all, grads_or_zeros
from ._solvers import LinearSolver, Neumann, SolveResult
from ._types import Batch, LossFn, Tensors


def implicit_hypergradient(
    train_loss: Callable[[], Tensor],
    val_loss: Callable[[], Tensor],
    weights: Sequence[Tensor],
    hparams: Sequence[Tensor],
    solver: LinearSolver,
) -> tuple[Tensors, Tensor, SolveResult]:
    r"""The IFT hypergradient at the current weights, over plain tensors.

    Steps: :math:`v_1 = \partial L_V/\partial w` (with the direct term
    :math:`\partial L_V/\partial\lambda` from the same backward pass); :math:`v_2 \approx H^{-1} v_1`
    by ``solver`` on HVPs of :math:`L_T`; :math:`v_3 = \partial_\lambda (\nabla_w L_T \cdot v_2)`
    (one mixed VJP); return :math:`\partial L_V/\partial\lambda - v_3`.

    Cost: one validation forward/backward, one training forward/backward with graph, the solver's
    HVPs (one backward each through that graph) and one mixed VJP. Memory: the training graph plus
    a few weight-sized vectors, independent of how many inner steps came before.

    Args:
        train_loss: closure computing :math:`L_T` from ``weights`` and ``hparams``.
        val_loss: closure computing :math:`L_V` from ``weights`` (and maybe ``hparams``).
        weights: tensors requiring grad, :math:`P` entries in all.
        hparams: leaf tensors requiring grad, :math:`H` entries in all.
        solver: a :class:`LinearSolver` (``Neumann`` needs ``alpha`` set).

    Returns:
        ``(hypergradient, val_loss, solve_result)``: the hypergradient is a tuple shaped like
        ``hparams``; the loss is detached.

    >>> import torch, hypergrad as hg
    >>> w = torch.tensor([1.0], requires_grad=True); lam = torch.tensor([0.5], requires_grad=True)
    >>> # L_T = (w - lam)^2 / 2  => w* = lam, so d/dlam of L_V = w^2 is 2 w = 2
    >>> g, _, _ = hg.implicit_hypergradient(lambda: 0.5 * ((w - lam) ** 2).sum(),
    ...     lambda: (w ** 2).sum(), [w], [lam], hg.CG(maxiter=5))
    >>> round(float(g[0]), 6)
    2.0
    """
    weights = list(weights)
    hparams = list(hparams)
    lv = val_loss()
    gv = grads_or_zeros(lv, weights + hparams)
    v1, direct = gv[: len(weights)], gv[len(weights) :]
    lt = train_loss()
    gt = torch.autograd.grad(lt, weights, create_graph=True, allow_unused=True, materialize_grads=True)
    if not any(g.requires_grad for g in gt):
        raise ValueError("the training gradient does not depend on the weights (is train_loss linear?)")

    def hvp(u: Sequence[Tensor]) -> Tensors:
        return grads_or_zeros(gt, weights, list(u), retain_graph=True)

    sol = solver.solve(hvp, v1)
    mixed = grads_or_zeros(gt, hparams, list(sol.solution), retain_graph=False)
    hypergrad = tuple(torch._foreach_sub(list(direct), list(mixed)))
    return hypergrad, lv.detach(), sol


class Implicit(HyperOptimizer):
    r"""Hyperparameters by the implicit function theorem, inside ordinary training.

    Between hypersteps the model trains with ``inner_optimizer`` (any ``torch.optim`` optimiser)
    through :meth:`step`; :meth:`hyper_step` assumes the weights are near a stationary point of
    ``train_loss`` and applies the IFT with an approximate inverse Hessian (see
    :func:`implicit_hypergradient`). Memory O(P + H), whatever the number of inner steps.

    Args:
        model, hparams, train_loss, val_loss, inner_optimizer, outer_optimizer, on_nonfinite: see
            :class:`HyperOptimizer`.
        solver: :class:`Neumann` (default: 5 terms, :math:`\alpha` = the inner learning rate at each
            hyperstep), :class:`CG` or :class:`Identity`.

    Batches: ``hyper_step(train_batch=..., val_batch=...)`` needs both (the training batch gives
    the Hessian and the mixed second derivative).

    Hyperparameters must enter ``train_loss`` or ``val_loss`` directly; settings of the inner
    optimiser (:class:`~hypergrad.hparams.LearningRate`, ...) do not move the optimum and are
    rejected: tune them with :class:`Unrolled`.

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Linear(4, 1)
    >>> hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    >>> mse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> hopt = hg.Implicit(model, hp, lambda m, h, b: mse(m, h, b) + h.penalty(m), mse,
    ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2))
    >>> batch = (torch.randn(8, 4), torch.randn(8, 1))
    >>> loss = hopt.step(batch)
    >>> info = hopt.hyper_step(train_batch=batch, val_batch=batch)
    >>> info.solver_iterations
    5
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: nn.Module,
        train_loss: LossFn,
        val_loss: LossFn,
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        solver: LinearSolver | None = None,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
    ) -> None:
        super().__init__(
            model,
            hparams,
            train_loss,
            val_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            on_nonfinite=on_nonfinite,
        )
        if self.settings:
            raise ValueError(
                "Implicit cannot tune inner-optimiser settings (learning rate, momentum): they do "
                "not change the inner optimum. Use hg.Unrolled for them."
            )
        solver = Neumann() if solver is None else solver
        if not isinstance(solver, LinearSolver):
            raise TypeError(f"solver must be hg.Neumann, hg.CG or hg.Identity, got {type(solver).__name__}")
        self.solver = solver

    def current_solver(self) -> LinearSolver:
        """The solver the next hyperstep uses: a ``Neumann`` without ``alpha`` takes the inner
        optimiser's current learning rate (first param group), so it follows LR schedules."""
        if isinstance(self.solver, Neumann) and self.solver.alpha is None:
            return dataclasses.replace(self.solver, alpha=float(self.inner_optimizer.param_groups[0]["lr"]))
        return self.solver

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        pair = self.pair
        buffers = pair.buffers()
        weights = pair.weights
        hps = pair.hparam_tensors

        def lt() -> Tensor:
            return pair.loss(self.train_loss, train_batch, buffers=clone_all(buffers))

        def lv() -> Tensor:
            return pair.loss(self.val_loss, val_batch, buffers=clone_all(buffers))

        train_value: list[Tensor] = []

        def lt_recorded() -> Tensor:
            value = lt()
            train_value.append(value.detach())
            return value

        grads, loss, sol = implicit_hypergradient(lt_recorded, lv, weights, hps, self.current_solver())
        return _Hypergradient(grads, loss, sol.iterations, sol.residual, inner_loss=train_value[0])
