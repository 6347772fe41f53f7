"""Round 20: learning-rate schedulers and optimiser-state dynamics in Unrolled's replay (and hg.optim).

What earlier rounds covered here: one ExponentialLR / StepLR stepped per inner step under a
learned lr multiplier with SGD (round 19), OneCycleLR / LambdaLR in a few research scripts, and
the replay's per-optimiser arithmetic without schedulers. This file checks, in float64:

- every ``torch.optim.lr_scheduler`` kind (StepLR, MultiStepLR, CosineAnnealingLR,
  CosineAnnealingWarmRestarts, OneCycleLR cycling SGD's momentum and Adam's beta1, CyclicLR with
  ``cycle_momentum``, LambdaLR, SequentialLR with a LinearLR warm-up, ChainedScheduler,
  ReduceLROnPlateau, LinearLR), stepped per batch or per "epoch" of two batches, on SGD
  (momentum, dampening, Nesterov, weight decay), Adam (coupled decay), AdamW (AMSGrad) and
  learning rates kept as tensors (which schedulers update in place), with a learned per-layer
  weight decay and a learned multiplier on the scheduled rate: Unrolled's hypergradient (reverse,
  forward, checkpointed) against an unrolled reference written here in plain autograd (SGD and
  Adam by hand, each step with the settings the real step had), and the replayed weights
  against the real ones, bit for bit;
- param groups edited by hand inside the window (betas and eps, Nesterov switched on, momentum
  switched off and on again over a stale buffer, ``maximize``, AMSGrad switched off, decoupled
  decay switched on, a learning rate replaced by a tensor) and optimiser state reset at a warm
  restart (``state.clear()``) or zeroed in place, against the same reference;
- settings other than lr tuned with ``OptimizerSetting`` on the other optimisers (eps, RMSprop's
  alpha and momentum, Adadelta's rho and eps, Adagrad's lr_decay, AdamW's and NAdam's decoupled
  weight decay, ASGD's lambd and lr, SGD's dampening, a relative weight decay), under a cosine
  schedule, against central differences of torch.optim itself;
- the one-node heavy-ball step (``_HeavyBall``, weights of >= 16384 entries) under OneCycleLR's
  momentum cycle, in all three modes, against the hand-written reference;
- hypersteps after every inner step (overlapping windows, each start re-run from a snapshot with
  the earlier hyperparameters and scheduled settings) under OneCycleLR, CyclicLR and warm
  restarts, each hypergradient against the reference;
- a checkpoint taken mid-window with a scheduler, a tensor learning rate and a learned multiplier,
  resumed into fresh objects: the hypergradients and weights equal the straight run's bit for bit;
- ``hg.optim.SGDHD`` / ``AdamHD`` under schedulers that cycle momentum / beta1, against a
  hand-written hypergradient-descent loop around torch's own SGD / Adam;
- Implicit after the inner optimiser's coupled weight_decay was raised by hand between steps
  (SGD, Adam, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam, ASGD with its lambd, SGDHD,
  AdamHD), against ridge regression's closed form at the optimum of the current objective.

Found (xfail, fix proposed): an absolute ``LearningRate`` / ``Momentum`` on a setting passed as a
tensor (``lr=torch.tensor(0.1)``, which torch.optim takes so that it can be changed in place)
replaces the tensor by a float at its first write; a later ``lr.fill_(...)`` by the user then no
longer reaches the optimiser and is silently overridden, although the class promises to raise
when a setting is changed outside hypergrad (it does for a scheduler writing the group).

Everything else here passes on the current code; the replay reproduced every scheduled step bit
for bit and every hypergradient matched its reference. (A
note for central differences: torch.optim.ASGD keeps its step size in the default dtype, float32,
even for float64 weights, and Adam with float32 tensor betas steps with a float32 step size: the
real training is then quantised in the learning rate, and central differences in it are noise;
the tests use float64 defaults and float learning rates there.)
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64
S = torch.optim.lr_scheduler


# ----------------------------------------------------------------------------- the problem


def _mlp(n_in: int = 3, hidden: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(DT)


def _data(n: int, n_in: int = 3, seed: int = 1) -> tuple[list[Any], Any]:
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(8, n_in, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
        for _ in range(n + 1)
    ]
    return batches[:n], batches[n]


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _train(m: nn.Module, h: Any, b: Any) -> Tensor:
    return _mse(m, h, b) + h.wd.penalty(m)


class _Decays(nn.Module):
    """A decay per layer only (no tuned optimiser setting: the replay's settings stay numbers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=1e-2)


class _HP(nn.Module):
    """A decay per layer (in the loss) and a learned multiplier on the (scheduled) learning rate."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        self.lr = hg.hparams.LearningRate(opt, relative=True)


def _unrolled(
    model: nn.Module,
    hp: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    mode: str,
    ck: bool,
    train: Callable[..., Tensor] = _train,
) -> hg.Unrolled:
    return hg.Unrolled(
        model,
        hp,
        train,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=steps,
        mode=mode,
        checkpoint=ck,
    )


# ----------------------------------------------------------------------------- the reference


def _number(x: Any) -> Any:
    if isinstance(x, Tensor):
        return float(x)
    if isinstance(x, (tuple, list)):
        return tuple(_number(v) for v in x)
    return x


def _settings(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The first param group's settings as the next step will read them (numbers)."""
    return {k: _number(v) for k, v in opt.param_groups[0].items() if k not in ("params", "param_names")}


def _sgd_ref(p: Tensor, g: Tensor, st: dict[str, Any], s: dict[str, Any], lr: Tensor) -> Tensor:
    """torch.optim.SGD's step, written out (differentiable in everything)."""
    d = -g if s["maximize"] else g
    if s["weight_decay"] != 0:
        d = d + s["weight_decay"] * p
    mom = s["momentum"]
    if mom != 0:  # (torch leaves a stale buffer alone while momentum is 0)
        buf = st.get("momentum_buffer")
        buf = d if buf is None else mom * buf + (1 - s["dampening"]) * d
        st["momentum_buffer"] = buf
        d = d + mom * buf if s["nesterov"] else buf
    return p - lr * d


def _adam_ref(p: Tensor, g: Tensor, st: dict[str, Any], s: dict[str, Any], lr: Tensor) -> Tensor:
    """torch.optim.Adam's (and AdamW's) step, written out."""
    beta1, beta2 = s["betas"]
    g = -g if s["maximize"] else g
    wd = s["weight_decay"]
    if wd != 0:
        if s.get("decoupled_weight_decay", False):
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    step = st.get("step", 0) + 1
    m = beta1 * st.get("exp_avg", torch.zeros_like(p)) + (1 - beta1) * g
    v = beta2 * st.get("exp_avg_sq", torch.zeros_like(p)) + (1 - beta2) * g * g
    st.update(step=step, exp_avg=m, exp_avg_sq=v)
    if s["amsgrad"]:
        vmax = st.get("max_exp_avg_sq")
        vmax = v if vmax is None else torch.maximum(vmax, v)
        st["max_exp_avg_sq"] = vmax
        v = vmax
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + s["eps"]
    return p - lr / (1 - beta1**step) * m / denom


def _state_copy(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Any]]:
    out = []
    for p in params:
        st = {}
        for k, v in opt.state.get(p, {}).items():
            st[k] = float(v) if k == "step" else v.detach().clone() if isinstance(v, Tensor) else v
        out.append(st)
    return out


