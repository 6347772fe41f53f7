"""Looking through the wrappers a user's model may come in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile(module)`` returns."""
    inner = getattr(model, "_orig_mod", None)
    return type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module)


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module it wraps through ``DistributedDataParallel`` /
    ``DataParallel`` / ``torch.compile`` (in any order), the bare module last."""
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = getattr(model, "_orig_mod")  # noqa: B009 - (typed Module | Tensor otherwise)
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under any wrappers (see :func:`wrappers`): the one whose parameter names the
    hyperparameters use, and on which hypergradients run (compiled graphs have no double
    backward; a data-parallel wrapper's reducer is not used by ``torch.autograd.grad``)."""
    *_, bare = wrappers(model)
    return bare


@contextlib.contextmanager
def compiled_run_eagerly() -> Iterator[None]:
    """Inside, every ``torch.compile`` directive is ignored (``torch.compiler.set_stance(
    "force_eager")``; nothing on a torch without it): for the hypergradient paths, which
    differentiate twice, and compiled graphs have no double backward. :func:`unwrap_model` takes
    off a compiled wrapper of the whole model; this covers what it cannot reach: a compiled
    submodule, a compiled loss (``train_loss = torch.compile(train_loss)``), a compiled function
    the forward calls. Without it they raised "torch.compile with aot_autograd does not currently
    support double backward" or "... compiled with non-empty donated buffers which requires
    create_graph=False", or (Unrolled, a compiled loss) gave a hypergradient of exactly 0."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # (torch >= 2.6)
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield


def bare_state_dict(state: dict[str, Any], bare: nn.Module) -> dict[str, Any]:
    """``state`` (a model's ``state_dict``) with the key prefixes that wrappers add (``module.``
    of ``DistributedDataParallel`` / ``DataParallel``, ``_orig_mod.`` of ``torch.compile``)
    taken off, when that makes its keys those of ``bare``; else ``state`` as it is (its load
    then names the keys that differ)."""
    mine = set(bare.state_dict().keys())
    keys = list(state)
    if set(keys) == mine:
        return state
    while keys:
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        keys = [k[len(prefix) :] for k in keys]
        if set(keys) == mine:
            return dict(zip(keys, state.values(), strict=True))
    return state


# ----------------------------------------------------------------------------- DistributedDataParallel


def ddp_wrappers(model: nn.Module) -> list[nn.parallel.DistributedDataParallel]:
    """The ``DistributedDataParallel`` wrappers around ``model`` (see :func:`wrappers`), outermost first."""
    return [w for w in wrappers(model) if isinstance(w, nn.parallel.DistributedDataParallel)]


def joined(model: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` wrapper of ``model`` is in join mode, set by its
    ``join()`` (``torch.distributed.algorithms.Join``, for ranks with unequal numbers of batches)
    and left on by torch after the block until ``join(enable=False)``: a rank that runs out
    shadows the wrapper's own collectives only, not the averages hypergrad makes."""
    return any(getattr(getattr(d, "_join_config", None), "enable", False) for d in ddp_wrappers(model))


