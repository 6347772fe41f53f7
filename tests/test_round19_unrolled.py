"""Round 19: Unrolled and hg.optim as researchers use them (higher's test idioms, real scripts).

Found (fixed): gradient hooks that ``train_loss`` puts on the graph (``Tensor.register_hook`` on an
activation: gradient clipping of an activation, a DANN gradient-reversal layer; a module's
``register_full_backward_hook`` / ``register_full_backward_pre_hook``) shape the training
gradient of each real step, and the replay runs them as well, but they stayed on the replayed
forward graph: the hypergradient's backward pass through that graph ran them again, on the
cotangents of the validation loss. Reverse mode (and ``checkpoint=True``) then returned a
silently wrong hypergradient, with no warning (an activation's gradient clamped: 4.5% off with
Adam, 0.1% with SGD and momentum; a DANN gradient-reversal layer, as a hook or as a module: 1.7%
off), while forward mode and central differences of the real training agreed.

Passing tests here cover what earlier rounds did not: those hooks in forward mode; a per-step
learning-rate schedule (Maclaurin et al. 2015) written as a scale of the loss with the step's
index carried by the batch; a learning-rate multiplier under a scheduler stepped every inner
step together with a tuned momentum (with dampening) and hypersteps every 3 steps over a
window of 2; SGD with ``maximize``, ``dampening`` and ``weight_decay``, and Adam with
``amsgrad``, ``maximize`` and ``weight_decay``, in two param groups one of which holds a frozen
weight, replayed bit for bit; float32 weights with a float64 learning rate replayed bit for bit;
a layer unfrozen mid-run with ``add_param_group`` (a new episode, with the carried-in momentum).
The hook tests also check that a hyperstep leaves the model's hooks in force for the real steps.
Each hypergradient is checked in float64 against central differences of plain ``torch.optim``
training (or, for SGD, a hand-unrolled reference in plain autograd).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64

_HOOKS_BUG = (
    "gradient hooks registered by train_loss's forward pass (Tensor.register_hook, module full "
    "backward hooks) stay on the replayed graph and also act on the hypergradient's cotangents"
)


def _mlp(dtype: torch.dtype = DT) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)


def _data(n: int, dtype: torch.dtype = DT, seed: int = 1) -> tuple[list[Any], Any]:
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=dtype), torch.randn(8, 1, generator=g, dtype=dtype))
        for _ in range(n + 1)
    ]
    return batches[:n], batches[n]


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _unrolled(
    model: nn.Module,
    hp: nn.Module,
    opt: torch.optim.Optimizer,
    train: Callable[..., Tensor],
    val: Callable[..., Tensor],
    steps: int,
    mode: str = "reverse",
    checkpoint: bool = False,
) -> hg.Unrolled:
    return hg.Unrolled(
        model,
        hp,
        train,
        val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.3),
        steps=steps,
        mode=mode,
        checkpoint=checkpoint,
    )


def _lr_fd(
    start: tuple[nn.Module, torch.optim.Optimizer],
    raw: Tensor,
    train: Callable[..., Tensor],
    val: Callable[..., Tensor],
    window: list[Any],
    val_batch: Any,
) -> Tensor:
    """Central differences, w.r.t. a LearningRate's raw log-rates, of the validation loss after
    plain torch.optim training from ``start`` over ``window`` (with each hook in force)."""

    def f() -> float:
        m, o = copy.deepcopy(start)
        for group, lr in zip(o.param_groups, raw.detach().exp().tolist(), strict=True):
            group["lr"] = lr
        for b in window:
            o.zero_grad()
            train(m, None, b).backward()
            o.step()
        with torch.no_grad():
            return float(val(m, None, val_batch))

    return central_difference(f, raw, eps=1e-6)


def _rel_err(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


_MODES = [
    pytest.param("reverse", False, id="reverse"),  # (fixed: _HOOKS_BUG)
    pytest.param("reverse", True, id="reverse-checkpoint"),
    pytest.param("forward", False, id="forward"),  # (forward mode was right already)
]


# ----------------------------------------------------------------------------- gradient hooks in train_loss


def _clamped_activation_grad(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Gradient clipping of an activation, as in RNN / RL scripts: a hook on a tensor of the
    forward pass."""
    z = m[0](b[0])
    if z.requires_grad:
        z.register_hook(lambda g: g.clamp(-0.01, 0.01))
    return ((m[2](torch.tanh(z)) - b[1]) ** 2).mean()