def _layer_penalty(model: nn.Module, ws: dict[str, Tensor], raws: list[Tensor]) -> Tensor:
    """0.5 * sum over layers of exp(raw_layer) * |w|^2 (WeightDecay(per="layer"): one decay per
    module, weight and bias), from the names."""
    layers = sorted({n.split(".")[0] for n in ws}, key=int)
    total = torch.zeros((), dtype=DT)
    for n, w in ws.items():
        total = total + 0.5 * raws[layers.index(n.split(".")[0])].exp() * (w**2).sum()
    return total


class _Recorder:
    """Runs the real training and keeps, for each step, what the reference needs: the weights and
    the optimiser state before it, the group settings it read, and resets done to the state."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.weights: list[list[Tensor]] = []
        self.states: list[list[dict[str, Any]]] = []
        self.settings: list[dict[str, Any]] = []
        self.resets: list[str | None] = []

    def before(self, reset: str | None = None) -> None:
        self.weights.append([p.detach().clone() for p in self.params])
        self.states.append(_state_copy(self.opt, self.params))
        self.settings.append(_settings(self.opt))
        self.resets.append(reset)

    def reference(
        self, first: int, hp: _HP, batches: list[Any], val: Any, update: Callable[..., Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Hypergradient w.r.t. (wd.raw..., lr.raw) of L_V after the steps ``first:``, unrolled by
        hand from the real weights and state before step ``first``; and the final weights."""
        raws = [r.detach().clone().requires_grad_(True) for r in hp.wd.raw]
        tuned_lr = hasattr(hp, "lr")  # (else the scheduled rate as it is)
        lr_raw = (
            (hp.lr.raw if tuned_lr else torch.zeros(1, dtype=DT)).detach().clone().requires_grad_(tuned_lr)
        )
        ws = [w.clone().requires_grad_(True) for w in self.weights[first]]
        states = [dict(st) for st in self.states[first]]
        twin = copy.deepcopy(self.model)
        for i in range(first, len(batches)):
            if i > first and self.resets[i] == "clear":
                states = [{} for _ in ws]
            elif i > first and self.resets[i] == "zero":
                for st in states:
                    for k in ("exp_avg", "momentum_buffer"):
                        if k in st:
                            st[k] = torch.zeros_like(st[k])
            named = dict(zip(self.names, ws, strict=True))
            x, y = batches[i]
            out = torch.func.functional_call(twin, named, (x,))
            loss = ((out - y) ** 2).mean() + _layer_penalty(twin, named, raws)
            grads = torch.autograd.grad(loss, ws, create_graph=True)
            s = self.settings[i]
            lr = s["lr"] * lr_raw.exp()[0]
            ws = [update(p, g, st, s, lr) for p, g, st in zip(ws, grads, states, strict=True)]
        named = dict(zip(self.names, ws, strict=True))
        x, y = val
        lv = ((torch.func.functional_call(twin, named, (x,)) - y) ** 2).mean()
        return list(torch.autograd.grad(lv, [*raws, lr_raw] if tuned_lr else raws)), [w.detach() for w in ws]


