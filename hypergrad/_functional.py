"""Primitives: a functional view of ``(model, hparams)``, tensor-tuple arithmetic, HVPs, mixed VJPs.

Nothing here knows about methods, schedules or logging. Everything works on tuples of tensors in
a fixed order (the order of ``model.named_parameters()`` restricted to the trained weights, and of
``hparams.named_parameters()``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.modules.module as _module_hooks
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from ._types import Batch, LossFn, Tensors
from ._wrap import unwrap_model, wrappers

#: how many fused optimiser steps (``fused=True``) have written each tensor: their kernels do not
#: bump version counters, so ``t._version`` alone misses them (see :func:`write_count`)
_FUSED_STEPS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _count_fused_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A global ``torch.optim`` step post-hook: counts the steps of fused optimisers per parameter
    (nothing for the others; a few dictionary updates per step of a fused one)."""
    groups = optimizer.param_groups
    if not any(g.get("fused") for g in groups):
        return
    _FUSED_TOTAL[0] += 1
    for g in groups:
        for p in g["params"]:
            _FUSED_STEPS[p] = _FUSED_STEPS.get(p, 0) + 1


#: how many fused optimiser steps were taken in the process, on any tensors: a per-tensor count of
#: :data:`_FUSED_STEPS` can only have moved where this did (see :func:`fused_steps_taken`)
_FUSED_TOTAL = [0]


def fused_steps_taken() -> int:
    """How many steps of fused optimisers the process has taken: where it has not moved since a
    look at some tensors' :func:`write_count`, their fused parts have not moved either (a cheap
    test that spares the per-tensor lookups)."""
    return _FUSED_TOTAL[0]


register_optimizer_step_post_hook(_count_fused_step)

#: how many modules, parameters and buffers have been registered (or assigned) on any module of
#: the process: :meth:`HyperOptimizer._refresh` looks at the model's layout again only when it
#: moved (a submodule replaced, a buffer first set by a forward pass), not at every step
_REGISTRATIONS = [0]


def _count_registration(*args: Any) -> None:
    _REGISTRATIONS[0] += 1


_module_hooks.register_module_module_registration_hook(_count_registration)
_module_hooks.register_module_parameter_registration_hook(_count_registration)
_module_hooks.register_module_buffer_registration_hook(_count_registration)


def registrations() -> int:
    """A counter that moves whenever a module, parameter or buffer is registered on, or assigned
    to, any ``nn.Module`` (``model.fc = nn.Linear(...)``, ``self.mu = x.mean(0)`` on a buffer
    registered as ``None``). Writes into ``module._modules`` by hand move it not."""
    return _REGISTRATIONS[0]


def module_layout(model: nn.Module) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
    """The identities of ``model``'s modules, the names of its buffers that are set, and the
    identities of the parameters each module holds (a trained weight tied into another module
    after construction, ``model.decoder.weight = model.encoder.weight``, is one more place
    :class:`FunctionalPair` must substitute)."""
    modules = list(model.modules())
    params = tuple(id(p) for m in modules for p in m._parameters.values())
    return tuple(map(id, modules)), _buffer_slots(model)[0], params


def write_count(t: Tensor) -> tuple[int, int]:
    """A counter that moves whenever ``t`` is written in place: its version counter, and the number
    of fused ``torch.optim`` steps taken on it (which the version counter does not see). Writes
    through ``t.data`` move neither, as for autograd's own checks."""
    return t._version, _FUSED_STEPS.get(t, 0)


class _PerThread(threading.local):
    """The library's block state, per thread: a hyperoptimiser in another thread (an Optuna
    study with ``n_jobs=2``, a thread pool of sweeps) must not see this thread's blocks. (They were
    process-wide: a hyperstep in one thread made the other thread's hooks land in its handle list;
    two overlapping blocks restored ``Tensor.register_hook`` to the other's wrapper for good, so
    every hook registered later in the process was collected into a dead hyperstep's list, and
    left the value memo open for good; a plain feature tensor passed to an STN layer in another
    thread was linearised as this thread's response step's.)"""

    def __init__(self) -> None:
        #: open collecting_gradient_hooks blocks but model-only ones (a training gradient being taken)
        self.collecting = 0
        #: open exact_padding_rows blocks
        self.exact_padding = 0
        #: the open collecting_gradient_hooks blocks' (handles, model_only), outermost first
        self.collectors: list[tuple[list[Any], bool]] = []
        #: open linearised model calls (``hypergrad._stn_hparams.linearising``: Delta-STN)
        self.linearising = 0
        #: open validation passes of SelfTuning / BestResponse (``hypergrad._stn_hparams.validating``)
        self.validating = 0
        #: the value memo of ``hypergrad.hparams._reusing_values`` (None: no block open)
        self.memo: dict[tuple[int, int, bool, str], tuple[Tensor, Tensor]] | None = None
        #: (what, always) of this thread's open refusing_once_differentiable block (None: none)
        self.once: tuple[str, bool] | None = None


_THREAD = _PerThread()


#: held while a forward-mode dual level is open (:func:`dual_level`)
_DUAL_LEVEL_LOCK = threading.RLock()  # (re-entered in one thread: torch's own error, no deadlock)


@contextlib.contextmanager
def dual_level() -> Iterator[None]:
    """``torch.autograd.forward_ad.dual_level()``, one thread at a time: PyTorch keeps one dual
    level for the whole process (not per thread), so a second thread's block raised "Nested
    forward mode AD is not supported at the moment" (two Delta-STN runs, or forward-mode
    Unrolled ones, in an Optuna study with ``n_jobs=2``). Blocks in other threads wait."""
    import torch.autograd.forward_ad as fwAD

    with _DUAL_LEVEL_LOCK, fwAD.dual_level():
        yield


@contextlib.contextmanager
def exact_padding_rows() -> Iterator[None]:
    """Within the block (an unrolled hypergradient: replayed steps and the validation loss), an
    ``nn.Embedding(padding_idx=p)`` lookup differentiates the padding row it reads: see
    :func:`_embedding_dense`."""
    _THREAD.exact_padding += 1
    try:
        yield
    finally:
        _THREAD.exact_padding -= 1


def _hook_targets() -> list[tuple[Any, str, Any]]:
    """The entry points :func:`collecting_gradient_hooks` replaces while any block is open (in
    any thread), each by a function that collects for the calling thread's open blocks and is
    the original in a thread with none."""
    original = Tensor.register_hook
    out: list[tuple[Any, str, Any]] = []

    def register_hook(self: Tensor, hook: Callable[[Tensor], Tensor | None]) -> Any:
        handle = original(self, hook)
        in_module = None
        for handles, model_only in tuple(_THREAD.collectors):
            if model_only and in_module is None:
                in_module = _in_module_call()
            if not model_only or in_module:
                handles.append(handle)
        return handle

    out.append((Tensor, "register_hook", register_hook))
    # (a private torch method: where a torch version lacks it, module hooks are left as they are)
    backward_hook = torch.utils.hooks.BackwardHook
    apply_on_tensors = getattr(backward_hook, "_apply_on_tensors", None)
    if apply_on_tensors is not None:

        def _apply_on_tensors(self: Any, fn: Callable[[Any], None], args: Any) -> Any:
            collectors = tuple(_THREAD.collectors)
            if not collectors:
                return apply_on_tensors(self, fn, args)

            def recorded(grad_fn: Any) -> None:
                for handles, _ in collectors:  # (the outermost block's list gets each handle first)
                    grad_fn = _HookRecorder(grad_fn, handles)
                fn(grad_fn)

            return apply_on_tensors(self, recorded, args)

        out.append((backward_hook, "_apply_on_tensors", _apply_on_tensors))
    return out


_HOOK_STATE: dict[str, Any] = {"open": 0, "saved": []}


@contextlib.contextmanager
def collecting_gradient_hooks(handles: list[Any], *, model_only: bool = False) -> Iterator[None]:
    """Within the block, the handle of every gradient hook put on the graph is appended to
    ``handles`` (for the caller to remove once the gradient they shape is taken): hooks
    registered with ``Tensor.register_hook``, and the ones torch puts on the grad_fn of a module's
    inputs and outputs at each call for its full backward (pre-)hooks
    (``torch.utils.hooks.BackwardHook``, which keeps no handle). Only this thread's: the entry
    points are replaced while a block is open in any thread, and collect for the calling
    thread's blocks alone.

    With ``model_only=True``, only those the model puts there: a module's full backward
    (pre-)hooks, and tensor hooks registered while a module's forward runs (not those the caller's
    own code registers, e.g. a loss function on its output)."""
    _open_swap(_HOOK_STATE, _hook_targets)
    state, entry = _THREAD, (handles, model_only)
    state.collectors.append(entry)
    if not model_only:
        state.collecting += 1  # (read by _embedding_dense: a training gradient is being taken)
    try:
        yield
    finally:
        if not model_only:
            state.collecting -= 1
        for i in range(len(state.collectors) - 1, -1, -1):  # (its own entry, however blocks closed)
            if state.collectors[i] is entry:
                del state.collectors[i]
                break
        _close_swap(_HOOK_STATE)


#: the code of ``nn.Module.__call__``'s implementation: a frame running it is a module's call
_MODULE_CALL_CODES = frozenset(
    f.__code__ for f in (nn.Module._call_impl, getattr(nn.Module, "_wrapped_call_impl", nn.Module._call_impl))
)


