r"""Hyperparameter containers: ``nn.Module``\ s whose parameters are the raw hyperparameters.

Each container stores unconstrained *raw* tensors (the ``nn.Parameter``\ s the outer optimiser
moves) and maps them onto their domain, so no outer step can leave it:

==================  ======================================  =====================================
constraint          value                                   domain
==================  ======================================  =====================================
``positive``        :math:`e^{r}`                           :math:`(0, \infty)`
``unit``            :math:`\sigma(r) = 1/(1+e^{-r})`        :math:`(0, 1)`
``real``            :math:`r`                               :math:`\mathbb{R}`
``interval``        :math:`a + (b - a)\,\sigma(r)`          :math:`(a, b)`, from ``low=a, high=b``
``greater_than``    :math:`a + e^{r}`                       :math:`(a, \infty)`, from ``low=a``
==================  ======================================  =====================================

:class:`WeightDecay` uses ``positive`` (:math:`d = e^{r}`), or with ``max=M`` the interval
:math:`(0, M)` (:math:`d = M\,\sigma(r)`); :class:`ExampleWeights` uses ``unit``.

Use them inside the losses given to a :class:`~hypergrad.HyperOptimizer`, e.g.
``ce(model(x), y) + hp.penalty(model)``. Initial values outside the domain raise ``ValueError``.

Logging: every container's ``value`` is its current constrained value, detached (``forward()`` is
the differentiable one); :func:`values` collects them by name from any hparams module and
:func:`summary` turns them into flat scalars (mean / min / max / std) for ``wandb.log``.
"""

from __future__ import annotations

import contextlib
import enum
import math
import numbers
import operator
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import _THREAD
from ._wrap import unwrap_model

__all__ = [
    "Constraint",
    "Hparam",
    "WeightDecay",
    "ExampleWeights",
    "OptimizerSetting",
    "LearningRate",
    "Momentum",
    "values",
    "summary",
]


class Constraint(str, enum.Enum):
    """How a raw tensor maps to a hyperparameter's value (see the module docstring).

    ``interval`` takes bounds ``low < high`` and ``greater_than`` takes ``low``; the others take none.
    """

    POSITIVE = "positive"
    UNIT = "unit"
    REAL = "real"
    INTERVAL = "interval"
    GREATER_THAN = "greater_than"

    @classmethod
    def _missing_(cls, value: object) -> Constraint:
        """Any case and ``-`` for ``_`` (``"Unit"``, ``"greater-than"``); otherwise a
        ``ValueError`` that lists the constraints (the enum's own named none)."""
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for c in cls:
                if c.value == key:
                    return c
        names = ", ".join(repr(c.value) for c in cls)
        raise ValueError(f"unknown constraint {value!r}: use one of {names}")


def _check_bounds(c: Constraint, low: float | None, high: float | None, what: str) -> None:
    """Raise ``ValueError`` unless ``low`` / ``high`` are exactly the bounds constraint ``c`` takes."""
    for name, bound in (("low", low), ("high", high)):
        if bound is not None and not math.isfinite(bound):
            raise ValueError(f"{what}: {name} must be finite, got {name}={bound!r}")
    if c is Constraint.INTERVAL:
        if low is None or high is None:
            raise ValueError(
                f"{what}: the 'interval' constraint needs both low and high (an upper bound alone is "
                f"not supported), got low={low!r}, high={high!r}"
            )
        if not low < high:
            raise ValueError(f"{what}: need low < high, got low={low!r}, high={high!r}")
        if not math.isfinite(high - low):  # (the value low + (high - low) sigmoid(r) would be inf)
            raise ValueError(f"{what}: the width high - low overflows, got low={low!r}, high={high!r}")
    elif c is Constraint.GREATER_THAN:
        if low is None or high is not None:
            raise ValueError(
                f"{what}: the 'greater_than' constraint takes low only (use 'interval' for both), "
                f"got low={low!r}, high={high!r}"
            )
    elif low is not None or high is not None:
        raise ValueError(
            f"{what}: low/high only apply to the 'interval' and 'greater_than' constraints, not "
            f"{c.value!r} (got low={low!r}, high={high!r})"
        )


def _refuse_meta(value: Tensor, what: str) -> None:
    """Raise ``ValueError`` for a hyperparameter's value on the meta device (built inside a
    ``torch.device("meta")`` block, where the checks' ``.item()`` failed inside torch)."""
    if value.device.type == "meta":
        raise ValueError(
            f"{what}: hyperparameters cannot be built on the meta device (inside a "
            "torch.device('meta') block?): their initial values are data, which meta tensors do not "
            "hold. Build them outside the block (after the model is materialised, e.g. "
            "model.to_empty(device=...) and its initialisation)"
        )


def _check_domain(
    value: Tensor, constraint: Constraint, what: str, low: float | None = None, high: float | None = None
) -> None:
    _refuse_meta(value, what)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} must be finite, got {value.tolist() if value.numel() < 8 else value}")
    if constraint is Constraint.POSITIVE and not bool((value > 0).all()):
        raise ValueError(f"{what} must be > 0 (positive constraint), got min {float(value.min())}")
    if constraint is Constraint.UNIT and not bool(((value > 0) & (value < 1)).all()):
        raise ValueError(
            f"{what} must lie in (0, 1) (unit constraint), got range "
            f"[{float(value.min())}, {float(value.max())}]"
        )
    if constraint is Constraint.INTERVAL:
        assert low is not None and high is not None
        if bool(((value > low) & (value < high)).all()):
            return
        raise ValueError(
            f"{what} must lie in ({low}, {high}) (interval constraint), got range "
            f"[{float(value.min())}, {float(value.max())}]"
        )
    if constraint is Constraint.GREATER_THAN:
        assert low is not None
        if bool((value > low).all()):
            return
        raise ValueError(f"{what} must be > {low} (greater_than constraint), got min {float(value.min())}")


def _check_held(
    raw: Tensor,
    constraint: Constraint,
    what: str,
    low: float | None = None,
    high: float | None = None,
    wider: str = "a wider dtype (dtype=torch.float64)",
) -> None:
    """Raise ``ValueError`` when the value of ``raw`` (in its own dtype) left the open domain:
    an init inside it that rounds onto its edge (``0.99999994`` as a ``unit`` value in
    ``float32``, whose sigmoid is exactly 1.0; a positive ``1e-46``, whose exp is 0), where the
    hyperparameter would sit on the edge with a zero derivative, never to move."""
    _refuse_meta(raw, what)
    try:
        _check_domain(from_raw(raw.detach(), constraint, low, high).double(), constraint, what, low, high)
    except ValueError as e:
        instead = "" if raw.dtype == torch.float64 else f", or {wider}"
        raise ValueError(
            f"{e}: in {raw.dtype} its raw value maps onto the edge of the domain (or past it: the "
            f"transform saturates or overflows there); choose a value farther from the edge{instead}"
        ) from None


def to_raw(
    value: Tensor, constraint: Constraint | str, low: float | None = None, high: float | None = None
) -> Tensor:
    r"""Inverse of :func:`from_raw`: the raw tensor whose constrained value is ``value``.

    Args:
        value: values inside the constraint's domain, any shape.
        constraint: see :class:`Constraint`.
        low: lower bound, for ``"interval"`` and ``"greater_than"`` only (default: None).
        high: upper bound, for ``"interval"`` only (default: None).

    Returns:
        A new tensor shaped like ``value``. For ``"interval"`` it is
        :math:`\log(v - a) - \log(b - v)`, accurate near either bound.

    Raises:
        ValueError: bounds missing for, or given to, a constraint (see :class:`Constraint`).

    >>> import torch
    >>> to_raw(torch.tensor([1.5]), "interval", low=1.0, high=2.0)
    tensor([0.])
    """
    c = Constraint(constraint)
    _check_bounds(c, low, high, "to_raw")
    if c is Constraint.POSITIVE:
        return value.log()
    if c is Constraint.UNIT:
        return torch.logit(value)
    if c is Constraint.INTERVAL:
        assert low is not None and high is not None
        return (value - low).log() - (high - value).log()
    if c is Constraint.GREATER_THAN:
        assert low is not None
        return (value - low).log()
    return value.clone()


def from_raw(
    raw: Tensor, constraint: Constraint | str, low: float | None = None, high: float | None = None
) -> Tensor:
    """Map a raw tensor onto the constraint's domain (differentiable, elementwise).

    Args:
        raw: unconstrained tensor, any shape.
        constraint: see :class:`Constraint`.
        low: lower bound, for ``"interval"`` and ``"greater_than"`` only (default: None).
        high: upper bound, for ``"interval"`` only (default: None).

    Returns:
        The values, shaped like ``raw`` (for ``"real"``: ``raw`` itself).

    Raises:
        ValueError: bounds missing for, or given to, a constraint (see :class:`Constraint`).

    >>> import torch
    >>> from_raw(torch.tensor([0.0]), "interval", low=1.0, high=2.0)
    tensor([1.5000])
    >>> from_raw(torch.tensor([0.0]), "greater_than", low=1.0)
    tensor([2.])
    """
    c = Constraint(constraint)
    _check_bounds(c, low, high, "from_raw")
    if c is Constraint.POSITIVE:
        return raw.exp()
    if c is Constraint.UNIT:
        return torch.sigmoid(raw)
    if c is Constraint.INTERVAL:
        assert low is not None and high is not None
        return low + (high - low) * torch.sigmoid(raw)
    if c is Constraint.GREATER_THAN:
        assert low is not None
        return low + raw.exp()
    return raw