def _check(
    hopt: hg.Unrolled,
    rec: _Recorder,
    first: int,
    hp: _HP,
    batches: list[Any],
    val: Any,
    update: Callable[..., Tensor],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)  # (a replay that did not reproduce warns)
        grads, info = hopt.hypergradient(val_batch=val)
        replayed = hopt.replayed_weights()
    assert info.unrolled_steps == len(batches) - first
    real = [p.detach() for p in rec.params]
    for r, w in zip(replayed, real, strict=True):
        assert torch.equal(r, w), "the replay did not reproduce the real steps bit for bit"
    ref, ref_w = rec.reference(first, hp, batches, val, update)
    for r, w in zip(ref_w, real, strict=True):  # (the reference reproduces them too, to rounding)
        torch.testing.assert_close(r, w, rtol=1e-11, atol=1e-13)
    got = torch.cat([g.reshape(-1) for g in grads])
    want = torch.cat([g.reshape(-1) for g in ref])
    assert want.abs().max() > 1e-6  # (something to compare)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11 * float(want.abs().max()))


# ----------------------------------------------------------------------------- schedulers x optimisers


def _has_momentum(o: torch.optim.Optimizer) -> bool:
    return float(o.defaults.get("momentum", 0.0)) > 0 or "betas" in o.defaults


_OPTIMIZERS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], Callable[..., Tensor]]] = {
    "sgd-momentum-dampening": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        _sgd_ref,
    ),
    "sgd-nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
        _sgd_ref,
    ),
    "sgd-tensor-lr": (lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1, dtype=DT), momentum=0.9), _sgd_ref),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2), _adam_ref),
    "adamw-amsgrad": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True), _adam_ref),
    "adam-tensor-lr": (lambda p: torch.optim.Adam(p, lr=torch.tensor([0.01], dtype=DT)), _adam_ref),
}

_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: S.StepLR(o, 2, 0.5),
    "multistep": lambda o: S.MultiStepLR(o, [1, 3], 0.3),
    "cosine": lambda o: S.CosineAnnealingLR(o, 4, eta_min=1e-3),
    "warm-restarts": lambda o: S.CosineAnnealingWarmRestarts(o, 2, 2),
    "onecycle": lambda o: S.OneCycleLR(
        o, max_lr=0.2 if isinstance(o, torch.optim.SGD) else 0.02, total_steps=20, cycle_momentum=True
    ),
    "cyclic-momentum": lambda o: S.CyclicLR(
        o,
        0.01,
        0.1,
        step_size_up=2,
        cycle_momentum=True,
        base_momentum=0.75 if isinstance(o, torch.optim.SGD) else 0.8,
    ),
    "lambda": lambda o: S.LambdaLR(o, lambda e: 1 / (1 + e)),
    "sequential-warmup": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, 1.0, 2), S.ExponentialLR(o, 0.9)], [2]
    ),
    "chained": lambda o: S.ChainedScheduler([S.ExponentialLR(o, 0.9), S.StepLR(o, 2, 0.5)]),
    "plateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "linear-warmup": lambda o: S.LinearLR(o, 0.1, 1.0, 5),
}


def _run_schedule(
    opt_name: str, sched_name: str, mode: str, ck: bool, every: int = 1, n: int = 6, k: int = 3
) -> None:
    make, update = _OPTIMIZERS[opt_name]
    batches, val = _data(n)
    model = _mlp()
    opt = make(model.parameters())
    sched = _SCHEDULERS[sched_name](opt)
    hp = _HP(model, opt)
    hopt = _unrolled(model, hp, opt, k, mode, ck)
    rec = _Recorder(model, opt)
    for i, b in enumerate(batches):
        rec.before()
        loss = hopt.step(b)
        if (i + 1) % every == 0:
            sched.step(float(loss)) if sched_name == "plateau" else sched.step()
    # the schedule did move the settings inside the window
    window = rec.settings[n - k :]
    assert len({s["lr"] for s in window}) > 1 or sched_name in ("step", "multistep", "plateau")
    _check(hopt, rec, n - k, hp, batches, val, update)


