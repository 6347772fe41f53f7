"""Optimisers that tune their own learning rate online by hypergradient descent.

:class:`SGDHD` and :class:`AdamHD` are drop-in replacements for :class:`torch.optim.SGD` and
:class:`torch.optim.Adam`. The parameter update is torch's own (they subclass the torch
optimisers and call their update); what they add is one gradient-descent step on the learning
rate of every parameter group before each parameter step (Baydin et al., 2018).

Math. Write the base optimiser's step as ``θ_t = θ_{t-1} - α_t d_t``, where ``d_t`` is its update
direction (SGD: the gradient, the momentum buffer or the Nesterov direction; Adam:
``m̂_t / (√v̂_t + ε)``). ``d_{t-1}`` does not depend on ``α_{t-1}``, so the derivative of the
objective ``F`` at the current point with respect to the previous learning rate is::

    ∂F(θ_{t-1}) / ∂α_{t-1} = -⟨∇F(θ_{t-1}), d_{t-1}⟩ = -h_t

and the learning rate follows it downhill with the hypergradient learning rate ``β``, then is
clamped into ``[α_min, α_max]`` (``lr_min``, ``lr_max``; by default ``[0, ∞)``)::

    α_t = min(max(α_{t-1} + β h_t, α_min), α_max),
    h_t = Σ_{p in group} ⟨∇_p F(θ_{t-1}), d_{t-1}^p⟩,    h_1 = 0.

``F`` is the objective the base optimiser minimises: the loss ``f`` (``-f`` with
``maximize=True``) plus ``λ/2 ‖θ‖²`` when ``weight_decay = λ > 0``, i.e. ``∇F`` is exactly the
gradient torch's update uses. ``h_t > 0`` means the last step and the new gradient still agree, so
the step was too short and ``α`` grows; ``h_t < 0`` means it overshot and ``α`` shrinks.

Why a floor. Nothing in the plain rule keeps ``α`` positive: on a noisy or oscillating objective
a run of negative ``h_t`` (or one large one, with a large ``β``) pushes it below zero, and then
``θ_t = θ_{t-1} - α_t d_t`` steps *along* ``d_t``: the optimiser ascends the objective it is meant
to minimise, and often diverges. The default floor ``α_min = 0`` turns that into "do not move";
at ``α = 0`` plain SGD on a deterministic objective sees the same gradient again, ``h = ‖g‖² > 0``,
and ``α`` grows back.

Non-finite gradients. One NaN or inf gradient entry makes ``h_t`` non-finite, and
``α_{t-1} + β h_t`` would carry it into every parameter of the group in that very step (torch's
update damages only the bad entries) or, clamped, silently set ``α`` to a bound. So a group whose
``h_t`` is not finite keeps ``α_{t-1}`` (a ``RuntimeWarning`` says so; ``h_t`` is still logged)
and its step is exactly the base optimiser's with that rate.

Cost per step: one extra dot product per parameter, one extra parameter-sized buffer per parameter
(``state[p]["hd_direction"]``, the stored ``d_{t-1}``), and one device-to-host read per device to
turn the hypergradients into the Python-float learning rates.

Reference: A. G. Baydin, R. Cornish, D. Martínez Rubio, M. Schmidt, F. Wood. *Online Learning Rate
Adaptation with Hypergradient Descent.* ICLR 2018. https://arxiv.org/abs/1703.04782
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, overload

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

__all__ = ["SGDHD", "AdamHD"]

_DIRECTION = "hd_direction"
_Loss = TypeVar("_Loss")


def _is_valid_rate(value: object) -> bool:
    """Whether ``value`` is a finite, non-negative real number (not a bool, not a Tensor)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and float(value) >= 0.0
    )


