r"""Linear solvers for :math:`H x = v`, given only Hessian-vector products.

Every solver has the same shape: ``solver.solve(hvp, v, x0=None) -> SolveResult``, where ``hvp``
maps a tuple of tensors shaped like the weights to :math:`H` times it, ``x0`` is an optional initial
guess, and the result carries the solution, the number of HVPs spent, a relative residual and a
:class:`SolveStatus` to log. ``Implicit`` takes any of them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import functools
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._functional import _WIDENED, all_finite, dot, memory_span, norm
from ._types import HVP, Tensors


class SolveStatus(str, enum.Enum):
    """Why a linear solver stopped.

    >>> import torch, hypergrad as hg
    >>> from hypergrad._solvers import SolveStatus
    >>> r = hg.CG(maxiter=1).solve(lambda u: (2 * u[0],), (torch.ones(2),))
    >>> r.status is SolveStatus.CONVERGED, r.status == "converged"
    (True, True)
    """

    CONVERGED = "converged"  #: the residual reached ``tol`` (CG)
    MAX_ITERATIONS = "max_iterations"  #: ``maxiter`` HVPs spent before reaching ``tol`` (CG)
    NONPOSITIVE_CURVATURE = "nonpositive_curvature"  #: CG met :math:`p^\top (H + \delta I) p \le 0`
    #: a non-finite right-hand side, HVP or curvature (CG, Neumann, Direct); the solution is NaN
    NONFINITE = "nonfinite"
    FIXED = "fixed"  #: a fixed number of terms, finite, no sign of divergence (Neumann, Identity)
    #: Neumann's last series term outgrew ``v`` or the term before it
    #: (:math:`\|(I - \alpha H)^i v\| > \|v\|`, or :math:`> \|(I - \alpha H)^{i-1} v\|`):
    #: some :math:`|1 - \alpha\lambda| > 1`, so the series diverges (``alpha`` too large, or
    #: :math:`H` not positive definite) and its sum is no approximation of :math:`H^{-1} v`;
    #: warm-started, its iterate ended farther from the solution than 0, or its residual more
    #: than doubled over the iterations
    DIVERGING = "diverging"


@dataclasses.dataclass(frozen=True)
class SolveResult:
    r"""What a linear solver returns.

    Attributes:
        solution: :math:`x \approx H^{-1} v`, a tuple shaped like ``v``.
        iterations: Hessian-vector products spent (for a warm-started CG, including the one that
            computes the initial residual).
        residual: a 0-dim tensor. CG: the relative residual :math:`\|Hx - v\| / \|v\|` of the
            returned :math:`x` (damped :math:`H`, as CG's recurrence tracks it, without an extra
            HVP; once the true residual reaches the dtype's precision the recurrence's keeps
            falling: in float32 it reported 6e-11 where :math:`\|Hx - v\|/\|v\|` was 1e-7);
            ``nan`` with status ``NONFINITE`` (every solver). Neumann from 0: the relative size
            of the last series term :math:`\|(I - \alpha H)^i v\| / \|v\|`, which goes to 0
            exactly when the series converges
            (the true residual is :math:`(I-\alpha H)` times it). Warm-started Neumann: the relative
            residual :math:`\|v - H x'\| / \|v\|` of the iterate :math:`x'` before the last
            correction (the same quantity as from 0; ``nan`` with 0 steps). Identity: ``nan`` (not
            measured). Norms are taken scaled, so the residual of a right-hand side of 1e-25s
            (or 1e20s) in float32 is its true value, not 0 (or ``inf``).
        status: why the solver stopped, a :class:`SolveStatus`.
        curvature: Neumann from 0 with at least one term: :math:`\alpha` times the Rayleigh
            quotient of :math:`H` at the term before the last, :math:`\alpha\, u^\top H u /
            u^\top u` (from the last HVP, no extra one). When the series grows it tells why: above
            2, a curvature the step size is too small for (:math:`1 - \alpha\lambda < -1`, the
            terms flip sign); below 0, negative curvature. ``nan`` otherwise.
    """

    solution: Tensors
    iterations: int
    residual: Tensor
    status: SolveStatus
    curvature: float = math.nan


class LinearSolver(abc.ABC):
    """Base of the interchangeable inverse-Hessian approximations.

    Solvers are stateless. A solver whose ``warm_start`` is ``True`` asks its caller
    (``Implicit``) to pass the previous solution as ``x0``; the caller keeps it.
    """

    #: whether ``Implicit`` passes the previous hyperstep's solution as ``x0`` (off unless a
    #: solver has this as a field).
    warm_start: bool = False

    @abc.abstractmethod
    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        """Approximate :math:`H^{-1} v`.

        Args:
            hvp: ``hvp(u) -> H u`` on tuples shaped like ``v``.
            v: right-hand side, a tuple of tensors (shapes of the weights).
            x0: initial guess shaped like ``v``, or ``None`` to start from 0 (default: ``None``).
                Read only: neither kept nor modified; a constant (a graph behind it is not
                carried into the solution); cast to ``v``'s dtypes and devices (not complex
                for a real ``v``).

        Returns:
            A :class:`SolveResult`: ``solution`` shaped like ``v`` (new tensors, except
            ``Identity(scale=1.0)``, which returns ``v``'s own), the HVPs spent, a 0-dim relative
            residual and a :class:`SolveStatus`. A solver that fails numerically says so in
            ``status`` rather than raising.

        Raises:
            TypeError: ``v`` (or ``x0``) is not a sequence of tensors (a bare tensor: wrap it,
                ``(v,)``), or ``hvp`` returned anything else than one tensor shaped like each
                of its inputs.
            ValueError: ``v`` empty or not floating point / complex (integer and bool tensors
                have no inverse-Hessian product: before, torch's "linalg.vector_norm: Expected
                a floating point or complex tensor", or from ``Identity`` a bool "solution");
                ``x0`` not shaped like ``v``, or complex for a real ``v`` (``Identity`` ignores
                ``x0``); a
                :class:`Neumann` whose ``alpha`` is not a number (``None``, ``"lr"``,
                ``"power"``: rules that only :class:`~hypergrad.Implicit` resolves); a
                :class:`Direct` system larger than ``max_size``, or complex.
        """


def _tensor_list(value: object, name: str) -> list[Any]:
    """``value`` (an argument of a pure function, e.g. ``hparams``) as a list, refusing what is
    iterable but not a collection of tensors. A bare tensor iterates over its rows: as
    ``hparams`` of :func:`~hypergrad.implicit_hypergradient` each row was a new tensor that no
    loss used, and the hypergradient came back as zeros; a dict iterates over its keys, a module
    is not iterable at all (or iterates over its submodules)."""
    if isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a list of tensors, got a bare tensor of shape {tuple(value.shape)} "
            f"(it would be iterated over its rows): wrap it, [{name}]"
        )
    if isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a list of tensors, got a {type(value).__name__}: pass list({name}.values())"
        )
    if isinstance(value, torch.nn.Module):
        raise TypeError(
            f"{name} must be a list of tensors, got the module {type(value).__name__}: pass "
            f"list({name}.parameters())"
        )
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    return list(value)


@contextlib.contextmanager
def _autograd_on(name: str) -> Iterator[None]:
    """Autograd on for a pure hypergradient function, whatever the caller's grad mode (as
    ``torch.autograd.functional.jacobian`` and ``torch.func.grad`` do): under ``torch.no_grad()``
    (an evaluation loop) ``unrolled_hypergradient`` returned zeros in reverse mode and
    ``implicit_hypergradient`` failed with "element 0 of tensors does not require grad".
    ``torch.inference_mode()`` cannot be undone for the tensors made under it (forward mode
    returned zeros there too): refused by name."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} was called under torch.inference_mode(); it needs autograd (derivatives "
            "w.r.t. the weights and hyperparameters): call it outside that block"
        )
    with torch.enable_grad():
        yield


