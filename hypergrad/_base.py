"""The ``HyperOptimizer`` contract: schedule, ``.grad`` filling, guards and state, written once.

A method subclasses :class:`HyperOptimizer` and supplies ``_hypergradient`` (and, if it keeps any,
``_method_state`` / ``_load_method_state``, ``_record_step`` and ``_weights_changed``).
Everything a user touches lives here.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import enum
import functools
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ._functional import (
    _LOW_PRECISION,
    _SETTING_TYPES,
    FunctionalPair,
    Ranks,
    _attribute_value,
    _buffer_slots,
    _entries,
    _state_attributes,
    all_finite,
    attribute_tensors,
    batch_dtype_problem,
    check_batch,
    clip_by_total_norm,
    empty_batch_note,
    memory_span,
    module_layout,
    naming_batch_dtypes,
    norm,
    noting_reentrant_checkpoints,
    registrations,
    substituting,
)
from ._types import Batch, LossFn, Tensors
from ._wrap import (
    average_gradients,
    bare_state_dict,
    compiled_run_eagerly,
    ddp_wrappers,
    distributed_world,
    joined,
    no_sync,
    not_syncing,
    replicate,
    unwrap_model,
)
from .hparams import Constraint, OptimizerSetting, _meanings, _real, from_raw
from .hparams import values as _hparam_values


def _values_off_domain(named: Sequence[tuple[str, Tensor, bool]]) -> str:
    """'' when every ``(name, value, positive)`` has finite values (and, where ``positive``, values
    > 0), else a sentence naming those that do not: an outer step that took a raw value far enough
    for ``exp`` to overflow to inf or underflow to 0 (the marginal likelihood's precisions, a
    self-tuned ``Positive``). One host read."""
    flags = [torch.isfinite(v).all() & ((v > 0).all() if positive else True) for _, v, positive in named]
    if not flags or bool(torch.stack(flags).all()):
        return ""
    bad = [
        f"{n!r} = {v.reshape(-1).tolist()}"
        if v.numel() <= 4
        else f"{n!r} ({float(v.min()):.4g} to {float(v.max()):.4g})"
        for (n, v, _), ok in zip(named, flags, strict=True)
        if not bool(ok)
    ]
    return (
        f"the value(s) of {', '.join(bad)} infinite or 0 from finite raw values (an overflow of exp: a "
        "smaller outer learning rate, or clip the hypergradient with an outer step pre-hook)"
    )


class NonFiniteError(FloatingPointError):
    """A loss or hypergradient was NaN or infinite (or diverged, see ``divergence``); the step was
    not taken and nothing changed."""


class NonFiniteWarning(RuntimeWarning):
    """Issued instead of :class:`NonFiniteError` when ``on_nonfinite="skip"``."""


class DisconnectedWarning(UserWarning):
    """A hyperparameter does not reach the losses (its hypergradient is exactly zero), or a
    training loss reaches no weight (the step changes nothing)."""


class OnNonFinite(str, enum.Enum):
    """What to do when a loss, gradient or hypergradient is not finite."""

    RAISE = "raise"  #: raise NonFiniteError (state untouched)
    SKIP = "skip"  #: warn with NonFiniteWarning, skip the step (state untouched)


@dataclasses.dataclass(frozen=True)
class HyperStepInfo:
    """What one ``hyper_step`` did, for logging (``dataclasses.asdict(info)`` goes to wandb).

    Attributes:
        outer_loss: the validation (outer) loss at the weights the hypergradient is taken at:
            the current weights; for :class:`~hypergrad.Unrolled`, the end of its replay of the
            window, run with the current hyperparameters, which is the current weights unless
            hypersteps moved the hyperparameters within the window (then about where the window
            would have ended with them).
        hypergrad_norm: Euclidean norm of the whole hypergradient.
        solver_iterations: HVPs spent by the linear solver, including any spent estimating its
            step size (``None`` for methods without one).
        solver_residual: the solver's relative residual (see :class:`SolveResult`), or ``None``.
        solver_status: why the solver stopped (a :class:`SolveStatus` value: ``"converged"``,
            ``"max_iterations"``, ``"nonpositive_curvature"``, ``"nonfinite"``, ``"fixed"``,
            ``"diverging"``), or ``None``.
        unrolled_steps: inner steps differentiated through (``None`` for implicit methods).
        seconds: wall-clock time of the hyperstep.
        skipped: ``True`` when the step was refused as non-finite (``on_nonfinite="skip"``).
        hyper_steps: hypersteps taken so far (including this one unless skipped; from
            :meth:`HyperOptimizer.hypergradient`, which takes none, the count before the call).
        train_loss: the training loss the method evaluated for this hyperstep (Implicit: on
            ``train_batch``), or ``None`` where it evaluates none.
    """

    outer_loss: float
    hypergrad_norm: float
    solver_iterations: int | None
    solver_residual: float | None
    solver_status: str | None
    unrolled_steps: int | None
    seconds: float
    skipped: bool
    hyper_steps: int
    train_loss: float | None = None


@dataclasses.dataclass
class _Hypergradient:
    """What a method hands back to the base class."""

    grads: Tensors  # one per hyperparameter tensor, same shapes
    outer_loss: Tensor  # 0-dim, detached
    solver_iterations: int | None = None
    solver_residual: Tensor | None = None
    solver_status: str | None = None
    unrolled_steps: int | None = None
    inner_loss: Tensor | None = None  # the training loss the method used, checked for finiteness
    reached: tuple[bool, ...] | None = None  # per hyperparameter: did any gradient path reach it?
    commit: Callable[[], None] | None = None  # method state to keep once the step is accepted


def _params_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


_F = TypeVar("_F", bound=Callable[..., Any])


def _forget_autocast_casts(device: torch.device) -> None:
    """Inside a ``torch.autocast`` block, drop its cached low-precision copies of the leaf
    tensors just updated in place: it keeps them until the block exits, so the next step under
    the same block would run on the weights as they were before (training and the Unrolled
    replay on different weights)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        torch.clear_autocast_cache()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside the library's own modules (the
    line of the user's script that called ``step`` / ``hyper_step``, or of the user's loss that
    hypergrad called; ``hypergrad/experiments/`` counts as a user), however deep inside hypergrad
    (and its decorators) the warning is raised: a fixed ``stacklevel`` pointed into hypergrad
    itself, so the message named no line of the user's and Python's once-per-location filters
    merged warnings from different call sites."""
    frame = sys._getframe(1)
    level = 2  # (1 would be this function, 2 its caller)
    while frame.f_back is not None and (
        os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR
        # (and torch.compiler.disable's wrapper around hyper_step / hypergradient)
        or os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _DYNAMO_DIR
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


#: where ``torch.compiler.disable``'s wrapper frames live (skipped by :func:`_warn_user`)
_DYNAMO_DIR = os.path.dirname(os.path.abspath(torch._dynamo.eval_frame.__file__))


def _sharing_memory(
    trained: Sequence[Tensor], others: Sequence[Tensor] = ()
) -> tuple[Tensor, Tensor] | tuple[()]:
    """Two distinct tensors whose memory overlaps, at least one of them in ``trained`` (parameters
    over one storage: ``nn.Parameter(other)``, a parametrisation of a tied weight), or ``()``.
    Disjoint views of one flat buffer do not overlap. A sweep over the spans sorted by start:
    O(n log n), run only when the trained weights change."""
    spans = []
    ids = {id(t) for t in trained}
    # (one tensor listed twice is another check's)
    for t in {id(t): t for t in (*trained, *others)}.values():
        if nn.parameter.is_lazy(t) or not t.numel() or t.is_sparse or t.device.type == "meta":
            continue
        try:
            spans.append((*memory_span(t), t))
        except (RuntimeError, NotImplementedError):  # (a tensor subclass without storage)
            continue
    spans.sort(key=lambda s: (s[0], s[1]))
    active: list[tuple[int, int, Tensor]] = []  # (storage, end, tensor) of the spans still open
    for base, start, end, t in spans:
        active = [a for a in active if a[0] == base and a[1] > start]
        for _, _, u in active:
            if id(u) in ids or id(t) in ids:
                return u, t
        active.append((base, end, t))
    return ()


def _put_attributes_back(kept: Sequence[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Give each module the plain state attributes it held (``HyperOptimizer._attributes_now``
    keeps a shallow copy of each module's ``__dict__``; the state attributes are picked out only
    here, on the rare refusal path); state attributes added since are removed."""
    for m, was_all in kept:
        d = vars(m)
        was = {k: v for k, v in was_all.items() if k[0] != "_" and type(v) not in _SETTING_TYPES}
        for k in [k for k in _state_attributes(m) if k not in was]:
            delattr(m, k)
        for k, v in was.items():
            if d.get(k, m) is not v and _attribute_value(v):
                setattr(m, k, v)


