r"""Unrolled differentiation through the last K inner optimiser steps (truncated reverse mode,
and forward mode).

:math:`w_K = \Phi_K(\cdots\Phi_1(w_0, \lambda)\cdots, \lambda)` where each :math:`\Phi_k` is one
step of the inner optimiser on :math:`L_T`; the hypergradient is
:math:`dL_V(w_K(\lambda), \lambda)/d\lambda`, exact for the truncated problem (Shaban et al. 2019).
Reverse mode keeps the K-step graph (memory O(K·P)); forward mode carries
:math:`dw/d\lambda_j` along (one pass per hyperparameter entry, memory O(P)), the better choice
for a handful of hyperparameters such as a learning rate (Franceschi et al. 2017).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ._base import HyperOptimizer, OnNonFinite, _Hypergradient
from ._functional import check_batch, clone_all, grads_or_zeros
from ._inner import State, group_settings, snapshot_state, update_for
from ._types import Batch, LossFn, Tensors


class Mode(str, enum.Enum):
    """Differentiation mode of :class:`Unrolled`."""

    REVERSE = "reverse"
    FORWARD = "forward"


def unrolled_hypergradient(
    outer: Callable[[Sequence[Tensor]], Tensor],
    hparams: Sequence[Tensor],
    mode: Mode | str = Mode.REVERSE,
) -> tuple[Tensors, Tensor]:
    r"""Differentiate ``outer(hparams)``, a differentiable unrolled computation, w.r.t. ``hparams``.

    ``outer`` runs the inner steps from fixed starting weights with the hyperparameters it is given
    and returns :math:`L_V(w_K, \lambda)`. Reverse mode: one call and one backward pass, memory of
    the whole K-step graph. Forward mode: one call per hyperparameter entry (:math:`H` in all), each
    carrying a tangent :math:`dw/d\lambda_j` along with the weights, memory independent of K.

    Args:
        outer: ``outer(hparams) -> scalar``; must use autograd-differentiable operations
            (``torch.autograd.grad(..., create_graph=True)`` inside is fine in both modes).
        hparams: the hyperparameter tensors (leaves requiring grad, for reverse mode).
        mode: ``"reverse"`` or ``"forward"`` (default: ``"reverse"``).

    Returns:
        ``(hypergradient shaped like hparams, outer value detached)``.

    >>> import torch, hypergrad as hg
    >>> lam = torch.tensor([0.5], requires_grad=True)
    >>> def outer(h):  # two SGD steps on (w - lam)^2 / 2 from w = 0, then L_V = w^2
    ...     w = torch.zeros(1)
    ...     for _ in range(2):
    ...         w = w - 0.5 * (w - h[0])
    ...     return (w ** 2).sum()
    >>> g_rev, _ = hg.unrolled_hypergradient(outer, [lam])
    >>> g_fwd, _ = hg.unrolled_hypergradient(outer, [lam], mode="forward")
    >>> round(float(g_rev[0]), 6), round(float(g_fwd[0]), 6)
    (0.5625, 0.5625)
    """
    mode = Mode(mode)
    hparams = list(hparams)
    if mode is Mode.REVERSE:
        out = outer(hparams)
        return grads_or_zeros(out, hparams), out.detach()
    grads = [torch.zeros_like(h) for h in hparams]
    value: Tensor | None = None
    base = [h.detach() for h in hparams]
    for i, h in enumerate(base):
        for j in range(h.numel()):
            with fwAD.dual_level():
                tangent = torch.zeros_like(h)
                tangent.view(-1)[j] = 1
                duals = [fwAD.make_dual(b, tangent) if k == i else b for k, b in enumerate(base)]
                out = outer(duals)
                primal, tan = fwAD.unpack_dual(out)
                grads[i].view(-1)[j] = 0 if tan is None else tan.detach()
                value = primal.detach()
    if value is None:  # no hyperparameter entries at all
        value = outer(base).detach()
    return tuple(grads), value


@dataclasses.dataclass
class _Record:
    """One recorded inner step: its batch and everything needed to replay it."""

    batch: Batch
    weights: Tensors
    buffers: Tensors
    states: list[State]
    groups: list[dict[str, Any]]


class Unrolled(HyperOptimizer):
    r"""Hypergradients by differentiating through the last ``steps`` inner optimiser steps.

    Each :meth:`step` is an ordinary ``torch.optim`` step; it also records its batch and a detached
    copy of the weights, buffers and optimiser state *before* it (a ring of ``steps`` records).
    :meth:`hyper_step` replays those steps with a differentiable copy of the optimiser (same
    arithmetic as ``torch.optim``: SGD with momentum/dampening/Nesterov/weight decay, Adam, AdamW,
    AMSGrad; no NaNs at zero second moments) and differentiates the validation loss at the end.
    The replay uses the current hyperparameters for all steps; the weights are not changed.
    Settings of the inner optimiser can be hyperparameters themselves
    (:class:`~hypergrad.hparams.LearningRate`, :class:`~hypergrad.hparams.Momentum`).

    Args:
        model, hparams, train_loss, val_loss, inner_optimizer, outer_optimizer, on_nonfinite: see
            :class:`HyperOptimizer`.
        steps: K, how many of the latest inner steps to differentiate through (default: 5).
        mode: ``"reverse"`` (memory O(K·P) during the hyperstep, cost ~2–3 inner steps per unrolled
            step) or ``"forward"`` (one replay per hyperparameter entry; for a few hyperparameters)
            (default: ``"reverse"``).

    Memory between hypersteps: K copies of the weights and optimiser state (no graphs).
    Batches: ``hyper_step(val_batch=...)``; the training batches are the recorded ones, so
    ``train_batch`` may be passed for a uniform call but is not used. Stochastic layers (dropout)
    draw new noise in the replay.

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Linear(4, 1)
    >>> inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> hp = hg.hparams.LearningRate(inner)
    >>> mse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> hopt = hg.Unrolled(model, hp, mse, mse, inner_optimizer=inner,
    ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2), steps=3)
    >>> batch = (torch.randn(8, 4), torch.randn(8, 1))
    >>> for _ in range(3):
    ...     _ = hopt.step(batch)
    >>> hopt.hyper_step(val_batch=batch).unrolled_steps
    3
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
        steps: int = 5,
        mode: Mode | str = Mode.REVERSE,
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
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Invalid Unrolled steps: {steps!r} (need an int >= 1)")
        self.steps = steps
        self.mode = Mode(mode)
        self._update = update_for(inner_optimizer)
        # which param group each weight belongs to
        group_of = {id(p): gi for gi, g in enumerate(inner_optimizer.param_groups) for p in g["params"]}
        owner = [group_of[id(w)] for w in self.pair.weights]
        self._group_members = [
            [k for k, g in enumerate(owner) if g == gi] for gi in range(len(inner_optimizer.param_groups))
        ]
        self._records: collections.deque[_Record] = collections.deque(maxlen=steps)

    def _record_step(self, batch: Batch) -> None:
        pair = self.pair
        self._records.append(
            _Record(
                batch=batch,
                weights=clone_all(pair.weights),
                buffers=clone_all(pair.buffers()),
                states=snapshot_state(self.inner_optimizer, pair.weights),
                groups=[group_settings(g) for g in self.inner_optimizer.param_groups],
            )
        )

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        if val_batch is None:
            raise ValueError("Unrolled.hyper_step needs val_batch=... (a validation batch for val_loss)")
        check_batch(val_batch, "val_batch", self.device, self.dtype)
        if not self._records:
            raise ValueError(
                "Unrolled.hyper_step needs at least one inner step recorded by hopt.step(batch) "
                "to differentiate through; none has been taken yet"
            )

    def _replay(self, hp: Sequence[Tensor]) -> tuple[Tensors, Tensors]:
        """Weights and buffers after replaying the recorded steps with hyperparameters ``hp``."""
        pair = self.pair
        records = list(self._records)
        first = records[0]
        weights: Tensors = tuple(t.detach().clone().requires_grad_(True) for t in first.weights)
        states = [dict(s) for s in first.states]
        buffers = clone_all(first.buffers)
        tuned = self._hparam_values(hp)
        for rec in records:
            loss = pair.loss(self.train_loss, rec.batch, weights=weights, buffers=buffers, hparams=hp)
            grads = torch.autograd.grad(
                loss, weights, create_graph=True, allow_unused=True, materialize_grads=True
            )
            new_w: list[Tensor] = list(weights)
            for gi, idx in enumerate(self._group_members):
                if not idx:
                    continue
                settings: dict[str, Any] = dict(rec.groups[gi])
                for i, setting in self.settings:
                    settings[setting.name] = tuned[i][gi]
                w_g, s_g = self._update(
                    [weights[k] for k in idx], [grads[k] for k in idx], [states[k] for k in idx], settings
                )
                for k, w, s in zip(idx, w_g, s_g, strict=True):
                    new_w[k] = w
                    states[k] = s
            weights = tuple(new_w)
        return weights, buffers

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        pair = self.pair
        real_buffers = pair.buffers()

        def outer(hp: Sequence[Tensor]) -> Tensor:
            weights, _ = self._replay(hp)
            return pair.loss(
                self.val_loss, val_batch, weights=weights, buffers=clone_all(real_buffers), hparams=hp
            )

        grads, loss = unrolled_hypergradient(outer, pair.hparam_tensors, self.mode)
        return _Hypergradient(grads, loss, unrolled_steps=len(self._records))

    def replayed_weights(self) -> Tensors:
        """The weights reached by replaying the recorded steps (detached): they equal the model's
        current weights up to rounding when the losses are deterministic. A diagnostic."""
        with torch.enable_grad():
            w, _ = self._replay(self.pair.hparam_tensors)
        return tuple(t.detach() for t in w)

    def _method_state(self) -> dict[str, Any]:
        return {"records": [dataclasses.asdict(r) for r in self._records]}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._records.clear()
        for r in state["records"]:
            self._records.append(_Record(**r))