def not_syncing(model: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` wrapper of ``model`` has its gradient averaging
    turned off, as inside the user's ``with model.no_sync():`` (gradient accumulation)."""
    return any(not getattr(d, "require_backward_grad_sync", True) for d in ddp_wrappers(model))


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's module buffers now, as each ``DistributedDataParallel`` wrapper of
    ``model`` with ``broadcast_buffers=True`` is about to do at the start of its forward: so that a
    snapshot taken before the forward (the pre-forward buffers Unrolled replays a step from) holds
    the values the forward reads on every rank, not this rank's own (a buffer updated by each
    rank's shard, read in training mode). The wrapper's own broadcast then changes nothing."""
    if broadcasts_buffers(model):
        for ddp in ddp_wrappers(model):
            if ddp._check_sync_bufs_pre_fwd():
                ddp._sync_buffers()


def broadcasts_buffers(model: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` wrapper of ``model`` broadcasts rank 0's module
    buffers at the start of its forward (``broadcast_buffers=True``, the default, and buffers)."""
    return any(getattr(d, "_check_sync_bufs_pre_fwd", lambda: False)() for d in ddp_wrappers(model))


def distributed_world() -> int:
    """The size of the default ``torch.distributed`` process group (1 when none is initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Inside, no ``DistributedDataParallel`` wrapper of ``model`` averages gradients in its
    backward passes (each one's ``no_sync()``): for a step that runs several backward passes
    (Delta-STN's base and response passes), or one whose loss reaches a weight outside the
    wrapper's forward (a penalty on a branch unused in that forward, which the reducer refuses
    under ``find_unused_parameters=True`` as "Expected to mark a variable ready only once").
    The caller averages the gradients itself (:func:`average_gradients`). A model without such
    a wrapper: nothing happens."""
    with contextlib.ExitStack() as stack:
        for ddp in ddp_wrappers(model):
            stack.enter_context(ddp.no_sync())
        yield


def average_gradients(weights: Sequence[Tensor], group: Any, size: int) -> None:
    """Replace each weight's ``.grad`` by its mean over the ``size`` ranks of ``group``, as
    ``DistributedDataParallel``'s reducer would (one all-reduce per dtype).

    A weight whose ``.grad`` is ``None`` on every rank keeps ``None`` (``torch.optim`` skips
    it, as it would in one process); one with a gradient on some ranks only gets the mean with
    zeros for the others (the reducer's ``find_unused_parameters=True`` rule: the gradient of the
    mean loss over the concatenated shards). Every rank must call it with the same weights, in
    the same order. With ``size == 1``: nothing happens.
    """
    if size <= 1 or not weights:
        return
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(weights):
        if w.grad is not None and w.grad.is_sparse:
            raise ValueError("average_gradients: sparse gradients are not supported")
        by_dtype.setdefault(w.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        grads = [weights[i].grad for i in idx]
        device = weights[idx[0]].device
        parts = [
            weights[i].new_zeros(weights[i].numel()) if g is None else g.detach().reshape(-1)
            for i, g in zip(idx, grads, strict=True)
        ]
        parts.append(torch.tensor([g is not None for g in grads], dtype=dtype, device=device))
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat, group=group)
        mask = flat[-len(idx) :]
        flat = flat[: -len(idx)].div_(size)
        offset = 0
        for i, seen in zip(idx, mask.tolist(), strict=True):
            w = weights[i]
            n = w.numel()
            w.grad = flat[offset : offset + n].view_as(w).clone() if seen > 0 else None
            offset += n


def replicate(module: nn.Module, group: Any, size: int) -> None:
    """Make ``module`` (the hyperparameters) the same on the ``size`` ranks of ``group``, as
    ``DistributedDataParallel`` does for the model at construction: check that every rank holds
    the same parameter and buffer names, shapes and dtypes, then broadcast the values of the
    group's first rank. A collective: every rank must call it.

    Raises:
        ValueError: the ranks hold different tensors (their names, shapes or dtypes differ): the
            averaged hypergradients would be added up entry by entry across unrelated tensors.
    """
    if size <= 1:
        return
    tensors = [*module.named_parameters(), *module.named_buffers()]
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors]
    every: list[Any] = [None] * size
    torch.distributed.all_gather_object(every, mine, group=group)
    for r, theirs in enumerate(every):
        if theirs != mine:
            diff = next(
                (f"{a} here, {b} on rank {r}" for a, b in zip(mine, theirs, strict=False) if a != b),
                f"{len(mine)} tensors here, {len(theirs)} on rank {r}",
            )
            raise ValueError(
                "the ranks of the DistributedDataParallel model hold different hyperparameters "
                f"(name, shape, dtype: {diff}); build the same hparams on every rank"
            )
    src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for _, t in tensors:
            torch.distributed.broadcast(t.data, src=src, group=group)


def rank0_buffers(model: nn.Module, buffers: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``buffers`` (the bare module's), with copies of rank 0's values in place of those a
    ``DistributedDataParallel`` wrapper of ``model`` broadcasts at the start of its forward
    (``broadcast_buffers=True``): the values every rank's next training forward reads. The real
    buffers are left alone. A collective where there is such a wrapper: every rank must call it."""
    out = list(buffers)
    for ddp in ddp_wrappers(model):
        if not getattr(ddp, "_check_sync_bufs_pre_fwd", lambda: False)():
            continue
        synced = {id(b) for b in ddp.modules_buffers}
        group = ddp.process_group
        src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
        for i, b in enumerate(out):
            if id(b) in synced:
                copy = b.detach().clone()
                torch.distributed.broadcast(copy, src=src, group=group)
                out[i] = copy
    return tuple(out)