@pytest.mark.parametrize("mode, ck", _MODES)
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
def test_activation_gradient_hook_in_train_loss_matches_central_differences(
    opt_name: str, mode: str, ck: bool
) -> None:
    data, val = _data(7)
    model = _mlp()
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, _clamped_activation_grad, _mse, 5, mode, ck)
    for b in data[:2]:
        hopt.step(b)
    start = copy.deepcopy((model, opt))
    for b in data[2:]:
        hopt.step(b)
    ref = _lr_fd(start, hp.raw, _clamped_activation_grad, _mse, data[2:], val)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the replay reproduces the real steps: no ReplayWarning)
        got, _ = hopt.hypergradient(val_batch=val)
    # the replay itself reproduces the real steps bit for bit (only the derivative was wrong)
    assert all(torch.equal(a, b) for a, b in zip(hopt.replayed_weights(), model.parameters(), strict=True))
    assert _rel_err(got[0], ref) < 1e-6, (got[0], ref)  # (bug: 4.5e-2 with Adam, 1.0e-3 with SGD)


class _Dann(nn.Module):
    """Domain-adversarial training (Ganin & Lempitsky 2015): a feature extractor, a task head,
    and a domain classifier behind a gradient-reversal layer, written as an identity module with
    a full backward hook (``grl="module"``) or as a hook on the features (``grl="tensor"``)."""

    def __init__(self, grl: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feat, self.head, self.disc = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
        self.grl_kind = grl
        self.grl = nn.Identity()
        if grl == "module":
            self.grl.register_full_backward_hook(lambda mod, gi, go: (-0.5 * gi[0],))

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.feat(x))

    def reversed(self, f: Tensor) -> Tensor:
        if self.grl_kind == "module":
            return self.grl(f)
        r = f * 1.0
        if r.requires_grad:
            r.register_hook(lambda g: -0.5 * g)
        return r


def _dann_train(m: _Dann, h: Any, b: Any) -> Tensor:
    f = m.features(b[0])
    return ((m.head(f) - b[1]) ** 2).mean() + ((m.disc(m.reversed(f)) - b[2]) ** 2).mean()


def _dann_val(m: _Dann, h: Any, b: Any) -> Tensor:  # the task loss only: no reversal in it
    return ((m.head(m.features(b[0])) - b[1]) ** 2).mean()


@pytest.mark.parametrize("grl", ["module", "tensor"])
@pytest.mark.parametrize("mode, ck", _MODES)
def test_gradient_reversal_layer_matches_central_differences(grl: str, mode: str, ck: bool) -> None:
    g = torch.Generator().manual_seed(3)
    data = [tuple(torch.randn(8, k, generator=g, dtype=DT) for k in (3, 1, 1)) for _ in range(4)]
    val = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
    model = _Dann(grl).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, _dann_train, _dann_val, 4, mode, ck)
    start = copy.deepcopy((model, opt))
    for b in data:
        hopt.step(b)
    if grl == "module" and mode == "forward":
        # forward-mode AD cannot go through a module's backward hooks: said, not a wrong number
        with pytest.raises(RuntimeError, match="mode='forward'.*PyTorch cannot push one through"):
            hopt.hypergradient(val_batch=val)
        return
    ref = _lr_fd(start, hp.raw, _dann_train, _dann_val, data, val)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = hopt.hypergradient(val_batch=val)
    # the hyperstep left the model's own hooks in force: the next real step still reverses
    plain = copy.deepcopy((model, opt))
    hopt.step(data[0])
    m, o = plain
    o.zero_grad()
    _dann_train(m, None, data[0]).backward()
    o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m.parameters(), strict=True))
    # (bug: 1.7e-2 off, module and tensor hook alike)
    assert _rel_err(got[0], ref) < 1e-6, (got[0], ref)


# ----------------------------------------------------------------------------- schedules


class _LrAndMomentum(nn.Module):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.lr = hg.hparams.LearningRate(opt, relative=True)
        self.mom = hg.hparams.Momentum(opt)


