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
import contextlib
import dataclasses
import enum
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._base import (
    DisconnectedWarning,
    HyperOptimizer,
    OnNonFinite,
    _Hypergradient,
    _put_settings_back,
    _warn_user,
)
from ._checkpointed import checkpointed_hypergradient
from ._functional import (
    _attributes_kept,
    _buffer_slots,
    _count_fused_step,
    _plain_attributes,
    _settings_at,
    check_batch,
    clip_by_total_norm,
    clone_all,
    clone_batch,
    collecting_gradient_hooks,
    dual_level,
    exact_padding_rows,
    fused_steps_taken,
    grads_or_none,
    iter_tensors,
    materialize,
    refusing_once_differentiable,
    registrations,
    write_count,
)
from ._inner import State, group_settings, snapshot_state, state_defaults, update_exactly, update_for
from ._solvers import _autograd_on, _tensor_list
from ._types import Batch, LossFn, Tensors
from ._wrap import broadcasts_buffers, ddp_wrappers, sync_buffers
from .hparams import (
    WeightDecay,
    _constant_coefficients,
    _penalised_weights_known,
    _reusing_values,
    _with_decay_graph,
)

_Call = tuple[Tensor, list[Tensor], list[Tensor]]  # (probe, weights, decays) of one penalty call

#: above this many hyperparameter entries forward mode (one replay per entry) is warned about
_FORWARD_ENTRIES = 1024

#: how often (in hypersteps) the replay is compared with the real weights (_check_reproduced)
_CHECK_EVERY = 16
#: the fraction of the weights' entries that may end off the real weights in a replay (see
#: ``Unrolled._check_reproduced``)
_NOISE_FRACTION = 0.01


def _load_forward_ad() -> None:
    """Load torch's forward-AD decompositions once, without passing on the ``torch.jit.script``
    deprecation warning torch 2.13 emits while doing so (nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning
        )
        with dual_level():
            fwAD.make_dual(torch.zeros(1), torch.zeros(1))


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
    carrying a tangent :math:`dw/d\lambda_j` along with the weights, memory independent of K;
    each call starts from the same state of torch's RNG (what ``outer`` draws, e.g. dropout
    masks, is the same in every call, as in reverse mode's one), and the RNG is left where one
    call leaves it.

    Args:
        outer: ``outer(hparams) -> scalar``; must use autograd-differentiable operations
            (``torch.autograd.grad(..., create_graph=True)`` inside is fine in both modes).
        hparams: the hyperparameter tensors (leaves requiring grad, for reverse mode).
        mode: ``"reverse"`` or ``"forward"`` (default: ``"reverse"``).

    Returns:
        ``(hypergradient shaped like hparams, outer value detached)``.

    ``outer`` runs with autograd on, also under ``torch.no_grad()`` (as in
    ``torch.autograd.functional``).

    Raises:
        RuntimeError: called under ``torch.inference_mode()``.
        TypeError: ``hparams`` is not a collection of tensors (a bare tensor iterates over its
            rows: wrap it, ``[lam]``), or ``outer`` returned something else than a tensor.
        ValueError: ``mode`` is neither ``"reverse"`` nor ``"forward"``; a hyperparameter that
            is not floating point, does not require grad (reverse mode: its hypergradient would
            be 0 whatever ``outer`` does), or is listed twice; ``outer`` returned a tensor with
            more than one element, or a complex one.

    Forward mode pushes the tangents through the tensors ``outer`` is *given*: a hyperparameter
    that ``outer`` reads from its closure instead of from ``hparams`` has no tangent there (its
    hypergradient is 0 in forward mode, not in reverse mode). Those tensors do not require grad
    there (no reverse-mode graph is kept): an inner loop that differentiates with respect to one
    of them (a MAML initialisation, ``w = h[0]``) calls ``h[0].requires_grad_()`` first.

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
    if mode not in tuple(Mode):  # (a str Enum member equals its value)
        raise ValueError(f"mode must be 'reverse' or 'forward', got {mode!r}")
    mode = Mode(mode)
    hparams = _tensor_list(hparams, "hparams")
    _check_hparams(hparams, mode)
    with _autograd_on("unrolled_hypergradient"):
        if mode is Mode.REVERSE:
            out = outer(hparams)
            _check_outer_value(out)
            gs = grads_or_none(out, hparams)
            _warn_unreached([g is not None for g in gs], mode)
            return materialize(gs, hparams), out.detach()
        _load_forward_ad()
        with _naming_missing_forward_derivatives():
            grads, value, reached = _forward(outer, hparams)
        _warn_unreached(reached, mode)
        return grads, value


def _warn_unreached(reached: Sequence[bool], mode: Mode) -> None:
    """A :class:`~hypergrad.DisconnectedWarning` naming each hyperparameter from which no
    derivative reaches ``outer``'s value (its hypergradient is then exactly 0), as the
    hyperoptimisers warn: an inner loop that steps a real ``torch.optim`` optimiser (in place,
    under ``no_grad``: no graph), or reads a hyperparameter as a Python number, returned 0 with
    no sign of why (a higher-style loop translated with torch.optim's SGD: 0 for 0.77)."""
    missing = [i for i, ok in enumerate(reached) if not ok]
    if not missing:
        return
    how = "gradient path" if mode is Mode.REVERSE else "forward-mode tangent"
    _warn_user(
        f"hparams{missing[:5]} do not reach outer's value: no {how} leads from them to it, so their "
        "hypergradient is exactly 0. Does outer step a torch.optim optimiser (its in-place steps "
        "carry no graph: write the update out, w = w - lr * g with g from "
        "torch.autograd.grad(..., create_graph=True)), read a hyperparameter as a Python number "
        "(float(), .item()), or detach the weights?",
        DisconnectedWarning,
    )


def _check_hparams(hparams: list[Any], mode: Mode) -> None:
    """The hyperparameters of :func:`unrolled_hypergradient`: floating-point tensors, each listed
    once, requiring grad in reverse mode. (Reverse mode returned zeros for one that did not
    require grad, whatever its true hypergradient; a tensor listed twice got the whole
    derivative in both entries in reverse mode and a partial one in forward mode.)"""
    seen: dict[int, int] = {}
    for i, h in enumerate(hparams):
        if not isinstance(h, Tensor):
            raise TypeError(f"hparams[{i}] must be a tensor, got {type(h).__name__}")
        if not (h.is_floating_point() or h.is_complex()):
            raise ValueError(f"hparams[{i}] is {h.dtype}: a hypergradient needs floating-point tensors")
        if mode is Mode.REVERSE and not h.requires_grad:
            raise ValueError(
                f"hparams[{i}] does not require grad: reverse mode differentiates outer's value with "
                "respect to it (its hypergradient would be 0); call .requires_grad_() on it, or use "
                "mode='forward'"
            )
        j = seen.setdefault(id(h), i)
        if j != i:
            raise ValueError(f"hparams[{i}] is the same tensor as hparams[{j}]: list each tensor once")


def _check_outer_value(out: object) -> None:
    """``outer`` must return a real tensor with one element (host metadata only)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"outer must return a scalar tensor (the validation loss), got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"outer must return a scalar tensor (the validation loss), got shape {tuple(out.shape)}"
        )
    if out.is_complex():
        raise ValueError(f"outer must return a real scalar tensor, got {out.dtype}")


def _forward(
    outer: Callable[[Sequence[Tensor]], Tensor], hparams: list[Tensor]
) -> tuple[Tensors, Tensor, list[bool]]:
    """:func:`unrolled_hypergradient` in forward mode: one pass per hyperparameter entry; also
    whether any tangent of each hyperparameter reached the value."""
    # entries in row-major order, also of a non-contiguous hyperparameter (a transposed
    # parameter: ``.view(-1)`` of its own layout failed)
    grads = [torch.zeros_like(h, memory_format=torch.contiguous_format) for h in hparams]
    reached = [h.numel() == 0 for h in hparams]  # (an empty one has nothing to miss)
    value: Tensor | None = None
    base = [h.detach() for h in hparams]
    # each pass draws what reverse mode's one call draws (dropout), and leaves torch's RNG there
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    # a complex entry takes two passes, along its real and its imaginary axis, for the gradient
    # reverse mode gives, dL/dRe + i dL/dIm (one pass along 1 gave dL/dRe alone: the imaginary
    # part of every complex hyperparameter's hypergradient came out 0, silently)
    for i, h in enumerate(base):
        units: tuple[complex, ...] = (1, 1j) if h.is_complex() else (1,)
        for j, unit in ((j, u) for j in range(h.numel()) for u in units):
            with dual_level():
                tangent = torch.zeros_like(h, memory_format=torch.contiguous_format)
                tangent.view(-1)[j] = unit  # type: ignore[assignment]
                # copies: an in-place operation of outer on what it is given (h[0].clamp_(min=0))
                # changed the caller's hyperparameter, and the start of every later pass
                duals = [
                    fwAD.make_dual(b.clone(), tangent) if k == i else b.clone() for k, b in enumerate(base)
                ]
                torch.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)
                try:
                    out = outer(duals)
                except RuntimeError as e:
                    if "does not require grad and does not have a grad_fn" not in str(e):
                        raise
                    raise RuntimeError(
                        f"{e} (mode='forward' gives outer hyperparameters that do not require grad, "
                        "so that no reverse-mode graph is kept: an inner loop that differentiates "
                        "with respect to one of them, e.g. a MAML initialisation w = h[0], needs "
                        "w = h[0].requires_grad_() there first)"
                    ) from e
                _check_outer_value(out)
                primal, tan = fwAD.unpack_dual(out)
                if tan is not None:
                    part = tan.detach().reshape(())  # (outer may return shape (1,))
                    grads[i].view(-1)[j] += part if unit == 1 else part * 1j
                reached[i] = reached[i] or tan is not None
                value = primal.detach()
    if value is None:  # no hyperparameter entries at all
        out = outer([b.clone() for b in base])
        _check_outer_value(out)
        value = out.detach()
    return tuple(grads), value, reached


@contextlib.contextmanager
def _naming_missing_forward_derivatives() -> Iterator[None]:
    """Re-raise PyTorch's refusal of forward-mode AD through an operation (one without a forward
    derivative, or an ``out=`` operation fed a dual number, as in the power iteration of
    ``nn.utils.parametrizations.spectral_norm``, which forward-mode AD follows even under
    ``torch.no_grad()``) as an error that says which mode needed it and what to do instead."""
    try:
        yield
    except RuntimeError as e:  # (NotImplementedError is one)
        msg = str(e)
        if "forward AD" not in msg and "forward-mode AD" not in msg and "forward mode AD" not in msg:
            raise
        raise RuntimeError(
            "mode='forward' carries forward-mode tangents through every unrolled step (with "
            "Unrolled: the training loss, its gradient and the optimiser update) and the validation "
            "loss, but "
            f"PyTorch cannot push one through an operation they use ({msg.splitlines()[0]}). Use "
            "mode='reverse' (same hypergradient), or write that operation without it"
        ) from e


@contextlib.contextmanager
def _naming_missing_second_derivatives() -> Iterator[None]:
    """Re-raise PyTorch's "the derivative for X is not implemented" (an operation without a double
    backward, met when the replay's training gradients are differentiated) as an error that says
    what needed it and what to do (it came out as torch's bare NotImplementedError)."""
    try:
        yield
    except RuntimeError as e:  # (NotImplementedError is one)
        msg = str(e)
        if "derivative for" not in msg or "not implemented" not in msg:
            raise
        raise RuntimeError(
            "Unrolled backpropagates through every replayed step, whose update holds the gradient of "
            "the training loss, so it differentiates the training loss twice; PyTorch has no second "
            f"derivative for an operation it uses ({msg.splitlines()[0]}). Write that step of the "
            "loss with twice-differentiable operations (e.g. nn.EmbeddingBag as nn.Embedding "
            "followed by a sum or mean; torch.pdist or torch.cdist(p != 2) from differences and "
            "torch.linalg.vector_norm), or freeze the weights before it (requires_grad_(False))"
        ) from e


def _same_entry(before: Any, after: Any) -> bool:
    """Whether an optimiser state entry (a :meth:`Unrolled._state_signature` item) is unchanged:
    the same tensor, not written since, or another tensor of the same values (a reload), or the
    same number."""
    if isinstance(before, str) or isinstance(after, str):
        return before == after
    (b, b_version), (a, a_version) = before, after
    if a is b:
        return a_version == b_version  # (written in place: its old values are gone)
    same_kind = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    return same_kind and b._version == b_version and bool(torch.equal(a, b))


class _ScaleCotangent(torch.autograd.Function):
    """The identity, whose backward pass multiplies the cotangent by ``factor``."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, factor: Tensor) -> Tensor:
        ctx.factor = factor  # (a 0-dim tensor: no host synchronisation to read a loss scale)
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, ct: Tensor) -> tuple[Tensor, None]:
        return ct * ctx.factor.to(ct.device), None


def _cotangent_scaled(ts: Sequence[Any], factor: Tensor) -> list[Any]:
    """``ts`` with the cotangents reaching them (from what is computed from them) times ``factor``
    (tensors that need no gradient, and non-tensors, as they are)."""
    return [_ScaleCotangent.apply(t, factor) if isinstance(t, Tensor) and t.requires_grad else t for t in ts]


class ReplayWarning(UserWarning):
    """:class:`Unrolled` cannot replay the real steps exactly (hooks it cannot see, or weights
    changed outside ``step()``)."""


@dataclasses.dataclass
class _Anchor:
    """A full snapshot before one recorded step: where a replay can start."""

    weights: Tensors
    buffers: Tensors
    states: list[State]
    hparams: Tensors  # the hyperparameters every step from here to the next anchor used

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class _Record:
    """One recorded inner step: its batch and what replaying it needs, all by value; every few
    steps also a full snapshot (an anchor)."""

    batch: Batch
    groups: list[dict[str, Any]]
    has_grad: tuple[bool, ...] = ()  # which weights the loss reached (torch.optim skips the others)
    rng: dict[str, Tensor] | None = None  # the RNG state before the loss (dropout masks)
    anchor: _Anchor | None = None
    #: the hyperparameters this step and the next ones (to the next anchor or copy) used, where
    #: they changed since the newest anchor without a full snapshot here (a hyperstep between two
    #: anchors): a copy of the hyperparameters only; None where they did not change
    hparams: Tensors | None = None
    #: ``training`` of every module of the model and the hyperparameters when the step began (a
    #: hyperstep may come while the user has the model in eval mode); () replays in the current mode
    training: tuple[bool, ...] = ()
    max_grad_norm: float | None = None  # the step's gradient clipping (clip_grad_norm_'s max_norm)
    #: the scale of the step's ``GradScaler`` (0-dim float32), None without one: the replay
    #: differentiates the loss scaled alike and unscales, as the real step did
    grad_scale: Tensor | None = None
    #: ``torch.autocast`` during the step on the model's device type, ``(enabled, dtype)``; None
    #: replays in the autocast state of the hyperstep
    autocast: tuple[bool, torch.dtype] | None = None
    #: per weight, the entries of its optimiser state changed outside ``step()`` since the
    #: previous step (``optimizer.state.clear()``, ``load_state_dict``, an in-place reset of a
    #: moment), as they were before this step (constants, for the replay), and the names of the
    #: entries that stayed (carried on from the replayed previous step); None for a weight whose
    #: state did not change, and for the whole record where none did
    states: list[tuple[State, tuple[str, ...]] | None] | None = None
    #: the hyperparameter module's buffers before the step's forward pass (a learned augmentation
    #: network's running statistics), by value: the replay starts each step from them
    hparam_buffers: Tensors = ()
    #: the model's plain tensor attributes before the step's forward pass (state a module keeps
    #: outside its parameters and buffers, e.g. a language model's hidden state carried from batch
    #: to batch), by value, as ``(module index, name, value)`` (:func:`_plain_attributes`)
    attributes: tuple[tuple[int, str, Any], ...] = ()
    #: the modules' plain settings before the step's forward pass (numbers, bools, strings: a
    #: dropout rate a schedule sets, a temperature, a call counter), ``(module index, name,
    #: value)``: the replay runs the step with them
    settings: tuple[tuple[int, str, Any], ...] = ()
    #: the model's buffers before the step's forward pass, by value, where a
    #: ``DistributedDataParallel`` wrapper broadcasts rank 0's buffers at each forward: the replay
    #: starts the step from them (chained from the previous replayed step, the other ranks'
    #: buffers followed their own shards, not what their forward read); None elsewhere
    buffers: Tensors | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["anchor"] = None if self.anchor is None else self.anchor.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Record:
        d = dict(d)
        if d.get("anchor") is not None:
            d["anchor"] = _Anchor(**d["anchor"])
        return cls(**d)


def _reorder(saved: Any, here: Sequence[str]) -> list[int] | None:
    """Where each of ``here``'s names is in ``saved``, when a saved run listed the same names in
    another order (a model or a ``ModuleDict`` of hyperparameters built with its entries in
    another order: ``load_state_dict`` loads both by name, but a record holds its tensors by
    position); ``None`` when the order is the same, or the names are not the same ones (states
    saved before the names were kept; other weights trained: refused by the shape check)."""
    if saved is None:
        return None
    saved, here = list(saved), list(here)
    if saved == here or len(set(saved)) != len(saved) or sorted(saved) != sorted(here):
        return None
    at = {n: i for i, n in enumerate(saved)}
    return [at[n] for n in here]


def _records_in_order(
    records: list[dict[str, Any]], orders: dict[str, list[int] | None]
) -> list[dict[str, Any]]:
    """Saved records (``_Record.to_dict``) with their per-weight, per-hyperparameter, per-buffer
    and per-module entries put in this run's order (``orders``: :func:`_reorder` of the
    ``"weights"``, ``"hparams"``, ``"buffers"``, ``"hparam_buffers"``, ``"modules"`` (the
    ``training`` flags) and ``"state_modules"`` (the module indices of the plain attributes and
    settings)); new
    dicts, the given ones are left as they are."""
    if all(o is None for o in orders.values()):
        return records

    def pick(seq: Any, kind: str) -> Any:
        order = orders.get(kind)
        if order is None or seq is None or len(seq) != len(order):
            return seq
        out = [seq[i] for i in order]
        return tuple(out) if isinstance(seq, tuple) else out

    state_modules = orders.get("state_modules")
    moved = None if state_modules is None else {was: now for now, was in enumerate(state_modules)}
    out = []
    for r in records:
        r = dict(r)
        r["has_grad"] = pick(r.get("has_grad"), "weights")
        r["states"] = pick(r.get("states"), "weights")
        r["hparams"] = pick(r.get("hparams"), "hparams")
        r["buffers"] = pick(r.get("buffers"), "buffers")
        r["hparam_buffers"] = pick(r.get("hparam_buffers"), "hparam_buffers")
        r["training"] = pick(r.get("training"), "modules")
        for key in ("attributes", "settings"):  # (module index, name, value)
            if moved is not None and r.get(key):
                r[key] = tuple((moved.get(i, i), k, v) for i, k, v in r[key])
        if r.get("anchor") is not None:
            a = dict(r["anchor"])
            a["weights"] = pick(a["weights"], "weights")
            a["states"] = pick(a["states"], "weights")
            a["hparams"] = pick(a["hparams"], "hparams")
            a["buffers"] = pick(a["buffers"], "buffers")
            r["anchor"] = a
        out.append(r)
    return out


def _check_steps(steps: object) -> int:
    """``steps`` (Unrolled's K) as an int if it is an integer >= 1 (a NumPy integer too, as a
    sweep over ``np.arange`` hands it: refused with "need an int" before); else a ValueError
    naming it."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"Invalid Unrolled steps: {steps!r} (need an int >= 1)")
    return int(steps)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype] | None:
    """``(enabled, dtype)`` of ``torch.autocast`` for ``device_type`` now (None where it has none)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _clone_settings(group: dict[str, Any]) -> dict[str, Any]:
    """Param-group settings by value (a scheduler may update a tensor learning rate in place)."""
    return {k: clone_batch(v) for k, v in group_settings(group).items()}


def _step_replaced(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` was replaced on the instance (``opt.step = projected_step``, a
    wrapper that clamps the weights or edits the gradients), so that the real steps run more than
    the class's step that the replay reproduces. An LR scheduler's own wrapper, which only counts
    the calls (``_wrapped_by_lr_sched``), is looked through. One dictionary lookup per step."""
    step = optimizer.__dict__.get("step")
    if step is None:
        return False
    if getattr(step, "_wrapped_by_lr_sched", False):
        step = getattr(step, "__wrapped__", step)
    return getattr(step, "__func__", step) is not type(optimizer).step


