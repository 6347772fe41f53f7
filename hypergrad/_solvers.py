r"""Linear solvers for :math:`H x = v`, given only Hessian-vector products.

Every solver has the same shape: ``solver.solve(hvp, v) -> SolveResult``, where ``hvp`` maps a
tuple of tensors shaped like the weights to :math:`H` times it, and the result carries the solution,
the number of HVPs spent and a relative residual to log. ``Implicit`` takes any of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._functional import dot, norm
from ._types import HVP, Tensors


@dataclasses.dataclass(frozen=True)
class SolveResult:
    r"""What a linear solver returns.

    Attributes:
        solution: :math:`x \approx H^{-1} v`, a tuple shaped like ``v``.
        iterations: Hessian-vector products spent.
        residual: a 0-dim tensor. CG: the relative residual :math:`\|Hx - v\| / \|v\|` (damped
            :math:`H`). Neumann: the relative size of the last series term
            :math:`\|(I - \alpha H)^i v\| / \|v\|`, which goes to 0 exactly when the series converges
            (the true residual is :math:`(I-\alpha H)` times it). Identity: ``nan`` (not measured).
    """

    solution: Tensors
    iterations: int
    residual: Tensor


class LinearSolver(abc.ABC):
    """Base of the interchangeable inverse-Hessian approximations."""

    @abc.abstractmethod
    def solve(self, hvp: HVP, v: Sequence[Tensor]) -> SolveResult:
        """Approximate :math:`H^{-1} v`.

        Args:
            hvp: ``hvp(u) -> H u`` on tuples shaped like ``v``.
            v: right-hand side, a tuple of tensors (shapes of the weights).
        """


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    r"""Truncated Neumann series (Lorraine et al., 2020).

    .. math::
        H^{-1} v \approx \alpha \sum_{j=0}^{i} (I - \alpha H)^j v

    computed as ``p = u = v; repeat i times: u <- u - alpha * H u; p <- p + u; return alpha * p``.
    It converges when :math:`\|I - \alpha H\| < 1` (:math:`0 < \alpha < 2/\lambda_{max}` for
    positive definite :math:`H`), at rate :math:`1 - \alpha\lambda_{min}`. With :math:`i` terms it
    equals differentiating :math:`i + 1` SGD steps of learning rate :math:`\alpha` unrolled at the
    optimum. Cost: ``steps`` HVPs; memory: three weight-sized buffers.

    Args:
        steps: number of terms :math:`i` after the first (0 gives :math:`\alpha v`) (default: 5).
        alpha: the scaling :math:`\alpha`; ``None`` takes the inner optimiser's learning rate of its
            first parameter group, the paper's practice (default: ``None``).

    >>> import torch, hypergrad as hg
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> r = hg.Neumann(steps=200, alpha=0.5).solve(lambda u: (H @ u[0],), (torch.ones(2),))
    >>> [round(float(x), 4) for x in r.solution[0]]
    [0.5, 1.0]
    """

    steps: int = 5
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Invalid Neumann steps: {self.steps!r} (need an int >= 0)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"Invalid Neumann alpha: {self.alpha!r} (need a finite value > 0)")

    def solve(self, hvp: HVP, v: Sequence[Tensor]) -> SolveResult:
        if self.alpha is None:
            raise ValueError("Neumann.alpha is None: give alpha, or let Implicit fill it in")
        alpha = self.alpha
        term = [t.clone() for t in v]
        acc = [t.clone() for t in v]
        for _ in range(self.steps):  # in place: no weight-sized allocations in the loop
            hv = hvp(term)
            torch._foreach_add_(term, list(hv), alpha=-alpha)
            torch._foreach_add_(acc, term)
        torch._foreach_mul_(acc, alpha)
        residual = norm(term) / norm(v).clamp_min(torch.finfo(v[0].dtype).tiny)
        return SolveResult(tuple(acc), self.steps, residual)


@dataclasses.dataclass(frozen=True)
class CG(LinearSolver):
    r"""Conjugate gradient on :math:`(H + \delta I) x = v` (Pedregosa, 2016).

    Converges at rate :math:`(\sqrt\kappa - 1)/(\sqrt\kappa + 1)` for positive definite
    :math:`H + \delta I`. Stops when :math:`\|r\| \le \text{tol}\,\|v\|`, after ``maxiter`` HVPs,
    or at the first direction of non-positive curvature. It returns the iterate with the smallest
    residual seen (so never one worse than :math:`x = 0`; on indefinite Hessians later iterates can
    be), and that residual. A non-finite HVP makes the solution NaN (never a silent 0).
    Cost: one HVP, two host synchronisations and one extra weight-sized buffer per iteration.

    Args:
        maxiter: most HVPs (default: 10).
        tol: relative residual to stop at (default: 1e-10).
        damping: :math:`\delta \ge 0` added to the diagonal; makes indefinite Hessians of neural
            networks solvable at the price of bias (default: 0.0).

    >>> import torch, hypergrad as hg
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> r = hg.CG(maxiter=2).solve(lambda u: (H @ u[0],), (torch.ones(2),))
    >>> [round(float(x), 4) for x in r.solution[0]], r.iterations
    ([0.5, 1.0], 2)
    """

    maxiter: int = 10
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.maxiter, int) or self.maxiter < 1:
            raise ValueError(f"Invalid CG maxiter: {self.maxiter!r} (need an int >= 1)")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"Invalid CG tol: {self.tol!r} (need a finite value >= 0)")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise ValueError(f"Invalid CG damping: {self.damping!r} (need a finite value >= 0)")

    def solve(self, hvp: HVP, v: Sequence[Tensor]) -> SolveResult:
        x = [torch.zeros_like(t) for t in v]
        best = [torch.zeros_like(t) for t in v]  # the iterate with the smallest residual so far
        r = [t.clone() for t in v]
        p = [t.clone() for t in v]
        rs0 = best_rs = rs_value = float(dot(r, r))
        stop = self.tol**2 * rs0
        it = 0
        poisoned = False
        while it < self.maxiter and best_rs > stop:
            ap = list(hvp(p))
            if self.damping:
                torch._foreach_add_(ap, p, alpha=self.damping)
            it += 1
            pap = dot(p, ap)
            curvature = float(pap)
            if not math.isfinite(curvature):  # poison the result, so guards downstream see it
                poisoned = True
                break
            if curvature <= 0:  # non-positive curvature: stop with the best iterate so far
                break
            a = rs_value / curvature  # host floats (already synchronised): in-place updates
            torch._foreach_add_(x, p, alpha=a)
            torch._foreach_add_(r, ap, alpha=-a)
            rs_new = float(dot(r, r))
            torch._foreach_mul_(p, rs_new / rs_value)
            torch._foreach_add_(p, r)
            rs_value = rs_new
            if rs_value < best_rs:
                best_rs = rs_value
                torch._foreach_copy_(best, x)
        if poisoned:
            torch._foreach_mul_(best, float("nan"))
            best_rs = float("nan")
        rel = math.sqrt(best_rs / rs0) if rs0 > 0 else 0.0
        return SolveResult(tuple(best), it, torch.tensor(rel, dtype=v[0].dtype, device=v[0].device))


@dataclasses.dataclass(frozen=True)
class Identity(LinearSolver):
    r""":math:`H^{-1} \approx s I`: no HVPs at all (the "identity" / one-step approximation).

    Lorraine et al. (2020) found it a useful baseline; it is exact only for :math:`H = I/s`.

    Args:
        scale: the factor :math:`s` (default: 1.0).

    >>> import torch, hypergrad as hg
    >>> hg.Identity().solve(lambda u: u, (torch.ones(2),)).solution[0].tolist()
    [1.0, 1.0]
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Invalid Identity scale: {self.scale!r} (need a finite value > 0)")

    def solve(self, hvp: HVP, v: Sequence[Tensor]) -> SolveResult:
        sol = tuple(torch._foreach_mul(list(v), self.scale)) if self.scale != 1.0 else tuple(v)
        return SolveResult(sol, 0, torch.full((), float("nan"), dtype=v[0].dtype, device=v[0].device))