@pytest.mark.parametrize("sched_name", list(_SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(_OPTIMIZERS))
def test_every_scheduler_kind_per_batch_matches_a_hand_unrolled_reference(
    opt_name: str, sched_name: str
) -> None:
    """Reverse mode, the scheduler stepped after every inner step; momentum / beta1 cycled by
    OneCycleLR and CyclicLR too."""
    _run_schedule(opt_name, sched_name, "reverse", False)


@pytest.mark.parametrize("sched_name", ["onecycle", "cyclic-momentum", "plateau", "sequential-warmup"])
@pytest.mark.parametrize("opt_name", ["sgd-nesterov", "adamw-amsgrad", "adam-tensor-lr"])
@pytest.mark.parametrize("mode, ck", [("forward", False), ("reverse", True)], ids=["forward", "checkpoint"])
def test_schedulers_in_forward_and_checkpointed_modes(
    opt_name: str, sched_name: str, mode: str, ck: bool
) -> None:
    _run_schedule(opt_name, sched_name, mode, ck)


@pytest.mark.parametrize("sched_name", ["step", "onecycle", "warm-restarts", "plateau"])
@pytest.mark.parametrize("opt_name", ["sgd-momentum-dampening", "adam"])
def test_schedulers_stepped_per_epoch_of_two_batches(opt_name: str, sched_name: str) -> None:
    _run_schedule(opt_name, sched_name, "reverse", False, every=2, n=7, k=4)


@pytest.mark.parametrize(
    "mode, ck",
    [("reverse", False), ("reverse", True), ("forward", False)],
    ids=["reverse", "checkpoint", "forward"],
)
@pytest.mark.parametrize(
    "opt_name, sched_name",
    [("sgd-nesterov", "onecycle"), ("adamw-amsgrad", "cyclic-momentum"), ("adam-tensor-lr", "warm-restarts")],
)
def test_hypersteps_every_step_under_a_schedule_match_the_reference(
    opt_name: str, sched_name: str, mode: str, ck: bool
) -> None:
    """Overlapping windows: a hyperstep after every inner step (K = 3) moves the decays and the
    multiplier, so each window's start is re-run from a snapshot with the hyperparameters and
    the scheduled settings of those earlier steps. Each hypergradient against the reference
    unrolled from the real weights and state at the window's start (with the current
    hyperparameters, as the hypergradient is defined)."""
    make, update = _OPTIMIZERS[opt_name]
    n, k = 7, 3
    batches, val = _data(n)
    model = _mlp()
    opt = make(model.parameters())
    sched = _SCHEDULERS[sched_name](opt)
    hp = _HP(model, opt)
    hopt = hg.Unrolled(
        model,
        hp,
        _train,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        steps=k,
        mode=mode,
        checkpoint=ck,
    )
    rec = _Recorder(model, opt)
    checked = 0
    for i, b in enumerate(batches):
        rec.before()
        hopt.step(b)
        sched.step()
        if i + 1 < k:
            continue
        ref, _ = rec.reference(i + 1 - k, hp, batches[: i + 1], val, update)
        info = hopt.hyper_step(val_batch=val)
        assert info.unrolled_steps == k
        got = torch.cat([p.grad.reshape(-1) for p in hp.parameters() if p.grad is not None])
        want = torch.cat([g.reshape(-1) for g in ref])
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11 * float(want.abs().max()))
        checked += 1
    assert checked == n - k + 1
    assert float((hp.lr.raw.detach()).abs().max()) > 1e-2  # (the multiplier moved: old values re-run)


# ----------------------------------------------------------------------------- hand edits inside the window