def _check_v(v: object, x0: object = None) -> None:
    """``v`` (and ``x0``) must be non-empty sequences of floating-point or complex tensors (host
    metadata only). A bare tensor is iterable too, by rows: ``Identity`` returned its rows as a
    tuple of 0-dim "solutions", the other solvers failed inside their first HVP."""
    for name, ts in (("v", v), ("x0", x0)):
        if ts is None and name == "x0":
            continue
        if isinstance(ts, Tensor) or not isinstance(ts, Sequence):
            hint = f" (a bare tensor: wrap it, ({name},))" if isinstance(ts, Tensor) else ""
            raise TypeError(
                f"{name} must be a tuple of tensors shaped like the weights, got {type(ts).__name__}{hint}"
            )
        bad = [f"{name}[{i}] is {type(t).__name__}" for i, t in enumerate(ts) if not isinstance(t, Tensor)]
        if bad:
            raise TypeError(f"{name} must be a tuple of tensors: {', '.join(bad[:3])}")
    assert isinstance(v, Sequence)
    if not v:
        raise ValueError("v is empty: a linear solver needs at least one tensor (the weights' shapes)")
    for i, t in enumerate(v):
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(
                f"v[{i}] is {t.dtype}: a linear solve needs floating-point or complex tensors "
                "(.to(torch.float32), or the weights' dtype)"
            )


def _checked(hvp: HVP) -> HVP:
    """``hvp`` with its output checked against its input: one tensor of the same shape each (host
    metadata only). A wrong output failed deep inside a solver (a bare tensor: "inconsistent tensor
    size"; one shape too many: a broadcasting error), or, in ``Direct``, passed by accident."""

    def checked(u: Sequence[Tensor]) -> Tensors:
        out = hvp(u)
        ok = (
            not isinstance(out, Tensor)
            and isinstance(out, Sequence)
            and len(out) == len(u)
            and all(isinstance(o, Tensor) and o.shape == t.shape for o, t in zip(out, u, strict=True))
        )
        if not ok:
            got = (
                f"a bare tensor of shape {tuple(out.shape)}"
                if isinstance(out, Tensor)
                else [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in out]
                if isinstance(out, Sequence)
                else type(out).__name__
            )
            raise TypeError(
                f"hvp must return a tuple of tensors shaped like its input {[tuple(t.shape) for t in u]}, "
                f"got {got}"
            )
        return tuple(out)

    return checked


def _check_x0(v: Sequence[Tensor], x0: Sequence[Tensor] | None) -> None:
    """Shapes, and no complex guess for a real ``v`` (host metadata, no synchronisation). Another
    real dtype or device is fine: :func:`_start` casts the guess to ``v``'s."""
    if x0 is None:
        return
    if len(x0) != len(v) or any(a.shape != b.shape for a, b in zip(x0, v, strict=True)):
        raise ValueError(
            f"x0 must be shaped like v: got {[tuple(t.shape) for t in x0]}, "
            f"expected {[tuple(t.shape) for t in v]}"
        )
    for i, (a, b) in enumerate(zip(x0, v, strict=True)):
        if a.is_complex() and not b.is_complex():
            raise ValueError(
                f"x0[{i}] is {a.dtype} but v[{i}] is {b.dtype}: a real system has a real solution"
            )


def _start(v: Sequence[Tensor], x0: Sequence[Tensor]) -> list[Tensor]:
    """A copy of ``x0`` in ``v``'s dtypes and on its devices, without a graph (a float64 guess for a
    float32 system, e.g. a solution saved from a float64 run, reached the HVP as float64: "addmv
    input tensors must have the same dtype")."""
    return [a.detach().to(dtype=b.dtype, device=b.device, copy=True) for a, b in zip(x0, v, strict=True)]


