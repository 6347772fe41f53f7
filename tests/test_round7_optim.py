"""Round 7: ``hypergrad.optim`` (SGDHD, AdamHD) and the differentiable replays of ``_inner.py``.

1. The replay of a ``torch.optim`` step is the real step bit for bit also with ``foreach=True``
   on complex weights with weight decay (the multi-tensor kernels take the real views *before*
   adding the L2 term), and with Adamax's foreach step under a tensor learning rate (which it
   reads as a Python number). Before the fix the replays were off in the last bits (Adam,
   RMSprop, Adagrad, Adamax, Adadelta) and by 5e-10 in float64 (Adamax, tensor lr).
2. The replay differentiated with respect to each setting (lr, momentum, dampening, weight
   decay, eps, both betas, ...) equals central differences of real ``torch.optim`` training in
   float64. NAdam's and RAdam's tuned ``beta2`` raised ``TypeError: addcmul(): argument 'value'
   must be Number, not Tensor`` before the fix.
3. SGDHD / AdamHD as torch.optim optimisers under the schedulers research scripts chain
   (SequentialLR, ChainedScheduler, ReduceLROnPlateau, CyclicLR and OneCycleLR cycling the
   momentum / beta1): optimiser + scheduler state resumes bit for bit in fresh objects, the
   hypergradient stays the derivative it claims to be while the scheduler moves beta1, and a
   ``GradScaler`` step skipped for an inf gradient leaves the rate and the state untouched.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hypergrad._inner import group_settings, snapshot_state, update_for
from hypergrad.optim import SGDHD, AdamHD

DT = torch.float64
O = torch.optim
Sched = torch.optim.lr_scheduler


# --------------------------------------------------------------------------------------------
# 1. replay == torch.optim, bit for bit


def _replay_matches_real(
    cls: type[O.Optimizer], kw: dict[str, Any], dtype: torch.dtype, steps: int = 4
) -> None:
    """Two param groups of two weights each; each step replayed from the recorded state with the
    group's recorded settings, then taken by torch; the weights must agree bit for bit."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(24, 17, generator=gen, dtype=dtype).requires_grad_() for _ in range(4)]
    lr = kw.pop("lr")
    opt = cls([{"params": weights[:2]}, {"params": weights[2:], "lr": lr * 0.5}], lr=lr, **kw)
    update = update_for(opt)
    for _ in range(steps):
        grads = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in weights]
        replayed: list[Tensor] = []
        for gi, group in enumerate(opt.param_groups):
            ws = list(group["params"])
            new, _ = update(
                [w.detach() for w in ws],
                grads[2 * gi : 2 * gi + 2],
                snapshot_state(opt, ws),
                group_settings(group),
            )
            replayed += new
        for w, g in zip(weights, grads, strict=True):
            w.grad = g.clone()
        opt.step()
        for w, r in zip(weights, replayed, strict=True):
            assert torch.equal(w.detach(), r), float((w.detach() - r).abs().max())


COMPLEX_FOREACH_L2 = [
    (O.Adam, dict(lr=0.01, weight_decay=0.1)),
    (O.Adam, dict(lr=0.01, weight_decay=0.1, maximize=True, amsgrad=True)),
    (O.AdamW, dict(lr=0.01, weight_decay=0.3)),
    (O.RMSprop, dict(lr=0.01, weight_decay=0.1)),
    (O.RMSprop, dict(lr=0.01, weight_decay=0.1, centered=True, momentum=0.5, maximize=True)),
    (O.Adagrad, dict(lr=0.1, weight_decay=0.1, lr_decay=0.1)),
    (O.Adamax, dict(lr=0.01, weight_decay=0.1)),
    (O.Adadelta, dict(lr=0.5, weight_decay=0.1, maximize=True)),
    (O.SGD, dict(lr=0.05, weight_decay=0.1, momentum=0.5)),
]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    ("cls", "kw"),
    COMPLEX_FOREACH_L2,
    ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(COMPLEX_FOREACH_L2)],
)
def test_foreach_replay_of_complex_weights_with_weight_decay_is_bitwise(
    cls: type[O.Optimizer], kw: dict[str, Any], dtype: torch.dtype
) -> None:
    # (before: 1.5e-8 off in complex64 and 1e-16 in complex128 from the first step: the replay
    # added the L2 term in complex arithmetic, as the single-tensor steps do)
    _replay_matches_real(cls, {**kw, "foreach": True}, dtype)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("cls", "kw"), COMPLEX_FOREACH_L2[:3], ids=["Adam-0", "Adam-1", "AdamW-2"])