def _edit_betas(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["betas"], g["eps"] = (0.5, 0.9), 1e-4
    return None


def _edit_nesterov(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["nesterov"], g["dampening"], g["weight_decay"] = True, 0.0, 0.05
    return None


def _edit_momentum_off_and_on(o: torch.optim.Optimizer, i: int) -> str | None:
    for g in o.param_groups:  # (torch keeps the stale buffer while momentum is 0, and reuses it)
        g["momentum"] = 0.0 if i in (3, 4) else 0.9
    return None


def _edit_maximize(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["maximize"] = True
    return None


def _edit_amsgrad_off(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["amsgrad"] = False
    return None


def _edit_decoupled(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["decoupled_weight_decay"], g["weight_decay"] = True, 0.1
    return None


def _edit_tensor_lr(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for g in o.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]) * 0.5, dtype=DT)
    return None


def _edit_clear(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:  # a warm restart that resets the optimiser as well
        o.state.clear()
        return "clear"
    return None


def _edit_zero(o: torch.optim.Optimizer, i: int) -> str | None:
    if i == 4:
        for st in o.state.values():
            for k in ("exp_avg", "momentum_buffer"):
                if k in st:
                    st[k].zero_()
        return "zero"
    return None


_EDITS = [
    ("adam-betas-eps", lambda p: torch.optim.Adam(p, lr=0.01), _adam_ref, _edit_betas, None),
    (
        "sgd-nesterov-on",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2),
        _sgd_ref,
        _edit_nesterov,
        None,
    ),
    (
        "sgd-momentum-off-on",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        _sgd_ref,
        _edit_momentum_off_and_on,
        None,
    ),
    ("sgd-maximize", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), _sgd_ref, _edit_maximize, None),
    ("adam-maximize", lambda p: torch.optim.Adam(p, lr=0.01), _adam_ref, _edit_maximize, None),
    (
        "adam-amsgrad-off",
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
        _adam_ref,
        _edit_amsgrad_off,
        None,
    ),
    ("adam-decoupled-on", lambda p: torch.optim.Adam(p, lr=0.01), _adam_ref, _edit_decoupled, None),
    ("adam-lr-to-tensor", lambda p: torch.optim.Adam(p, lr=0.01), _adam_ref, _edit_tensor_lr, "step"),
    (
        "adam-clear-at-restart",
        lambda p: torch.optim.Adam(p, lr=0.01),
        _adam_ref,
        _edit_clear,
        "warm-restarts",
    ),
    (
        "sgd-clear-at-restart",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        _sgd_ref,
        _edit_clear,
        "warm-restarts",
    ),
    ("adam-zeroed", lambda p: torch.optim.Adam(p, lr=0.01), _adam_ref, _edit_zero, "onecycle"),
    ("sgd-zeroed", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), _sgd_ref, _edit_zero, "cosine"),
]


@pytest.mark.parametrize("mode, ck", [("reverse", False), ("forward", False)], ids=["reverse", "forward"])
@pytest.mark.parametrize("name, make, update, edit, sched_name", _EDITS, ids=[e[0] for e in _EDITS])
def test_param_groups_and_state_edited_by_hand_inside_the_window(
    name: str, make: Any, update: Any, edit: Any, sched_name: str | None, mode: str, ck: bool
) -> None:
    """The edit comes before the window's third of four steps; the reference takes each step
    with the settings torch's step read, and a reset state as constants, as the real step did."""
    n, k = 6, 4
    batches, val = _data(n)
    model = _mlp()
    opt = make(model.parameters())
    sched = _SCHEDULERS[sched_name](opt) if sched_name else None
    hp = _HP(model, opt)
    hopt = _unrolled(model, hp, opt, k, mode, ck)
    rec = _Recorder(model, opt)
    for i, b in enumerate(batches):
        reset = edit(opt, i)
        rec.before(reset)
        hopt.step(b)
        if sched is not None:
            sched.step()
    _check(hopt, rec, n - k, hp, batches, val, update)


# ----------------------------------------------------------------------------- other settings tuned


_SETTINGS = [
    (
        "sgd-dampening",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3),
        "dampening",
        "unit",
        False,
    ),
    (
        "sgd-weight-decay-relative",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
        "weight_decay",
        "positive",
        True,
    ),
    ("adam-eps", lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3), "eps", "positive", False),
    (
        "adamw-weight-decay",
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        "weight_decay",
        "positive",
        False,
    ),
    (
        "rmsprop-alpha",
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, centered=True, momentum=0.3),
        "alpha",
        "unit",
        False,
    ),
    (
        "rmsprop-momentum",
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, centered=True, momentum=0.3),
        "momentum",
        "unit",
        False,
    ),
    (
        "adagrad-lr-decay",
        lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.1),
        "lr_decay",
        "positive",
        False,
    ),
    ("adadelta-rho", lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.9), "rho", "unit", False),
    ("adadelta-eps", lambda p: torch.optim.Adadelta(p, lr=1.0, eps=1e-4), "eps", "positive", False),
    (
        "nadam-decoupled-weight-decay",
        lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        "weight_decay",
        "positive",
        False,
    ),
    ("asgd-lambd", lambda p: torch.optim.ASGD(p, lr=0.05, lambd=0.01), "lambd", "positive", False),
    ("asgd-lr", lambda p: torch.optim.ASGD(p, lr=0.05, lambd=0.01, t0=2), "lr", "positive", False),
]


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("name, make, key, constraint, relative", _SETTINGS, ids=[c[0] for c in _SETTINGS])
def test_other_settings_tuned_under_a_scheduler_match_central_differences(
    name: str, make: Any, key: str, constraint: str, relative: bool, mode: str
) -> None:
    """An OptimizerSetting on a setting other than lr (or ASGD's lr, whose eta state carries it
    to the next step), with the lr scheduled by a CosineAnnealingLR stepped every inner step."""
    if name.startswith("asgd"):
        # torch.optim.ASGD keeps its step size eta in the default dtype (float32) and steps with
        # eta.item(): central differences of a float32-rounded eta are noise; float64 here
        default = torch.get_default_dtype()
        torch.set_default_dtype(DT)
        try:
            _other_setting(make, key, constraint, relative, mode)
        finally:
            torch.set_default_dtype(default)
    else:
        _other_setting(make, key, constraint, relative, mode)