def _data_ptr(t: Tensor) -> tuple[int, int]:
    """The storage ``t`` is a view of (its ``StorageImpl``) and its offset there, or ``(0, 0)``
    where it has none (an uninitialised lazy parameter, a sparse or storage-less tensor): what
    tells a storage replaced through ``t.data = ...`` apart. Not ``t.data_ptr()``: a storage moved
    into shared memory (``model.share_memory()`` for worker processes) or freed and re-allocated
    in place (``untyped_storage().resize_``) keeps its values and its tensors, but gets another
    address, and the episode was ended with a ReplayWarning that named a re-initialisation."""
    try:
        return int(t.untyped_storage()._cdata), int(t.storage_offset())
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        return 0, 0


def _groups_of(members: Sequence[Sequence[int]]) -> dict[int, int]:
    """Per trained weight (by index), the param group holding it."""
    return {k: gi for gi, ks in enumerate(members) for k in ks}


class Unrolled(HyperOptimizer):
    r"""Hypergradients by differentiating through the last ``steps`` inner optimiser steps.

    Each :meth:`step` is an ordinary ``torch.optim`` step; it also records, by value, its batch,
    the RNG state, which weights got a gradient, the param-group settings, and a detached copy of
    the weights, buffers and optimiser state *before* it (a ring of ``steps`` records).
    :meth:`hyper_step` replays those steps with a differentiable copy of the optimiser (same
    arithmetic as ``torch.optim``: SGD with momentum/dampening/Nesterov/weight decay, Adam, AdamW,
    AMSGrad, RMSprop (centred, with momentum), Adagrad, Adamax, NAdam and RAdam (with
    ``decoupled_weight_decay``), Adadelta, ASGD, Rprop, each with ``maximize``, its weight decay
    and param groups of their own, on real or complex weights; no NaNs at zero second moments;
    ``fused``, ``capturable`` and ``differentiable`` are refused, and so is ``foreach=True`` for
    NAdam, RAdam and ASGD, whose multi-tensor kernels round otherwise) and differentiates the
    validation loss at the end.
    The replay reproduces the real steps: later in-place changes to a batch or a tensor learning
    rate do not reach it, dropout draws the same masks (and in forward mode ``val_loss``
    draws the same ones in the pass of every hyperparameter entry, as reverse mode's one call
    does, and starts from the train/eval modes and plain attributes the hyperstep began with,
    whatever the previous entry's call left, so both modes give one hypergradient), each step
    runs in the train/eval modes its modules had when it began (whatever mode the model is in
    at the hyperstep, which is the mode ``val_loss`` runs in, and whatever modes ``train_loss``
    left them in) and in its ``torch.autocast`` state (forward mode refuses autocast:
    forward-mode AD does not follow its casts), weights without a gradient are skipped as
    ``torch.optim`` skips them, and gradient clipping given to
    ``step(batch, max_grad_norm=...)`` is replayed (and differentiated). Param-group settings
    are recorded by value: one carrying an autograd graph (a ``LambdaLR`` whose lambda returns a
    hyperparameter) passes no hypergradient, and a :class:`ReplayWarning` says so (tune it with
    :class:`~hypergrad.hparams.LearningRate` instead). It cannot see
    optimiser hooks or gradient hooks (e.g. clipping in a step pre-hook): a
    :class:`ReplayWarning` says so. Nor can it replay randomness drawn inside ``train_loss``
    from anything but torch's global RNG (a ``torch.Generator`` of your own, Python's or
    NumPy's RNG), a loss reading state that changes between steps, or weights edited
    through ``.data``: when the replayed steps, run with the hyperparameters they were taken
    with, end away from the real weights (beyond rounding), the hyperstep warns
    (:class:`ReplayWarning`). The replay uses the current hyperparameters for all steps; the
    weights are not changed. Buffers (BatchNorm's running statistics) are constants of the
    hypergradient: a ``val_loss`` in eval mode uses the real running statistics but not their
    dependence on the hyperparameters through the window's steps (nor do higher and torchopt).
    State a model keeps between forward passes in plain attributes of its modules (a language
    model's hidden state, ``self.hidden = (h.detach(), c.detach())``: public names holding a
    tensor, a tuple or list of tensors, or ``None``) is recorded by value with each step, as
    buffers are: each replayed step starts from the value its real step started from, and the
    hyperstep leaves the real attributes as they were (the validation loss too runs on the
    current ones and its changes are undone). A detached hidden state is a constant of the
    hypergradient, as it is of the real gradients (truncated BPTT). ``train_loss`` itself runs
    again in the hyperstep, once per replayed step (twice with ``checkpoint=True``, the second
    time from the window's last step back to its first; once per step and hyperparameter
    entry in forward mode): a loss that hands state on through a closure of its own (the hidden
    state for the next batch) has it overwritten there; keep such state on the model.
    ``train_loss`` returns the loss with its graph and leaves the backward pass to :meth:`step`:
    one that runs its own (``loss.backward()`` per micro-batch, accumulating gradients, and a
    detached total returned) trains, but has nothing to differentiate, and the hyperstep refuses
    it; return the mean of the micro-batches' losses instead (a batch may be a list of them).
    Values the model or the losses compute with ``.detach()`` are constants in both modes, and
    so are those computed under ``torch.no_grad()`` in reverse mode (autograd records nothing
    there), while forward mode follows them (PyTorch's forward AD ignores ``no_grad``). Where
    such a value depends on the weights (a scale computed under ``no_grad``) the two modes
    differ, and forward mode's is the derivative of the real training that finite differences
    see (an activation scale computed under ``no_grad`` in a 2-layer MLP: reverse -8.0e-3,
    forward and finite differences 1.4e-2); write the value with ``.detach()`` for reverse
    mode's answer in both. An operation forward-mode AD cannot follow (e.g. the in-place power
    iteration of ``parametrizations.spectral_norm``, run under ``no_grad``) raises an error that
    names it: use ``mode="reverse"`` there.
    Settings of the inner optimiser can be hyperparameters themselves
    (:class:`~hypergrad.hparams.LearningRate`, :class:`~hypergrad.hparams.Momentum`).

    Episodes: the ring only ever holds steps taken from the current weights' history. Weights
    changed outside :meth:`step` (re-initialised for a new episode, loaded, averaged, put back
    with ``vector_to_parameters`` or ``p.data = ...``: detected through tensors' version counters
    and storage, so not an in-place write through ``p.data``) end the episode with a
    :class:`ReplayWarning` and an empty ring; call :meth:`start_episode` after such a change to
    say it is intended (no warning). Changing which weights train (``add_param_group``,
    freezing) also starts a new episode (no warning: progressive unfreezing is routine; the
    hyperstep's ``unrolled_steps`` counts the steps since, and a hyperstep before the next step
    says why it has none), and so does replacing the inner optimiser
    (``hopt.inner_optimizer = torch.optim.SGD(...)``, a fresh one per episode) or regrouping its
    weights: a :class:`ReplayWarning` where steps were recorded since :meth:`start_episode`; an
    :class:`~hypergrad.hparams.OptimizerSetting` built for the replaced optimiser is refused
    (it would tune the replay only). Replacing the training loss between steps
    (``hopt.train_loss = ...``, a curriculum's next stage) starts a new episode too, with a
    :class:`ReplayWarning` where steps were recorded: a replay runs each step with the loss it was
    taken with. The inner optimiser's state changed between two steps
    (``inner_optimizer.state.clear()`` to restart Adam's moments, ``load_state_dict``, a
    momentum buffer zeroed in place: detected through the identities and version counters of
    its tensors) does not end the episode: each replayed step starts from the state its real
    step had, the changed entries as constants (the others, and entries reloaded with the values
    they had, carried on with their derivatives). An entry edited in place to values that still
    depend on the earlier steps (a momentum buffer halved, ``buf.mul_(0.5)``) is a constant too:
    its path to the hyperparameters through those steps is cut (SGD with momentum, a window of
    4 halved after its second step: 59% off the real training's derivative).
    To differentiate through a whole episode of K steps from freshly initialised weights
    (dataset distillation, meta-learning), use ``steps >= K``.

    Args:
        model, hparams, train_loss, val_loss, inner_optimizer, outer_optimizer, on_nonfinite,
            divergence: see :class:`HyperOptimizer`.
        steps: K, how many of the latest inner steps to differentiate through; may be set
            between steps (:attr:`steps`) (default: 5).
        mode: ``"reverse"`` (memory O(K·P) during the hyperstep, cost ~2–3 inner steps per unrolled
            step) or ``"forward"`` (one replay per hyperparameter entry, each step's graph freed
            before the next: memory O(P); for a few hyperparameters) (default: ``"reverse"``).
        checkpoint: reverse mode with one replayed step's graph alive at a time: the window is
            first replayed without graphs, keeping each step's inputs (K snapshots of the
            weights and optimiser state), then each step is replayed again with its graph while
            the cotangents are pulled back through it. Same hypergradient; peak memory K
            snapshots + one step's graph instead of K steps' graphs (activations included), for
            K more training gradients per hyperstep (1.2-1.6x the time in the benchmark suite).
            Buffers are constants in it (no gradient through running statistics) (default:
            False).

    Memory between hypersteps: at most 2K recorded batches and two full snapshots of the weights,
    buffers, optimiser state and hyperparameters (no graphs), taken every K steps and at the
    first change of the hyperparameters in K steps (and a copy of the optimiser state entries
    changed outside :meth:`step`, with the step after the change). When hypersteps come more
    often than every K steps (every step: overlapping windows), the steps between snapshots keep
    a copy of the hyperparameters they used instead (at most K + s copies for hypersteps every s
    steps; a few scalars for per-layer decays or learning rates, one weight-sized tensor for a
    decay per weight; a third snapshot, which irregular hypersteps can call for, becomes such a
    copy too).
    A replay starts from the latest snapshot at least K steps back and first re-runs,
    without a graph and with the hyperparameters of their time, the steps up to the window it
    differentiates; an accepted hyperstep keeps the state it re-ran to as the next window's
    snapshot, so with hypersteps every step it re-runs one step (one more gradient, no graph).
    Batches: ``hyper_step(val_batch=...)``; the training batches are the recorded ones, so
    ``train_batch`` may be passed for a uniform call but is not used.

    Raises:
        ValueError: ``steps`` not an int >= 1, an unknown ``mode``, ``checkpoint=True`` with
            ``mode="forward"``, or forward mode on a ``DistributedDataParallel`` model; at
            :meth:`hyper_step`, no ``val_batch``, no step recorded since the episode began,
            (forward mode) a call under ``torch.autocast``, a ``train_loss`` that runs its own
            backward passes (see above), or (and at :meth:`step`) an ``OptimizerSetting`` of an
            inner optimiser since replaced; at :meth:`load_state_dict`, recorded steps taken
            while other weights trained (their number, shapes or dtypes: a weight frozen in one
            run and not the other), with nothing loaded.
        TypeError: ``checkpoint`` not a bool.

    Warns:
        UserWarning: ``mode="forward"`` with more than 1,024 hyperparameter entries (one replay of
            the window per entry).

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

    _replays_rng = True

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
        checkpoint: bool = False,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        _check_steps(steps)
        if not isinstance(checkpoint, bool):
            raise TypeError(f"Unrolled checkpoint must be True or False, got {checkpoint!r}")
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
        self.steps = steps
        self._mode = Mode.REVERSE
        self._checkpoint = False
        self._configure(mode, checkpoint)
        entries = sum(h.numel() for h in self.pair.hparam_tensors)
        if self.mode is Mode.FORWARD and entries > _FORWARD_ENTRIES:
            warnings.warn(
                f"Unrolled(mode='forward') replays the window once per hyperparameter entry, and "
                f"these hyperparameters have {entries:,}: each hyperstep costs {entries:,} replays "
                "of K steps (one weight decay per weight of a small MLP took ~25 minutes). "
                "mode='reverse' gives the same hypergradient in one replay",
                UserWarning,
                stacklevel=2,
            )
        self._update = update_for(inner_optimizer)
        #: WeightDecay containers whose penalties the reverse-mode replay differentiates itself
        self._decays = [m for m in self.hparams.modules() if isinstance(m, WeightDecay)]
        self._records: collections.deque[_Record] = collections.deque()
        self._versions: tuple[tuple[int, tuple[int, int], int], ...] = ()
        self._since_anchor = 0  # records since the newest anchor
        self._since_move = 0  # records since the hyperparameters last changed (0: never)
        self._hp_versions: tuple[tuple[int, int], ...] = ()  # write counts at the newest anchor or copy
        self._hp_moved = False  # a hyperstep moved the hyperparameters since the newest anchor or copy
        #: the window's first record and its state, re-run by the hyperstep under way (:meth:`_start`)
        self._promotion: tuple[_Record, _Anchor] | None = None
        self._warned_hooks: frozenset[str] = frozenset()
        #: the inner optimiser's state after the last step (:meth:`_state_signature`); None: unknown
        self._state_seen: list[dict[str, Any]] | None = None
        #: the inner optimiser the recorded steps were taken by (:meth:`_check_optimizer`)
        self._optimizer_seen = inner_optimizer
        #: the training loss the recorded steps were taken with (:meth:`_check_train_loss`)
        self._train_loss_seen = train_loss
        #: the model's plain tensor attributes before the step under way (:func:`_plain_attributes`)
        self._attributes_before: tuple[tuple[int, str, Any], ...] = ()
        self._attributes_seen: dict[tuple[int, str], tuple[Any, Any]] = {}
        #: the modules' train/eval modes before the step under way (:meth:`_before_step`)
        self._training_before: tuple[bool, ...] | None = None
        #: why the episode last began, where the trained weights changed (for the hyperstep's error)
        self._episode_note = ""
        self._weights_changed()
        self._check_hooks()

    @property
    def steps(self) -> int:
        """K, how many of the latest inner steps a hyperstep differentiates through. It may be
        set between steps (a window that grows during training): a smaller K takes effect at
        once; a larger one as steps are recorded, since the steps dropped from the ring under
        the old K are gone (the hyperstep's ``unrolled_steps`` says how many it used).

        Raises:
            ValueError: (on setting) not an int >= 1.
        """
        return self._steps

    @steps.setter
    def steps(self, steps: int) -> None:
        self._steps = _check_steps(steps)

    @property
    def mode(self) -> Mode:
        """``Mode.REVERSE`` or ``Mode.FORWARD``. It may be set between hypersteps (as
        ``"reverse"`` / ``"forward"`` too); the value is checked as the constructor checks it.

        Raises:
            ValueError: (on setting) neither mode; ``"forward"`` with ``checkpoint=True`` or with
                a DistributedDataParallel model.
        """
        return self._mode

    @mode.setter
    def mode(self, mode: Mode | str) -> None:
        self._configure(mode, self._checkpoint)

    @property
    def checkpoint(self) -> bool:
        """Whether the reverse-mode replay recomputes each step's graph on the way back (memory of
        one step's graph instead of K). It may be set between hypersteps.

        Raises:
            TypeError: (on setting) not True or False.
            ValueError: (on setting) True in forward mode.
        """
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, checkpoint: bool) -> None:
        self._configure(self._mode, checkpoint)

    def _configure(self, mode: Mode | str, checkpoint: bool) -> None:
        """Check and set ``mode`` and ``checkpoint`` together (the constructor and the setters: a
        string assigned to ``hopt.mode`` was kept as the string, which no ``is Mode.FORWARD`` test
        matched, so ``hopt.mode = "forward"`` silently stayed in reverse mode)."""
        if not isinstance(checkpoint, bool):
            raise TypeError(f"Unrolled checkpoint must be True or False, got {checkpoint!r}")
        if mode not in tuple(Mode):  # (a str Enum member equals its value; Mode() named no argument)
            raise ValueError(f"Invalid Unrolled mode: {mode!r} (choose 'reverse' or 'forward')")
        mode = Mode(mode)
        if checkpoint and mode is Mode.FORWARD:
            raise ValueError(
                "Unrolled(checkpoint=True) is a reverse-mode option (forward mode already keeps one "
                "step at a time); use mode='reverse' or drop checkpoint"
            )
        if mode is Mode.FORWARD and self.ranks.size > 1:
            raise ValueError(
                "Unrolled(mode='forward') does not support DistributedDataParallel models (forward-mode "
                "AD through the gradient all-reduce); use mode='reverse'"
            )
        self._mode, self._checkpoint = mode, checkpoint

    # ------------------------------------------------------------------ episodes and bookkeeping

    def _weights_changed(self) -> None:
        dropped = len(getattr(self, "_records", ()))
        self._group_members = self._members_now()
        self.start_episode()
        if dropped:  # (said by the hyperstep that finds no step to differentiate through)
            self._episode_note = (
                f" (the trained weights changed after {dropped} recorded step(s): a weight was frozen "
                "or unfrozen with requires_grad_, a param group was added, or a module or parameter "
                "of the model was replaced or tied into another module, so those steps were dropped "
                "and a new episode began; take a step before the next hyperstep)"
            )

    def _members_now(self) -> list[list[int]]:
        """Per param group of the inner optimiser, the indices of the trained weights it holds.

        Raises:
            ValueError: a trained weight listed more than once in a group (a weight tied into two
                modules, given under both of its names): ``torch.optim`` then steps it once per
                listing (torch only warns, "duplicate parameters"), while the replay steps each
                weight once, so it could not reproduce training (a hypergradient 170% off, after
                one ReplayWarning at the first hyperstep).
        """
        groups = self.inner_optimizer.param_groups
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        owner = [group_of[id(w)] for w in self.pair.weights]
        twice: list[tuple[str, int]] = []
        if len(group_of) != sum(len(g["params"]) for g in groups):  # (a tensor listed twice: rare)
            counts = collections.Counter(id(p) for g in groups for p in g["params"])
            twice = [
                (n, counts[id(w)])
                for n, w in zip(self.pair.weight_names, self.pair.weights, strict=True)
                if counts[id(w)] > 1
            ]
        if twice:
            n, c = twice[0]
            raise ValueError(
                f"inner_optimizer holds the trained weight {n!r} {c} times (a weight tied into two "
                f"modules, listed under both of its names?): torch.optim steps it {c} times per step "
                "(torch warns 'duplicate parameters', and will refuse them), which Unrolled's replay, "
                "stepping each weight once, cannot reproduce. List each weight once: "
                "model.parameters() does"
            )
        return [[k for k, g in enumerate(owner) if g == gi] for gi in range(len(groups))]

    def _check_optimizer(self) -> None:
        """Follow an inner optimiser replaced (``hopt.inner_optimizer = torch.optim.SGD(...)``, a
        fresh one per episode) or regrouped over the same weights: the recorded steps were taken
        by the old one (its class, its groups), so a new episode starts, with a
        :class:`ReplayWarning` where steps were recorded (none after :meth:`start_episode`). An
        :class:`~hypergrad.hparams.OptimizerSetting` tuning the old optimiser is refused: its
        values would reach the replay but never the real steps."""
        opt = self.inner_optimizer
        replaced = opt is not getattr(self, "_optimizer_seen", opt)  # (copies pickled before it was kept)
        if replaced:
            names = self.pair.hparam_names
            stale = [names[i] for i, s in self.settings if s.optimizer[0] is not opt]
            if stale:
                raise ValueError(
                    f"hopt.inner_optimizer was replaced, but hyperparameter(s) {stale} tune the "
                    "optimiser this Unrolled was built with: their values would reach the replay "
                    "but never the real steps. Keep the optimiser and reset it per episode "
                    "(inner_optimizer.state.clear(), then hopt.start_episode()), or build the "
                    "setting (e.g. hg.hparams.LearningRate) and the Unrolled for the new optimiser"
                )
        members = self._members_now()
        if not replaced and members == self._group_members:
            return
        if not replaced and _groups_of(members) == _groups_of(self._group_members):
            # a group holding no trained weight added (a frozen backbone registered with
            # add_param_group, to be unfrozen later) or emptied: every trained weight is in the
            # group it was in, whose settings the records keep, so the recorded steps still hold
            # (they were dropped, with a ReplayWarning naming a replaced or regrouped optimiser)
            self._group_members = members
            return
        self._optimizer_seen, self._group_members = opt, members
        if self._records:
            self.start_episode()
            _warn_user(
                "hopt.inner_optimizer was replaced (or its param groups regrouped) since the last "
                "recorded step: the recorded steps were taken by the old one, so they were dropped "
                "and a new episode starts from the current weights. Call hopt.start_episode() "
                "after replacing it to say it is intended.",
                ReplayWarning,
            )

    def _check_train_loss(self) -> None:
        """Follow a training loss replaced between steps (``hopt.train_loss = ...``: a curriculum
        switching losses): the recorded steps were taken with the old one, and the replay ran them
        all with the new one (a hypergradient a third off, silently). A new episode starts, with a
        :class:`ReplayWarning` where steps were recorded; until the next step the replay uses the
        loss the recorded steps were taken with (one replaced right before a hyperstep). The same
        loss assigned again is no change (``==``: a bound method ``trainer.loss`` is a new object
        at every attribute access, but equal)."""
        seen = getattr(self, "_train_loss_seen", None)  # (copies pickled before it was kept)
        if seen is self.train_loss or seen == self.train_loss:
            return
        self._train_loss_seen = self.train_loss
        if seen is not None and self._records:
            self.start_episode()
            _warn_user(
                "hopt.train_loss was replaced since the last recorded step: the recorded steps were "
                "taken with the old loss, which a replay with the new one would not reproduce, so they "
                "were dropped and a new episode starts from the current weights (the next hyperstep "
                "differentiates through the steps taken with the new loss). Call "
                "hopt.start_episode() after replacing it to say it is intended.",
                ReplayWarning,
            )

    def start_episode(self) -> None:
        """Forget the recorded steps: the next hyperstep differentiates only through steps taken
        from the weights as they are now (e.g. freshly initialised for a new episode)."""
        self._records.clear()
        self._since_anchor = 0
        self._since_move = 0
        self._hp_moved = False
        self._promotion = None
        self._versions = self._current_versions()
        self._episode_note = ""
        self._frozen_seen: tuple[tuple[int, tuple[int, tuple[int, int], int]], ...] | None = (
            self._frozen_versions()
        )
        self._frozen_stale: tuple[_Record, list[str]] | None = None
        self._hooks_seen: tuple[int, Any] | None = (RemovableHandle.next_id, self._forward_hooks())
        self._hooks_stale: _Record | None = None

    def _forward_hooks(self) -> tuple[Any, ...]:
        """The forward and backward hooks and pre-hooks (their handles' ids, per module) of the
        model's and the hyperparameter module's modules, and the global ones: one pass over the
        modules, taken only at a hyperstep or after a hook was registered anywhere
        (``RemovableHandle.next_id`` moved)."""
        mod = nn.modules.module
        kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        lazy = nn.modules.lazy.LazyModuleMixin._infer_parameters

        def ids(hooks: Any) -> tuple[int, ...]:
            # (not a lazy module's own initialisation hook, which removes itself at the first
            # forward pass: a model built lazily warned at every hyperstep of its first window)
            return tuple(k for k, h in hooks.items() if getattr(h, "__func__", None) is not lazy)

        hooked = (
            (id(m), *(ids(getattr(m, k, {})) for k in kinds))
            for m in (*self.pair.model.modules(), *self.hparams.modules())
            if any(getattr(m, k, None) for k in kinds)
        )
        return (
            tuple(tuple(getattr(mod, f"_global{k}", {})) for k in kinds),
            tuple(entry for entry in hooked if any(entry[1:])),
        )

    def _check_forward_hooks(self, *, look: bool) -> None:
        """Note forward hooks or pre-hooks of the model registered or removed since the last look
        while steps are recorded (a hook that rescales inputs switched on after a warm-up, a
        pruning-style mask hook, a noise hook removed): the replay runs every recorded step with
        the hooks there now, not those the real steps ran with. As :meth:`_check_frozen`, for the
        hyperstep's warning; :meth:`_check_reproduced` sees it only at every ``_CHECK_EVERY``-th
        hyperstep, never while the hyperparameters move within the window. Cheap per step (one
        counter read: a registration anywhere moves it); ``look`` (a hyperstep) also takes the
        hooks, which sees removals."""
        seen = getattr(self, "_hooks_seen", None)  # (None: a copy or a loaded state, re-taken)
        counter = RemovableHandle.next_id
        if seen is not None and not look and seen[0] == counter:
            return
        now = self._forward_hooks()
        if seen is not None and self._records and now != seen[1]:
            self._hooks_stale = self._records[-1]
        self._hooks_seen = (counter, now)

    def _warn_forward_hooks(self) -> None:
        stale = getattr(self, "_hooks_stale", None)
        if stale is None or not any(r is stale for r in self._records):
            return
        _warn_user(
            "hooks of the model's modules (module.register_forward_hook / "
            "register_forward_pre_hook / register_full_backward_hook, or global ones) were "
            "registered or removed after steps that "
            "this hyperstep replays: the replay runs those steps with the hooks there now, not the "
            "ones the real steps ran with, so the hypergradient is that of other steps. Call "
            "hopt.start_episode() after such a change to differentiate only through the steps "
            "taken since. (If the hooks change nothing the model computes, e.g. they only record "
            "activations, filter this warning.)",
            ReplayWarning,
        )

    def _current_versions(self) -> tuple[tuple[int, tuple[int, int], int], ...]:
        """The version counter, storage and fused-step count of each trained weight (no copy,
        no sync): the storage sees weights whose storage was replaced through ``.data``
        (``p.data = best``, ``torch.nn.utils.vector_to_parameters``: best weights reloaded), the
        count a fused optimiser's step outside :meth:`step`; neither moves the version."""
        weights = self.pair.weights
        fused = self._fused_counts(weights, "weights")
        return tuple((w._version, _data_ptr(w), f) for w, f in zip(weights, fused, strict=True))

    def _fused_counts(self, tensors: Sequence[Tensor], slot: str) -> Sequence[int]:
        """Per tensor, the steps fused optimisers took on it (:func:`write_count`; their kernels
        move no version counter): read again only when a fused step was taken anywhere since the
        last look at the same tensors, so a step where none was (the inner optimiser cannot be
        fused; a fused outer one steps at hypersteps) costs no lookup."""
        total = fused_steps_taken()
        seen: dict[str, Any] = self.__dict__.setdefault("_fused_seen", {})
        held = seen.get(slot)
        if held is not None and held[0] == total and held[1] is tensors:
            return held[2]
        counts = [write_count(t)[1] for t in tensors] if total else [0] * len(tensors)
        seen[slot] = (total, tensors, counts)
        return counts

    def _buffer_versions(self) -> tuple[tuple[int, int], ...]:
        """The identity and version counter of each of the model's buffers (no copy, no sync)."""
        return tuple((id(b), b._version) for b in self.pair.buffers())

    def _frozen_versions(self) -> tuple[tuple[int, tuple[int, tuple[int, int], int]], ...]:
        """The identity and version counter of every model parameter that the inner optimiser does
        not train now (frozen, or left out of it); no names (one pass, at every step)."""
        key = (tuple(id(w) for w in self.pair.weights), registrations())
        cached = getattr(self, "_frozen_params", None)
        if cached is None or cached[0] != key:  # (the list re-taken when the weights or layout moved)
            trained = set(key[0])
            cached = (key, [p for p in self.pair.model.parameters() if id(p) not in trained])
            self._frozen_params = cached
        # (and the storage: an EMA teacher updated MoCo-style, ``p.data = p.data * m + ...``,
        # gets new storage without a version bump; and the steps of a fused optimiser, whose
        # kernels bump none: a second optimiser with fused=True stepping the parts left out)
        fused = self._fused_counts(cached[1], "frozen")
        return tuple((id(p), (p._version, _data_ptr(p), f)) for p, f in zip(cached[1], fused, strict=True))

    def _check_frozen(self) -> None:
        """Note model parameters outside the trained weights changed (in place, or replaced) since
        the last step, while steps are recorded: the replay runs every recorded step with their
        current values, not those the real steps used (an EMA teacher, a target network refreshed
        by ``load_state_dict``, a frozen backbone reloaded). :meth:`_check_reproduced` sees that only
        at every ``_CHECK_EVERY``-th hyperstep, and never when the hyperparameters moved within
        the window (hypersteps every step), so the hypergradient was silently that of other steps."""
        now = self._frozen_versions()
        seen = getattr(self, "_frozen_seen", None)  # (None: a copy or a loaded state, re-taken)
        if seen is not None and self._records and now != seen:
            before = set(seen)
            ids = {i for i, v in now if (i, v) not in before}
            changed = [n for n, p in self.pair.model.named_parameters() if id(p) in ids]
            self._frozen_stale = (self._records[-1], changed or ["(a parameter removed)"])
        self._frozen_seen = now

    def _warn_frozen(self) -> None:
        """The hyperstep's ReplayWarning while a step recorded before such a change is replayed."""
        stale = getattr(self, "_frozen_stale", None)
        if stale is None or not any(r is stale[0] for r in self._records):
            return
        _warn_user(
            f"model parameter(s) {stale[1][:4]} that inner_optimizer does not train (frozen, or left "
            "out of it) were changed outside hopt.step() after steps that this hyperstep replays (an "
            "EMA teacher, a target network refreshed, a frozen part reloaded?): the replay runs "
            "those steps with their current values, not the ones the real steps used, so the "
            "hypergradient is that of other steps. Call hopt.start_episode() after such a change to "
            "differentiate only through the steps taken since. (If only val_loss reads them, the "
            "replay is unaffected: filter this warning.)",
            ReplayWarning,
        )

    def _check_fresh(self) -> None:
        """End the episode if the weights were changed outside ``step()``."""
        if self._records and self._current_versions() != self._versions:
            self.start_episode()
            _warn_user(
                "the weights were changed outside hopt.step() since the last recorded step (a "
                "re-initialisation, load_state_dict, weight averaging?): the recorded steps no "
                "longer lead to them, so they were dropped and a new episode starts from the "
                "current weights. Call hopt.start_episode() after such a change to say it is intended.",
                ReplayWarning,
            )
        self._versions = self._current_versions()

    def _check_hooks(self) -> None:
        from torch.optim import optimizer as optim_module

        opt = self.inner_optimizer
        found = set()
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            found.add("optimizer step hooks on inner_optimizer")
        if _step_replaced(opt):
            found.add("a step method set on inner_optimizer itself (inner_optimizer.step = ...)")
        post = getattr(optim_module, "_global_optimizer_post_hooks", {})
        if getattr(optim_module, "_global_optimizer_pre_hooks", None) or any(
            h is not _count_fused_step
            for h in post.values()  # (hypergrad's own: it counts, changes nothing)
        ):
            found.add("global optimizer step hooks")
        for name, w in zip(self.pair.weight_names, self.pair.weights, strict=True):
            if w._backward_hooks or getattr(w, "_post_accumulate_grad_hooks", None):
                found.add(f"gradient hooks on {name!r}")
        new = found - self._warned_hooks
        if new:
            self._warned_hooks = self._warned_hooks | new
            _warn_user(
                f"Unrolled replays the inner steps with its own differentiable optimiser and cannot "
                f"run {', '.join(sorted(new))}: if they change the gradients or the update (gradient "
                "clipping, ...) the hypergradient is that of the steps without them. (For gradient "
                "clipping, use hopt.step(batch, max_grad_norm=...), which the replay reproduces.)",
                ReplayWarning,
            )

    def _check_autocast(self, call: str) -> None:
        state = _autocast_state(self.device.type)
        if self.mode is Mode.FORWARD and state is not None and state[0]:
            raise ValueError(
                f"Unrolled(mode='forward'): {call} was called under torch.autocast, whose casts "
                "forward-mode AD does not follow (the replay fails inside the model, or mixes "
                "dtypes); use mode='reverse' (it replays each step in its autocast state), or "
                "run without autocast"
            )

    def _step(self, batch: Batch, max_grad_norm: float | None, scaler: torch.amp.GradScaler | None) -> Tensor:
        # the batch as train_loss receives it, copied before the loss runs: a loss that changes
        # it in place would otherwise be recorded as it left the loss, and replayed from there
        # (and before anything changes: a batch that cannot be copied is refused with nothing done)
        try:
            copied = clone_batch(batch)
        except Exception as error:
            raise TypeError(
                "Unrolled records each step's batch by value, to replay the step in the hyperstep, "
                f"and could not copy this one ({type(error).__name__}: {error}). A batch of tensors, "
                "numbers and strings in tuples, lists, dicts or dataclasses can be copied: pass "
                "micro-batches as a list (not a generator or iterator, which the step would also "
                "use up), and keep other objects (a lock, a file handle) out of the batch. Nothing "
                "was changed by this step"
            ) from error
        self._batch_in: tuple[Batch] | None = (copied,)
        try:
            return super()._step(batch, max_grad_norm, scaler)
        finally:
            self._batch_in = None

    def _before_step(self) -> None:
        self._check_autocast("step()")
        self._check_optimizer()
        self._check_train_loss()
        self._update = update_for(self.inner_optimizer)  # a group added (or changed) since
        self._check_fresh()
        self._check_frozen()
        self._check_forward_hooks(look=False)
        self._check_hooks()
        seen = getattr(self, "_attributes_seen", None)  # (copies pickled before it was kept)
        # ... and its modules' plain settings (a dropout or drop-path rate a schedule sets between
        # steps, a temperature, a call counter), in the same pass: the replay ran every step with
        # the current ones, silently (a dropout-rate schedule: hypergradient 6-15% off, the outer
        # loss too, while the hyperparameters moved within the window). Unchanged since the last
        # step (the usual case), the last step's tuple is shared
        settings: list[tuple[int, str, Any]] = []
        self._attributes_before = _plain_attributes(self._state_modules(), seen, settings)
        last = getattr(self, "_settings_last", None)  # (copies pickled before it was kept)
        now = tuple(settings)
        self._settings_before = self._settings_last = last if last == now else now
        # the modes the step starts in, which its replay must start in (a train_loss may switch
        # them, e.g. to eval for an auxiliary pass, and leave them so: the modes after the step
        # replayed its dropout-on forward pass with dropout off)
        self._training_before = tuple(m.training for m in self._mode_modules())
        # the model's buffers written outside step() since the last step (a class prior or a
        # normaliser the user updates between batches, running statistics reset): the replay
        # chains each step's buffers from the previous replayed step's, so this step records the
        # values its forward starts from (it copies them anyway; kept only then). Silently replayed
        # with the stale values before: a hypergradient 15-27% off, the outer loss too, with no
        # warning while the hyperparameters moved within the window
        # (None: no step seen since construction, a load or a copy, whose buffers are the ones the
        # records chain to: a resumed run records as the uninterrupted one does)
        seen = getattr(self, "_buffers_seen", None)
        self._buffers_written = bool(self._records) and seen is not None and self._buffer_versions() != seen
        # DDP (broadcast_buffers=True) broadcasts rank 0's buffers at the start of its forward: do
        # it now, so the pre-forward buffers the step records are the ones its forward reads
        sync_buffers(self.model)

    def _record_step(
        self,
        batch: Batch,
        has_grad: tuple[bool, ...],
        rng: dict[str, Tensor] | None,
        buffers: Tensors,
        max_grad_norm: float | None = None,
        hparam_buffers: Tensors = (),
    ) -> None:
        pair = self.pair
        self._promotion = None
        # (what _forget_step puts back if the optimiser then refuses the update)
        self._undo: tuple[int, int, tuple[tuple[int, int], ...], bool] | None = (
            self._since_anchor,
            self._since_move,
            self._hp_versions,
            self._hp_moved,
        )
        attributes = getattr(self, "_attributes_before", ())  # (copies pickled before it was kept)
        self._attributes_before = ()
        settings = getattr(self, "_settings_before", ())
        self._settings_before = ()
        training = getattr(self, "_training_before", None) or tuple(m.training for m in self._mode_modules())
        self._training_before = None
        hparam_ids = {id(h) for h in pair.hparam_tensors}
        if not getattr(self, "_warned_batch_graph", False) and any(
            t.grad_fn is not None or id(t) in hparam_ids for t in iter_tensors(batch)
        ):
            self._warned_batch_graph = True
            warnings.warn(
                "a tensor of the batch given to step() carries an autograd graph or is a "
                "hyperparameter itself (computed from the hyperparameters outside train_loss, e.g. "
                "step((x * h.scale.exp(), y)), or distilled images passed as step((h.images, "
                "h.labels))?): Unrolled records the batch by value and replays the step with that "
                "value only, so no hypergradient flows through it (a scale's came out 0 against "
                "-0.368). Compute it inside train_loss from the raw batch, or read the "
                "hyperparameters from the hparams argument there (step(()) for a loss that reads "
                "no data) (warned once)",
                ReplayWarning,
                stacklevel=4,
            )
        if not getattr(self, "_warned_group_graph", False):
            carried = [
                f"param_groups[{gi}][{k!r}]"
                for gi, g in enumerate(self.inner_optimizer.param_groups)
                for k, v in group_settings(g).items()
                if any(t.requires_grad for t in iter_tensors(v))
            ]
            if carried:
                self._warned_group_graph = True
                warnings.warn(
                    f"{', '.join(carried)} of the inner optimiser carries an autograd graph (set from "
                    "the hyperparameters, e.g. by a LambdaLR whose lambda returns a hyperparameter "
                    "tensor?): Unrolled records the settings by value, so no hypergradient flows "
                    "through it. Tune a setting with hg.hparams.LearningRate / Momentum (relative=True: "
                    "a multiplier on a scheduled value), or scale the step inside train_loss (warned "
                    "once)",
                    ReplayWarning,
                    stacklevel=4,
                )
        changed_states = self._changed_states()  # (reset or loaded: the replay cannot carry it on)
        hp_versions = self._hp_write_counts()
        moved = bool(self._records) and self._hparams_moved()
        held = getattr(self, "_batch_in", None)
        recorded = clone_batch(batch) if held is None else held[0]
        # A full snapshot at the first step, every K steps, and where the hyperparameters moved
        # for the first time in K steps (hypersteps every K steps or sparser: each window then
        # starts on a snapshot). Hypersteps more often than that (every step) only copy the
        # hyperparameters: K full snapshots would be held otherwise; the hyperstep re-runs the
        # steps from the snapshot to its window's start without a graph, and keeps their end as
        # the window's snapshot (see :meth:`_start`), so at most two are held.
        sparse = moved and (self._since_move == 0 or self._since_move >= self.steps)
        anchor, copied = None, None
        if not self._records or self._since_anchor >= self.steps or sparse:
            anchor = _Anchor(
                weights=clone_all(pair.weights),
                buffers=buffers,  # as before this step's forward pass (already copies)
                states=snapshot_state(self.inner_optimizer, pair.weights),
                hparams=clone_all(pair.hparam_tensors),
            )
            self._since_anchor = 0
        elif moved:
            copied = clone_all(pair.hparam_tensors)
        if moved:
            self._since_move = 0
        if anchor is not None or moved:
            self._hp_versions, self._hp_moved = hp_versions, False
        self._since_anchor += 1
        if moved or self._since_move:
            self._since_move += 1
        self._records.append(
            _Record(
                batch=recorded,
                groups=[
                    {**_clone_settings(g), **state_defaults(self.inner_optimizer)}
                    for g in self.inner_optimizer.param_groups
                ],
                has_grad=has_grad,
                rng=rng,
                anchor=anchor,
                hparams=copied,
                training=training,
                max_grad_norm=max_grad_norm,
                grad_scale=(
                    None if self._scaler is None else self._scaler.scale(torch.ones((), device=self.device))
                ),
                autocast=_autocast_state(self.device.type),
                states=changed_states,
                hparam_buffers=hparam_buffers,
                buffers=(
                    buffers
                    if getattr(self, "_buffers_written", False) or broadcasts_buffers(self.model)
                    else None
                ),
                attributes=attributes,
                settings=settings,
            )
        )
        # forget what no replay can need: everything before the newest anchor at least K back
        target = max(len(self._records) - self.steps, 0)
        keep_from = max(i for i, r in enumerate(self._records) if r.anchor is not None and i <= target)
        for _ in range(keep_from):
            self._records.popleft()
        self._at_most_two_anchors()

    def _forget_step(self) -> None:
        """Drop the record of a step whose update the inner optimiser refused. The records that
        this step's record let go of stay gone: the ring is still a chain from its oldest anchor
        (anchors it turned into copies of the hyperparameters are replayed from the one before),
        one step shorter than a window until the next step."""
        undo, self._undo = getattr(self, "_undo", None), None
        if undo is None or not self._records:
            return
        self._records.pop()
        self._since_anchor, self._since_move, self._hp_versions, self._hp_moved = undo

    def _at_most_two_anchors(self) -> None:
        """Keep the oldest full snapshot (where the window's replay starts) and the newest; one
        between them (irregular hypersteps: one promoted by :meth:`_promote`, one taken K steps
        later and one at the first change of the hyperparameters in K steps) becomes a copy of
        its hyperparameters, and a replay re-runs its steps from the oldest instead."""
        anchored = [r for r in self._records if r.anchor is not None]
        for r in anchored[1:-1]:
            anchor, r.anchor = r.anchor, None
            assert anchor is not None
            r.hparams = anchor.hparams

    def _after_step(self) -> None:
        self._undo = None
        self._versions = self._current_versions()
        self._buffers_written = False
        self._buffers_seen: tuple[tuple[int, int], ...] | None = self._buffer_versions()  # (its own updates)
        before, now = getattr(self, "_frozen_seen", None), self._frozen_versions()
        if before is not None and now != before and not getattr(self, "_warned_frozen_step", False):
            # (the versions before the step are _check_frozen's, taken in _before_step: no extra pass)
            seen = set(before)
            ids = {i for i, v in now if (i, v) not in seen}
            # (nn.Embedding(max_norm=...) renormalising a frozen table: a second pass leaves it as
            # it is, and the hyperstep puts it back; see HyperOptimizer._compute)
            ids -= self._renormalised_ids()
            changed = [n for n, p in self.pair.model.named_parameters() if id(p) in ids]
            if changed:
                self._warned_frozen_step = True
                _warn_user(
                    f"the step changed model parameter(s) {changed[:4]} that inner_optimizer does not "
                    "train, in place (a running statistic kept as an nn.Parameter, updated in "
                    "forward?). Unrolled records buffers by value, not parameters: the replay runs "
                    "every recorded step with their current value, and its forward passes change "
                    "them again (each hyperstep moves them, although it should change no weight). "
                    "Register such a tensor as a buffer (module.register_buffer). (warned once)",
                    ReplayWarning,
                )
        self._frozen_seen = now  # (the step's own changes are not taken for changes outside it)
        self._state_seen = self._state_signature()

    def _renormalised_ids(self) -> set[int]:
        """The identities of the weights of the model's ``nn.Embedding(max_norm=...)`` layers
        (taken again only when a module was registered somewhere since)."""
        cached = getattr(self, "_renorm_ids", None)
        if cached is None or cached[0] != registrations():
            ids = {
                id(m.weight)
                for m in self.pair.model.modules()
                if isinstance(m, nn.Embedding) and m.max_norm is not None
            }
            cached = self._renorm_ids = (registrations(), ids)
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_renorm_ids"] = None  # (identities of the original's weights: re-taken by the copy)
        state["_state_seen"] = None  # (references to the state's tensors: re-taken by the copy)
        state["_attributes_seen"] = {}  # (likewise, the model's attributes: copied anew)
        state["_frozen_seen"] = None  # (identities of the original's parameters: re-taken by the copy)
        state["_frozen_params"] = None  # (likewise)
        state["_fused_seen"] = {}  # (likewise: the original's tensors, whose fused counts it holds)
        state["_hooks_seen"] = None  # (likewise, the modules' identities)
        state["_buffers_seen"] = None  # (likewise, the buffers': the next step records its own)
        return state

    def _state_signature(self) -> list[dict[str, Any]]:
        """What tells whether the inner optimiser's state of the weights was changed since the last
        :meth:`step`: per weight and state entry, the tensor and its version counter (or the
        value of a number). No copy, no host synchronisation; it holds the state's tensors until
        the next step (after ``state.clear()`` their memory is freed then)."""
        state = self.inner_optimizer.state
        return [
            {k: (v, v._version) if isinstance(v, Tensor) else repr(v) for k, v in state.get(w, {}).items()}
            for w in self.pair.weights
        ]

    def _changed_states(self) -> list[tuple[State, tuple[str, ...]] | None] | None:
        """Per weight, its optimiser state entries changed since the last step (copies) and the
        names of those that stayed, or None where none changed; None where nothing changed. An
        entry replaced by a tensor of the same values (``load_state_dict`` of the state it had, a
        checkpoint's round trip) stayed: the replay carries it on with its derivatives."""
        seen = self._state_seen
        if not self._records or seen is None:
            return None  # (an anchor holds the whole state at an episode's first step)
        out: list[tuple[State, tuple[str, ...]] | None] = []
        for w, before, after in zip(self.pair.weights, seen, self._state_signature(), strict=True):
            kept = tuple(k for k, v in after.items() if k in before and _same_entry(before[k], v))
            if len(kept) == len(after) == len(before):
                out.append(None)
                continue
            (snap,) = snapshot_state(self.inner_optimizer, [w])
            out.append(({k: v for k, v in snap.items() if k not in kept}, kept))
        return None if all(o is None for o in out) else out

    def _hparams_moved(self) -> bool:
        """Whether the hyperparameters changed since the newest anchor: a hyperstep said so, or an
        in-place write since then, including a fused outer optimiser's step (whose kernels do not
        bump version counters; see :func:`write_count`): an outer step taken outside
        :meth:`hyper_step` (on :meth:`hypergradient`'s output, summed over the tasks of a
        meta-batch) would otherwise go unseen, and the steps taken after it be replayed with the
        old values. No host synchronisation (values were compared before: 0.5 ms a step for the
        MLP's 269k decays on one CPU thread)."""
        return self._hp_moved or self._hp_write_counts() != self._hp_versions

    def _hp_write_counts(self) -> tuple[tuple[int, int], ...]:
        return tuple(write_count(h) for h in self.pair.hparam_tensors)

    def _mode_modules(self) -> list[nn.Module]:
        """The modules whose ``training`` flag a step records and its replay restores."""
        return [*self.pair.model.modules(), *self.hparams.modules()]

    @contextlib.contextmanager
    def _modes_of(self, rec: _Record) -> Iterator[None]:
        """Put every module in the train/eval mode it had during the recorded step (BatchNorm,
        dropout), whatever mode the user has set for the hyperstep; put them back afterwards."""
        if not rec.training:
            yield
            return
        modules = self._mode_modules()
        if len(modules) != len(rec.training):
            raise RuntimeError(
                f"the model and hyperparameters have {len(modules)} modules but had "
                f"{len(rec.training)} when the recorded step was taken: Unrolled cannot replay a step "
                "of another model; call hopt.start_episode() after changing the model's structure"
            )
        before = [m.training for m in modules]
        if tuple(before) == rec.training:  # (the usual case: nothing to switch)
            yield
            return
        try:
            for m, flag in zip(modules, rec.training, strict=True):
                m.training = flag
            yield
        finally:
            for m, flag in zip(modules, before, strict=True):
                m.training = flag

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        call = getattr(self, "_calling", "hyper_step")  # (or hypergradient: the call made)
        if val_batch is None:
            # (hyper_step(batch): the batch is train_batch, the first positional argument)
            hint = (
                f"; the one batch given was taken as train_batch, {call}'s first positional "
                "argument, which Unrolled does not use (it replays the recorded steps' batches): "
                f"pass {call}(val_batch=batch)"
                if train_batch is not None
                else ""
            )
            raise ValueError(f"Unrolled.{call} needs val_batch=... (a validation batch for val_loss){hint}")
        check_batch(val_batch, "val_batch", self.device, self.dtype, dtypes=False)
        self._check_autocast("hyper_step()")
        self._refresh()
        self._check_optimizer()
        self._check_fresh()
        if not self._records:
            raise ValueError(
                f"Unrolled.{call} needs at least one inner step recorded by hopt.step(batch) "
                "since the episode began, to differentiate through; none has been taken"
                + getattr(self, "_episode_note", "")
            )
        self._check_frozen()
        self._warn_frozen()
        self._check_forward_hooks(look=True)
        self._warn_forward_hooks()

    # ------------------------------------------------------------------ the replay

    def _replay_step(
        self,
        rec: _Record,
        weights: Tensors,
        states: list[State],
        buffers: Tensors,
        hp: Sequence[Tensor],
        create_graph: bool = True,
    ) -> tuple[Tensors, list[State], Tensors]:
        """One recorded step, differentiably: ``(weights, states, buffers)`` after it. It runs
        in the ``torch.autocast`` state the real step had (its loss, its backward pass and its
        update), whatever the hyperstep's, and from the optimiser state the real step had where
        that was changed outside ``step()`` (constants then, as for the real step)."""
        if rec.buffers is not None:  # (DDP's broadcast: the values this rank's forward read)
            buffers = clone_all(rec.buffers)
        if rec.states is not None:
            states = [
                st if changed is None else {**{k: st[k] for k in changed[1] if k in st}, **changed[0]}
                for st, changed in zip(states, rec.states, strict=True)
            ]
        # (taken before the loss scale's wrappers below, which are other tensors than the real ones)
        outside = self._outside_hparams(hp)
        scale = None
        if rec.grad_scale is not None and create_graph and self.mode is Mode.REVERSE:
            # the reverse pass through the step with its cotangents times the loss scale, as the
            # real step's backward pass had them (and divided back at the step's inputs): the
            # unscale grads * (1 / scale) passed cotangents divided by the scale into the scaled
            # loss's float16 backward graph, where they underflowed (weights identical, the
            # hypergradient 4.6% off at a scale of 2^17 against 0.05% without a scaler)
            scale = rec.grad_scale.detach().double()
            inverse = scale.reciprocal()
            weights = tuple(_cotangent_scaled(weights, inverse))
            states = [
                dict(zip(st, _cotangent_scaled(list(st.values()), inverse), strict=True)) for st in states
            ]
            hp = _cotangent_scaled(hp, inverse)
        if rec.autocast is None or rec.autocast == _autocast_state(self.device.type):
            out = self._replay_step_as_is(rec, weights, states, buffers, hp, create_graph, outside)
        else:
            enabled, dtype = rec.autocast
            with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                out = self._replay_step_as_is(rec, weights, states, buffers, hp, create_graph, outside)
        if scale is None:
            return out
        new_w, new_states, new_buffers = out
        new_states = [
            dict(zip(st, _cotangent_scaled(list(st.values()), scale), strict=True)) for st in new_states
        ]
        return tuple(_cotangent_scaled(new_w, scale)), new_states, new_buffers

    def _replay_step_as_is(
        self,
        rec: _Record,
        weights: Tensors,
        states: list[State],
        buffers: Tensors,
        hp: Sequence[Tensor],
        create_graph: bool,
        outside: Sequence[Tensor] = (),
    ) -> tuple[Tensors, list[State], Tensors]:
        devices = [self.device] if self.device.type == "cuda" else []
        # gradient hooks that train_loss's forward pass registers (an activation's gradient
        # clipped, a gradient-reversal layer, a module's full backward hook): they shape this
        # step's training gradient only, and are removed once it is taken; left in the graph they
        # ran again on the hypergradient's cotangents through the same forward pass
        hooks: list[Any] = []
        # the loss the recorded steps were taken with (see _check_train_loss; copies pickled
        # before it was kept have none)
        seen = getattr(self, "_train_loss_seen", None)
        recorded_loss = self.train_loss if seen is None else seen

        def train_loss(decays: list[WeightDecay]) -> tuple[Tensor, Tensors, list[_Call]]:
            calls: list[_Call] = []
            for m in decays:
                m._first_order_calls, m._replaying = [], True
            try:
                with (
                    collecting_gradient_hooks(hooks),
                    self._modes_of(rec),
                    torch.random.fork_rng(devices=devices, enabled=rec.rng is not None),
                    self._hparam_buffers_at(rec.hparam_buffers),
                    _attributes_kept(self._state_modules(), rec.attributes),
                    _settings_at(self._state_modules(), rec.settings),
                ):
                    if rec.rng is not None:
                        self._set_rng_state(rec.rng)
                    # a copy of the recorded batch every time: a loss may change its batch in
                    # place where no version counter sees it (``x.data.div_(255)``, a NumPy view
                    # or array, a generator in the batch), and the recorded one handed over
                    # changed it for every later replay of the step (x / 255**2: a hypergradient
                    # 43-52% off, silently). One copy of the batch per replayed step, small next to
                    # the step's forward and double backward over it
                    loss, bufs = self.pair.call(
                        recorded_loss,
                        clone_batch(rec.batch),
                        weights=weights,
                        buffers=buffers,
                        hparams=hp,
                    )
            finally:
                for m in decays:
                    calls += m._first_order_calls or []
                    m._first_order_calls, m._replaying = None, False
            return loss, bufs, calls

        # WeightDecay penalties give their gradient's value c * d * w through autograd but not its
        # graph, which is added below: far cheaper to differentiate than the double backward of d * w^2
        decays = self._decays if create_graph and self.mode is Mode.REVERSE else []
        before = clone_all(buffers) if decays else buffers  # in case the call below is redone
        scale = rec.grad_scale
        loss, new_buffers, calls = train_loss(decays)
        if not loss.requires_grad and any(rec.has_grad):
            # the real step's weights got gradients from a loss without a graph: train_loss runs
            # its own backward passes (gradient accumulation over micro-batches), which the replay
            # cannot differentiate (its hypergradient came out 0, with no error)
            raise ValueError(
                "train_loss returned a loss without an autograd graph, yet the recorded step's "
                "weights got gradients: it calls .backward() itself (gradient accumulation over "
                "micro-batches?). Unrolled differentiates through the loss train_loss returns: "
                "return the accumulated loss with its graph instead (e.g. the mean of the "
                "micro-batches' losses), and let hopt.step() run the backward pass"
            )
        probes = [probe for probe, _, _ in calls]
        scaled = loss if scale is None else loss * scale
        # ``outside``: the real hyperparameters, where the step runs on other tensors (a step
        # before the window with its recorded values, forward mode's dual tensors): taken along in
        # the gradient the step needs anyway (nothing more where the loss does not reach them), to
        # find a loss that reads them from elsewhere than its hparams argument
        outside = list(outside)
        with refusing_once_differentiable(
            "Unrolled (through the replayed updates)", forward_mode=self.mode is Mode.FORWARD
        ):
            g_all = grads_or_none(scaled, list(weights) + probes + outside, create_graph=create_graph)
        if outside:
            self._check_read_outside(g_all[len(g_all) - len(outside) :], outside, "train_loss")
            g_all = g_all[: len(g_all) - len(outside)]
        if calls and not (
            _penalised_weights_known([ws for _, ws, _ in calls], weights)
            and _constant_coefficients(g_all[len(weights) :], list(weights) + probes)
        ):
            # the loss is not linear in a penalty with a coefficient free of the weights (e.g.
            # f(w) * penalty, penalty ** 2): the shortcut would lose product-rule terms of the
            # second derivatives; differentiate the ordinary penalty instead
            buffers = before
            loss, new_buffers, calls = train_loss([])
            scaled = loss if scale is None else loss * scale
            with refusing_once_differentiable(
                "Unrolled (through the replayed updates)", forward_mode=self.mode is Mode.FORWARD
            ):
                g_all = grads_or_none(scaled, list(weights), create_graph=create_graph)
        for handle in hooks:  # (the training gradient is taken)
            handle.remove()
        buffers = new_buffers
        grads = list(materialize(g_all[: len(weights)], weights))
        where = {id(w): k for k, w in enumerate(weights)}
        for (_, ws, ds), c in zip(calls, g_all[len(weights) :], strict=True):
            if c is None:
                continue  # the loss did not use this penalty
            for w, d in zip(ws, ds, strict=True):
                k = where.get(id(w))
                if k is not None:
                    # grads[k] holds the term's value already (through autograd, see
                    # WeightDecay._valued_penalty); add its derivative to d and w only (the one
                    # through c is in grads[k] too), without computing the term again
                    grads[k] = _with_decay_graph(grads[k], c, d, w)
        if scale is not None:  # GradScaler.unscale_'s arithmetic
            inv = scale.double().reciprocal().float()
            grads = [g * inv.to(g.dtype) for g in grads]
        grads = list(self.ranks.mean(grads))  # data parallel: the averaged gradient the real step used
        if rec.max_grad_norm is not None:  # the real step's clipping, over the weights it updated
            live = [k for k in range(len(grads)) if not rec.has_grad or rec.has_grad[k]]
            for k, g in zip(
                live, clip_by_total_norm([grads[k] for k in live], rec.max_grad_norm), strict=True
            ):
                grads[k] = g
        tuned = self._hparam_values(hp)
        new_w: list[Tensor] = list(weights)
        states = list(states)
        for gi, members in enumerate(self._group_members):
            idx = [k for k in members if not rec.has_grad or rec.has_grad[k]]  # torch.optim skips grad-less
            if not idx:
                continue
            settings: dict[str, Any] = dict(rec.groups[gi])
            numbers: dict[str, float] = {}  # the values as OptimizerSetting.write() puts them there
            for i, setting in self.settings:  # relative: a multiplier on the recorded value
                value, base = tuned[i][gi], settings[setting.name]
                number = float(fwAD.unpack_dual(value).primal.detach())
                settings[setting.name] = base * value if setting.relative else value
                numbers[setting.name] = float(base) * number if setting.relative else number
            w_g, s_g = update_exactly(
                self._update,
                [weights[k] for k in idx],
                [grads[k] for k in idx],
                [states[k] for k in idx],
                settings,
                numbers,
            )
            for k, w, s in zip(idx, w_g, s_g, strict=True):
                new_w[k] = w
                states[k] = s
        return tuple(new_w), states, buffers

    def _outside_hparams(self, hp: Sequence[Tensor]) -> list[Tensor]:
        """The real hyperparameter tensors that require grad, where ``hp`` (what a replayed step or
        forward mode's validation loss runs on) is made of other tensors; else none."""
        real = self.pair.hparam_tensors
        if all(a is b for a, b in zip(hp, real, strict=True)):
            return []
        return [t for t in real if t.requires_grad]

    def _check_read_outside(
        self, grads: Sequence[Tensor | None], outside: Sequence[Tensor], loss: str
    ) -> None:
        """Raise if ``loss`` reached a real hyperparameter (``grads``: its gradient with respect to
        ``outside``), although the call substituted others for them: it reads them from a closure
        or from the model, which a replay with other values (the recorded ones, forward mode's
        dual tensors) does not reach. (Forward mode's hypergradient was 0, or the loss's part
        only; reverse mode re-ran the steps before the window with the current values: 7% off,
        silently.)"""
        reached = [t for t, g in zip(outside, grads, strict=True) if g is not None]
        if reached:
            names = dict(zip(map(id, self.pair.hparam_tensors), self.pair.hparam_names, strict=True))
            read = [names[id(t)] for t in reached]
            raise ValueError(
                f"{loss} reads the hyperparameter(s) {read[:4]} from elsewhere than its hparams "
                "argument (a tensor its closure captured, lam = hp.lam, or one the model keeps in "
                "an attribute): Unrolled replays steps with other values substituted into hparams "
                "(the values recorded steps were taken with; forward mode's tangents), which such "
                "a read does not see, so the hypergradient would be silently wrong (0 in forward "
                "mode). Read hyperparameters from the hparams argument the loss is given (h.lam, "
                "h[0]), and let the model take them from there"
            )

    def _window(self) -> int:
        """How many of the latest recorded steps the hyperstep differentiates through."""
        return min(self.steps, len(self._records))

    def _start(self) -> tuple[Tensors, list[State], Tensors]:
        """Weights, optimiser states and buffers before the first differentiated step: from the
        anchor (the first record), re-running the steps before the window without a graph, each
        with the hyperparameters it used (its anchor's or copy's). Where it re-ran any, their end
        becomes the anchor of the window's first step once the hyperstep is taken, and the
        records before it are dropped (:meth:`_promote`): the next hyperstep starts there, and at
        most one full snapshot is held besides the newest real one. :meth:`hypergradient` alone
        changes nothing."""
        records = list(self._records)
        first = len(records) - self._window()
        begin = 0
        pending = self._promotion
        anchor: _Anchor | None = records[0].anchor
        if pending is not None and 0 < first < len(records) and records[first] is pending[0]:
            begin, anchor = first, pending[1]  # (forward mode: once per hyperparameter entry)
        assert anchor is not None
        weights = tuple(t.detach().clone().requires_grad_(True) for t in anchor.weights)
        states = [dict(s) for s in anchor.states]
        buffers = clone_all(anchor.buffers)
        hp = anchor.hparams
        for i, rec in enumerate(records[begin:first]):
            if i and rec.anchor is not None:
                hp = rec.anchor.hparams
            elif rec.hparams is not None:
                hp = rec.hparams
            with torch.enable_grad():
                w, states, b = self._replay_step(rec, weights, states, buffers, hp, create_graph=False)
            weights = tuple(t.detach().requires_grad_(True) for t in w)
            states = [{k: v.detach() if isinstance(v, Tensor) else v for k, v in st.items()} for st in states]
            buffers = tuple(t.detach() for t in b)
        if first > begin:
            rec = records[first]
            made = rec.anchor
            if made is None:
                made = _Anchor(
                    weights=tuple(t.detach() for t in weights),  # (the replay does not write them)
                    buffers=clone_all(buffers),  # (the replay updates running statistics in place)
                    states=[dict(s) for s in states],
                    hparams=rec.hparams if rec.hparams is not None else hp,
                )
            self._promotion = (rec, made)
        return weights, states, buffers

    def _promote(self) -> None:
        """Make the window start the hyperstep re-ran (:meth:`_start`) the first record's anchor."""
        pending, self._promotion = self._promotion, None
        if pending is None:
            return
        rec, anchor = pending
        records = list(self._records)
        first = next((i for i, r in enumerate(records) if r is rec), None)
        if first is None:
            return
        rec.anchor, rec.hparams = anchor, None
        for _ in range(first):
            self._records.popleft()
        last = max(i for i, r in enumerate(self._records) if r.anchor is not None)
        self._since_anchor = len(self._records) - last
        self._at_most_two_anchors()

    def _check_reproduced(self, replayed: Sequence[Tensor]) -> None:
        """Warn when the replay of the recorded steps ends away from the real weights although it
        ran them with the hyperparameters they were taken with: it did not reproduce training
        (randomness or state the records cannot hold), so the hypergradient is that of other
        steps. Allows rounding (other kernels, e.g. foreach ones on a GPU): sqrt(eps) of how far
        the steps moved the weights, plus 100 eps of their size, and up to 1% of the entries
        beyond that where the last real gradient was rounding noise about an exact 0. Three
        passes over the weights and one host synchronisation, so taken at the first hyperstep and every
        ``_CHECK_EVERY``-th after it (what it catches, a replay that cannot reproduce training,
        persists)."""
        if self.hyper_steps % _CHECK_EVERY:
            return
        records = list(self._records)
        current = self.pair.hparam_tensors
        for rec in records:
            used = rec.hparams if rec.hparams is not None else rec.anchor.hparams if rec.anchor else None
            if used is not None and not all(torch.equal(a, c) for a, c in zip(used, current, strict=True)):
                return  # steps taken with other hyperparameters: the replay differs on purpose
        anchor = records[0].anchor
        assert anchor is not None
        real = [w.detach() for w in self.pair.weights]
        triples = zip(replayed, real, anchor.weights, strict=True)
        with torch.no_grad():
            parts = [
                torch.stack(
                    [
                        (r.detach() - w).abs().amax(),
                        (w - a).abs().amax(),
                        w.abs().amax(),
                        (r.detach() - a).abs().amax(),
                    ]
                ).double()
                for r, w, a in triples
                if w.numel()
            ]
            if not parts:
                return
            err, moved, size, replay_moved = torch.stack(parts).amax(0).tolist()
            # at most float16's eps: bfloat16's (2**-7) made 100 eps 78% of the weights' size, so a
            # replay that reproduced nothing (20% off) passed unwarned; its single-tensor steps are
            # replayed bit for bit as float16's are, and its foreach ones within a last bit a step
            eps = min(torch.finfo(self.dtype).eps, torch.finfo(torch.float16).eps)
            tol = eps**0.5 * moved + 100 * eps * size
            if not err > tol:  # (a NaN is the non-finite guard's)
                return
            # Entries whose gradient is rounding noise about an exact 0 (the key bias of
            # attention, to which softmax is invariant; a bias before a normalisation) take
            # steps of the noise's sign under Adam-like optimisers, which the replay's kernels
            # (SDPA's math kernel, twice differentiable, where training ran a fused one) need
            # not reproduce. Warn only when more entries than such structural zeros are off.
            off = int(
                torch.stack(
                    [((r.detach() - w).abs() > tol).sum() for r, w in zip(replayed, real, strict=True)]
                ).sum()
            )
            total = sum(w.numel() for w in real)
            if off <= _NOISE_FRACTION * total and not self._off_where_training_had_a_gradient(
                replayed, real, tol
            ):
                return
        # a DistributedDataParallel communication hook (fp16/bf16 compression, PowerSGD) gives
        # the real steps another average of the gradients than the replay's exact mean
        hooked = any(getattr(d, "_comm_hooks", None) for d in ddp_wrappers(self.model))
        _warn_user(
            (
                "the model's DistributedDataParallel has a communication hook "
                "(register_comm_hook): the real steps applied the gradients it averaged "
                "(compressed, e.g. fp16_compress_hook or PowerSGD), the replay their exact mean, "
                "so it cannot reproduce them; drop the hook to tune with Unrolled (Implicit and "
                "the other methods replay nothing). "
                if hooked
                else ""
            )
            + f"the replayed inner steps end {err:.3g} away from the real weights, {off} of their "
            f"{total} entries beyond rounding (the real steps moved them {moved:.3g}): the replay "
            "did not reproduce training, so the hypergradient is that of other steps. Unrolled "
            "replays each step with its recorded batch, torch's global RNG state, param-group "
            "settings and train/eval modes; it cannot replay randomness from a torch.Generator of "
            "your own or from Python's or NumPy's RNG inside train_loss, a loss that reads state "
            "changing between steps (a step counter), gradient or optimizer hooks (clip with "
            "step(batch, max_grad_norm=...) instead), or nondeterministic kernels."
            + (
                f" Here the replayed steps moved the weights {replay_moved:.3g}, a small part of "
                "the real steps' move: do the losses read them from tensors captured outside "
                "(params = list(model.parameters()) taken before, a module held in a closure) "
                "instead of the model they are given? A replay substitutes the weights of that "
                "model only."
                if replay_moved < 0.1 * moved
                else ""
            ),
            ReplayWarning,
        )

    def _off_where_training_had_a_gradient(
        self, replayed: Sequence[Tensor], real: Sequence[Tensor], tol: float
    ) -> bool:
        """Whether an entry the replay ended off (beyond ``tol``) had a real gradient at the last
        step (the weights' ``.grad``, which :meth:`step` leaves): beyond ``sqrt(eps)`` of the
        largest. The check's allowance is for entries whose gradient is rounding noise about an
        exact 0, which Adam-like optimisers turn into steps of +-lr; an entry training reached
        that the replay got wrong is a replay off (a fraction of 1% of the entries is no sign of
        noise where the batches reach few of them: the touched rows of a large embedding). With
        a weight's ``.grad`` gone (``zero_grad()`` since) this cannot tell: False."""
        grads: list[Tensor | None] = []
        for w in self.pair.weights:  # (a weight the last step did not reach has none: no gradient)
            g = w.grad
            g = None if g is None else g.detach().to_dense() if g.is_sparse else g.detach()
            grads.append(g if g is not None and g.shape == w.shape and g.numel() else None)
        if all(g is None for g in grads):
            return False
        eps = torch.finfo(self.dtype).eps
        floor = eps**0.5 * max(float(g.abs().amax()) for g in grads if g is not None)
        return any(
            bool((((r.detach() - w).abs() > tol) & (g.abs() > floor)).any())
            for r, w, g in zip(replayed, real, grads, strict=True)
            if g is not None
        )

    def _replay(self, hp: Sequence[Tensor]) -> tuple[Tensors, Tensors]:
        """Weights and buffers after replaying the recorded steps with hyperparameters ``hp``
        (reverse mode: one graph through the window)."""
        weights, states, buffers = self._start()
        for rec in list(self._records)[len(self._records) - self._window() :]:
            weights, states, buffers = self._replay_step(rec, weights, states, buffers, hp)
        return weights, buffers

    def _forward_hypergradient(self, val_batch: Batch) -> tuple[Tensors, Tensor, tuple[bool, ...]]:
        """Forward mode: for each hyperparameter entry, carry (value, tangent) pairs through the
        steps. Each step runs in a dual level of its own and hands on detached pairs, so neither
        its reverse graph nor the tangents autograd keeps until a level exits outlive it: memory
        O(P) whatever K. Also says, per hyperparameter tensor, whether a path leads from it to
        the losses (what reverse mode's gradient that is not ``None`` says)."""
        _load_forward_ad()
        pair = self.pair
        base = [h.detach() for h in pair.hparam_tensors]
        real_buffers = pair.buffers()
        # row-major entries, also of a non-contiguous hyperparameter (a transposed parameter:
        # ``.view(-1)`` of its own layout failed)
        grads = [torch.zeros_like(h, memory_format=torch.contiguous_format) for h in base]
        to_val = [False] * len(base)  # a tangent of the tensor reached L_V
        to_weights = [False] * len(base)  # ... or the replayed weights
        value = torch.zeros((), dtype=self.dtype, device=self.device)
        # every entry's L_V draws what reverse mode's one call draws (dropout in train mode), and
        # torch's RNG is left where that one call leaves it
        rng = self._rng_state()
        # ... and runs in the modes and from the plain attributes (a hidden state) the hyperstep
        # began with, as that one call does: a val_loss that ends with model.train() ran the
        # second entry's with dropout on (its hypergradient -7.3e-3 against reverse mode's 1.4e-3)
        modules, model_modules = self._mode_modules(), self._state_modules()
        modes = [m.training for m in modules]
        # ... and with the plain settings (numbers, bools, strings) the hyperstep began with: a call
        # counter a forward pass advances (a warm-up scale, ``self.calls += 1``) was one further in
        # each entry's val_loss, so every entry after the first differentiated another loss
        # (33% off reverse mode and finite differences, and info.outer_loss the last entry's)
        settings = self._attributes_now()
        # ... and the hyperparameter module's buffers (a normaliser that updates its statistics
        # and reads them): each entry's val_loss got the copies the previous entry's had updated
        # (12% off reverse mode); reverse mode's one call reads them as the hyperstep began
        hp_buffers = tuple(d[k].detach().clone() for d, k in _buffer_slots(self.hparams)[1])
        # ... and on the validation batch it was given: a val_loss that changes its batch in place
        # (x.mul_(2)) handed the second entry's call the batch the first one left (hypergradients
        # 3.6x and 7.8x off, silently); the first call gets the caller's batch, as reverse mode's
        # one call does, the others copies of it as it was
        pristine = clone_batch(val_batch)
        first = True

        def dual(pt: tuple[Tensor, Tensor | None], requires_grad: bool = False) -> Tensor:
            p, t = pt
            if requires_grad:
                # (a non-leaf: nn.Embedding(max_norm=...) renormalises the weight it looks up in
                # place, which autograd refuses on a leaf requiring grad or a view of one, and the
                # differentiable renormalisation records only on non-leaf weights)
                p = p.detach().requires_grad_(True).clone()
            return p if t is None else fwAD.make_dual(p, t)

        def split(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return (x, None)
            p, t = fwAD.unpack_dual(x)
            return (p.detach(), None if t is None else t.detach())

        for i, h in enumerate(base):
            for j in range(h.numel()):
                tangent = torch.zeros_like(h, memory_format=torch.contiguous_format)
                tangent.view(-1)[j] = 1
                w0, s0, b0 = self._start()
                w = [(t.detach(), None) for t in w0]
                st = [{k: (v, None) for k, v in s.items()} for s in s0]
                bf = [(t, None) for t in b0]
                for rec in list(self._records)[len(self._records) - self._window() :]:
                    with dual_level():
                        hp = [fwAD.make_dual(b, tangent) if k == i else b for k, b in enumerate(base)]
                        out_w, out_s, out_b = self._replay_step(
                            rec,
                            tuple(dual(x, requires_grad=True) for x in w),
                            [
                                {k: dual(v) if isinstance(v[0], Tensor) else v[0] for k, v in s.items()}
                                for s in st
                            ],
                            tuple(dual(x) for x in bf),
                            hp,
                        )
                        w = [split(x) for x in out_w]
                        st = [{k: split(v) for k, v in s.items()} for s in out_s]
                        bf = [split(x) for x in out_b]
                if i == 0 and j == 0:
                    self._check_reproduced([p for p, _ in w])
                if any(t is not None for _, t in w):  # it reached train_loss's gradient
                    to_weights[i] = True
                with dual_level():
                    hp = [fwAD.make_dual(b, tangent) if k == i else b for k, b in enumerate(base)]
                    self._set_rng_state(rng)
                    for m, flag in zip(modules, modes, strict=True):
                        m.training = flag
                    _put_settings_back(settings)
                    with self._hparam_buffers_at(hp_buffers), _attributes_kept(model_modules):
                        out = pair.loss(
                            self.val_loss,
                            val_batch if first else clone_batch(pristine),
                            weights=tuple(dual(x) for x in w),
                            buffers=clone_all(real_buffers),
                            hparams=hp,
                        )
                    first = False
                    primal, tan = fwAD.unpack_dual(out)
                    if i == 0 and j == 0 and primal.requires_grad:  # (see _check_read_outside)
                        outside = self._outside_hparams(hp)
                        self._check_read_outside(grads_or_none(primal, outside), outside, "val_loss")
                    if tan is not None:
                        grads[i].view(-1)[j] = tan.detach()
                        to_val[i] = True
                    value = primal.detach()
        # reached: a path to L_V, or to the weights of an L_V that some path reaches (as reverse
        # mode's graph, where a weight the window leaves without effect on L_V still connects)
        reached = tuple(v or (w and any(to_val)) for v, w in zip(to_val, to_weights, strict=True))
        return tuple(grads), value, reached

    def _check_untracked_hparam_writes(self) -> None:
        """Warn when the hyperparameters hold other values than the latest recorded steps used
        although no write that :meth:`_hparams_moved` can see happened since (an outer update
        written through ``.data``, ``p.data.sub_(lr * g)``, moves no version counter): the
        replay would re-run the steps taken since that write with the old values, the window's
        start would be wrong and the hypergradient silently off. One comparison per hyperstep;
        the next step then copies the current values, as after a seen write."""
        if not self._records or self._hparams_moved():
            return
        used = None
        for rec in reversed(self._records):
            used = rec.hparams if rec.hparams is not None else rec.anchor.hparams if rec.anchor else None
            if used is not None:
                break
        current = self.pair.hparam_tensors
        # (records in another dtype than the hyperparameters now, a float64 state loaded into a
        # float32 container, compare as the load converted them: they warned of a .data update)
        if used is None or all(
            torch.equal(a.to(c.dtype), c.detach()) for a, c in zip(used, current, strict=True)
        ):
            return
        self._hp_moved = True  # (the next step copies the values it uses)
        _warn_user(
            "the hyperparameters changed since the last recorded step without a write Unrolled "
            "can see (their version counters did not move: an update through .data, "
            "p.data.sub_(lr * g)?): it cannot tell which recorded steps used the new values, so "
            "this or a later hypergradient re-runs steps before its window with values they were "
            "not taken with, and starts the window from weights training never had. Update "
            "hyperparameters in place under torch.no_grad() (p.sub_(lr * g)) or with an optimiser "
            "(write into .grad and call outer_optimizer.step()).",
            ReplayWarning,
        )

    def _compute(self, train_batch: Batch, val_batch: Batch) -> tuple[_Hypergradient, Tensor, str]:
        try:
            return super()._compute(train_batch, val_batch)
        finally:  # (what the hyperstep itself wrote and put back: nn.Embedding(max_norm) rows)
            if getattr(self, "_frozen_seen", None) is not None:
                self._frozen_seen = self._frozen_versions()

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        self._check_untracked_hparam_writes()
        # (the validation loss on copies of the current buffers; the model's plain attributes,
        # e.g. a hidden state it keeps, as they are after it)
        # (and nn.Embedding(padding_idx=...) differentiating the padding row it reads)
        with self._hparam_buffers_at(None), _attributes_kept(self._state_modules()), exact_padding_rows():
            return self._hypergradient_on_copies(val_batch)

    def _hypergradient_on_copies(self, val_batch: Batch) -> _Hypergradient:
        pair = self.pair
        if self.mode is Mode.FORWARD:
            with _naming_missing_forward_derivatives():
                grads, loss, reached = self._forward_hypergradient(val_batch)
            return _Hypergradient(
                grads, loss, unrolled_steps=self._window(), reached=reached, commit=self._moved
            )
        if self.checkpoint:  # one replayed step's graph alive at a time
            with _naming_missing_second_derivatives():
                raw, value = checkpointed_hypergradient(self, val_batch, pair.hparam_tensors)
        else:
            with _reusing_values():  # e.g. a per-weight decay's exp: once, not once per replayed step
                weights, _ = self._replay(pair.hparam_tensors)
                self._check_reproduced(weights)
                # gradient hooks that val_loss's forward pass registers (a hook the model puts on
                # an activation, a module's full backward (pre-)hook) shape training gradients;
                # left on its graph they ran on the hypergradient's cotangents (an activation's
                # gradient halved by a hook: 30-43% off the real training's central differences,
                # which forward mode matched): removed before the backward pass, as the replayed
                # steps' are once their training gradient is taken
                val_hooks: list[Any] = []
                with collecting_gradient_hooks(val_hooks, model_only=True):
                    out = pair.loss(
                        self.val_loss,
                        val_batch,
                        weights=weights,
                        buffers=clone_all(pair.buffers()),
                        hparams=pair.hparam_tensors,
                    )
                for handle in val_hooks:
                    handle.remove()
            with _naming_missing_second_derivatives():
                raw = list(grads_or_none(out, pair.hparam_tensors))
            value = out.detach().clone()
        reached = tuple(g is not None for g in raw)
        # data parallel: each rank differentiated its own L_V shard through the shared replay (whose
        # gradient averages sum the cotangents back over the ranks); the mean of the parts is the
        # derivative of the mean validation loss
        grads = materialize(raw, pair.hparam_tensors)
        self.ranks.mean_([*grads, value])
        return _Hypergradient(
            grads,
            value,
            unrolled_steps=self._window(),
            reached=reached,
            commit=self._moved,
        )

    def _moved(self) -> None:
        """The outer step was taken: the next recorded step copies the hyperparameters (or starts
        a new snapshot), and the window's start re-run for it is kept."""
        self._hp_moved = True
        self._promote()

    def replayed_weights(self) -> Tensors:
        """The weights reached by replaying the recorded window of steps (detached), shaped like
        the trained weights. A diagnostic.

        The window is replayed with the *current* hyperparameters, as :meth:`hyper_step` does, so
        the result equals the model's current weights (up to rounding) only when the
        hyperparameters have not moved since the window's steps were taken (e.g. no hyperstep
        within the last ``steps`` inner steps); after a hyperstep it shows where the same steps
        would have led with the new values. Costs one replay (``steps`` training
        forward/backward passes with their graph, and any earlier steps back to the last
        snapshot, without).

        Raises:
            ValueError: no step has been recorded since the episode began.
        """
        if not self._records:
            raise ValueError(
                "Unrolled.replayed_weights needs at least one inner step recorded by hopt.step(batch) "
                "since the episode began; none has been taken"
            )
        with torch.enable_grad(), _attributes_kept(self._state_modules()):
            w, _ = self._replay(self.pair.hparam_tensors)
        return tuple(t.detach() for t in w)

    def _method_state(self) -> dict[str, Any]:
        anchor_due = self._hparams_moved()
        return {
            "records": [r.to_dict() for r in self._records],
            "steps": self.steps,  # (K may be changed while training: checked on load)
            "since_anchor": self._since_anchor,
            "since_move": self._since_move,
            "anchor_due": anchor_due,  # the hyperparameters moved since the newest anchor
            "rank": self._rank(),  # the records hold this rank's shards
            "world": self.ranks.size,  # ... of batches split over this many ranks
            # the order of the records' per-weight, per-hyperparameter and per-buffer tuples (the
            # model's and the containers' named_parameters / named_buffers order), so a run built
            # with its modules or containers in another order gets each record's tensors by name
            "weight_names": list(self.pair.weight_names),
            "hparam_names": list(self.pair.hparam_names),
            "buffer_names": list(self.pair.buffer_names),
            "hparam_buffer_names": list(_buffer_slots(self.hparams)[0]),
            "module_names": self._module_names(),
            "state_module_names": self._module_names(unique=True),
        }

    def _module_names(self, unique: bool = False) -> list[str]:
        """The names of :meth:`_mode_modules` (whose ``training`` flags a record holds), or with
        ``unique`` of :meth:`_state_modules` (whose indices its plain attributes and settings
        hold), in order."""
        seen: set[int] = set()
        out = []
        for kind, root in (("model", self.pair.model), ("hparams", self.hparams)):
            for n, m in root.named_modules():
                if unique and id(m) in seen:
                    continue
                seen.add(id(m))
                out.append(f"{kind}.{n}")
        return out

    def _check_recorded_weights(self, records: list[dict[str, Any]]) -> None:
        """Loaded records must have been taken on weights like the ones trained here (their
        number, shapes and dtypes): a run built with another weight frozen replayed them on the
        wrong weights (a bare ``zip()`` error at the hyperstep)."""
        here = [(tuple(w.shape), w.dtype) for w in self.pair.weights]
        for r in records:
            anchor = r.get("anchor")
            saved = None if anchor is None else [(tuple(t.shape), t.dtype) for t in anchor["weights"]]
            count = len(r.get("has_grad") or here) if saved is None else len(saved)
            if count != len(here) or (saved is not None and saved != here):
                listed = "" if saved is None else ": " + ", ".join(f"{d} {list(sh)}" for sh, d in saved)
                raise ValueError(
                    f"this Unrolled state_dict holds inner steps recorded while other weights trained "
                    f"({count}{listed}) than here ({len(here)}: "
                    + ", ".join(f"{d} {list(sh)}" for sh, d in here)
                    + "): the replay would apply them to other weights. Build the run as the saved one "
                    "(the same weights frozen, in the same param groups, in the same dtype), or save "
                    "right after hopt.start_episode()"
                )

    def _load_method_state(self, state: dict[str, Any]) -> None:
        saved = state.get("rank", 0)
        if state["records"] and saved != self._rank():
            raise ValueError(
                f"this Unrolled state_dict was saved on rank {saved} and holds its recorded steps "
                f"(that rank's shards of the batches); rank {self._rank()} would replay them as its own "
                "and get another hypergradient. Save hopt.state_dict() on every rank (e.g. to "
                "f'ckpt{rank}.pt') and load each rank's own, or call hopt.start_episode() on every "
                "rank (after a hyper_step: it forgets the recorded steps, which a hyper_step keeps "
                "for the next window) and save then"
            )
        world = state.get("world")  # (None: saved before it was kept)
        if state["records"] and world is not None and world > 1 and world != self.ranks.size:
            raise ValueError(
                f"this Unrolled state_dict was saved in a run of {world} data-parallel ranks and holds "
                f"rank {saved}'s recorded steps (its shards of the batches); a run of "
                f"{self.ranks.size} would replay them as whole batches and get another hypergradient. "
                "Resume on as many ranks, or call hopt.start_episode() on every rank (after a "
                "hyper_step: it forgets the recorded steps, which a hyper_step keeps for the next "
                "window) and save then"
            )
        records = _records_in_order(
            state["records"],
            {
                "weights": _reorder(state.get("weight_names"), self.pair.weight_names),
                "hparams": _reorder(state.get("hparam_names"), self.pair.hparam_names),
                "buffers": _reorder(state.get("buffer_names"), self.pair.buffer_names),
                "hparam_buffers": _reorder(state.get("hparam_buffer_names"), _buffer_slots(self.hparams)[0]),
                "modules": _reorder(state.get("module_names"), self._module_names()),
                "state_modules": _reorder(state.get("state_module_names"), self._module_names(unique=True)),
            },
        )
        self._check_recorded_weights(records)
        saved_steps = state.get("steps")  # (None: saved before it was kept)
        if saved_steps is not None and saved_steps != self.steps:
            # (a script that sets hopt.steps at a milestone resumed with the constructor's K, and
            # every window after the resume was another length than the saved run's, silently)
            warnings.warn(
                f"this Unrolled state_dict was saved with steps={saved_steps} (hopt.steps at the "
                f"time), this Unrolled has steps={self.steps}: from here its windows differ from the "
                f"saved run's. To resume that run exactly, set hopt.steps = {saved_steps} after "
                "loading (or build Unrolled with it); to change K on purpose, ignore this",
                UserWarning,
                stacklevel=3,
            )
        self._records.clear()
        self._promotion = None
        self._frozen_seen, self._frozen_stale = None, None
        self._hooks_seen, self._hooks_stale = None, None
        self._buffers_seen = None  # (the loaded buffers are the ones the records chain to)
        for r in records:
            self._records.append(_Record.from_dict(r))
        self._since_anchor = state.get("since_anchor", 0)
        self._since_move = state.get("since_move", 0)
        self._hp_moved = bool(state.get("anchor_due", True))
        self._hp_versions = self._hp_write_counts()
        self._versions = self._current_versions()
        self._state_seen = self._state_signature()  # (the loaded state is the saved run's)