def _in_module_call() -> bool:
    """Whether a module's ``__call__`` is on the Python stack (a walk up the frames: for each
    gradient hook registered inside :func:`collecting_gradient_hooks` with ``model_only``, a few)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _MODULE_CALL_CODES:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _RemovedAtOnce(list):  # type: ignore[type-arg]
    """A handle list for :func:`collecting_gradient_hooks` that removes each hook as it comes."""

    def append(self, handle: Any) -> None:
        handle.remove()


@contextlib.contextmanager
def ignoring_gradient_hooks() -> Iterator[None]:
    """Within the block, the gradient hooks that forward passes put on the graph
    (``Tensor.register_hook``, a module's full backward (pre-)hooks) are removed as they are
    registered, so they act on no derivative taken through it: for derivatives of the network's
    function itself (the marginal likelihood's Jacobians), which hooks that shape training
    gradients (an activation's gradient clipped or scaled) must not reach. Hooks registered
    before the block (on the weights) are left alone."""
    with collecting_gradient_hooks(_RemovedAtOnce()):
        yield


class _HookRecorder:
    """A grad_fn whose ``register_hook`` also appends the hook's handle to ``handles``."""

    def __init__(self, grad_fn: Any, handles: list[Any]) -> None:
        self._grad_fn, self._handles = grad_fn, handles

    def register_hook(self, hook: Callable[..., Any]) -> Any:
        handle = self._grad_fn.register_hook(hook)
        self._handles.append(handle)
        return handle

    def register_prehook(self, hook: Callable[..., Any]) -> Any:
        handle = self._grad_fn.register_prehook(hook)
        self._handles.append(handle)
        return handle

    def __getattr__(self, name: str) -> Any:  # (anything else torch asks of the grad_fn)
        return getattr(self._grad_fn, name)


#: where a tensor lives in a module tree: (the owning module's ``_parameters`` or ``_buffers`` dict, key)
Slot = tuple[dict[str, Any], str]


def _param_slots(module: nn.Module) -> dict[int, list[Slot]]:
    """Every place a parameter is stored, by the parameter's id.

    Each module object is visited once (a submodule reachable under two names has one
    ``_parameters`` dict), and a parameter tied into two modules gets both places.
    """
    out: dict[int, list[Slot]] = {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod._parameters, name))
    return out


def _buffer_slots(module: nn.Module) -> tuple[tuple[str, ...], tuple[Slot, ...]]:
    """Names and places of the module's buffers (each module object once; ``None`` buffers skipped)."""
    names, slots = [], []
    seen: set[int] = set()
    for prefix, mod in module.named_modules():
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for name, b in mod._buffers.items():
            if b is not None:
                names.append(f"{prefix}.{name}" if prefix else name)
                slots.append((mod._buffers, name))
    return tuple(names), tuple(slots)


def tensor_slots(module: nn.Module) -> dict[str, list[Slot]]:
    """Every place each parameter and buffer of ``module`` is stored, by its (first) name: a
    submodule reachable under two names, or a parameter tied into two modules, gets all its
    places, so :func:`substituting` replaces (and restores) it everywhere it acts."""
    by_id = _param_slots(module)
    out = {n: by_id[id(p)] for n, p in module.named_parameters()}
    names, slots = _buffer_slots(module)
    out.update((n, [slot]) for n, slot in zip(names, slots, strict=True))
    return out


class _TupleAttribute:
    """A module's plain tuple attribute as a place :func:`substituting` can write items into: a
    write puts a new tuple on the module, and the original tuple object back once its items are
    the original ones again. Writes nothing once the attribute holds another value than these
    (reassigned by the user since)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.original = self.made = vars(module)[name]

    def __getitem__(self, i: int) -> Any:
        return vars(self.module)[self.name][i]

    def __setitem__(self, i: int, value: Any) -> None:
        d = vars(self.module)
        now = d.get(self.name)
        if now is not self.original and now is not self.made:
            return
        items = (*now[:i], value, *now[i + 1 :])
        if all(a is b for a, b in zip(items, self.original, strict=True)):
            d[self.name] = self.made = self.original
        else:
            d[self.name] = self.made = items


def attribute_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Any, Tensor]]:
    """Every tensor ``model``'s modules hold in plain (unregistered) attributes, as ``(module
    name, module, attribute, key, tensor)``: ``key`` is ``None`` for a tensor attribute itself,
    the index of an item of a list or tuple attribute, the key of an item of a dict one. Each
    module once; one pass over the modules' attributes."""
    seen: set[int] = set()
    for prefix, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for k, v in vars(mod).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, Tensor):
                yield prefix, mod, k, None, v
                continue
            items = enumerate(v) if isinstance(v, (list, tuple)) else v.items() if isinstance(v, dict) else ()
            for i, t in items:
                if isinstance(t, Tensor):
                    yield prefix, mod, k, i, t


def _held_slots(model: nn.Module, tensors: Sequence[Tensor]) -> dict[int, list[Any]]:
    """The places where ``model``'s modules hold any of ``tensors`` in plain attributes (not
    registered: an item of a list, tuple or dict attribute, or the attribute itself), by the
    tensor's id, as :data:`Slot`-like ``(container, key)`` pairs (a tuple's items through one
    :class:`_TupleAttribute` per attribute; a tuple subclass, whose type a new tuple would lose,
    is left out). At construction and when the model's layout moves, not per call."""
    ids = {id(t) for t in tensors}
    out: dict[int, list[Any]] = {}
    proxies: dict[tuple[int, str], _TupleAttribute] = {}
    for _, mod, k, key, t in attribute_tensors(model):
        if id(t) not in ids:
            continue
        v = vars(mod)[k]
        if key is None:
            slot: Any = (vars(mod), k)
        elif isinstance(v, (list, dict)):
            slot = (v, key)
        elif type(v) is tuple:  # (its items are written one after another through one proxy)
            proxy = proxies.setdefault((id(mod), k), _TupleAttribute(mod, k))
            slot = (proxy, key)
        else:
            continue
        out.setdefault(id(t), []).append(slot)
    return out