def _put_settings_back(kept: Sequence[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Give each module the public number, bool and string attributes it held (``kept`` as
    ``HyperOptimizer._attributes_now`` takes it) where a forward pass since replaced them (a call
    counter, ``self.calls += 1``); ``training`` is the modes' own."""
    for m, was in kept:
        d = vars(m)
        for k, v in was.items():
            if k[0] != "_" and type(v) in _SETTING_TYPES and k != "training" and d.get(k, m) is not v:
                setattr(m, k, v)


def _aliased_attributes(model: nn.Module, hparams: nn.Module) -> list[tuple[str, str]]:
    """``(attribute, hyperparameter)`` for each tensor the model's modules hold in a plain
    attribute (itself, or an item of a list, tuple or dict attribute) that shares memory with a
    hyperparameter without being it: DARTS's ``self._arch_parameters = [alpha, ...]`` of plain
    tensors, handed over as ``nn.ParameterList(model.arch_parameters())``, which wraps each in a
    new ``nn.Parameter`` on the same memory. One pass over the modules' attributes."""
    ptrs = {
        p.untyped_storage().data_ptr(): n for n, p in hparams.named_parameters() if p.device.type != "meta"
    }
    ptrs.pop(0, None)  # (empty tensors)
    ids = {id(p) for p in hparams.parameters()}
    out = []
    for prefix, _, k, key, t in attribute_tensors(model):
        if id(t) in ids or t.layout is not torch.strided or t.device.type == "meta":
            continue
        try:
            hp = ptrs.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # (a tensor without a storage)
            hp = None
        if hp is not None:
            name = k if key is None else f"{k}[{key!r}]"
            out.append((f"{prefix}.{name}" if prefix else name, hp))
    return out


def _check_max_grad_norm(value: Any) -> float | None:
    """``step``'s ``max_grad_norm`` as a float (``None`` stays ``None``), or a ``ValueError``."""
    if value is None:
        return None
    try:
        f = _real(value, "max_grad_norm")
    except TypeError:
        f = float("nan")
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"Invalid max_grad_norm: {value!r} (need a finite number > 0, or None)")
    return f


def _check_scaler(scaler: Any, weights: Sequence[Tensor], names: Sequence[str], device: torch.device) -> Any:
    """``step``'s ``scaler``: ``None`` (also for a disabled ``GradScaler``, which scales nothing, as
    in torch's recipe), else an enabled ``torch.amp.GradScaler`` for the model's device type whose
    weights it can unscale (not float16: its ``unscale_`` refuses float16 gradients); else a
    ``TypeError`` / ``ValueError`` naming the problem, before anything runs."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    on = getattr(scaler, "_device", device.type)
    if on != device.type:
        raise ValueError(
            f"scaler is a GradScaler({on!r}), but the model is on {device.type}: build it as "
            f"torch.amp.GradScaler({device.type!r})"
        )
    half = [n for n, w in zip(names, weights, strict=True) if w.dtype == torch.float16]
    if half:
        raise ValueError(
            f"scaler: the trained weights {half[:4]} are float16, whose gradients GradScaler does not "
            "unscale (and whose update would round away small steps): keep float32 weights and run "
            "the losses under torch.autocast(device_type, dtype=torch.float16), as torch's mixed "
            "precision recipe does"
        )
    return scaler


#: ``torch.optim`` state entries kept in the default dtype whatever the parameter's (NAdam's
#: running product of momentum coefficients, ASGD's step size and averaging coefficient)
_DEFAULT_DTYPE_STATE = frozenset({"mu_product", "eta", "mu"})


def _forget_unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Undo the mark ``scaler.unscale_(optimizer)`` left, for a step that raised before its
    ``scaler.update()``: the scaler keeps it per optimiser until an ``update()``, so every later
    step's ``unscale_`` raised "unscale_() has already been called on this optimizer since the
    last update()" and the run could not go on. (The scale and its growth counter are as before.)"""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.pop(id(optimizer), None)  # (a defaultdict: the next unscale_ starts afresh)


def _keep_saved_scalar_dtypes(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Give the 0-dim floating state entries of ``optimizer`` back the dtype they were saved in.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor but ``"step"`` to
    its parameter's dtype, the 0-dim ones too, which torch.optim keeps in the default dtype
    (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``): a float64 model's float32 ``mu_product``
    came back float64, its running product then rounded otherwise and the resumed run drifted
    from the uninterrupted one (3e-12 in the loss two steps after the load). The saved dtype is
    the one the uninterrupted run (and a fresh one, in the same default dtype) keeps."""
    groups = saved.get("param_groups", ())
    saved_state = saved.get("state", {})
    ids = [i for g in groups for i in g.get("params", ())]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in zip(ids, params, strict=False):
        old, new = saved_state.get(i), optimizer.state.get(p)
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key, value in old.items():
            here = new.get(key)
            if (
                key != "step"  # (torch's own policy: float32 for fused and capturable optimisers)
                and isinstance(value, Tensor)
                and isinstance(here, Tensor)
                and value.dim() == 0
                # (a 0-dim weight's moments are 0-dim too, and follow its dtype: there, only the
                # entries torch.optim keeps in the default dtype whatever the weight's)
                and (p.dim() != 0 or key in _DEFAULT_DTYPE_STATE)
                and value.is_floating_point()
                and here.dtype != value.dtype
            ):
                new[key] = here.to(value.dtype)


def _optimizer_classes(optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's class and of its ``torch.optim.Optimizer`` base classes but
    ``Optimizer`` itself (``["SGDHD", "_HypergradientOptimizer", "SGD"]``), for the checkpoint."""
    return [
        c.__name__
        for c in type(optimizer).__mro__
        if issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    ]


def _nonfinite_entries(what: str, names: Sequence[str], tensors: Sequence[Tensor | None]) -> str:
    """``""``, or ``"; <what> is not finite for 'name': k of n entries, ..."`` naming the tensors
    holding NaN or infinite entries, the first five of them (for the failure path only: one host
    read per tensor)."""
    bad = []
    for name, t in zip(names, tensors, strict=True):
        count = 0 if t is None else int((~torch.isfinite(_entries(t.detach()))).sum())
        if t is not None and count:
            bad.append(f"{name!r}: {count} of {t.numel()} entries")
    more = f" (and {len(bad) - 5} more tensors)" if len(bad) > 5 else ""
    return f"; {what} is not finite for {', '.join(bad[:5])}{more}" if bad else ""


#: the key under which ``HyperOptimizer.__getstate__`` carries the method's state to the copy
_COPIED_METHOD_STATE = "_hypergrad_method_state"


#: held by every training call (:func:`_with_autograd`): one at a time in the process
_CALL_LOCK = threading.RLock()


def _with_autograd(fn: _F) -> _F:
    """Run a training call with autograd on whatever the caller's grad mode (as ``torch.optim``
    runs a step's closure): under ``torch.no_grad()`` a step would otherwise silently not train
    and a hyperstep fail deep inside autograd. ``torch.inference_mode()`` cannot be undone for
    the tensors made under it, so it is refused by name.

    Calls in several threads of one process (an Optuna study with ``n_jobs=2``, a thread pool of
    runs) take turns: they share torch's global random generator, whose state a step records
    and a replay restores (Unrolled with dropout in three threads: replays 0.016-0.023 off the
    real weights, hyperparameters 9-14% off), and which the self-tuning validation pass checks.
    Run trials in processes to run them in parallel."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__}.{fn.__name__}() was called under torch.inference_mode(); it "
                f"needs autograd (gradients w.r.t. the weights and hyperparameters): call it outside "
                f"that block"
            )
        with _CALL_LOCK, torch.enable_grad():
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _hyper_call(fn: _F) -> _F:
    """:func:`_with_autograd`, and never traced by ``torch.compile``: a hyperstep runs eagerly
    (compiled graphs have no double backward), also when called inside a compiled function (a
    compiled training step). Traced, it failed with dynamo's "Attempt to trace forbidden
    callable set_stance"; with only the hypergradient kept out of the trace, the traced outer
    optimiser step was silently lost (the hyperparameters never moved)."""
    return torch.compiler.disable(_with_autograd(fn))  # type: ignore[return-value]


@contextlib.contextmanager
def _grads_set_aside(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Within the block the tensors' ``.grad`` is ``None``; afterwards it is the tensor it was
    before (a backward pass accumulates into an existing ``.grad`` in place, so setting the
    tensors aside, not copying them, keeps them unchanged); what the block accumulated is
    dropped."""
    kept = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    try:
        yield
    finally:
        for t, g in zip(tensors, kept, strict=True):
            t.grad = g


class HyperOptimizer(abc.ABC):
    """Tunes hyperparameters by gradient descent while an ordinary optimiser trains the model.

    Args:
        model: the model; its parameters in ``inner_optimizer`` are the weights :math:`w`. Its
            dtype (that of the batches' floating-point tensors) and device are those of the
            trained weights; a frozen part may be of another dtype (a ``bfloat16`` encoder under
            a ``float32`` head), not on another device.
        hparams: an ``nn.Module`` whose parameters are the (raw) hyperparameters :math:`\\lambda`.
        train_loss: ``train_loss(model, hparams, batch) -> scalar``, the inner objective
            :math:`L_T(w, \\lambda)`.
        val_loss: ``val_loss(model, hparams, batch) -> scalar``, the outer objective
            :math:`L_V(w, \\lambda)` (it may depend on ``hparams`` directly).
        inner_optimizer: a ``torch.optim`` optimiser over the model's weights. The trained
            weights are read from its ``param_groups`` at every call, so groups added later
            (``add_param_group``) train, and parameters frozen later (``requires_grad_(False)``)
            stop training and leave the hypergradient computations.
        outer_optimizer: a ``torch.optim`` optimiser over ``hparams.parameters()``.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``; either way a non-finite loss or
            (hyper)gradient leaves weights, buffers, hyperparameters, optimiser states and torch's
            random generator (CPU, and the model's CUDA device) untouched: a run that skips some
            batches ends as one that never saw them, bit for bit (dropout masks included).
        divergence: if set (a number > 1), a training loss whose magnitude exceeds ``divergence``
            times that of the first accepted nonzero training loss is treated like a non-finite
            one; until a nonzero loss has been accepted (a hinge loss already satisfied, a loss
            weight warmed up from 0) nothing counts as diverged (default: ``None``, off).

    Raises:
        TypeError: ``model`` or ``hparams`` is not an ``nn.Module``, an optimiser is not a
            ``torch.optim.Optimizer`` (or is ``LBFGS``, whose ``step`` needs a closure), a loss is
            not callable, or a hyperparameter is not floating point.
        ValueError: an invalid ``divergence`` or ``on_nonfinite``; ``hparams`` or the model without
            parameters; a hyperparameter that is not a leaf requiring grad, is on another device
            than the model, is also a model parameter, or is missing from ``outer_optimizer``; an
            optimiser holding the other side's tensors (or, ``outer_optimizer``, tensors outside
            ``hparams``).

    The losses run in whatever mode (``model.train()`` / ``model.eval()``) the user set; BatchNorm
    running statistics are updated by :meth:`step` only, once per inner step.

    Data parallel: wrap the model in ``torch.nn.parallel.DistributedDataParallel`` and give each
    rank its own shard of every batch. :meth:`step` runs the wrapper (its reducer averages the
    gradients; under ``find_unused_parameters=True``, and for Delta-STN's two backward passes,
    the step turns the reducer off and averages them itself in one all-reduce); hypergradient
    computations run on ``model.module`` and average what they need over the ranks themselves,
    so with shards of equal size they equal one process's on the concatenated batches (to
    rounding; BatchNorm statistics stay per rank, as in DDP). With unequal shards the result is,
    like DDP's gradient, the mean of the ranks' means. The guards judge the ranks' mean loss, so
    every rank accepts or skips a step alike; the hyperparameters start from rank 0's values
    (broadcast at construction, as DDP broadcasts the weights; ranks holding different
    hyperparameters are refused), and every rank ends with the same ones. ``hparams`` needs no
    wrapper of its own (one wrapped in ``DistributedDataParallel`` works, its losses reading
    ``h.module``). Wrap the model before building the HyperOptimizer and pass the wrapper: one
    made afterwards is never run (a bare model under an initialised process group of several ranks
    is warned about). Every rank must call :meth:`step` and :meth:`hyper_step` alike, in the same
    order, as it would ``loss.backward()`` under DDP: a rank that skips one leaves the ranks'
    collectives mismatched (gloo aborts the process; NCCL hangs until its timeout), and DDP's
    ``join()`` for unequal numbers of batches is refused (give each rank as many batches:
    ``DistributedSampler`` pads the shards). A :meth:`step` inside the wrapper's ``no_sync()`` is
    refused too: a step updates the weights, so it does not accumulate gradients (pass the
    micro-batches together as one batch). A checkpoint saved on rank 0 only resumes every rank
    exactly if the ranks draw the same random numbers (see :meth:`load_state_dict`).
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
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(hparams, nn.Module):
            raise TypeError(
                f"hparams must be an nn.Module whose parameters are the hyperparameters "
                f"(see hypergrad.hparams), got {type(hparams).__name__}"
            )
        for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
            if isinstance(opt, torch.optim.LBFGS):
                raise TypeError(
                    f"{name} is LBFGS, whose step() needs a closure that re-evaluates the loss; "
                    "hypergrad calls optimizer.step() without one. Use SGD, Adam, AdamW, ..."
                )
        if not callable(train_loss) or not callable(val_loss):
            raise TypeError("train_loss and val_loss must be callables loss(model, hparams, batch)")
        if on_nonfinite not in tuple(OnNonFinite):  # (OnNonFinite() named neither it nor the choices)
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (choose 'raise' or 'skip')")
        if divergence is not None and not (
            isinstance(divergence, (int, float)) and not isinstance(divergence, bool) and divergence > 1
        ):
            raise ValueError(f"Invalid divergence: {divergence!r} (need a number > 1, or None)")
        self.model = model
        self._model_given = model  # (hopt.model replaced later is refused: see _check_not_moved)
        self.hparams = hparams
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.on_nonfinite = OnNonFinite(on_nonfinite)
        self.divergence = None if divergence is None else float(divergence)
        self._loss_scale: float | None = None  # |first accepted nonzero training loss|, for ``divergence``
        self._validate_tensors()
        aliased = _aliased_attributes(model, hparams)
        if aliased:
            # (the model read tensors no hypergradient reaches: every method returned exactly 0,
            # with a DisconnectedWarning that named none of this)
            attr, hp = aliased[0]
            raise ValueError(
                f"the model's attribute {attr!r} is another tensor than hyperparameter {hp!r} but "
                "shares its memory: nn.ParameterList([t]) / nn.Parameter(t) wrap a plain tensor in "
                "a new Parameter (and a view taken once, hp.raw[0], is another tensor too), so the "
                "model reads a tensor the methods do not substitute and no hypergradient reaches "
                "(it would be exactly 0) while the outer steps change it behind autograd's back. Let "
                "the model hold the hyperparameters themselves (build hparams first, then "
                "model.arch = list(hparams.parameters())), or read them from the loss's hparams "
                "argument"
            )
        # the outer optimiser's state (Adam's moments) and the method's are in these dtypes
        self._hparam_kinds = {n: (p.dtype, p.device) for n, p in hparams.named_parameters()}
        self.ranks = Ranks(model)  # DistributedDataParallel: hypergradient paths use the module
        world = distributed_world()
        if not self.ranks.wrapped and world > 1:
            # a wrapper made after this object is never run (step calls the model given here): each
            # rank would silently train and tune its own copy, and the ranks drift apart
            _warn_user(
                f"a torch.distributed process group of {world} ranks is initialised, but the model "
                f"given to {type(self).__name__} is not wrapped in DistributedDataParallel: every rank "
                "will train and tune its own copy on its own batches (no gradient or hypergradient is "
                "averaged, and the ranks drift apart). To train data-parallel, wrap the model first "
                f"and pass the wrapper to {type(self).__name__} (a wrapper made afterwards is never "
                "run). Ignore this warning if the ranks are meant to be independent runs",
                UserWarning,
            )
        # as DDP does for the model: the same hyperparameters on every rank (rank 0's values)
        replicate(hparams, self.ranks.group, self.ranks.size)
        self._weights_key: tuple[int, ...] = ()
        self.pair = FunctionalPair(self.ranks.module, hparams, self._trained_weights())
        self._weights_key = tuple(id(w) for w in self.pair.weights)
        self._layout = module_layout(self.pair.model)
        self._registrations_seen = registrations()
        self.settings: list[tuple[int, OptimizerSetting]] = self._find_settings()
        self._warned_disconnected: set[str] = set()
        self.inner_steps = 0
        self.hyper_steps = 0

    @property
    def on_nonfinite(self) -> OnNonFinite:
        """What a non-finite loss or (hyper)gradient does: ``"raise"`` or ``"skip"`` (see the
        class docstring). May be set between calls, to either string or an :class:`OnNonFinite`;
        anything else is a ``ValueError`` (set as a plain string, ``"raise"`` was silently taken
        for ``"skip"``: the check compared with the enum member by identity)."""
        d = self.__dict__
        if "_on_nonfinite" in d:
            return d["_on_nonfinite"]  # type: ignore[no-any-return]
        return OnNonFinite(d.get("on_nonfinite", OnNonFinite.RAISE))  # (copies pickled before)

    @on_nonfinite.setter
    def on_nonfinite(self, value: OnNonFinite | str) -> None:
        if value not in tuple(OnNonFinite):  # (OnNonFinite() named neither it nor the choices)
            raise ValueError(f"Invalid on_nonfinite: {value!r} (choose 'raise' or 'skip')")
        self._on_nonfinite = OnNonFinite(value)

    # ------------------------------------------------------------------ validation

    def _validate_tensors(self) -> None:
        model_params = dict(self.model.named_parameters())
        hp_params = dict(self.hparams.named_parameters())
        if not hp_params:
            raise ValueError("hparams has no parameters: there is nothing to tune")
        if not model_params:
            raise ValueError("model has no parameters to train")
        ref = self._reference_weight()
        self.device, self.dtype = ref.device, ref.dtype
        first = next(iter(model_params.values()))
        self._first_kind = (first.dtype, first.device)
        for n, p in model_params.items():
            if p.device != ref.device:
                raise ValueError(f"model parameter {n!r} is on {p.device}, others on {ref.device}")
        model_ids = {id(p): n for n, p in model_params.items()}
        buffer_ids = {id(b): n for n, b in self.model.named_buffers()}
        for n, p in hp_params.items():
            if not p.is_floating_point():
                raise TypeError(f"hyperparameter {n!r} has dtype {p.dtype}; it must be floating point")
            if not (p.is_leaf and p.requires_grad) and n.rsplit(".", 1)[-1] == "raw_scale":
                # (SelfTuned's perturbation scale frozen by hand was refused with the advice
                # below, about pretrained encoders, which names no way to keep sigma fixed)
                raise ValueError(
                    f"hyperparameter {n!r} (SelfTuned's perturbation scale) must be a leaf tensor "
                    "with requires_grad=True: to keep the scale fixed, build the container with "
                    "SelfTuned(..., learn_scale=False, scale=...) instead of freezing raw_scale"
                )
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(
                    f"hyperparameter {n!r} must be a leaf tensor with requires_grad=True (a frozen "
                    "part of a hyperparameter module, e.g. a pretrained encoder inside an "
                    "augmentation network: keep it outside hparams, reached by closure, or register "
                    "its tensors as buffers)"
                )
            if p.device != ref.device and p.device.type == "meta":
                # (hparams.to() cannot copy a meta tensor, and to_empty() would leave its values,
                # the initial decays, say, uninitialised memory)
                raise ValueError(
                    f"hyperparameter {n!r} is on the meta device, which holds no values (built from "
                    f"the model while it was on meta), but the model is on {ref.device}: build the "
                    "hyperparameters again from the materialised model (after model.to_empty(...) "
                    "and its initialisation); hparams.to() cannot move meta tensors, and "
                    "hparams.to_empty() would leave their values uninitialised"
                )
            if p.device != ref.device:
                raise ValueError(
                    f"hyperparameter {n!r} is on {p.device} but the model is on {ref.device}; "
                    f"call hparams.to({str(ref.device)!r})"
                )
            if id(p) in model_ids:
                raise ValueError(
                    f"hyperparameter {n!r} is also a parameter of the model ({model_ids[id(p)]!r}: a "
                    "container or augmentation network registered inside the model, e.g. model.hp = "
                    "...?): keep hyperparameters out of the model and pass them as hparams only"
                )
            if id(p) in buffer_ids:
                # (every method substitutes and records buffers by value, detached: the model read
                # a constant copy, and the hypergradient was exactly 0 with a DisconnectedWarning
                # that named none of this)
                raise ValueError(
                    f"hyperparameter {n!r} is also a buffer of the model ({buffer_ids[id(p)]!r}: "
                    "registered with register_buffer?): buffers are state the methods copy and "
                    "record by value, so no hypergradient would flow through the model's use of it "
                    "(it would be exactly 0). Keep hyperparameters out of the model and pass them as "
                    "hparams only (a loss reads them from its hparams argument)"
                )
        self._outer_key: tuple[int, ...] = ()
        self._check_outer_optimizer()  # (each of its tensors a hyperparameter, each of these in it)

    def _check_outer_optimizer(self) -> None:
        """Raise if ``outer_optimizer`` holds a tensor that is not a parameter of ``hparams``: at
        construction, and at every hyperstep after a group was added (``add_param_group``), since
        such a tensor would be stepped with a stale ``.grad`` (a model weight moved by
        ``hyper_step``) or never move; or if it lacks a hyperparameter that requires grad (which
        would never move), also after ``hopt.outer_optimizer`` was replaced. Cheap when the groups
        are unchanged."""
        outer = _params_of(self.outer_optimizer)
        key = tuple(id(t) for t in outer)
        if key == getattr(self, "_outer_key", None):  # (copies pickled before it was kept: check)
            return
        model_ids = {id(p): n for n, p in self.model.named_parameters()}
        hp_ids = {id(p) for p in self.hparams.parameters()}
        for t in outer:
            if id(t) in model_ids:
                raise ValueError(
                    f"outer_optimizer holds model parameter {model_ids[id(t)]!r}; "
                    "it should hold hparams.parameters() only"
                )
            if id(t) not in hp_ids:  # it would get no hypergradient: stale .grad, or never moving
                raise ValueError(
                    f"outer_optimizer holds a tensor of shape {tuple(t.shape)} that is not a parameter of "
                    "hparams: hyper_step writes the hypergradient into hparams' parameters only, so it "
                    "would be stepped with a stale .grad or never move. Make it a parameter of the "
                    "hparams module, or give it its own optimiser"
                )
        # and every hyperparameter that is tuned is in it: as at construction, also for an optimiser
        # replaced since (hopt.outer_optimizer = torch.optim.SGD(...) for a second phase, built over
        # some of the containers only: the others' hypergradient was written into .grad and they
        # silently never moved again). One frozen since (requires_grad_(False)) may be left out
        outer_ids = {id(t) for t in outer}
        missing = [
            n for n, p in self.hparams.named_parameters() if p.requires_grad and id(p) not in outer_ids
        ]
        if missing:
            raise ValueError(f"hyperparameter(s) {missing} are not in outer_optimizer, so would never move")
        self._outer_key = key

    def _reference_weight(self, *, checked: bool = True) -> Tensor:
        """The tensor whose dtype and device are the model's (``self.dtype``, ``self.device``):
        the first weight ``inner_optimizer`` trains, else the model's first parameter. Not simply
        the first parameter: a frozen part listed first (a ``bfloat16`` embedding under a
        ``float32`` head) would make the trained weights look like the odd ones out. With
        ``checked=False`` (every step) it is not checked to be a model parameter, which
        :meth:`_trained_weights` does next."""
        model_ids = {id(p) for p in self.model.parameters()} if checked else None
        for t in _params_of(self.inner_optimizer):
            if t.requires_grad and (model_ids is None or id(t) in model_ids):
                return t
        return next(iter(self.model.parameters()))

    def _check_not_moved(self) -> None:
        """Raise if the model was converted (``.to(torch.float64)``, ``.cuda()``) after this object
        was built: its dtype and device, the optimisers' and the method's state all refer to the
        model as it was, and the batch checks would ask for batches of the old dtype.

        Or if ``hopt.model`` was replaced by another module (as ``hopt.inner_optimizer`` may be):
        everything the hypergradients run on (the trained weights' places, the buffers, the
        data-parallel wrapper) was taken from the model given at construction, so the steps
        trained the new model's weights through none of them (Unrolled: each step changed
        nothing, silently, and every hypergradient was 0; Implicit: torch's bare "`inputs`
        argument to `grad()` cannot be empty")."""
        given = self.__dict__.get("_model_given")  # (copies pickled before it was kept: None)
        if given is not None and self.model is not given and unwrap_model(self.model) is self.pair.model:
            # a wrapper of the same module (torch.compile(model) assigned afterwards): its steps
            # train the very weights the hypergradients run on
            self._model_given = given = self.model
        if given is not None and self.model is not given:
            name = type(self).__name__
            raise ValueError(
                f"hopt.model was replaced by another module since this {name} was built; it keeps "
                f"the trained weights' places, buffers and wrappers of the model it was built "
                f"with, so it cannot train or differentiate the new one. Build a new {name} (and "
                f"its optimisers) around the new model, or load new values into the model it "
                f"was built with (model.load_state_dict(...)); hopt.model = ... is not supported "
                f"(hopt.inner_optimizer = ... is)"
            )
        first = next(iter(self.model.parameters()))
        was_first = getattr(self, "_first_kind", None)  # (copies pickled before it was kept)
        # the first parameter's device only: a frozen part may be of another dtype than the trained
        # weights, as at construction, so a frozen encoder halved afterwards to save memory
        # (model.encoder.to(torch.bfloat16)) is no conversion of the model (it was refused, naming
        # bfloat16 as the model's dtype while the trained weights were still float32); a whole
        # model converted changes the trained weights' dtype, checked below
        if was_first is not None and first.device != was_first[1]:
            now, was = (first.dtype, first.device), was_first  # (the whole model moved)
        else:
            ref = self._reference_weight(checked=False)
            now, was = (ref.dtype, ref.device), (self.dtype, self.device)
        if now != was:
            name = type(self).__name__
            raise ValueError(
                f"the model's parameters are now {now[0]} on {now[1]}, but were {was[0]} on "
                f"{was[1]} when this {name} was built. Convert or move the model (and hparams) "
                f"first, then build the optimisers and the {name} (as torch.optim asks)"
            )
        for n, p in self.hparams.named_parameters():
            was = self._hparam_kinds.get(n)
            if was is not None and (p.dtype, p.device) != was:
                name = type(self).__name__
                raise ValueError(
                    f"hyperparameter {n!r} is now {p.dtype} on {p.device}, but was {was[0]} on {was[1]} "
                    f"when this {name} was built (outer_optimizer's state is in the old one). Convert or "
                    f"move hparams first, then build the optimisers and the {name} (as torch.optim asks)"
                )

    def _check_same_hparams(self) -> None:
        """Raise if ``hparams`` holds other parameters than at construction (one registered or
        replaced since): the hypergradient covers the tensors the object was built with only, so
        a new one would silently never move (and :meth:`hypergradient` return fewer tensors than
        ``hparams.parameters()``)."""
        now = list(self.hparams.named_parameters())
        built = self.pair.hparam_tensors
        if len(now) == len(built) and all(p is q for (_, p), q in zip(now, built, strict=True)):
            return
        known = {id(q) for q in built}
        current = {id(p) for _, p in now}
        added = [n for n, p in now if id(p) not in known]
        gone = [n for n, q in zip(self.pair.hparam_names, built, strict=True) if id(q) not in current]
        name = type(self).__name__
        raise ValueError(
            f"hparams holds other parameters than when this {name} was built (new or replaced: "
            f"{added}; no longer there: {gone}): the hypergradient covers the tensors it was built "
            f"with only, so these would never move. Register every hyperparameter (and put it in "
            f"outer_optimizer) before building the {name}, and change their values in place "
            f"(with torch.no_grad(): p.copy_(...)) rather than assigning new tensors"
        )

    def _warn_float16_autocast(self) -> None:
        """Warn once when a hypergradient is computed under float16 autocast: no loss scale
        protects its backward passes (``step(scaler=...)`` covers the inner step only), so small
        second-order terms underflow (a hypergradient came out exactly 0 in a probe)."""
        dev = self.device.type
        if self._warned_fp16 or not torch.amp.is_autocast_available(dev):
            return
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16:
            self._warned_fp16 = True
            _warn_user(
                f"{type(self).__name__}: a hypergradient computed under torch.autocast(dtype=float16): "
                "no loss scale protects its backward passes (step(scaler=...) covers the inner "
                "step only), so small terms underflow to 0 and the hypergradient can be silently "
                "wrong. Call hyper_step / hypergradient outside the float16 block (float32), or "
                "use bfloat16 autocast. (Warned once.)",
                UserWarning,
            )

    _warned_fp16 = False

    def _check_not_joined(self) -> None:
        """Raise when the ``DistributedDataParallel`` wrapper is in join mode (``model.join()``):
        a rank that ran out of batches shadows the wrapper's all-reduces only, not hypergrad's own
        (the guards' mean loss, the averaged hypergradient), so the ranks' collectives would no
        longer match (gloo aborts the process, NCCL hangs until its timeout). torch leaves the
        wrapper in join mode after the block, until ``model.join(enable=False)``."""
        if self.ranks.size > 1 and joined(self.model):
            raise RuntimeError(
                f"{type(self).__name__} does not support DistributedDataParallel.join() (uneven "
                "inputs): a rank that runs out of batches would not take part in hypergrad's own "
                "collectives (the guards' mean loss, the averaged hypergradient), and the ranks would "
                "hang or abort. Give every rank the same number of batches "
                "(torch.utils.data.DistributedSampler pads the shards to equal length; or drop the "
                "remainder) and train without join(). (torch leaves the wrapper in join mode after a "
                "join() block; model.join(enable=False) turns it off)"
            )

    def _check_syncing(self) -> None:
        """Raise when :meth:`step` is called inside the ``DistributedDataParallel`` wrapper's
        ``no_sync()`` (the gradient-accumulation idiom): :meth:`step` is a whole optimiser step
        (``zero_grad``, ``backward``, ``optimizer.step()``), so each rank would update its weights
        with its own shard's gradient and the ranks would silently drift apart (weights 0.26 apart
        after six steps in a probe)."""
        if self.ranks.size > 1 and not_syncing(self.model):
            raise RuntimeError(
                f"{type(self).__name__}.step() was called inside DistributedDataParallel.no_sync(): "
                "step() is a whole optimiser step (zero_grad, backward, optimizer.step()), not a "
                "backward pass to accumulate, so each rank would update its weights with its own "
                "shard's gradient and the ranks would drift apart. Call step() outside no_sync(); "
                "for gradient accumulation, pass the micro-batches together as one batch"
            )

    def _trained_weights(self) -> list[Tensor]:
        """The weights ``inner_optimizer`` trains now (its params that require grad), validated."""
        inner = _params_of(self.inner_optimizer)
        if not inner:
            raise ValueError("inner_optimizer has no parameters")
        trained = [t for t in inner if t.requires_grad]
        # (and of the model's dtype: a trained part converted since, model.head.double() or
        # .half(), kept its tensors, so the key matched and the steps ran on mixed dtypes that
        # construction refuses: momentum buffers of the old dtype, or torch's bare "expected
        # dtype float for `end` but got dtype double" from Adam; the check below names it)
        dtype = self.dtype
        if len(trained) == len(self._weights_key) and all(
            id(t) == k and t.dtype == dtype for t, k in zip(trained, self._weights_key, strict=False)
        ):
            gone = self.pair.replaced_weights()  # (the model changed under the optimiser)
            if gone:
                name = type(self).__name__
                raise ValueError(
                    f"the model no longer holds the weights {gone[:4]} that inner_optimizer trains: "
                    "a parametrisation was registered on them (torch.nn.utils.parametrize, "
                    "parametrizations.weight_norm / orthogonal / spectral_norm) or a new parameter "
                    "assigned in their place (module.weight = nn.Parameter(...), "
                    f"load_state_dict(..., assign=True)) since this {name} was built, so the optimiser would "
                    "step tensors the model no longer uses and the model's new ones would never "
                    f"train. Change the model first, then build the optimisers and the {name}"
                )
            return trained  # unchanged since the last check (the common case): no more work
        model_ids = {id(p): n for n, p in self.model.named_parameters()}
        hp_ids = {id(p): n for n, p in self.hparams.named_parameters()}
        for t in inner:
            if id(t) in hp_ids:
                raise ValueError(
                    f"inner_optimizer holds hyperparameter {hp_ids[id(t)]!r}; "
                    "it should hold the model's weights only"
                )
            if id(t) not in model_ids:
                raise ValueError("inner_optimizer holds a tensor that is not a parameter of model")
            if t.dtype != self.dtype:
                since = (
                    f" (it was {self.dtype} when this {type(self).__name__} was built: convert the "
                    "whole model first, then build the optimisers and the method)"
                    if id(t) in set(self._weights_key)
                    else ""
                )
                raise ValueError(
                    f"model parameter {model_ids[id(t)]!r} is {t.dtype}, others {self.dtype}{since}"
                )
            if t.device != self.device:
                raise ValueError(
                    f"model parameter {model_ids[id(t)]!r} is on {t.device}, others on {self.device}"
                )
        if not trained:
            raise ValueError("none of inner_optimizer's parameters requires grad: nothing to train")
        trained_ids = {id(t) for t in trained}
        overlap = _sharing_memory(trained, [p for p in self.model.parameters() if id(p) not in trained_ids])
        if overlap:
            a, b = (model_ids[id(t)] for t in overlap)
            raise ValueError(
                f"the model parameters {a!r} and {b!r} share memory (at least one of them is "
                "trained): nn.Parameter(p) (or of p.t(), or of a view of p) shares p's storage, and so "
                "does a parametrisation (weight_norm, parametrize.register_parametrization) registered "
                "on a layer whose weight is tied into another module. The optimiser's steps on one "
                "then change the other (a frozen one too) in place, while autograd and every "
                "hypergradient take them for independent tensors: hypergradients would be silently "
                "wrong. Tie weights by assigning the same parameter (decoder.weight = encoder.weight; "
                "register parametrisations before tying), or give each its own copy "
                "(nn.Parameter(p.detach().clone()))"
            )
        return trained

    def _refresh(self) -> None:
        """Follow the inner optimiser's param groups and ``requires_grad`` flags, and the model's
        layout (cheap if unchanged).

        The layout: a submodule replaced outside the trained weights (``model.norm =
        nn.BatchNorm1d(...)``, a frozen part swapped), or a buffer registered as ``None`` and set
        by a forward pass (a lazily initialised running mean), left the places
        :class:`FunctionalPair` substitutes buffers into as they were: the new module's or buffer's
        real values were then updated by every hypergradient's forward passes, and Unrolled's
        replay did not start from the recorded ones. The places are taken afresh then, and a new
        episode begins (the recorded steps ran on the old layout). Looked at only when a module,
        parameter or buffer was registered anywhere since the last look (a global counter)."""
        weights = self._trained_weights()
        key = tuple(id(w) for w in weights)
        moved = key != self._weights_key
        seen = registrations()
        if seen != getattr(self, "_registrations_seen", None):
            layout = module_layout(self.pair.model)
            if layout != getattr(self, "_layout", layout):
                moved = True
                # a trained submodule replaced (``model.head = nn.Linear(...)``): its old weights,
                # which inner_optimizer still trains, left the model through no slot the
                # replaced-weight check watches, and set_weights dropped them from the trained
                # weights silently (the new layer never trained). Refused before anything is
                # taken as seen, so every later call is refused too
                self._check_weights_held(weights)
            self._registrations_seen = seen
            self._layout = layout
        if moved:
            self.pair.set_weights(weights)
            self._weights_key = key
            self._weights_changed()

    def _check_weights_held(self, weights: Sequence[Tensor]) -> None:
        """Raise if a weight ``inner_optimizer`` trains is no longer a parameter of the model (its
        module was replaced since the last look), or a hyperparameter now is one (the container
        registered inside the model, as the constructor refuses); only called when the model's
        layout moved."""
        named = dict(self.pair.model.named_parameters())
        held = {id(p) for p in named.values()}
        hp_ids = {id(p) for p in self.pair.hparam_tensors}
        inside = [n for n, p in named.items() if id(p) in hp_ids]
        inside += [n for n, b in self.pair.model.named_buffers() if id(b) in hp_ids]  # (register_buffer)
        if inside:
            # (the hyperparameters were taken for frozen weights changed outside step(), with
            # warnings that named neither the container nor the fix)
            name = type(self).__name__
            raise ValueError(
                f"the model now holds hyperparameters as its own parameters ({inside[:4]}): the "
                f"hparams container was registered inside the model (model.hp = ..., add_module, or "
                f"register_buffer) "
                f"since this {name} was built. Keep hyperparameters out of the model and pass them "
                "as hparams only (a loss reads them from its hparams argument). Nothing was changed"
            )
        if all(id(w) in held for w in weights):
            return
        known = dict(zip(map(id, self.pair.weights), self.pair.weight_names, strict=True))
        gone = [known.get(id(w), f"a tensor of shape {tuple(w.shape)}") for w in weights if id(w) not in held]
        name = type(self).__name__
        raise ValueError(
            f"the model no longer holds the weights {gone[:4]} that inner_optimizer trains: the "
            "module that held them was replaced (model.head = nn.Linear(...) or nn.Identity()) since this "
            f"{name} was built, so the optimiser would step tensors the model no longer uses and the "
            f"new module's weights would never train. Change the model first, then build the "
            f"optimisers and the {name} (or freeze the replaced module's old weights, "
            "requires_grad_(False), to leave the new module untrained on purpose). Nothing was changed"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state[_COPIED_METHOD_STATE] = self._method_state()
        state.pop("_attribute_modules", None)  # (the original's modules: re-taken by the copy)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``copy.deepcopy`` and pickling give a copy that goes on exactly as the original would.

        The copy's weights are new tensor objects (with fresh version counters), which the
        bookkeeping that notices weights replaced outside :meth:`step` would otherwise take for
        a change and forget the method's history (warm start, step-size estimate, recorded
        steps). So the identities are re-taken from the copied :attr:`pair`, and the method's
        state is loaded as :meth:`load_state_dict` does (it re-takes what it keeps of them)."""
        state = dict(state)
        method = state.pop(_COPIED_METHOD_STATE, None)
        self.__dict__.update(state)
        self.__dict__.setdefault("_hparam_kinds", {})  # (copies pickled before it was kept)
        self._weights_key = tuple(id(w) for w in self.pair.weights)
        self._layout = module_layout(self.pair.model)  # (the copy's own modules)
        self._registrations_seen = registrations()
        if method is not None:
            self._load_method_state(method)

    def _weights_changed(self) -> None:
        """Called when the set of trained weights changed (a group added, a layer frozen)."""
        self.start_episode()

    def start_episode(self) -> None:  # noqa: B027 - methods without history keep nothing
        """Say that the weights were just (re-)initialised or replaced outside :meth:`step` (a new
        episode in dataset distillation or meta-learning): the method forgets what it kept from
        the weights' history (:class:`Unrolled`'s recorded steps, :class:`Implicit`'s warm start
        and step-size estimate)."""

    def _find_settings(self) -> list[tuple[int, OptimizerSetting]]:
        out = []
        names = self.pair.hparam_names
        tuned: dict[str, str] = {}  # setting name -> the container tuning it
        for prefix, m in self.hparams.named_modules():
            if isinstance(m, OptimizerSetting):
                if m.optimizer[0] is not self.inner_optimizer:
                    raise ValueError(f"hparams.{prefix} tunes a different optimiser than inner_optimizer")
                if m.name in tuned:  # (each container covers every param group of the optimiser)
                    raise ValueError(
                        f"hparams.{tuned[m.name]} and hparams.{prefix} both tune inner_optimizer's "
                        f"{m.name!r}: keep one (relative=True learns a multiplier on a scheduled value)"
                    )
                tuned[m.name] = prefix
                raw_name = f"{prefix}.raw" if prefix else "raw"
                out.append((names.index(raw_name), m))
        return out

    # ------------------------------------------------------------------ the inner step

    @_with_autograd
    def step(
        self, batch: Batch, *, max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None
    ) -> Tensor:
        """One step of ``inner_optimizer`` on ``train_loss`` at ``batch``; returns the value of
        ``train_loss`` (detached; it includes any penalty the loss adds).

        Args:
            batch: the training batch, passed to ``train_loss`` as is (its floating-point
                tensors on the model's device; in its dtype, unless ``train_loss`` casts them, e.g.
                ``model(x.float())`` on float64 data from NumPy; integer ones are not checked).
            max_grad_norm: clip the gradient before the update, as
                ``torch.nn.utils.clip_grad_norm_(weights, max_grad_norm)`` between ``backward()``
                and ``optimizer.step()`` would (2-norm over all trained weights together; after
                DDP's averaging); a finite number > 0, or ``None`` for no clipping (default:
                ``None``). The value is recorded with the step, so :class:`~hypergrad.Unrolled`
                replays (and differentiates through) the clipping too; per call, so it may follow a
                schedule. Clipping in an optimiser or gradient hook instead is invisible to the
                replay.
            scaler: a ``torch.amp.GradScaler`` for float16 training (float32 weights, losses
                under ``torch.autocast(dtype=torch.float16)``), used as in torch's recipe
                ``scaler.scale(loss).backward(); scaler.unscale_(opt); clip; scaler.step(opt);
                scaler.update()``: the backward pass runs on the scaled loss, the gradients are
                unscaled before clipping and the update. A step whose gradients overflowed
                (not finite while the loss is) is skipped and ``scaler.update()`` lowers the
                scale, as torch's would, with no :class:`NonFiniteError` or warning: nothing
                changes but the scaler, and ``inner_steps`` does not advance. A non-finite loss
                is still refused by ``on_nonfinite`` (the scaler untouched). Hypersteps take no
                scaler: their losses run in the caller's autocast state, so call
                :meth:`hyper_step` outside the float16 block to compute them in float32
                (default: ``None``; a disabled ``GradScaler`` is the same).

        Returns:
            The training loss (unscaled), a detached 0-dim tensor (``nan`` when a loss that refused a
            non-finite hyperparameter raised and ``on_nonfinite="skip"``).

        Raises:
            NonFiniteError: (``on_nonfinite="raise"``) the loss or a gradient is not finite, or
                the loss diverged (``divergence``); nothing was changed.
            TypeError: ``scaler`` is not a ``torch.amp.GradScaler``.
            ValueError: an invalid ``max_grad_norm``, a ``scaler`` for another device type or
                with float16 trained weights, a ``batch`` that is ``None`` or holds a
                floating-point tensor on another device than the model (or of another dtype, which
                the loss then failed on: the dtype error is named so), an
                inner optimiser whose parameters changed into something it cannot train, or a
                trained weight the model no longer holds (a parametrisation registered on it, or a
                new parameter assigned in its place, since construction).
            TypeError: ``batch`` is a function (a ``step(closure)`` habit from ``torch.optim``),
                or is or holds an iterator (a generator, ``zip``, ``iter(list)``: pass a list).
            RuntimeError: called under ``torch.inference_mode()``, or inside
                ``DistributedDataParallel.join()`` or ``no_sync()`` (see the class docstring).

        Cost: one forward and one backward pass of ``train_loss`` and one optimiser step, as in
        plain PyTorch; :class:`~hypergrad.Unrolled` also copies the batch (and every ``steps``
        steps or after a hyperstep, the weights and optimiser state) for its replay.

        Equivalent to ``inner_optimizer.zero_grad(); train_loss(...).backward();
        inner_optimizer.step()`` on the real model (weights the loss does not reach keep
        ``.grad = None``, so ``torch.optim`` skips them; buffers are updated, or reassigned, as by
        an ordinary forward pass; the hyperparameters' ``.grad`` is not touched; a loss that went
        through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` is differentiated
        by a plain ``backward()``, as torch needs for it, the other parameters' ``.grad`` put
        back), except that a non-finite (or diverged) loss or gradient changes nothing, torch's
        random generator included (see ``on_nonfinite``). The
        guard costs one host synchronisation per step (two with ``divergence`` set, and one more
        on the first accepted step, which reads the loss scale: with ``divergence`` set, on each
        until a nonzero loss is accepted). Autograd is on inside, whatever the
        caller's grad mode (``torch.no_grad()`` blocks are fine, as for ``torch.optim``'s
        closures); under ``torch.inference_mode()`` every training call raises.
        """
        self._check_not_moved()
        self._check_not_joined()
        self._check_syncing()
        check_batch(batch, "batch", self.device, self.dtype, dtypes=self._strict_batch_dtypes)
        with naming_batch_dtypes([batch_dtype_problem(batch, "batch", self.dtype)]):
            return self._step(batch, max_grad_norm, scaler)

    def _step(self, batch: Batch, max_grad_norm: float | None, scaler: torch.amp.GradScaler | None) -> Tensor:
        max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self._refresh()
        pair = self.pair
        weights = pair.weights
        scaler = _check_scaler(scaler, weights, pair.weight_names, self.device)
        self._before_step()
        # before the forward pass: a refused write must leave no trace (checked after it, the
        # refused step had moved BatchNorm's statistics, torch's generator and the weights' .grad)
        for _, setting in self.settings:
            setting.check()
        rng_before = self._rng_state()  # (a refused step puts the generator back: nothing changed)
        rng = rng_before if self._replays_rng else None
        snapshot = pair.snapshot_buffers()
        hp_snapshot = self._snapshot_hparam_buffers()
        # the modules' plain tensor attributes (a hidden state the forward carries over between
        # batches, ``self.state = h.detach()``): a refused step puts the objects back, or the
        # state of a NaN batch started every later step from NaN and each one was refused
        attributes = self._attributes_now()
        # the model's parameters that require grad outside inner_optimizer (a second optimiser's,
        # e.g. SparseAdam's sparse embedding) get their gradient accumulated, as loss.backward()
        # gives it, once the step is accepted (backward(inputs=weights) gave them none: a second
        # optimiser stepped nothing and that part never trained, silently)
        left = self._left_out()
        self._left_now = left
        everything = [*_params_of(self.inner_optimizer), *left]  # frozen ones too, as zero_grad() would
        old_grads = [w.grad for w in everything]
        for w in everything:
            w.grad = None
        # on the user's model itself: a DistributedDataParallel wrapper's reducer averages the
        # gradients, unless the step needs it off (then they are averaged below, in one all-reduce)
        by_hand = self._averages_by_hand()
        # (read by _train_backward, which scales the loss it differentiates, and by _record_step)
        self._scaler = scaler
        try:
            with no_sync(self.model) if by_hand else contextlib.nullcontext():
                try:
                    loss = self._train_backward(batch, weights)
                finally:
                    self._left_now = []
        except BaseException as error:
            self._scaler = None
            pair.restore_buffers(snapshot)
            pair.restore_buffers(hp_snapshot)
            _put_attributes_back(attributes)
            for w, g in zip(everything, old_grads, strict=True):
                w.grad = g
            # (and the generator: the forward pass may have drawn dropout masks before the loss
            # raised, and a script that catches the error and goes on differed from one that never
            # made the call, bit for bit, from there on)
            self._set_rng_state(rng_before)
            # a loss that refuses a NaN hyperparameter (a dropout rate, say) is a non-finite step
            bad = self._nonfinite_hparams() if isinstance(error, Exception) else ""
            if not bad:
                raise
            self._nonfinite(
                f"inner step {self.inner_steps}: {bad} (train_loss raised {type(error).__name__}: {error})"
            )
            return torch.full((), float("nan"), dtype=self.dtype, device=self.device)
        if by_hand:  # (DDP's mean; the parameters outside inner_optimizer too, as its reducer averages them)
            average_gradients([*weights, *left], self.ranks.group, self.ranks.size)
        # the guards judge the loss of the concatenated batch (the ranks' mean): every rank decides alike
        mean_loss, counts = self._mean_loss_and_counts(loss.detach())
        if counts is not None and len(set(counts)) > 1:
            # ranks at different inner steps: a checkpoint loaded on some ranks only (DDP broadcasts
            # the weights when it is built, never after), or per-rank files of different steps; each
            # rank would go on training its own weights with the others' averaged gradients
            self._scaler = None
            pair.restore_buffers(snapshot)
            pair.restore_buffers(hp_snapshot)
            _put_attributes_back(attributes)
            for w, g in zip(everything, old_grads, strict=True):
                w.grad = g
            self._set_rng_state(rng_before)
            listed = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
            raise RuntimeError(
                f"the DistributedDataParallel ranks are at different inner steps ({listed}; counted "
                "modulo 2**20): their weights differ, and each would go on training its own copy "
                "with the others' averaged gradients. Was a checkpoint loaded on some ranks only "
                "(`if rank == 0: hopt.load_state_dict(...)`)? DistributedDataParallel broadcasts the "
                "weights only when it is built: load the checkpoint on every rank (the same one, or "
                "each rank's own saved at the same step). Nothing was changed by this step"
            )
        grads = [w.grad for w in weights]
        if not any(g is not None for g in grads):
            scaler = None  # (a constant loss: nothing to unscale, and the scale stays as it is)
            if loss.requires_grad:
                # a loss with a graph that reaches none of the trained weights: the step changes
                # nothing, silently. Typically it evaluates a model captured from outside rather
                # than the one it is given: a closure over ``model`` goes on reading the
                # original's after copy.deepcopy(hopt) or pickling, so the copy never trained
                # (a constant loss, without a graph, is warned about in _train_backward)
                _warn_user(
                    f"{type(self).__name__}.step: train_loss (value {float(loss.detach()):.6g}) reaches "
                    f"none of the weights inner_optimizer trains, so this step changes no weight. Does "
                    "it evaluate a model (or hyperparameters) captured from outside rather than the "
                    "model and hparams it is given? A closure over `model` keeps reading the "
                    "original's after copy.deepcopy(hopt), pickling or a rebuilt model: use the "
                    "arguments train_loss(model, hparams, batch) receives",
                    DisconnectedWarning,
                )
        # the model's floating-point buffers, judged in the same host read: a finite loss and
        # gradient whose forward pass wrote inf / NaN into one (a BatchNorm variance that overflowed
        # on an outlier batch) was accepted, and every later eval-mode loss read it (single process
        # only: each rank holds its own statistics, and the ranks must decide alike)
        watched: list[tuple[int, Tensor]] = []
        unwatched: set[str] = self.__dict__.setdefault("_unwatched_buffers", set())
        if self.ranks.size <= 1:
            watched = [
                (j, d[k])
                for j, (d, k, _, _) in enumerate(snapshot)
                if (d[k].is_floating_point() or d[k].is_complex())
                and d[k].numel()
                and pair.buffer_names[j] not in unwatched
            ]

        def written() -> str:
            """On the failure path only: the buffers this step made non-finite ('' if each of
            them held NaN / inf before it, as a mask of -inf does: not watched from then on)."""
            bad = []
            for j, t in watched:
                if not all_finite(t):
                    if all_finite(snapshot[j][3]):
                        bad.append(pair.buffer_names[j])
                    else:
                        unwatched.add(pair.buffer_names[j])
            if not bad:
                return ""
            return (
                f"the step's forward pass wrote NaN or infinite values into the buffer(s) {bad} while "
                "the loss and the gradient are finite (an outlier in the batch overflowing a running "
                "statistic?)"
            )

        problem = self._check_loss(
            mean_loss, [g for g in grads if g is not None], [t for _, t in watched], written
        )
        if problem:
            self._scaler = None
            # under a GradScaler, gradients that overflowed while the loss is finite are routine:
            # the scaler records them (unscale_) and lowers its scale (update); nothing else moves
            overflow = False
            if scaler is not None and self._overflowed(mean_loss, grads):
                scaler.unscale_(self.inner_optimizer)
                scaler.update()
                overflow = True
            pair.restore_buffers(snapshot)
            pair.restore_buffers(hp_snapshot)
            _put_attributes_back(attributes)
            for w, g in zip(everything, old_grads, strict=True):
                w.grad = g
            if not overflow:
                where = _nonfinite_entries("the gradient", pair.weight_names, grads)
                held = _nonfinite_entries("the weight itself", pair.weight_names, weights)
                if held:  # (they were so before this step: the loss and gradient only follow)
                    where += (
                        f"{held}, before this step: an earlier optimiser step or a loaded state "
                        "wrote them (a float16 model under Adam-like optimisers: their eps=1e-8 "
                        "rounds to 0 in float16, so a zero second moment gives 0/0; keep float32 "
                        "weights and run the losses under torch.autocast, or raise eps to 1e-4)"
                    )
                # (likewise a buffer: a BatchNorm statistic loaded or written as NaN outside step(),
                # which every later step in eval mode would read; the buffers are as before the step)
                stale = _nonfinite_entries(
                    "the buffer itself",
                    pair.buffer_names,
                    [b if b.is_floating_point() or b.is_complex() else None for b in pair.buffers()],
                )
                if stale:
                    where += (
                        f"{stale}, before this step: a loaded state or code outside hopt.step() wrote it "
                        "(each later step reading it is refused too: reset or reload it)"
                    )
                self._set_rng_state(rng_before)
                empty = empty_batch_note(batch, "the batch")
                self._nonfinite(f"inner step {self.inner_steps}: {problem}{where}{empty}")
            return loss.detach()
        if left:  # accepted: their gradients accumulate on what they held, as backward() does
            # (under a GradScaler they stay scaled, as in torch's recipe: scaler.step(second) unscales)
            with torch.no_grad():
                for w, old in zip(left, old_grads[len(everything) - len(left) :], strict=True):
                    if old is not None:
                        w.grad = old if w.grad is None else old.add_(w.grad)
        if scaler is not None:  # (no host synchronisation: the gradients are known finite)
            scaler.unscale_(self.inner_optimizer)
        try:
            if max_grad_norm is not None:  # clip_grad_norm_'s scaling, with the replay's arithmetic
                live = [w for w in weights if w.grad is not None]
                with torch.no_grad():
                    clipped = clip_by_total_norm([w.grad for w in live], max_grad_norm)  # type: ignore[misc]
                for w, g in zip(live, clipped, strict=True):
                    w.grad = g
            pre_forward_buffers = tuple(value for *_, value in snapshot)
            self._record_step(
                batch,
                tuple(g is not None for g in grads),
                rng,
                pre_forward_buffers,
                max_grad_norm,
                hparam_buffers=tuple(value for *_, value in hp_snapshot),
            )
            self._scaler = None
            try:
                for _, setting in self.settings:
                    setting.write()
                self.inner_optimizer.step()
            except BaseException:
                # the optimiser refused the update (Adam given a sparse gradient, out of memory in
                # its state's first allocation): no step was taken, so none is recorded (a script
                # that catches the error and goes on had a replay with a step that never happened)
                self._forget_step()
                raise
            finally:
                for _, setting in self.settings:
                    setting.restore()
        except BaseException:
            self._scaler = None
            if scaler is not None:
                _forget_unscale(scaler, self.inner_optimizer)
            raise
        if scaler is not None:
            scaler.update()
        _forget_autocast_casts(self.device)
        self._after_step()
        self.inner_steps += 1
        if self._loss_scale is None or (self._loss_scale == 0 and self.divergence is not None):
            # (a zero loss is no scale: nothing would be "within divergence times" it)
            self._loss_scale = abs(float(mean_loss))
        return loss.detach()

    def _mean_loss_and_counts(self, loss: Tensor) -> tuple[Tensor, list[int] | None]:
        """The ranks' mean loss, and each rank's inner-step count (modulo 2**20) carried by the
        same all-reduce (one slot per rank, exact in float32); ``None`` with one rank."""
        if self.ranks.size <= 1:
            return loss, None
        slots = torch.zeros(
            self.ranks.size, dtype=torch.promote_types(loss.dtype, torch.float32), device=loss.device
        )
        slots[self._rank()] = float(self.inner_steps % 2**20)
        mean, slots = self.ranks.mean([loss.to(slots.dtype), slots])
        counts = [int(c) for c in (slots * self.ranks.size).round().tolist()]
        return mean.reshape(loss.shape).to(loss.dtype), counts

    def _averages_by_hand(self) -> bool:
        """Whether :meth:`step` turns the DistributedDataParallel reducer off and averages the
        gradients itself: under ``find_unused_parameters=True``, where the reducer refuses a
        gradient reaching a weight outside the forward (a penalty on a branch that the forward
        did not use: "Expected to mark a variable ready only once"), and in methods whose step
        runs several backward passes (the reducer expects one per forward)."""
        return self.ranks.size > 1 and any(d.find_unused_parameters for d in ddp_wrappers(self.model))

    def _attributes_now(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        """The model's and the hyperparameter module's attributes (among them the state a forward
        pass keeps, such as a carried hidden state), by reference, for
        :func:`_put_attributes_back`: a shallow copy of each module's ``__dict__`` (C speed; the
        module list is re-taken only when a module was registered somewhere since)."""
        key = registrations()
        cached = getattr(self, "_attribute_modules", None)
        if cached is None or cached[0] != key:
            cached = (key, self._state_modules())
            self._attribute_modules = cached
        return [(m, vars(m).copy()) for m in cached[1]]

    def _state_modules(self) -> list[nn.Module]:
        """The modules whose plain tensor attributes (state a forward pass keeps, e.g. a hidden
        state or a running mean stored as ``self.x = ...``) a step records and its replay starts
        from: the model's and the hyperparameter module's (an augmentation network's running
        statistics: the replay advanced them ``steps`` more times per hyperstep, and the steps
        after it no longer reproduced)."""
        seen: set[int] = set()
        out = []
        for m in (*self.pair.model.modules(), *self.hparams.modules()):
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def _snapshot_hparam_buffers(self) -> list[tuple[dict[str, Any], str, Tensor, Tensor]]:
        """The hyperparameter module's buffers (e.g. the BatchNorm statistics of a learned
        augmentation network) with copies of their values, for ``FunctionalPair.restore_buffers``:
        they move with accepted inner steps only (usually there are none: no copy)."""
        return [(d, k, d[k], d[k].detach().clone()) for d, k in _buffer_slots(self.hparams)[1]]

    def _hparam_buffers_at(self, values: Tensors | None = None) -> contextlib.AbstractContextManager[None]:
        """Within the block the hyperparameter module's buffers (a learned augmentation network's
        running normaliser, a step counter) are copies of ``values`` (``None``: of their current
        values), and the real ones are left alone: for the losses of a hypergradient, each of which
        must read the values a real step would (Implicit: on the real ones, a module that updates a
        buffer and reads it saw val_loss's update in train_loss, 98% off; Unrolled replays each
        step from its recorded values, 37% off before)."""
        slots = _buffer_slots(self.hparams)[1]
        if values is None:
            values = tuple(d[k] for d, k in slots)
        if not slots or len(values) != len(slots):  # (none; or a record from before they existed)
            return contextlib.nullcontext()
        return substituting(([slot], v.clone()) for slot, v in zip(slots, values, strict=True))

    def _train_backward(self, batch: Batch, weights: Sequence[Tensor], model: Any = None) -> Tensor:
        """The training loss at ``batch`` on the real model (or on ``model``, a stand-in for it),
        its gradient w.r.t. ``weights`` accumulated into their (cleared) ``.grad``; returns the
        loss (with its graph)."""
        model = self.model if model is None else model
        # (the hyperparameters' .grad set aside during the call: a train_loss that runs backward
        # itself, refused below, would accumulate into them in place)
        with _grads_set_aside(self.pair.hparam_tensors), noting_reentrant_checkpoints() as reentrant:
            loss = self.pair._check_scalar(self.train_loss(model, self.hparams, batch), self.train_loss)
        if loss.requires_grad and any(w.grad is not None for w in weights):  # (cleared before the call)
            # train_loss ran backward passes of its own (over all micro-batches but the last, or an
            # auxiliary term) and returned the rest with its graph: the real step applied the sum,
            # while every hypergradient differentiates only the returned loss (Unrolled: silently
            # another hypergradient at K = 1, torch's "backward through the graph a second time"
            # inside the replay at K >= 2)
            raise ValueError(
                f"{type(self).__name__}.step: train_loss ran .backward() itself (the weights already "
                "had gradients when it returned) and returned a loss with an autograd graph: the step "
                "would apply both, while a hypergradient differentiates only the returned loss. "
                "Return the whole loss (e.g. the mean of every micro-batch's loss) without calling "
                "backward, and let step() run the backward pass (torch.autograd.grad for a gradient "
                "the loss needs, e.g. an input's). Nothing was changed by this step"
            )
        if loss.requires_grad:
            scaler = self._scaler  # (step's GradScaler: the gradients come out scaled)
            out = loss if scaler is None else scaler.scale(loss)
            left = getattr(self, "_left_now", ())  # (step's: parameters outside inner_optimizer)
            if reentrant():
                self._backward_everywhere(out, [*weights, *left])
            else:
                out.backward(inputs=[*weights, *left])
        elif any(w.grad is not None for w in weights):  # (cleared before the call)
            raise ValueError(
                f"{type(self).__name__}.step: train_loss returned a loss without an autograd graph, "
                "yet the weights got gradients: it calls .backward() itself (gradient accumulation "
                "over micro-batches?), which no hypergradient can differentiate through. Return the "
                "loss with its graph (e.g. the mean of the micro-batches' losses) and let step() run "
                "the backward pass"
            )
        elif any(w.requires_grad for w in weights):
            # a constant loss (a batch with nothing to learn, say every example masked) skips the
            # update, as `if loss.requires_grad: loss.backward()` would; but a loss computed under
            # no_grad or detached by mistake would skip every step silently: say so
            _warn_user(
                f"{type(self).__name__}.step: train_loss returned a loss that does not require grad "
                f"(value {float(loss.detach()):.6g}), so this step changes no weight. Fine for a batch "
                "with nothing to learn; otherwise the loss was computed under torch.no_grad() or "
                "detached (.item(), .detach(), a new tensor): return it with its graph",
                DisconnectedWarning,
            )
        return loss

    def _left_out(self) -> list[Tensor]:
        """The model's parameters that require grad but are not in ``inner_optimizer`` (nor
        hyperparameters): plain ``loss.backward()`` gives them a gradient, which a second
        optimiser may step. The list is re-taken when the trained weights or the model's layout
        change; ``requires_grad`` is read at each call (a pass over that list only)."""
        key = (self._weights_key, registrations())
        cached = getattr(self, "_left_out_cache", None)
        if cached is None or cached[0] != key:
            inner = {id(p) for p in _params_of(self.inner_optimizer)}
            inner |= {id(h) for h in self.pair.hparam_tensors}
            cached = (key, [p for p in self.ranks.module.parameters() if id(p) not in inner])
            self._left_out_cache = cached
        return [p for p in cached[1] if p.requires_grad]

    def _backward_everywhere(self, loss: Tensor, weights: Sequence[Tensor]) -> None:
        """``loss.backward()`` without ``inputs=``, for a loss that went through
        ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``: torch skips a reentrant
        checkpoint's recomputation in a backward pass that names its inputs, so the weights inside
        it silently got no gradient and never trained. The ``.grad`` of the hyperparameters and
        of the model's other parameters are put back as they were (tensors outside both, such as
        an input with ``requires_grad=True``, accumulate theirs, as in plain PyTorch)."""
        trained = {id(w) for w in weights}
        others = [
            t
            for t in (*self.pair.hparam_tensors, *self.ranks.module.parameters())
            if t.requires_grad and id(t) not in trained
        ]
        with _grads_set_aside(others):
            loss.backward()

    def _check_loss(
        self,
        loss: Tensor,
        grads: Sequence[Tensor],
        buffers: Sequence[Tensor] = (),
        written: Callable[[], str] | None = None,
    ) -> str:
        """'' when the training loss, the gradients and the hyperparameters are finite (and the
        loss has not diverged), else what is wrong. One host synchronisation. ``buffers`` are
        judged in the same read; where they are the only non-finite values, ``written()`` says
        whether that is a problem."""
        finite = all_finite(loss, grads, self.pair.hparam_tensors, buffers)
        if (
            not finite
            and buffers
            and written is not None
            and all_finite(loss, grads, self.pair.hparam_tensors)
        ):
            problem = written()
            if problem:
                return problem
            finite = True
        if not finite:
            bad = self._nonfinite_hparams()
            if bad and bool(torch.isfinite(loss.detach()).all()):
                return bad
            problem = f"the training loss or its gradient is not finite (loss = {float(loss.detach())})"
            return f"{problem}; {bad or self._nonfinite_values()}".rstrip("; ")
        if self.divergence is not None and self._loss_scale:  # (None or 0: no scale yet)
            value = abs(float(loss.detach()))
            if value > self.divergence * self._loss_scale:
                return (
                    f"the training loss {value:.4g} exceeds divergence={self.divergence:g} times the "
                    f"first accepted nonzero one ({self._loss_scale:.4g})"
                )
        return ""

    def _overflowed(self, loss: Tensor, grads: Sequence[Tensor | None]) -> bool:
        """Whether a step refused by :meth:`_check_loss` under a ``GradScaler`` only overflowed:
        finite loss and hyperparameters, a non-finite (scaled) gradient. (Only on that path: a
        few host synchronisations.)"""
        return (
            bool(torch.isfinite(loss.detach()).all())
            and not self._nonfinite_hparams()
            and not all_finite([g for g in grads if g is not None])
        )

    def _nonfinite_hparams(self) -> str:
        """'' when every hyperparameter tensor is finite, else a sentence naming those that are not
        (a checkpoint or an outer step that wrote NaN / inf)."""
        pairs = zip(self.pair.hparam_names, self.pair.hparam_tensors, strict=True)
        named = [(n, p) for n, p in pairs if p.device.type != "meta"]  # (no values to read there)
        if all_finite([p for _, p in named]):
            return ""
        bad = [n for n, p in named if not bool(torch.isfinite(p.detach()).all())]
        return f"hyperparameter(s) {bad} hold NaN or infinite values"

    def _nonfinite_values(self) -> str:
        """'' or (on a failure path only: it maps every container's raw values) a sentence naming
        the hyperparameter containers whose *values* are not finite although their raw tensors
        are (an outer step that took a log-decay to 1e4: exp(1e4) = inf), so that a run refused
        at every step says which hyperparameter to look at."""
        try:
            vals = _hparam_values(self.hparams)
        except Exception:  # (a container that cannot map its raw values now: nothing to add)
            return ""
        bad = [n for n, v in vals.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if not bad:
            return ""
        return (
            f"the values of hyperparameter(s) {bad} are not finite although their raw tensors are "
            "(an outer step took a raw value far enough for its constraint's map to overflow: "
            "reload a checkpoint, and take a smaller outer learning rate or clip the hypergradient)"
        )

    #: whether a batch of another floating-point dtype than the model's is refused up front (the
    #: method runs the model on it itself) rather than left to the user's losses, which may cast it
    _strict_batch_dtypes = False

    #: whether :meth:`_record_step` receives the RNG state before each step (for replays)
    _replays_rng = False
    #: the ``GradScaler`` of the :meth:`step` in progress, from its backward pass to
    #: :meth:`_record_step` (``None`` otherwise, or without one)
    _scaler: torch.amp.GradScaler | None = None

    def _rng_state(self) -> dict[str, Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Tensor]) -> None:
        # (.cpu(): a state loaded with torch.load(map_location="cuda") holds the generator states
        # as CUDA tensors, which torch's setters refuse; a no-op for the usual CPU tensors)
        torch.set_rng_state(state["cpu"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def _before_step(self) -> None:  # noqa: B027 - optional hook
        """Called at the start of every :meth:`step`, after the trained weights are refreshed."""

    def _forget_step(self) -> None:  # noqa: B027 - optional hook
        """Called when ``inner_optimizer.step()`` raised after :meth:`_record_step`: undo the
        record of the step that was not taken."""

    def _record_step(  # noqa: B027 - optional hook
        self,
        batch: Batch,
        has_grad: tuple[bool, ...],
        rng: dict[str, Tensor] | None,
        buffers: Tensors,
        max_grad_norm: float | None = None,
        hparam_buffers: Tensors = (),
    ) -> None:
        """Called before each accepted inner update (weights, optimiser state and tuned settings
        not yet written), with which weights got a gradient, (if ``_replays_rng``) the RNG state
        before the loss, copies of the buffers as they were before the step's forward pass
        (the hook may keep them), the step's gradient clipping, and copies of the
        hyperparameter module's buffers before the forward pass (likewise)."""

    def _after_step(self) -> None:  # noqa: B027 - optional hook
        """Called after each accepted inner update."""

    # ------------------------------------------------------------------ the hyper step

    @_hyper_call
    def hyper_step(self, train_batch: Batch = None, val_batch: Batch = None) -> HyperStepInfo:
        """Compute the hypergradient, write it into each hyperparameter's ``.grad`` (replacing what
        was there) and call ``outer_optimizer.step()``.

        Args:
            train_batch: a training batch (which methods need it: see each method).
            val_batch: a validation batch for ``val_loss``.

        Returns:
            A :class:`HyperStepInfo`. Weights, buffers and the inner optimiser are not changed.

        A hyperparameter frozen after construction (``requires_grad_(False)``, e.g. to hold a
        learning rate fixed for a while) is held constant: the others' hypergradient treats it
        as a constant, its ``.grad`` is set to ``None`` (so ``outer_optimizer`` skips it, as
        ``torch.optim`` skips a weight without a gradient), and it moves again once it requires
        grad again. :meth:`hypergradient` gives it zeros.

        Raises:
            ValueError: a batch the method needs is missing (``None``) or invalid (each method
                says which it needs), the method cannot compute a hypergradient here (e.g.
                :class:`~hypergrad.Unrolled` before any recorded :meth:`step`),
                ``outer_optimizer`` was given a group (``add_param_group``) holding a tensor
                that is not a parameter of ``hparams``, or a parameter was registered in (or
                replaced in) ``hparams`` since construction (nothing was changed).
            NonFiniteError: (``on_nonfinite="raise"``) a loss or the hypergradient is not finite
                (or the hyperparameters are); nothing was changed. With ``"skip"`` a
                :class:`NonFiniteWarning` instead, and ``info.skipped`` is ``True``.
            RuntimeError: called under ``torch.inference_mode()``, or inside
                ``DistributedDataParallel.join()``.

        The hypergradient runs with every ``torch.compile`` directive ignored (compiled graphs
        have no second derivatives): a compiled model, submodule, loss or function the forward
        calls runs eagerly here, and compiled in :meth:`step`.

        Cost: that of the method's hypergradient (see each method), plus the outer optimiser's
        step and a few host synchronisations (the finiteness guard, and the floats of the info
        record).

        To clip or rescale the hypergradient before the outer step, register an ordinary
        ``torch.optim`` step pre-hook: it runs after ``.grad`` is written and before the step,
        and only for accepted hypersteps::

            def clip(optimizer, args, kwargs):  # must return None
                torch.nn.utils.clip_grad_norm_(hparams.parameters(), max_norm=1.0)

            outer_optimizer.register_step_pre_hook(clip)

        (Stepping the outer optimiser yourself on the output of :meth:`hypergradient` also
        works, but skips the method's bookkeeping of an accepted hyperstep: the counter, a
        solver's warm start, a :class:`~hypergrad.hparams.SelfTuned` history row.) An LR
        scheduler on the outer optimiser is stepped by the user after ``hyper_step``, as after
        ``optimizer.step()``.
        """
        t0 = time.perf_counter()
        self._check_outer_optimizer()  # (a group added since: before anything is computed)
        res, grad_norm, problem, (rng_before, attributes) = self._compute_or_put_back(
            train_batch, val_batch, "hyper_step"
        )
        if problem:
            self._nonfinite(f"hyper step {self.hyper_steps}: {problem}")
            return self._info(res, grad_norm, t0, skipped=True)
        grads = self._as_hparams(res.grads)  # all cast before any is written
        # float16 / bfloat16 hyperparameters: the outer step itself can overflow from a finite
        # hypergradient (Adam's update in float16); kept so that it can be undone
        low = any(p.dtype in _LOW_PRECISION for p in self.pair.hparam_tensors)
        # and tuned optimiser settings: a huge but finite hypergradient takes a log-rate to 1e4,
        # whose rate exp(1e4) = inf the next step() wrote into the optimiser (every weight inf,
        # from an accepted step); kept so that such an outer step can be undone
        saved = self._outer_saved() if low or self.settings else None
        # SparseAdam (the optimiser of an nn.Embedding(sparse=True) table, e.g. per-example
        # weights at scale) takes sparse gradients only: the rows with a hypergradient, as the
        # table's own backward gives them (written dense, its step raised "SparseAdam does not
        # support dense gradients")
        sparse = isinstance(self.outer_optimizer, torch.optim.SparseAdam)
        for p, g in zip(self.pair.hparam_tensors, grads, strict=True):
            if sparse and g.dim() > 0 and not g.is_sparse:
                g = g.to_sparse(1)
            p.grad = g if p.requires_grad else None  # (frozen: torch.optim skips it)
        self.outer_optimizer.step()
        _forget_autocast_casts(self.device)
        # (the optimiser's state too: Adam's second moment, the hypergradient squared, overflows
        # float16 from |g| ~ 8e3 while the step itself stays finite, m / sqrt(inf) = 0, and every
        # later step of that hyperparameter was 0: it stopped moving for good, silently)
        off = self._settings_off_domain() if self.settings else ""
        if off or (low and not all_finite(self.pair.hparam_tensors, self._outer_state_tensors())):
            assert saved is not None
            bad = off or self._nonfinite_hparams() or self._nonfinite_outer_state()
            self._outer_restore(saved)
            self._set_rng_state(rng_before)
            _put_attributes_back(attributes)
            why = (
                "a smaller outer learning rate, or clip the hypergradient (an outer step pre-hook)"
                if off
                else "an overflow in their low precision: a smaller outer learning rate, or float32 "
                "hyperparameters"
            )
            self._nonfinite(
                f"hyper step {self.hyper_steps}: the outer optimiser's step made {bad} from a finite "
                f"hypergradient ({why})"
            )
            return self._info(res, grad_norm, t0, skipped=True)
        if res.commit is not None:
            res.commit()
        self.hyper_steps += 1
        return self._info(res, grad_norm, t0, skipped=False)

    @_hyper_call
    def _compute_or_put_back(
        self, train_batch: Batch, val_batch: Batch, calling: str
    ) -> tuple[_Hypergradient, Tensor, str, tuple[Any, Any]]:
        """:meth:`_compute` for ``calling`` (``"hyper_step"`` or ``"hypergradient"``, which the
        batch checks name: "pass hyper_step(val_batch=batch)" told a meta-batch script summing
        hypergradient() over tasks to step the outer optimiser). Where it raises (a missing batch,
        a loss that returns a vector, the user's own error) or finds a non-finite value, torch's
        generator and the plain tensor attributes a forward keeps (a hidden state carried from
        batch to batch) are put back as they were: the losses may have drawn dropout masks (and
        SelfTuning its perturbations) before, and a run that caught the error went on from another
        random state than one without the call; a refused NaN batch left NaN in a hidden state.
        Also returns what it saved, ``(generator state, attributes)``, for a later refusal."""
        rng_before = self._rng_state()
        attributes = self._attributes_now()
        self._calling = calling
        try:
            res, grad_norm, problem = self._compute(train_batch, val_batch)
        except BaseException:
            self._set_rng_state(rng_before)
            _put_attributes_back(attributes)
            raise
        finally:
            self._calling = "hyper_step"
        if problem:
            self._set_rng_state(rng_before)
            _put_attributes_back(attributes)
        return res, grad_norm, problem, (rng_before, attributes)

    def hypergradient(
        self, train_batch: Batch = None, val_batch: Batch = None
    ) -> tuple[Tensors, HyperStepInfo]:
        """The hypergradient and its info, without writing ``.grad`` or stepping anything.

        For analysis, gradient checks and custom outer updates. Nothing changes: weights,
        hyperparameters, optimiser and method states (a solver's warm start included) stay as
        they were (torch's global random generator aside: :class:`~hypergrad.SelfTuning` and
        :class:`~hypergrad.BestResponse` draw their perturbations from it, and every method's
        losses draw from it when the model or a hyperparameter network uses dropout or a random
        augmentation, so two calls differ unless its state is reset between them). A non-finite
        result is handled as in :meth:`hyper_step` (``on_nonfinite``); with ``"skip"`` the
        (non-finite) hypergradient is still returned, ``info.skipped=True``.

        Args:
            train_batch, val_batch: as for :meth:`hyper_step`.

        Returns:
            ``(grads, info)``: ``grads`` is a tuple of detached tensors shaped like
            ``list(hparams.parameters())`` (each in its hyperparameter's dtype; zeros for one
            frozen with ``requires_grad_(False)``); ``info`` is a :class:`HyperStepInfo` whose
            ``hyper_steps`` is the count before the call.

        Raises:
            ValueError, NonFiniteError, RuntimeError: as :meth:`hyper_step`.
        """
        t0 = time.perf_counter()
        res, grad_norm, problem, _ = self._compute_or_put_back(train_batch, val_batch, "hypergradient")
        if problem:
            self._nonfinite(f"hypergradient at hyper step {self.hyper_steps}: {problem}")
        return self._as_hparams(res.grads), self._info(res, grad_norm, t0, skipped=bool(problem))

    def _as_hparams(self, grads: Sequence[Tensor]) -> Tensors:
        """The hypergradient detached, each in its hyperparameter's dtype (it is computed in the
        model's precision; a float32 hyperparameter of a float64 model takes a float32 ``.grad``)
        and memory layout: a fused optimiser (``Adam(..., fused=True)``) reads ``.grad`` entry by
        entry in the parameter's memory order, so a contiguous hypergradient of channels_last
        distilled images moved each image by another entry's gradient (0.2 off after two
        hypersteps), silently; ``backward()`` gives ``.grad`` the parameter's strides, and so do we."""
        out = []
        for p, g in zip(self.pair.hparam_tensors, grads, strict=True):
            g = g.detach().to(p.dtype)
            if g.layout == torch.strided and g.shape == p.shape and g.stride() != p.stride():
                g = torch.empty_like(p, dtype=g.dtype, requires_grad=False).copy_(g)
            out.append(g)
        return tuple(out)

    def _compute(self, train_batch: Batch, val_batch: Batch) -> tuple[_Hypergradient, Tensor, str]:
        self._warn_float16_autocast()
        self._check_not_moved()
        self._check_not_joined()
        self._check_same_hparams()
        self._check_hyper_batches(train_batch, val_batch)
        self._refresh()
        bad = self._nonfinite_hparams()  # (a method may refuse them with its own error, or loop on them)
        if bad:
            nan = torch.full((), float("nan"), dtype=self.dtype, device=self.device)
            grads = tuple(torch.full_like(p, float("nan")) for p in self.pair.hparam_tensors)
            return _Hypergradient(grads, nan), nan, bad
        # the hyperparameters' own buffers (a learned augmentation network's BatchNorm statistics)
        # move with the real steps only, as the model's do: the forward passes of the hypergradient
        # (Implicit's training loss, every replayed step of Unrolled) are undone
        hp_buffers = self._snapshot_hparam_buffers()
        # hyperparameters frozen since construction (``requires_grad_(False)``) are held constant,
        # as torch.optim holds a weight without a gradient: the methods differentiate w.r.t. every
        # hyperparameter tensor, so they require grad for the call and get a zero hypergradient
        frozen = [p for p in self.pair.hparam_tensors if not p.requires_grad]
        # nn.Embedding(max_norm=...) renormalises the rows a forward pass looks up, in place, in the
        # weight itself: the hypergradient's forward passes (a validation batch's tokens) changed
        # the weights. Their values are put back (only where changed: no version bump otherwise)
        renorm = [
            m.weight
            for m in self.pair.model.modules()
            if isinstance(m, nn.Embedding) and m.max_norm is not None
        ]
        renorm_kept = [w.detach().clone() for w in renorm]
        # train/eval modes: a val_loss that switches the model to eval mode and does not switch it
        # back (``model.eval()`` before validating, the usual idiom) left it there, so the steps
        # after the hyperstep trained without dropout and on frozen BatchNorm statistics
        modes = [(m, m.training) for m in (*self.pair.model.modules(), *self.hparams.modules())]
        # and the modules' plain number settings a forward pass advances (a call counter driving a
        # warm-up, ``self.calls += 1``): the hypergradient's forward passes are no steps (an
        # Implicit hyperstep advanced such a counter by 2, an Unrolled one by K + 1, so the
        # schedule of every later step ran ahead, silently)
        settings = self._attributes_now()
        self.pair.__dict__.pop("graphless", None)  # (losses found on no graph: see _warn_disconnected)
        try:
            for p in frozen:
                p.requires_grad_(True)
            # (batches of another dtype than the model's are fine where the losses cast them)
            named = [
                batch_dtype_problem(b, what, self.dtype)
                for b, what in ((val_batch, "val_batch"), (train_batch, "train_batch"))
                if b is not None
            ]
            # (no second derivatives through compiled graphs)
            with compiled_run_eagerly(), naming_batch_dtypes(named):
                res = self._hypergradient(train_batch, val_batch)
        finally:
            for p in frozen:
                p.requires_grad_(False)
            for m, flag in modes:
                if m.training != flag:
                    m.training = flag
            _put_settings_back(settings)
            FunctionalPair.restore_buffers(hp_buffers)
            with torch.no_grad():
                for w, kept in zip(renorm, renorm_kept, strict=True):
                    if not torch.equal(w, kept):
                        w.copy_(kept)
        if frozen:
            held = [not p.requires_grad for p in self.pair.hparam_tensors]
            res.grads = tuple(torch.zeros_like(g) if h else g for g, h in zip(res.grads, held, strict=True))
            if res.reached is not None:
                res.reached = tuple(ok or h for ok, h in zip(res.reached, held, strict=True))
        if res.reached is not None:
            self._warn_disconnected(res.reached)
        grad_norm = norm(res.grads)  # checked for finiteness and reported: computed once
        checks: list[Tensor | Sequence[Tensor]] = [res.outer_loss, grad_norm]
        if res.inner_loss is not None:
            checks.append(res.inner_loss)
        problem = ""
        if not all_finite(*checks):
            inner = "" if res.inner_loss is None else f", training loss = {float(res.inner_loss)}"
            status = str(getattr(res.solver_status, "value", res.solver_status or ""))
            said = f"; the linear solver said {status!r}" if status in ("nonfinite", "diverging") else ""
            where = self._nonfinite_hypergradient(res.grads)
            empty = "".join(
                empty_batch_note(b, what)
                for b, what in ((val_batch, "val_batch"), (train_batch, "train_batch"))
            )
            problem = (
                "a loss or the hypergradient is not finite "
                f"(outer loss = {float(res.outer_loss)}{inner}{said}{where}){empty}"
            )
        elif res.inner_loss is not None:
            problem = self._check_loss(res.inner_loss, ())
        return res, grad_norm, problem

    def _nonfinite_hypergradient(self, grads: Sequence[Tensor]) -> str:
        """``""``, or (on the failure path only: one host read per tensor) which hyperparameters'
        hypergradients hold NaN or infinite entries, and how many: with finite losses, a user
        needs to know where to look (a ``sqrt`` or ``log`` of a hyperparameter at 0, say)."""
        return _nonfinite_entries("the hypergradient", self.pair.hparam_names, grads)

    def _warn_disconnected(self, reached: Sequence[bool]) -> None:
        graphless = sorted(getattr(self.pair, "graphless", ()))
        # a val_loss computed under torch.no_grad() (the validation habit) gave a zero
        # hypergradient with a warning that listed every cause but that one
        lead = (
            f"{' and '.join(graphless)} returned a loss on no autograd graph although the weights "
            "require grad: computed under torch.no_grad() or torch.inference_mode() (as validation "
            "code usually is), or detached (.item(), .detach(), a new tensor). Compute it with "
            "autograd on: the hypergradient needs its gradient. "
            if graphless
            else ""
        )
        for name, ok in zip(self.pair.hparam_names, reached, strict=True):
            if ok or name in self._warned_disconnected:
                continue
            self._warned_disconnected.add(name)
            _warn_user(
                f"{lead}hyperparameter {name!r} does not reach the losses: no gradient path leads from it "
                "to val_loss or to train_loss's gradient, so its hypergradient is exactly 0. Is it "
                "cast to a Python number (float(), .item()), passed to a torch argument that takes "
                "only floats (dropout p, label_smoothing), or left out of the loss? Or does it act "
                "only on weights that are not trained now (frozen with requires_grad_(False), or not in "
                "inner_optimizer) or that a method leaves out (Implicit's hessian_subset)? A learned "
                "initialisation copied into the weights is no gradient path either: write the weights "
                "as phi + delta, delta trained from 0 (README, 'Meta-learning'). Nor is a val_loss "
                "that evaluates another module than the model it is given (an EMA / "
                "torch.optim.swa_utils.AveragedModel copy, a deepcopy) or reads the weights from "
                "tensors captured outside it (params = list(model.parameters()) taken before): "
                "evaluate the model it gets. (warned once)",
                DisconnectedWarning,
            )

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        name = f"{type(self).__name__}.{getattr(self, '_calling', 'hyper_step')}"
        if val_batch is None:
            raise ValueError(f"{name} needs val_batch=... (a validation batch for val_loss)")
        check_batch(val_batch, "val_batch", self.device, self.dtype, dtypes=self._strict_batch_dtypes)
        if train_batch is None:
            raise ValueError(
                f"{name} needs train_batch=... (a training batch; a train_loss that reads "
                "no data, such as distilled images held as hyperparameters, takes train_batch=())"
            )
        check_batch(train_batch, "train_batch", self.device, self.dtype, dtypes=self._strict_batch_dtypes)

    @abc.abstractmethod
    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        """The hypergradient at the current weights. Must not change any state (state to keep
        goes into ``_Hypergradient.commit``, run only when the step is accepted)."""

    def _info(self, res: _Hypergradient, grad_norm: Tensor, t0: float, *, skipped: bool) -> HyperStepInfo:
        return HyperStepInfo(
            outer_loss=float(res.outer_loss),
            hypergrad_norm=float(grad_norm),
            solver_iterations=res.solver_iterations,
            solver_residual=None if res.solver_residual is None else float(res.solver_residual),
            solver_status=res.solver_status,
            unrolled_steps=res.unrolled_steps,
            seconds=time.perf_counter() - t0,
            skipped=skipped,
            hyper_steps=self.hyper_steps,
            train_loss=None if res.inner_loss is None else float(res.inner_loss),
        )

    def _outer_saved(self) -> tuple[list[Tensor], list[Tensor | None], Any]:
        """The hyperparameters' values and ``.grad`` and the outer optimiser's state, copied."""
        from ._marglik import _snapshot_optimizer

        hp = self.pair.hparam_tensors
        return (
            [p.detach().clone() for p in hp],
            [p.grad for p in hp],
            _snapshot_optimizer(self.outer_optimizer),
        )

    def _outer_state_tensors(self, p: Tensor | None = None) -> list[Tensor]:
        """The outer optimiser's floating-point state tensors (Adam's moments) of hyperparameter
        ``p``, or of all of them."""
        state = self.outer_optimizer.state
        hp = self.pair.hparam_tensors if p is None else [p]
        return [
            v
            for q in hp
            if q in state
            for v in state[q].values()
            if isinstance(v, Tensor) and v.is_floating_point() and v.layout == torch.strided
        ]

    def _settings_off_domain(self) -> str:
        """'' when every tuned optimiser setting's value (what :meth:`step` writes into the inner
        optimiser) is finite and strictly inside its domain, else a sentence naming those that are
        not. One host read per setting (a value per param group)."""
        bad = []
        for i, s in self.settings:
            with torch.no_grad():
                values = s().detach().double().tolist()
            ok = all(
                math.isfinite(v)
                and (s.constraint is Constraint.REAL or v > 0)
                and (s.constraint is not Constraint.UNIT or v < 1)
                for v in values
            )
            if ok and getattr(s, "_below_one", False):  # a multiplier on a setting in (0, 1)
                groups = s.optimizer[0].param_groups
                ok = all(float(g[s.name]) * v < 1 for g, v in zip(groups, values, strict=False))
            if not ok:
                bad.append(f"{self.pair.hparam_names[i]!r} ({s.name} = {values})")
        if not bad:
            return ""
        return (
            f"the tuned optimiser setting(s) {', '.join(bad)} leave their domain (an overflow, or "
            "the edge of the constraint, of the raw value mapped onto it)"
        )

    def _nonfinite_outer_state(self) -> str:
        """A sentence naming the hyperparameters whose outer-optimiser state is not finite."""
        bad = [
            n
            for n, p in zip(self.pair.hparam_names, self.pair.hparam_tensors, strict=True)
            if not all_finite(self._outer_state_tensors(p))
        ]
        return (
            f"its state of hyperparameter(s) {bad} hold NaN or infinite values (Adam's second moment, "
            "the hypergradient squared, overflows float16 from |hypergradient| ~ 8e3)"
        )

    def _outer_restore(self, saved: tuple[list[Tensor], list[Tensor | None], Any]) -> None:
        """Undo the outer step in place. Not ``load_state_dict``: that replaces the param groups
        and the state by copies (casting 0-dim state to the parameters' dtype), so a param group
        the script holds (a warm-up writing ``group["lr"]``) no longer steered the optimiser
        after an undone step, and a float32 NAdam ``mu_product`` came back float16."""
        from ._marglik import _restore_optimizer

        values, grads, state = saved
        with torch.no_grad():
            for p, v, g in zip(self.pair.hparam_tensors, values, grads, strict=True):
                p.copy_(v)
                p.grad = g
        _restore_optimizer(self.outer_optimizer, state)

    def _nonfinite(self, msg: str) -> None:
        msg += "; weights, buffers, hyperparameters and optimiser states were left untouched"
        if self.on_nonfinite is OnNonFinite.RAISE:
            raise NonFiniteError(msg)
        _warn_user(msg + " (step skipped)", NonFiniteWarning)

    # ------------------------------------------------------------------ helpers for methods

    def _hparam_values(self, hp: Sequence[Tensor]) -> dict[int, Tensor]:
        """Values of tuned optimiser settings computed from (possibly substituted) raw tensors."""
        return {i: from_raw(hp[i], s.constraint) for i, s in self.settings}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """A complete checkpoint: model, hyperparameters, both optimisers, method state, counters
        and the RNG state (CPU, and the model's CUDA device), so a resumed run repeats the
        straight one bit for bit (dropout masks and data shuffles drawn from torch's RNG
        included).

        Returns:
            A dict with keys ``"model"``, ``"hparams"``, ``"inner_optimizer"``,
            ``"outer_optimizer"`` (each its own ``state_dict()``; ``"model"`` that of the module
            under any ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrapper,
            so a run resumes with or without them), ``"method"`` (e.g.
            :class:`~hypergrad.Unrolled`'s recorded steps, :class:`~hypergrad.Implicit`'s warm
            start), ``"counters"``, ``"rng"`` (this process's), ``"method_name"``, ``"rank"``
            (this process's rank under ``DistributedDataParallel``, else 0), ``"hparams_meaning"`` (what
            each container's raw values mean, checked on load), ``"optimizer_params"`` (the
            names of the optimisers' parameters in their order, checked on load) and
            ``"optimizer_classes"`` (the optimisers' class names, checked on load). Its tensors
            are the live ones (as ``nn.Module.state_dict`` gives them): ``copy.deepcopy`` it, or
            ``torch.save`` it, to keep it while training goes on. It holds tensors, numbers,
            strings and plain containers only, so ``torch.load(path, weights_only=True)`` (torch's
            default) reads it back; except that :class:`~hypergrad.Unrolled` keeps its recorded
            batches as given, so batches of your own class (a ``NamedTuple``, a dataclass) need
            ``with torch.serialization.safe_globals([YourBatch]): torch.load(...)``.
        """
        return {
            "model": self.ranks.module.state_dict(),  # (under any wrapper: portable between them)
            "hparams": self.hparams.state_dict(),
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "method": self._method_state(),
            "counters": {
                "inner_steps": self.inner_steps,
                "hyper_steps": self.hyper_steps,
                "loss_scale": self._loss_scale,
            },
            "rng": self._rng_state(),
            "method_name": type(self).__name__,
            "rank": self._rank(),
            "hparams_meaning": _meanings(self.hparams),
            "optimizer_params": self._optimizer_param_names(),
            "optimizer_classes": {
                "inner_optimizer": _optimizer_classes(self.inner_optimizer),
                "outer_optimizer": _optimizer_classes(self.outer_optimizer),
            },
        }

    def _rank(self) -> int:
        """This process's rank in the ``DistributedDataParallel`` model's group (0 without one)."""
        return torch.distributed.get_rank(self.ranks.group) if self.ranks.size > 1 else 0

    def _optimizer_param_names(self) -> dict[str, list[list[str | None]]]:
        """The name of every tensor the two optimisers hold, in their order (``None`` for one
        outside the model and ``hparams``): ``torch.optim`` loads its state (momentum buffers,
        moments, per-group settings) by position, so a run that lists the parameters in
        another order would give each the state of another, silently when the shapes agree."""
        names = {id(p): n for n, p in self.ranks.module.named_parameters()}
        hp_names = {id(p): n for n, p in self.hparams.named_parameters()}
        return {
            key: [[known.get(id(p)) for p in g["params"]] for g in opt.param_groups]
            for key, opt, known in (
                ("inner_optimizer", self.inner_optimizer, names),
                ("outer_optimizer", self.outer_optimizer, hp_names),
            )
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, into objects built like the originals.

        Atomic: if any part fails to load (a model of another shape, an optimiser with other
        groups), everything is put back as it was before the call and the error is re-raised;
        the optimisers keep their very ``state`` and ``param_groups`` objects (a param group or
        a state tensor held by the caller still belongs to the optimiser).
        ``state`` is copied, not kept: loading the same in-memory checkpoint again later (a
        rollback) restores it as it was saved.

        Under ``DistributedDataParallel``, a state saved on another rank (rank 0's checkpoint
        loaded on every rank) gives this rank that rank's random generator state, with a
        ``UserWarning``: exact when every rank draws the same random numbers (seeded alike, or no
        dropout, augmentation or perturbation), not with per-rank seeds (save and load each rank's
        own state, or delete ``state["rng"]`` to keep this rank's generator).

        A model state saved with a wrapper's key prefixes (``module.``, ``_orig_mod.``: by
        ``model.state_dict()`` of a wrapped model, or by versions that saved it so) loads too.

        Args:
            state: a dict from :meth:`state_dict` of the same method class.

        Raises:
            ValueError: ``state`` was saved by another method class, lacks one of its parts,
                was saved with other hyperparameter containers (raw values that would mean
                something else here), or with an optimiser holding the same parameters in another
                order (its state would go to other parameters), or by an optimiser of another
                class (an Adam's state into an SGD; a subclass's loads, as SGD's into
                ``hg.optim.SGDHD``); its ``"method"`` or
                ``"counters"`` part lacks an entry or holds one of another type (edited by hand,
                or by another configuration of the method).
            RuntimeError, KeyError, ...: whatever the model's, the containers' or the
                optimisers' ``load_state_dict`` raises (after everything was put back).
        """
        self._check_is_a_state(state)
        if state.get("method_name") != type(self).__name__:
            raise ValueError(
                f"this state_dict was saved by {state.get('method_name')!r}, not {type(self).__name__!r}"
            )
        missing = [
            k
            for k in ("model", "hparams", "inner_optimizer", "outer_optimizer", "method", "counters")
            if k not in state
        ]
        if missing:
            raise ValueError(f"state_dict is missing {missing}: was it saved by HyperOptimizer.state_dict()?")
        saved, mine = state.get("hparams_meaning"), _meanings(self.hparams)
        if saved is not None and saved != mine:  # (states saved before the check have none)
            diff = [
                f"{k or 'hparams'}: saved {saved.get(k, 'nothing')}, here {mine.get(k, 'nothing')}"
                for k in sorted(set(saved) | set(mine))
                if saved.get(k) != mine.get(k)
            ]
            raise ValueError(
                "this state_dict was saved with other hyperparameter containers, so its raw values "
                f"would mean something else here ({'; '.join(diff)}); build hparams as when it was saved"
            )
        saved_order, my_order = state.get("optimizer_params"), self._optimizer_param_names()
        for key in ("inner_optimizer", "outer_optimizer"):
            was = None if saved_order is None else saved_order.get(key)
            now = my_order[key]
            if was is None or [len(g) for g in was] != [len(g) for g in now] or was == now:
                continue  # (states saved before the check; other group sizes: torch.optim names it)
            g, i = next(
                (g, i)
                for g, (a, b) in enumerate(zip(was, now, strict=True))
                for i in range(len(a))
                if a[i] != b[i]
            )
            held, here = {str(n) for a in was for n in a}, {str(n) for a in now for n in a}
            if held != here:  # (not an order: other names, which no order of the optimiser fixes)
                raise ValueError(
                    f"this state_dict's {key} held other parameters than {key} here (param_groups"
                    f"[{g}], position {i}: saved {was[g][i]!r}, here {now[g][i]!r}; saved only: "
                    f"{sorted(held - here)[:4]}, here only: {sorted(here - held)[:4]}): a model whose "
                    f"modules were renamed or rebuilt (a Sequential made a class), or other weights "
                    f"frozen than in the saved run? Build the model and {key} as the saved run did"
                )
            raise ValueError(
                f"this state_dict's {key} held the parameters in another order (param_groups[{g}], "
                f"position {i}: saved {was[g][i]!r}, here {now[g][i]!r}); torch.optim loads its state "
                f"and group settings by position, so each parameter would get another's. Build {key} "
                f"with the parameters in the order the saved run used"
            )
        self._check_optimizer_classes(state.get("optimizer_classes"))
        # by value: torch.optim's load_state_dict keeps the given tensors as its state (momentum
        # buffers, Adam's moments) and trains them in place, so a checkpoint kept in memory to
        # roll back to would silently drift with the run, and a second rollback differ
        state = copy.deepcopy(state)
        backup = copy.deepcopy(self.state_dict())
        # torch.optim's load_state_dict replaces its state and param groups by new objects and
        # leaves the old ones as they were: a refused load puts those very objects back, so a
        # param group or a state tensor the caller holds (a warm-up writing group["lr"], a
        # tensor learning rate) still steers the optimiser afterwards
        kept = [(opt, opt.state, opt.param_groups) for opt in (self.inner_optimizer, self.outer_optimizer)]
        try:
            self._load_all(state)
        except BaseException:
            for opt, opt_state, groups in kept:
                opt.state, opt.param_groups = opt_state, groups
            self._load_all(backup, optimizers=False)
            raise
        saved_rank = state.get("rank")
        if "rng" in state and saved_rank is not None and saved_rank != self._rank():
            _warn_user(
                f"this state_dict was saved on rank {saved_rank} and its random generator state is "
                f"that rank's: rank {self._rank()} now draws rank {saved_rank}'s random numbers "
                "(dropout masks, augmentations, SelfTuning's perturbations, shuffles from torch's "
                "generator), so the run repeats the straight one only if every rank drew the same "
                "ones (seeded alike) or draws none. For an exact resume with per-rank seeds, save "
                "hopt.state_dict() on every rank and load each rank's own; to keep this rank's "
                "generator as it is, delete state['rng'] before loading",
                UserWarning,
            )

    def _check_is_a_state(self, state: Any) -> None:
        """Refuse what is not a :meth:`state_dict` at all, saying what it looks like: a path (an
        ``AttributeError: 'str' object has no attribute 'get'``), a model's or an optimiser's own
        state_dict, or a script's checkpoint dict holding the state under a key ("this
        state_dict was saved by None", which named neither)."""
        name = type(self).__name__
        if not isinstance(state, Mapping):
            hint = ""
            if isinstance(state, (str, bytes, os.PathLike)):
                hint = ": a path? read it first, hopt.load_state_dict(torch.load(path, weights_only=True))"
            raise TypeError(
                f"{name}.load_state_dict takes the dict hopt.state_dict() returned, got "
                f"{type(state).__name__}{hint}"
            )
        if "method_name" in state:
            return
        inner = [k for k, v in state.items() if isinstance(v, Mapping) and "method_name" in v]
        if inner:
            hint = f"; it holds one under {inner[0]!r}: load state[{inner[0]!r}]"
        elif "param_groups" in state and "state" in state:
            hint = "; it looks like an optimiser's own state_dict (optimizer.load_state_dict loads that)"
        elif state and all(isinstance(v, Tensor) for v in state.values()):
            hint = (
                "; it looks like a module's own state_dict (model.load_state_dict or "
                "hparams.load_state_dict loads that)"
            )
        else:
            hint = f"; its keys: {sorted(map(str, state))[:8]}"
        raise ValueError(f"this is not a {name}.state_dict() (it has no 'method_name' entry{hint})")

    def _check_optimizer_classes(self, saved: Any) -> None:
        """Refuse optimiser states saved by an optimiser of another kind (an Adam's into an SGD):
        ``torch.optim`` loads any, param groups included, so the SGD took Adam's groups and died at
        the next step with a bare ``KeyError: 'momentum'`` (an SGD's state into an Adam: a bare
        ``KeyError: 'step'`` in the load). A class and its subclasses load each other's states
        (``torch.optim.SGD`` and ``hg.optim.SGDHD``, ``Adam`` and ``AdamW``), as ``torch.optim``
        means them to; states saved before the classes were recorded are not checked."""
        if not isinstance(saved, dict):
            return
        for key, opt in (
            ("inner_optimizer", self.inner_optimizer),
            ("outer_optimizer", self.outer_optimizer),
        ):
            was, now = saved.get(key), _optimizer_classes(opt)
            if not was or was[0] in now or now[0] in was:
                continue
            raise ValueError(
                f"this state_dict's {key} was saved by {was[0]}, but {key} here is {now[0]}: "
                f"torch.optim would load {was[0]}'s param groups and state into the {now[0]}, which "
                f"cannot step with them. Build {key} as a {was[0]}, as the saved run did; to go on "
                f"with a fresh {now[0]}, load the parts you keep yourself (model.load_state_dict("
                "state['model']), hparams.load_state_dict(state['hparams']))"
            )

    def _load_all(self, state: dict[str, Any], *, optimizers: bool = True) -> None:
        self.ranks.module.load_state_dict(bare_state_dict(state["model"], self.ranks.module))
        self.hparams.load_state_dict(state["hparams"])
        if optimizers:
            self.inner_optimizer.load_state_dict(state["inner_optimizer"])
            _keep_saved_scalar_dtypes(self.inner_optimizer, state["inner_optimizer"])
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
            _keep_saved_scalar_dtypes(self.outer_optimizer, state["outer_optimizer"])
        self._refresh()
        # (a bare KeyError 'records' or IndexError named neither the part nor the class; the
        # method's own ValueErrors, a configuration that differs, are clear as they are)
        try:
            self._load_method_state(state["method"])
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise self._malformed("method", error) from error
        try:
            counters = state["counters"]
            self.inner_steps = int(counters["inner_steps"])
            self.hyper_steps = int(counters["hyper_steps"])
            self._loss_scale = counters.get("loss_scale")
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
            raise self._malformed("counters", error) from error
        for _, setting in self.settings:  # the loaded groups hold what was written then
            setting.forget_written()
        if "rng" in state:
            self._set_rng_state(state["rng"])

    def _malformed(self, part: str, error: Exception) -> ValueError:
        return ValueError(
            f"state_dict[{part!r}] is not what {type(self).__name__}.state_dict() writes "
            f"({type(error).__name__}: {error}): was the checkpoint edited, or saved by another "
            "configuration of the method?"
        )

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and the hyperparameters.

        Args:
            set_to_none: set ``.grad`` to ``None`` rather than to zeros, as
                ``torch.optim.Optimizer.zero_grad`` (default: ``True``).
        """
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)
        self.outer_optimizer.zero_grad(set_to_none=set_to_none)