# While a method replays several inner steps with the same hyperparameter tensors (Unrolled), the
# constrained values (e.g. one exp per weight of a per-weight WeightDecay) would be recomputed, and
# differentiated through, once per step. Inside ``_reusing_values()`` each is computed once per raw
# tensor object (and version and grad mode) and the same graph node is reused:
# the same values and derivatives, K - 1 fewer weight-sized passes each way.


@contextlib.contextmanager
def _reusing_values() -> Iterator[None]:
    outer = _THREAD.memo
    _THREAD.memo = {} if outer is None else outer
    try:
        yield
    finally:
        _THREAD.memo = outer


def _memo(raw: Tensor, what: str, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(raw)``, reused within :func:`_reusing_values` for the same ``raw`` object and version
    (a reference to ``raw`` is kept with the value, so its ``id`` cannot be recycled meanwhile)."""
    memo = _THREAD.memo
    if memo is None:
        return fn(raw)
    key = (id(raw), raw._version, torch.is_grad_enabled(), what)
    hit = memo.get(key)
    if hit is not None and hit[0] is raw:
        return hit[1]
    value = fn(raw)
    memo[key] = (raw, value)
    return value


def _constant_coefficients(coefficients: Sequence[Tensor | None], wrt: Sequence[Tensor]) -> bool:
    """Whether the coefficients ``c`` with which a loss used its WeightDecay penalties (read from
    their probes) depend on none of ``wrt`` (the weights and the probes themselves): then the
    loss is ``c * penalty + (terms free of it)`` up to terms free of the weights, and adding
    ``c * d * w`` to the gradient of the rest is exact to second order."""
    live = [c for c in coefficients if c is not None and c.requires_grad]
    if not live:
        return True
    found = torch.autograd.grad(
        torch.stack([c.reshape(()) for c in live]).sum(), wrt, retain_graph=True, allow_unused=True
    )
    return all(g is None for g in found)


def _penalised_weights_known(penalised: Iterable[Sequence[Tensor]], weights: Sequence[Tensor]) -> bool:
    """Whether every tensor the WeightDecay penalties were evaluated on (recorded in first-order
    mode) is one of ``weights`` or a tensor no derivative flows through (a frozen parameter, one
    outside Implicit's ``hessian_subset``). A tensor computed from the weights (a train_loss that
    runs the model, and its penalty, through ``torch.func.functional_call`` on ``w * mask``,
    ``w + noise``, ``phi + delta``) gets the penalty's gradient through autograd, but the by-hand
    second-order terms are added per weight and found none for it: its curvature and mixed term
    were dropped (a hypergradient of exactly 0). The methods then differentiate the ordinary
    penalty. One dictionary lookup per penalised tensor."""
    known = {id(w) for w in weights}
    return all(id(w) in known or w.grad_fn is None for ws in penalised for w in ws)


class _GradientValue(torch.autograd.Function):
    """A 0-dim zero whose backward pass gives each weight ``w_i`` the gradient ``grad_out * g_i``
    (``g_i`` held constant): the gradient of ``Σ <g_i, w_i>`` with ``g`` detached, in autograd's
    order among the loss's other terms, without that dot product's forward pass (two full-size
    operations per weight) nor its backward's broadcast of ``grad_out``. Differentiable in
    ``grad_out`` (its backward is taken with ``create_graph=True``)."""

    @staticmethod
    def forward(ctx: Any, n: int, zero: Tensor, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors[:n])
        return zero.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        gs = ctx.saved_tensors
        if _is_one(grad_out):  # (x * 1 == x bit for bit: one full-size product per weight less)
            return (None, None, *([None] * len(gs)), *gs)
        return (None, None, *([None] * len(gs)), *(grad_out * g for g in gs))


def _is_one(t: Tensor) -> bool:
    """Whether ``t`` is a constant 1 (no graph) that can be read without a device synchronisation
    (on CPU): a coefficient whose product can be skipped."""
    return t.device.type == "cpu" and t.numel() == 1 and not t.requires_grad and bool(t == 1)


class _RoundedGradientValue(torch.autograd.Function):
    """:class:`_GradientValue` for penalty gradients rounded as the real backward pass rounds
    them where a weight is narrower than its decays (float32 decays per entry on ``bfloat16`` /
    ``float16`` weights, float64 ones on ``float32`` weights): the backward pass of
    ``0.5 * (d * w.square()).sum()`` rounds ``c * 0.5 * d`` to the weight's dtype and multiplies
    it by ``2 * w`` there, where ``c * (d * w)`` formed in the decays' dtype and rounded once
    differs in the last bit (on a quarter of the entries in bfloat16), so Adam-like replays drifted
    off the real steps. ``tensors``: the decays ``d_i`` (used detached), then the weights ``w_i``."""

    @staticmethod
    def forward(ctx: Any, n: int, zero: Tensor, *tensors: Tensor) -> Tensor:
        ctx.n = n
        ctx.save_for_backward(*tensors)
        return zero.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        ds, ws = saved[: ctx.n], saved[ctx.n :]
        half = grad_out * 0.5
        out = [(half * d.detach()).to(w.dtype) * (2 * w.detach()) for d, w in zip(ds, ws, strict=True)]
        return (None, None, *([None] * ctx.n), *out)


def _promotes(d: Tensor, w: Tensor) -> bool:
    """Whether ``d * w`` is of a wider dtype than the real weight ``w`` (see
    :class:`_RoundedGradientValue`)."""
    return not w.is_complex() and torch.result_type(d, w) != w.dtype


def _gradient_value(gs: Sequence[Tensor], ws: Sequence[Tensor], like: Tensor) -> Tensor:
    """``(l - l.detach())`` for ``l = Σ <g_i, w_i>`` (``g`` constant): zero, with ``g_i`` as
    ``w_i``'s gradient; through :class:`_GradientValue` for real weights."""
    if any(w.is_complex() for w in ws):
        linear = torch.stack([_real_dot(g, w) for g, w in zip(gs, ws, strict=True)]).sum()
        return linear - linear.detach()
    return _GradientValue.apply(len(gs), torch.zeros_like(like), *gs, *ws)


class _DecayGraph(torch.autograd.Function):
    """``g`` as it is (a view), with the graph of the term ``c * d * w`` that ``g`` already holds
    the value of: backward gives ``g`` the incoming gradient, ``d`` and ``w`` those of ``c * d * w``
    (``c`` constant). What ``g + (t - t.detach())`` with ``t = c * (d * w)`` differentiates to, bit
    for bit, without its four full-size forward operations (Unrolled's replay adds it for every
    decayed weight at every replayed step)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, c: Tensor, d: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(c, d, w)
        # the dtype of c * (d * w) (a 0-dim decay does not promote the weights: bf16 stays bf16)
        dw = torch.empty((0,) if d.dim() or w.dim() else (), dtype=torch.result_type(d, w))
        ctx.term_dtype = torch.result_type(c, dw)
        # a coefficient of exactly 1 (loss = data term + penalty) skips a full-size product in the
        # backward pass (x * 1 == x bit for bit); read on CPU only, where it costs no synchronisation
        ctx.unit = _is_one(c)
        return g.view_as(g)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        c, d, w = ctx.saved_tensors
        gc = grad_out.to(ctx.term_dtype)
        if not ctx.unit:
            gc = gc * c
        grad_d = (gc * w).sum_to_size(d.shape).to(d.dtype) if ctx.needs_input_grad[2] else None
        grad_w = (gc * d).to(w.dtype) if ctx.needs_input_grad[3] else None
        return grad_out, None, grad_d, grad_w


def _with_decay_graph(g: Tensor, c: Tensor, d: Tensor, w: Tensor) -> Tensor:
    """``g`` (which holds the value of the term ``c * d * w``) with that term's graph to ``d`` and
    ``w``, ``c`` held constant; through :class:`_DecayGraph` for real tensors."""
    c = c.detach()
    if g.is_complex() or d.is_complex() or w.is_complex():
        term = (c * (d * w)).to(g.dtype)
        return g + (term - term.detach())
    return _DecayGraph.apply(g, c, d, w)


def _abs2(w: Tensor) -> Tensor:
    """:math:`|w|^2` elementwise, real: ``w²`` for real ``w``; for complex ``w`` the squared
    modulus (``re² + im²``, as torch.optim's ``weight_decay`` sees a complex weight through its
    real view). Differentiable, with the exact second derivative at 0 too (unlike ``abs()²``)."""
    if w.is_complex():
        return w.real.square() + w.imag.square()
    return w.square()


def _decay_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the decays of weight ``t``: the real dtype of its entries (``float64`` for
    ``complex128``), at least ``float32``. (In bfloat16 an outer step below 0.03 on the raw
    ``log(1e-4) = -9.2`` rounds away: the decays never moved; in float16 Adam's ``eps`` and
    squared gradients underflow and its first step made them NaN.)"""
    return torch.promote_types(t.dtype.to_real(), torch.float32)


def _real_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ Re(conj(a) b)``: the real inner product of the real views (``Σ a b`` for real tensors)."""
    if a.is_complex() or b.is_complex():
        return (a.conj() * b).real.sum()
    return (a * b).sum()


def _dot_value(a: Tensor, b: Tensor) -> Tensor:
    """:func:`_real_dot` without a full-size product where BLAS can take it (contiguous float32 /
    float64 tensors of one shape and dtype: ``torch.dot``, which reads both and writes nothing;
    its accumulation order, so its rounding, differs from ``(a * b).sum()``'s). For values that
    nothing differentiates or compares bit for bit."""
    if (
        a.dtype == b.dtype
        and a.dtype in (torch.float32, torch.float64)
        and a.shape == b.shape
        and a.is_contiguous()
        and b.is_contiguous()
    ):
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return _real_dot(a, b)


def _as_tensor(
    init: float | Tensor, shape: Sequence[int] | None, dtype: torch.dtype | None, what: str = "init"
) -> Tensor:
    if dtype is None:  # a floating-point tensor keeps its precision (as nn.Parameter(init) would)
        floating = isinstance(init, Tensor) and init.is_floating_point()
        dtype = init.dtype if floating else torch.get_default_dtype()  # type: ignore[union-attr]
    if not dtype.is_floating_point:
        raise TypeError(f"{what}: dtype must be a floating-point dtype got {dtype}")
    if isinstance(init, bool) or isinstance(init, Tensor) and init.dtype == torch.bool:
        raise TypeError(f"{what} must be a number or a tensor of numbers, got a boolean: {init!r}")
    if isinstance(init, complex) or isinstance(init, Tensor) and init.is_complex():
        # (torch would drop the imaginary part, with at most a warning)
        raise TypeError(f"{what} must be real: hyperparameters are real numbers, got a complex {init!r}")
    try:
        t = torch.as_tensor(init, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what} must be a number or a tensor of numbers, got {init!r} ({e})") from None
    if shape is not None:
        try:
            size = torch.Size(tuple(shape))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: invalid shape {shape!r} ({e})") from None
        if any(n < 0 for n in size):
            raise ValueError(f"{what}: invalid shape {tuple(size)} (negative size)")
        try:
            t = t.expand(size).clone()
        except RuntimeError:
            raise ValueError(
                f"{what} of shape {tuple(t.shape)} does not broadcast to the shape {tuple(size)}"
            ) from None
    return t.detach().clone()


def _real(value: Any, what: str) -> float:
    """``value`` (a Python or NumPy real number, or a one-element tensor) as a float; anything
    else (a bool, a string, a tensor of several numbers) is a ``TypeError`` naming ``what``.
    Whether the number lies in its domain is the caller's check."""
    if isinstance(value, Tensor) and value.numel() == 1:
        if not (value.is_complex() or value.dtype == torch.bool):
            return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{what} must be a real number, got {value!r}")


def _as_bound(bound: float | None, name: str) -> float | None:
    if bound is None:
        return None
    try:
        return float(bound)
    except (TypeError, ValueError):
        raise TypeError(f"Hparam {name} must be a real number or None, got {bound!r}") from None


class Hparam(nn.Module):
    r"""A tensor of hyperparameters with a constraint.

    Args:
        init: initial value(s), inside the constraint's domain (strictly inside the bounds).
        constraint: ``"positive"``, ``"unit"``, ``"real"``, ``"interval"`` or ``"greater_than"``
            (default: ``"interval"`` when ``low`` and ``high`` are given, ``"greater_than"`` when only
            ``low`` is, else ``"positive"``).
        low: finite lower bound, for ``"interval"`` and ``"greater_than"`` (default: None).
        high: finite upper bound, > ``low``, for ``"interval"`` (default: None).
        shape: broadcast ``init`` to this shape (default: ``init``'s shape).
        dtype: (default: ``init``'s when it is a floating-point tensor, else torch's default dtype).

    Raises:
        ValueError: ``init`` outside the domain (or inside it but mapped onto its edge in
            ``dtype``: ``0.99999994`` as a ``unit`` value in ``float32`` has raw value 16.6,
            whose sigmoid is exactly 1.0), ``low >= high``, non-finite bounds (or ``high - low``
            overflowing), or bounds given
            with a constraint that takes none (or missing for one that needs them).

    Shapes: ``raw``, ``forward()`` and ``value`` have ``shape``.

    >>> import hypergrad as hg
    >>> h = hg.hparams.Hparam(0.1, "positive", shape=(3,))
    >>> [round(v, 3) for v in h().tolist()]
    [0.1, 0.1, 0.1]
    >>> m = hg.hparams.Hparam(0.9, low=0.5, high=1.0)   # value = 0.5 + 0.5 sigmoid(raw), in (0.5, 1)
    >>> m.constraint.value, round(float(m.value), 6)
    ('interval', 0.9)
    """

    def __init__(
        self,
        init: float | Tensor,
        constraint: Constraint | str | None = None,
        *,
        low: float | None = None,
        high: float | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        low, high = _as_bound(low, "low"), _as_bound(high, "high")
        if constraint is None:
            if high is not None:
                constraint = Constraint.INTERVAL
            elif low is not None:
                constraint = Constraint.GREATER_THAN
            else:
                constraint = Constraint.POSITIVE
        self.constraint = Constraint(constraint)
        _check_bounds(self.constraint, low, high, "Hparam")
        self.low: float | None = low
        self.high: float | None = high
        value = _as_tensor(init, shape, dtype, "Hparam init")
        _check_domain(value, self.constraint, "Hparam init", low, high)
        raw = to_raw(value, self.constraint, low, high)
        _check_held(raw, self.constraint, "Hparam init", low, high)
        self.raw = nn.Parameter(raw)

    def forward(self) -> Tensor:
        """The constrained value, shaped like ``raw`` (differentiable w.r.t. ``raw``)."""
        return from_raw(self.raw, self.constraint, self.low, self.high)

    @property
    def value(self) -> Tensor:
        """The constrained value, detached (for logging), shaped like ``raw``: a copy, never
        ``raw`` itself (the ``real`` constraint's value is the raw tensor)."""
        return self().detach().clone()

    def extra_repr(self) -> str:
        bounds = "".join(f", {k}={v}" for k, v in (("low", self.low), ("high", self.high)) if v is not None)
        return f"constraint={self.constraint.value!r}{bounds}, shape={tuple(self.raw.shape)}"


def _owning_module(name: str) -> str:
    """The name of the module a parameter name belongs to (``""``: the root), looking through
    ``torch.nn.utils.parametrize``: ``0.parametrizations.weight.original`` is module ``0``'s, as
    is ``0.bias``."""
    layer = name.rsplit(".", 1)[0] if "." in name else ""
    parts = layer.split(".")
    if "parametrizations" in parts:  # <module>.parametrizations.<attribute>[.original]
        layer = ".".join(parts[: parts.index("parametrizations")])
    return layer


def _name_predicate(
    include: Callable[[str], bool] | Iterable[str] | None, model: nn.Module, what: str
) -> Callable[[str], bool] | None:
    """``include`` as a predicate on parameter names: a callable as it is, a name or a collection
    of names (each one the model must have) as membership."""
    if include is None or callable(include):
        return include
    if isinstance(include, str):
        include = [include]
    try:
        wanted = set(include)
    except TypeError:
        raise TypeError(
            f"{what}: include must be a function of a parameter name (e.g. lambda n: "
            f"n.endswith('weight')) or a list of parameter names, got {type(include).__name__}"
        ) from None
    bad = [n for n in wanted if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what}: include lists parameter names (str), got {bad[:3]!r}")
    have = [n for n, _ in model.named_parameters(remove_duplicate=False)]  # (a tied weight's aliases too)
    unknown = sorted(wanted - set(have))
    if unknown:
        raise ValueError(
            f"{what}: include names parameter(s) {unknown[:5]} that the model does not have; its "
            f"parameters are {have[:8]}{' ...' if len(have) > 8 else ''}"
        )
    return wanted.__contains__


#: module names torch's wrappers insert in parameter names (torch.compile's OptimizedModule, activation
#: checkpointing's and FSDP's wrappers): no part of which weights a WeightDecay entry decays
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


class WeightDecay(nn.Module):
    r"""L2 penalties on a model's weights: one global, one per layer, or one per weight.

    The penalty is :math:`\tfrac12 \sum_k d_k \odot w_k^2` with positive decays :math:`d_k = e^{r_k}`,
    or, with ``max=M``, bounded decays :math:`d_k = M\,\sigma(r_k) \in (0, M)` (the same scale as
    ``torch.optim.SGD(weight_decay=d)``, which adds :math:`d\,w` to the gradient).

    Complex weights: the decays stay real (``raw`` has the weight's real dtype, e.g. ``float64``
    for ``complex128``) and the penalty is :math:`\tfrac12\sum_k d_k |w_k|^2`, real: what
    ``torch.optim``'s ``weight_decay`` does to a complex weight through its real view (its gradient
    is :math:`d\,w`). Every ``raw`` has its weight's real dtype, at least ``float32`` (a
    float16 / bfloat16 model gets float32 decays, which its losses and the methods take as they
    are); ``.double()`` etc. change it.

    Args:
        model: the model whose parameters are penalised (names are taken from it, under any
            ``DistributedDataParallel`` / ``torch.compile`` wrapper).
        per: ``"global"`` (1 hyperparameter), ``"layer"`` (one per module that owns parameters) or
            ``"parameter"`` (one per weight entry: as many hyperparameters as weights)
            (default: ``"parameter"``).
        init: initial decay, > 0 (and < ``max`` when given) (default: 1e-4).
        include: which parameter names to penalise: a predicate, e.g.
            ``lambda n: not n.endswith("bias")``, or the names themselves, e.g.
            ``["0.weight", "2.weight"]`` (as ``named_parameters()`` gives them; a name the model
            lacks is an error) (default: all; of those, and of a predicate's, only the ones that
            require grad at construction: one frozen then is not penalised, and :meth:`penalty`
            warns once if it trains later). Names listed are penalised whether they are frozen at
            construction or not (a backbone to be unfrozen later, named now).
        max: upper bound M on every decay, finite and > 0; ``None`` leaves them unbounded
            (default: None).

    Raises:
        ValueError: an unknown ``per``, an ``init`` not > 0 (or not < ``max``; or one whose
            decay rounds to 0, or to ``max``, in the decays' dtype), a ``max`` not
            finite and > 0, no parameter to penalise, or (``per="parameter"``) a parameter of an
            ``nn.Lazy*`` module not initialised yet (its shape is unknown before the first
            forward pass).

    Shapes: ``raw[j]`` is ``()`` for ``"global"`` / ``"layer"`` and the ``j``-th penalised weight's
    shape for ``"parameter"``; ``value`` is ``(count,)``: every decay, detached, flattened and
    concatenated in the order of ``raw``. :meth:`decays` gives them by parameter name instead.

    The penalised tensors are the model's parameters as ``named_parameters()`` lists them, as
    ``torch.optim``'s ``weight_decay`` would see them: on a layer under
    ``torch.nn.utils.parametrize`` (weight norm, orthogonal, spectral norm) those are the stored
    tensors (``parametrizations.weight.original``, or ``original0`` / ``original1`` — the
    magnitude g and the direction v of weight norm), not the weight the layer computes with. An
    L2 penalty on an orthogonal map's stored tensor or on weight norm's direction means little;
    leave them out with ``include=lambda n: "parametrizations" not in n`` (or penalise only
    ``original0``, the magnitudes).

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Linear(3, 2)
    >>> hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    >>> hp.penalty(model).shape, sum(p.numel() for p in hp.parameters())
    (torch.Size([]), 1)
    >>> bounded = hg.hparams.WeightDecay(model, per="parameter", init=0.1, max=1.0)
    >>> bounded.value.shape, round(float(bounded.value.max()), 6)
    (torch.Size([8]), 0.1)
    """

    #: what the errors call the values (a subclass's name for them)
    _what = "weight decay"

    def __init__(
        self,
        model: nn.Module,
        per: str = "parameter",
        init: float = 1e-4,
        *,
        include: Callable[[str], bool] | Iterable[str] | None = None,
        max: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):  # (model.parameters(), an optimiser: AttributeError)
            got = "an optimiser" if isinstance(model, torch.optim.Optimizer) else type(model).__name__
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module, whose parameter names it "
                f"keys its decays by), not {got}: pass the model itself, not model.parameters()"
            )
        # names listed explicitly are penalised even if frozen now (a backbone unfrozen later):
        # they were dropped, and the warning at unfreezing advised naming them in include=...
        listed = include is not None and not callable(include)
        include = _name_predicate(include, unwrap_model(model), type(self).__name__)
        if per not in ("global", "layer", "parameter"):
            raise ValueError(
                f"Invalid per: {per!r} (choose 'global', 'layer' or 'parameter'; 'parameter' is one "
                f"decay per weight entry)"
            )
        if max is not None:
            max = _real(max, "weight decay max")
            if not (math.isfinite(max) and max > 0):
                raise ValueError(f"Invalid weight decay max: {max!r} (need a finite value > 0, or None)")
        init = _real(init, f"{self._what} init")
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"Invalid {self._what} init: {init!r} (need a finite value > 0)")
        if max is not None and not init < max:
            raise ValueError(f"Invalid {self._what} init: {init!r} (need init < max = {max!r})")
        self.per = per
        self.max: float | None = None if max is None else float(max)
        #: set by Implicit while it evaluates the training loss (see _first_order_penalty)
        self._first_order_calls: list[tuple[Tensor, list[Tensor], list[Tensor]]] | None = None
        #: set by Unrolled while it replays a step (see _valued_penalty)
        self._replaying = False
        model = unwrap_model(model)  # names as the bare module has them (DDP, torch.compile)
        if include is not None:
            # a weight reached under several names (tied weights: lm_head.weight is wte.weight) is
            # listed by named_parameters() under its first name only; it is penalised, under that
            # name, when include accepts any of its names
            first = {id(p): n for n, p in model.named_parameters()}
            accepted = {first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if include(n)}
            include = accepted.__contains__
        names = [
            n
            for n, p in model.named_parameters()
            if (p.requires_grad or listed) and (include is None or include(n))
        ]
        if not names:
            frozen_only = [n for n, _ in model.named_parameters() if include is None or include(n)]
            if frozen_only:
                raise ValueError(
                    f"WeightDecay: the parameters it would penalise ({frozen_only[:4]}) are all frozen "
                    "(requires_grad=False) now; to penalise them once they train, name them: "
                    f"include={frozen_only[:4]!r}"
                )
            raise ValueError("WeightDecay: the model has no parameters to penalise")
        params = dict(model.named_parameters())
        lazy = [n for n in names if nn.parameter.is_lazy(params[n])]
        if lazy and per == "parameter":
            raise ValueError(
                f"WeightDecay(per='parameter'): parameter(s) {lazy[:3]} are not initialised yet (an "
                f"nn.Lazy* module before its first forward pass), so their shapes are unknown: run "
                f"the model on one batch first, then build the WeightDecay (per='global' and "
                f"per='layer' need no shapes and work before)"
            )
        self.names: tuple[str, ...] = tuple(names)
        #: every parameter name the model had (penalised or not), to notice parameters added later
        self._known: frozenset[str] | None = frozenset(params)
        #: parameters left out only for being frozen, to notice them training later (warned once)
        self._frozen_at_build: tuple[str, ...] = tuple(
            n
            for n, p in model.named_parameters()
            if not p.requires_grad and (include is None or include(n)) and n not in names
        )
        self.raw = nn.ParameterList()
        self._index: dict[str, int] = {}
        # raw value of init: log(d), or logit(d / M) = log(d) - log(M - d) when bounded
        log0 = math.log(init) if self.max is None else math.log(init) - math.log(self.max - init)
        if per == "global":
            self.raw.append(
                nn.Parameter(
                    torch.full((), log0, dtype=_decay_dtype(params[names[0]]), device=params[names[0]].device)
                )
            )
            self._index = {n: 0 for n in names}
        elif per == "layer":
            layers: dict[str, int] = {}
            for n in names:
                layer = _owning_module(n)
                if layer not in layers:
                    layers[layer] = len(layers)
                    p = params[n]
                    self.raw.append(
                        nn.Parameter(torch.full((), log0, dtype=_decay_dtype(p), device=p.device))
                    )
                self._index[n] = layers[layer]
            self.layers: tuple[str, ...] = tuple(layers)
        else:
            for i, n in enumerate(names):
                p = params[n]
                self.raw.append(
                    nn.Parameter(torch.full(p.shape, log0, dtype=_decay_dtype(p), device=p.device))
                )
                self._index[n] = i
        wider = "a float64 model (the decays take the weights' dtype, at least float32)"
        for dt in {r.dtype for r in self.raw}:  # (a decay of 0, or of max, would never move)
            sample = torch.full((), log0, dtype=dt)
            if self.max is None:
                _check_held(sample, Constraint.POSITIVE, f"{self._what} init", wider=wider)
            else:
                _check_held(sample, Constraint.INTERVAL, f"{self._what} init", 0.0, self.max, wider)

    def _decay(self, raw: Tensor) -> Tensor:
        """Decays from raw values: :math:`e^{r}`, or :math:`M\\sigma(r)` with ``max=M``."""
        if self.max is None:
            return _memo(raw, "exp", torch.exp)
        top = self.max
        return _memo(raw, f"interval(0, {top})", lambda r: from_raw(r, Constraint.INTERVAL, 0.0, top))

    def _layout(self) -> list[int]:
        """One code per entry of ``raw`` (a CRC-32 of the names of the parameters it decays), in
        ``raw``'s order: the model's ``named_parameters`` order at construction. The names lose
        the module path they all share (``inner.``, a wrapper's ``module.`` or ``_orig_mod.``), so
        a state moves between a model and a wrapper of it. They lose torch's wrappers' own
        segments anywhere too (``_orig_mod.`` of a ``torch.compile``d block, activation
        checkpointing's ``_checkpoint_wrapped_module.``, FSDP's ``_fsdp_wrapped_module.``): a state
        saved where blocks were compiled or wrapped one by one (training) was refused where they
        were not (evaluation), and back, although each entry decays the same weights."""
        stripped = {n: ".".join(s for s in n.split(".") if s not in _WRAPPER_SEGMENTS) for n in self.names}
        names = list(stripped.values())
        cut = 0
        while names and all("." in n[cut:] for n in names):
            head = names[0][cut:].split(".", 1)[0]
            if not all(n[cut:].split(".", 1)[0] == head for n in names):
                break
            cut += len(head) + 1
        held: list[list[str]] = [[] for _ in self.raw]
        for n, short in stripped.items():
            held[self._index[n]].append(short[cut:])
        return [zlib.crc32("\n".join(sorted(ns)).encode()) for ns in held]

    def get_extra_state(self) -> Tensor:
        """The layout of ``raw`` (see :meth:`_layout`), checked on load: ``raw.0``, ``raw.1``, ...
        are named by position, so a state saved around a model that registers its modules in
        another order (a refactored ``__init__``), or over other weights, has the same keys and
        (``per="layer"``) sizes, and ``hp.load_state_dict(saved)`` gave each layer another's
        decay, silently. A tensor, as other state is."""
        return torch.tensor(self._layout(), dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        pass  # (checked by _load_from_state_dict before anything is loaded)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "_extra_state"
        saved = state_dict.get(key)
        if isinstance(saved, Tensor) and len(self.raw) > 1:  # (one entry: no position to get wrong)
            was, now = saved.reshape(-1).tolist(), self._layout()
            if was != now:
                how = "in another order" if sorted(was) == sorted(now) else "on other weights"
                raise ValueError(
                    f"this {type(self).__name__} state was saved with its {self._what}s {how} than here "
                    f"(per={self.per!r}, here over {list(self.names)[:6]}"
                    f"{'...' if len(self.names) > 6 else ''}): raw.0, raw.1, ... are held by position, "
                    f"so each would load into another's. Build the model with its modules registered "
                    f"as when it was saved, and {type(self).__name__} with the same include="
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if saved is None and key in missing_keys:  # (saved before the layout was kept: not checked)
            missing_keys.remove(key)

    def decays(self) -> dict[str, Tensor]:
        """Decay per penalised parameter name (scalars, or shaped like the parameter), detached:
        for inspection and logging (the penalty reads the raw tensors itself)."""
        with torch.no_grad():
            return {n: self._decay(self.raw[self._index[n]]) for n in self.names}

    @property
    def value(self) -> Tensor:
        """Every decay, detached, flattened and concatenated in the order of ``raw``: ``(count,)``."""
        with torch.no_grad():
            return torch.cat([self._decay(r).reshape(-1) for r in self.raw])

    def penalty(self, model: nn.Module) -> Tensor:
        r""":math:`\tfrac12\sum_k d_k \odot |w_k|^2` over the penalised parameters of ``model``
        (real, also for complex weights).

        Pass the ``model`` your loss receives, so substituted weights are the ones penalised. A
        ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrapper is looked through.

        Args:
            model: the model (or the view of it a loss receives) holding the penalised parameters
                under the names they had at construction.

        Returns:
            A 0-dim tensor, differentiable w.r.t. the weights and ``raw``. Cost: one product and
            sum per penalised tensor (inside :class:`~hypergrad.Implicit` and the
            :class:`~hypergrad.Unrolled` replay it returns the same value with a cheaper graph,
            the methods adding its exact derivatives themselves).

        Raises:
            KeyError: ``model`` lacks a penalised parameter name. (Parameters the model gained
                after construction, or that were frozen then and train now, are not penalised: a
                ``UserWarning``, once.)
        """
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"WeightDecay.penalty: the model has no parameter(s) {missing[:3]}")
        known = getattr(self, "_known", None)  # (modules pickled before it existed have none)
        if known is not None and len(params) != len(self.names):
            new = [n for n in params if n not in known]
            if new:
                self._known = None  # warned once
                warnings.warn(
                    f"{type(self).__name__}: the model has parameter(s) {new[:5]} that it did not have "
                    f"when this {type(self).__name__} was built, and they are not penalised. Build it "
                    f"after the model is complete (after adding the module), or build one more for "
                    f"the new parameters. (warned once)",
                    UserWarning,
                    stacklevel=2,
                )
        frozen = getattr(self, "_frozen_at_build", ())  # (modules pickled before it existed)
        if frozen:
            thawed = [n for n in frozen if n in params and params[n].requires_grad]
            if thawed:
                self._frozen_at_build = ()  # warned once
                warnings.warn(
                    f"{type(self).__name__}: parameter(s) {thawed[:5]} were frozen (requires_grad=False) "
                    f"when this {type(self).__name__} was built, so they are not penalised, but they "
                    f"train now. To penalise them, build it while they require grad (or build one more "
                    f"for them); to leave them out on purpose, say so with include=... (warned once)",
                    UserWarning,
                    stacklevel=2,
                )
        if self.per == "parameter":  # (a weight replaced under its name: its decays broadcast)
            moved = [
                (n, tuple(self.raw[self._index[n]].shape), tuple(params[n].shape))
                for n in self.names
                if self.raw[self._index[n]].shape != params[n].shape
            ]
            if moved:
                detail = ", ".join(f"{n}: built for {old}, now {new}" for n, old, new in moved[:3])
                raise ValueError(
                    f"{type(self).__name__}(per='parameter'): parameter(s) changed shape since it was "
                    f"built ({detail}), so its per-entry decays no longer match them (they would "
                    f"broadcast onto the new entries, or fail to); build a new "
                    f"{type(self).__name__} for the resized model"
                )
        replaying = getattr(self, "_replaying", False)  # (modules pickled before it existed)
        ws: list[Tensor] = [params[n] for n in self.names]
        # (inside a torch.func transform, e.g. a penalty in a vmapped per-example loss, the
        # shortcuts' autograd.Functions, which functorch cannot take, give way to the ordinary
        # penalty: "it must override the setup_context staticmethod" named none of the user's code)
        if self._first_order_calls is not None and not torch._C._are_functorch_transforms_active():
            # Complex weights in Implicit's first-order mode: its hand-written mixed derivative
            # multiplies w * x, not the real inner product Re(conj(w) x); autograd differentiates
            # the ordinary penalty instead. (Unrolled's replay adds c * d * w: right for both.)
            if replaying:
                return self._valued_penalty(ws)
            if not any(w.is_complex() for w in ws):
                return self._first_order_penalty(ws)
        terms = [(self._decay(self.raw[self._index[n]]) * _abs2(params[n])).sum() for n in self.names]
        return 0.5 * torch.stack(terms).sum()

    def _first_order_penalty(self, ws: list[Tensor]) -> Tensor:
        """The penalty's value and gradient ``d * w`` without its second-order graph (for
        :class:`~hypergrad.Implicit`, which adds the exact diagonal second derivatives itself: far
        fewer autograd nodes in every HVP). A probe scalar (value 1) records with what coefficient
        the loss uses the penalty; the call is appended to ``_first_order_calls``."""
        with torch.no_grad():
            ds = [self._decay(self.raw[self._index[n]]) for n in self.names]
            gs = [d * w for d, w in zip(ds, ws, strict=True)]
            value = 0.5 * torch.stack([_real_dot(g, w) for g, w in zip(gs, ws, strict=True)]).sum()
        probe = torch.ones((), dtype=value.dtype, device=value.device, requires_grad=True)
        assert self._first_order_calls is not None
        self._first_order_calls.append((probe, ws, ds))
        return _gradient_value(gs, ws, value) + value + (probe - 1)

    def _valued_penalty(self, ws: list[Tensor]) -> Tensor:
        """The penalty's value and its gradient's value ``d * w``, without the gradient's graph
        (for :class:`~hypergrad.Unrolled`'s replay, which adds that graph itself, to ``d`` and
        ``w``: two products per weight to differentiate instead of the double backward of a
        square). The gradient's value goes through autograd, summed with the loss's other terms in
        the order of the real backward pass (bit for bit where a weight is reached twice). The
        decays are recorded with their graph; a probe records the coefficient ``c``."""
        ds = [self._decay(self.raw[self._index[n]]) for n in self.names]
        with torch.no_grad():
            gs = [d * w for d, w in zip(ds, ws, strict=True)]
            # the value as <d w, w>: a read-only dot product instead of forming w² and d w² (two
            # full-size tensors per weight at every replayed step); it equals the real step's value
            # up to rounding, and nothing downstream of the replay reads it but the loss's own code
            value = 0.5 * torch.stack([_dot_value(g, w) for g, w in zip(gs, ws, strict=True)]).sum()
        probe = torch.ones((), dtype=value.dtype, device=value.device, requires_grad=True)
        assert self._first_order_calls is not None
        self._first_order_calls.append((probe, ws, ds))
        narrow = [k for k, (d, w) in enumerate(zip(ds, ws, strict=True)) if _promotes(d, w)]
        if narrow:  # (rounded as the real step's backward pass rounds them)
            rest = [k for k in range(len(ws)) if k not in narrow]
            rounded = _RoundedGradientValue.apply(
                len(narrow), torch.zeros_like(value), *[ds[k] for k in narrow], *[ws[k] for k in narrow]
            )
            if not rest:
                return rounded + value + (probe - 1)
            gs, ws = [gs[k] for k in rest], [ws[k] for k in rest]
            return _gradient_value(gs, ws, value) + rounded + value + (probe - 1)
        return _gradient_value(gs, ws, value) + value + (probe - 1)

    def extra_repr(self) -> str:
        bound = "" if self.max is None else f", max={self.max}"
        return f"per={self.per!r}, count={sum(p.numel() for p in self.parameters())}{bound}"

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not a value: raises ``TypeError`` (``nn.Module``'s own error named no alternative).
        Use :meth:`penalty` in the loss, :attr:`value` or :meth:`decays` to read the decays."""
        raise TypeError(
            f"{type(self).__name__} is not called: add its penalty to the loss, hp.penalty(model) "
            f"(1/2 sum d |w|^2 over the penalised weights, for the model the loss is given); read "
            f"the decays with hp.value or hp.decays()"
        )


class ExampleWeights(nn.Module):
    r"""One weight in (0, 1) per training example (data re-weighting / hyper-cleaning).

    Args:
        n: number of training examples.
        init: initial weight, in (0, 1), and not rounded onto 0 or 1 in ``dtype`` (default: 0.5).
        dtype: (default: torch's default dtype).

    Shapes: ``raw`` and ``value`` (detached, for logging) are ``(n,)``; ``forward(index)`` takes
    integer indices of shape ``(B,)`` and returns ``(B,)`` weights :math:`\sigma(r_i)`; use them as
    ``(w(index) * per_example_loss).mean()``. To get the indices with each batch, wrap the dataset
    in :class:`hypergrad.data.WithIndex`, so a ``DataLoader`` yields ``(x, y, index)``.

    Which examples get a hypergradient: only those whose indices are in the training batches the
    hypergradient is computed from (``train_batch`` of ``Implicit.hyper_step``; the last ``steps``
    batches recorded by ``Unrolled.step``). Every other entry of ``raw.grad`` is 0 after
    ``hyper_step`` (an outer optimiser with momentum, e.g. Adam, may still move those entries).

    >>> import torch, hypergrad as hg
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from hypergrad.data import WithIndex
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=4)
    >>> model, ew = torch.nn.Linear(3, 2), hg.hparams.ExampleWeights(len(x), init=0.9)
    >>> def train_loss(model, hparams, batch):
    ...     x, y, index = batch
    ...     per_example = torch.nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)
    ...     return (hparams(index) * per_example).mean()
    >>> train_loss(model, ew, next(iter(loader))).backward()
    >>> (ew.raw.grad != 0).tolist()   # only the first batch's examples 0..3
    [True, True, True, True, False, False]
    """

    def __init__(self, n: int, init: float = 0.5, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        try:
            count = operator.index(n)  # an int, or a numpy integer (an array's shape entry)
        except TypeError:
            if hasattr(n, "__len__") and not (isinstance(n, Tensor) and n.dim() == 0):  # (a dataset)
                raise TypeError(
                    f"ExampleWeights takes the number of training examples, an int, got a "
                    f"{type(n).__name__}: pass len(dataset)"
                ) from None
            count = 0
        if isinstance(n, bool) or count < 1:
            raise ValueError(f"Invalid number of examples: {n!r}")
        value = _as_tensor(init, (count,), dtype, "ExampleWeights init")
        _check_domain(value, Constraint.UNIT, "ExampleWeights init")
        raw = torch.logit(value)
        _check_held(raw, Constraint.UNIT, "ExampleWeights init")
        self.raw = nn.Parameter(raw)

    def forward(self, index: Tensor) -> Tensor:
        """Weights of the examples ``index`` (integer, ``(B,)``): ``(B,)``, differentiable.

        Indices of any integer dtype are taken as positions (``uint8`` ones too, which torch's
        indexing would read as a mask: ``[1, 1, 2, 3, 4]`` selected the weights of examples
        0 to 4, not those of 1, 1, 2, 3, 4); a repeated index gets the sum of its terms'
        gradients.

        Raises:
            TypeError: ``index`` is not an integer tensor (floats, or a boolean mask, which would
                select a different number of weights than the batch has examples), nor
                convertible to one (a whole ``(x, y, index)`` batch, ``None``).
            ValueError: ``index`` of more than one dimension (``(B, 1)`` from a custom collate:
                its weights would broadcast against ``(B,)`` losses into ``(B, B)``).
            IndexError: an index outside ``[0, n)``: a negative one would silently weight another
                example, counted from the end, and one ``>= n`` is an index into a larger dataset
                (which indexing on CUDA meets with a device-side assert). Checked at the cost of
                one host synchronisation.
        """
        if not isinstance(index, Tensor):
            try:
                index = torch.as_tensor(index, device=self.raw.device)
            except (TypeError, ValueError, RuntimeError):
                # (torch said "only one element tensors can be converted to Python scalars" for a
                # whole (x, y, index) batch, "Could not infer dtype of NoneType" for None)
                got = type(index).__name__
                if isinstance(index, (tuple, list)) and any(isinstance(t, Tensor) for t in index):
                    got = f"a {got} holding tensors (a whole batch? pass its index tensor: hp(batch[-1]))"
                raise TypeError(
                    f"ExampleWeights takes a tensor of integer example indices, shape (B,) "
                    f"(hypergrad.data.WithIndex gives them), got {got}"
                ) from None
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise TypeError(
                f"ExampleWeights takes integer example indices (hypergrad.data.WithIndex gives them), "
                f"got dtype {index.dtype}"
            )
        if index.dim() > 1:  # (B, 1) weights would broadcast against (B,) losses to (B, B)
            raise ValueError(
                f"ExampleWeights takes one index per example, shape (B,); got {tuple(index.shape)}: "
                f"flatten it (index.reshape(-1)), or the (B, 1) weights would broadcast against "
                f"(B,) per-example losses into a (B, B) matrix"
            )
        if index.dtype not in (torch.int64, torch.int32):  # (uint8 would index as a mask)
            index = index.long()
        n = self.raw.numel()
        # (inside a torch.func transform, e.g. a vmapped per-example loss, the indices have no
        # values to read: the range check crashed with "Cannot access data pointer of Tensor that
        # doesn't have storage"; indexing there still refuses an index >= n, not a negative one)
        if index.numel() and not torch._C._are_functorch_transforms_active():
            low, high = (int(v) for v in torch.stack(list(torch.aminmax(index))).tolist())
            if low < 0:
                raise IndexError(
                    f"ExampleWeights got a negative example index ({low}); indices must lie in "
                    f"[0, {n}): the position of each example in the dataset"
                )
            if high >= n:
                raise IndexError(
                    f"ExampleWeights got example index {high}, but holds weights for {n} examples: "
                    f"indices must lie in [0, {n}), the position of each example in the dataset "
                    f"(was it built with the length of another dataset?)"
                )
        return torch.sigmoid(self.raw[index])

    @property
    def value(self) -> Tensor:
        """All ``n`` weights, detached (for logging): ``(n,)``."""
        with torch.no_grad():
            return torch.sigmoid(self.raw)

    def extra_repr(self) -> str:
        return f"n={self.raw.numel()}"


#: torch.optim settings that must not go negative (its constructors refuse a negative one)
_NON_NEGATIVE_SETTINGS = frozenset(
    {
        "lr",
        "weight_decay",
        "eps",
        "momentum",
        "dampening",
        "lr_decay",
        "alpha",
        "rho",
        "lambd",
        "momentum_decay",
        "initial_accumulator_value",
    }
)

#: torch.optim settings that are counts (Muon's Newton-Schulz ``ns_steps``, read by ``range()``):
#: no derivative tunes them, and a written float crashed the next step
_COUNT_SETTINGS = frozenset({"ns_steps"})


class OptimizerSetting(nn.Module):
    r"""A setting of the inner optimiser (one value per parameter group) made a hyperparameter.

    Before every inner step the :class:`~hypergrad.HyperOptimizer` writes the current values into
    ``optimizer.param_groups[g][name]``; :class:`~hypergrad.Unrolled` differentiates through them.
    (``Implicit`` refuses them: learning rates and momenta do not move the inner optimum, and a
    coupled ``weight_decay``, which does, belongs in ``train_loss`` as
    :class:`WeightDecay`.)

    With a learning-rate scheduler (or anything else) setting ``param_groups[g][name]``, use
    ``relative=True``: the hyperparameter is then a positive *multiplier* on whatever value the
    group holds (the scheduled one), applied for each step and taken off again afterwards, so the
    scheduler keeps owning the group's value. In the default absolute mode a value changed
    behind hypergrad's back would be silently overridden, so it raises an error instead.

    Args:
        optimizer: the inner ``torch.optim`` optimiser.
        name: the ``param_groups`` key, e.g. ``"lr"`` or ``"momentum"``.
        constraint: the value's domain (absolute mode; a multiplier is always positive).
        init: initial value for every group (default: the optimiser's current values; 1.0 for a
            multiplier).
        relative: learn a multiplier on the group's own (e.g. scheduled) value (default: ``False``).
        dtype: of ``raw``, a real floating-point dtype (default: the real dtype of the optimiser's
            parameters, the widest if they differ: ``float64`` for ``float64`` and ``complex128``
            weights; at least ``float32``, since the value is a host setting and a ``float16`` /
            ``bfloat16`` log-rate would change the written value, ``exp(log(0.1))`` being ``0.1006``
            in ``bfloat16``, and lose small outer steps).

    Shapes: ``raw`` and ``value`` are ``(len(optimizer.param_groups),)``.

    Raises:
        ValueError: the optimiser has no setting ``name``, ``init`` (or the current value) is
            outside the constraint's domain, or constraint ``"real"`` for a setting torch.optim
            requires to be >= 0 (``lr``, ``momentum``, ``weight_decay``, ``eps``, ...), or a
            count (Muon's ``ns_steps``).
        TypeError: ``relative`` is not a bool, the setting is not a single number (Adam's
            ``betas``), or ``dtype`` is not a real floating-point dtype.

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, weight_decay=1e-3)
    >>> wd = hg.hparams.OptimizerSetting(opt, "weight_decay", "positive")
    >>> [round(v, 6) for v in wd.value.tolist()]
    [0.001]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        constraint: Constraint | str,
        init: float | None = None,
        *,
        relative: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(optimizer, "param_groups"):  # (a scheduler, a model: AttributeError)
            hint = ""
            if hasattr(getattr(optimizer, "optimizer", None), "param_groups"):
                hint = (
                    " (a learning-rate scheduler? pass its optimiser, scheduler.optimizer, with "
                    "relative=True to learn a multiplier on the scheduled value)"
                )
            raise TypeError(
                f"{type(self).__name__} takes the inner torch.optim optimiser, got "
                f"{type(optimizer).__name__}{hint}"
            )
        groups = optimizer.param_groups
        if name not in groups[0]:
            raise ValueError(f"{type(optimizer).__name__} has no setting {name!r} to tune")
        if isinstance(optimizer, torch.optim.Adagrad) and name == "initial_accumulator_value":
            # (torch.optim.Adagrad fills a new state's sum from its defaults, never from the param
            # group, and reads the setting nowhere else: a tuned value changed no step, silently)
            raise ValueError(
                "Adagrad's 'initial_accumulator_value' cannot be tuned: torch.optim.Adagrad reads it "
                "from the constructor's defaults when it creates a weight's state, never from "
                "param_groups, so no step would use the tuned value"
            )
        if name in _COUNT_SETTINGS:
            raise ValueError(
                f"{type(optimizer).__name__}'s {name!r} is a count (the optimiser runs that many "
                f"iterations; param_groups[0] holds {groups[0][name]!r}): it has no derivative to tune "
                "it by, and the float a hyperparameter writes there fails the next step. Tune "
                "continuous settings (lr, momentum, weight_decay, ...), or search over counts outside"
            )
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {relative!r}")
        self.name = name
        self.relative = relative
        requested = Constraint(constraint)
        self.constraint = Constraint.POSITIVE if relative else requested
        #: relative mode with a setting in (0, 1) (a momentum, RMSprop's alpha): the multiplier is
        #: positive, but the value written, the group's own times it, must stay below 1
        self._below_one = relative and requested is Constraint.UNIT
        if self.constraint in (Constraint.INTERVAL, Constraint.GREATER_THAN):
            # (it takes no bounds: _check_domain died on a bare AssertionError)
            raise ValueError(
                f"{type(self).__name__} supports the constraints 'positive', 'unit' and 'real', not "
                f"{self.constraint.value!r} (it takes no low / high bounds)"
            )
        if name in _NON_NEGATIVE_SETTINGS and self.constraint is Constraint.REAL:
            raise ValueError(
                f"{type(optimizer).__name__}'s {name!r} must be >= 0 (torch.optim refuses a negative "
                f"one; a negative lr ascends the training loss), but constraint 'real' lets it go "
                f"negative: use 'positive' (or 'unit' for a momentum)"
            )
        what = f"{name} {'multiplier ' if relative else ''}init"
        if init is None and not relative:
            for i, g in enumerate(groups):
                try:
                    _real(g[name], "")
                except TypeError:
                    raise TypeError(
                        f"{type(optimizer).__name__}'s param_groups[{i}][{name!r}] is {g[name]!r}, not one "
                        f"number: {type(self).__name__} tunes settings that are a single number"
                    ) from None
            vals = [_real(g[name], what) for g in groups]
            what += f" (the optimiser's current {name}; pass init=... to start elsewhere)"
        else:
            vals = [1.0 if init is None else _real(init, what)] * len(groups)
        params = [p for g in groups for p in g["params"]]
        if dtype is None:
            dtype = torch.float32  # at least: see ``dtype`` above
            for p in params:
                if p.is_floating_point() or p.is_complex():
                    dtype = torch.promote_types(dtype, p.dtype.to_real())
        elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"{type(self).__name__}: dtype must be a real floating-point dtype, got {dtype!r}"
            )
        # the raw value computed in float64, then rounded once (log(lr) of the exact lr)
        value = torch.tensor(vals, dtype=torch.float64)
        _check_domain(value, self.constraint, what)
        device = params[0].device if params else None
        raw = to_raw(value, self.constraint).to(device=device, dtype=dtype)
        # a value the dtype cannot hold (lr 1e-50, momentum 1 - 1e-9 in float32) is refused, not
        # rounded onto the domain's edge (0, or 1)
        _check_domain(from_raw(raw, self.constraint).double(), self.constraint, f"{what}, in {dtype},")
        self.raw = nn.Parameter(raw)
        self.optimizer = [optimizer]  # a list, so the optimiser is not treated as a submodule
        self._written: list[float] | None = None  # absolute mode: what write() put there last
        self._bases: list[Any] | None = None  # relative mode: the groups' own values during a step
        #: absolute mode: the tensor values (``lr=torch.tensor(...)``) the first write() replaced,
        #: with their values then, ``(group, tensor, value)``: a change made through one of them later
        #: (``lr.fill_(...)``, torch's in-place idiom) no longer reaches the optimiser
        self._replaced: list[tuple[int, Tensor, float]] = []

    #: what to do instead when a scheduler owns the setting (named in the error)
    _under_scheduler = "Use relative=True to learn a multiplier on the scheduled value."

    def forward(self) -> Tensor:
        """The values (or multipliers), one per parameter group: shape ``(n_groups,)``."""
        return from_raw(self.raw, self.constraint)

    def extra_repr(self) -> str:
        mode = ", relative=True" if self.relative else ""
        return f"name={self.name!r}, constraint={self.constraint.value!r}{mode}, groups={self.raw.numel()}"

    @property
    def value(self) -> Tensor:
        """The values (or multipliers), detached (for logging): ``(n_groups,)``; a copy, never
        ``raw`` itself (the ``real`` constraint's value is the raw tensor)."""
        with torch.no_grad():
            return self().detach().clone()

    def check(self) -> None:
        """Raise if :meth:`write` would refuse (param groups added since construction, or, in
        absolute mode, a value changed behind hypergrad's back); changes nothing."""
        groups = self.optimizer[0].param_groups
        if len(groups) != self.raw.numel():
            raise ValueError(
                f"the optimiser has {len(groups)} param groups but this {type(self).__name__} was built "
                f"for {self.raw.numel()}: build the hyperparameter after the last add_param_group"
            )
        if getattr(self, "_below_one", False):  # (modules pickled before it existed)
            # (one host read, for this kind of setting only)
            for i, (g, v) in enumerate(zip(groups, self().detach().tolist(), strict=True)):
                if not 0 < float(g[self.name]) * v < 1:
                    raise ValueError(
                        f"{type(self).__name__}(relative=True) for the 'unit' setting {self.name!r}: "
                        f"param_groups[{i}] holds {float(g[self.name])!r} and the learned multiplier "
                        f"is {v!r}, so the value written would be {float(g[self.name]) * v!r}, outside "
                        f"(0, 1) (a momentum of 1 or more diverges). Use a smaller outer learning "
                        f"rate or init, or tune the setting in absolute mode"
                    )
        if not self.relative and self._written is not None:
            for i, (g, w) in enumerate(zip(groups, self._written, strict=True)):
                if float(g[self.name]) != w:
                    raise ValueError(
                        f"param_groups[{i}][{self.name!r}] was changed from {w!r} to "
                        f"{float(g[self.name])!r} outside hypergrad (by a scheduler, or an "
                        f"optimizer.load_state_dict?); {type(self).__name__} would silently "
                        f"override it. {self._under_scheduler} (To reset the optimiser per "
                        "episode, clear its state with optimizer.state.clear() instead of "
                        "load_state_dict.)"
                    )
            for i, t, was in getattr(self, "_replaced", ()):  # (modules pickled before it existed)
                if float(t) != was:
                    raise ValueError(
                        f"param_groups[{i}][{self.name!r}] was a tensor, which {type(self).__name__} "
                        f"replaced by its own value at its first write; that tensor was changed since, "
                        f"from {was!r} to {float(t)!r}, outside hypergrad (lr.fill_(...)?), and the "
                        f"change does not reach the optimiser: {type(self).__name__} would silently "
                        f"override it. {self._under_scheduler}"
                    )

    def write(self) -> None:
        """Put the current values into the optimiser's ``param_groups`` for the next step (as
        Python floats); in relative mode :meth:`restore` takes the multipliers off again."""
        self.check()
        groups = self.optimizer[0].param_groups
        vals = self().detach().tolist()
        if self.relative:
            self._bases = [g[self.name] for g in groups]
            for g, b, v in zip(groups, self._bases, vals, strict=True):
                g[self.name] = float(b) * v
            return
        replaced = [
            (i, g[self.name], float(g[self.name]))
            for i, g in enumerate(groups)
            if isinstance(g[self.name], Tensor)
        ]
        if replaced:  # (the first write: later ones find the numbers written before)
            self._replaced = replaced
        for g, v in zip(groups, vals, strict=True):
            g[self.name] = v
        self._written = vals

    def forget_written(self) -> None:
        """Accept the groups' current values as hypergrad's own (after the optimiser's state was
        loaded from a checkpoint), so the next :meth:`write` does not take them for a scheduler's."""
        self._written = None
        self._replaced = []

    def restore(self) -> None:
        """Relative mode: give the groups back their own values after a step (no-op otherwise)."""
        if self.relative and self._bases is not None:
            for g, b in zip(self.optimizer[0].param_groups, self._bases, strict=True):
                g[self.name] = b
            self._bases = None


class LearningRate(OptimizerSetting):
    """The inner optimiser's learning rate, one per parameter group, kept positive; with
    ``relative=True`` a multiplier on the (scheduled) learning rate (see :class:`OptimizerSetting`).

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> [round(v, 6) for v in hg.hparams.LearningRate(opt).value.tolist()]
    [0.1]
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    >>> hg.hparams.LearningRate(opt, relative=True).value.tolist()  # x 1.0 on the scheduled lr
    [1.0]
    """

    _under_scheduler = (
        "Use LearningRate(optimizer, relative=True) to learn a multiplier on the scheduled value."
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init: float | None = None,
        *,
        relative: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(optimizer, "lr", Constraint.POSITIVE, init, relative=relative, dtype=dtype)


class Momentum(OptimizerSetting):
    """SGD's momentum, one per parameter group, kept in (0, 1).

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
    >>> [round(v, 6) for v in hg.hparams.Momentum(opt).value.tolist()]
    [0.9]
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, init: float | None = None, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(optimizer, "momentum", Constraint.UNIT, init, dtype=dtype)

    _under_scheduler = (
        "Turn the scheduler's momentum cycling off (e.g. OneCycleLR(..., cycle_momentum=False)) "
        "or tune the momentum without it."
    )


_CONTAINERS = (Hparam, WeightDecay, ExampleWeights, OptimizerSetting)


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def values(hparams: nn.Module) -> dict[str, Tensor]:
    """Current hyperparameter values by name, detached: for logging and checkpoints you can read.

    Walks ``hparams.named_modules()``: each container of this module (:class:`Hparam`,
    :class:`WeightDecay`, :class:`ExampleWeights`, :class:`OptimizerSetting` and their subclasses;
    a :class:`SelfTuned` gives each of its hyperparameters by name, and ``sigma``),
    wherever it is nested (``nn.ModuleDict``, ``nn.ModuleList``, a custom module), gives its
    constrained ``value`` under its module name; every parameter not inside a container gives its raw
    value under its parameter name. A container that is ``hparams`` itself is named ``"value"``.

    Args:
        hparams: any hyperparameter module (what a :class:`~hypergrad.HyperOptimizer` takes).

    Returns:
        ``{name: tensor}``, detached, shaped like each container's ``value`` (``WeightDecay``:
        ``(count,)``; ``ExampleWeights``: ``(n,)``; optimiser settings: ``(n_groups,)``) or like
        each loose parameter.

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Linear(3, 2)
    >>> hp = torch.nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=0.1),
    ...                           "scale": hg.hparams.Hparam(2.0)})
    >>> vals = hg.hparams.values(hp)
    >>> {k: tuple(v.shape) for k, v in vals.items()}
    {'wd': (1,), 'scale': ()}
    >>> round(float(vals["scale"]), 6), vals["scale"].requires_grad
    (2.0, False)
    """
    from ._ml_hparams import RandomTranslation  # defined after this module (they build on it)
    from ._stn_hparams import SelfTuned

    if not isinstance(hparams, nn.Module):  # (a HyperOptimizer, a dict: AttributeError)
        hint = ""
        if isinstance(getattr(hparams, "hparams", None), nn.Module):
            hint = " (a HyperOptimizer? pass its hyperparameters, hopt.hparams)"
        raise TypeError(
            f"values / summary take the hyperparameter module (an nn.Module), got "
            f"{type(hparams).__name__}{hint}"
        )
    out: dict[str, Tensor] = {}
    covered: list[str] = []
    with torch.no_grad():
        for name, module in hparams.named_modules():
            if any(_within(name, c) for c in covered):
                continue
            if isinstance(module, (*_CONTAINERS, RandomTranslation)):
                covered.append(name)
                out[name or "value"] = module.value.detach()
            elif isinstance(module, SelfTuned):  # each named hyperparameter, and its scale
                covered.append(name)
                prefix = f"{name}." if name else ""
                for key, v in module.values_of(module.raw).items():
                    out[prefix + key] = v.detach()
                out[prefix + "sigma"] = module.scale().detach()
        for name, p in hparams.named_parameters():
            if not any(_within(name, c) for c in covered):
                out[name] = p.detach().clone()  # (a snapshot: not an alias that later outer steps move)
    return out


def _meaning(module: nn.Module) -> str | None:
    """What fixes how a container's raw tensors map to values (not their current values), or
    ``None`` for a module that is not a container of this module. Two containers with the same
    parameter names and shapes but another meaning (a ``positive`` vs a ``unit`` constraint, a
    learning rate vs a multiplier on a scheduled one, decays on other weights) would load each
    other's state silently and mean something else."""
    from ._ml_hparams import RandomTranslation

    kind = type(module).__name__
    if isinstance(module, Hparam):
        return f"{kind}(constraint={module.constraint.value!r}, low={module.low!r}, high={module.high!r})"
    if isinstance(module, WeightDecay):
        return f"{kind}(per={module.per!r}, max={module.max!r}, names={list(module.names)!r})"
    if isinstance(module, OptimizerSetting):
        return (
            f"{kind}(name={module.name!r}, constraint={module.constraint.value!r}, "
            f"relative={module.relative!r})"
        )
    if isinstance(module, ExampleWeights):
        return kind
    if isinstance(module, RandomTranslation):
        return f"{kind}(shape={module.shape!r}, max={module.max!r})"
    return None