@pytest.mark.parametrize("mode, ck", [("reverse", False), ("reverse", True), ("forward", False)])
def test_scheduler_every_step_with_multiplier_and_momentum_truncated_window(mode: str, ck: bool) -> None:
    """An ExponentialLR stepped after every inner step, a learned multiplier on its rate and a
    learned momentum (SGD with dampening and weight decay), hypersteps every 3 steps over a
    window of K = 2 (the step before the window re-run with the old values): each hypergradient
    against central differences of plain torch.optim training with the scheduled rates."""
    data, val = _data(6)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.7, dampening=0.2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    hp = _LrAndMomentum(opt)
    hopt = _unrolled(model, hp, opt, _mse, _mse, 2, mode, ck)
    before = []
    checked = 0
    for i, b in enumerate(data):
        before.append(copy.deepcopy((model, opt, sched)))
        hopt.step(b)
        sched.step()
        if (i + 1) % 3:
            continue
        start, window = before[i - 1], data[i - 1 : i + 1]

        def f(start: Any = start, window: Any = window) -> float:
            m, o, s = copy.deepcopy(start)
            for wb in window:
                g = o.param_groups[0]
                base = g["lr"]
                g["lr"] = base * float(hp.lr.value[0])
                g["momentum"] = float(hp.mom.value[0])
                o.zero_grad()
                _mse(m, None, wb).backward()
                o.step()
                g["lr"] = base  # (the scheduler owns the rate)
                s.step()
            with torch.no_grad():
                return float(_mse(m, None, val))

        refs = [central_difference(f, h.raw, eps=1e-6) for h in (hp.lr, hp.mom)]
        info = hopt.hyper_step(val_batch=val)
        assert info.unrolled_steps == 2
        for h, ref in zip((hp.lr, hp.mom), refs, strict=True):
            torch.testing.assert_close(h.raw.grad, ref, rtol=1e-6, atol=1e-10)
        checked += 1
    assert checked == 2
    # the real steps followed the schedule (0.1 * 0.8^6 now), not the multiplier
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.8**6, rel=1e-12)


class _Schedule(nn.Module):
    """Maclaurin et al. (2015): one learning rate per inner step, as log-rates."""

    def __init__(self, n: int, lr: float) -> None:
        super().__init__()
        self.log = nn.Parameter(torch.full((n,), lr, dtype=DT).log())


_BASE_LR = 0.1


def _scheduled_loss(m: nn.Module, h: _Schedule, b: Any) -> Tensor:
    """Plain SGD at lr 0.1 on (lr_t / 0.1) * L: the step w - lr_t * grad L. The batch carries the
    step's index, so the replay reads the same entry of the schedule."""
    return h.log[b[2]].exp() / _BASE_LR * _mse(m, h, b)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_per_step_learning_rate_schedule_matches_a_hand_unrolled_reference(mode: str) -> None:
    data, val = _data(6)
    batches = [(x, y, torch.tensor(t)) for t, (x, y) in enumerate(data)]
    model = _mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=_BASE_LR)
    hp = _Schedule(len(batches), _BASE_LR)
    with torch.no_grad():
        hp.log.add_(torch.linspace(-0.3, 0.3, len(batches), dtype=DT))  # a non-constant schedule
    hopt = _unrolled(model, hp, opt, _scheduled_loss, _mse, len(batches), mode)
    for b in batches:
        hopt.step(b)
    got, _ = hopt.hypergradient(val_batch=val)

    # reference: w_{t+1} = w_t - lr_t * dL_t/dw_t, the graph kept, in plain autograd
    log = hp.log.detach().clone().requires_grad_(True)
    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    for t, (x, y, _) in enumerate(batches):
        loss = ((torch.func.functional_call(model, w, (x,)) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {n: p - log[t].exp() * g for (n, p), g in zip(w.items(), grads, strict=True)}
    out = ((torch.func.functional_call(model, w, (val[0],)) - val[1]) ** 2).mean()
    (ref,) = torch.autograd.grad(out, log)
    torch.testing.assert_close(got[0], ref, rtol=1e-10, atol=1e-14)
    assert float(ref.abs().min()) > 1e-5  # every step's rate matters


# ----------------------------------------------------------------------------- optimiser options


_OPTIONS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], float]] = {
    # (the optimiser over two param groups, the sign of the training loss)
    "sgd-maximize-dampening-decay": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.02, maximize=True),
        -1.0,
    ),
    "sgd-foreach-nesterov-decay": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.02, foreach=True),
        1.0,
    ),
    "adam-amsgrad-maximize-decay": (
        lambda g: torch.optim.Adam(g, lr=0.02, amsgrad=True, weight_decay=0.05, maximize=True),
        -1.0,
    ),
    "adamw-foreach-amsgrad": (
        lambda g: torch.optim.AdamW(g, lr=0.02, amsgrad=True, weight_decay=0.05, foreach=True),
        1.0,
    ),
}