def _other_setting(make: Any, key: str, constraint: str, relative: bool, mode: str) -> None:
    n, k = 5, 3
    batches, val = _data(n)
    model = _mlp()
    opt = make(model.parameters())
    sched = S.CosineAnnealingLR(opt, 6, eta_min=1e-3) if key != "lr" else None
    hp = hg.hparams.OptimizerSetting(opt, key, constraint, relative=relative)
    hopt = _unrolled(model, hp, opt, k, mode, False, train=_mse)
    before = []
    for b in batches:
        before.append(copy.deepcopy((model, opt, sched)))
        hopt.step(b)
        if sched is not None:
            sched.step()

    def f() -> float:
        m, o, s = copy.deepcopy(before[n - k])
        v = float(hp.value[0])
        for b in batches[n - k :]:
            g = o.param_groups[0]
            base = g[key]
            g[key] = float(base) * v if relative else v
            o.zero_grad()
            _mse(m, None, b).backward()
            o.step()
            if relative:
                g[key] = base
            if s is not None:
                s.step()
        with torch.no_grad():
            return float(_mse(m, None, val))

    ref = central_difference(f, hp.raw, eps=1e-6)
    grads, _ = hopt.hypergradient(val_batch=val)
    assert ref.abs().max() > 1e-6
    torch.testing.assert_close(grads[0], ref, rtol=2e-5, atol=1e-9)
    for r, w in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(r, w.detach())


# ----------------------------------------------------------------------------- the one-node heavy-ball step


@pytest.mark.parametrize(
    "mode, ck",
    [("reverse", False), ("reverse", True), ("forward", False)],
    ids=["reverse", "checkpoint", "forward"],
)
def test_heavy_ball_node_on_a_large_weight_under_onecycle_momentum(mode: str, ck: bool) -> None:
    """A 128 x 130 weight (16,640 entries: SGD's momentum step is then one autograd node,
    ``_HeavyBall``, since round 19), OneCycleLR cycling the momentum every step, dampening and
    weight decay: against the hand-written SGD. (Earlier tests of the node used no scheduler.)"""
    n, k = 5, 3
    batches, val = _data(n, n_in=130)
    model = _mlp(130, 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)
    sched = S.OneCycleLR(opt, 0.1, total_steps=20)
    hp = _Decays(model)  # (a tuned lr multiplier would make lr traced: off the node's path)
    hopt = _unrolled(model, hp, opt, k, mode, ck)
    rec = _Recorder(model, opt)
    for b in batches:
        rec.before()
        hopt.step(b)
        sched.step()
    assert len({s["momentum"] for s in rec.settings[n - k :]}) == k
    grads, _ = hopt.hypergradient(val_batch=val)
    for r, w in zip(hopt.replayed_weights(), rec.params, strict=True):
        assert torch.equal(r, w.detach())
    ref, _ = rec.reference(n - k, hp, batches, val, _sgd_ref)  # type: ignore[arg-type]
    got = torch.cat([g.reshape(-1) for g in grads])
    want = torch.cat([g.reshape(-1) for g in ref])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- resume mid-window