def test_single_tensor_and_foreach_replays_of_complex_weights_both_stay_bitwise(
    cls: type[O.Optimizer], kw: dict[str, Any], foreach: bool
) -> None:
    _replay_matches_real(cls, {**kw, "foreach": foreach}, torch.complex64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_foreach_adamax_with_a_tensor_lr_replays_bitwise(dtype: torch.dtype) -> None:
    # (before: 5.3e-10 off in float64 at the first step; torch's foreach Adamax computes
    # lr / bias_correction in Python floats, its single-tensor one in the tensor's float32)
    _replay_matches_real(O.Adamax, dict(lr=torch.tensor(0.01), weight_decay=0.1, foreach=True), dtype)
    _replay_matches_real(O.Adamax, dict(lr=torch.tensor(0.01), foreach=False), dtype)


# --------------------------------------------------------------------------------------------
# 2. the replay's derivatives in each setting == central differences of real training


@pytest.fixture
def default_float64() -> Any:
    """Float64 default dtype, so that the optimisers' 0-dim state (ASGD's eta, NAdam's mu_product)
    is float64: in float32 it quantises real training's dependence on the setting."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(before)


_GEN = torch.Generator().manual_seed(1)
_M = torch.randn(6, 6, generator=_GEN, dtype=DT)
_A = _M @ _M.T / 6 + torch.eye(6, dtype=DT)


def _loss(w: Tensor) -> Tensor:
    """A smooth non-quadratic objective (its Hessian changes along the path)."""
    return 0.5 * w @ _A @ w + torch.log(torch.cosh(w - 1)).sum()


def _w0() -> Tensor:
    return torch.linspace(-1, 1, 6, dtype=DT)


def _with(kw: dict[str, Any], base: Any, name: str, idx: int | None, value: Any) -> dict[str, Any]:
    if idx is None:
        return {**kw, name: value}
    values = list(base)
    values[idx] = value
    return {**kw, name: tuple(values)}


def _real_training(cls: type[O.Optimizer], kw: dict[str, Any], steps: int) -> float:
    w = _w0().requires_grad_()
    opt = cls([w], **kw)
    for _ in range(steps):
        opt.zero_grad()
        _loss(w).backward()
        opt.step()
    return float(_loss(w.detach()))


SETTINGS: list[tuple[type[O.Optimizer], dict[str, Any], str, int | None]] = [
    (O.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1), "momentum", None),
    (O.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1), "weight_decay", None),
    (O.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3), "dampening", None),
    (O.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True), "lr", None),
    (O.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1, eps=1e-3), "lr", None),
    (O.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1, eps=1e-3), "eps", None),
    (O.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1, eps=1e-3), "betas", 0),
    (O.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1, eps=1e-3), "betas", 1),
    (O.AdamW, dict(lr=0.05, weight_decay=0.3), "weight_decay", None),
    (O.RMSprop, dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1, eps=1e-3), "alpha", None),
    (O.Adamax, dict(lr=0.05, weight_decay=0.1, eps=1e-3), "betas", 1),
    (O.NAdam, dict(lr=0.05, weight_decay=0.1), "betas", 0),
    (O.NAdam, dict(lr=0.05, weight_decay=0.1), "betas", 1),
    (O.RAdam, dict(lr=0.05, weight_decay=0.1), "betas", 1),
    (O.RAdam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True), "betas", 1),
    (O.ASGD, dict(lr=0.05, weight_decay=0.1, lambd=0.1, alpha=0.75), "alpha", None),
]


# (torch 2.13 loads its forward-AD decompositions with torch.jit.script, which warns)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize(
    ("cls", "kw", "name", "idx"),
    SETTINGS,
    ids=[f"{c.__name__}-{n}{'' if i is None else i}-{i2}" for i2, (c, _, n, i) in enumerate(SETTINGS)],
)
def test_replay_derivative_in_each_setting_matches_central_differences(
    cls: type[O.Optimizer], kw: dict[str, Any], name: str, idx: int | None, mode: str, default_float64: None
) -> None:
    steps = 7
    base = kw.get(name, cls([torch.zeros(1, requires_grad=True)]).defaults[name])
    v0 = float(base if idx is None else base[idx])

    def replay(value: Tensor) -> Tensor:
        w = _w0().requires_grad_()
        opt = cls([w], **kw)
        group = group_settings(opt.param_groups[0])
        group.update(_with({}, base, name, idx, value))
        update = update_for(opt)
        x, state = w.detach(), {}
        for _ in range(steps):
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_()
                (g,) = torch.autograd.grad(_loss(xg), xg, create_graph=True)
            (x,), (state,) = update([xg if x is xg else x], [g], [state], group)
        return _loss(x)

    if mode == "reverse":
        value = torch.tensor(v0, dtype=DT, requires_grad=True)
        (got,) = torch.autograd.grad(replay(value), value)
    else:  # forward mode: the tuned setting carries a tangent (no create_graph needed for it)
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            value = fwAD.make_dual(torch.tensor(v0, dtype=DT), torch.tensor(1.0, dtype=DT))
            got = fwAD.unpack_dual(replay(value)).tangent
    h = 1e-6 * min(v0, 1 - v0) if name == "betas" else 1e-6 * v0  # (RAdam's rho_inf ~ 1 / (1 - beta2))
    plus = _real_training(cls, _with(kw, base, name, idx, v0 + h), steps)
    minus = _real_training(cls, _with(kw, base, name, idx, v0 - h), steps)
    fd = (plus - minus) / (2 * h)
    assert abs(fd) > 1e-3  # the check has something to check
    assert float(got.detach()) == pytest.approx(fd, rel=1e-5)


# --------------------------------------------------------------------------------------------
# 3. SGDHD / AdamHD under schedulers, resumes and GradScaler


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


_X = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
_Y = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=DT)

SCHEDULERS: dict[str, Callable[[O.Optimizer], Any]] = {
    "sequential": lambda o: Sched.SequentialLR(
        o, [Sched.LinearLR(o, 0.5, 1.0, 3), Sched.ExponentialLR(o, 0.9)], milestones=[3]
    ),
    "chained": lambda o: Sched.ChainedScheduler([Sched.StepLR(o, 2, 0.5), Sched.ExponentialLR(o, 0.95)]),
    "plateau": lambda o: Sched.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "cyclic": lambda o: Sched.CyclicLR(o, 0.01, 0.1, step_size_up=3),  # cycles momentum / beta1
    "onecycle": lambda o: Sched.OneCycleLR(o, max_lr=0.1, total_steps=20),
}
MAKERS: dict[str, Callable[[Any], O.Optimizer]] = {
    "SGDHD": lambda p: SGDHD(p, lr=0.05, momentum=0.9, hypergrad_lr=1e-2),
    "AdamHD": lambda p: AdamHD(p, lr=0.01, hypergrad_lr=1e-4),
}


def _train(model: nn.Module, opt: O.Optimizer, sched: Any, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(_X) - _Y) ** 2).mean()
        loss.backward()
        opt.step()
        if isinstance(sched, Sched.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()


@pytest.mark.parametrize("opt_name", list(MAKERS))
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_optimizer_and_scheduler_resume_bitwise_in_fresh_objects(sched_name: str, opt_name: str) -> None:
    make_opt, make_sched = MAKERS[opt_name], SCHEDULERS[sched_name]
    model = _model()
    opt = make_opt(model.parameters())
    sched = make_sched(opt)
    _train(model, opt, sched, 10)

    first = _model()
    opt1 = make_opt(first.parameters())
    sched1 = make_sched(opt1)
    _train(first, opt1, sched1, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    second = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)  # other init
    second.load_state_dict(saved["model"])
    opt2 = make_opt(second.parameters())
    sched2 = make_sched(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _train(second, opt2, sched2, 5)

    assert [g["lr"] for g in opt.param_groups] != [0.05]  # tuned and scheduled
    for a, b in zip(model.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert [g["hypergrad"] for g in opt2.param_groups] == [g["hypergrad"] for g in opt.param_groups]
    if not isinstance(sched, Sched.ReduceLROnPlateau):
        assert sched2.get_last_lr() == sched.get_last_lr()


def _adamhd_onecycle(
    steps: int, last_lr: float | None = None
) -> tuple[nn.Module, AdamHD, list[tuple[float, float]]]:
    """AdamHD under OneCycleLR cycling beta1; returns the (lr, beta1) each step used. With
    ``last_lr`` the last step takes that rate untuned (with the beta1 the scheduler set for it)."""
    model = _model()
    opt = AdamHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    sched = Sched.OneCycleLR(opt, max_lr=0.05, total_steps=20, base_momentum=0.5, max_momentum=0.95)
    used = []
    for k in range(steps):
        if last_lr is not None and k == steps - 1:
            opt.param_groups[0].update(lr=last_lr, hypergrad_lr=0.0)
        opt.zero_grad()
        ((model(_X) - _Y) ** 2).mean().backward()
        opt.step()
        used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        sched.step()  # sets the next step's lr outright, and its beta1
    return model, opt, used


def _objective(model: nn.Module) -> float:
    with torch.no_grad():
        return float(((model(_X) - _Y) ** 2).mean())


def test_adamhd_hypergradient_is_the_derivative_while_onecycle_cycles_beta1() -> None:
    """-h_{t+1} = ∂F(θ_t)/∂α_t (central differences through torch's step t) although OneCycleLR
    gives every step another beta1: d_t must be formed with step t's beta1."""
    t = 6
    _, opt, used = _adamhd_onecycle(t + 1)
    h = opt.param_groups[0]["hypergrad"]  # from ∇F(θ_t) and d_t
    alpha_t, beta_t = used[t - 1]
    assert beta_t != used[t][1]  # beta1 really changed between steps t and t+1
    assert _objective(_adamhd_onecycle(t, last_lr=alpha_t)[0]) == _objective(_adamhd_onecycle(t)[0])
    delta = 1e-5 * alpha_t
    plus = _objective(_adamhd_onecycle(t, last_lr=alpha_t + delta)[0])
    minus = _objective(_adamhd_onecycle(t, last_lr=alpha_t - delta)[0])
    derivative = (plus - minus) / (2 * delta)
    assert abs(h) > 1e-2
    assert -h == pytest.approx(derivative, rel=1e-6)


@pytest.mark.parametrize("opt_name", list(MAKERS))
def test_grad_scaler_skips_an_inf_step_without_touching_rate_or_state(opt_name: str) -> None:
    make_opt = MAKERS[opt_name]
    plain_model, scaled_model = _model().float(), _model().float()
    plain, scaled = make_opt(plain_model.parameters()), make_opt(scaled_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = _X.float(), _Y.float()
    for k in range(4):
        plain.zero_grad()
        ((plain_model(x) - y) ** 2).mean().backward()
        plain.step()
        scaled.zero_grad()
        scaler.scale(((scaled_model(x) - y) ** 2).mean()).backward()
        scaler.step(scaled)
        scaler.update()
        if k == 2:  # a step with an inf gradient: GradScaler skips it
            before = copy.deepcopy(scaled.state_dict())
            weights = [p.detach().clone() for p in scaled_model.parameters()]
            scaled.zero_grad()
            scaler.scale(((scaled_model(x) - y) ** 2).mean() * float("inf")).backward()
            scaler.step(scaled)
            scaler.update()
            assert scaled.state_dict()["param_groups"] == before["param_groups"]
            for key, st in scaled.state_dict()["state"].items():
                for name, value in st.items():
                    assert torch.equal(value, before["state"][key][name])
            assert all(torch.equal(a, b) for a, b in zip(weights, scaled_model.parameters(), strict=True))
    # unscaling by a power of two is exact: the tuned rate and the weights are the plain run's
    assert scaled.param_groups[0]["lr"] == plain.param_groups[0]["lr"] != 0.05
    for a, b in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        (SGDHD, "momentum", torch.tensor(0.9)),
        (SGDHD, "dampening", torch.tensor(0.1)),
        (SGDHD, "weight_decay", torch.tensor(0.1)),
        (AdamHD, "betas", (torch.tensor(0.9), 0.99)),
        (AdamHD, "eps", torch.tensor(1e-8)),
        (AdamHD, "weight_decay", torch.tensor(0.1)),
    ],
)
def test_add_param_group_refuses_the_tensor_settings_the_constructor_refuses(
    cls: type[Any], name: str, value: Any
) -> None:
    # (before: the constructor refused them but add_param_group took them silently; the message
    # also printed a 0-dim Tensor as a plain number, "got a Tensor: 0.8999999761581421")
    w, v = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(
        ValueError, match=rf"{cls.__name__} needs Python numbers for {name}, got a Tensor: \(?tensor"
    ):
        cls([w], lr=0.1, **{name: value})
    opt = cls([w], lr=0.1)
    with pytest.raises(
        ValueError, match=rf"{cls.__name__} needs Python numbers for {name}, got a Tensor: \(?tensor"
    ):
        opt.add_param_group({"params": [v], name: value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [v], name: _number(value)})  # the same values as numbers: fine
    assert len(opt.param_groups) == 2


def _number(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, tuple) else float(value)
