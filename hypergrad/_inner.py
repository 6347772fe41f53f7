r"""Differentiable, out-of-place versions of ``torch.optim`` updates.

Each update takes the weights, their gradients, the optimiser state of each weight and the param
group's settings (floats, or tensors when the settings are hyperparameters) and returns new weights
and new state, without touching its inputs, so autograd (reverse or forward mode) can see through
it. The arithmetic follows ``torch.optim``'s single-tensor code step for step, so that replaying
a step reproduces what the real optimiser did, bit for bit (settings that are hyperparameters
need tensor arithmetic, which rounds otherwise: :func:`update_exactly` gives such an update the
real step's values and the tensor arithmetic's derivatives). Complex weights are updated
as torch.optim updates them (all but SGD: on their real views). With ``foreach=True`` the replay
follows the multi-tensor steps where they order their arithmetic otherwise (complex weights are
viewed as real before the L2 term is added; Adamax reads a tensor lr as a Python number). On
float16 / bfloat16 weights the foreach kernels round otherwise in the last bit (float32 scalar
arithmetic): there only the single-tensor steps are reproduced bit for bit.

Supported: SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD, Rprop,
Adafactor and Muon, with every option of theirs but ``fused``, ``capturable`` and
``differentiable`` (see ``_UNSUPPORTED_FLAGS``). Adafactor's and Muon's steps read numbers
from the weights (``.item()``: Adafactor's relative step size and update clipping) or round in
bfloat16 (Muon's Newton-Schulz iteration): the replay keeps their values and differentiates
the exact quantities (see :func:`_adafactor`, :func:`_orthogonalized`).
"""

from __future__ import annotations

import contextlib
import functools
import math
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
            elif not nesterov and all(map(_number, (lr, momentum, dampening))) and _differentiated(p, buf, d):
                # the heavy-ball step as one autograd node (same ops, so the same values): its
                # backward forms the buffer's cotangent in one scaled add instead of autograd's
                # product, sum and product (one full-size operation per weight and replayed step)
                new, s["momentum_buffer"] = _HeavyBall.apply(p, buf, d, float(lr), momentum, dampening)
                new_p.append(new)
                new_s.append(s)
                continue
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


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _differentiated(*ts: Tensor) -> bool:
    """Whether autograd (either mode) follows any of ``ts`` here: grad mode on and one requires
    grad, or one carries a forward-mode tangent; real, strided tensors of at least 16384 entries
    only (below that, the Python of a custom autograd node, about 45 µs a step, costs more than
    the full-size operation it saves: on CPU an MLP's biases made the replay slower)."""
    if any(t.numel() < 16384 or t.is_complex() or t.layout is not torch.strided for t in ts):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


class _HeavyBall(torch.autograd.Function):
    """SGD's momentum step with a buffer, ``buf' = momentum buf + (1 - dampening) d`` and
    ``p' = p - lr buf'``, with torch.optim's ops (bit for bit its values), for numbers
    ``lr``, ``momentum``, ``dampening``. Its backward takes the buffer's cotangent
    ``g_buf' - lr g_p'`` in one scaled add; reverse mode (twice differentiable) and forward mode."""

    generate_vmap_rule = True  # (usable under torch.func transforms too)

    @staticmethod
    def forward(
        p: Tensor, buf: Tensor, d: Tensor, lr: float, momentum: float, dampening: float
    ) -> tuple[Tensor, Tensor]:
        new_buf = buf.mul(momentum).add(d, alpha=1 - dampening)
        return p.add(new_buf, alpha=-lr), new_buf

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.set_materialize_grads(False)
        ctx.lr, ctx.momentum, ctx.dampening = inputs[3:]

    @staticmethod
    def backward(ctx: Any, g_p: Tensor | None, g_buf: Tensor | None) -> tuple[Tensor | None, ...]:
        lr, momentum, dampening = ctx.lr, ctx.momentum, ctx.dampening
        if g_p is None and g_buf is None:
            return (None,) * 6
        if g_p is None:
            total = g_buf
        elif g_buf is None:
            total = g_p.mul(-lr)
        else:
            total = g_buf.add(g_p, alpha=-lr)
        assert total is not None
        grad_buf = total.mul(momentum) if ctx.needs_input_grad[1] else None
        grad_d = None
        if ctx.needs_input_grad[2]:
            grad_d = total if dampening == 0 else total.mul(1 - dampening)
        return g_p, grad_buf, grad_d, None, None, None

    @staticmethod
    def jvp(
        ctx: Any, t_p: Tensor | None, t_buf: Tensor | None, t_d: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, Tensor | None]:
        lr, momentum, dampening = ctx.lr, ctx.momentum, ctx.dampening
        parts = []
        if t_buf is not None:
            parts.append(t_buf.mul(momentum))
        if t_d is not None:
            parts.append(t_d if dampening == 0 else t_d.mul(1 - dampening))
        t_new_buf = None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if t_new_buf is None:
            return t_p, None
        return (t_new_buf.mul(-lr) if t_p is None else t_p.add(t_new_buf, alpha=-lr)), t_new_buf