@contextlib.contextmanager
def substituting(places: Iterable[tuple[Sequence[Slot], Any]]) -> Iterator[None]:
    """Within the block each ``(slots, value)``'s places hold ``value``; the original objects are
    put back afterwards, whatever happens. Unlike ``torch.func.functional_call`` (torch 2.13),
    exact for modules that reuse a submodule or tie a parameter."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for slots, value in places:
            for d, k in slots:
                saved.append((d, k, d[k]))
                d[k] = value
        yield
    finally:
        for d, k, v in reversed(saved):
            d[k] = v


@contextlib.contextmanager
def _uncached(active: bool) -> Iterator[None]:
    """Within the block (if ``active``), ``torch.nn.utils.parametrize.cached()`` is suspended: its
    cache, keyed by module and name, would hand a parametrised weight computed from the real
    tensors to a call on substituted ones (a silently wrong replay)."""
    from torch.nn.utils import parametrize

    if not active or not getattr(parametrize, "_cache_enabled", 0):
        yield
        return
    enabled, cache = parametrize._cache_enabled, parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = enabled, cache


class FunctionalPair:
    """Evaluates user losses with the weights, buffers and/or hyperparameters substituted.

    Inside the call, ``model(x)``, ``model.parameters()`` and ``model.named_parameters()`` see the
    substituted tensors, and so do the hyperparameter containers' parameters. The substitution
    writes straight into the owning modules' ``_parameters`` / ``_buffers`` dicts and restores
    the original objects afterwards, whatever happens, so it is exact for models that reach one
    submodule under two names or tie one parameter into two modules (where
    ``torch.func.functional_call`` in torch 2.13 leaves a plain tensor behind). Buffers passed
    in are copied, and the copies receive the in-place updates of running statistics
    (BatchNorm); :meth:`call` returns them, and any buffer a module *reassigns*
    (``self.mean = 0.9 * self.mean + ...``).

    Args:
        model: the model being trained.
        hparams: the module whose parameters are the hyperparameters.
        weights: the model parameters that are trained (those in the inner optimiser requiring
            grad); :meth:`set_weights` changes them later.
    """

    def __init__(self, model: nn.Module, hparams: nn.Module, weights: Sequence[Tensor]) -> None:
        self.model = model
        self.hparams = hparams
        self.hparam_names = tuple(n for n, _ in hparams.named_parameters())
        self.hparam_tensors: Tensors = tuple(p for _, p in hparams.named_parameters())
        hp_slots = _param_slots(hparams)
        self._own_hparam_slots = [hp_slots[id(p)] for p in self.hparam_tensors]
        self._hparam_slots = self._own_hparam_slots
        self.set_weights(weights)

    def set_weights(self, weights: Sequence[Tensor]) -> None:
        """Make ``weights`` (model parameters) the trained ones, in ``named_parameters`` order."""
        ids = {id(w) for w in weights}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]
        self.weight_names = tuple(n for n, _ in named)
        self.weights: Tensors = tuple(p for _, p in named)
        slots = _param_slots(self.model)
        self._weight_slots = [slots[id(p)] for p in self.weights]
        self.buffer_names, self._buffer_slots = _buffer_slots(self.model)
        # recurrent layers keep their own list of their weights (``_flat_weights``), refreshed at
        # their next forward: refreshed at once after each call instead, so that it does not hold
        # the substituted tensors, and the graph behind them, until then
        self._rnns = [m for m in self.model.modules() if isinstance(m, nn.RNNBase)]
        # the trained weights and hyperparameters the model holds itself, in plain attributes
        # (DARTS's ``self._arch_parameters = [alpha_normal, alpha_reduce]``, a decoder reading
        # ``self.tied = [encoder.weight]``): substituted there too, or a call with other tensors (a
        # replayed step's, forward mode's dual tensors) ran the model on the real ones (forward
        # mode: a hypergradient of 0; reverse mode: steps before the window re-run with the
        # current hyperparameters; a replay reading the final weights)
        held = _held_slots(self.model, [*self.weights, *self.hparam_tensors])
        if held:
            self._weight_slots = [
                s + held.get(id(p), []) for s, p in zip(self._weight_slots, self.weights, strict=True)
            ]
        own = getattr(self, "_own_hparam_slots", None)  # (pairs pickled before it was kept)
        if own is not None:
            self._hparam_slots = [
                slots + held.get(id(p), []) for slots, p in zip(own, self.hparam_tensors, strict=True)
            ]

    def replaced_weights(self) -> list[str]:
        """The names of the trained weights that the model no longer holds where it held them (a
        parametrisation registered on them, or a new ``nn.Parameter`` assigned in their place,
        since :meth:`set_weights`); a few dictionary look-ups."""
        # (``k in d``, not ``d.get``: a scripted module's ``_parameters`` has no ``get``)
        return [
            n
            for n, w, ((d, k), *_) in zip(self.weight_names, self.weights, self._weight_slots, strict=True)
            if k not in d or d[k] is not w
        ]

    def buffers(self) -> Tensors:
        """The model's buffers, in ``buffer_names`` order (the real tensors)."""
        return tuple(d[k] for d, k in self._buffer_slots)

    def call(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        weights: Sequence[Tensor] | None = None,
        buffers: Sequence[Tensor] | None = None,
        hparams: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensors]:
        """``loss_fn(model, hparams, batch)`` with the given tensors substituted.

        ``None`` uses the real tensors. Buffers given are copied first (``clone``, so the copies
        stay on the autograd graph of any that carry one): the call updates the copies, never the
        tensors passed in (pass ``self.buffers()`` to run on the real running statistics' values
        and leave them untouched), and each call's graph keeps its own values however later calls
        update theirs.

        Returns:
            ``(loss, buffers after the call)``; the second holds what the modules' buffer slots
            held at the end of the call (the updated copies, or what a module reassigned).
        """
        places: list[tuple[Sequence[Slot], Any]] = []
        if weights is not None:
            places += zip(self._weight_slots, weights, strict=True)
        if buffers is not None:
            # copies, one set per call: a module that updates a buffer in place and then reads it
            # (an EMA normaliser) would otherwise, in the next replayed step, overwrite the values
            # this call's graph saved (autograd's "modified by an inplace operation" error; with a
            # ``.data`` update, silently the later values: a hypergradient 3% off)
            places += (([slot], b.clone()) for slot, b in zip(self._buffer_slots, buffers, strict=True))
        if hparams is not None:
            places += zip(self._hparam_slots, hparams, strict=True)
        try:
            with substituting(places), differentiable_twice(), _uncached(weights is not None):
                out = loss_fn(self.model, self.hparams, batch)  # (methods differentiate it twice)
                after = self.buffers()
        finally:
            if weights is not None:
                for rnn in getattr(self, "_rnns", ()):  # (pairs pickled before it existed)
                    rnn._update_flat_weights()
        out = self._check_scalar(out, loss_fn)
        if not out.requires_grad and (torch.is_inference(out) or torch.is_grad_enabled()):
            # (failure path only) a loss on no autograd graph although weights it could reach
            # require grad: computed under torch.no_grad() / inference_mode() (the validation
            # habit) or detached. Named by the DisconnectedWarning, whose other causes it is not
            import torch.autograd.forward_ad as fwAD

            used = self.weights if weights is None else weights
            if torch.is_inference(out) or (
                fwAD.unpack_dual(out).tangent is None
                and any(isinstance(w, Tensor) and w.requires_grad for w in used)
            ):
                self.__dict__.setdefault("graphless", set()).add(getattr(loss_fn, "__name__", repr(loss_fn)))
        return out, after

    def loss(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        weights: Sequence[Tensor] | None = None,
        buffers: Sequence[Tensor] | None = None,
        hparams: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """:meth:`call` without the buffers."""
        return self.call(loss_fn, batch, weights=weights, buffers=buffers, hparams=hparams)[0]

    @staticmethod
    def _check_scalar(out: Any, loss_fn: LossFn) -> Tensor:
        if isinstance(out, Tensor) and out.dim() and out.numel() == 1:
            # a one-element loss (``torch.zeros(1)`` accumulated over terms) is a scalar, as for
            # torch's ``backward()`` and the functional entry points here
            out = out.reshape(())
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"loss functions must return a scalar Tensor; {getattr(loss_fn, '__name__', loss_fn)}"
                f" returned {shape}"
            )
        if out.is_complex():
            raise ValueError(
                f"loss functions must return a real scalar Tensor; {getattr(loss_fn, '__name__', loss_fn)}"
                f" returned {out.dtype} (a complex value has no minimum: |z|^2 as (z.conj() * z).real)"
            )
        if not out.is_floating_point():  # (an integer count crashed later, in a norm, naming neither)
            raise ValueError(
                f"loss functions must return a floating-point scalar Tensor; "
                f"{getattr(loss_fn, '__name__', loss_fn)} returned {out.dtype}, which has no gradient "
                "(a count of errors, torch.tensor(0)): compute the loss in floating point, e.g. "
                "torch.zeros((), device=...) for a batch with nothing to learn"
            )
        return out

    def snapshot_buffers(self) -> list[tuple[dict[str, Any], str, Tensor, Tensor]]:
        """The real buffers with copies of their values, for :meth:`restore_buffers`."""
        return [(d, k, d[k], d[k].detach().clone()) for d, k in self._buffer_slots]

    @staticmethod
    def restore_buffers(snapshot: list[tuple[dict[str, Any], str, Tensor, Tensor]]) -> None:
        """Put back the buffer objects and values of :meth:`snapshot_buffers` (undo a forward)."""
        with torch.no_grad():
            for d, k, obj, value in snapshot:
                d[k] = obj
                obj.copy_(value)


# ----------------------------------------------------------------------------- second derivatives


def _weight_norm_exact(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))


_EMBEDDING = torch.embedding
_CDIST = torch.cdist


