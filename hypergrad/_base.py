"""The ``HyperOptimizer`` contract: schedule, ``.grad`` filling, guards and state, written once.

A method subclasses :class:`HyperOptimizer` and supplies ``_hypergradient`` (and, if it keeps any,
``_method_state`` / ``_load_method_state`` and ``_record_step``). Everything a user touches lives
here.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import FunctionalPair, all_finite, check_batch, clone_all, grads_or_zeros, norm
from ._types import Batch, LossFn, Tensors
from .hparams import OptimizerSetting, from_raw


class NonFiniteError(FloatingPointError):
    """A loss or hypergradient was NaN or infinite; the step was not taken and nothing changed."""


class NonFiniteWarning(RuntimeWarning):
    """Issued instead of :class:`NonFiniteError` when ``on_nonfinite="skip"``."""


class OnNonFinite(str, enum.Enum):
    """What to do when a loss, gradient or hypergradient is not finite."""

    RAISE = "raise"  #: raise NonFiniteError (state untouched)
    SKIP = "skip"  #: warn with NonFiniteWarning, skip the step (state untouched)


@dataclasses.dataclass(frozen=True)
class HyperStepInfo:
    """What one ``hyper_step`` did, for logging (``dataclasses.asdict(info)`` goes to wandb).

    Attributes:
        outer_loss: the validation (outer) loss at the current weights.
        hypergrad_norm: Euclidean norm of the whole hypergradient.
        solver_iterations: HVPs spent by the linear solver (``None`` for methods without one).
        solver_residual: the solver's relative residual (see :class:`SolveResult`), or ``None``.
        unrolled_steps: inner steps differentiated through (``None`` for implicit methods).
        seconds: wall-clock time of the hyperstep.
        skipped: ``True`` when the step was refused as non-finite (``on_nonfinite="skip"``).
        hyper_steps: hypersteps taken so far (including this one unless skipped).
    """

    outer_loss: float
    hypergrad_norm: float
    solver_iterations: int | None
    solver_residual: float | None
    unrolled_steps: int | None
    seconds: float
    skipped: bool
    hyper_steps: int


@dataclasses.dataclass
class _Hypergradient:
    """What a method hands back to the base class."""

    grads: Tensors  # one per hyperparameter tensor, same shapes
    outer_loss: Tensor  # 0-dim, detached
    solver_iterations: int | None = None
    solver_residual: Tensor | None = None
    unrolled_steps: int | None = None
    inner_loss: Tensor | None = None  # the training loss the method used, checked for finiteness


def _params_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class HyperOptimizer(abc.ABC):
    """Tunes hyperparameters by gradient descent while an ordinary optimiser trains the model.

    Args:
        model: the model; its parameters in ``inner_optimizer`` are the weights :math:`w`.
        hparams: an ``nn.Module`` whose parameters are the (raw) hyperparameters :math:`\\lambda`.
        train_loss: ``train_loss(model, hparams, batch) -> scalar``, the inner objective
            :math:`L_T(w, \\lambda)`.
        val_loss: ``val_loss(model, hparams, batch) -> scalar``, the outer objective
            :math:`L_V(w, \\lambda)` (it may depend on ``hparams`` directly).
        inner_optimizer: a ``torch.optim`` optimiser over the model's weights.
        outer_optimizer: a ``torch.optim`` optimiser over ``hparams.parameters()``.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``; either way a non-finite loss or
            (hyper)gradient leaves weights, buffers, hyperparameters and optimiser states untouched.

    The losses run in whatever mode (``model.train()`` / ``model.eval()``) the user set; BatchNorm
    running statistics are updated by :meth:`step` only, once per inner step.
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
        if not callable(train_loss) or not callable(val_loss):
            raise TypeError("train_loss and val_loss must be callables loss(model, hparams, batch)")
        self.model = model
        self.hparams = hparams
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.on_nonfinite = OnNonFinite(on_nonfinite)
        self._validate_tensors()
        self.pair = FunctionalPair(model, hparams, _params_of(inner_optimizer))
        self.settings: list[tuple[int, OptimizerSetting]] = self._find_settings()
        self.inner_steps = 0
        self.hyper_steps = 0

    # ------------------------------------------------------------------ validation

    def _validate_tensors(self) -> None:
        model_params = dict(self.model.named_parameters())
        hp_params = dict(self.hparams.named_parameters())
        if not hp_params:
            raise ValueError("hparams has no parameters: there is nothing to tune")
        if not model_params:
            raise ValueError("model has no parameters to train")
        ref = next(iter(model_params.values()))
        self.device, self.dtype = ref.device, ref.dtype
        for n, p in model_params.items():
            if p.device != ref.device:
                raise ValueError(f"model parameter {n!r} is on {p.device}, others on {ref.device}")
        hp_ids = {id(p): n for n, p in hp_params.items()}
        model_ids = {id(p): n for n, p in model_params.items()}
        for n, p in hp_params.items():
            if not p.is_floating_point():
                raise TypeError(f"hyperparameter {n!r} has dtype {p.dtype}; it must be floating point")
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"hyperparameter {n!r} must be a leaf tensor with requires_grad=True")
            if p.device != ref.device:
                raise ValueError(
                    f"hyperparameter {n!r} is on {p.device} but the model is on {ref.device}; "
                    f"call hparams.to({str(ref.device)!r})"
                )
            if id(p) in model_ids:
                raise ValueError(f"hyperparameter {n!r} is also a parameter of the model")
        inner = _params_of(self.inner_optimizer)
        if not inner:
            raise ValueError("inner_optimizer has no parameters")
        for t in inner:
            if id(t) in hp_ids:
                raise ValueError(
                    f"inner_optimizer holds hyperparameter {hp_ids[id(t)]!r}; "
                    "it should hold the model's weights only"
                )
            if id(t) not in model_ids:
                raise ValueError("inner_optimizer holds a tensor that is not a parameter of model")
            if not t.requires_grad:
                name = model_ids[id(t)]
                raise ValueError(f"model parameter {name!r} is in inner_optimizer but does not require grad")
            if t.dtype != ref.dtype:
                raise ValueError(f"model parameter {model_ids[id(t)]!r} is {t.dtype}, others {ref.dtype}")
        outer_ids = {id(t) for t in _params_of(self.outer_optimizer)}
        for t in _params_of(self.outer_optimizer):
            if id(t) in model_ids:
                raise ValueError(
                    f"outer_optimizer holds model parameter {model_ids[id(t)]!r}; "
                    "it should hold hparams.parameters() only"
                )
        missing = [n for n, p in hp_params.items() if id(p) not in outer_ids]
        if missing:
            raise ValueError(f"hyperparameter(s) {missing} are not in outer_optimizer, so would never move")

    def _find_settings(self) -> list[tuple[int, OptimizerSetting]]:
        out = []
        names = self.pair.hparam_names
        for prefix, m in self.hparams.named_modules():
            if isinstance(m, OptimizerSetting):
                if m.optimizer[0] is not self.inner_optimizer:
                    raise ValueError(f"hparams.{prefix} tunes a different optimiser than inner_optimizer")
                raw_name = f"{prefix}.raw" if prefix else "raw"
                out.append((names.index(raw_name), m))
        return out

    # ------------------------------------------------------------------ the inner step

    def step(self, batch: Batch) -> Tensor:
        """One step of ``inner_optimizer`` on ``train_loss`` at ``batch``; returns the value of
        ``train_loss`` (detached; it includes any penalty the loss adds).

        Equivalent to ``zero_grad(); train_loss(...).backward(); inner_optimizer.step()``, except
        that a non-finite loss or gradient changes nothing (see ``on_nonfinite``). Buffers
        (BatchNorm running statistics) are updated once, as by an ordinary forward pass. The guard
        costs one host synchronisation per step.
        """
        check_batch(batch, "batch", self.device, self.dtype)
        for _, setting in self.settings:
            setting.write()
        pair = self.pair
        buffers = clone_all(pair.buffers())
        loss = pair.loss(self.train_loss, batch, buffers=buffers)
        grads = grads_or_zeros(loss, pair.weights)
        if not all_finite(loss, grads):
            self._nonfinite(
                f"inner step {self.inner_steps}: the training loss or its gradient is "
                f"not finite (loss = {float(loss.detach())})"
            )
            return loss.detach()
        self._record_step(batch)
        for w, g in zip(pair.weights, grads, strict=True):
            w.grad = g
        self.inner_optimizer.step()
        with torch.no_grad():
            for real, new in zip(pair.buffers(), buffers, strict=True):
                real.copy_(new)
        self.inner_steps += 1
        return loss.detach()

    def _record_step(self, batch: Batch) -> None:  # noqa: B027 - optional hook
        """Called before each accepted inner update (weights and optimiser state not yet moved)."""

    # ------------------------------------------------------------------ the hyper step

    def hyper_step(self, train_batch: Batch = None, val_batch: Batch = None) -> HyperStepInfo:
        """Compute the hypergradient, write it into each hyperparameter's ``.grad`` (replacing what
        was there) and call ``outer_optimizer.step()``.

        Args:
            train_batch: a training batch (which methods need it: see each method).
            val_batch: a validation batch for ``val_loss``.

        Returns:
            A :class:`HyperStepInfo`. Weights, buffers and the inner optimiser are not changed.
        """
        t0 = time.perf_counter()
        self._check_hyper_batches(train_batch, val_batch)
        res = self._hypergradient(train_batch, val_batch)
        grad_norm = norm(res.grads)  # checked for finiteness and reported: computed once
        checks: list[Tensor | Sequence[Tensor]] = [res.outer_loss, grad_norm]
        if res.inner_loss is not None:
            checks.append(res.inner_loss)
        if not all_finite(*checks):
            inner = "" if res.inner_loss is None else f", training loss = {float(res.inner_loss)}"
            self._nonfinite(
                f"hyper step {self.hyper_steps}: a loss or the hypergradient is not "
                f"finite (outer loss = {float(res.outer_loss)}{inner})"
            )
            return self._info(res, grad_norm, t0, skipped=True)
        for p, g in zip(self.pair.hparam_tensors, res.grads, strict=True):
            p.grad = g.detach()
        self.outer_optimizer.step()
        self.hyper_steps += 1
        return self._info(res, grad_norm, t0, skipped=False)

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        name = type(self).__name__
        if val_batch is None:
            raise ValueError(f"{name}.hyper_step needs val_batch=... (a validation batch for val_loss)")
        check_batch(val_batch, "val_batch", self.device, self.dtype)
        if train_batch is None:
            raise ValueError(f"{name}.hyper_step needs train_batch=... (a training batch)")
        check_batch(train_batch, "train_batch", self.device, self.dtype)

    @abc.abstractmethod
    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        """The hypergradient at the current weights. Must not change any state."""

    def _info(self, res: _Hypergradient, grad_norm: Tensor, t0: float, *, skipped: bool) -> HyperStepInfo:
        return HyperStepInfo(
            outer_loss=float(res.outer_loss),
            hypergrad_norm=float(grad_norm),
            solver_iterations=res.solver_iterations,
            solver_residual=None if res.solver_residual is None else float(res.solver_residual),
            unrolled_steps=res.unrolled_steps,
            seconds=time.perf_counter() - t0,
            skipped=skipped,
            hyper_steps=self.hyper_steps,
        )

    def _nonfinite(self, msg: str) -> None:
        msg += "; weights, buffers, hyperparameters and optimiser states were left untouched"
        if self.on_nonfinite is OnNonFinite.RAISE:
            raise NonFiniteError(msg)
        warnings.warn(msg + " (step skipped)", NonFiniteWarning, stacklevel=3)

    # ------------------------------------------------------------------ helpers for methods

    def _hparam_values(self, hp: Sequence[Tensor]) -> dict[int, Tensor]:
        """Values of tuned optimiser settings computed from (possibly substituted) raw tensors."""
        return {i: from_raw(hp[i], s.constraint) for i, s in self.settings}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """A complete checkpoint: model, hyperparameters, both optimisers, method state, counters."""
        return {
            "model": self.model.state_dict(),
            "hparams": self.hparams.state_dict(),
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "method": self._method_state(),
            "counters": {"inner_steps": self.inner_steps, "hyper_steps": self.hyper_steps},
            "method_name": type(self).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, into objects built like the originals."""
        if state.get("method_name") != type(self).__name__:
            raise ValueError(
                f"this state_dict was saved by {state.get('method_name')!r}, not {type(self).__name__!r}"
            )
        self.model.load_state_dict(state["model"])
        self.hparams.load_state_dict(state["hparams"])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._load_method_state(state["method"])
        self.inner_steps = int(state["counters"]["inner_steps"])
        self.hyper_steps = int(state["counters"]["hyper_steps"])

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the weights and the hyperparameters."""
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)
        self.outer_optimizer.zero_grad(set_to_none=set_to_none)