def _check_hypergrad_lr(value: object) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming it."""
    if not _is_valid_rate(value):
        raise ValueError(f"Invalid hypergrad_lr: {value}")
    return float(value)  # type: ignore[arg-type]


def _check_lr_bounds(lr_min: object, lr_max: object) -> tuple[float, float]:
    """Return ``(lr_min, lr_max)`` as floats, or raise ``ValueError`` naming the bad one.

    ``lr_min`` must be finite and ``>= 0``; ``lr_max`` must be ``> lr_min`` (``inf`` allowed).
    NaN, bools and Tensors are refused.
    """
    for name, value in (("lr_min", lr_min), ("lr_max", lr_max)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be a Python number)")
    if not _is_valid_rate(lr_min):
        raise ValueError(f"Invalid lr_min: {lr_min} (must be finite and >= 0)")
    lo, hi = float(lr_min), float(lr_max)  # type: ignore[arg-type]
    if not hi > lo:  # also refuses NaN
        raise ValueError(f"Invalid lr_max: {lr_max} (must be greater than lr_min = {lo})")
    return lo, hi


def _check_lr_in_bounds(lr: float, lr_min: float, lr_max: float) -> None:
    if not lr_min <= lr <= lr_max:
        raise ValueError(f"Invalid learning rate: {lr} (outside [lr_min, lr_max] = [{lr_min}, {lr_max}])")


def _clamp(value: float, low: float, high: float) -> float:
    """``value`` clamped into ``[low, high]``; a NaN stays NaN (a broken step is not hidden)."""
    if value < low:
        return low
    if value > high:
        return high
    return value


def _check_lr(value: object, owner: str) -> float:
    """Return a learning rate as a float, or raise ``ValueError`` naming it."""
    if isinstance(value, Tensor):
        raise ValueError(
            f"{owner} needs a Python float learning rate (it is updated on the host at every "
            f"step), got a Tensor: {value!r}"
        )
    if not _is_valid_rate(value):
        raise ValueError(f"Invalid learning rate: {value}")
    return float(value)  # type: ignore[arg-type]


def _reject_tensor(name: str, value: object, owner: str) -> None:
    if isinstance(value, Tensor) or (isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value)):
        raise ValueError(f"{owner} needs Python numbers for {name}, got a Tensor: {value!r}")


def _real(t: Tensor) -> Tensor:
    """A real view of ``t`` (complex numbers as pairs of reals, like torch's optimisers)."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Real inner product ``⟨a, b⟩`` as a 0-dim tensor (complex entries as pairs of reals), in
    the wider of the two dtypes (a direction kept from before ``model.double()`` is float32),
    at least float32 (half / bfloat16 are accumulated in float32)."""
    a, b = _real(a).reshape(-1), _real(b).reshape(-1)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.to(dtype), b.to(dtype))


def _sum_per_group(dots: Sequence[Sequence[Tensor]]) -> list[float]:
    """Sum each group's 0-dim tensors into a float, with one host read per device."""
    totals: dict[torch.device, dict[int, Tensor]] = {}
    for i, group_dots in enumerate(dots):
        for dot in group_dots:
            on_device = totals.setdefault(dot.device, {})
            acc = dot.to(torch.float32 if dot.device.type == "mps" else torch.float64)
            on_device[i] = on_device[i] + acc if i in on_device else acc
    out = [0.0] * len(dots)
    for on_device in totals.values():
        for i, value in zip(on_device, torch.stack(list(on_device.values())).tolist(), strict=True):
            out[i] += value
    return out


def _effective_grads(
    params: list[Tensor], grads: list[Tensor], weight_decay: float, maximize: bool, own: bool
) -> list[Tensor]:
    """The gradients of the minimised objective, as torch's SGD and Adam form them.

    ``own=True`` guarantees tensors that alias no ``.grad``, for keeping as directions: torch's
    foreach Nesterov SGD adds the momentum buffer into the gradients in place, and
    ``zero_grad(set_to_none=False)`` zeroes them in place.
    """
    if maximize:
        out = list(torch._foreach_neg(grads))
        if weight_decay != 0:
            torch._foreach_add_(out, params, alpha=weight_decay)
        return out
    if weight_decay != 0:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    if own:
        return [g.clone() for g in grads]
    return list(grads)


def _stacklevel_outside_torch() -> int:
    """The ``stacklevel`` that points a warning issued by the caller at the first frame outside torch.

    ``step`` is reached through torch's wrappers (the hook runner, an LR scheduler's, GradScaler).
    """
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    level, frame = 2, sys._getframe(2)  # 2: the caller's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(torch_dir):
        level, frame = level + 1, frame.f_back
    return level


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` without the hook wrapper that ``Optimizer.__init__`` puts on each class's ``step``.

    Our own ``step`` gets that wrapper too, so calling the wrapped parent would run the user's
    step pre/post hooks twice.
    """
    return inspect.unwrap(step, stop=lambda f: not getattr(f, "hooked", False))


class _HypergradientOptimizer(Optimizer):
    """Shared machinery: per-group learning-rate update before the base step, directions after."""

    #: The torch optimiser whose update is used.
    _hd_base: ClassVar[type[Optimizer]]
    #: Options of the base optimiser that are rejected when truthy.
    _hd_unsupported: ClassVar[tuple[str, ...]]
    #: Options of the base optimiser that must be Python numbers (not Tensors), as ``lr``.
    _hd_numbers: ClassVar[tuple[str, ...]]
    #: Settings the base constructor validates, checked for every group (see ``_hd_check_values``).
    _hd_checked: ClassVar[tuple[str, ...]]
    #: Group keys the base step needs that torch's ``__setstate__`` does not fill in for an old
    #: state: a loaded group without one was saved by another optimiser.
    _hd_required: ClassVar[tuple[str, ...]]

    # -- construction / state ---------------------------------------------------------------

    def _hd_finish_init(self, hypergrad_lr: float, lr_min: float, lr_max: float) -> None:
        if not any(group["params"] for group in self.param_groups):
            # torch refuses `[]` but accepts `[{"params": []}]`: an optimiser with nothing to
            # tune is always a mistake (e.g. a name filter that matched no parameter).
            raise ValueError(f"{type(self).__name__} got an empty parameter list: every param group is empty")
        self.defaults.update(hypergrad_lr=hypergrad_lr, lr_min=lr_min, lr_max=lr_max)
        for group in self.param_groups:  # torch added them before our defaults existed
            self._hd_check_bounds(group)
        for group in self.param_groups:
            self._hd_finish_group(group)

    def _hd_finish_group(self, group: dict[str, Any]) -> None:
        group.setdefault("hypergrad_lr", self.defaults["hypergrad_lr"])
        group.setdefault("hypergrad", 0.0)
        group.setdefault("lr_min", self.defaults["lr_min"])
        group.setdefault("lr_max", self.defaults["lr_max"])
        group["lr_min"], group["lr_max"] = float(group["lr_min"]), float(group["lr_max"])
        # Python floats, so the rate is accumulated in double precision (a NumPy float32
        # hypergrad_lr would otherwise turn every later lr into a float32).
        group["hypergrad_lr"] = float(group["hypergrad_lr"])
        group["lr"] = float(group["lr"])

    def _hd_check_bounds(self, group: dict[str, Any]) -> None:
        """Validate a (new) group's ``lr_min``, ``lr_max`` and ``lr``, falling back to the defaults."""
        lr_min, lr_max = _check_lr_bounds(
            group.get("lr_min", self.defaults["lr_min"]), group.get("lr_max", self.defaults["lr_max"])
        )
        _check_lr_in_bounds(float(group.get("lr", self.defaults["lr"])), lr_min, lr_max)

    def _hd_check_options(self, group: dict[str, Any]) -> None:
        for key in self._hd_unsupported:
            if group.get(key):
                raise ValueError(f"{type(self).__name__} does not support {key}={group[key]!r}")

    def _hd_validate_group(self, group: dict[str, Any]) -> None:
        if "lr" in group:
            _check_lr(group["lr"], type(self).__name__)
        for name in self._hd_numbers:  # as the constructor checks its own arguments
            if name in group:
                _reject_tensor(name, group[name], type(self).__name__)
        if "hypergrad_lr" in group:
            _check_hypergrad_lr(group["hypergrad_lr"])
        self._hd_check_options(group)
        self._hd_check_values(group)

    def _hd_check_values(self, group: dict[str, Any]) -> None:
        """Refuse the values the base constructor refuses (a negative momentum or weight decay,
        betas outside ``[0, 1)``, a negative ``eps``, a group's own ``nesterov=True`` without
        momentum), with its message: torch.optim checks the constructor's own arguments only,
        not a group's (given in the parameter list or to ``add_param_group``), which then
        trained silently with them. (A ``nesterov`` the group inherits is not judged against
        its own dampening: torch steps that combination, and runs rely on it.)"""
        settings = {k: group[k] if k in group else self.defaults[k] for k in self._hd_checked}
        if "nesterov" in settings and "nesterov" not in group:
            settings["nesterov"] = False
        self._hd_base([torch.empty(0, requires_grad=True)], **settings)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; it may set its own ``lr``, ``hypergrad_lr``, ``lr_min`` and ``lr_max``.

        Its values are checked as the constructor checks its arguments (a Tensor ``lr``,
        ``momentum``, ``betas``, ... is refused with a ``ValueError`` naming it)."""
        self._hd_validate_group(param_group)
        finished = "hypergrad_lr" in self.defaults  # False while torch's constructor adds the first groups
        if finished:
            self._hd_check_bounds(param_group)
        super().add_param_group(param_group)
        if finished:
            self._hd_finish_group(self.param_groups[-1])

    def _hd_check_loaded_groups(self, groups: Sequence[dict[str, Any]]) -> None:
        """Refuse loaded param groups that ``step`` cannot run, naming the group and the key."""
        owner = type(self).__name__
        for i, group in enumerate(groups):
            missing = [key for key in self._hd_required if key not in group]
            if missing:
                raise ValueError(
                    f"{owner} cannot load param group {i}: it lacks {', '.join(map(repr, missing))} "
                    f"(a state_dict saved by another optimiser?)"
                )
            for key in self._hd_unsupported:
                if group.get(key):
                    raise ValueError(
                        f"{owner} cannot load param group {i} with {key}={group[key]!r}: "
                        f"{owner} does not support it"
                    )

    def _hd_check_loaded_shapes(self, state: dict[str, Any]) -> None:
        """Refuse loaded per-parameter state shaped unlike its parameter, naming both.

        torch maps a state_dict's state onto the parameters by position: one saved with the
        parameters in another order gives a parameter the state of another. Where the shapes
        differ, torch's SGD without momentum keeps no state and never notices, but our stored
        direction would then be dotted with the wrong gradient: a silently wrong
        hypergradient when the sizes agree (a 2x3 and a 3x2 weight), an unclear error at the
        next step otherwise."""
        owner = type(self).__name__
        per_param = state.get("state", {})
        for i, group in enumerate(state.get("param_groups", ())):
            for j, p in enumerate(group.get("params", ())):
                if not isinstance(p, Tensor) or p not in per_param:
                    continue
                for key, value in per_param[p].items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(
                            f"{owner} cannot load the state of parameter {j} of param group {i}: its "
                            f"{key!r} has shape {tuple(value.shape)} but the parameter has shape "
                            f"{tuple(p.shape)} (were the parameters given in another order than when "
                            "the state_dict was saved?)"
                        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checked before anything is replaced, so a refused load_state_dict leaves the optimiser as
        # it was (torch would load such groups and fail only at the next step: AdamW's decoupled
        # weight decay, fused=True, or Adam's groups, without "momentum", in SGDHD).
        self._hd_check_loaded_groups(state["param_groups"])
        self._hd_check_loaded_shapes(state)
        super().__setstate__(state)
        # Also lets a plain torch SGD / Adam state_dict, or one saved before lr_min / lr_max existed,
        # be loaded: its groups lack (some of) our keys and get the constructor's values. A loaded
        # lr outside [lr_min, lr_max] is not refused; the next hypergradient step clamps it.
        self.defaults.setdefault("hypergrad_lr", 0.0)
        self.defaults.setdefault("lr_min", 0.0)
        self.defaults.setdefault("lr_max", math.inf)
        for group in self.param_groups:
            self._hd_finish_group(group)

    # -- the step ----------------------------------------------------------------------------

    def _hd_keeps_grads(self, group: dict[str, Any]) -> bool:
        """Whether ``_hd_directions`` needs the effective gradients after the base step."""
        return False

    def _hd_directions(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        """The update directions ``d_t`` of the step just taken, from the optimiser state."""
        raise NotImplementedError

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], _Loss]) -> _Loss: ...

    def step(self, closure: Callable[[], _Loss] | None = None) -> _Loss | None:
        """Update each group's learning rate by its hypergradient, then take the base step.

        The new rate is clamped into the group's ``[lr_min, lr_max]``. Groups with
        ``hypergrad_lr == 0`` are not updated (nor clamped), so they step exactly like torch.

        A group whose hypergradient is not finite (a NaN or inf gradient) keeps its rate, with a
        ``RuntimeWarning`` (issued after the step): its parameters then move exactly as the base
        optimiser's would, so only the bad entries are damaged.

        Args:
            closure: Optional. Re-evaluates the model and returns the loss; it is called once,
                with gradients enabled, before the hypergradients are computed.

        Returns:
            The closure's loss, or ``None`` without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        owner = type(self).__name__
        pending: list[tuple[list[Tensor], list[Tensor]]] = []
        dots: list[list[Tensor]] = []
        with torch.no_grad():
            for group in self.param_groups:
                # they may have been edited since construction (by hand or by a scheduler)
                self._hd_check_options(group)
                _check_lr_bounds(group["lr_min"], group["lr_max"])
                _check_hypergrad_lr(group["hypergrad_lr"])
                if isinstance(group["lr"], Tensor):
                    _check_lr(group["lr"], owner)  # raises: the rate is a host float
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                if any(g.is_sparse for g in grads):
                    raise RuntimeError(f"{owner} does not support sparse gradients")
                if not params:
                    pending.append(([], []))
                    dots.append([])
                    continue
                eff = _effective_grads(
                    params,
                    grads,
                    group["weight_decay"],
                    group["maximize"],
                    own=self._hd_keeps_grads(group),
                )
                group_dots = []
                for p, g in zip(params, eff, strict=True):
                    prev = self.state[p].get(_DIRECTION) if p in self.state else None
                    if prev is not None:
                        group_dots.append(_dot(g, prev))
                dots.append(group_dots)
                pending.append((params, eff))

            kept: list[tuple[int, float, float]] = []  # (group, its non-finite h, the rate it keeps)
            for i, (group, h) in enumerate(zip(self.param_groups, _sum_per_group(dots), strict=True)):
                group["hypergrad"] = h
                if group["hypergrad_lr"] != 0:
                    if not math.isfinite(h):
                        # α + β h would spread one bad gradient entry over the whole group now
                        kept.append((i, h, float(group["lr"])))
                        continue
                    lr = float(group["lr"]) + float(group["hypergrad_lr"]) * h
                    group["lr"] = _clamp(lr, float(group["lr_min"]), float(group["lr_max"]))

        _unhooked(self._hd_base.step)(self)

        with torch.no_grad():
            for group, (params, eff) in zip(self.param_groups, pending, strict=True):
                if params:
                    directions = self._hd_directions(group, params, eff)
                    for p, d in zip(params, directions, strict=True):
                        self.state[p][_DIRECTION] = d
                # A parameter left out of this step has ∂θ_t/∂α_t = 0: forget its old direction.
                for p in group["params"]:
                    if p.grad is None and p in self.state:
                        self.state[p].pop(_DIRECTION, None)
        for i, h, lr in kept:  # after the step, so an error filter cannot leave it half done
            warnings.warn(
                f"{owner}: non-finite hypergradient {h} in param group {i} (a NaN or inf gradient); "
                f"its learning rate stays {lr}",
                RuntimeWarning,
                stacklevel=_stacklevel_outside_torch(),
            )
        return loss


class SGDHD(_HypergradientOptimizer, torch.optim.SGD):
    r"""SGD (optionally with momentum) whose learning rate tunes itself by hypergradient descent.

    A drop-in replacement for :class:`torch.optim.SGD` (Baydin et al., ICLR 2018, "SGD-HD" and
    "SGDN-HD"). The parameter update is torch's own; before it, each parameter group's learning
    rate ``α`` takes one gradient step on the objective.

    With ``g_t = ∇F(θ_{t-1})`` the gradient torch's SGD uses (negated when ``maximize``, plus
    ``λ θ_{t-1}`` for ``weight_decay = λ``), momentum ``μ`` and dampening ``τ``, the update is
    ``θ_t = θ_{t-1} - α_t d_t`` with::

        d_t = g_t                                          (momentum = 0)
        b_t = μ b_{t-1} + (1 - τ) g_t,  b_1 = g_1,  d_t = b_t    (momentum > 0)
        d_t = g_t + μ b_t                                  (nesterov)

    and, before it, per parameter group::

        h_t = Σ_p ⟨g_t^p, d_{t-1}^p⟩   (h_1 = 0),        α_t = clamp(α_{t-1} + β h_t, α_min, α_max),

    ``β = hypergrad_lr``, ``[α_min, α_max] = [lr_min, lr_max]``; ``-h_t`` is exactly
    ``∂F(θ_{t-1})/∂α_{t-1}``. Plain SGD-HD (inside the bounds) is thus
    ``α_t = α_{t-1} + β ⟨∇F(θ_{t-1}), ∇F(θ_{t-2})⟩``. ``h_t`` scales like ``‖g‖²``, so ``β``
    must be chosen relative to the squared gradient norm.

    Bounds. Nothing in the hypergradient rule itself keeps ``α`` positive: with a large ``β`` on a
    noisy or oscillating objective (successive gradients pointing against each other, ``h_t < 0``)
    it overshoots below zero, and a negative ``α`` makes ``θ_t = θ_{t-1} - α_t d_t`` step *up* the
    objective; the optimiser then ascends and often diverges. So after every hypergradient update
    ``α`` is clamped into ``[lr_min, lr_max]``, by default ``[0, ∞)``. At ``α = 0`` the parameters
    do not move; plain SGD on a deterministic objective then sees the same gradient again
    (``h = ‖g‖² > 0``) and ``α`` recovers.
    A finite ``lr_max`` caps a rate that would grow past stability (e.g. ``2 / L`` for an
    ``L``-smooth objective). The bounds are per group, like ``lr``. They act only when a group has
    ``hypergrad_lr > 0``; with ``hypergrad_lr = 0`` nothing is clamped, so a scheduler that moves
    ``lr`` outside them is obeyed as in torch. A non-finite hypergradient (a NaN or inf gradient)
    leaves ``α`` unchanged, with a ``RuntimeWarning``: the step is then torch's with the old
    ``α``, so only the bad entries are damaged, as with torch.

    Cost: one extra dot product per parameter per step, one extra parameter-sized buffer per
    parameter (``state[p]["hd_direction"]`` holds ``d_t``) and one device-to-host read per step
    (per device). The last hypergradient of each group is kept in ``group["hypergrad"]`` (a float)
    for logging; ``group["lr"]`` is the current ``α`` (a float). With ``hypergrad_lr=0`` the
    trajectory is bit-identical to :class:`torch.optim.SGD`. LR schedulers that set the learning
    rate outright overwrite the tuned value; multiplicative ones compose with it.
    ``state_dict()`` holds everything needed to resume exactly (``lr_min`` and ``lr_max``
    included); an older one without them loads with the constructor's values.

    Args:
        params: Parameters or param groups; a group may set its own ``lr``, ``hypergrad_lr``,
            ``lr_min`` and ``lr_max``.
        lr: Initial learning rate ``α_0`` (a float in ``[lr_min, lr_max]``) (default: ``1e-3``).
        momentum: Momentum factor ``μ`` (default: ``0.0``).
        dampening: Dampening ``τ`` for momentum (default: ``0.0``).
        weight_decay: L2 penalty ``λ`` (added to the gradient, as in torch) (default: ``0.0``).
        nesterov: Use Nesterov momentum (default: ``False``).
        hypergrad_lr: Hypergradient learning rate ``β >= 0`` (default: ``1e-3``, the paper's).
        lr_min: Floor ``α_min`` of the learning rate, finite and ``>= 0`` (default: ``0.0``).
        lr_max: Ceiling ``α_max`` of the learning rate, ``> lr_min`` (default: ``math.inf``).
        maximize: Maximise the objective instead of minimising it (``α`` then ascends it too).
        foreach: Passed to :class:`torch.optim.SGD`.
        differentiable: Not supported; must be ``False``.
        fused: Not supported; must be ``None`` or ``False``.

    Raises:
        ValueError: For an invalid value (message names it, e.g. ``Invalid hypergrad_lr: -1.0``,
            ``Invalid lr_min: -1.0``; an ``lr`` outside ``[lr_min, lr_max]`` is an invalid learning
            rate), a Tensor ``lr`` / ``momentum`` / ``dampening`` / ``weight_decay`` (also in
            ``add_param_group``), or an unsupported option. ``step`` raises it too if a
            group's ``lr_min`` / ``lr_max`` / ``hypergrad_lr`` were edited to invalid values or
            its ``lr`` replaced by a Tensor (before anything moves). Also for a parameter list
            whose every group is empty. ``load_state_dict`` (and unpickling) raises it, before
            anything is replaced, for a group saved with an unsupported option (e.g. by
            :class:`torch.optim.AdamW`, or with ``fused=True``) or by another optimiser, and
            for per-parameter state shaped unlike its parameter (a state_dict saved with the
            parameters in another order).
        RuntimeError: ``step`` with sparse gradients.

    Example:
        >>> import torch
        >>> from hypergrad.optim import SGDHD
        >>> w = torch.zeros(3, requires_grad=True)
        >>> target = torch.tensor([1.0, -2.0, 3.0])
        >>> opt = SGDHD([w], lr=0.01, hypergrad_lr=0.01)
        >>> for _ in range(30):
        ...     opt.zero_grad()
        ...     loss = ((w - target) ** 2).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] > 0.01  # the too-small learning rate has grown
        True
        >>> loss.item() < 1e-2
        True

        The floor at work on ``f(w) = w²/2`` (unclamped, the second rate would be
        ``1.5 + 4 · ⟨-0.5, 1⟩ = -0.5`` and the step would go uphill, to ``w = -0.75``):

        >>> w = torch.ones((), requires_grad=True)
        >>> opt = SGDHD([w], lr=1.5, hypergrad_lr=4.0)
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     (0.5 * w**2).backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"], w.item()
        (0.0, -0.5)

    Reference:
        A. G. Baydin, R. Cornish, D. Martínez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018. https://arxiv.org/abs/1703.04782
    """

    _hd_base = torch.optim.SGD
    _hd_unsupported = ("differentiable", "fused")
    _hd_numbers = ("momentum", "dampening", "weight_decay")
    _hd_required = ("lr", "momentum", "dampening", "weight_decay")
    _hd_checked = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        hypergrad_lr: float = 1e-3,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        owner = type(self).__name__
        self._hd_check_options({"differentiable": differentiable, "fused": fused})
        lr = _check_lr(lr, owner)
        hypergrad_lr = _check_hypergrad_lr(hypergrad_lr)
        lr_min, lr_max = _check_lr_bounds(lr_min, lr_max)
        _check_lr_in_bounds(lr, lr_min, lr_max)
        for name, value in zip(self._hd_numbers, (momentum, dampening, weight_decay), strict=True):
            _reject_tensor(name, value, owner)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._hd_finish_init(hypergrad_lr, lr_min, lr_max)

    def _hd_keeps_grads(self, group: dict[str, Any]) -> bool:
        return group["momentum"] == 0 or bool(group["nesterov"])

    def _hd_directions(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        momentum = group["momentum"]
        if momentum == 0:
            return grads  # owned copies of g_t (see _hd_keeps_grads)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if group["nesterov"]:
            torch._foreach_add_(grads, bufs, alpha=momentum)  # g_t + μ b_t, in the owned copies
            return grads
        return [b.clone() for b in bufs]


class AdamHD(_HypergradientOptimizer, torch.optim.Adam):
    r"""Adam whose learning rate tunes itself by hypergradient descent ("Adam-HD").

    A drop-in replacement for :class:`torch.optim.Adam` (Baydin et al., ICLR 2018). The parameter
    update is torch's own; before it, each parameter group's learning rate ``α`` takes one
    gradient step on the objective.

    With ``g_t = ∇F(θ_{t-1})`` the gradient torch's Adam uses (negated when ``maximize``, plus
    ``λ θ_{t-1}`` for ``weight_decay = λ``), the update is ``θ_t = θ_{t-1} - α_t d_t`` with::

        m_t = β1 m_{t-1} + (1 - β1) g_t,        v_t = β2 v_{t-1} + (1 - β2) g_t²
        d_t = (m_t / (1 - β1^t)) / (√v_t / √(1 - β2^t) + ε)

    and, before it, per parameter group::

        h_t = Σ_p ⟨g_t^p, d_{t-1}^p⟩   (h_1 = 0),        α_t = clamp(α_{t-1} + β h_t, α_min, α_max),

    ``β = hypergrad_lr``, ``[α_min, α_max] = [lr_min, lr_max]``; ``-h_t`` is exactly
    ``∂F(θ_{t-1})/∂α_{t-1}``. With ``amsgrad=True`` torch's update, and so ``d_t``, divides by the
    running maximum ``max(v_1, …, v_t)`` instead of ``v_t``. Since ``d`` is roughly a sign
    vector, ``h_t`` scales like ``‖g‖₁``, hence the much smaller default ``β = 1e-7`` (the paper's).

    Bounds. Nothing in the hypergradient rule itself keeps ``α`` positive: with a large ``β`` on a
    noisy or oscillating objective (``h_t < 0``: the new gradient opposes the last step) it
    overshoots below zero, and a negative ``α`` makes ``θ_t = θ_{t-1} - α_t d_t`` step *up* the
    objective: the optimiser ascends. So after every hypergradient update ``α`` is clamped into
    ``[lr_min, lr_max]``, by default ``[0, ∞)``; at ``α = 0`` the parameters do not move until a
    positive hypergradient raises it again. A finite ``lr_max`` caps a rate that would grow too
    far. The bounds are per group, like ``lr``. They act only when a group has
    ``hypergrad_lr > 0``; with ``hypergrad_lr = 0`` nothing is clamped, so a scheduler that moves
    ``lr`` outside them is obeyed as in torch. A non-finite hypergradient (a NaN or inf gradient)
    leaves ``α`` unchanged, with a ``RuntimeWarning``: the step is then torch's with the old
    ``α``, so only the bad entries are damaged, as with torch.

    Cost: one extra dot product per parameter per step, one extra parameter-sized buffer per
    parameter (``state[p]["hd_direction"]`` holds ``d_t``) and one device-to-host read per step
    (per device). The last hypergradient of each group is kept in ``group["hypergrad"]`` (a float)
    for logging; ``group["lr"]`` is the current ``α`` (a float). With ``hypergrad_lr=0`` the
    trajectory is bit-identical to :class:`torch.optim.Adam`. LR schedulers that set the learning
    rate outright overwrite the tuned value; multiplicative ones compose with it.
    ``state_dict()`` holds everything needed to resume exactly (``lr_min`` and ``lr_max``
    included); an older one without them loads with the constructor's values.

    Args:
        params: Parameters or param groups; a group may set its own ``lr``, ``hypergrad_lr``,
            ``lr_min`` and ``lr_max``.
        lr: Initial learning rate ``α_0`` (a float in ``[lr_min, lr_max]``) (default: ``1e-3``).
        betas: ``(β1, β2)``, the moment decay rates (default: ``(0.9, 0.999)``).
        eps: ``ε``, added to the denominator (default: ``1e-8``).
        weight_decay: L2 penalty ``λ`` (added to the gradient, as in torch's Adam) (default: ``0.0``).
        amsgrad: Use the AMSGrad variant (the running maximum of ``v_t`` in the denominator)
            (default: ``False``).
        hypergrad_lr: Hypergradient learning rate ``β >= 0`` (default: ``1e-7``, the paper's).
        lr_min: Floor ``α_min`` of the learning rate, finite and ``>= 0`` (default: ``0.0``).
        lr_max: Ceiling ``α_max`` of the learning rate, ``> lr_min`` (default: ``math.inf``).
        foreach: Passed to :class:`torch.optim.Adam`.
        maximize: Maximise the objective instead of minimising it (``α`` then ascends it too).
        capturable: Not supported; must be ``False``.
        differentiable: Not supported; must be ``False``.
        fused: Not supported; must be ``None`` or ``False``.
        decoupled_weight_decay: Not supported (AdamW); must be ``False``.

    Raises:
        ValueError: For an invalid value (message names it, e.g. ``Invalid hypergrad_lr: -1.0``,
            ``Invalid lr_min: -1.0``; an ``lr`` outside ``[lr_min, lr_max]`` is an invalid learning
            rate), a Tensor ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` (also in
            ``add_param_group``), or an unsupported option. ``step`` raises it too if a
            group's ``lr_min`` / ``lr_max`` / ``hypergrad_lr`` were edited to invalid values or
            its ``lr`` replaced by a Tensor (before anything moves). Also for a parameter list
            whose every group is empty. ``load_state_dict`` (and unpickling) raises it, before
            anything is replaced, for a group saved with an unsupported option (e.g. by
            :class:`torch.optim.AdamW`, or with ``fused=True``) or by another optimiser, and
            for per-parameter state shaped unlike its parameter (a state_dict saved with the
            parameters in another order).
        RuntimeError: ``step`` with sparse gradients.

    Example:
        >>> import torch
        >>> from hypergrad.optim import AdamHD
        >>> w = torch.zeros(3, requires_grad=True)
        >>> target = torch.tensor([1.0, -2.0, 3.0])
        >>> opt = AdamHD([w], lr=1e-3, hypergrad_lr=1e-3)
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     loss = ((w - target) ** 2).sum()
        ...     loss.backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] > 1e-3  # the too-small learning rate has grown
        True
        >>> isinstance(opt.param_groups[0]["hypergrad"], float)
        True

    Reference:
        A. G. Baydin, R. Cornish, D. Martínez Rubio, M. Schmidt, F. Wood. Online Learning Rate
        Adaptation with Hypergradient Descent. ICLR 2018. https://arxiv.org/abs/1703.04782
    """

    _hd_checked = ("lr", "betas", "eps", "weight_decay")
    _hd_base = torch.optim.Adam
    _hd_unsupported = ("capturable", "differentiable", "fused", "decoupled_weight_decay")
    _hd_numbers = ("betas", "eps", "weight_decay")
    # ``amsgrad`` too (an Adam group has had it since PyTorch 0.4, though torch's ``__setstate__``
    # would fill it in): NAdam's, RAdam's and Adamax's groups have every other key, so their
    # states loaded silently (NAdam and RAdam then went on as Adam; Adamax died at the next step
    # with a bare ``KeyError: 'exp_avg_sq'``)
    _hd_required = ("lr", "betas", "eps", "weight_decay", "amsgrad")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        hypergrad_lr: float = 1e-7,
        lr_min: float = 0.0,
        lr_max: float = math.inf,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        owner = type(self).__name__
        self._hd_check_options(
            {
                "capturable": capturable,
                "differentiable": differentiable,
                "fused": fused,
                "decoupled_weight_decay": decoupled_weight_decay,
            }
        )
        lr = _check_lr(lr, owner)
        hypergrad_lr = _check_hypergrad_lr(hypergrad_lr)
        lr_min, lr_max = _check_lr_bounds(lr_min, lr_max)
        _check_lr_in_bounds(lr, lr_min, lr_max)
        for name, value in zip(self._hd_numbers, (betas, eps, weight_decay), strict=True):
            _reject_tensor(name, value, owner)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._hd_finish_init(hypergrad_lr, lr_min, lr_max)

    def _hd_directions(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> list[Tensor]:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        steps = [float(s["step"]) for s in states]
        # The same bias corrections (and float arithmetic) as torch's non-capturable Adam.
        bias_correction1 = [1 - beta1**k for k in steps]
        bias_correction2_sqrt = [(1 - beta2**k) ** 0.5 for k in steps]
        # AMSGrad divides by the running maximum of v_t (updated by torch's step just taken).
        second_moment = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
        denom = torch._foreach_sqrt([_real(s[second_moment]) for s in states])
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        directions = torch._foreach_div([_real(s["exp_avg"]) for s in states], denom)
        torch._foreach_div_(directions, bias_correction1)
        return [
            torch.view_as_complex(d) if p.is_complex() else d for p, d in zip(params, directions, strict=True)
        ]