def _adam(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    wd, amsgrad, maximize = group["weight_decay"], group["amsgrad"], group.get("maximize", False)
    decoupled = group.get("decoupled_weight_decay", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        step = _next_step(st)
        p, g = _decayed(p, g, lr, wd, decoupled, group.get(_COMPLEX, False))
        v = _state_or_zeros(st, "exp_avg_sq", p)
        # torch.optim's ops, out of place; a tensor beta1 first cast to the weight's dtype, as
        # torch.optim casts it for this lerp only (1 - beta1 then rounds in that dtype)
        beta1_p = beta1.to(device=p.device, dtype=p.dtype) if isinstance(beta1, Tensor) else beta1
        m = _state_or_zeros(st, "exp_avg", p).lerp(g, 1 - beta1_p)
        v = _ema_sq(v, g, beta2)
        bc1 = 1 - beta1**step
        bc2_sqrt = (1 - beta2**step) ** 0.5
        s: State = {"step": _step_tensor(step, st), "exp_avg": m, "exp_avg_sq": v}
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


def _ema_sq(v: Tensor, g: Tensor, beta: Any) -> Tensor:
    """``beta * v + (1 - beta) * g²``, the second-moment average of Adam, NAdam and RAdam: with
    torch.optim's ops (``v.mul_(beta).addcmul_(g, g, value=1 - beta)``, out of place), or written
    out when ``beta`` is tuned (``value=`` refuses a tensor that requires grad and would silently
    take a forward-mode dual's primal)."""
    if _traced(beta):
        return v * beta + (1 - beta) * g * g
    return v.mul(beta).addcmul(g, g, value=1 - beta)


def _signed_decayed(
    p: Tensor, g: Tensor, st: State, maximize: bool, wd: Any, on_complex: bool = False
) -> tuple[Tensor, float]:
    """The common start of RMSprop's, Adagrad's, Adamax's, Adadelta's and ASGD's step, as
    torch.optim writes it: the gradient (negated with ``maximize``, plus L2 ``wd * p``; see
    :func:`_l2` for ``on_complex``) and the step number after this step."""
    g = -g if maximize else g
    step = _next_step(st)
    if not _is_zero(wd):
        g = _l2(g, p, wd, on_complex)
    return g, step


def _l2(g: Tensor, p: Tensor, wd: Any, on_complex: bool) -> Tensor:
    """``g + wd * p`` as torch.optim adds an L2 term, ``grad.add(param, alpha=wd)``: on real
    weights one fused multiply-add on CPU, on complex ones (Adam, RMSprop, Adagrad, Adamax and
    Adadelta add it before taking the real views) complex arithmetic, ``p * wd`` rounded, then
    the sum; ``on_complex`` says that ``g`` and ``p`` are the real views of complex tensors."""
    if _traced(wd):
        return g + wd * p
    return g + p * wd if on_complex else g.add(p, alpha=wd)


def _rmsprop(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
    wd, momentum, centered = group["weight_decay"], group["momentum"], group["centered"]
    maximize = group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd, group.get(_COMPLEX, False))
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
        g, step = _signed_decayed(p, g, st, maximize, wd, group.get(_COMPLEX, False))
        clr = lr / (1 + (step - 1) * lr_decay)
        acc = st.get("sum")
        if acc is None:  # torch.optim fills it at construction; a state loaded without it
            acc = torch.full_like(p, group.get("initial_accumulator_value", 0.0))
        acc = acc.addcmul(g, g, value=1)
        std = safe_sqrt(acc) + eps
        new_p.append(p - clr * (g / std) if _traced(clr) else p.addcdiv(g, std, value=-clr))
        new_s.append({"step": torch.tensor(step, dtype=_step_dtype(st.get("step"))), "sum": acc})
    return tuple(new_p), new_s


def _adamax(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    wd, maximize = group["weight_decay"], group.get("maximize", False)
    if group.get("foreach") and isinstance(lr, Tensor) and not _traced(lr):
        # torch.optim's foreach step reads a tensor lr as a Python number (its single-tensor
        # step divides it by the bias correction in the tensor's own dtype)
        lr = lr.item()
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd, group.get(_COMPLEX, False))
        m = _state_or_zeros(st, "exp_avg", p)
        u = _state_or_zeros(st, "exp_inf", p)
        m = m.lerp(g, 1 - beta1)
        # torch.optim: torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        u = torch.maximum(u.mul(beta2), g.abs() + eps)
        clr = lr / (1 - beta1**step)
        new_p.append(p - clr * m / u if _traced(clr) else p.addcdiv(m, u, value=-clr))
        new_s.append({"step": _step_tensor(step, st), "exp_avg": m, "exp_inf": u})
    return tuple(new_p), new_s


def _decayed(
    p: Tensor, g: Tensor, lr: Any, wd: Any, decoupled: bool, on_complex: bool = False
) -> tuple[Tensor, Tensor]:
    """Adam's, NAdam's and RAdam's weight decay, as torch.optim applies it: decoupled (the weight
    shrunk by ``1 - lr * wd`` before the step) or an L2 term added to the gradient (:func:`_l2`)."""
    if _is_zero(wd):
        return p, g
    if decoupled:
        return p * (1 - lr * wd), g  # torch.optim's param.mul_(1 - lr * weight_decay)
    return p, _l2(g, p, wd, on_complex)


def _nadam(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    wd, psi, maximize = group["weight_decay"], group["momentum_decay"], group.get("maximize", False)
    decoupled = group.get("decoupled_weight_decay", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        step = _next_step(st)
        bc2 = 1 - beta2**step
        p, g = _decayed(p, g, lr, wd, decoupled)
        # the momentum schedule mu_t and mu_{t+1} (Dozat 2016), and their running product
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mu_product = st.get("mu_product")
        if mu_product is None:
            mu_product = torch.tensor(1.0, dtype=_scalar_dtype())
        mu_product = mu_product * mu  # torch.optim's mu_product *= mu (in its dtype, a 0-dim tensor)
        m = _state_or_zeros(st, "exp_avg", p).lerp(g, 1 - beta1)
        v = _ema_sq(_state_or_zeros(st, "exp_avg_sq", p), g, beta2)
        denom = safe_sqrt(v.div(bc2)) + eps
        if _traced(lr) or _traced(mu) or _traced(mu_product):  # torch.optim's differentiable branch
            mu_product_next = mu_product * mu_next
            p = p.addcdiv(g * (-lr * (1.0 - mu) / (1.0 - mu_product)), denom)
            p = p.addcdiv(m * (-lr * mu_next / (1.0 - mu_product_next)), denom)
        else:  # two addcdiv_ with Python-number coefficients, as torch.optim rounds them
            mu_product_next = float(mu_product) * mu_next
            p = p.addcdiv(g, denom, value=(-lr * (1.0 - mu) / (1.0 - float(mu_product))))
            p = p.addcdiv(m, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))
        new_p.append(p)
        new_s.append(
            {"step": _step_tensor(step, st), "mu_product": mu_product, "exp_avg": m, "exp_avg_sq": v}
        )
    return tuple(new_p), new_s


def _radam(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    wd, maximize = group["weight_decay"], group.get("maximize", False)
    decoupled = group.get("decoupled_weight_decay", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        step = _next_step(st)
        p, g = _decayed(p, g, lr, wd, decoupled)
        m = _state_or_zeros(st, "exp_avg", p).lerp(g, 1 - beta1)
        v = _ema_sq(_state_or_zeros(st, "exp_avg_sq", p), g, beta2)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        m_hat = m / bc1
        # the length of the approximated simple moving average, and its limit (Liu et al. 2020):
        # the variance is rectified once it exceeds 5, before that the step is momentum SGD's
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bc2
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            adaptive_lr = (bc2**0.5) / (safe_sqrt(v) + eps)
            p = p.add(m_hat * lr * adaptive_lr * rect, alpha=-1.0)
        else:
            p = p.add(m_hat * lr, alpha=-1.0)
        new_p.append(p)
        new_s.append({"step": _step_tensor(step, st), "exp_avg": m, "exp_avg_sq": v})
    return tuple(new_p), new_s


def _adadelta(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
    maximize, on_complex = group.get("maximize", False), group.get(_COMPLEX, False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd, on_complex)
        sq = _state_or_zeros(st, "square_avg", p)
        acc = _state_or_zeros(st, "acc_delta", p)
        sq = sq * rho + (1 - rho) * g * g if _traced(rho) else sq.mul(rho).addcmul(g, g, value=1 - rho)
        std = safe_sqrt(sq + eps)
        delta = safe_sqrt(acc + eps).div(std).mul(g)
        if _traced(rho):
            acc = acc * rho + (1 - rho) * delta * delta
        else:
            acc = acc.mul(rho).addcmul(delta, delta, value=1 - rho)
        if _traced(lr):
            new_p.append(p - lr * delta)
        else:  # torch.optim's param.add_(delta, alpha=-lr), on the complex weight for a complex one
            new_p.append(p + delta * -lr if on_complex else p.add(delta, alpha=-lr))
        new_s.append({"step": _step_tensor(step, st), "square_avg": sq, "acc_delta": acc})
    return tuple(new_p), new_s


def _asgd(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
    wd, maximize = group["weight_decay"], group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g, step = _signed_decayed(p, g, st, maximize, wd)
        # the step size eta_t (set at the end of the previous step, from that step's lr; the
        # first is lr) and the averaging weight mu_t, 0-dim tensors as torch.optim keeps them
        eta = st.get("eta")
        if eta is None:  # torch.optim's torch.as_tensor(lr, dtype=...).clone()
            eta = lr.to(_scalar_dtype()) if _traced(lr) else torch.as_tensor(lr, dtype=_scalar_dtype())
        mu = st.get("mu")
        mu = torch.ones((), dtype=_scalar_dtype()) if mu is None else mu
        if _traced(eta) or _traced(lambd):
            p = p * (1 - lambd * eta) - eta * g
        else:  # torch.optim's param.mul_(1 - lambd * eta); param.add_(grad, alpha=-eta), eta a number
            eta_value = eta.item()
            p = p.mul(1 - lambd * eta_value).add(g, alpha=-eta_value)
        ax = _state_or_zeros(st, "ax", p)
        ax = ax.add(p.sub(ax).mul(mu)) if _traced(mu) or mu.item() != 1 else p.clone()
        # torch.optim: eta.copy_(torch.as_tensor(lr / ...)), mu.copy_(torch.as_tensor(1 / ...))
        new_eta = lr / ((1 + lambd * lr * step) ** alpha)
        new_eta = (new_eta if isinstance(new_eta, Tensor) else torch.as_tensor(new_eta)).to(eta.dtype)
        # (t0 only moves the average ax, which no step reads: no derivative to keep)
        t0_value = t0.detach().item() if isinstance(t0, Tensor) else t0
        new_mu = torch.as_tensor(1 / max(1, step - t0_value)).to(mu.dtype)
        new_p.append(p)
        new_s.append({"step": _step_tensor(step, st), "eta": new_eta, "mu": new_mu, "ax": ax})
    return tuple(new_p), new_s


def _rprop(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    lr, (etaminus, etaplus), (step_min, step_max) = group["lr"], group["etas"], group["step_sizes"]
    maximize = group.get("maximize", False)
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        step = _next_step(st)
        prev = _state_or_zeros(st, "prev", p)
        size = st.get("step_size")
        if size is None:  # torch.optim's torch.full_like(grad, lr)
            size = torch.zeros_like(g) + lr if _traced(lr) else torch.full_like(g, lr)
        # each entry's step size grows by etaplus where the gradient kept its sign, shrinks by
        # etaminus where it flipped (and that entry then does not move), is kept where it is 0
        factor = g.mul(prev).sign()
        factor = factor.masked_fill(factor.gt(0), etaplus)
        factor = factor.masked_fill(factor.lt(0), etaminus)
        factor = factor.masked_fill(factor.eq(0), 1)
        size = size.mul(factor).clamp(step_min, step_max)
        g = g.masked_fill(factor.eq(etaminus), 0)
        new_p.append(p.addcmul(g.sign(), size, value=-1))
        new_s.append({"step": _step_tensor(step, st), "prev": g, "step_size": size})
    return tuple(new_p), new_s


def _adafactor(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    """torch.optim.Adafactor's step (its single-tensor one, or with ``foreach=True`` its
    multi-tensor one, which scales the update before adding it): the relative step size
    ``max(eps2, RMS(p)) * min(lr, 1/sqrt(t))`` and the clipping ``max(1, RMS(update) / d)``,
    which torch.optim reads as Python numbers (``.item()``), are taken as it takes them for the
    values, and differentiated (through the weight, the update, ``lr`` and ``d``) by a term whose
    value is 0 (:func:`_zero_valued`): the real step depends on the weight through them, whatever
    torch.optim's ``.item()`` says to autograd."""
    lr, d, wd, beta2_decay = group["lr"], group["d"], group["weight_decay"], group["beta2_decay"]
    eps1, eps2 = group["eps"]
    maximize, foreach = group.get("maximize", False), bool(group.get("foreach"))
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        g = -g if maximize else g
        if eps1 is None:  # torch.optim: the first weight's machine epsilon, kept for the others
            eps1 = torch.finfo(p.dtype).eps
        step = _next_step(st)
        one_minus_beta2 = step**beta2_decay
        # rho_t = min(lr, 1 / sqrt(t)), and alpha_t = max(eps2, RMS(p)) * rho_t, as torch.optim
        # computes them (Python numbers), from the weight before its decay
        rho = lr.clamp(max=1 / (step**0.5)) if _traced(lr) else min(lr, 1 / (step**0.5))
        p_norm = p.norm(2)
        alpha = max(eps2, p_norm.item() / (p.numel() ** 0.5)) * _primal_number(rho)
        new_st: State = {"step": _step_tensor(step, st)}
        if not _is_zero(wd):  # torch.optim's param.mul_(1 - lr * weight_decay), in the weight's dtype
            p = (p * (1 - lr * wd)).to(p.dtype) if _traced(lr) or _traced(wd) else p.mul(1 - lr * wd)
        if g.dim() > 1:  # the factored second moment: row and column means of g * g
            row = st.get("row_var")
            col = st.get("col_var")
            if row is None or col is None:  # torch.optim's grad.new_zeros(row_shape / col_shape)
                row = g.new_zeros((*g.shape[:-1], 1))
                col = g.new_zeros((*g.shape[:-2], 1, g.shape[-1]))
            row = _lerp(row, torch.norm(g, dim=-1, keepdim=True).square().div(g.size(-1)), one_minus_beta2)
            col = _lerp(col, torch.norm(g, dim=-2, keepdim=True).square().div(g.size(-2)), one_minus_beta2)
            var = (row @ col).div(row.mean(dim=-2, keepdim=True).clamp(min=eps1))
            new_st["row_var"], new_st["col_var"] = row, col
        else:
            var = _lerp(_state_or_zeros(st, "variance", p), g * g, one_minus_beta2)
            new_st["variance"] = var
        update = var.clamp(min=eps1 * eps1).rsqrt().mul(g)
        u_norm = update.norm(2)
        denom = max(1.0, u_norm.item() / ((update.numel() ** 0.5) * _primal_number(d)))
        coef = -alpha / denom
        # torch.optim's param.add_(update, alpha=-alpha / denom); foreach: _foreach_mul_(updates,
        # alphas), then _foreach_add_(params, updates)
        q = p.add(update.mul(coef)) if foreach else p.add(update, alpha=coef)
        if any(map(_traced, (p_norm, u_norm, rho, d))):
            # the derivative of the step size (value 0: q's values stay torch.optim's)
            n = p.numel() ** 0.5
            # (the clipping counted where RMS(update) / d exceeds 1 only: at the default d = 1 it
            # is 1 exactly for a vector's first update, sign(g), where the real step, valid for
            # d >= 1 only, does not depend on d; clamp's derivative there is the clipped side's)
            rms = u_norm.div(n * d)
            coef_t = -(p_norm.div(n).clamp(min=eps2) * rho) / torch.where(rms > 1.0, rms, 1.0)
            q = q + update * _zero_valued(coef_t)
        new_p.append(q)
        new_s.append(new_st)
    return tuple(new_p), new_s


def _lerp(start: Tensor, end: Tensor, weight: Any) -> Tensor:
    """``start.lerp(end, weight)`` (torch.optim's op), written out for a tuned ``weight``."""
    return start + weight * (end - start) if _traced(weight) else start.lerp(end, weight)


def _primal_number(x: Any) -> Any:
    """A tuned setting's value as a Python number (as torch.optim reads it); anything else as is."""
    return float(_plain(x)) if _traced(x) else x


def _zero_valued(x: Tensor) -> Tensor:
    """0, with ``x``'s derivatives (reverse and forward mode)."""
    return x - x.detach()


def _muon(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[State], group: Mapping[str, Any]
) -> tuple[Tensors, list[State]]:
    """torch.optim.Muon's step: momentum, Newton-Schulz orthogonalisation in bfloat16, decoupled
    decay ``p * (1 - lr * weight_decay)`` and the step ``lr * ratio`` with the shape's ratio
    (``adjust_lr_fn``). See :func:`_orthogonalized` for the derivative of the orthogonalisation."""
    lr, wd, momentum, nesterov = group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]
    coefficients, ns_steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
    new_p, new_s = [], []
    for p, g, st in zip(params, grads, states, strict=True):
        if g.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")  # (torch.optim's own refusal)
        buf = _lerp(_state_or_zeros(st, "momentum_buffer", g), g, 1 - momentum)
        update = _lerp(g, buf, momentum) if nesterov else buf
        ortho, normalized = _orthogonalized(update, coefficients, ns_steps, eps)
        if not nesterov and update.dtype == torch.bfloat16:
            # torch.optim normalises a bfloat16 update in place (``grad.bfloat16()`` is then the
            # tensor itself), which without Nesterov momentum is the momentum buffer
            buf = normalized + _zero_valued(buf / buf.norm().clamp(min=eps)) if _traced(buf) else normalized
        ratio = _muon_lr_ratio(group["adjust_lr_fn"], p.shape)
        if _traced(lr) or _traced(wd):  # (in the weight's dtype, as torch.optim's in-place step)
            p = (p * (1 - lr * wd)).to(p.dtype)
        else:  # torch.optim's param.mul_(1 - lr * weight_decay) (also for weight_decay 0)
            p = p.mul(1 - lr * wd)
        if _traced(lr):
            p = (p - (lr * ratio) * ortho.to(p.dtype)).to(p.dtype)
        else:  # torch.optim's param.add_(update, alpha=-adjusted_lr)
            p = p.add(ortho, alpha=-(lr * ratio))
        new_p.append(p)
        new_s.append({"momentum_buffer": buf})
    return tuple(new_p), new_s


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's ``_adjust_lr`` ratio for a weight of ``shape``."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


def _newton_schulz(x: Tensor, coefficients: Sequence[Any], steps: int, eps: Any) -> tuple[Tensor, Tensor]:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` (its ops, in ``x``'s dtype), out of
    place; also the normalised input (in ``x``'s layout)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    o = x.T if tall else x
    o = o.div(o.norm().clamp(min=eps))
    normalized = o.T if tall else o
    for _ in range(steps):
        gram = o @ o.T
        o = torch.addmm(o, torch.addmm(gram, gram, gram, beta=b, alpha=c), o, beta=a)
    return (o.T if tall else o), normalized


def _orthogonalized(
    update: Tensor, coefficients: Sequence[Any], steps: int, eps: Any
) -> tuple[Tensor, Tensor]:
    """Muon's orthogonalised update and its normalised (bfloat16) input. The values are
    torch.optim's, computed in bfloat16; where autograd follows ``update``, the derivative is
    that of the same iteration run in the update's dtype (at least float32, autocast off): bfloat16's
    own was 13% off the float64 one on a 6x4 matrix. That costs one more iteration, in that dtype,
    per weight and differentiated step."""
    value, normalized = _newton_schulz(_plain(update).bfloat16(), coefficients, steps, eps)
    if not _traced(update):
        return value, normalized
    wide = torch.promote_types(update.dtype, torch.float32)
    device = update.device.type
    # (a step replayed under torch.autocast, as the real one ran, would run this in its low dtype)
    off = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if off else contextlib.nullcontext():
        smooth, _ = _newton_schulz(update.to(wide), coefficients, steps, eps)
    out = torch.promote_types(update.dtype, torch.bfloat16)
    return value.to(out) + _zero_valued(smooth).to(out), normalized


def update_exactly(
    update: Update,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[State],
    group: Mapping[str, Any],
    numbers: Mapping[str, float],
) -> tuple[Tensors, list[State]]:
    """``update`` with tuned settings whose values are the real step's, bit for bit.

    A tuned setting (a tensor autograd follows) needs tensor arithmetic, which rounds otherwise
    than torch.optim's ``alpha=`` / ``value=`` operations on the Python number the real step
    was given (``numbers``: each tuned setting's value as the hyperoptimiser wrote it into the
    param group). A last-bit difference is no matter in itself, but a step that amplifies
    rounding (Adam or RMSprop on a gradient that is rounding noise, such as the bias of a layer
    before a BatchNorm) then ends far from the real weights. So the update runs twice: as is,
    for the derivatives, and on the plain values with ``numbers``, for the values; each output
    is ``plain + (traced - traced.detach())``, the plain value with the traced derivative
    (reverse and forward mode). Costs one more update (no training gradient) per step where
    a setting is traced; where none is, the update runs once, on ``numbers``."""
    if not any(_traced(group[k]) for k in numbers):
        return update(params, grads, states, {**group, **numbers})
    new_p, new_s = update(params, grads, states, group)
    plain_p, plain_s = update(
        [_plain(p) for p in params],
        [_plain(g) for g in grads],
        [{k: _plain(v) for k, v in st.items()} for st in states],
        {**group, **numbers},
    )
    out_s = [
        {k: _valued(v, s_plain[k]) if k in s_plain else v for k, v in s.items()}
        for s, s_plain in zip(new_s, plain_s, strict=True)
    ]
    return tuple(_valued(t, e) for t, e in zip(new_p, plain_p, strict=True)), out_s


def _plain(x: Any) -> Any:
    """A tensor's value without autograd history or forward-mode tangent; anything else as is."""
    return fwAD.unpack_dual(x).primal.detach() if isinstance(x, Tensor) else x


def _valued(traced: Any, plain: Any) -> Any:
    """``plain``'s value with ``traced``'s derivatives (``traced - traced.detach()`` is 0), in
    ``plain``'s dtype: a tuned setting of another dtype promotes 0-dim state (NAdam's float32
    ``mu_product`` times a float64 tuned ``momentum_decay``'s ``mu``), which the real step keeps
    in its own (the next step's product then rounded otherwise: the replay drifted 1.1e-10 from
    the real float64 weights in 3 steps)."""
    if not (isinstance(traced, Tensor) and isinstance(plain, Tensor) and _traced(traced)):
        return traced
    if not (traced.is_floating_point() or traced.is_complex()) or traced.shape != plain.shape:
        return traced
    return plain + (traced - traced.detach()).to(plain.dtype)


def _traced(x: Any) -> bool:
    """Whether ``x`` is a tensor autograd follows (a tuned setting: it requires grad, or carries a
    forward-mode tangent). Other tensors (a learning rate a scheduler keeps as a tensor, recorded
    by value) take torch.optim's own ``alpha=`` / ``value=`` operations, as its steps do, so that
    the replay rounds as they did."""
    return isinstance(x, Tensor) and (x.requires_grad or fwAD.unpack_dual(x).tangent is not None)


def _step_dtype(step_t: Any) -> torch.dtype:
    return step_t.dtype if isinstance(step_t, Tensor) else _scalar_dtype()


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives the 0-dim tensors of a fresh state (``step``, NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``): float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _next_step(st: State) -> float:
    """The step number after this step (torch.optim's ``step_t += 1``, read as a number)."""
    step_t = st.get("step")
    return (0.0 if step_t is None else float(step_t)) + 1.0


def _step_tensor(step: float, st: State) -> Tensor:
    return torch.tensor(step, dtype=_step_dtype(st.get("step")))


def _state_or_zeros(st: State, key: str, p: Tensor) -> Tensor:
    """``st[key]``, or the zeros torch.optim starts it from."""
    x = st.get(key)
    return torch.zeros_like(p) if x is None else x


def _is_zero(x: Any) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _on_real_views(
    update: Update,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[State],
    group: Mapping[str, Any],
) -> tuple[Tensors, list[State]]:
    """``update`` run on complex weights as torch.optim's optimisers but SGD run: on
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
            real = {k: _real_view(v) for k, v in st.items()}
            p_real = torch.view_as_real(p)
            # torch.optim's single-tensor steps add the L2 term (and Adadelta its step) to the
            # complex tensors before taking the real views; its foreach steps take the views first
            on_complex = not group.get("foreach")
            (q,), (s,) = update([p_real], [torch.view_as_real(g)], [real], {**group, _COMPLEX: on_complex})
            q = torch.view_as_complex(q.contiguous())
            # per-entry state (moments, ...) is complex again; 0-dim state (step, NAdam's
            # mu_product, ASGD's eta and mu) stays real, as torch.optim keeps it
            s = {k: _complex_view(v) if _entrywise(v, p_real) else v for k, v in s.items()}
        new_p.append(q)
        new_s.append(s)
    return tuple(new_p), new_s


#: a key ``_on_real_views`` adds to the settings it passes: the weight is a complex one's real view,
#: and torch.optim's (single-tensor) step does some of its arithmetic on the complex weight
_COMPLEX = "_hypergrad_complex_weight"


def _real_view(x: Any) -> Any:
    return torch.view_as_real(x) if isinstance(x, Tensor) and x.is_complex() else x


def _complex_view(x: Tensor) -> Tensor:
    return torch.view_as_complex(x.contiguous())


def _entrywise(x: Any, p_real: Tensor) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.shape == p_real.shape


_UPDATES: dict[type, Update] = {
    torch.optim.SGD: _sgd,  # (torch.optim's SGD runs on complex weights as they are: so does this)
    torch.optim.Adam: functools.partial(_on_real_views, _adam),
    torch.optim.AdamW: functools.partial(_on_real_views, _adam),
    torch.optim.RMSprop: functools.partial(_on_real_views, _rmsprop),
    torch.optim.Adagrad: functools.partial(_on_real_views, _adagrad),
    torch.optim.Adamax: functools.partial(_on_real_views, _adamax),
    torch.optim.NAdam: functools.partial(_on_real_views, _nadam),
    torch.optim.RAdam: functools.partial(_on_real_views, _radam),
    torch.optim.Adadelta: functools.partial(_on_real_views, _adadelta),
    torch.optim.ASGD: functools.partial(_on_real_views, _asgd),
    torch.optim.Rprop: functools.partial(_on_real_views, _rprop),
}
# (torch.optim.Adafactor from torch 2.5, Muon from 2.9; both refuse complex weights themselves)
for _name, _update in (("Adafactor", _adafactor), ("Muon", _muon)):
    if hasattr(torch.optim, _name):
        _UPDATES[getattr(torch.optim, _name)] = _update
#: flags whose steps the replay does not reproduce, and why
_UNSUPPORTED_FLAGS = {
    "fused": "its fused kernel rounds differently from the replayed steps",
    "capturable": "its steps (made for CUDA graphs) round differently from the replayed steps",
    "differentiable": (
        "its steps round differently from the replayed steps; it is not needed, since Unrolled "
        "differentiates through its own copy of the steps"
    ),
}

_FOREACH_ROUNDS = (
    "its multi-tensor (foreach) kernel rounds differently from its single-tensor one, which the "
    "replay reproduces bit for bit"
)
#: flags of one optimiser whose steps the replay does not reproduce, and why (NAdam's, RAdam's
#: and ASGD's foreach kernels order their arithmetic otherwise: ASGD's computes
#: ``param - eta * (grad + lambd * param)`` and its next eta in float32 tensor arithmetic, 1e-9
#: off in float64 after 6 steps; NAdam's and RAdam's differ in the last bits)
_UNSUPPORTED_FLAGS_OF: dict[type, dict[str, str]] = {
    torch.optim.NAdam: {"foreach": _FOREACH_ROUNDS},
    torch.optim.RAdam: {"foreach": _FOREACH_ROUNDS},
    torch.optim.ASGD: {"foreach": _FOREACH_ROUNDS},
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
    unsupported = {**_UNSUPPORTED_FLAGS, **_UNSUPPORTED_FLAGS_OF.get(type(optimizer), {})}
    for i, g in enumerate(optimizer.param_groups):
        for flag, why in unsupported.items():
            if g.get(flag):
                raise ValueError(
                    f"Unrolled does not support {type(optimizer).__name__}({flag}=True) (param group "
                    f"{i}): {why}. Build the inner optimiser with {flag}=False"
                )
    return fn


def state_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Settings that ``optimizer`` reads from its ``defaults``, not from the param group, when it
    creates a weight's missing state: torch.optim.Adagrad fills ``sum`` with the constructor's
    ``initial_accumulator_value`` (after ``state.clear()``, or for a group added later), whatever
    the group says. The replay, which creates such state itself, must read the same value."""
    if type(optimizer) is torch.optim.Adagrad:
        return {"initial_accumulator_value": optimizer.defaults.get("initial_accumulator_value", 0.0)}
    return {}


def group_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a param group (everything but its parameters), copied; a one-element
    tensor setting of any shape (``lr=torch.tensor([0.01])``, which torch.optim accepts) as the
    0-dim tensor torch.optim's steps make of it (``_to_scalar``), so the replay's ``alpha=`` /
    ``value=`` operations take it as they do."""
    return {k: _to_scalar(v) for k, v in group.items() if k != "params"}


def _to_scalar(x: Any) -> Any:
    """torch.optim's ``_to_scalar``: a one-element tensor squeezed to 0 dims (also inside a tuple,
    as ``betas``); anything else as it is."""
    if isinstance(x, tuple):
        return tuple(_to_scalar(v) for v in x)
    if isinstance(x, Tensor) and x.dim() != 0 and x.numel() == 1:
        return x.squeeze()
    return x


def snapshot_state(optimizer: torch.optim.Optimizer, weights: Sequence[Tensor]) -> list[State]:
    """Detached copies of the optimiser state of each weight (empty dict before its first step)."""
    out = []
    for w in weights:
        st = optimizer.state.get(w, {})
        out.append({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in st.items()})
    return out