def _writable(ts: Sequence[Tensor], inputs: Sequence[Tensor] = ()) -> list[Tensor]:
    """``ts`` (an HVP's output) with each tensor that may share memory between its elements (an
    expanded one, as autograd returns for the gradient of a parameter used through ``.sum()`` or
    ``.mean()``), with the HVP's own input ``inputs`` (``lambda u: u``), or with an earlier
    tensor of ``ts`` (autograd hands back one tensor for two weights a model uses through their
    sum, ``x @ (w_shared + w_task)``) replaced by a contiguous copy, so that in-place updates of
    it are valid and leave the input and the other entries alone. (In place on the shared
    tensor, a weight decay or damping was added to both weights' HVPs twice: the
    hypergradient of such a model was 20% off.)"""
    # the memory each tensor spans, by storage: disjoint views of one buffer (the gradients of
    # weights a model concatenates, or of flat fused weights) may be written in place
    spans: dict[int, list[tuple[int, int]]] = {}

    def overlaps(t: Tensor, add: bool) -> bool:
        if not t.numel():
            return False
        storage, start, end = memory_span(t)
        seen = spans.setdefault(storage, [])
        hit = any(a < end and start < b for a, b in seen)
        if add:
            seen.append((start, end))
        return hit

    for t in inputs:
        overlaps(t, add=True)
    out = []
    for t in ts:
        expanded = not t.is_contiguous() and any(
            st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True)
        )  # (a channels_last gradient is not contiguous either, but safe to write)
        shared = overlaps(t, add=True)
        if expanded:
            t = t.contiguous()  # (a copy)
        elif shared:
            t = t.clone()
        out.append(t)
    return out


