"""The same hypergradients computed with the peer libraries, where they import.

* torchopt (implicit): ``torchopt.diff.implicit.custom_root`` on the training gradient as the
  optimality condition, with its Neumann (``solve_inv(ns=True)``) or CG (``solve_cg``) solver, the
  same settings as ``hg.Neumann`` / ``hg.CG``.
* higher (unrolled): ``higher.innerloop_ctx`` with its differentiable SGD (momentum), K steps on
  the same batches from the same weights and optimiser state, then the validation loss.

Each peer call also writes the hypergradient into ``.grad`` and takes the same fused-Adam outer
step as ``hyper_step`` does, so the two are timed for the same work. When a peer does not import,
:data:`ERRORS` holds why and the suite records it instead of a time.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from models import Batch, Problem, cross_entropy, forward, logits_loss
from torch import Tensor

# torchopt 0.7 calls functorch.vjp, which torch 2.x deprecates loudly on every call; higher uses
# deprecated torch internals
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt(\..*)?$")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torchopt|higher)(\..*)?$")
warnings.filterwarnings("ignore", category=UserWarning, module=r"higher(\..*)?$")

ERRORS: dict[str, str] = {}
VERSIONS: dict[str, str | None] = {}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


try:
    import torchopt
    import torchopt.diff.implicit

    VERSIONS["torchopt"] = _version("torchopt")
except Exception as e:  # noqa: BLE001 - record whatever stops the import
    torchopt = None
    ERRORS["torchopt"] = f"{type(e).__name__}: {e}"

try:
    import higher

    VERSIONS["higher"] = _version("higher")
except Exception as e:  # noqa: BLE001
    higher = None
    ERRORS["higher"] = f"{type(e).__name__}: {e}"


def _penalty(params: Sequence[Tensor], decays_raw: Sequence[Tensor]) -> Tensor:
    """``WeightDecay(per="parameter")``'s penalty, ½ Σ exp(r)·w², written out."""
    return (
        0.5
        * torch.stack([(r.exp() * w.square()).sum() for w, r in zip(params, decays_raw, strict=True)]).sum()
    )


def _check_order(prob: Problem) -> list[str]:
    names = [n for n, _ in prob.model.named_parameters()]
    if list(prob.hp.names) != names:
        raise RuntimeError("WeightDecay does not cover every parameter in model order")
    return names