@pytest.mark.parametrize(
    "mode, ck",
    [("reverse", False), ("reverse", True), ("forward", False)],
    ids=["reverse", "checkpoint", "forward"],
)
@pytest.mark.parametrize(
    "opt_name, sched_name",
    [
        ("adam-tensor-lr", "onecycle"),
        ("sgd-tensor-lr", "plateau"),
        ("sgd-nesterov", "cyclic-momentum"),
    ],
)
def test_checkpoint_mid_window_with_a_scheduler_resumes_bit_for_bit(
    opt_name: str, sched_name: str, mode: str, ck: bool
) -> None:
    """Saved after step 4 of 9 (hypersteps after steps 3, 6, 9 over windows of 3, so the saved
    ring is mid-window), through torch.save / torch.load(weights_only=True), with the scheduler's
    own state_dict; the resumed run's hypergradients, weights and learning rates equal the
    straight run's exactly."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Any, _HP, hg.Unrolled]:
        model = _mlp()
        opt = _OPTIMIZERS[opt_name][0](model.parameters())
        sched = _SCHEDULERS[sched_name](opt)
        hp = _HP(model, opt)
        hopt = hg.Unrolled(
            model,
            hp,
            _train,
            _mse,
            inner_optimizer=opt,
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
            steps=3,
            mode=mode,
            checkpoint=ck,
        )
        return model, opt, sched, hp, hopt

    batches, val = _data(9)
    runs: dict[str, Any] = {"straight": build()}
    grads: dict[str, list[list[Tensor]]] = {"straight": [], "resumed": []}
    for i, b in enumerate(batches):
        for name, (_, _, sched, hp, hopt) in list(runs.items()):
            loss = hopt.step(b)
            sched.step(float(loss)) if sched_name == "plateau" else sched.step()
            if (i + 1) % 3 == 0:
                hopt.hyper_step(val_batch=val)
                grads[name].append([p.grad.clone() for p in hp.parameters()])
        if i + 1 == 4:
            _, _, sched, _, hopt = runs["straight"]
            buf = io.BytesIO()
            torch.save({"hopt": hopt.state_dict(), "sched": sched.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            runs["resumed"] = build()
            runs["resumed"][4].load_state_dict(saved["hopt"])
            runs["resumed"][2].load_state_dict(saved["sched"])
    assert len(grads["resumed"]) == 2
    for a, b in zip(grads["straight"][-2:], grads["resumed"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    (m1, o1, *_), (m2, o2, *_) = runs["straight"], runs["resumed"]
    for x, y in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(x, y)
    assert float(o1.param_groups[0]["lr"]) == float(o2.param_groups[0]["lr"])
    assert type(o1.param_groups[0]["lr"]) is type(o2.param_groups[0]["lr"])  # (a tensor lr stays one)


# ----------------------------------------------------------------------------- hypergradient descent


def _hd_reference(
    base: type, kw: dict[str, Any], beta: float, sched: Callable[..., Any], batches: list[Any]
) -> tuple[nn.Module, list[float]]:
    """Baydin et al.'s rule around torch's own optimiser: before each step,
    lr += beta * <g_t, d_{t-1}> (g the gradient torch's step uses, d_{t-1} the previous step's
    direction, read off the weights' move), clamped at 0; the scheduler acts on the result."""
    model = _mlp()
    opt = base(model.parameters(), **kw)
    s = sched(opt)
    params = list(model.parameters())
    prev: list[Tensor] | None = None
    lrs = []
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        g0 = opt.param_groups[0]
        eff = [p.grad + g0["weight_decay"] * p.detach() for p in params]
        if prev is not None:
            h = sum(float((a * d).sum()) for a, d in zip(eff, prev, strict=True))
            g0["lr"] = max(g0["lr"] + beta * h, 0.0)
        lr = g0["lr"]
        lrs.append(lr)
        before = [p.detach().clone() for p in params]
        opt.step()
        prev = [(b - p.detach()) / lr for b, p in zip(before, params, strict=True)] if lr > 0 else None
        s.step()
    return model, lrs


@pytest.mark.parametrize("sched_name", ["onecycle", "cyclic-momentum", "step"])
@pytest.mark.parametrize("kind", ["sgd-nesterov", "sgd-dampening", "adam"])
def test_hypergradient_descent_under_schedulers_that_cycle_momentum(kind: str, sched_name: str) -> None:
    """hg.optim.SGDHD / AdamHD with a scheduler that moves lr and momentum / beta1 between steps:
    the learning rates each step used and the weights against the hand-written rule (which
    reads each step's direction off torch's own step, so a direction computed with another
    step's momentum or betas would show)."""
    batches, _ = _data(10)
    hd: Any
    base: Any
    kw: dict[str, Any]
    if kind == "adam":
        hd, base, kw, beta = hg.optim.AdamHD, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01), 2e-4
    else:
        hd, base, beta = hg.optim.SGDHD, torch.optim.SGD, 5e-4
        kw = (
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
            if kind == "sgd-nesterov"
            else dict(lr=0.05, momentum=0.9, dampening=0.2)
        )
    sched = _SCHEDULERS[sched_name]
    ref_model, ref_lrs = _hd_reference(base, kw, beta, sched, batches)
    model = _mlp()
    opt = hd(model.parameters(), hypergrad_lr=beta, **kw)
    s = sched(opt)
    lrs = []
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])  # (the rate this step used, before the scheduler acts)
        s.step()
    assert lrs == pytest.approx(ref_lrs, rel=1e-10, abs=1e-15)
    assert len(set(ref_lrs)) > 3  # (the rule and the schedule both moved it)
    assert min(ref_lrs) > 0  # (the floor not reached: the reference reads each direction off a move)
    plain = _hd_reference(base, kw, 0.0, sched, batches)[1]
    assert max(abs(a - b) / b for a, b in zip(ref_lrs, plain, strict=True)) > 1e-3  # (HD moved it)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- a tensor setting replaced

_TENSOR_SETTING_BUG = (
    "an absolute OptimizerSetting replaces a tensor lr / momentum (lr=torch.tensor(...)) by a float at "
    "its first write, so later in-place changes to the user's tensor (lr.fill_, torch's idiom) are "
    "silently ignored instead of raising as a scheduler's changes do"
)