@pytest.mark.parametrize("name", sorted(_OPTIONS))
def test_options_with_per_group_learning_rates_and_a_frozen_weight(name: str) -> None:
    """Two param groups with their own rates, the first holding a frozen bias (it stays in the
    optimiser, without a gradient): the replay ends bit for bit at the real weights and the
    per-group learning-rate hypergradient matches central differences; the frozen weight
    never moves."""
    make, sign = _OPTIONS[name]

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return sign * _mse(m, h, b)

    data, val = _data(6)
    model = _mlp()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    kept = frozen.detach().clone()
    opt = make([{"params": [model[0].weight, frozen]}, {"params": list(model[2].parameters()), "lr": 0.05}])
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, train, _mse, 4)
    for b in data[:2]:
        hopt.step(b)
    start = copy.deepcopy((model, opt))
    for b in data[2:]:
        hopt.step(b)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(hopt.replayed_weights(), trained, strict=True))
    ref = _lr_fd(start, hp.raw, train, _mse, data[2:], val)
    got, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-10)
    assert torch.equal(frozen, kept)


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam-amsgrad"])
def test_float32_weights_with_a_float64_learning_rate(name: str) -> None:
    """float32 weights, a float64 log-rate: the replay rounds as the float32 steps did (bit for
    bit), the hypergradient is float64, and forward and reverse mode agree to float32 rounding."""
    data, val = _data(6, dtype=torch.float32)
    grads = {}
    for mode in ("reverse", "forward"):
        model = _mlp(torch.float32)
        if name == "adam-amsgrad":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        hp = hg.hparams.LearningRate(opt, dtype=DT)
        assert hp.raw.dtype == DT
        hopt = _unrolled(model, hp, opt, _mse, _mse, 3, mode)
        for i, b in enumerate(data):
            hopt.step(b)
            if i == 2:
                hopt.hyper_step(val_batch=val)  # the later steps run with the moved rate
        assert all(
            torch.equal(a, b) for a, b in zip(hopt.replayed_weights(), model.parameters(), strict=True)
        )
        g, _ = hopt.hypergradient(val_batch=val)
        assert g[0].dtype == DT
        grads[mode] = g[0]
    torch.testing.assert_close(grads["reverse"], grads["forward"], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- unfreezing


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_unfreezing_a_layer_with_add_param_group_starts_an_episode_that_matches_fd(name: str) -> None:
    """Progressive unfreezing: the head trains from step 4 on (add_param_group with a rate of its
    own); the hyperstep differentiates the 4 steps since, with the momentum / moments the first
    layer carried in, against central differences of plain training from that point."""
    data, val = _data(7)
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.05)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h.penalty(m)

    for p in model[2].parameters():
        p.requires_grad_(False)
    if name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model[0].parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    hopt = _unrolled(model, hp, opt, train, _mse, 4)
    for b in data[:3]:
        hopt.step(b)
    for p in model[2].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.02})
    start = copy.deepcopy((model, opt, hp))
    for b in data[3:]:
        hopt.step(b)
    raw = next(iter(hp.parameters()))

    def f() -> float:
        m, o, h = copy.deepcopy(start)
        with torch.no_grad():
            next(iter(h.parameters())).copy_(raw)
        for b in data[3:]:
            o.zero_grad()
            train(m, h, b).backward()
            o.step()
        with torch.no_grad():
            return float(_mse(m, None, val))

    ref = central_difference(f, raw, eps=1e-6)
    got, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 4
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-12)