class TorchoptImplicit:
    """torchopt's IFT hypergradient of the problem at the shared model's current weights.

    The "inner solver" decorated by ``custom_root`` returns the weights the training loop reached
    (the assumption ``hg.Implicit`` makes). BatchNorm runs on batch statistics without tracking
    running statistics (``torch.func.replace_all_batch_norm_modules_``: torch.func transforms
    cannot mutate buffers); the loss value is the same as in train mode.
    """

    def __init__(
        self, prob: Problem, solver: str, steps: int, alpha: float, tol: float, damping: float
    ) -> None:
        if torchopt is None:
            raise RuntimeError(f"torchopt unavailable: {ERRORS['torchopt']}")
        self.prob = prob
        self.names = _check_order(prob)
        self.fmodel = copy.deepcopy(prob.model)
        torch.func.replace_all_batch_norm_modules_(self.fmodel)
        self.outer = prob.outer()
        if solver == "neumann":
            solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=steps, alpha=alpha)
        elif solver == "cg":
            solve = torchopt.linear_solve.solve_cg(maxiter=steps, rtol=tol, atol=0.0, ridge=damping)
        else:
            raise ValueError(solver)

        def inner_objective(
            params: tuple[Tensor, ...], decays_raw: tuple[Tensor, ...], x: Tensor, y: Tensor
        ) -> Tensor:
            return self.loss_at(params, (x, y)) + _penalty(params, decays_raw)

        optimality = torch.func.grad(inner_objective, argnums=0)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solution(
            params: tuple[Tensor, ...], decays_raw: tuple[Tensor, ...], x: Tensor, y: Tensor
        ) -> tuple[Tensor, ...]:
            return tuple(p.detach() for p in params)  # the training loop already solved it

        self.solution = solution

    def loss_at(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        x, y = batch
        weights = dict(zip(self.names, params, strict=True))
        out = forward(lambda x: torch.func.functional_call(self.fmodel, weights, (x,)), x)
        return logits_loss(out, y)

    def hypergradient(self) -> tuple[Tensor, ...]:
        prob = self.prob
        params = tuple(w.detach() for w in prob.weights)
        decays_raw = tuple(prob.hparams)
        w_star = self.solution(params, decays_raw, *prob.train_batch)
        return torch.autograd.grad(self.loss_at(w_star, prob.val_batch), decays_raw)

    def __call__(self) -> None:
        """Hypergradient into ``.grad``, then the outer step (what ``hyper_step`` does)."""
        for h, g in zip(self.prob.hparams, self.hypergradient(), strict=True):
            h.grad = g
        self.outer.step()


class HigherUnrolled:
    """higher's unrolled hypergradient through K SGD-momentum steps from a fixed start.

    ``start()`` captures the weights and optimiser state of ``model`` / ``inner`` (a copy owned by
    this object) before the K steps; each call differentiates through K steps on ``batches`` from
    there (like ``hg.Unrolled``'s replay of the same K real steps).
    """

    def __init__(self, prob: Problem, steps: int) -> None:
        if higher is None:
            raise RuntimeError(f"higher unavailable: {ERRORS['higher']}")
        _check_order(prob)
        self.prob = prob
        self.steps = steps
        self.model, self.inner = prob.inner_copy()
        self.outer = prob.outer()

    def hypergradient(self, batches: Sequence[Batch] | None = None) -> tuple[Tensor, ...]:
        prob = self.prob
        batches = list(batches or prob.train_batches)
        decays_raw = prob.hparams
        with higher.innerloop_ctx(
            self.model, self.inner, copy_initial_weights=True, track_higher_grads=True
        ) as (fmodel, diffopt):
            for i in range(self.steps):
                b = batches[i % len(batches)]
                diffopt.step(cross_entropy(fmodel, b) + _penalty(list(fmodel.parameters()), decays_raw))
            lv = cross_entropy(fmodel, prob.val_batch)
            return torch.autograd.grad(lv, decays_raw)

    def __call__(self) -> None:
        for h, g in zip(self.prob.hparams, self.hypergradient(), strict=True):
            h.grad = g
        self.outer.step()


def rel_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors, in float64."""
    num = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True)))
    den = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return num / den if den > 0 else float("nan")


def unrolled_agreement(prob: Problem, steps: int) -> dict[str, Any]:
    """hg.Unrolled against higher on the same K steps from the same weights and optimiser state:
    the relative difference of the two hypergradients."""
    if higher is None:
        return {"error": ERRORS["higher"]}
    from models import train_loss, val_loss

    import hypergrad as hg

    peer = HigherUnrolled(prob, steps)  # copies the weights and state *before* the K steps
    model, inner = prob.inner_copy()
    hopt = hg.Unrolled(
        model, prob.hp, train_loss, val_loss, inner_optimizer=inner, outer_optimizer=prob.outer(), steps=steps
    )
    batches = prob.train_batches[:steps] if steps <= len(prob.train_batches) else None
    batches = batches or [prob.train_batches[i % len(prob.train_batches)] for i in range(steps)]
    for b in batches:
        hopt.step(b)
    g_hg, _ = hopt.hypergradient(val_batch=prob.val_batch)
    g_peer = peer.hypergradient(batches)
    return {"rel_diff": rel_diff(g_hg, g_peer)}


def implicit_agreement(prob: Problem, hopt: Any, peer: TorchoptImplicit) -> dict[str, Any]:
    """hg.Implicit against torchopt at the shared model's current weights."""
    g_hg, info = hopt.hypergradient(train_batch=prob.train_batch, val_batch=prob.val_batch)
    return {
        "rel_diff": rel_diff(g_hg, peer.hypergradient()),
        "hg_solver_iterations": info.solver_iterations,
        "hg_solver_status": info.solver_status,
    }


def available(name: str) -> bool:
    return name not in ERRORS


def make(kind: str, prob: Problem, **kw: Any) -> Callable[[], None]:
    """A peer call by kind: ``"torchopt"`` (``solver``, ``steps``, ``alpha``, ``tol``, ``damping``) or
    ``"higher"`` (``steps``)."""
    if kind == "torchopt":
        return TorchoptImplicit(prob, **kw)
    if kind == "higher":
        return HigherUnrolled(prob, **kw)
    raise ValueError(kind)