@pytest.mark.parametrize("which", ["lr", "momentum"])
def test_absolute_setting_refuses_a_change_made_through_the_users_tensor(which: str) -> None:
    """torch.optim takes ``lr=torch.tensor(...)`` so that the rate can be changed in place
    (``lr.fill_(...)``: a manual warm-down, a compiled step). An absolute LearningRate / Momentum
    owns the setting and promises to raise when it is changed outside hypergrad, rather than
    silently override it (as it does for a scheduler writing the group); here the change made
    through the user's tensor after the first step was silently dropped, the second step taken
    with the hyperparameter's old value."""
    batches, _ = _data(3)
    model = _mlp()
    lr, mom = torch.tensor(0.1, dtype=DT), torch.tensor(0.9, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom)  # type: ignore[arg-type]
    hp = hg.hparams.LearningRate(opt) if which == "lr" else hg.hparams.Momentum(opt)
    hopt = hg.Unrolled(
        model, hp, _mse, _mse, inner_optimizer=opt, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1)
    )
    hopt.step(batches[0])
    (lr if which == "lr" else mom).fill_(0.5)  # the user's change, through the tensor they passed
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="outside hypergrad"):
        hopt.step(batches[1])
    # (refused before anything moved)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_absolute_setting_on_a_tensor_lr_left_alone_trains_and_resumes() -> None:
    """The same tensor lr, not changed by the user: steps and a checkpoint round trip (which
    loads a float lr into the optimiser) go on without an error; the hyperparameter's value is
    the rate each step used (checked against plain SGD at that rate). (Guards the fix above
    against false alarms.)"""
    batches, val = _data(4)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1, dtype=DT))
    hp = hg.hparams.LearningRate(opt, init=0.05)
    hopt = hg.Unrolled(
        model, hp, _mse, _mse, inner_optimizer=opt, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0)
    )
    twin = copy.deepcopy(model)
    plain = torch.optim.SGD(twin.parameters(), lr=float(hp.value[0]))
    for b in batches[:2]:
        hopt.step(b)
        plain.zero_grad()
        _mse(twin, None, b).backward()
        plain.step()
    state = copy.deepcopy(hopt.state_dict())
    hopt.load_state_dict(state)
    for b in batches[2:]:
        hopt.step(b)
        plain.zero_grad()
        _mse(twin, None, b).backward()
        plain.step()
    for a, p in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, p, rtol=0, atol=1e-15)
    hopt.hyper_step(val_batch=val)


# ------------------------------------------------------------------------ Implicit: a decay edited by hand


_COUPLED = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, weight_decay=0.1, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01, weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01, weight_decay=0.1),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01, weight_decay=0.1, lambd=0.05),
    "sgdhd": lambda p: hg.optim.SGDHD(p, lr=0.05, momentum=0.9, weight_decay=0.1, hypergrad_lr=1e-4),
    "adamhd": lambda p: hg.optim.AdamHD(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(_COUPLED))
def test_implicit_reads_the_coupled_decay_the_user_changed_between_steps(name: str) -> None:
    """Ridge regression, a learned global decay lambda in train_loss, and the inner optimiser's own
    coupled weight_decay delta raised by hand from 0.1 to 0.3 between steps (and a cosine
    schedule on the lr): the weights then settle where grad L + (lambda + delta) w = 0 (ASGD:
    + lambd), so the hypergradient at that optimum (set exactly here) is the closed form
    -lambda g_v^T (A + (lambda + delta) I)^-1 w*, which CG must give."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(40, 1, generator=g, dtype=DT)
    xv, yv = torch.randn(30, 5, generator=g, dtype=DT), torch.randn(30, 1, generator=g, dtype=DT)
    model = nn.Linear(5, 1, bias=False).to(DT)
    opt = _COUPLED[name](model.parameters())
    sched = S.CosineAnnealingLR(opt, 10)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.2)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return 0.5 * ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    def val(m: nn.Module, h: Any, b: Any) -> Tensor:
        return 0.5 * ((m(b[0]) - b[1]) ** 2).mean()

    hopt = hg.Implicit(
        model,
        hp,
        train,
        val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-13),
    )
    for i in range(4):
        if i == 2:
            for group in opt.param_groups:
                group["weight_decay"] = 0.3
        hopt.step((x, y))
        sched.step()
    lam = float(hp.value)
    delta = 0.3 + (0.05 if name == "asgd" else 0.0)
    a, b = x.T @ x / len(x), x.T @ y / len(x)
    k = a + (lam + delta) * torch.eye(5, dtype=DT)
    w = torch.linalg.solve(k, b)
    with torch.no_grad():
        model.weight.copy_(w.T)
    gv = xv.T @ (xv @ w - yv) / len(xv)
    want = -lam * (gv.T @ torch.linalg.solve(k, w)).reshape(())
    hopt.start_episode()  # (weights set by hand: a new starting point, on purpose)
    (got,), info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert info.solver_status == "converged"
    torch.testing.assert_close(got.reshape(()), want, rtol=1e-8, atol=1e-14)
