r"""Differentiable, out-of-place versions of ``torch.optim`` updates.

Each update takes the weights, their gradients, the optimiser state of each weight and the param
group's settings (floats, or tensors when the settings are hyperparameters) and returns new weights
and new state, without touching its inputs, so autograd (reverse or forward mode) can see through
it. The arithmetic follows ``torch.optim``'s single-tensor code step for step, so that replaying
a step reproduces what the real optimiser did, bit for bit where nothing is tuned (settings that
are hyperparameters need tensor arithmetic, which rounds otherwise). Complex weights are updated
as torch.optim updates them (Adam, RMSprop, Adagrad: on their real views).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._types import Tensors

State = dict[str, Any]
Update = Callable[
    [Sequence[Tensor], Sequence[Tensor], Sequence[State], Mapping[str, Any]], tuple[Tensors, list[State]]
]


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of ``inf`` (so no ``0 * inf``
    NaNs when differentiating Adam through a zero second moment). Same values as ``torch.sqrt``."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _sgd(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov, maximize = group["weight_decay"], group["nesterov"], group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        d = -g if maximize else g
        if not _is_zero(wd):
            d = d + wd * p if _traced(wd) else d.add(p, alpha=wd)
        s = dict(st)
        if not _is_zero(momentum):
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = d
            elif _traced(momentum) or _traced(dampening):
                buf = buf * momentum + (1 - dampening) * d
            else:  # torch.optim's own ops: buf.mul_(momentum).add_(d, alpha=1 - dampening)
                buf = buf.mul(momentum).add(d, alpha=1 - dampening)
            s["momentum_buffer"] = buf
            if nesterov:
                d = d + momentum * buf if _traced(momentum) else d.add(buf, alpha=momentum)
            else:
                d = buf
        new_p.append(p - lr * d if _traced(lr) else p.add(d, alpha=-lr))
        new_s.append(s)
    return tuple(new_p), new_s


def _adam(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    wd, amsgrad, maximize = group["weight_decay"], group["amsgrad"], group.get("maximize", False)
    decoupled = group.get("decoupled_weight_decay", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        step_t = st.get("step")
        step = (0.0 if step_t is None else float(step_t)) + 1.0
        if not _is_zero(wd):
            if decoupled:
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p if _traced(wd) else g.add(p, alpha=wd)
        m = st.get("exp_avg")
        v = st.get("exp_avg_sq")
        m = torch.zeros_like(p) if m is None else m
        v = torch.zeros_like(p) if v is None else v
        m = m.lerp(g, 1 - beta1)  # torch.optim's own ops, out of place (same rounding)
        if _traced(beta2):
            v = v * beta2 + (1 - beta2) * g * g
        else:
            v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
        bc1 = 1 - beta1**step
        bc2_sqrt = (1 - beta2**step) ** 0.5
        s: State = {"step": torch.tensor(step, dtype=_step_dtype(step_t)), "exp_avg": m, "exp_avg_sq": v}
        if amsgrad:
            vmax = st.get("max_exp_avg_sq")
            vmax = v if vmax is None else torch.maximum(vmax, v)
            s["max_exp_avg_sq"] = vmax
            denom = safe_sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = safe_sqrt(v) / bc2_sqrt + eps
        step_size = lr / bc1
        if _traced(step_size):
            new_p.append(p - step_size * m / denom)
        else:  # torch.optim's param.addcdiv_(exp_avg, denom, value=-step_size), out of place
            new_p.append(p.addcdiv(m, denom, value=-step_size))
        new_s.append(s)
    return tuple(new_p), new_s


def _signed_decayed(p: Tensor, g: Tensor, st: State, maximize: bool, wd: Any) -> tuple[Tensor, float]:
    """The common start of RMSprop's and Adagrad's step, as torch.optim writes it: the gradient
    (negated with ``maximize``, plus L2 ``wd * p``) and the step number after this step."""
    g = -g if maximize else g
    step_t = st.get("step")
    step = (0.0 if step_t is None else float(step_t)) + 1.0
    if not _is_zero(wd):
        g = g + wd * p if _traced(wd) else g.add(p, alpha=wd)
    return g, step


def _rmsprop(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
    wd, momentum, centered = group["weight_decay"], group["momentum"], group["centered"]
    maximize = group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd)
        sq = st.get("square_avg")
        sq = torch.zeros_like(p) if sq is None else sq
        if _traced(alpha):  # (value= would silently take a forward-mode dual's primal)
            sq = sq * alpha + (1 - alpha) * g * g
        else:
            sq = sq.mul(alpha).addcmul(g, g, value=1 - alpha)  # torch.optim's ops, out of place
        s: State = {"step": torch.tensor(step, dtype=_step_dtype(st.get("step"))), "square_avg": sq}
        if centered:
            ga = st.get("grad_avg")
            ga = torch.zeros_like(p) if ga is None else ga
            if _traced(alpha):
                ga = ga + (1 - alpha) * (g - ga)  # lerp, written out (so is its derivative in alpha)
            else:
                ga = ga.lerp(g, 1 - alpha)  # torch.optim's op (the written-out lerp rounds otherwise)
            s["grad_avg"] = ga
            avg = safe_sqrt(sq.addcmul(ga, ga, value=-1)) + eps
        else:
            avg = safe_sqrt(sq) + eps
        if not _is_zero(momentum):
            buf = st.get("momentum_buffer")
            buf = torch.zeros_like(p) if buf is None else buf
            if _traced(momentum):
                buf = buf * momentum + g / avg
            else:
                buf = buf.mul(momentum).addcdiv(g, avg)
            s["momentum_buffer"] = buf
            new_p.append(p - lr * buf if _traced(lr) else p.add(buf, alpha=-lr))
        else:
            new_p.append(p - lr * (g / avg) if _traced(lr) else p.addcdiv(g, avg, value=-lr))
        new_s.append(s)
    return tuple(new_p), new_s


def _adagrad(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, wd, lr_decay, eps = group["lr"], group["weight_decay"], group["lr_decay"], group["eps"]
    maximize = group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd)
        clr = lr / (1 + (step - 1) * lr_decay)
        acc = st.get("sum")
        if acc is None:  # torch.optim fills it at construction; a state loaded without it
            acc = torch.full_like(p, group.get("initial_accumulator_value", 0.0))
        acc = acc.addcmul(g, g, value=1)
        std = safe_sqrt(acc) + eps
        new_p.append(p - clr * (g / std) if _traced(clr) else p.addcdiv(g, std, value=-clr))
        new_s.append({"step": torch.tensor(step, dtype=_step_dtype(st.get("step"))), "sum": acc})
    return tuple(new_p), new_s


def _traced(x: Any) -> bool:
    """Whether ``x`` is a tensor autograd follows (a tuned setting: it requires grad, or carries a
    forward-mode tangent). Other tensors (a learning rate a scheduler keeps as a tensor, recorded
    by value) take torch.optim's own ``alpha=`` / ``value=`` operations, as its steps do, so that
    the replay rounds as they did."""
    return isinstance(x, Tensor) and (x.requires_grad or fwAD.unpack_dual(x).tangent is not None)


def _step_dtype(step_t: Any) -> torch.dtype:
    return step_t.dtype if isinstance(step_t, Tensor) else torch.float32


def _is_zero(x: Any) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _on_real_views(
    update: Update,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[State],
    group: Mapping[str, Any],
) -> tuple[Tensors, list[State]]:
    """``update`` run on complex weights as torch.optim's Adam, RMSprop and Adagrad run: on
    ``torch.view_as_real`` of the weight, its gradient and its state, so that the moments are
    those of the real and imaginary parts, each on its own (not of the complex square ``g * g``).
    The new weight and state are complex again, as torch.optim keeps them. (Bound with
    ``functools.partial``, so that an :class:`~hypergrad.Unrolled` holding it still pickles.)"""
    if not any(p.is_complex() for p in params):
        return update(params, grads, states, group)
    new_p: list[Tensor] = []
    new_s: list[State] = []
    for p, g, st in zip(params, grads, states, strict=True):
        if not p.is_complex():
            (q,), (s,) = update([p], [g], [st], group)
        else:
            real = {k: _real_view(v) if k != "step" else v for k, v in st.items()}
            (q,), (s,) = update([torch.view_as_real(p)], [torch.view_as_real(g)], [real], group)
            q = torch.view_as_complex(q.contiguous())
            s = {k: _complex_view(v) if k != "step" else v for k, v in s.items()}
        new_p.append(q)
        new_s.append(s)
    return tuple(new_p), new_s


def _real_view(x: Any) -> Any:
    return torch.view_as_real(x) if isinstance(x, Tensor) and x.is_complex() else x


def _complex_view(x: Any) -> Any:
    return torch.view_as_complex(x.contiguous()) if isinstance(x, Tensor) and x.is_floating_point() else x


_UPDATES: dict[type, Update] = {
    torch.optim.SGD: _sgd,  # (torch.optim's SGD runs on complex weights as they are: so does this)
    torch.optim.Adam: functools.partial(_on_real_views, _adam),
    torch.optim.AdamW: functools.partial(_on_real_views, _adam),
    torch.optim.RMSprop: functools.partial(_on_real_views, _rmsprop),
    torch.optim.Adagrad: functools.partial(_on_real_views, _adagrad),
}
#: flags whose steps the replay does not reproduce, and why
_UNSUPPORTED_FLAGS = {
    "fused": "its fused kernel rounds differently from the replayed steps",
    "capturable": "its steps (made for CUDA graphs) round differently from the replayed steps",
    "differentiable": (
        "its steps round differently from the replayed steps; it is not needed, since Unrolled "
        "differentiates through its own copy of the steps"
    ),
}


def update_for(optimizer: torch.optim.Optimizer) -> Update:
    """The differentiable update matching ``optimizer``; a clear error when there is none (another
    optimiser, a subclass, whose ``step`` may do anything, or a flag the replay does not follow)."""
    fn = _UPDATES.get(type(optimizer))
    if fn is None:
        names = ", ".join(sorted(t.__name__ for t in _UPDATES))
        raise TypeError(
            f"Unrolled differentiates through the inner optimiser and supports torch.optim "
            f"{names}; got {type(optimizer).__name__} (only those classes themselves: a subclass's "
            "step may do anything)"
        )
    for i, g in enumerate(optimizer.param_groups):
        for flag, why in _UNSUPPORTED_FLAGS.items():
            if g.get(flag):
                raise ValueError(
                    f"Unrolled does not support {type(optimizer).__name__}({flag}=True) (param group "
                    f"{i}): {why}. Build the inner optimiser with {flag}=False"
                )
    return fn


def group_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a param group (everything but its parameters), copied."""
    return {k: v for k, v in group.items() if k != "params"}


def snapshot_state(optimizer: torch.optim.Optimizer, weights: Sequence[Tensor]) -> list[State]:
    """Detached copies of the optimiser state of each weight (empty dict before its first step)."""
    out = []
    for w in weights:
        st = optimizer.state.get(w, {})
        out.append({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in st.items()})
    return out
