r"""Implicit-function-theorem hypergradients (Lorraine et al. 2020; Pedregosa 2016).

At a stationary point of the inner problem, :math:`\nabla_w L_T(w^*(\lambda), \lambda) = 0`, so

.. math::
    \frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial \lambda}
        - \frac{\partial^2 L_T}{\partial\lambda\,\partial w^\top} H^{-1} \frac{\partial L_V}{\partial w},
    \qquad H = \frac{\partial^2 L_T}{\partial w\,\partial w^\top}.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._base import HyperOptimizer, OnNonFinite, _Hypergradient, _warn_user
from ._functional import (
    _LOW_PRECISION,
    _attributes_kept,
    _plain_attributes,
    _uncached,
    clone_all,
    collecting_gradient_hooks,
    differentiable_twice,
    dot,
    grads_or_none,
    grads_or_zeros,
    materialize,
    naming_missing_second_derivatives,
    norm,
    refusing_once_differentiable,
)
from ._solvers import (
    CG,
    LinearSolver,
    Neumann,
    SolveResult,
    SolveStatus,
    _autograd_on,
    _pow2_scale,
    _scaled_norm,
    _tensor_list,
    _writable,
)
from ._types import HVP, Batch, LossFn, Tensors
from ._wrap import rank0_buffers
from .hparams import WeightDecay, _constant_coefficients, _penalised_weights_known

#: what the default Neumann step size's callback hands back for the learning rate (no power
#: estimate: not kept as one), so that a series that grew at it is solved again (see
#: :meth:`Implicit._lr_then_power`)
_AT_LR = ("lr",)


def _wide(w: Tensor, x: Tensor) -> Tensor:
    """``w * x``, in float32 for float16 / bfloat16 weights (whose products of a small solution
    and the weights underflow into the subnormals); unchanged, no copy, in other dtypes."""
    if w.dtype in _LOW_PRECISION:
        return w.float() * x.float()
    return w * x


class _DiagonalPenalties:
    """The exact second derivatives of :class:`~hypergrad.hparams.WeightDecay` penalties, added
    without autograd. While :meth:`recording`, each container's ``penalty()`` returns its value and
    first derivative ``d * w`` only; :meth:`add_hvp` then adds ``c * d * u`` to each HVP and
    :meth:`mixed` gives ``c * d/dlambda sum(d * w * x)``, where ``c`` is the coefficient with which the
    training loss used the penalty (read from a probe). Same hypergradient, far fewer autograd nodes
    in every HVP."""

    def __init__(self, hparams: nn.Module, hparam_tensors: Sequence[Tensor]) -> None:
        self.modules = [m for m in hparams.modules() if isinstance(m, WeightDecay)]
        self.index = {id(t): i for i, t in enumerate(hparam_tensors)}
        self.calls: list[tuple[WeightDecay, Tensor, list[Tensor], list[Tensor]]] = []
        self.coefficients: list[float] = []

    def recording(self, fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """``fn`` with the containers' penalties in first-order mode (calls recorded)."""

        def wrapped() -> Tensor:
            for m in self.modules:
                m._first_order_calls = []
            try:
                return fn()
            finally:
                for m in self.modules:
                    assert m._first_order_calls is not None
                    self.calls += [(m, *call) for call in m._first_order_calls]
                    m._first_order_calls = None

        return wrapped

    @property
    def probes(self) -> list[Tensor]:
        return [probe for _, probe, _, _ in self.calls]

    def set_coefficients(self, grads: Sequence[Tensor]) -> None:
        self.coefficients = [float(g.detach()) for g in grads]  # one host synchronisation per hyperstep

    def add_hvp(self, hv: Tensors, u: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
        where = {id(w): k for k, w in enumerate(weights)}
        for (_, _, ws, ds), c in zip(self.calls, self.coefficients, strict=True):
            for w, d in zip(ws, ds, strict=True):
                k = where.get(id(w))
                if k is not None and c != 0.0:
                    hv[k].addcmul_(d, u[k], value=c)

    def mixed(
        self, x: Sequence[Tensor], weights: Sequence[Tensor], hparams: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """``c * d/d raw (sum d(raw) * w * x)`` per hyperparameter tensor (``None``: no term)."""
        where = {id(w): k for k, w in enumerate(weights)}
        out: list[Tensor | None] = [None] * len(hparams)
        for (m, _, ws, ds), c in zip(self.calls, self.coefficients, strict=True):
            if c != 0.0 and type(m)._decay is WeightDecay._decay:  # d = e^r or M sigmoid(r): by hand
                for n, w, d in zip(m.names, ws, ds, strict=True):
                    k, raw = where.get(id(w)), m.raw[m._index[n]]
                    i = self.index.get(id(raw))
                    if k is None or i is None:
                        continue
                    slope = d if m.max is None else d * (1 - d / m.max)  # dd/dr
                    # (float16 / bfloat16 products in float32: in float16 a solution x of 1e-5s
                    # times weights of 0.05 fell among the subnormals, 3 bits each, and a strong
                    # decay's hypergradient came out 14% off, silently)
                    g = (c * slope) * _wide(w.detach(), x[k].detach())
                    g = g.sum() if raw.dim() == 0 else g.sum_to_size(raw.shape)
                    g = g.to(raw.dtype)  # (a container in another precision than the model)
                    prev = out[i]
                    out[i] = g if prev is None else prev + g
                continue
            terms = []
            for n, w in zip(m.names, ws, strict=True):
                k = where.get(id(w))
                if k is not None:
                    terms.append((m._decay(m.raw[m._index[n]]) * _wide(w.detach(), x[k].detach())).sum())
            if not terms or c == 0.0:
                continue
            raws = list(m.raw)
            gs = torch.autograd.grad(c * torch.stack(terms).sum(), raws, allow_unused=True)
            for r, g in zip(raws, gs, strict=True):
                i = self.index.get(id(r))
                if g is not None and i is not None:
                    prev = out[i]
                    out[i] = g if prev is None else prev + g
        return out


@dataclasses.dataclass(frozen=True)
class _ZeroCurvature(LinearSolver):
    """The solve once power iteration found :math:`Hu = 0` from a random start (:math:`H = 0`):
    no curvature to invert, no HVPs spent; the solution 0 with status
    ``NONPOSITIVE_CURVATURE``, as CG (stopped at its first direction) and Direct (least squares)
    give there."""

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        residual = (_scaled_norm(v) > 0).to(v[0].real.dtype)  # |0 - v| / |v| (0 for v = 0)
        return SolveResult(
            tuple(torch.zeros_like(t) for t in v), 0, residual, SolveStatus.NONPOSITIVE_CURVATURE
        )


@dataclasses.dataclass(frozen=True)
class _HeldStill(LinearSolver):
    """The solve when every weight ``hessian_subset`` selects is in a param group held at lr 0 while
    other groups train: no weight of the solve moves with the hyperparameters, so the solution is 0
    (no HVPs) and the hypergradient its direct term, status ``FIXED``."""

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        zero = torch.zeros((), dtype=v[0].real.dtype, device=v[0].device)
        return SolveResult(tuple(torch.zeros_like(t) for t in v), 0, zero, SolveStatus.FIXED)


@dataclasses.dataclass
class _ImplicitResult:
    hypergrad: Tensors
    val_loss: Tensor
    solve: SolveResult
    reached: tuple[bool, ...]
    extra_hvps: int = 0
    power: Any = None  # (estimate, eigenvector, at hyperstep) from a fresh power iteration


def _implicit(
    train_loss: Callable[[], Tensor],
    val_loss: Callable[[], Tensor],
    weights: Sequence[Tensor],
    hparams: Sequence[Tensor],
    solver: LinearSolver | Callable[[HVP, Any], tuple[LinearSolver, int, Any]],
    x0: Sequence[Tensor] | None = None,
    average: Callable[[Sequence[Tensor]], None] | None = None,
    penalties: _DiagonalPenalties | None = None,
    decay: Sequence[float] | None = None,
    maximize: bool = False,
) -> _ImplicitResult:
    # ``decay``: per weight, the L2 coefficient the inner optimiser adds to its gradient
    # (coupled weight_decay): the weights converge to a stationary point of
    # L_T + sum decay/2 |w|^2, whose Hessian is H + diag(decay).
    # ``maximize``: the inner optimiser climbs L_T (``maximize=True``) on every weight of the
    # solve. The weights then settle at a maximum, where H is negative definite: Neumann's series
    # diverged and CG stopped on negative curvature. The solve is of (-H) x = -v_1 instead, the
    # same solution x = H^-1 v_1, when the curvature along v_1 is negative (one HVP), so that
    # weights placed at a rest point that is no maximum (a minimum of L_T - d/2 |w|^2, from which
    # ascent moves away) keep H. (Some weights ascended and some not, a descent-ascent game:
    # S H with S = diag(+-1) is not symmetric, which CG assumes; H is kept.)
    # ``average``: data parallel, averages tensors over the ranks in place. Every quantity below
    # is an average over the data, and linear in it given the global vectors, so: once for
    # (v1, L_V), once per HVP, once for the final hypergradient.
    weights = list(weights)
    hparams = list(hparams)
    # the losses run with the operations whose kernels lack a (correct) second derivative
    # replaced (weight norm, fused attention, sparse embeddings): see differentiable_twice
    # gradient hooks that val_loss's forward pass registers (a hook the model puts on an
    # activation, a module's full backward (pre-)hook) shape gradients for training; on the
    # validation loss's gradient, the hypergradient's cotangent, they scaled it (an activation's
    # gradient halved by a hook: a hypergradient of half the closed form's, silently): removed
    # before it is taken, as the training loss's are after its gradient
    val_hooks: list[Any] = []
    with differentiable_twice(), collecting_gradient_hooks(val_hooks, model_only=True):
        lv = val_loss()
    for handle in val_hooks:
        handle.remove()
    _check_loss_value(lv, "val_loss")
    val_reaches = lv.requires_grad  # (a detached val_loss reaches no hyperparameter)
    # the graph kept: a tensor both losses read, derived from the hyperparameters outside the
    # closures (implicit_hypergradient's d = raw.exp(), computed once), is differentiated
    # again by the mixed term; freed here, that failed with autograd's "backward through the
    # graph a second time". (Freed anyway with the validation loss's graph, just below.)
    gv = grads_or_none(lv, weights + hparams, retain_graph=True)
    # the path lambda -> w -> L_V exists only if L_V reaches a weight of the solve: a val_loss
    # evaluating another module than the model it is given (an EMA / AveragedModel copy, a
    # deepcopy) does not, and the mixed term is then exactly 0, not a connection
    val_reaches_weights = any(g is not None for g in gv[: len(weights)])
    v1 = materialize(gv[: len(weights)], weights)
    direct_or_none = gv[len(weights) :]
    lv = lv.detach().clone()
    if average is not None:
        average([*v1, lv])
    plain_train_loss = train_loss
    if penalties is not None:
        train_loss = penalties.recording(train_loss)
    # gradient hooks that train_loss's forward pass registers (an activation's gradient
    # reweighted or clipped, a gradient-reversal layer, a module's full backward hook) shape the
    # training gradient, whose zero the inner optimiser finds; they are removed once it is taken:
    # left on the graph, they ran again on every HVP's and the mixed term's cotangents (per-example
    # weights applied by a hook gave the Hessian X^T S^2 X for X^T S X: 58% off, silently)
    hooks: list[Any] = []
    with differentiable_twice(at_fixed_point=True), collecting_gradient_hooks(hooks):
        lt = train_loss()
    _check_loss_value(lt, "train_loss")
    if not lt.requires_grad:
        # (autograd's bare "element 0 of tensors does not require grad" named neither the loss nor
        # the batch; step() takes such a loss as a batch with nothing to learn, with a warning)
        raise ValueError(
            f"train_loss returned a loss that does not require grad (value {float(lt.detach()):.6g}): "
            "a constant on the hyperstep's train_batch (every example masked out, nothing to learn), "
            "or a loss computed under torch.no_grad() or detached (.item(), .detach(), a new tensor). "
            "The implicit hypergradient needs its gradient and Hessian w.r.t. the weights: evaluate "
            "it on a batch the loss learns from, and return the loss with its graph"
        )
    probes = [] if penalties is None else penalties.probes
    # unused inputs get zeros that do not require grad (``materialize_grads=True`` would give
    # zeros that do, hiding which weights the training loss does not reach)
    with refusing_once_differentiable("Implicit (its Hessian-vector products, mixed derivatives)"):
        g_raw = torch.autograd.grad(lt, weights + probes, create_graph=True, allow_unused=True)
    penalised = [] if penalties is None else [ws for _, _, ws, _ in penalties.calls]
    with naming_missing_second_derivatives("Implicit"):
        constant = not probes or (
            _penalised_weights_known(penalised, weights)
            and _constant_coefficients(g_raw[len(weights) :], weights + probes)
        )
    if not constant:
        # the loss is not c * penalty + (the rest) with c free of the weights (f(w) * penalty,
        # penalty ** 2): the by-hand second derivatives would lose product-rule terms; autograd's
        penalties, probes = None, []
        with differentiable_twice(at_fixed_point=True), collecting_gradient_hooks(hooks):
            lt = plain_train_loss()
        with refusing_once_differentiable("Implicit (its Hessian-vector products, mixed derivatives)"):
            g_raw = torch.autograd.grad(lt, weights, create_graph=True, allow_unused=True)
    for handle in hooks:  # (the training gradient is taken)
        handle.remove()
    g_all = materialize(g_raw, weights + probes)
    gt = g_all[: len(weights)]
    if penalties is not None:
        penalties.set_coefficients(g_all[len(weights) :])
    if not any(g.requires_grad for g in gt) and not (penalties is not None and penalties.calls):
        raise ValueError(
            "the training gradient does not depend on the weights: train_loss is linear in them or "
            "does not reach them at all (with Implicit(hessian_subset=...): the subset selects only "
            "weights that train_loss does not use)"
        )

    live = [i for i, g in enumerate(gt) if g.requires_grad]  # (a penalty-only gradient is constant)
    decayed = [] if decay is None else [k for k, d in enumerate(decay) if d != 0.0]
    negate = [False]  # (set below, once hvp can measure the curvature)
    gt_live = [gt[i] for i in live]

    def hvp(u: Sequence[Tensor]) -> Tensors:
        if gt_live:
            with naming_missing_second_derivatives("Implicit"):
                out = grads_or_zeros(gt_live, weights, [u[i] for i in live], retain_graph=True)
        else:
            out = tuple(torch.zeros_like(w) for w in weights)
        # autograd hands back an expanded (read-only) HVP for a weight used through its sum or
        # mean, and may pass u itself through; the averaging and the penalties' and decay's
        # terms below, and the solvers, update the HVP in place
        out = tuple(_writable(out, u))
        if average is not None:
            average(out)
        if penalties is not None:
            penalties.add_hvp(out, u, weights)
        for k in decayed:
            out[k].add_(u[k], alpha=decay[k])  # type: ignore[index]
        if negate[0]:
            torch._foreach_neg_(list(out))
        return out

    extra_hvps, power, choose = 0, None, None
    rhs = v1
    if maximize:
        extra_hvps += 1
        if _negative_curvature(hvp, v1):
            negate[0] = True
            rhs = tuple(torch._foreach_neg(list(v1)))
    # float16 weights: the system is solved for v_1 / s (s a power of two near max |v_1|: exact,
    # and what CG and Neumann scale by inside) and the mixed term taken with that solution, times
    # s in the hyperparameters' precision. The solution H^-1 v_1 itself (3e-6s under a strong
    # decay) fell among float16's subnormals and cost the hypergradient 60 times the dtype's
    # rounding (0.8% off where scaling the validation loss by 256 gave 0.014%). (One host
    # synchronisation, float16 only: bfloat16 has float32's range)
    scale = _pow2_scale(rhs) if any(t.dtype == torch.float16 for t in rhs) else 1.0
    if scale != 1.0:
        rhs = tuple(torch._foreach_div(list(rhs), scale))
        if x0 is not None:
            x0 = [t / scale for t in x0]
    if not isinstance(solver, LinearSolver):  # a callback choosing the solver (Neumann's step size)
        choose = solver
        solver, spent, power = choose(hvp, None)
        extra_hvps += spent
    sol = _solve_reached(solver, hvp, rhs, x0, weights, [*live, *decayed], penalties, average)
    if x0 is not None and sol.status is SolveStatus.DIVERGING:
        # a warm start that ends farther from the solution than x = 0 (negative or outgrown
        # curvature) would carry its growth on to every later hyperstep; solve from 0 instead,
        # where a stale step size is detected below
        extra_hvps += sol.iterations
        sol = _solve_reached(solver, hvp, rhs, None, weights, [*live, *decayed], penalties, average)
    fresh = False
    while choose is not None and power is not None and not fresh and _stale_step_size(solver, sol):
        # the series grew by more than 2 per term: alpha * lambda_max > 3, the curvature has grown
        # since the step size was estimated; re-estimate it now and solve again. Until an estimate
        # made now has been tried: the default's fall-back from the learning rate takes a kept
        # estimate first (no HVPs), which may be as stale (a series 1e21 times too large,
        # "diverging", where alpha="power" re-estimated)
        solver, more, power = choose(hvp, power)
        fresh = more > 0
        extra_hvps += more + sol.iterations
        sol = _solve_reached(solver, hvp, rhs, x0, weights, [*live, *decayed], penalties, average)
    if gt_live:
        with naming_missing_second_derivatives("Implicit"):
            mixed_or_none = grads_or_none(
                gt_live, hparams, [sol.solution[i] for i in live], retain_graph=False
            )
    else:  # only the (first-order) penalties depend on the weights
        mixed_or_none = (None,) * len(hparams)
    if penalties is not None:
        extra = penalties.mixed(sol.solution, weights, hparams)
        mixed_or_none = tuple(
            e if m is None else m if e is None else m + e for m, e in zip(mixed_or_none, extra, strict=True)
        )
    if scale != 1.0:  # (the mixed term of the scaled solution, scaled back: exact)
        mixed_or_none = tuple(None if m is None else m * scale for m in mixed_or_none)
        sol = dataclasses.replace(sol, solution=tuple(torch._foreach_mul(list(sol.solution), scale)))
    reached = tuple(
        val_reaches and (d is not None or (m is not None and val_reaches_weights))
        for d, m in zip(direct_or_none, mixed_or_none, strict=True)
    )
    # dL_V/dlambda = direct - mixed, in place where that is safe, without materialising absent
    # terms as zeros. Autograd hands back one gradient (or views of one storage) for inputs that
    # a loss uses through their sum: lambda_1 + lambda_2 share their direct and their mixed
    # term (in place, an iMAML centre base + delta had both mixed terms subtracted from the one
    # direct term: 70% off in both), w + lambda in val_loss makes the direct term v_1 itself
    # (Identity's solution), and a gradient passed through unchanged would be the solution. A
    # shared tensor is updated out of place, and each hypergradient gets its own storage.
    terms = [*direct_or_none, *mixed_or_none, *sol.solution, *v1]
    uses = collections.Counter(t.untyped_storage().data_ptr() for t in terms if t is not None and t.numel())

    def alone(t: Tensor) -> bool:
        return t.numel() > 0 and uses[t.untyped_storage().data_ptr()] == 1

    out: list[Tensor] = []
    for d, m, h in zip(direct_or_none, mixed_or_none, hparams, strict=True):
        # (autograd may also hand back an expanded, read-only gradient: then out of place too)
        if m is None:
            out.append(torch.zeros_like(h) if d is None else d if alone(d) else d.clone())
        elif d is None:
            out.append(m.neg_() if alone(m) and m.is_contiguous() else -m)
        else:
            out.append(d.sub_(m) if alone(d) and d.is_contiguous() else d - m)
    del mixed_or_none
    # each in its hyperparameter's precision (a container kept in another one than the model)
    hypergrad = tuple(g if g.dtype == h.dtype else g.to(h.dtype) for g, h in zip(out, hparams, strict=True))
    if average is not None:
        average(hypergrad)
    return _ImplicitResult(hypergrad, lv, sol, reached, extra_hvps, power)


def _negative_curvature(hvp: HVP, v: Sequence[Tensor]) -> bool:
    r"""Whether :math:`u^\top H u < 0` along :math:`u = v` (all ones if :math:`v = 0`): one HVP
    and two host synchronisations. A definite :math:`H` has one sign along every direction."""
    u = list(v)
    if not bool(torch.stack([t.ne(0).any() for t in u]).any()):
        u = [torch.ones_like(t) for t in u]
    return float(dot(u, hvp(u))) < 0


def _warm_start_for(x0: Sequence[Tensor] | None, weights: Sequence[Tensor]) -> Tensors | None:
    """The kept solution as a start for a solve over ``weights``: in their dtype and on their
    device (a state loaded from another run), or ``None`` when it is shaped for other weights
    (``hessian_subset`` changed between hypersteps, a parameter resized in place): a warm start
    is only a guess, and a stale one raised a ``ValueError`` from the solver mid-training."""
    if x0 is None or len(x0) != len(weights):
        return None
    if any(a.shape != w.shape for a, w in zip(x0, weights, strict=True)):
        return None
    return tuple(a.to(dtype=w.dtype, device=w.device) for a, w in zip(x0, weights, strict=True))


def _by_name(tensors: Sequence[Tensor] | None, saved: Any, names: Sequence[str] | None) -> Tensors | None:
    """``tensors`` (one per weight, in the order of the names ``saved``) in the order of ``names``:
    a run built with its modules in another order lists its weights so (``named_parameters``
    order), and a warm start loaded by position gave each weight another's (same shapes: a
    warm-started CG's hypergradient 50% off the uninterrupted run's after a resume). As given
    where the names are unknown (states saved before they were kept) or not the same ones."""
    if tensors is None or saved is None or names is None:
        return None if tensors is None else tuple(tensors)
    saved, names = list(saved), list(names)
    if saved == names or len(saved) != len(tensors) or len(set(saved)) != len(saved):
        return tuple(tensors)
    if sorted(saved) != sorted(names):
        return tuple(tensors)
    at = {n: i for i, n in enumerate(saved)}
    return tuple(tensors[at[n]] for n in names)


def _moves_from_start(solver: LinearSolver) -> bool:
    """Whether ``solver`` spends an iteration past a warm start: ``Neumann(steps=0)`` returns
    ``x0`` as it is and ``CG(maxiter=1)`` spends its one HVP on the residual of ``x0``. Warm-started,
    each handed back the previous hyperstep's solution unchanged (its validation gradient, its
    batch), every other hyperstep or for as long as its residual stayed below 1, silently; they
    start from 0 instead."""
    if isinstance(solver, Neumann):
        return solver.steps >= 1
    if isinstance(solver, CG):
        return solver.maxiter >= 2
    return True


def _solver_got(solver: object) -> str:
    """What was passed as a solver, for the error: a solver class itself (``solver=hg.Neumann``,
    the parentheses forgotten) was named "ABCMeta", next to a list naming hg.Neumann as valid."""
    if isinstance(solver, type) and issubclass(solver, LinearSolver):
        return f"the class hg.{solver.__name__} itself: pass an instance, e.g. solver=hg.{solver.__name__}()"
    return type(solver).__name__


def _check_loss_value(loss: object, name: str) -> None:
    """A loss must be a real tensor with one element (host metadata only, no synchronisation).
    (A complex one, e.g. ``(z ** 2).sum()`` where :math:`|z|^2` was meant, failed in
    autograd with "grad can be implicitly created only for real scalar outputs", naming no loss.)"""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{name} must return a scalar tensor, got {got}")
    if loss.is_complex():
        raise ValueError(
            f"{name} must return a real scalar tensor, got {loss.dtype}: a complex value has no minimum "
            "(for complex weights: |z|^2 as (z.conj() * z).real, which unlike z.abs() ** 2 has a "
            "second derivative at z = 0, or z.real)"
        )


def _check_subset(subset: object) -> None:
    """``hessian_subset`` must be a callable on parameter names; an ``nn.Module`` is callable
    too, but on inputs: called with a name it failed deep in its forward
    (``linear(): argument 'input' must be Tensor, not str``)."""
    if isinstance(subset, nn.Module) or not callable(subset):
        got = f"the module {type(subset).__name__}" if isinstance(subset, nn.Module) else repr(subset)[:80]
        raise TypeError(
            f"hessian_subset must be a callable name -> bool, e.g. lambda n: n.startswith('fc'), got {got}"
            + (
                " (a module is called on inputs, not on names: select its weights by their names, "
                "e.g. lambda n: n.startswith('head.'))"
                if isinstance(subset, nn.Module)
                else ""
            )
        )


def _stale_step_size(solver: LinearSolver, sol: SolveResult) -> bool:
    r"""Whether a Neumann series from 0 grew by more than a factor 2 per term: a sign that
    :math:`\alpha\lambda_{max} > 3` (a stale step size), which negative curvature alone, with
    :math:`|\lambda_{min}| \le \lambda_{max}` and a current :math:`\alpha`, does not give; or
    grew (by less) along a direction of curvature above :math:`2/\alpha`
    (``sol.curvature > 2``: :math:`2 < \alpha\lambda \le 3`, where the terms flip sign and the
    sum is of the wrong sign), which negative curvature does not give either. A
    series that came out non-finite counts too: over many terms such growth overflows (300 terms
    at a 100 times stale step size were refused as "nonfinite" instead of re-estimated); a NaN
    in the Hessian gives a NaN estimate and a non-finite series again, refused as before."""
    if not isinstance(solver, Neumann) or solver.steps < 1:
        return False
    if sol.status is SolveStatus.NONFINITE:
        return True
    if sol.status is not SolveStatus.DIVERGING:
        return False
    # (2.0 ** steps overflows, an OverflowError, from 1024 steps on; a finite residual is below it)
    bound = math.ldexp(1.0, solver.steps) if solver.steps < 1024 else math.inf
    return float(sol.residual) > bound or sol.curvature > 2.0


def _solve_reached(
    solver: LinearSolver,
    hvp: HVP,
    v1: Tensors,
    x0: Sequence[Tensor] | None,
    weights: Sequence[Tensor],
    live: Sequence[int],
    penalties: _DiagonalPenalties | None,
    average: Callable[[Sequence[Tensor]], None] | None,
) -> SolveResult:
    """``solver`` on :math:`H x = v_1` restricted to the weights the training gradient depends on.

    A weight whose training gradient is absent or constant (the training loss does not reach it,
    e.g. a head used only by ``val_loss``; no penalty or optimiser weight decay on it) has an
    exactly zero row and column in
    :math:`H` and cannot move with the hyperparameters, while :math:`v_1` may be non-zero there:
    the full system has no solution, and CG broke down on it (a step of size 1/rounding, then a
    non-finite hypergradient). Its entries of the solution never reach the hypergradient (the
    mixed term only reads the live weights'), so it is left out of the solve (entries 0)."""
    solved = set(live)
    if penalties is not None:
        where = {id(w): k for k, w in enumerate(weights)}
        solved |= {where[id(w)] for _, _, ws, _ in penalties.calls for w in ws if id(w) in where}
    if average is not None:  # data parallel: a weight reached on any rank is reached
        mask = torch.tensor(
            [float(k in solved) for k in range(len(weights))], dtype=v1[0].real.dtype, device=v1[0].device
        )
        average([mask])
        solved = {k for k, m in enumerate(mask.tolist()) if m > 0}
    keep = sorted(solved)
    if not keep or len(keep) == len(weights):
        return solver.solve(hvp, v1, x0=x0)
    unread = list(v1)  # hvp reads u only at live, penalised, decayed weights: the rest placeholders

    def hvp_kept(u: Sequence[Tensor]) -> Tensors:
        full = list(unread)
        for k, t in zip(keep, u, strict=True):
            full[k] = t
        out = hvp(full)
        return tuple(out[k] for k in keep)

    sol = solver.solve(hvp_kept, [v1[k] for k in keep], x0=None if x0 is None else [x0[k] for k in keep])
    x = [torch.zeros_like(w) for w in v1]
    for k, t in zip(keep, sol.solution, strict=True):
        x[k] = t
    return dataclasses.replace(sol, solution=tuple(x))


def implicit_hypergradient(
    train_loss: Callable[[], Tensor],
    val_loss: Callable[[], Tensor],
    weights: Sequence[Tensor],
    hparams: Sequence[Tensor],
    solver: LinearSolver,
    x0: Sequence[Tensor] | None = None,
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
        solver: a :class:`LinearSolver` (``Neumann`` needs a numeric ``alpha``).
        x0: initial guess for :math:`H^{-1} v_1`, shaped like ``weights`` (warm start; default:
            ``None``, i.e. 0).

    Returns:
        ``(hypergradient, val_loss, solve_result)``: the hypergradient is a tuple shaped like
        ``hparams`` (each in its tensor's dtype); the loss is detached, 0-dim; ``solve_result``
        is the :class:`SolveResult` of the solve (``iterations`` = HVPs spent).

    Raises:
        ValueError: no ``weights``, a weight or hyperparameter that does not require grad, a
            tensor listed twice (in ``weights``, in ``hparams``, or in both), a loss that is
            not a real scalar tensor (complex: no minimum), the training gradient does not depend on
            ``weights`` (``train_loss`` linear in them with coefficients free of ``hparams``,
            or not reaching them; linear with coefficients that depend on ``hparams`` gives
            :math:`H = 0`, no inner optimum, which CG reports as ``nonpositive_curvature``), or
            the solver refuses (a
            :class:`Neumann` without a numeric ``alpha``; ``x0`` of other shapes).
        RuntimeError: called under ``torch.inference_mode()`` (under ``torch.no_grad()`` the
            losses run with autograd on, as in ``torch.autograd.functional``).
        TypeError: ``solver`` is not a :class:`LinearSolver`; ``weights`` or ``hparams`` is
            not a collection of tensors (a bare tensor, which iterates over its rows: wrap it,
            ``[lam]``; a dict; a module: ``list(m.parameters())``).

    >>> import torch, hypergrad as hg
    >>> w = torch.tensor([1.0], requires_grad=True); lam = torch.tensor([0.5], requires_grad=True)
    >>> # L_T = (w - lam)^2 / 2  => w* = lam, so d/dlam of L_V = w^2 is 2 w = 2
    >>> g, _, _ = hg.implicit_hypergradient(lambda: 0.5 * ((w - lam) ** 2).sum(),
    ...     lambda: (w ** 2).sum(), [w], [lam], hg.CG(maxiter=5))
    >>> round(float(g[0]), 6)
    2.0
    """
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            f"solver must be a hg.LinearSolver (hg.Neumann, hg.CG, ...), got {_solver_got(solver)}"
        )
    weights, hparams = _tensor_list(weights, "weights"), _tensor_list(hparams, "hparams")
    if not weights:
        raise ValueError("implicit_hypergradient needs at least one weight tensor")
    for what, ts in (("weights", weights), ("hparams", hparams)):
        for i, t in enumerate(ts):
            if not isinstance(t, Tensor) or not t.requires_grad:
                raise ValueError(
                    f"{what}[{i}] must be a tensor with requires_grad=True (the losses are "
                    f"differentiated with respect to it), got "
                    f"{type(t).__name__ if not isinstance(t, Tensor) else 'one with requires_grad=False'}"
                )
    # the same tensor twice (or as a weight and a hyperparameter) is one variable listed twice:
    # autograd hands back one gradient object for both entries, and the in-place assembly of
    # direct - mixed negated it twice (the hypergradient of a hyperparameter listed twice came
    # back with its sign flipped, in both entries); listed twice among the weights it doubled
    # Identity's solution and halved Neumann's convergence bound on alpha
    seen: dict[int, str] = {}
    for what, ts in (("weights", weights), ("hparams", hparams)):
        for i, t in enumerate(ts):
            where = seen.setdefault(id(t), f"{what}[{i}]")
            if where != f"{what}[{i}]":
                raise ValueError(
                    f"{what}[{i}] is the same tensor as {where}: list each tensor once, and a tensor "
                    "either as a weight (trained by the inner problem) or as a hyperparameter"
                )
    # a weight that still carries the graph of how it was computed from the hyperparameters
    # (an inner loop run with create_graph=True, as for an unrolled hypergradient): every
    # derivative w.r.t. the hyperparameters then also ran back through that history, which
    # autograd had freed after the first one ("Trying to backward through the graph a second
    # time"), or, where it could run again, added the unrolled path to the IFT's (counted twice)
    for i, w in enumerate(weights):
        j = _history_reaches(w, hparams)
        if j is not None:
            raise ValueError(
                f"weights[{i}] carries an autograd graph back to hparams[{j}] (it was computed from "
                "the hyperparameters with autograd on, e.g. by an inner loop run with "
                "create_graph=True): implicit_hypergradient differentiates through the optimality "
                "condition instead of that history. Pass the solution as a fresh leaf, "
                "w = w.detach().requires_grad_(), and build the losses from it"
            )
    with _autograd_on("implicit_hypergradient"):
        r = _implicit(train_loss, val_loss, weights, hparams, solver, x0)
    return r.hypergrad, r.val_loss, r.solve


def _history_reaches(w: Tensor, hparams: Sequence[Tensor]) -> int | None:
    """The index of a hyperparameter that the autograd history of the (non-leaf) ``w`` reaches,
    or ``None`` (a leaf, or a history free of the hyperparameters: a view of a leaf)."""
    if w.grad_fn is None:
        return None
    leaves = {id(h): j for j, h in enumerate(hparams) if h.grad_fn is None}
    nodes = {h.grad_fn: j for j, h in enumerate(hparams) if h.grad_fn is not None}
    seen: set[Any] = set()
    stack: list[Any] = [w.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in nodes:
            return nodes[node]
        v = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it feeds
        if v is not None and id(v) in leaves:
            return leaves[id(v)]
        stack.extend(nxt for nxt, _ in node.next_functions)
    return None


def power_iteration(
    hvp: HVP, like: Sequence[Tensor], iters: int, start: Sequence[Tensor] | None = None
) -> tuple[float, Tensors]:
    r"""Estimate the largest-magnitude eigenvalue :math:`|\lambda|_{max}` of :math:`H` by power
    iteration (Rayleigh quotient :math:`|v^\top H v|` of the normalised iterate).

    Args:
        hvp: ``hvp(u) -> H u``.
        like: tensors shaped like the weights (for the random start).
        iters: HVPs to spend (>= 1).
        start: a start vector (e.g. the previous estimate's eigenvector); default: a fixed-seed
            Gaussian (torch's global RNG is not touched).

    Returns:
        ``(estimate, eigenvector)``; the estimate approaches :math:`|\lambda|_{max}` from below.

    >>> import torch
    >>> H = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    >>> lam, _ = power_iteration(lambda u: (H @ u[0],), [torch.zeros(3)], iters=50)
    >>> round(lam, 4)
    3.0
    """
    if start is None:
        gen = torch.Generator(device=like[0].device).manual_seed(0)
        v = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like]
    else:
        v = [t.clone() for t in start]
    torch._foreach_div_(v, norm(v).clamp_min(torch.finfo(v[0].dtype).tiny))
    estimate = torch.zeros((), dtype=like[0].dtype, device=like[0].device)
    for _ in range(iters):
        hv = _writable(hvp(v))  # (normalised in place below)
        estimate = dot(v, hv).abs()
        v = hv
        torch._foreach_div_(v, norm(v).clamp_min(torch.finfo(v[0].dtype).tiny))
    return float(estimate), tuple(v)


#: inner optimisers whose ``weight_decay`` is an L2 term added to the gradient (coupled), unless
#: a group says ``decoupled_weight_decay`` (AdamW, and Adam / NAdam / RAdam with that flag)
_COUPLED_DECAY = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
)

#: inner optimisers whose ``weight_decay`` always shrinks the weights by ``1 - lr * weight_decay``
#: (decoupled: Adafactor's and Muon's too, from torch 2.5 / 2.9)
_DECOUPLED_DECAY = tuple(
    getattr(torch.optim, name) for name in ("AdamW", "Adafactor", "Muon") if hasattr(torch.optim, name)
)

#: inner optimisers whose ``lr`` is not a factor of every step: Rprop takes it as the start of its
#: per-entry step sizes (``state["step_size"]``) and adapts those on its own
_OWN_STEP_SIZES = (torch.optim.Rprop,)

#: power iteration for Neumann's step size: HVPs for a fresh estimate, for a warm refresh, and
#: how many hypersteps an estimate is reused for
_POWER_ITERS, _POWER_REFRESH_ITERS, _POWER_EVERY = 20, 5, 10
#: Neumann's learning-rate step size ("lr", or the default for plain SGD) gives way to "power" where
#: the rate is below this fraction of the optimiser's own (see Implicit._alpha_rule)
_TINY_RATE = 1e-2


def _float_or_nan(x: Any) -> float:
    """A setting as a float (a tensor one read once), ``nan`` where absent or not a number."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def held_at_zero(optimizer: torch.optim.Optimizer) -> set[int]:
    """The identities of the parameters in ``optimizer``'s param groups whose learning rate is 0
    while a group holding trained weights has a positive one (empty otherwise, as in a warmup from
    0): the steps never move them, so an implicit-function solve holds them as constants. One pass
    over the groups. Empty for an optimiser whose rate is no factor of every step (Rprop reads
    ``lr`` once, as its per-entry step sizes' start, and adapts them itself: a group set to lr 0
    later trains on at full speed, and holding it gave the IFT of another problem, silently); not
    a group whose rate the optimiser tunes itself before each step (hg.optim's SGDHD / AdamHD: at
    0 it is clamped at its ``lr_min`` only until the next step raises it again; held as constants,
    the decay's hypergradient was 3.4% off the IFT's)."""
    if isinstance(optimizer, _OWN_STEP_SIZES):
        return set()
    rates = [
        (g, _float_or_nan(g.get("lr")))
        for g in optimizer.param_groups
        if any(p.requires_grad for p in g["params"])
    ]
    if not any(r > 0 for _, r in rates):
        return set()
    return {
        id(p)
        for g, r in rates
        if r == 0 and not _float_or_nan(g.get("hypergrad_lr", 0.0)) > 0
        for p in g["params"]
    }


class Implicit(HyperOptimizer):
    r"""Hyperparameters by the implicit function theorem, inside ordinary training.

    Between hypersteps the model trains with ``inner_optimizer`` (any ``torch.optim`` optimiser)
    through :meth:`step`; :meth:`hyper_step` assumes the weights are near a stationary point of
    ``train_loss`` and applies the IFT with an approximate inverse Hessian (see
    :func:`implicit_hypergradient`). Memory O(P + H), whatever the number of inner steps.

    Args:
        model, hparams, train_loss, val_loss, inner_optimizer, outer_optimizer, on_nonfinite,
            divergence: see :class:`HyperOptimizer`.
        solver: :class:`Neumann` (default: 5 terms), :class:`CG`, :class:`Identity` or
            :class:`Direct` (any :class:`LinearSolver`). A solver with ``warm_start=True`` starts
            from the previous accepted hyperstep's solution, unless its residual was above 1 or
            it is shaped for other weights (``hessian_subset`` changed since), or the solver
            would spend no iteration past it (``Neumann(steps=0)``, ``CG(maxiter=1)``): then from 0.
        hessian_subset: which trained weights (by parameter name) the implicit function theorem
            differentiates through, e.g. ``lambda n: n.startswith("head.")`` for the last layers
            of a very large model; ``None``: all (default: ``None``). A weight shared by several
            modules (tied) is selected when the callable accepts any of its names (not only the
            first, under which ``named_parameters`` lists it). With :math:`w = (w_S, w_F)` it
            computes :math:`\partial_\lambda L_V - \partial^2_{\lambda w_S} L_T\,
            H_{SS}^{-1} \partial_{w_S} L_V`, treating :math:`w_F` as constants: exact when
            :math:`w_F` does not depend on :math:`\lambda` (frozen or pretrained features),
            otherwise it ignores how they respond. HVPs and the solver's vectors cover
            :math:`w_S` only, and backward passes stop below it (no graph is kept for the rest).
            Weights in param groups held at a learning rate of 0 while other groups train (a
            backbone frozen through its group's rate or schedule) are in :math:`w_F` too: the
            steps never move them (while every group is at 0, as in a warmup from 0, none is).

    Neumann's step size :math:`\alpha` (the series converges only when :math:`\|I - \alpha H\| < 1`):

    * a number: used as given;
    * ``"lr"``: the inner learning rate at each hyperstep (it follows LR schedules). That is the
      paper's practice and the right scale for SGD on the same loss — :math:`i` terms then equal
      differentiating :math:`i + 1` SGD steps — but not for adaptive optimisers (Adam's lr of
      1e-3 gave a hypergradient with cosine −0.08 to the truth) or param groups with different
      rates, for which it warns; while that rate is 0 (a warmup from 0, a cosine schedule at its
      end), which is no step size, ``"power"``, and likewise while it is scheduled below 1% of the
      optimiser's own rate (its constructor's ``lr``, a scheduler's ``initial_lr`` or ``max_lr``:
      the end of a ``OneCycleLR``, ``ReduceLROnPlateau`` after two cuts), where the series sums
      as few terms of the inverse as at 0;
    * ``"power"``: :math:`1/\hat\lambda_{max}`, with :math:`\hat\lambda_{max}` the largest
      Hessian eigenvalue (in magnitude) estimated by power iteration on the hyperstep's own
      training batch: 20 HVPs the first time, then 5 warm-started HVPs every 10 hypersteps,
      and 20 warm-started ones at once (then a second solve) when the series grows by more than
      2 per term, grows along a curvature above :math:`2/\alpha` (its terms flip sign: see
      ``SolveResult.curvature``) or overflows (status ``NONFINITE``), a sign that the curvature
      outgrew the estimate (progressive sharpening); all counted in ``info.solver_iterations``.
      A series that still grows (status ``DIVERGING``) meets negative curvature: use ``CG`` with
      ``damping`` there. An estimate of 0 (from a kept eigenvector, then once more from a
      random start) means :math:`H = 0`, e.g. a piecewise-linear training loss without a
      penalty: no curvature to invert, so the solution is 0 with status
      ``NONPOSITIVE_CURVATURE``, as ``CG`` and ``Direct`` give (the hypergradient is the
      direct term), and the estimate is not kept;
    * ``None`` (default): ``"lr"`` for ``torch.optim.SGD`` without momentum and a single
      learning rate, ``"power"`` otherwise. Where the series at the learning rate grows as
      ``"power"``'s does at a stale estimate (:math:`\alpha\lambda_{max} > 2` on the hyperstep's
      training batch: a larger batch than the steps' under a summed loss, or SGD at the edge of
      stability), it is solved again at ``"power"``'s step size (its HVPs counted in
      ``info.solver_iterations``) instead of returning a diverged series.

    Batches: ``hyper_step(train_batch=..., val_batch=...)`` needs both (the training batch gives
    the Hessian and the mixed second derivative).

    Buffers: each loss of a hyperstep runs on copies of the model's and of ``hparams``' buffers
    (BatchNorm statistics, a learned augmentation network's running normaliser or step
    counter) as they are, so a module that updates a buffer and then reads it sees in
    ``train_loss`` what :meth:`step` would, not ``val_loss``'s update; the real buffers are
    left untouched. The same holds for state a model keeps in plain tensor attributes (a
    language model's ``self.hidden = h.detach()``): each loss starts from copies of their
    values at the hyperstep's start, and afterwards the model holds the very objects it held
    before (a validation loss cannot carry its own hidden state from one hyperstep to the
    next through the model: keep that in the validation batch or in your own variable).

    The inner optimiser's own L2 term (``weight_decay`` of ``SGD``, ``Adam``, ``RMSprop``,
    ``Adagrad``, ``Adamax``, ``ASGD``, ``NAdam``, ``RAdam`` and of :mod:`hypergrad.optim`'s,
    coupled, i.e. not ``AdamW`` nor ``decoupled_weight_decay=True``) is part of the problem
    the weights solve: they settle where :math:`\nabla L_T + \delta w = 0`, so the HVPs are
    of :math:`H + \delta I` (with an SGD weight decay of 0.5 on a ridge problem, leaving it out
    gave a hypergradient 35% off). Decoupled decay (AdamW) has no such objective: the IFT then
    uses :math:`H` alone, an approximation; for an exact hypergradient put the decay into
    ``train_loss`` as a fixed penalty instead. Other optimisers' ``weight_decay`` is not read.

    An inner optimiser that climbs ``train_loss`` (``maximize=True`` in the groups of all the
    weights of the solve, e.g. on a log-likelihood) takes them to a maximum, where :math:`H`
    (:math:`H - \delta I` with a coupled decay, which ``maximize`` negates) is negative
    definite: the solve then runs on its negative, with :math:`-\partial L_V/\partial w` on
    the right, the same solution, so Neumann, CG and the step-size rules apply as at a minimum
    (before, Neumann's series diverged and CG stopped on negative curvature). Whether the
    weights sit at a maximum is read from the curvature along :math:`\partial L_V/\partial w`
    (one more HVP, counted in ``info.solver_iterations``). A descent-ascent game (some groups
    with ``maximize=True``, some without) keeps :math:`H`, indefinite there: use
    :class:`Direct`.

    The IFT differentiates the gradient of ``train_loss`` as written. A factor computed from the
    weights and then detached inside it (per-example weights from ``loss_i.detach()`` as in
    Meta-Weight-Net or focal-style reweighting, a target from the model's own detached output)
    makes the field the inner optimiser follows other than that gradient's: its Jacobian has
    the detached factor's derivative, which the HVPs leave out, so the hypergradient is off
    (15–28% on small regression problems) without any error. Tune such a loss with
    :class:`Unrolled` at ``K=1``, the one-step lookahead of those papers, which takes no
    derivative through the weights and is exact; longer windows leave the detached factor's
    derivative out of every step's Jacobian too.

    Cost per :meth:`hyper_step`: as :func:`implicit_hypergradient` (one validation
    forward/backward, one training forward/backward with a graph kept, the solver's HVPs and one
    mixed VJP), plus any power-iteration HVPs; ``info.solver_iterations`` counts every HVP.
    :class:`~hypergrad.hparams.WeightDecay` penalties enter the HVPs by their exact diagonal
    second derivatives, without autograd (cheaper HVPs), unless a weight of the solve or a
    hyperparameter has gradient hooks (``t.register_hook``).

    Gradient hooks on the weights act, as in training, on every derivative taken w.r.t. them:
    the training gradient, each HVP, :math:`\partial L_V/\partial w`. For a linear hook that is
    the IFT of the gradient field the inner optimiser follows: a constant scaling cancels out, a
    mask (``g * mask``) gives the hypergradient with the masked entries held fixed. A non-linear
    hook (``g.clamp(-c, c)``) is applied to the HVPs too, which then are not Hessian products:
    clip in :meth:`step` (``max_grad_norm``) instead. A hook on a hyperparameter acts on each
    term of its hypergradient (direct and mixed): a mask (``g * mask``) gives 0 at the masked
    entries.

    Raises:
        ValueError: ``hparams`` holds settings of the inner optimiser
            (:class:`~hypergrad.hparams.LearningRate`, ...), or ``hessian_subset`` selects no
            trained weight; at :meth:`hyper_step`, a missing batch, or a training gradient that
            does not depend on the weights.
        TypeError: ``solver`` is not a :class:`LinearSolver`, or ``hessian_subset`` is not
            callable or is an ``nn.Module`` (called on inputs, not names).

    Hyperparameters must enter ``train_loss`` or ``val_loss`` directly; settings of the inner
    optimiser (:class:`~hypergrad.hparams.LearningRate`,
    :class:`~hypergrad.hparams.OptimizerSetting`) are rejected: learning rates and momenta do not
    move the optimum (tune them with :class:`Unrolled`); a coupled ``weight_decay`` does, but
    through the optimiser, not ``train_loss``: write it as
    :class:`~hypergrad.hparams.WeightDecay` in ``train_loss``.

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
    >>> info.solver_iterations, info.solver_status
    (5, 'fixed')
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
        hessian_subset: Callable[[str], bool] | None = None,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        super().__init__(
            model,
            hparams,
            train_loss,
            val_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            on_nonfinite=on_nonfinite,
            divergence=divergence,
        )
        if self.settings:
            names = sorted({setting.name for _, setting in self.settings})
            decoupled = isinstance(inner_optimizer, _DECOUPLED_DECAY) or any(
                g.get("decoupled_weight_decay", False) for g in inner_optimizer.param_groups
            )
            decays = [n for n in names if n in ("weight_decay", "lambd") and not decoupled]
            if decays:
                raise ValueError(
                    f"Implicit cannot tune the inner optimiser's {', '.join(decays)}: it moves the "
                    "inner optimum, but through the optimiser, and Implicit differentiates "
                    f"train_loss. Put the decay in train_loss instead (and the optimiser's {decays[0]} "
                    "to 0): hp = hg.hparams.WeightDecay(model, per=...) and loss + hp.penalty(model), "
                    "d/2 |w|^2, whose optimum is that of weight_decay=d; or use hg.Unrolled."
                )
            raise ValueError(
                f"Implicit cannot tune inner-optimiser settings ({', '.join(names)}): it "
                "differentiates train_loss at its optimum, which learning rates and momenta do not "
                "move (and a decoupled weight decay moves in no way a loss expresses). Use "
                "hg.Unrolled for them."
            )
        solver = Neumann() if solver is None else solver
        if not isinstance(solver, LinearSolver):
            raise TypeError(
                f"solver must be a hg.LinearSolver (hg.Neumann, hg.CG, hg.Identity, hg.Direct), "
                f"got {_solver_got(solver)}"
            )
        self.solver = solver
        self.hessian_subset = hessian_subset
        #: add WeightDecay penalties' exact second derivatives without autograd (same result,
        #: cheaper HVPs); a switch for comparisons
        self.analytic_penalties = True
        self._hessian_weights()  # fail now if the subset is empty
        self._x0: Tensors | None = None  # the last accepted solution (warm start)
        self._power: tuple[float, Tensors, int] | None = None  # (estimate, eigenvector, at hyperstep)
        #: the identities of the weights ``_x0`` and ``_power`` are over (``None``: not known)
        self._over: tuple[int, ...] | None = None
        self._warned_lr = False

    def start_episode(self) -> None:
        self._x0 = None
        self._power = None
        self._over = None

    def _hessian_weights(self) -> list[Tensor]:
        """The trained weights the IFT differentiates through (``hessian_subset``), less those of
        param groups held at a learning rate of 0 while other groups train (a backbone frozen
        through its group's rate, a ``LambdaLR`` per group returning 0 for the first epochs):
        the steps never move them, so they are constants of the solve, as frozen weights are.
        (Solved over as well, they gave the head's decay a hypergradient 3x the IFT's over the
        head, the held backbone's decay one of its own, and CG "nonpositive_curvature".) While
        every group is at 0 (a warmup from 0) none is held."""
        chosen = self._subset_weights()
        held = self._held_at_zero()
        if held:
            moving = [w for w in chosen if id(w) not in held]
            chosen = moving or chosen
        return chosen

    def _held_at_zero(self) -> set[int]:
        """The identities of the parameters :func:`held_at_zero` holds for the inner optimiser."""
        return held_at_zero(self.inner_optimizer)

    def _subset_weights(self) -> list[Tensor]:
        """The trained weights ``hessian_subset`` selects (all of them without one)."""
        pair = self.pair
        if self.hessian_subset is None:
            return list(pair.weights)
        _check_subset(self.hessian_subset)
        # a weight tied into several modules is selected by any of its names (named_parameters
        # lists it under the first one only: a head tied to the embedding is "2.weight" too)
        names: dict[int, list[str]] = {}
        for n, p in pair.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        subset = self.hessian_subset
        chosen = [
            w
            for n, w in zip(pair.weight_names, pair.weights, strict=True)
            if any(subset(a) for a in names.get(id(w), [n]))
        ]
        if not chosen:
            raise ValueError(
                f"hessian_subset selects none of the trained weights {list(pair.weight_names)[:6]}..."
            )
        return chosen

    def _alpha_rule(self) -> float | str:
        """Neumann's step size: a number, or ``"power"``."""
        assert isinstance(self.solver, Neumann)
        alpha = self.solver.alpha
        if isinstance(alpha, (int, float)):
            return float(alpha)
        groups = [g for g in self.inner_optimizer.param_groups if any(p.requires_grad for p in g["params"])]
        # the rates of the weights the series solves over (hessian_subset): a backbone's group at
        # 1e-3 listed first, the head's at 0.3 and a subset of the head gave the series 1e-3 (a
        # hypergradient 92% off with 20 terms, and a warning of "several learning rates")
        solved = {id(w) for w in self._hessian_weights()}
        groups = [g for g in groups if any(id(p) in solved for p in g["params"])] or groups
        lrs = {float(g["lr"]) for g in groups}
        is_sgd = type(self.inner_optimizer) is torch.optim.SGD
        lr = float(groups[0]["lr"]) if groups else math.nan  # (nothing trained: frozen since)
        if not (lr > 0 and math.isfinite(lr)):
            # no scale (a warmup from 0, a cosine schedule at its end): Neumann(alpha=0) would be
            # the solution 0, the hypergradient its direct term only; and Neumann refuses alpha=0
            return "power"
        # nor is a rate scheduled far below the group's own (OneCycleLR ends at 1/(25 * 1e4) of its
        # peak, ReduceLROnPlateau and StepLR divide by 10 at a time, a warmup starts near 0): the
        # series at it is as good as alpha = 0, (i + 1) * lr * v (at the end of a OneCycleLR, -3.5e-6
        # for the closed form's -0.109, status "fixed"), where a rate of exactly 0 got "power"'s.
        # The scale: the rate the optimiser was built with, or a scheduler's base rate (no HVP)
        rates = [_float_or_nan(self.inner_optimizer.defaults.get("lr"))]
        rates += [_float_or_nan(g.get(k)) for g in groups for k in ("initial_lr", "max_lr")]
        if lr < _TINY_RATE * max((r for r in rates if r > 0 and math.isfinite(r)), default=0.0):
            return "power"
        if alpha is None:
            plain = is_sgd and len(lrs) == 1 and all(float(g.get("momentum", 0.0)) == 0.0 for g in groups)
            return lr if plain else "power"
        if alpha == "lr":
            # (hg.optim.SGDHD is torch's SGD with its rate tuned online: the current rate is the
            # step size of SGD's steps, on the Hessian's scale as for SGD; warned for it, the user
            # was told to switch to a costlier rule that the rate did not need)
            sgd_steps = isinstance(self.inner_optimizer, torch.optim.SGD)
            if (not sgd_steps or len(lrs) > 1) and not self._warned_lr:
                self._warned_lr = True
                _warn_user(
                    f"Neumann(alpha='lr') takes the inner learning rate {float(groups[0]['lr']):g} as the "
                    f"series' step size, but the inner optimiser is {type(self.inner_optimizer).__name__}"
                    f"{' with several learning rates' if len(lrs) > 1 else ''}: that rate is not on the "
                    "Hessian's scale and the series may converge to the wrong answer or diverge. Use "
                    "alpha='power' (or None) or a number. (warned once)",
                    UserWarning,
                )
            return lr
        return "power"

    def _check_post_accumulate_hooks(self) -> None:
        """Warn (once per weight) about hooks that act on a trained weight's ``.grad`` after
        :meth:`step`'s backward pass (``Tensor.register_post_accumulate_grad_hook``): no derivative
        the hypergradient takes (``torch.autograd.grad``) runs them, so one that masks or rescales
        the gradient (pruned entries held at 0: ``p.grad.mul_(mask)``) moves training's rest point
        away from the one the IFT solves for (a masked ridge regression: 75% off its closed form,
        silently). A few attribute reads per weight and hyperstep."""
        found = [
            n
            for n, w in zip(self.pair.weight_names, self.pair.weights, strict=True)
            if getattr(w, "_post_accumulate_grad_hooks", None)
        ]
        warned = self.__dict__.setdefault("_warned_post_hooks", set())
        new = [n for n in found if n not in warned]
        if not new:
            return
        warned.update(new)
        _warn_user(
            f"the trained weight(s) {new[:4]} have post-accumulate-grad hooks "
            "(Tensor.register_post_accumulate_grad_hook), which act on .grad in step()'s backward "
            "pass only: Implicit's derivatives cannot run them. If they change the gradient (a mask "
            "holding pruned entries fixed, a rescaling), the inner optimiser rests elsewhere than "
            "where the training gradient vanishes, and the hypergradient is that of training "
            "without them. Write such a mask as a gradient hook, w.register_hook(lambda g: g * mask), "
            "which every derivative Implicit takes follows. (warned once per weight)",
            UserWarning,
        )

    def current_solver(self) -> LinearSolver:
        """The solver the next hyperstep uses, with Neumann's step size resolved where that needs
        no HVP (a number or the learning rate; ``"power"`` shows the last estimate, if any)."""
        if not isinstance(self.solver, Neumann):
            return self.solver
        rule = self._alpha_rule()
        if isinstance(rule, float):
            return dataclasses.replace(self.solver, alpha=rule)
        if self._power is not None:
            return dataclasses.replace(self.solver, alpha=1.0 / self._power[0])
        return self.solver

    def _lr_then_power(self, at_lr: LinearSolver) -> Callable[[HVP, Any], tuple[LinearSolver, int, Any]]:
        """The default Neumann step size as a solver callback: the learning rate (no HVP), and,
        called again because the series at it grew as at a stale estimate, ``"power"``'s."""

        def choose(hvp: HVP, stale: Any) -> tuple[LinearSolver, int, Any]:
            if stale is None:
                return at_lr, 0, _AT_LR
            return self._choose_solver(hvp, None if stale is _AT_LR else stale)

        return choose

    def _choose_solver(self, hvp: HVP, stale: Any = None) -> tuple[LinearSolver, int, Any]:
        """Neumann with ``alpha = 1/lambda_max`` from (warm-started) power iteration; ``stale``: an
        estimate that made the series blow up in this hyperstep, to refresh now (warm-started,
        the full number of iterations)."""
        assert isinstance(self.solver, Neumann)
        weights = self._hessian_weights()
        extra, power = 0, self._power if stale is None else stale
        start = None if power is None else _warm_start_for(power[1], weights)
        if start is None:  # an estimate for other weights (hessian_subset changed, a state loaded
            power = None  # from a run with another subset): of another Hessian, estimated afresh
        if stale is not None or power is None or self.hyper_steps - power[2] >= _POWER_EVERY:
            iters = _POWER_ITERS if power is None or stale is not None else _POWER_REFRESH_ITERS
            lam, vec = power_iteration(hvp, weights, iters, start)
            if lam == 0 and start is not None:  # the kept eigenvector may lie in H's null space
                lam, vec = power_iteration(hvp, weights, _POWER_ITERS)  # now: from a fresh start
                iters += _POWER_ITERS
            if lam == 0:
                # H u = 0 for a random u: H = 0 (a piecewise-linear training loss, no penalty), no
                # curvature to invert. As CG and Direct do: solution 0, "nonpositive_curvature";
                # the estimate is not kept. (alpha = 1/tiny gave a hypergradient of -3e307,
                # "fixed", and the zero eigenvector stayed the start of every later estimate.)
                return _ZeroCurvature(), iters, None
            if not lam > 0:  # zero / non-finite Hessian: leave it to the guards downstream
                lam = float("nan") if lam != lam else float(torch.finfo(self.dtype).tiny)
            extra, power = iters, (lam, vec, self.hyper_steps)
        # a NaN estimate (a NaN in the Hessian, so in every HVP): any valid step size; the series
        # comes out NaN and the non-finite guard refuses the hyperstep, as for the other solvers
        alpha = 1.0 / power[0] if power[0] == power[0] else 1.0
        return dataclasses.replace(self.solver, alpha=alpha), extra, power

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        pair = self.pair
        buffers = pair.buffers()
        # under DistributedDataParallel (broadcast_buffers=True) every rank's training forward
        # reads rank 0's buffers, broadcast at its start: so does the training loss here (the
        # objective the steps minimise); the validation loss reads this rank's own, as
        # ``val_loss(model.module, ...)`` would
        train_buffers = rank0_buffers(self.model, buffers)
        # the hyperparameters' own buffers as the model's: each loss reads copies of their
        # values now, as step() would (see HyperOptimizer._hparam_buffers_at)

        # and the model's plain tensor attributes (a hidden state its forward keeps, as
        # ``self.hidden = h.detach()``) as copies of their values now, put back after each call:
        # the validation loss's update no longer reaches the training loss, nor the next step
        # The hyperparameter module's own plain attributes likewise (an augmentation network
        # that keeps a running mean as ``self.mean = ...``, not a registered buffer): the
        # hypergradient's forward passes moved it, which hypergradient() promises not to do
        modules = list(pair.model.modules()) + list(self.hparams.modules())
        attributes = _plain_attributes(modules)
        # each loss runs in the train/eval modes the hyperstep began with, as step() runs
        # train_loss: val_loss runs first, and one that calls model.eval() (and does not switch
        # back) put train_loss's Hessian and mixed term in eval mode (BatchNorm on running
        # statistics, no dropout): a hypergradient 37% off, silently
        modes = [(m, m.training) for m in modules]

        def start_modes() -> None:
            for m, flag in modes:
                if m.training != flag:
                    m.training = flag

        def lt() -> Tensor:
            start_modes()
            with self._hparam_buffers_at(), _attributes_kept(modules, attributes):
                return pair.loss(self.train_loss, train_batch, buffers=clone_all(train_buffers))

        def lv() -> Tensor:
            start_modes()
            with self._hparam_buffers_at(), _attributes_kept(modules, attributes):
                return pair.loss(self.val_loss, val_batch, buffers=clone_all(buffers))

        train_value: list[Tensor] = []

        def lt_recorded() -> Tensor:
            value = lt()
            train_value.append(value.detach())
            return value

        weights = self._hessian_weights()
        # the kept solution and power estimate are of the Hessian over the weights solved then: a
        # param group held at lr 0 since, or released (stage-wise unfreezing of blocks of the same
        # shapes), makes them another matrix's, whose eigenvalue was reused for up to 10
        # hypersteps (a step size 100 times too small: a hypergradient 94% off, status "fixed")
        over = tuple(id(w) for w in weights)
        if self._over is not None and self._over != over:
            self._x0, self._power = None, None
        solver: LinearSolver | Callable[[HVP, Any], tuple[LinearSolver, int, Any]] = self.current_solver()
        if isinstance(self.solver, Neumann) and self._alpha_rule() == "power":
            solver = self._choose_solver
        elif isinstance(self.solver, Neumann) and self.solver.alpha is None:
            # the default's learning rate is a step size for the steps' batches; on the hyperstep's
            # training batch the curvature may exceed 2 / lr (a summed loss on a larger batch: a
            # hypergradient 1e5 times too large, cosine -0.57, status "diverging"): where the
            # series grows as it does at a stale estimate, solve again at 1/lambda_max
            solver = self._lr_then_power(self.current_solver())
        average = self.ranks.mean_ if self.ranks.size > 1 else None
        warm = self.solver.warm_start and _moves_from_start(self.solver)
        x0 = _warm_start_for(self._x0, weights) if warm else None
        held = self._held_at_zero() if self.hessian_subset is not None else set()
        if held and all(id(w) in held for w in weights):
            # hessian_subset selects only weights held at lr 0 while others train: they are
            # constants (w_F) too, and solved over as if they moved they gave a held layer's decay
            # a hypergradient of its own (0.014 for 0), silently
            solver, x0 = _HeldStill(), None
        # gradient hooks on the weights or hyperparameters (t.register_hook: scaling, masking) act
        # on every derivative autograd takes w.r.t. them, and the by-hand penalty terms would
        # bypass them (with a hook scaling a weight's gradient by 3, the hypergradient was 66%
        # off; a hook masking entries of a decay left them a non-zero hypergradient)
        hooked = any(t._backward_hooks for t in [*weights, *pair.hparam_tensors])
        self._check_post_accumulate_hooks()
        by_hand = self.analytic_penalties and not hooked
        penalties = _DiagonalPenalties(self.hparams, pair.hparam_tensors) if by_hand else None
        # each loss computes its parametrised weights afresh: under a user's
        # ``torch.nn.utils.parametrize.cached()`` the training loss reused the validation loss's
        # cached weight, whose graph that loss's backward had freed (a RuntimeError)
        with _uncached(True):
            r = _implicit(
                lt_recorded,
                lv,
                weights,
                pair.hparam_tensors,
                solver,
                x0,
                average,
                penalties,
                self._coupled_decay(weights),
                self._maximizes(weights),
            )

        inner_loss = train_value[0]
        if average is not None:  # the concatenated batch's, for the guards and the info record
            inner_loss = inner_loss.clone()
            average([inner_loss])

        def commit() -> None:
            if self.solver.warm_start:  # (a solution worse than 0 would be a worse start than none)
                keep = float(r.solve.residual) <= 1.0
                self._x0 = clone_all(r.solve.solution) if keep else None
            if r.power is not None and r.power is not _AT_LR:
                self._power = r.power
            self._over = over

        return _Hypergradient(
            r.hypergrad,
            r.val_loss,
            solver_iterations=r.solve.iterations + r.extra_hvps,
            solver_residual=r.solve.residual,
            solver_status=r.solve.status.value,
            inner_loss=inner_loss,
            reached=r.reached,
            commit=commit,
        )

    def _coupled_decay(self, weights: Sequence[Tensor]) -> list[float] | None:
        return coupled_decay(self.inner_optimizer, weights)

    def _maximizes(self, weights: Sequence[Tensor]) -> bool:
        """Whether the inner optimiser climbs ``train_loss`` on every weight of the solve (their
        groups' ``maximize=True``): they then settle at a maximum, whose Hessian the solve
        negates (see :func:`_implicit`)."""
        ids = {
            id(p) for g in self.inner_optimizer.param_groups if g.get("maximize", False) for p in g["params"]
        }
        return bool(ids) and all(id(w) in ids for w in weights)

    def _hessian_names(self) -> list[str] | None:
        """The names of :meth:`_hessian_weights`, the weights the kept solution and eigenvector
        are over, in their order (``None`` where ``hessian_subset`` selects none)."""
        try:
            weights = self._hessian_weights()
        except ValueError:
            return None
        names = {id(w): n for n, w in zip(self.pair.weight_names, self.pair.weights, strict=True)}
        return [names[id(w)] for w in weights]

    def _cache_names(self) -> list[str] | None:
        """The names of the weights the kept solution and eigenvector are over: those of the last
        accepted hyperstep (a group held at lr 0 or released since changes the current ones)."""
        if self._over is None:
            return self._hessian_names()
        names = {id(w): n for n, w in zip(self.pair.weight_names, self.pair.weights, strict=True)}
        return [names[i] for i in self._over] if all(i in names for i in self._over) else None

    def _method_state(self) -> dict[str, Any]:
        return {
            "x0": self._x0,
            "power": self._power,
            "warned_lr": self._warned_lr,
            "weight_names": self._cache_names(),  # (the order of x0's and the eigenvector's tensors)
        }

    def _load_method_state(self, state: dict[str, Any]) -> None:
        saved, here = state.get("weight_names"), self._hessian_names()
        self._x0 = _by_name(state.get("x0"), saved, here)
        power = state.get("power")
        vec = None if power is None else _by_name(power[1], saved, here)
        self._power = None if power is None or vec is None else (power[0], vec, power[2])
        self._warned_lr = bool(state.get("warned_lr", False))
        self._over = None
        if saved is not None and here is not None and sorted(saved) != sorted(here):
            # kept over other weights than this run solves over now (see _hypergradient)
            self._x0, self._power = None, None
        elif here is not None:
            self._over = tuple(id(w) for w in self._hessian_weights())


def coupled_decay(optimizer: torch.optim.Optimizer, weights: Sequence[Tensor]) -> list[float] | None:
    r"""Per weight, the L2 coefficient ``optimizer`` adds to the gradient it follows
    (``weight_decay`` of torch's SGD, Adam, RMSprop, Adagrad, Adamax, Adadelta, ASGD, NAdam,
    RAdam and hypergrad.optim's, unless decoupled, plus ASGD's ``lambd``, which shrinks the
    weights by :math:`1 - \lambda\eta` each step; negated under ``maximize``): the weights
    then settle where :math:`\nabla L_T + \delta w = 0`, and the Hessian is
    :math:`H + \delta I`. ``None`` when there is none (decoupled decay, AdamW's, has no such
    objective)."""
    if not isinstance(optimizer, _COUPLED_DECAY):
        return None
    asgd = isinstance(optimizer, torch.optim.ASGD)
    by_id: dict[int, float] = {}
    for group in optimizer.param_groups:
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        if asgd:  # its shrink by 1 - lambd * eta acts as more decay (the total negated under maximize)
            wd += float(group.get("lambd", 0.0) or 0.0)
        if wd == 0.0 or group.get("decoupled_weight_decay", False):
            continue
        sign = -1.0 if group.get("maximize", False) else 1.0
        for p in group["params"]:
            by_id[id(p)] = sign * wd
    if not by_id:
        return None
    return [by_id.get(id(w), 0.0) for w in weights]