def _scaled_norm(ts: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``ts``, scaled by its largest entry first so that
    it neither underflows nor overflows (``norm`` squares the entries: in float32 a vector of
    1e-25s had norm 0 and one of 1e20s norm ``inf``). A 0-dim tensor; no host synchronisation;
    non-finite entries give a non-finite norm."""
    ts = [t for t in ts if t.numel()]
    if not ts:
        return torch.zeros(())
    if all(t.dtype in _WIDENED for t in ts):
        # the squares of float32 / float16 / bfloat16 entries neither underflow nor overflow in
        # float64, where norm() accumulates them: one read of each tensor and no temporaries.
        # (The scaled form below reads them three times and writes a copy; on CPU its infinity
        # norm alone took 0.7 ms for 269k float32 entries, against 0.1 ms for this.)
        return norm(ts)
    big = torch.stack([_max_abs(t) for t in ts]).amax()
    safe = torch.where((big > 0) & torch.isfinite(big), big, torch.ones_like(big))
    return norm(torch._foreach_div(list(ts), safe)) * safe


def _rayleigh(u: Sequence[Tensor], hu: Sequence[Tensor]) -> Tensor:
    r""":math:`\mathrm{Re}\, u^\top H u / u^\top u`: a 0-dim float64 tensor (per-tensor dot
    products in the weights' dtype, no weight-sized copies), ``nan`` where they under- or
    overflow to 0 / 0 or inf / inf; no host synchronisation."""
    num = torch.zeros((), dtype=torch.float64, device=u[0].device)
    den = torch.zeros((), dtype=torch.float64, device=u[0].device)
    for a, b in zip(u, hu, strict=True):
        if not a.numel():
            continue
        num = num + torch.vdot(a.reshape(-1), b.reshape(-1).to(a.dtype)).real.double()
        den = den + torch.vdot(a.reshape(-1), a.reshape(-1)).real.double()
    return num / den


def _max_abs(t: Tensor) -> Tensor:
    """``max |t|`` (NaN if ``t`` holds one) without ``_foreach_norm(ts, inf)``, which is slow on
    CPU (0.7 ms for 269k entries, against 0.04 ms for ``amax`` and ``amin``) and without a copy
    for real ``t``."""
    if t.is_complex():
        return t.abs().amax()
    return torch.maximum(t.amax(), t.amin().neg())


def _pow2_scale(v: Sequence[Tensor]) -> float:
    """A power of two near the largest ``|entry|`` of ``v`` (one host synchronisation), by which
    ``v`` can be divided exactly; 1.0 for ``v = 0`` or a non-finite ``v``."""
    ts = [t for t in v if t.numel()]
    if not ts:
        return 1.0
    big = float(torch.stack([_max_abs(t) for t in ts]).amax())
    if not (math.isfinite(big) and big > 0):
        return 1.0
    return math.ldexp(1.0, math.frexp(big)[1] - 1)  # big / scale in [1, 2): representable in any dtype


def _poisoned(x: list[Tensor], iterations: int) -> SolveResult:
    """Status ``NONFINITE``: the solution made all NaN (never a plausible-looking vector with a
    NaN or ``inf`` somewhere, nor one that a warm start would build on), residual NaN."""
    torch._foreach_mul_(x, float("nan"))
    nan = torch.full((), float("nan"), dtype=_real_dtype(x), device=x[0].device)
    return SolveResult(tuple(x), iterations, nan, SolveStatus.NONFINITE)


def _real_dtype(v: Sequence[Tensor]) -> torch.dtype:
    """The dtype of residuals (complex weights: their real precision)."""
    return v[0].dtype.to_real()


def _count(owner: Any, field: str, low: int) -> None:
    """Check an integer setting (NumPy integers, e.g. from a sweep's config, are made ``int``)."""
    value = getattr(owner, field)
    what = f"{type(owner).__name__} {field}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Invalid {what}: {value!r} (need an int >= {low})")
    object.__setattr__(owner, field, int(value))


def _number(owner: Any, field: str, positive: bool = False) -> None:
    """Check a finite real setting, >= 0 (or > 0); NumPy floats are made ``float``."""
    value = getattr(owner, field)
    what = f"{type(owner).__name__} {field}"
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"Invalid {what}: {value!r} (need a finite number {bound})")
    object.__setattr__(owner, field, float(value))


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (need a bool)")


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series (Lorraine et al., 2020), or Richardson iteration from ``x0``.

    .. math::
        H^{-1} v \approx \alpha \sum_{j=0}^{i} (I - \alpha H)^j v

    computed as ``p = u = v; repeat i times: u <- u - alpha * H u; p <- p + u; return alpha * p``.
    This is Richardson iteration :math:`x \leftarrow x + \alpha (v - H x)` run :math:`i + 1` times
    from :math:`x = 0`, the first one free. It converges when :math:`\|I - \alpha H\| < 1`
    (:math:`0 < \alpha < 2/\lambda_{max}` for positive definite :math:`H`), at rate
    :math:`1 - \alpha\lambda_{min}`. With :math:`i` terms it equals differentiating :math:`i + 1`
    SGD steps of learning rate :math:`\alpha` unrolled at the optimum. Given ``x0``, it runs
    :math:`i` Richardson iterations from ``x0`` (none free: ``x0 = 0`` gives one term fewer than
    ``x0=None``). Cost: ``steps`` HVPs; memory: three weight-sized buffers (and, briefly, one
    more for the scaled norms at the end); one host synchronisation. Status ``FIXED``;
    ``NONFINITE`` when ``v``, ``x0`` or an HVP was not finite (the solution is then NaN: never
    built on, not solved again); or ``DIVERGING``: from 0 when
    the last term is larger than ``v`` or than the term before it, with a margin of
    :math:`\sqrt{\epsilon_{dtype}}` for rounding, and not below :math:`\epsilon_{dtype}\|v\|`
    (a series converged to the dtype's precision) (for symmetric :math:`H` either proves a factor
    :math:`|1-\alpha\lambda| > 1`: the series diverges and its sum is no approximation of
    :math:`H^{-1} v`; :math:`\|(I-\alpha H)^j v\|` is log-convex in :math:`j`, so growth
    anywhere shows in the last ratio, e.g. :math:`H = \mathrm{diag}(1, -0.05)`, whose last term
    after 5 terms is still 8 times smaller than ``v``); from ``x0`` when the iterate ends farther
    from the solution than 0 (residual above 1) or its residual :math:`(I - \alpha H)^k r_0`
    more than doubled from the first iteration to the last, above :math:`\sqrt{\epsilon_{dtype}}
    \|v\|` (a factor :math:`|1 - \alpha\lambda| > 1` amplifying the error of ``x0``: from a
    good ``x0`` the residual stays below 1 for several hypersteps while the iterate drifts
    away, warm start after warm start); with :math:`v = 0` it returns the solution 0
    (residual 0), which the iterate only approaches. For a non-symmetric operator (a fixed-point
    condition's :math:`I - J^\top`) the series converges when the spectral radius of
    :math:`I - \alpha A` is below 1; growth of a term then proves only
    :math:`\|I - \alpha A\|_2 > 1`.

    Args:
        steps: number of terms :math:`i` after the first (0 gives :math:`\alpha v`), or of
            Richardson iterations from ``x0`` (default: 5).
        alpha: the scaling :math:`\alpha`: a number, or a rule that :class:`Implicit` resolves
            at each hyperstep: ``"lr"`` (the inner learning rate, the paper's practice, right for
            SGD), ``"power"`` (:math:`1/\hat\lambda_{max}` by power iteration) or ``None``
            (``"lr"`` for plain SGD with one learning rate, else ``"power"``) (default: ``None``).
        warm_start: ``Implicit`` passes the previous hyperstep's solution as ``x0``
            (default: ``False``).

    >>> import torch, hypergrad as hg
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> r = hg.Neumann(steps=200, alpha=0.5).solve(lambda u: (H @ u[0],), (torch.ones(2),))
    >>> [round(float(x), 4) for x in r.solution[0]], r.status.value
    ([0.5, 1.0], 'fixed')
    >>> r = hg.Neumann(steps=1, alpha=0.5).solve(lambda u: (H @ u[0],), (torch.ones(2),),
    ...     x0=(torch.tensor([0.5, 1.0]),))  # from the solution: stays there
    >>> r.solution[0].tolist(), float(r.residual)
    ([0.5, 1.0], 0.0)
    """

    steps: int = 5
    alpha: float | str | None = None
    warm_start: bool = False

    def __post_init__(self) -> None:
        _count(self, "steps", 0)
        if isinstance(self.alpha, str):
            if self.alpha not in ("lr", "power"):
                raise ValueError(
                    f"Invalid Neumann alpha: {self.alpha!r} (a number > 0, 'lr', 'power' or None)"
                )
        elif self.alpha is not None:
            _number(self, "alpha", positive=True)
        _check_bool("Neumann warm_start", self.warm_start)

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        if self.alpha is None or isinstance(self.alpha, str):
            raise ValueError(f"Neumann.alpha is {self.alpha!r}: give a number, or let Implicit resolve it")
        _check_v(v, x0)
        _check_x0(v, x0)
        hvp = _checked(hvp)
        alpha = float(self.alpha)
        v = list(v)
        res = self._series(hvp, v, x0, alpha)
        if res.status is not SolveStatus.NONFINITE or not all_finite(v):
            return res
        # a series that overflowed on a large v (float16 losses in the hundreds: v of 300s and an H
        # of 300s overflowed in the first HVP, a "nonfinite" hyperstep that CG and Direct computed;
        # float32 at 1e19s) is summed again on v / s, s a power of two near max |v| (exact), and
        # scaled back. Only then: no cost (no synchronisation) where nothing overflowed
        scale = _pow2_scale(v)
        if not scale > 8.0:
            return res
        again = self._series(
            hvp,
            list(torch._foreach_div(v, scale)),
            None if x0 is None else list(torch._foreach_div(_start(v, x0), scale)),
            alpha,
        )
        sol = list(again.solution)
        torch._foreach_mul_(sol, scale)
        total = res.iterations + again.iterations
        return SolveResult(tuple(sol), total, again.residual, again.status, again.curvature)

    def _series(self, hvp: HVP, v: list[Tensor], x0: Sequence[Tensor] | None, alpha: float) -> SolveResult:
        rdtype, device = _real_dtype(v), v[0].device
        if x0 is not None:
            # Richardson from x0: r <- v - H x; x <- x + alpha r (r is computed before x changes,
            # so an hvp that returns views of its input is harmless).
            x = _start(v, x0)  # (a graph behind x0 is not carried on)
            r = [torch.empty_like(t) for t in v]
            first = torch.full((), math.inf, dtype=rdtype, device=device)  # |r| of the first iteration
            for k in range(self.steps):  # in place: no weight-sized allocations in the loop
                hx = hvp(x)
                torch._foreach_copy_(r, v)
                torch._foreach_sub_(r, list(hx))
                del hx
                if k == 0 and self.steps > 1:
                    first = _scaled_norm(r).to(rdtype)
                torch._foreach_add_(x, r, alpha=alpha)
            if not self.steps:
                residual = torch.full((), float("nan"), dtype=rdtype, device=device)
                return SolveResult(tuple(x), 0, residual, SolveStatus.FIXED)
            # (scaled norms: in float32 a v of 1e-25s had norm 0 and came back as the solution 0)
            sizes = torch.stack([_scaled_norm(r).to(rdtype), _scaled_norm(v).to(rdtype), first])
            rn, vn, r0 = sizes.tolist()  # one synchronisation
            if not (math.isfinite(rn) and math.isfinite(vn)):  # a non-finite v, x0 or HVP
                return _poisoned(x, self.steps)
            if vn == 0:  # v = 0: the solution is 0, which the iterate from x0 only approaches
                zero = torch.zeros((), dtype=rdtype, device=device)
                return SolveResult(tuple(torch.zeros_like(t) for t in v), self.steps, zero, SolveStatus.FIXED)
            # an iterate farther from the solution than 0 (residual above |v|), or a residual
            # that more than doubled over the iterations (r_k = (I - alpha H)^k r_0: a factor
            # |1 - alpha lambda| > 1 acting on the error of x0): the Richardson iteration grows, and
            # a caller should not build on it. (From a good x0 the residual stayed below |v| for
            # several hypersteps while the error of the iterate grew 2.6 times per solve; the
            # factor 2 and the floor keep rounding noise of a converged x0 from counting.)
            eps = torch.finfo(rdtype).eps
            grew = rn > vn or (rn > math.sqrt(eps) * vn and rn > 2.0 * r0)
            status = SolveStatus.DIVERGING if grew else SolveStatus.FIXED
            return SolveResult(tuple(x), self.steps, sizes[0] / sizes[1], status)
        # from 0: term_j = (I - alpha H)^j v, acc = sum_j term_j, x = alpha * acc
        term = [t.clone() for t in v]
        acc = [t.clone() for t in v]
        before = _scaled_norm(term)  # |term_{i-1}|, the term before the last
        quotient = torch.full((), float("nan"), dtype=torch.float64, device=device)
        for k in range(self.steps):  # in place: no weight-sized allocations in the loop, but
            if k == self.steps - 1 and k > 0:  # a temporary for this norm, freed before the HVP
                before = _scaled_norm(term)
            hv = hvp(term)
            if k == self.steps - 1:  # u^T H u / u^T u at the term before the last (no sync)
                quotient = _rayleigh(term, hv)
            torch._foreach_add_(term, list(hv), alpha=-alpha)
            del hv  # not alive while the next HVP is computed
            torch._foreach_add_(acc, term)
        torch._foreach_mul_(acc, alpha)
        sizes = torch.stack([_scaled_norm(term), _scaled_norm(v), before]).to(rdtype)
        last, vn, prev, quot = torch.cat([sizes.double(), quotient.reshape(1)]).tolist()  # one sync
        if not (math.isfinite(last) and math.isfinite(vn) and math.isfinite(prev)):
            return _poisoned(acc, self.steps)  # a non-finite v or HVP
        residual = sizes[0] / sizes[1] if vn > 0 else torch.zeros((), dtype=rdtype, device=device)
        # a last term larger than v, or than the term before it, proves a factor
        # |1 - alpha lambda| > 1 of a symmetric H: the series diverges. (|(I - alpha H)^j v| is
        # log-convex in j, so growth anywhere shows in the last ratio; the margin is for rounding,
        # and terms below eps |v|, converged to the dtype's precision, are rounding noise: in
        # float32 a series at 1e-43 "grew" among subnormal numbers)
        eps = torch.finfo(rdtype).eps
        grew = last > vn or (last > eps * vn and last > prev * (1 + math.sqrt(eps)))
        status = SolveStatus.DIVERGING if self.steps and grew else SolveStatus.FIXED
        # (the quotient was read with the sizes, at no extra cost: reported whenever a term was
        # taken, as SolveResult documents, not only when the series grew)
        curvature = alpha * quot if self.steps else math.nan
        return SolveResult(tuple(acc), self.steps, residual, status, curvature)


@dataclasses.dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient on :math:`(H + \delta I) x = v` (Pedregosa, 2016).

    Textbook CG from :math:`x_0` (``x0``, or 0): :math:`r_0 = v - (H + \delta I) x_0`,
    :math:`p_0 = r_0`, then :math:`a_k = r_k^\top r_k / p_k^\top (H+\delta I) p_k`,
    :math:`x_{k+1} = x_k + a_k p_k`, :math:`r_{k+1} = r_k - a_k (H+\delta I) p_k`,
    :math:`p_{k+1} = r_{k+1} + (r_{k+1}^\top r_{k+1} / r_k^\top r_k)\, p_k`. It returns the last
    iterate :math:`x_k` and its relative residual, and says why it stopped (``status``):

    * ``CONVERGED``: :math:`\|r_k\| \le \text{tol}\,\|v\|` (also measured against :math:`\|v\|`
      when warm-started; :math:`v = 0` gives :math:`x = 0` at once, whatever ``x0``);
    * ``MAX_ITERATIONS``: ``maxiter`` HVPs spent first;
    * ``NONPOSITIVE_CURVATURE``: a direction with :math:`p^\top (H + \delta I) p \le 0` (the
      system is not positive definite), or with a curvature lost in rounding, i.e. a Rayleigh
      quotient :math:`p^\top (H+\delta I) p / p^\top p` below :math:`10\,\epsilon_{dtype}` times
      the largest one met so far (:math:`H` numerically singular and ``v`` not in its range, e.g.
      weights of ReLU units dead on the training batch: the next step would be of size
      :math:`1/\text{rounding}`); it stops there and returns the iterate so far, as truncated CG
      does. Raise ``damping`` if this happens often;
    * ``NONFINITE``: a non-finite ``v``, HVP or curvature; the solution is NaN, never a silent 0.

    ``tol`` is relative: CG runs on :math:`(H + \delta I)(x/s) = v/s` with :math:`s` the power
    of two nearest below :math:`\max_i |v_i|` (an exact scaling), so its iterates, iterations,
    residual and status are those for :math:`v/s`: :math:`v^\top v` neither underflows (in
    float32, a ``v`` of 1e-25s was taken for 0 and returned :math:`x = 0`, "converged") nor
    overflows (one of 1e20s returned NaN). One host synchronisation for :math:`s`.

    The residual is not monotone in :math:`k`: on ill-conditioned systems it can rise above
    :math:`\|v\|` for a while before falling, while the error in the :math:`H`-norm always decreases
    (for positive definite :math:`H + \delta I`). It converges at rate
    :math:`(\sqrt\kappa - 1)/(\sqrt\kappa + 1)`. It assumes :math:`H` symmetric and cannot
    tell when it is not: for a non-symmetric operator (a fixed-point condition's
    :math:`I - J^\top`) use :class:`Direct`, :class:`Neumann`, or CG on the normal equations.
    Cost: one HVP, two host synchronisations and one extra weight-sized buffer per iteration; a
    warm start spends one of the ``maxiter`` HVPs on :math:`r_0`.

    Args:
        maxiter: most HVPs, including the initial-residual HVP of a warm start and the one
            that confirms exactly-zero rows of the operator where the first direction meets some
            (with ``maxiter=1`` that one is the second) (default: 10).
        tol: relative residual to stop at, as CG's recurrence tracks it (see
            :class:`SolveResult`): below the precision of the dtype (about 1e-7 in float32) the
            recurrence may still reach it, status ``CONVERGED``, while the true residual stays
            at that precision (default: 1e-10).
        damping: :math:`\delta \ge 0` added to the diagonal; makes indefinite Hessians of neural
            networks solvable at the price of bias (default: 0.0).
        warm_start: ``Implicit`` passes the previous hyperstep's solution as ``x0``
            (default: ``False``).

    >>> import torch, hypergrad as hg
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> r = hg.CG(maxiter=2, tol=1e-6).solve(lambda u: (H @ u[0],), (torch.ones(2),))
    >>> [round(float(x), 4) for x in r.solution[0]], r.iterations, r.status.value
    ([0.5, 1.0], 2, 'converged')
    >>> r = hg.CG(maxiter=2, tol=1e-6).solve(lambda u: (H @ u[0],), (torch.ones(2),), x0=r.solution)
    >>> r.iterations, r.status.value  # one HVP for the residual of x0, already small enough
    (1, 'converged')
    """

    maxiter: int = 10
    tol: float = 1e-10
    damping: float = 0.0
    warm_start: bool = False

    def __post_init__(self) -> None:
        _count(self, "maxiter", 1)
        _number(self, "tol")
        _number(self, "damping")
        _check_bool("CG warm_start", self.warm_start)

    def _apply(self, hvp: HVP, u: list[Tensor]) -> list[Tensor]:
        """:math:`(H + \\delta I) u`, the damping added in place to the HVP's output."""
        out = list(hvp(u))
        if self.damping:  # (in place: not on an expanded HVP, as for w used as w.sum(), nor on u)
            out = _writable(out, u)
            torch._foreach_add_(out, u, alpha=self.damping)
        return out

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        _check_v(v, x0)
        _check_x0(v, x0)
        hvp = _checked(hvp)
        v = list(v)
        # CG on (H + delta I)(x / s) = v / s with s a power of two near max |v| (exact scaling):
        # v^T v squares v, and in float32 a v of 1e-25s came back as x = 0, "converged", and one
        # of 1e20s as NaN, "nonfinite"; the iterates, tol and statuses are scale-invariant
        scale = _pow2_scale(v)  # one synchronisation
        r = list(torch._foreach_div(v, scale)) if scale != 1.0 else [t.clone() for t in v]
        vv = float(dot(r, r))
        it = 0
        if x0 is not None and vv == 0:  # v = 0: x = 0 solves it exactly (and a residual relative
            x0 = None  # to |v| = 0 would be infinite from any other start)
        if x0 is None:
            x = [torch.zeros_like(t) for t in v]
            rs = vv
        else:
            x = _start(v, x0)  # (a graph behind x0 is not carried on)
            if scale != 1.0:
                torch._foreach_div_(x, scale)
            torch._foreach_sub_(r, self._apply(hvp, x))
            it += 1
            rs = float(dot(r, r))
        p = [t.clone() for t in r]
        stop = self.tol**2 * vv
        status = SolveStatus.NONFINITE
        # curvature lost in rounding: a Rayleigh quotient below this times the largest one met
        flat = 10 * torch.finfo(v[0].dtype).eps
        top = 0.0
        first = True
        removed = 0.0  # |r|^2 on rows of H + delta I that are exactly zero: no x reduces it
        while math.isfinite(vv) and math.isfinite(rs):
            if rs <= stop:
                status = SolveStatus.CONVERGED
                break
            if it >= self.maxiter:
                status = SolveStatus.MAX_ITERATIONS
                break
            ap = self._apply(hvp, p)
            it += 1
            null: list[Tensor] = []
            if first:  # p = r here
                # entries where (H + delta I) p is exactly 0 and p is not: zero rows of the operator
                # (an embedding row no training example uses, read by the validation loss). The
                # system is inconsistent there and those entries of x are free: the least-squares
                # solution leaves them at 0, as Direct's does. Kept in r and p, they entered every
                # step size r'r / p'Hp and never left the residual: CG ran off (entries 1000x too
                # large, a relative residual of 260)
                null = [(a == 0) & (q != 0) for a, q in zip(ap, p, strict=True)]
                kept = [torch.where(m, q, torch.zeros_like(q)) for q, m in zip(p, null, strict=True)]
                lost = dot(kept, kept)
            else:
                lost = torch.zeros((), dtype=_real_dtype(v), device=v[0].device)
            first = False
            curvature, pp, cut = torch.stack([dot(p, ap), dot(p, p), lost]).tolist()  # one synchronisation
            if cut > 0 and math.isfinite(cut):
                # a zero row gives 0 for every input, but an entry of H p can also be 0 by
                # cancellation (H = [[2, -1], [-1, 2]], p = (1, 2)): no zero row. Masked, such an
                # entry was dropped from the system, the solution 0 there, "nonpositive_curvature"
                # for a positive definite H. Confirmed on a generic (fixed-seed) vector: one HVP,
                # only where a zero entry was met
                gen = torch.Generator(device=v[0].device).manual_seed(0)
                probe = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in p]
                hq = self._apply(hvp, probe)
                it += 1
                null = [m & (a == 0) for m, a in zip(null, hq, strict=True)]
                kept = [torch.where(m, q, torch.zeros_like(q)) for q, m in zip(p, null, strict=True)]
                cut = float(dot(kept, kept))
            if cut > 0 and math.isfinite(cut):  # (H p is 0 there: the curvature p'Hp is unchanged)
                for q, t, m in zip(p, r, null, strict=True):
                    q.masked_fill_(m, 0)
                    t.masked_fill_(m, 0)
                pp, rs = torch.stack([dot(p, p), dot(r, r)]).tolist()
                removed = cut
                if rs <= stop:
                    status = SolveStatus.CONVERGED
                    break
            if not math.isfinite(curvature):
                break  # status stays NONFINITE
            rayleigh = curvature / pp if pp > 0 else 0.0  # p != 0 here (r != 0: rs > stop >= 0)
            if curvature <= 0 or rayleigh <= flat * top:  # truncated CG: stop on non-positive
                status = SolveStatus.NONPOSITIVE_CURVATURE  # (or rounding-level) curvature
                break
            top = max(top, rayleigh)
            a = rs / curvature  # host floats (already synchronised): in-place updates
            torch._foreach_add_(x, p, alpha=a)
            torch._foreach_add_(r, ap, alpha=-a)
            rs_new = float(dot(r, r))
            if math.isfinite(rs_new):
                torch._foreach_mul_(p, rs_new / rs)
                torch._foreach_add_(p, r)
            rs = rs_new  # a non-finite one ends the loop with status NONFINITE
        if scale != 1.0:
            torch._foreach_mul_(x, scale)
        if status is SolveStatus.NONFINITE:  # poison the result, so guards downstream see it
            torch._foreach_mul_(x, float("nan"))
            rel = float("nan")
        elif vv > 0:
            rel = math.sqrt((rs + removed) / vv)  # (the residual of the whole system)
        else:  # v = 0: relative to nothing
            rel = 0.0 if rs == 0 else math.inf
        if removed > 0 and status is SolveStatus.CONVERGED:
            status = SolveStatus.NONPOSITIVE_CURVATURE  # singular: the least-squares solution, as Direct
        return SolveResult(tuple(x), it, torch.tensor(rel, dtype=_real_dtype(v), device=v[0].device), status)


@dataclasses.dataclass(frozen=True)
class Identity(LinearSolver):
    r""":math:`H^{-1} \approx s I`: no HVPs at all (the "identity" / one-step approximation).

    Lorraine et al. (2020) found it a useful baseline; it is exact only for :math:`H = I/s`.
    It ignores ``x0`` and always reports status ``FIXED``: it checks nothing, not even that ``v``
    is finite (no host synchronisation; ``Implicit``'s guards see a non-finite hypergradient).

    Args:
        scale: the factor :math:`s` (default: 1.0).

    >>> import torch, hypergrad as hg
    >>> r = hg.Identity().solve(lambda u: u, (torch.ones(2),))
    >>> r.solution[0].tolist(), r.status.value
    ([1.0, 1.0], 'fixed')
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        _number(self, "scale", positive=True)

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        _check_v(v)
        sol = tuple(torch._foreach_mul(list(v), self.scale)) if self.scale != 1.0 else tuple(v)
        nan = torch.full((), float("nan"), dtype=_real_dtype(v), device=v[0].device)
        return SolveResult(sol, 0, nan, SolveStatus.FIXED)


@dataclasses.dataclass(frozen=True)
class Direct(LinearSolver):
    r""":math:`H^{-1} v` by a dense solve: the Hessian built column by column (one HVP per weight
    entry, :math:`P` in all) and factorised.

    For small problems, where it is the reference the iterative solvers approximate: regression
    and logistic models, tests, or the last layer of a network (``Implicit(hessian_subset=...)``).
    Cholesky when :math:`H + \delta I` is positive definite (status ``CONVERGED``); otherwise an
    LU solve, or the minimum-norm least-squares solution when it is singular (status
    ``NONPOSITIVE_CURVATURE``: the exact :math:`H^{-1}v` of an indefinite :math:`H` is rarely the
    hypergradient one wants; damping is the usual cure). A dense matrix symmetric up to the
    HVPs' rounding (:math:`\|A - A^\top\|_F \le \sqrt{\epsilon_{dtype}}\,\|A\|_F`) is made
    exactly symmetric; a non-symmetric operator (a fixed-point condition's :math:`I - J^\top`;
    in ``Implicit``, the :math:`J^\top` of a gradient field from a custom backward) is solved
    as it is, by LU (status ``CONVERGED``; ``NONPOSITIVE_CURVATURE`` with the
    least-squares solution when singular). The residual is the exact
    :math:`\|(H+\delta I)x - v\|/\|v\|`. Cost: :math:`P` HVPs, :math:`P^2` memory, an
    :math:`O(P^3)` factorisation; two host synchronisations (the finiteness and symmetry check
    and the Cholesky status; two or three more on the LU fallback). ``x0`` is checked for its shape
    and otherwise ignored. Real weights only (complex ones as
    real pairs: ``torch.view_as_real``). The dense algebra runs in the widest dtype of ``v``, and
    in at least float32 (half-precision weights: torch has no half-precision Cholesky); the HVPs
    and the solution are in ``v``'s own dtypes.

    Args:
        damping: :math:`\delta \ge 0` added to the diagonal (default: 0.0).
        max_size: largest :math:`P` accepted; a larger problem raises a ``ValueError`` naming
            the alternatives (default: 4096).

    >>> import torch, hypergrad as hg
    >>> H = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> r = hg.Direct().solve(lambda u: (H @ u[0],), (torch.tensor([1.0, 2.0], dtype=torch.float64),))
    >>> [round(float(x), 6) for x in r.solution[0]], r.iterations, r.status.value
    ([0.2, 0.6], 2, 'converged')
    """

    damping: float = 0.0
    max_size: int = 4096

    def __post_init__(self) -> None:
        _number(self, "damping")
        _count(self, "max_size", 1)

    def solve(self, hvp: HVP, v: Sequence[Tensor], x0: Sequence[Tensor] | None = None) -> SolveResult:
        _check_v(v, x0)
        _check_x0(v, x0)  # (a direct solve has no use for a starting point)
        hvp = _checked(hvp)
        v = list(v)
        if any(t.is_complex() for t in v):
            raise ValueError(
                "Direct solves real systems: autograd's HVP is only real-linear in complex weights; "
                "use CG or Neumann, or parametrise the weights as real pairs (torch.view_as_real)"
            )
        sizes = [t.numel() for t in v]
        n = sum(sizes)
        if n > self.max_size:
            raise ValueError(
                f"Direct builds a dense {n} x {n} Hessian ({n} HVPs), more than max_size={self.max_size}: "
                "use CG or Neumann, restrict the solve with Implicit(hessian_subset=...), or raise max_size"
            )
        # the dense algebra in at least float32 (torch has no half-precision Cholesky: a bfloat16
        # model failed with '"cholesky_cpu" not implemented for BFloat16'), and in the widest dtype
        # of v; each HVP still gets its input in v's own dtypes (float64 columns for a float32
        # weight failed inside the HVP), and the solution comes back in them
        work = torch.promote_types(functools.reduce(torch.promote_types, [t.dtype for t in v]), torch.float32)
        b = torch.cat([t.reshape(-1).to(work) for t in v])
        h = torch.empty(n, n, dtype=work, device=b.device)
        basis = torch.zeros(n, dtype=work, device=b.device)
        for j in range(n):
            basis.zero_()
            basis[j] = 1
            cols = hvp([c.view_as(t).to(t.dtype) for c, t in zip(basis.split(sizes), v, strict=True)])
            h[:, j] = torch.cat([c.reshape(-1).to(work) for c in cols])
        # the dense algebra in the Hessian's dtype: under torch.autocast, h @ x and pinv ran in
        # float16 / bfloat16 (a residual of 1e-2 reported for one of 5e-6; a bfloat16 solution)
        with torch.autocast(b.device.type, enabled=False):
            # symmetric up to the HVPs' rounding: made exactly so. An operator that is not (a
            # user's fixed-point condition I - J^T, a gradient field with an inexact backward)
            # is solved as it is, by LU: symmetrised, a non-symmetric A came back 37% off,
            # "converged", with a reported residual of 1e-16 for a true one of 0.26
            eps = max(torch.finfo(t.dtype).eps for t in v)
            finite = torch.isfinite(h).all() & torch.isfinite(b).all()
            stats = torch.stack(
                [_scaled_norm([h - h.mT]), math.sqrt(eps) * _scaled_norm([h]), finite.to(h.dtype)]
            )
            asym, bound, ok = stats.tolist()  # the one synchronisation before the factorisation
            symmetric = not asym > bound
            if symmetric:
                h = 0.5 * (h + h.mT)
            if self.damping:
                h.diagonal().add_(self.damping)
            status = SolveStatus.CONVERGED
            if not ok:
                x = torch.full_like(b, float("nan"))
                residual = torch.full((), float("nan"), dtype=b.dtype, device=b.device)
                status = SolveStatus.NONFINITE
            else:
                info = torch.ones((), dtype=torch.int32)  # (no Cholesky of a non-symmetric h)
                if symmetric:
                    chol, info = torch.linalg.cholesky_ex(h)
                if int(info) == 0:
                    x = torch.cholesky_solve(b[:, None], chol)[:, 0]
                else:
                    status = SolveStatus.NONPOSITIVE_CURVATURE if symmetric else SolveStatus.CONVERGED
                    lu, piv, info = torch.linalg.lu_factor_ex(h)
                    singular = int(info) != 0 or not bool(torch.isfinite(lu).all())
                    if not singular:
                        x = torch.linalg.lu_solve(lu, piv, b[:, None])[:, 0]
                        singular = not bool(torch.isfinite(x).all())
                    if singular:
                        status = SolveStatus.NONPOSITIVE_CURVATURE
                        x = torch.linalg.pinv(h, hermitian=symmetric) @ b
                # (scaled norms: plain ones underflowed to a residual of 0 for a v of 1e-25s in float32)
                residual = _scaled_norm([h @ x - b]) / _scaled_norm([b]).clamp_min(torch.finfo(b.dtype).tiny)
        sol = tuple(c.view_as(t).to(t.dtype, copy=True) for c, t in zip(x.split(sizes), v, strict=True))
        return SolveResult(sol, n, residual.to(_real_dtype(v)), status)