def _embedding_dense(
    weight: Tensor,
    indices: Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    if scale_grad_by_freq and weight.requires_grad and torch.is_grad_enabled():
        # the "gradient" it reports (each row's divided by its count in the batch) is no loss's
        # gradient: its Jacobian is not symmetric once the embedding feeds other weights, and
        # autograd's second pass runs the scaled backward on the forward path again, returning the
        # Jacobian-vector product J u where the vector-Jacobian product J^T u is due (hypergradients
        # 15-35% off, silently, through Implicit and Unrolled alike); the validation gradient it
        # gives is not the validation loss's gradient either
        raise RuntimeError(
            "nn.Embedding(scale_grad_by_freq=True) / F.embedding(..., scale_grad_by_freq=True) "
            "cannot be differentiated twice correctly: its scaled gradient is not the gradient of "
            "the loss, and PyTorch's second derivative of it is wrong (J u for J^T u), so "
            "hypergradients through it would be silently wrong. Use scale_grad_by_freq=False "
            "(e.g. per-token loss weights or an adaptive optimiser instead), or leave the embedding "
            "out of the weights (requires_grad_(False))"
        )
    if padding_idx >= 0 and _THREAD.exact_padding and weight.requires_grad and torch.is_grad_enabled():
        # torch's lookup gives the padding row no gradient, yet its forward reads that row: the
        # masked "gradient" is no loss's gradient once the row is not 0 (from_pretrained(...,
        # padding_idx=...), a row a tied head trains), and its double backward masks the row too,
        # where the steps' other gradients depend on it. Looked up unmasked, with the training
        # gradient's masking (the same values as torch's) done by a hook on the output that
        # collecting_gradient_hooks removes once that gradient is taken: its derivative, and the
        # validation loss's gradient, see the row (an unrolled hypergradient was 26-33% off, the
        # padding row's decays got exactly 0)
        out = _EMBEDDING(weight, indices, -1, False, False)
        if _THREAD.collecting:
            pad = (indices == padding_idx).unsqueeze(-1)
            out.register_hook(lambda g: g.masked_fill(pad, 0))
        return out
    return _EMBEDDING(weight, indices, padding_idx, scale_grad_by_freq, False)


_EMBEDDING_RENORM = torch.nn.functional._no_grad_embedding_renorm_  # type: ignore[attr-defined]


def _embedding_renorm_differentiable(
    weight: Tensor, input: Tensor, max_norm: float, norm_type: float
) -> None:
    """``nn.Embedding(max_norm=...)``'s in-place renormalisation of the rows a forward pass looks
    up, recorded by autograd where the weight is a replayed step's tensor (not a leaf): torch
    renormalises ``weight.detach()``, so the replay took the steps' values but differentiated them
    as if the rows had not been rescaled (an unrolled hypergradient 25% off the finite differences
    of the real training, silently). Same values as ``torch.embedding_renorm_``."""
    if not (torch.is_grad_enabled() and weight.requires_grad and not weight.is_leaf):
        _EMBEDDING_RENORM(weight, input, max_norm, norm_type)
        return
    rows = input.reshape(-1).unique()
    picked = weight.index_select(0, rows)
    norms = torch.linalg.vector_norm(picked, norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    weight.index_copy_(0, rows, picked * scale)


def _cdist_mm(
    x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: str = "use_mm_for_euclid_dist_if_necessary"
) -> Tensor:
    if p == 2 and compute_mode in (None, "use_mm_for_euclid_dist_if_necessary"):
        compute_mode = "use_mm_for_euclid_dist"
    return _CDIST(x1, x2, p, compute_mode)


_SPECTRAL_FORWARD: Any = _SpectralNorm.forward
_SPECTRAL_COMPUTE: Any = SpectralNorm.compute_weight
_MSE_LOSS: Any = torch._C._nn.mse_loss  # (its stub says reduction: str; the kernel takes the enum)


def _mse_loss_forward_safe(input: Tensor, target: Tensor, reduction: int = 1) -> Tensor:
    """``F.mse_loss``'s kernel, or for inputs carrying forward-mode tangents the same arithmetic
    from elementary operations: the kernel's double backward there raised "ZeroTensors are
    immutable" (torch 2.13: a gradient with ``create_graph=True`` of ``mse_loss`` on a dual
    tensor, as in every replayed step of ``Unrolled(mode="forward")``)."""
    from torch.autograd import forward_ad

    if forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in (input, target)
    ):
        loss = torch.pow(input - target, 2)
        return loss if reduction == 0 else loss.sum() if reduction == 2 else loss.mean()
    return _MSE_LOSS(input, target, reduction)


def _hardsigmoid_twice(input: Tensor) -> Tensor:
    """``F.hardsigmoid`` as ``x / 6 + 1/2`` on ``(-3, 3)``, else 0 or 1: the same values and first
    derivative (0 at the kinks, as the kernel's), and a second derivative (the kernel's backward
    has none in torch 2.13: ``nn.Hardsigmoid`` in MobileNetV3's squeeze-excitation blocks)."""
    inside = (input > -3) & (input < 3)
    return torch.where(inside, input / 6 + 0.5, (input >= 3).to(input.dtype))


def _hardsigmoid_twice_(input: Tensor) -> Tensor:
    """``F.hardsigmoid(..., inplace=True)`` (``nn.Hardsigmoid(inplace=True)``) as
    :func:`_hardsigmoid_twice` written back into ``input``: the in-place kernel's backward has no
    derivative either (Implicit named it with unrelated advice; Unrolled's replay raised torch's
    bare "derivative for aten::hardsigmoid_backward is not implemented")."""
    return input.copy_(_hardsigmoid_twice(input))


def _sigma_curvature(weight_mat: Tensor) -> Tensor:
    r""":math:`c(W) = \sigma_{\max}(W) - u_*^\top W v_*` minus its value, with :math:`u_*, v_*` the
    (constant) top singular vectors at the current :math:`W`: 0 in value and in first derivative,
    with the second derivative of :math:`\sigma_{\max}`."""
    w0 = weight_mat.detach()
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    c = torch.linalg.matrix_norm(weight_mat, 2) - torch.vdot(u[:, 0], torch.mv(weight_mat, vh[0]))
    return c - c.detach()


def _spectral_correction(out: Tensor, weight_mat: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r"""``out = W / sigma`` (``sigma = u^T W v``, the power iteration's vectors held constant, as
    torch differentiates it) with the curvature of :math:`\sigma_{\max}(W)` added: the same value
    and first derivative, and at a fixed point of the power iteration (:math:`u, v` the top
    singular vectors) the second derivative of :math:`W / \sigma_{\max}(W)`."""
    sigma = torch.vdot(u, torch.mv(weight_mat.detach(), v))
    return out - out.detach() * (_sigma_curvature(weight_mat) / sigma)


def _spectral_norm_forward(self: Any, weight: Tensor) -> Tensor:
    """``nn.utils.parametrizations.spectral_norm``'s forward (which updates ``_u`` and ``_v`` in
    training mode), with :func:`_spectral_correction` in training mode."""
    out = _SPECTRAL_FORWARD(self, weight)
    if weight.ndim == 1 or not self.training or not torch.is_grad_enabled():
        return out
    return _spectral_correction(out, self._reshape_weight_to_matrix(weight), self._u, self._v)


def _spectral_norm_compute_weight(self: Any, module: nn.Module, do_power_iteration: bool) -> Tensor:
    """The hook-based ``nn.utils.spectral_norm``'s weight, with :func:`_spectral_correction` when it
    runs its power iteration (training mode)."""
    out = _SPECTRAL_COMPUTE(self, module, do_power_iteration)
    if not do_power_iteration or self.n_power_iterations <= 0 or not torch.is_grad_enabled():
        return out
    weight_mat = self.reshape_weight_to_matrix(getattr(module, self.name + "_orig"))
    u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
    return _spectral_correction(out, weight_mat, u, v)


def _checkpoint_keeping_activations(fn: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    """Stand-in for ``torch.utils.checkpoint``'s non-reentrant machinery: the checkpointed function
    runs once and autograd keeps its activations, as without checkpointing (``checkpoint`` runs
    ``fn`` itself between the generator's two steps)."""
    yield


def _twice_targets() -> list[tuple[Any, str, Any]]:
    """(namespace, attribute, replacement) for every entry point :func:`differentiable_twice`
    replaces (those present in this torch)."""
    import sys

    import torch.nn.utils.weight_norm  # noqa: F401 (the module: its name is shadowed by the function)
    import torch.utils.checkpoint

    old_weight_norm = sys.modules["torch.nn.utils.weight_norm"]
    out: list[tuple[Any, str, Any]] = [
        (torch, "_weight_norm", _weight_norm_exact),  # nn.utils.parametrizations.weight_norm
        (old_weight_norm, "_weight_norm", _weight_norm_exact),  # nn.utils.weight_norm (imported name)
        (torch, "embedding", _embedding_dense),  # F.embedding calls torch.embedding
        # F.embedding / F.embedding_bag call it for max_norm
        (torch.nn.functional, "_no_grad_embedding_renorm_", _embedding_renorm_differentiable),
        (torch, "cdist", _cdist_mm),
        (torch._C._nn, "mse_loss", _mse_loss_forward_safe),  # F.mse_loss calls it
        (torch._C._nn, "hardsigmoid", _hardsigmoid_twice),  # F.hardsigmoid(inplace=False) calls it
        (torch._C._nn, "hardsigmoid_", _hardsigmoid_twice_),  # F.hardsigmoid(inplace=True) calls it
        # checkpoint(use_reentrant=False) looks this name up at every call
        (torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", _checkpoint_keeping_activations),
        # nn.MultiheadAttention / nn.TransformerEncoder(Layer) in eval mode take torch's fused
        # fast path whenever no input requires grad, as in forward mode's validation loss (dual
        # tensors that do not require grad): its kernels have no forward-mode derivative
        # ("Trying to use forward AD with aten::_transformer_encoder_layer_fwd"); the composite
        # path computes the same values and differentiates in either mode
        (torch.backends.mha, "_is_fastpath_enabled", False),
    ]
    return [(ns, name, fn) for ns, name, fn in out if hasattr(ns, name)]


def _fixed_point_targets() -> list[tuple[Any, str, Any]]:
    """The entry points :func:`differentiable_twice` also replaces with ``at_fixed_point=True``."""
    return [
        (_SpectralNorm, "forward", _spectral_norm_forward),  # nn.utils.parametrizations.spectral_norm
        (SpectralNorm, "compute_weight", _spectral_norm_compute_weight),  # nn.utils.spectral_norm
    ]


_TWICE_LOCK = threading.Lock()
_TWICE_STATE: dict[str, Any] = {"open": 0, "saved": []}
_FIXED_POINT_STATE: dict[str, Any] = {"open": 0, "saved": []}
_CHECKPOINT_STATE: dict[str, Any] = {"open": 0, "saved": [], "calls": 0}


class _ReentrantCheckpoint:
    """Stand-in for ``torch.utils.checkpoint``'s ``CheckpointFunction`` (``checkpoint(...,
    use_reentrant=True)``, also torch's default when ``use_reentrant`` is not given), while a
    :func:`differentiable_twice` or :func:`noting_reentrant_checkpoints` block is open. It counts
    its calls, and inside :func:`differentiable_twice` runs the function with autograd recording
    (keeping its activations) instead of under ``no_grad``: the real one recomputes it in a backward
    pass, which ``torch.autograd.grad`` and ``backward(inputs=...)`` skip, so the weights inside got
    no gradient, silently (torch 2.13: a hypergradient of exactly 0 for their weight decay)."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        _CHECKPOINT_STATE["calls"] += 1
        if _TWICE_STATE["open"]:
            return function(*args)
        saved = _CHECKPOINT_STATE["saved"]  # (empty if another thread closed the last block since)
        real = saved[0][2] if saved else torch.utils.checkpoint.CheckpointFunction
        return real.apply(function, preserve_rng_state, *args)


def _checkpoint_targets() -> list[tuple[Any, str, Any]]:
    """The reentrant checkpoint's entry point (``checkpoint`` looks it up at every call)."""
    import torch.utils.checkpoint

    found = hasattr(torch.utils.checkpoint, "CheckpointFunction")
    return [(torch.utils.checkpoint, "CheckpointFunction", _ReentrantCheckpoint)] if found else []


@contextlib.contextmanager
def noting_reentrant_checkpoints() -> Iterator[Callable[[], int]]:
    """Within the block ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` works as
    usual (it still saves memory) and is counted: the block yields a function giving the number of
    such calls so far in the block (in any thread). A backward pass over a graph holding one must
    run without ``inputs=`` (:meth:`HyperOptimizer.step`), since torch skips the checkpointed
    part's recomputation, and the gradients of the weights inside it, in a backward pass that
    names its inputs."""
    _open_swap(_CHECKPOINT_STATE, _checkpoint_targets)
    start = _CHECKPOINT_STATE["calls"]
    try:
        yield lambda: _CHECKPOINT_STATE["calls"] - start
    finally:
        _close_swap(_CHECKPOINT_STATE)


def _open_swap(state: dict[str, Any], targets: Any) -> None:
    with _TWICE_LOCK:
        if state["open"] == 0:
            found = targets()
            state["saved"] = [(ns, name, getattr(ns, name)) for ns, name, _ in found]
            for ns, name, fn in found:
                setattr(ns, name, fn)
        state["open"] += 1


def _close_swap(state: dict[str, Any]) -> None:
    with _TWICE_LOCK:
        state["open"] -= 1
        if state["open"] == 0:
            for ns, name, fn in state["saved"]:
                setattr(ns, name, fn)
            state["saved"] = []


@contextlib.contextmanager
def differentiable_twice(at_fixed_point: bool = False) -> Iterator[None]:
    r"""Within the block, a loss's graph can be differentiated twice (HVPs, mixed derivatives).

    PyTorch operations whose kernels have a wrong, missing or sparse second derivative are
    replaced by equivalents built from twice-differentiable operations (same values up to
    rounding), and scaled dot-product attention uses its math kernel (the fused CPU and CUDA
    kernels have no double backward):

    * ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the older
      ``nn.utils.weight_norm``): its fused kernel's double backward treats the norm as a constant
      (torch 2.13, CPU and CUDA), so Hessian-vector products through a weight-normalised layer are
      silently wrong; the composite ``v * (g / norm_except_dim(v, 2, dim))`` is exact;
    * ``torch.embedding(..., sparse=True)`` (``nn.Embedding(sparse=True)``): the gradient is
      computed dense (same values), since HVPs and linear solvers work on dense vectors;
    * ``torch.cdist(p=2)``: computed through matrix products, whose backward is differentiable
      (the direct kernel, used for at most 25 rows, has no double backward);
    * ``F.mse_loss`` on inputs carrying forward-mode tangents: computed as
      ``(input - target) ** 2`` reduced (the kernel's double backward raised "ZeroTensors are
      immutable" there); other inputs keep the kernel;
    * ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the checkpointed function
      keeps its activations instead of being recomputed in the backward pass. The recomputation
      runs after the loss call has returned, so it would read the model's real tensors rather than
      the substituted ones (a replayed step of :class:`~hypergrad.Unrolled` then differentiates
      the current weights instead of the replayed ones). Memory inside these blocks is therefore
      that of the model without checkpointing; :meth:`HyperOptimizer.step` still checkpoints.
      Likewise ``checkpoint(..., use_reentrant=True)`` (torch's default without the argument),
      whose recomputation ``torch.autograd.grad`` skips altogether: the weights inside had
      gradient 0 in every HVP and mixed derivative, silently.

    * ``F.hardsigmoid`` (``nn.Hardsigmoid()``, MobileNetV3's squeeze-excitation gate): its
      kernel's backward has no derivative; computed as ``x / 6 + 1/2`` inside ``(-3, 3)`` and
      0 or 1 outside (the same values and first derivative).

    * the fused fast path of ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)``
      (``torch.backends.mha``), taken in eval mode when no input requires grad, as forward-mode
      dual tensors do not: its kernels have no forward-mode derivative; the composite path
      computes the same values.

    With ``at_fixed_point=True`` (the implicit function theorem's setting: the training loss
    differentiated twice at a rest point of training), also:

    * ``nn.utils.parametrizations.spectral_norm`` and the hook-based ``nn.utils.spectral_norm``
      in training mode: torch divides by :math:`\sigma = u^\top W v` and differentiates with the
      power iteration's :math:`u, v` held constant, exact to first order once they have
      converged but without the curvature of :math:`\sigma_{\max}(W)` that the converged
      vectors follow: a hypergradient 87% off the finite differences of the training gradient
      on a small MLP. A term with value 0 and first derivative 0 and the second derivative of
      :math:`\sigma_{\max}(W)` (from an SVD of the weight matrix per call) is added; in
      evaluation mode (:math:`u, v` frozen) nothing changes. Not for unrolled steps, which
      differentiate the steps as taken (:math:`u, v` constants, as autograd records them).
      The Hessian of :math:`\sigma_{\max}` does not exist where the largest singular value is
      repeated.

    The replacements are the entry points' attributes (``torch.cdist`` etc.), swapped while any
    block is open (in any thread: they compute the same values, and the same first derivatives)
    and restored when the last one closes; unlike a ``TorchFunctionMode``, they cost nothing per
    operation.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _open_swap(_TWICE_STATE, _twice_targets)
    _open_swap(_CHECKPOINT_STATE, _checkpoint_targets)
    try:
        if at_fixed_point:
            _open_swap(_FIXED_POINT_STATE, _fixed_point_targets)
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        finally:
            if at_fixed_point:
                _close_swap(_FIXED_POINT_STATE)
    finally:
        _close_swap(_CHECKPOINT_STATE)
        _close_swap(_TWICE_STATE)


_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
_ONCE_STATE: dict[str, Any] = {"open": 0, "saved": [], "what": "", "always": True}


def _once_differentiable_name(node: Any) -> str | None:
    """The class name of a custom ``torch.autograd.Function`` whose ``backward`` is marked
    ``@once_differentiable`` (``None`` for any other)."""
    cls = getattr(node, "_forward_cls", None)
    backward = getattr(cls, "backward", None)
    if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
        return getattr(cls, "__name__", "a custom Function")
    return None


_BACKWARD_APPLY = torch.autograd.function.BackwardCFunction.apply


def _backward_apply_refusing_once(self: Any, *args: Any) -> Any:
    if not torch.is_grad_enabled():  # (a backward pass without create_graph=True)
        return _BACKWARD_APPLY(self, *args)
    mine = _THREAD.once
    if mine is None:
        if not isinstance(threading.current_thread(), threading._DummyThread):
            # another Python thread's own backward pass (plain PyTorch code running beside a
            # hyperstep, an Optuna study with n_jobs=2): the entry point is swapped process-wide,
            # and such a pass with create_graph=True through a once-differentiable Function was
            # refused with this module's error, naming a hyperstep it was no part of
            return _BACKWARD_APPLY(self, *args)
        # (the autograd engine's own worker threads, which run a GPU graph's nodes, are no Python
        # threads: checked as the latest block opened says)
        mine = (_ONCE_STATE["what"], _ONCE_STATE["always"])
    what, always = mine  # (this thread's own: a block opened in another thread set the globals)
    name = _once_differentiable_name(self)
    # (forward-mode tangents pass through its backward unless torch detaches its outputs, which it
    # does where a gradient flowing in requires grad)
    graph_in = any(isinstance(a, Tensor) and a.requires_grad for a in args)
    if name is not None and (always or graph_in):
        raise RuntimeError(
            f"{what} differentiates the training loss's gradient again, but the "
            f"custom autograd.Function {name} on its path to the weights has a backward marked "
            f"@once_differentiable: its gradient would enter as a constant (torch raises no "
            f"error for torch.autograd.grad, and the hypergradient came out silently wrong). Write "
            f"its backward with differentiable torch operations (without @once_differentiable), or "
            f"leave the weights before it out (Implicit(hessian_subset=...), requires_grad_(False))"
        )
    out = _BACKWARD_APPLY(self, *args)
    if always:
        # a gradient that requires grad came in, and none went out: the backward computed it
        # without recording (torch.no_grad(), .detach(), NumPy), so its derivative would be lost
        # too (a gradient of exactly 0, e.g. of a step function, is a constant rightly)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, Tensor)]
        lost = bool(outs) and not any(o.requires_grad for o in outs)
        if lost and not graph_in:
            # the gradient flowing in is a constant (the loss's own seed of ones: a custom loss
            # Function at the top of the graph, the commonest place for one): a backward of
            # differentiable operations may rightly return a constant there (a linear Function),
            # so it is called again with that gradient as a leaf, on which such a backward records
            # and one computed without recording does not (a custom MSE whose backward ran under
            # no_grad lost the loss's curvature: a hypergradient 30x off, silently). Only where
            # the gradient came out without a graph; hypergrad's own Functions are exact
            cls = getattr(self, "_forward_cls", None)
            if str(getattr(cls, "__module__", "")).startswith("hypergrad."):
                lost = False
            else:
                leaves = [
                    a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
                    for a in args
                ]
                try:
                    again = _BACKWARD_APPLY(self, *leaves)
                except Exception:  # (a backward that cannot run twice: given the benefit of the doubt)
                    lost = False
                else:
                    again = again if isinstance(again, tuple) else (again,)
                    lost = not any(o.requires_grad for o in again if isinstance(o, Tensor))
        if lost and any(bool(o.any()) for o in outs):
            cls = getattr(self, "_forward_cls", None)
            raise RuntimeError(
                f"{what} differentiates the training loss's gradient again, but the "
                f"backward of the custom autograd.Function {getattr(cls, '__name__', '?')} on its path "
                f"to the weights returns a gradient without an autograd graph (computed under "
                f"torch.no_grad(), from .detach()ed tensors or NumPy), so its derivative would be "
                f"lost and the hypergradient silently wrong. Write its backward with differentiable "
                f"torch operations, or leave the weights before it out "
                f"(Implicit(hessian_subset=...), requires_grad_(False))"
            )
    return out


@contextlib.contextmanager
def refusing_once_differentiable(what: str, *, forward_mode: bool = False) -> Iterator[None]:
    """Within the block, a backward pass with ``create_graph=True`` that reaches a custom
    ``torch.autograd.Function`` whose ``backward`` is ``@once_differentiable`` raises an error
    naming it and ``what``. torch's own guard (a node raising when differentiated again) lies off
    every path to the weights, so ``torch.autograd.grad(..., inputs=weights)`` never reaches it:
    the HVPs through such a function silently lacked its second derivative (and, where it takes the
    loss's own gradient, e.g. a custom loss, everything downstream of it). The check runs only
    where the engine calls a custom Function's backward (an attribute lookup each).
    ``forward_mode``: the gradient carries forward-mode tangents (``Unrolled(mode="forward")``),
    which a once-differentiable backward passes on unless a gradient flowing into it requires
    grad (torch then detaches its outputs): only that case is refused."""
    backward_cls = torch.autograd.function.BackwardCFunction
    _open_swap(_ONCE_STATE, lambda: [(backward_cls, "apply", _backward_apply_refusing_once)])
    # (the process-wide settings, which the autograd engine's own worker threads read, are put
    # back when the block closes: a forward-mode block that ended left a concurrent Implicit
    # block's checks relaxed there)
    before = (_ONCE_STATE["what"], _ONCE_STATE["always"])
    _ONCE_STATE["what"], _ONCE_STATE["always"] = what, not forward_mode
    outer, _THREAD.once = _THREAD.once, (what, not forward_mode)
    try:
        yield
    finally:
        _THREAD.once = outer
        _ONCE_STATE["what"], _ONCE_STATE["always"] = before
        _close_swap(_ONCE_STATE)


@contextlib.contextmanager
def naming_missing_second_derivatives(what: str) -> Iterator[None]:
    """Re-raise PyTorch's "derivative for X is not implemented" (an operation without a double
    backward met by an HVP) as an error saying what needed it and what to do."""
    try:
        yield
    except RuntimeError as e:  # (NotImplementedError is one)
        msg = str(e)
        if "derivative for" not in msg or "not implemented" not in msg:
            raise
        raise RuntimeError(
            f"{what} differentiates the training loss twice (Hessian-vector products), but PyTorch has "
            f"no second derivative for an operation it uses ({msg.splitlines()[0]}). Write that step of "
            "the loss with twice-differentiable operations (e.g. nn.EmbeddingBag as nn.Embedding "
            "followed by a sum or mean), or leave the weights before it out of the solve "
            "(Implicit(hessian_subset=...))"
        ) from e


# ----------------------------------------------------------------------------- tensor tuples


def clone_all(ts: Sequence[Tensor]) -> Tensors:
    return tuple(t.detach().clone() for t in ts)


def zeros_like_all(ts: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) for t in ts)


def _wide_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """The dtype a product of ``x`` and ``y`` is summed in: theirs, at least float32."""
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


def memory_span(t: Tensor) -> tuple[int, int, int]:
    """``(storage, start, end)``: the address of ``t``'s storage and the byte range ``[start,
    end)`` its elements can occupy (strides included), to tell whether two tensors may share
    memory; disjoint views of one buffer have disjoint ranges. ``t`` has at least one element."""
    start = t.data_ptr()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.untyped_storage().data_ptr(), start, start + t.element_size() * extent


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a real 0-dim tensor (no host synchronisation). Complex entries count as
    pairs of reals (the real part of ``vdot``), the inner product under which autograd's HVPs of a
    real loss are symmetric, as ``torch.optim`` treats complex parameters."""
    if not a:
        return torch.zeros(())
    # float16 / bfloat16 products summed in float32, and the sum kept there: a float16 result
    # overflows at 65504 (CG's curvature p'Hp of 5000 weights at H = 30 I was inf, its solution
    # NaN, "nonfinite", and every Implicit hyperstep of such a model refused)
    parts = [
        torch.vdot(x.reshape(-1), y.reshape(-1))
        if x.dtype not in _LOW_PRECISION and y.dtype not in _LOW_PRECISION
        else torch.vdot(*(t.reshape(-1).to(_wide_dtype(x, y)) for t in (x, y)))
        for x, y in zip(a, b, strict=True)
    ]
    return torch.stack([t.real if t.is_complex() else t for t in parts]).sum()


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def norm(a: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``a`` (0-dim tensor). float32 and half-precision
    tensors are accumulated in float64 and the norm returned in float32, so finite entries never
    overflow to ``inf`` nor underflow to 0 in the squares (a float32 hypergradient with an entry
    of 7.8e24, whose norm fits float32, had norm ``inf`` and its hyperstep was refused as not
    finite)."""
    if not a:
        return torch.zeros(())
    if all(t.dtype in _WIDENED for t in a):
        wide = torch._foreach_norm(list(a), 2, dtype=torch.float64)
        return torch.linalg.vector_norm(torch.stack(list(wide))).to(torch.float32)
    if any(t.dtype in _LOW_PRECISION for t in a):
        # half precision accumulated in float32; a float64 tensor beside it (a float64 head on a
        # bfloat16 body) in its own: vector_norm(dtype=float32) refused it ("should be
        # convertible without narrowing"), and Neumann's solve failed with that message
        parts = [
            torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in _LOW_PRECISION else None) for t in a
        ]
    else:
        parts = list(torch._foreach_norm(list(a)))
    return torch.linalg.vector_norm(torch.stack(parts))


#: dtypes whose squares float64 holds without overflow or underflow
_WIDENED = (torch.float32, torch.float16, torch.bfloat16)


def clip_by_total_norm(grads: Sequence[Tensor], max_norm: float) -> Tensors:
    r"""``grads`` scaled as ``torch.nn.utils.clip_grad_norm_(..., max_norm)`` scales them:
    :math:`g \cdot \min(1, c / (\lVert g \rVert_2 + 10^{-6}))`, the norm over all of them
    together. Out of place and differentiable (forward and reverse mode), so that a replayed
    step clips with the same arithmetic as the real one (:meth:`HyperOptimizer.step` uses it for
    both)."""
    if not grads:
        return ()
    norms = [torch.linalg.vector_norm(_entries(g)) for g in grads]
    dt = norms[0].dtype
    total = torch.linalg.vector_norm(torch.stack([n.to(dt) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tuple(g * coef.to(g.dtype) for g in grads)


def _entries(t: Tensor) -> Tensor:
    """The entries a tensor stores: a sparse gradient's (``nn.Embedding(sparse=True)``) values,
    coalesced (norms and finiteness tests are not implemented for sparse tensors)."""
    return t.coalesce().values() if t.is_sparse else t


def all_finite(*groups: Sequence[Tensor] | Tensor) -> bool:
    """True when every tensor given is finite. One host synchronisation (two when one is not).

    A fused 2-norm per group first (fast: ``torch._foreach_norm``, accumulated in float32): it is
    finite exactly when every entry is, unless squaring overflowed. Only when it is not finite
    does the exact test follow, entry by entry, which cannot overflow, so float16 tensors with
    large finite entries pass. Each tensor is judged in its own dtype (a float64 value of 1e300 is
    finite).
    """
    tensors: list[Tensor] = []
    for g in groups:
        if isinstance(g, Tensor):
            if g.numel():
                tensors.append(_entries(g.detach()))
        else:
            tensors.extend(_entries(t.detach()) for t in g if t.numel())
    if not tensors:
        return True
    dev = tensors[0].device
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    norms = [
        torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32 if dt.itemsize < 4 else None)).to(dev)
        for (_, dt), ts in by_kind.items()
    ]
    # each norm tested in its own dtype: cast to float32 first, a finite float64 norm above 3.4e38
    # read as inf (a float64 model with a loss of 1e40 had every step refused as non-finite)
    if bool(torch.stack([torch.isfinite(n).all() for n in norms]).all()):
        return True
    exact = [torch.isfinite(t).all().to(dev) for t in tensors]
    return bool(torch.stack(exact).all())


def grads_or_none(
    out: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_out: Tensor | Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` that gives ``None`` for inputs ``out`` does not depend on (all of
    them when no output requires grad: a detached loss, or one computed under ``no_grad``)."""
    if not inputs:
        return ()
    outs = [out] if isinstance(out, Tensor) else list(out)
    if not any(o.requires_grad for o in outs):
        return (None,) * len(inputs)
    if not all(o.requires_grad for o in outs):  # drop the constant outputs (and their cotangents)
        keep = [i for i, o in enumerate(outs) if o.requires_grad]
        cot = None if grad_out is None else [grad_out] if isinstance(grad_out, Tensor) else list(grad_out)
        out = [outs[i] for i in keep]
        grad_out = None if cot is None else [cot[i] for i in keep]
    gs = torch.autograd.grad(
        out, list(inputs), grad_out, allow_unused=True, create_graph=create_graph, retain_graph=retain_graph
    )
    return tuple(gs)


def materialize(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensors:
    """Replace ``None`` gradients by zeros shaped like ``like``, and sparse ones (an
    ``nn.Embedding(sparse=True)``'s) by their dense values."""
    return tuple(
        torch.zeros_like(x) if g is None else g.to_dense() if g.is_sparse else g
        for g, x in zip(grads, like, strict=True)
    )


def grads_or_zeros(
    out: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_out: Tensor | Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensors:
    """``torch.autograd.grad`` with unused inputs given zero gradients instead of ``None``."""
    gs = grads_or_none(out, inputs, grad_out, create_graph=create_graph, retain_graph=retain_graph)
    return materialize(gs, inputs)


# ----------------------------------------------------------------------------- batches


def iter_tensors(batch: Any) -> Iterator[Tensor]:
    """Every tensor inside a batch made of tensors, tuples, lists, dicts and dataclasses."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from iter_tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from iter_tensors(v)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from iter_tensors(getattr(batch, f.name))


def batch_versions(batch: Any) -> list[tuple[int, int]]:
    """``(id, version counter)`` of every tensor of ``batch``, to tell whether a loss changed it in
    place. An inference tensor (made under ``torch.inference_mode()``: features or targets computed
    without autograd) has no version counter, and cannot be changed in place outside that mode: it
    counts as 0 (reading its counter crashed the step with "Inference tensors do not track version
    counter", where the loss itself ran, e.g. on ``x.clone()`` as PyTorch advises)."""
    return [(id(t), 0 if t.is_inference() else t._version) for t in iter_tensors(batch)]


def _iterator_in(batch: Any) -> Any:
    """The first iterator (an object with ``__next__``: a generator, ``zip``, ``map``, ``iter(...)``,
    a file) that ``batch`` is or holds in its tuples, lists, dicts and dataclasses, else ``None``."""
    if isinstance(batch, Tensor):
        return None
    if isinstance(batch, Iterator):
        return batch
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        values = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    else:
        return None
    for v in values:
        found = _iterator_in(v)
        if found is not None:
            return found
    return None


def empty_batch_note(batch: Any, what: str) -> str:
    """For the message of a refused (non-finite) step, on that path only: a sentence naming
    ``batch`` when every tensor of it with a batch dimension has 0 rows (the last slice of a loop
    that runs past the end of the data), whose mean loss is NaN; else ``""``."""
    rows = [t.shape[0] for t in iter_tensors(batch) if t.dim() > 0]
    if not rows or any(rows):
        return ""
    return (
        f"; {what} holds no examples (its tensors have 0 rows), and a mean over no examples is NaN: "
        "skip empty batches"
    )


def batch_dtype_problem(batch: Any, what: str, dtype: torch.dtype) -> str:
    """'' when every floating-point tensor of ``batch`` has the model's dtype (or, for a complex
    model, its real dtype), else the sentence :func:`check_batch` raises. Not an error by itself:
    a loss may cast the batch (``model(x.float())`` on float64 data from NumPy), as plain PyTorch
    allows; :func:`naming_batch_dtypes` names it if the loss then fails on a dtype mismatch."""
    real = dtype.to_real() if dtype.is_complex else None
    for t in iter_tensors(batch):
        if t.is_floating_point() and t.dtype != dtype and t.dtype != real:
            return (
                f"{what} holds a {t.dtype} tensor, but the model's parameters are {dtype}; "
                f"convert the batch with .to({dtype}) (or cast it inside the loss)"
            )
    return ""


@contextlib.contextmanager
def naming_batch_dtypes(problems: Sequence[str]) -> Iterator[None]:
    """Within the block, a ``RuntimeError`` about dtypes (``mat1 and mat2 must have the same
    dtype``, ``expected scalar type Float but found Double``) raised while a batch of another
    dtype than the model's is in use (``problems``: from :func:`batch_dtype_problem`) becomes a
    ``ValueError`` naming the batch and the conversion."""
    found = [p for p in problems if p]
    if not found:
        yield
        return
    try:
        yield
    except RuntimeError as error:
        text = str(error).lower()
        if "long" in text and ("target" in text or "scalar type" in text):
            # (cross_entropy / nll_loss given float class labels: converting them to the model's
            # float dtype, as the sentence above advises, fails the same way)
            raise ValueError(
                f"the loss expected integer class labels (torch.long) and got floating-point ones: "
                f"convert the labels with .long(), not to the model's dtype (the loss failed: {error})"
            ) from error
        if "dtype" in text or "scalar type" in text:
            raise ValueError(f"{'; '.join(found)} (the loss failed: {error})") from error
        raise


def check_batch(
    batch: Any, what: str, device: torch.device, dtype: torch.dtype, *, dtypes: bool = True
) -> None:
    """Raise a clear error for a missing batch or a floating-point tensor on the wrong device or of
    the wrong dtype (``dtypes=False``: not the dtype, for batches a user's loss may cast; see
    :func:`batch_dtype_problem`). Integer tensors are not checked: PyTorch wants some of them on
    the CPU whatever the model's device (``PackedSequence.batch_sizes``, the lengths given to
    ``pack_padded_sequence``), and it names a misplaced label tensor itself. A complex model also
    takes real tensors of its precision (complex64: float32), as complex layers usually do. A
    function (a ``step(closure)`` habit from ``torch.optim``) is refused as a batch, and so is an
    iterator (a generator, ``zip``, ``iter(list)``) as a batch or inside one: read once, it would
    be empty the next time a method runs a loss on the batch."""
    if batch is None:
        raise ValueError(
            f"{what} is required but was not given (None); a loss that reads no data (dataset "
            "distillation, where the hyperparameters are the data) takes an empty batch: pass ()"
        )
    if inspect.isfunction(batch) or inspect.ismethod(batch) or isinstance(batch, functools.partial):
        # (torch.optim's ``optimizer.step(closure)`` idiom: the loss then failed to unpack a function)
        raise TypeError(
            f"{what} is a function ({getattr(batch, '__name__', type(batch).__name__)}); hypergrad takes "
            "the batch itself, not a closure that computes the loss (torch.optim's step(closure)): "
            "pass the batch, and the method calls train_loss(model, hparams, batch) / "
            "val_loss(model, hparams, batch) with it"
        )
    found = _iterator_in(batch)
    if found is not None:
        # (a generator, zip(), map() or iter(list) of micro-batches: the first loss that reads it
        # uses it up, and hypergrad runs the losses on a batch more than once: Unrolled replays a
        # copy of each step's batch in every hyperstep, twice with checkpoint=True, so the steps
        # after the first replay trained on nothing, a hypergradient 26% off without a word;
        # Delta-STN's response pass read the base pass's exhausted iterator)
        raise TypeError(
            f"{what} is or holds an iterator ({type(found).__name__}), which a loss can read only "
            "once; hypergrad may run a loss on the same batch more than once (Unrolled records a copy "
            "of each step's batch and replays it, Delta-STN runs train_loss twice per step), and an "
            "exhausted iterator would silently give a loss of no data. Pass the micro-batches as a "
            "list (list(...)) or a tuple instead. Nothing was changed"
        )
    real = dtype.to_real() if dtype.is_complex else None  # a complex model may take real inputs
    for t in iter_tensors(batch):
        if not t.is_floating_point():
            continue
        if t.dtype == real and t.device == device:
            continue
        if t.device != device:
            raise ValueError(
                f"{what} holds a tensor on device {t.device}, but the model's parameters are on "
                f"{device}; move the batch with .to({str(device)!r})"
            )
        if dtypes and t.dtype != dtype:
            raise ValueError(batch_dtype_problem(t, what, dtype))


def map_containers(batch: Any, leaf: Callable[[Any], Any]) -> Any:
    """``batch`` with its tuples (named ones too), lists, dicts and dataclasses rebuilt around
    ``leaf`` of everything else they hold."""
    if isinstance(batch, Mapping):
        out = copy.copy(batch)
        for k, v in batch.items():
            out[k] = map_containers(v, leaf)  # type: ignore[index]
        return out
    if isinstance(batch, list):
        return [map_containers(v, leaf) for v in batch]
    if isinstance(batch, tuple):
        items = [map_containers(v, leaf) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        new = copy.copy(batch)
        for f in dataclasses.fields(batch):
            object.__setattr__(new, f.name, map_containers(getattr(batch, f.name), leaf))
        return new
    return leaf(batch)


def _cloned_leaf(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone().requires_grad_(v.requires_grad)
    return copy.deepcopy(v)


def clone_batch(batch: Any) -> Any:
    """A copy of ``batch`` that later in-place changes to the original cannot reach: tensors are
    detached and cloned; tuples (named ones too), lists, dicts and dataclasses are rebuilt around
    the copies; anything else is deep-copied. A tensor that requires grad gives a copy that does
    too (a leaf: the graph it came with is not kept), so a loss that differentiates w.r.t. its
    input (``torch.autograd.grad(out, x)``: an input-gradient penalty) runs on the copy as well.
    A tensor (or other value) the batch holds more than once is copied once, so the copy holds one
    tensor there too: an autoencoder's ``(x, x)`` whose model changes its input in place (an
    in-place clamp as its first layer) changed the target with it, and two copies replayed the step
    with the target unchanged (a hypergradient 43% off)."""
    tensors: dict[int, Tensor] = {}
    memo: dict[int, Any] = {}  # (copy.deepcopy's, for the other values)

    def leaf(v: Any) -> Any:
        if isinstance(v, Tensor):
            out = tensors.get(id(v))
            if out is None:
                out = tensors[id(v)] = _cloned_leaf(v)
            return out
        return copy.deepcopy(v, memo)

    return map_containers(batch, leaf)


# ----------------------------------------------------------------------------- DistributedDataParallel


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of a process group; its backward sums the incoming gradients the same way
    (the adjoint of "every rank gets the sum" is "every rank gets the sum of the cotangents")."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        g = g.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


class Ranks:
    """The data-parallel ranks a model is replicated on (a ``DistributedDataParallel`` model's
    process group), and averages over them. With one rank every operation is the identity.

    Args:
        model: the user's model, maybe wrapped in ``torch.nn.parallel.DistributedDataParallel``.
    """

    def __init__(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # hypergradients run on the bare module (through DDP and torch.compile wrappers)
        self.module: nn.Module = unwrap_model(model)
        ddp = [w for w in wrappers(model) if isinstance(w, DistributedDataParallel)]
        self.wrapped = bool(ddp)
        self.group: Any = ddp[0].process_group if ddp else None
        self.size = torch.distributed.get_world_size(self.group) if ddp else 1

    def mean_(self, ts: Sequence[Tensor]) -> None:
        """Average ``ts`` over the ranks in place: one collective for all of them."""
        if self.size == 1 or not ts:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        torch.distributed.all_reduce(flat, group=self.group)
        flat.div_(self.size)
        offset = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def mean(self, ts: Sequence[Tensor]) -> Tensors:
        """The average of ``ts`` over the ranks, differentiable (one collective)."""
        if self.size == 1 or not ts:
            return tuple(ts)
        flat = torch.cat([t.reshape(-1) for t in ts])
        flat = _AllReduceSum.apply(flat, self.group) / self.size
        out, offset = [], 0
        for t in ts:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return tuple(out)


# ---------------------------------------------------------------- plain-attribute state


def _attribute_value(v: Any) -> bool:
    """Whether a module's plain attribute is state :func:`_plain_attributes` records: ``None``, a
    tensor, or a tuple or list of tensors, none of them an ``nn.Parameter`` (an LSTM's list of its
    own weights is not state)."""
    if v is None:
        return True
    if isinstance(v, Tensor):
        return not isinstance(v, nn.Parameter)
    if not isinstance(v, (tuple, list)) or not v or not isinstance(v[0], Tensor):
        return False  # (a setting; a tuple of ints such as a kernel size, at its first item)
    return all(isinstance(t, Tensor) and not isinstance(t, nn.Parameter) for t in v)


def _state_attributes(
    m: nn.Module, settings: list[tuple[int, str, Any]] | None = None, index: int = 0
) -> dict[str, Any]:
    """``m``'s public plain attributes that :func:`_attribute_value` calls state. (Settings are
    skipped by their type first: the modules of a ResNet-18 hold some 1,400 plain attributes,
    nearly all of them private or settings, and this runs for every module at every step.) With
    ``settings``, the public settings but ``training`` (numbers, bools, strings: a dropout rate a
    schedule changes between steps, a call counter) are appended to it as ``(index, name, value)``
    in the same pass."""
    out = {}
    for k, v in vars(m).items():
        if k[0] != "_":
            if type(v) in _SETTING_TYPES:
                if settings is not None and k != "training":
                    settings.append((index, k, v))
            elif _attribute_value(v):
                out[k] = v
    return out


_SETTING_TYPES = frozenset({int, float, bool, str})


def _copy_attribute(v: Any) -> Any:
    """A detached copy of an attribute value (``None``, a tensor, a tuple or list of tensors)."""
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(t.detach().clone() for t in v)
    return v


def _plain_attributes(
    modules: Sequence[nn.Module],
    seen: dict[tuple[int, str], tuple[Any, Any]] | None = None,
    settings: list[tuple[int, str, Any]] | None = None,
) -> tuple[tuple[int, str, Any], ...]:
    """Copies of the modules' plain (unregistered) tensor attributes, ``(module index, name,
    value)``: state kept on a module between forward passes, such as a hidden state that
    ``forward`` stores (``self.hidden = h.detach()``) and the next batch starts from. Public
    names only, and ``None`` values too (a hidden state not yet set). ``seen`` maps each
    attribute to ``(its tensors and their versions, the copy)`` taken last time: an attribute
    that still holds those tensors, unwritten, shares that copy (a constant kept as a plain
    attribute, such as a mask, is copied once, not once per step). ``settings``: see
    :func:`_state_attributes`."""
    out = []
    for i, m in enumerate(modules):
        for k, v in _state_attributes(m, settings, i).items():
            items = v if isinstance(v, (tuple, list)) else (v,)
            key = tuple((id(t), t._version) for t in items if isinstance(t, Tensor))
            last = None if seen is None else seen.get((i, k))
            if (
                last is not None
                and last[0][0] == key
                and all(a is b for a, b in zip(last[0][1], items, strict=True))
            ):
                copy = last[1]
            else:
                if type(v) is list and last is not None and type(last[1]) is list:
                    # a list that grew (features a hook appends at every step): the items it
                    # still shares, unwritten, with the last copy's share their copies too
                    # (each step cloned the whole list again: quadratic time in the steps)
                    (old_keys, old_items), n = last[0], 0
                    while (
                        n < min(len(old_items), len(items))
                        and old_keys[n] == key[n]
                        and old_items[n] is items[n]
                    ):
                        n += 1
                    copy = last[1][:n] + [t.detach().clone() for t in items[n:]]
                else:
                    copy = _copy_attribute(v)
                if seen is not None:
                    seen[i, k] = ((key, tuple(items)), copy)
            out.append((i, k, copy))
    return tuple(out)


_MISSING = object()


@contextlib.contextmanager
def _settings_at(modules: Sequence[nn.Module], values: Sequence[tuple[int, str, Any]]) -> Iterator[None]:
    """Within the block the modules' plain settings named in ``values`` (a recorded step's, see
    :func:`_state_attributes`) hold those values, so that its replay runs with the dropout rate,
    temperature or counter the real step ran with; afterwards what they held before the block."""
    before = [(modules[i], k, vars(modules[i]).get(k, _MISSING), v) for i, k, v in values if i < len(modules)]
    try:
        for m, k, old, v in before:
            if old is not v:
                setattr(m, k, v)
        yield
    finally:
        for m, k, old, _ in before:
            now = vars(m).get(k, _MISSING)
            if now is not old:
                if old is _MISSING:
                    delattr(m, k)
                else:
                    setattr(m, k, old)


@contextlib.contextmanager
def _attributes_kept(
    modules: Sequence[nn.Module], values: Sequence[tuple[int, str, Any]] = ()
) -> Iterator[None]:
    """Within the block the modules' plain tensor attributes are copies of ``values`` (a recorded
    step's, so that its replay starts from the state the real step started from); afterwards
    they are the objects they were before the block, and attributes the block added are gone:
    a replayed step or the validation loss that stores a hidden state on the model leaves the
    real one alone."""
    # (with the whole __dict__, shallowly, at C speed: an attribute that was no state when the
    # block began, such as an empty list a forward hook fills with features in eval mode, is
    # state once filled, and was deleted as if the block had added it: the user's next forward
    # pass crashed with "object has no attribute". And the lengths of the lists: what the block
    # appended to one in place, such as that hook's features, is taken off again (a hyperstep of
    # MarginalLikelihood left its vmapped passes' tensors there, which crashed any later use)
    before = [(vars(m).copy(), _state_attributes(m)) for m in modules]
    lengths = [[(v, len(v)) for k, v in was.items() if type(v) is list and k[0] != "_"] for was, _ in before]
    # (through setattr: a recurrent layer's weight kept as a plain attribute, as AWD-LSTM's
    # weight drop sets it, also goes into the layer's own list of its weights)
    try:
        for i, k, v in values:
            if i < len(modules):
                setattr(modules[i], k, _copy_attribute(v))
        yield
    finally:
        for m, (was, kept), lists in zip(modules, before, lengths, strict=True):
            d = vars(m)
            for k in [k for k in _state_attributes(m) if k not in kept]:
                if k in was:
                    setattr(m, k, was[k])  # (no state before: an empty list, say)
                else:
                    delattr(m, k)  # added by the block
            for k, v in kept.items():
                if d.get(k, m) is not v:
                    setattr(m, k, v)
            for v, n in lists:
                del v[n:]