def _meanings(hparams: nn.Module) -> dict[str, str]:
    """:func:`_meaning` of every container in ``hparams``, by module name (for checkpoints)."""
    out = {}
    for name, module in hparams.named_modules():
        meaning = _meaning(module)
        if meaning is not None:
            out[name] = meaning
    return out


def summary(hparams: nn.Module) -> dict[str, float]:
    """Flat scalar statistics of every hyperparameter, ready for ``wandb.log``.

    For each entry ``name`` of :func:`values` with one element: ``{name: value}``; with more:
    ``name.mean``, ``name.min``, ``name.max`` and ``name.std`` (``torch.std``'s unbiased estimate),
    computed in float64. Empty tensors give no entries. One device sync per entry.

    Args:
        hparams: any hyperparameter module (see :func:`values` for how it is walked and named).

    Returns:
        ``{key: float}``.

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> hp = torch.nn.ModuleDict({"lr": hg.hparams.LearningRate(opt),
    ...                           "w": hg.hparams.ExampleWeights(4, init=0.25)})
    >>> {k: round(v, 6) for k, v in hg.hparams.summary(hp).items()}
    {'lr': 0.1, 'w.mean': 0.25, 'w.min': 0.25, 'w.max': 0.25, 'w.std': 0.0}
    """
    out: dict[str, float] = {}
    for name, v in values(hparams).items():
        flat = v.reshape(-1).to(torch.float64)
        if flat.numel() == 1:
            out[name] = float(flat[0])
        elif flat.numel() > 1:
            stats = torch.stack([flat.mean(), flat.min(), flat.max(), flat.std()]).tolist()
            out.update({f"{name}.{k}": s for k, s in zip(("mean", "min", "max", "std"), stats, strict=True)})
    return out


from ._stn_hparams import Draw, Integer, Positive, Rate, SelfTuned  # noqa: E402  (self-tuning networks)

__all__ += ["SelfTuned", "Rate", "Positive", "Integer", "Draw"]

from ._ml_hparams import ObservationNoise, PriorPrecision, RandomTranslation  # noqa: E402  (marginal likelihood)

__all__ += ["PriorPrecision", "ObservationNoise", "RandomTranslation"]
