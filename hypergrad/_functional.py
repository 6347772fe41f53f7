"""Primitives: a functional view of ``(model, hparams)``, tensor-tuple arithmetic, HVPs, mixed VJPs.

Nothing here knows about methods, schedules or logging. Everything works on tuples of tensors in
a fixed order (the order of ``model.named_parameters()`` restricted to the trained weights, and of
``hparams.named_parameters()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._types import Batch, LossFn, Tensors


class _Bound(nn.Module):
    """Holds ``model`` and ``hparams`` so one ``functional_call`` can substitute both."""

    def __init__(self, model: nn.Module, hparams: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hparams = hparams

    def forward(self, loss_fn: LossFn, batch: Batch) -> Tensor:
        return loss_fn(self.model, self.hparams, batch)


class FunctionalPair:
    """Evaluates user losses with the weights, buffers and/or hyperparameters substituted.

    Inside the call, ``model(x)``, ``model.parameters()`` and ``model.named_parameters()`` see the
    substituted tensors (``torch.func.functional_call`` semantics), and so do the hyperparameter
    containers' parameters. Buffers are always substituted by the tensors passed in, so in-place
    updates of running statistics (BatchNorm) land there and never in the real model unless the
    caller copies them back.

    Args:
        model: the model being trained.
        hparams: the module whose parameters are the hyperparameters.
        weights: the model parameters that are trained (those in the inner optimiser).
    """

    def __init__(self, model: nn.Module, hparams: nn.Module, weights: Sequence[Tensor]) -> None:
        self.model = model
        self.hparams = hparams
        self._bound = _Bound(model, hparams)
        ids = {id(w) for w in weights}
        self.weight_names = tuple(n for n, p in model.named_parameters() if id(p) in ids)
        by_name = dict(model.named_parameters())
        self.weights: Tensors = tuple(by_name[n] for n in self.weight_names)
        self.buffer_names = tuple(n for n, _ in model.named_buffers())
        self.hparam_names = tuple(n for n, _ in hparams.named_parameters())
        self.hparam_tensors: Tensors = tuple(p for _, p in hparams.named_parameters())

    def buffers(self) -> Tensors:
        """The model's buffers, in ``buffer_names`` order (the real tensors)."""
        by_name = dict(self.model.named_buffers())
        return tuple(by_name[n] for n in self.buffer_names)

    def loss(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        weights: Sequence[Tensor] | None = None,
        buffers: Sequence[Tensor],
        hparams: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``loss_fn(model, hparams, batch)`` with the given tensors substituted.

        ``weights=None`` / ``hparams=None`` use the real parameters. ``buffers`` is required:
        pass copies (``clone_all(self.buffers())``) to keep the real running statistics untouched.
        """
        if weights is None and hparams is None and not self.buffer_names:
            out = loss_fn(self.model, self.hparams, batch)  # nothing to substitute: skip functional_call
            return self._check_scalar(out, loss_fn)
        mapping: dict[str, Tensor] = {}
        if weights is not None:
            mapping.update(zip(("model." + n for n in self.weight_names), weights, strict=True))
        mapping.update(zip(("model." + n for n in self.buffer_names), buffers, strict=True))
        if hparams is not None:
            mapping.update(zip(("hparams." + n for n in self.hparam_names), hparams, strict=True))
        out = functional_call(self._bound, mapping, (loss_fn, batch), strict=False)
        return self._check_scalar(out, loss_fn)

    @staticmethod
    def _check_scalar(out: Any, loss_fn: LossFn) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"loss functions must return a scalar Tensor; {getattr(loss_fn, '__name__', loss_fn)}"
                f" returned {shape}"
            )
        return out


# ----------------------------------------------------------------------------- tensor tuples


def clone_all(ts: Sequence[Tensor]) -> Tensors:
    return tuple(t.detach().clone() for t in ts)


def zeros_like_all(ts: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) for t in ts)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-dim tensor (no host synchronisation)."""
    if not a:
        return torch.zeros(())
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]).sum()


def norm(a: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``a`` (0-dim tensor)."""
    if not a:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(a))))


def all_finite(*groups: Sequence[Tensor] | Tensor) -> bool:
    """True when every tensor given is finite. One host synchronisation."""
    parts: list[Tensor] = []
    for g in groups:
        if isinstance(g, Tensor):
            parts.append(g.detach().reshape(-1).sum().reshape(1))
        elif len(g):
            parts.append(torch.stack(torch._foreach_norm([t.detach() for t in g])).sum().reshape(1))
    if not parts:
        return True
    dev = parts[0].device
    return bool(torch.isfinite(torch.cat([p.to(dev, torch.float64) for p in parts]).sum()))


def grads_or_zeros(
    out: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_out: Tensor | Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensors:
    """``torch.autograd.grad`` with unused inputs given zero gradients instead of ``None``."""
    if not inputs:
        return ()
    gs = torch.autograd.grad(
        out,
        list(inputs),
        grad_out,
        allow_unused=True,
        create_graph=create_graph,
        retain_graph=retain_graph,
        materialize_grads=True,
    )
    return tuple(gs)


# ----------------------------------------------------------------------------- batches


def iter_tensors(batch: Any) -> Iterator[Tensor]:
    """Every tensor inside a batch made of tensors, tuples, lists and dicts."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from iter_tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from iter_tensors(v)


def check_batch(batch: Any, what: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a clear error for a missing batch or one on the wrong device / of the wrong dtype."""
    if batch is None:
        raise ValueError(f"{what} is required but was not given (None)")
    for t in iter_tensors(batch):
        if t.device != device:
            raise ValueError(
                f"{what} holds a tensor on device {t.device}, but the model's parameters are on "
                f"{device}; move the batch with .to({str(device)!r})"
            )
        if t.is_floating_point() and t.dtype != dtype:
            raise ValueError(
                f"{what} holds a {t.dtype} tensor, but the model's parameters are {dtype}; "
                f"convert the batch with .to({dtype})"
            )
