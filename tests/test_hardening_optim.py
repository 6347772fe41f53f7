"""Hardening of hypergrad.optim (SGDHD, AdamHD) as a first-class ``torch.optim.Optimizer``.

The hypergradient each optimiser logs is checked against the derivative it claims to be, by
finite differences of the real objective through torch's own step (not against a re-derivation of
the same formula); then the torch.optim contract the way PyTorch's optimizer tests use it. Each
test that guards a fixed bug names what a user saw before the fix.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hypergrad.optim import SGDHD, AdamHD

DT = torch.float64


def _problem() -> tuple[Tensor, Tensor, Tensor]:
    """A non-quadratic smooth objective's data: A (6x6 SPD), b, and a start θ0 (float64)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DT))
    a = q @ torch.diag(torch.linspace(1.0, 4.0, 6, dtype=DT)) @ q.T
    return 0.5 * (a + a.T), torch.randn(6, generator=gen, dtype=DT), torch.randn(6, generator=gen, dtype=DT)


A, B, THETA0 = _problem()


def _f(theta: Tensor) -> Tensor:
    """½θᵀAθ − bᵀθ + Σ log cosh θ: smooth, not quadratic (its Hessian changes along the path)."""
    return 0.5 * theta @ (A @ theta) - B @ theta + torch.log(torch.cosh(theta)).sum()


def _params() -> list[Tensor]:
    """θ0 split into two tensors (a 2x2 matrix and a 2-vector) for group 0 and a 2-vector for group 1."""
    return [
        THETA0[:4].reshape(2, 2).clone().requires_grad_(),
        THETA0[4:].clone().requires_grad_(),
    ]


def _objective(params: list[Tensor], kwargs: dict[str, Any]) -> Tensor:
    """F, the objective the optimiser minimises: f (as minimised, or -f maximised) plus ½λ‖θ‖²."""
    theta = torch.cat([p.reshape(-1) for p in params])
    return _f(theta) + 0.5 * kwargs.get("weight_decay", 0.0) * (theta @ theta)


def _run(
    cls: type[Any], kwargs: dict[str, Any], steps: int, last_lr: tuple[float, float] | None = None
) -> tuple[list[Tensor], Any]:
    """``steps`` steps on f from θ0 (two groups); with ``last_lr`` the last step uses those rates, untuned."""
    params = _params()
    hd = kwargs.pop("hypergrad_lr")
    groups = [{"params": params[:1], "hypergrad_lr": hd}, {"params": params[1:], "hypergrad_lr": hd / 2}]
    opt = cls(groups, **kwargs)
    kwargs["hypergrad_lr"] = hd
    for k in range(steps):
        if last_lr is not None and k == steps - 1:
            for group, lr in zip(opt.param_groups, last_lr, strict=True):
                group["lr"], group["hypergrad_lr"] = lr, 0.0
        opt.zero_grad()
        theta = torch.cat([p.reshape(-1) for p in params])
        (-_f(theta) if kwargs.get("maximize", False) else _f(theta)).backward()  # maximize -f
        opt.step()
    return params, opt


FD_CASES: list[tuple[type[Any], dict[str, Any]]] = [
    (SGDHD, {"lr": 0.05, "hypergrad_lr": 1e-3}),
    (SGDHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "momentum": 0.8, "dampening": 0.3}),
    (SGDHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "momentum": 0.7, "nesterov": True, "weight_decay": 0.2}),
    (SGDHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    (AdamHD, {"lr": 0.05, "hypergrad_lr": 1e-3}),
    (AdamHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "weight_decay": 0.2, "betas": (0.8, 0.95)}),
    (AdamHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "amsgrad": True, "betas": (0.5, 0.6)}),
    (AdamHD, {"lr": 0.05, "hypergrad_lr": 1e-3, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    FD_CASES,
    ids=[
        f"{c.__name__}-" + ",".join(f"{k}={v}" for k, v in kw.items() if k != "hypergrad_lr")
        for c, kw in FD_CASES
    ],
)
def test_logged_hypergradient_is_the_finite_difference_derivative(
    cls: type[Any], kwargs: dict[str, Any], foreach: bool
) -> None:
    """-h_{t+1} = ∂F(θ_t)/∂α_t, by central differences of F through torch's own step t."""
    kwargs = {**kwargs, "foreach": foreach}
    t = 6
    _, opt = _run(cls, dict(kwargs), t + 1)
    h = [g["hypergrad"] for g in opt.param_groups]  # computed at step t+1 from ∇F(θ_t) and d_t
    _, opt_t = _run(cls, dict(kwargs), t)
    alphas = [g["lr"] for g in opt_t.param_groups]  # the α_t that step t used
    assert all(a != kwargs["lr"] for a in alphas)  # the rates really were tuned
    for i in range(2):
        delta = 1e-5 * alphas[i]
        values = []
        for sign in (1.0, -1.0):
            lrs = list(alphas)
            lrs[i] += sign * delta
            params, _ = _run(cls, dict(kwargs), t, last_lr=(lrs[0], lrs[1]))
            values.append(_objective(params, kwargs).item())
        derivative = (values[0] - values[1]) / (2 * delta)
        assert abs(h[i]) > 1e-3  # not a trivially zero hypergradient
        assert -h[i] == pytest.approx(derivative, rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------------------------
# a hand-written float64 reference loop: two groups with different settings, a parameter that
# sits out some steps, AMSGrad, maximize

GradFn = Callable[[int, int, Tensor], "Tensor | None"]


def _reference_loop(
    kind: str, groups: list[dict[str, Any]], grad_fn: GradFn, thetas: list[Tensor], steps: int
) -> tuple[list[list[float]], list[Tensor]]:
    """SGD-HD / Adam-HD written out per parameter, independently of torch.optim (floor 0 only)."""
    thetas = [t.clone() for t in thetas]
    state: list[dict[str, Any]] = [{} for _ in thetas]
    lrs = [float(g["lr"]) for g in groups]
    trace = []
    for t in range(steps):
        raw = [grad_fn(t, i, theta) for i, theta in enumerate(thetas)]  # all at θ_{t-1}
        for gi, group in enumerate(groups):
            effective = {}
            for i in group["idx"]:
                g = raw[i]
                if g is not None:
                    g = -g if group.get("maximize", False) else g
                    effective[i] = g + group.get("weight_decay", 0.0) * thetas[i]
            h = sum(float(g @ state[i]["d"]) for i, g in effective.items() if "d" in state[i])
            lrs[gi] = max(lrs[gi] + group["hypergrad_lr"] * h, 0.0)
            for i, g in effective.items():
                s = state[i]
                if kind == "sgd":
                    mu = group.get("momentum", 0.0)
                    s["b"] = g if "b" not in s else mu * s["b"] + (1 - group.get("dampening", 0.0)) * g
                    d = g + mu * s["b"] if group.get("nesterov", False) else s["b"]
                else:
                    b1, b2 = group.get("betas", (0.9, 0.999))
                    s["k"] = s.get("k", 0) + 1
                    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
                    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
                    v = s["v"]
                    if group.get("amsgrad", False):
                        s["vmax"] = v if "vmax" not in s else torch.maximum(s["vmax"], v)
                        v = s["vmax"]
                    d = (s["m"] / (1 - b1 ** s["k"])) / (torch.sqrt(v / (1 - b2 ** s["k"])) + 1e-8)
                thetas[i] = thetas[i] - lrs[gi] * d
                s["d"] = d
            for i in group["idx"]:
                if i not in effective:
                    state[i].pop("d", None)  # it did not move: no derivative through it
        trace.append(list(lrs))
    return trace, thetas


REFERENCE_GROUPS: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "sgd",
        [
            {"idx": [0, 1], "lr": 0.05, "hypergrad_lr": 2e-3, "momentum": 0.8, "nesterov": True},
            {
                "idx": [2],
                "lr": 0.02,
                "hypergrad_lr": 5e-3,
                "momentum": 0.6,
                "dampening": 0.4,
                "weight_decay": 0.1,
            },
        ],
    ),
    (
        "adam",
        [
            {"idx": [0, 1], "lr": 0.03, "hypergrad_lr": 1e-3, "amsgrad": True, "betas": (0.7, 0.8)},
            {"idx": [2], "lr": 0.01, "hypergrad_lr": 2e-3, "weight_decay": 0.2, "maximize": True},
        ],
    ),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("kind", "groups"), REFERENCE_GROUPS, ids=[k for k, _ in REFERENCE_GROUPS])
def test_groups_with_different_settings_and_absent_grads_match_a_reference_loop(
    kind: str, groups: list[dict[str, Any]], foreach: bool
) -> None:
    gen = torch.Generator().manual_seed(3)
    thetas0 = [torch.randn(3, generator=gen, dtype=DT) for _ in range(3)]
    targets = torch.randn(14, 3, generator=gen, dtype=DT)
    steps = 14

    def grad_fn(t: int, i: int, theta: Tensor) -> Tensor | None:
        if i == 1 and t in (4, 5):  # parameter 1 sits out two steps (grad None)
            return None
        sign = -1.0 if kind == "adam" and i == 2 else 1.0  # Adam's group 1 maximises −f
        return sign * (torch.tanh(theta) + theta - (i + 1) * targets[t])  # ∇(Σ log cosh θ + ½θ² − c·θ)

    ref_trace, ref_thetas = _reference_loop(kind, groups, grad_fn, thetas0, steps)
    params = [t.clone().requires_grad_() for t in thetas0]
    cls = SGDHD if kind == "sgd" else AdamHD
    opt = cls(
        [
            {"params": [params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"}}
            for g in groups
        ],
        foreach=foreach,
    )
    trace = []
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = grad_fn(t, i, p.detach())
        opt.step()
        trace.append([g["lr"] for g in opt.param_groups])
    assert all(abs(lr - g["lr"]) > 0.05 * g["lr"] for lr, g in zip(ref_trace[-1], groups, strict=True))
    np.testing.assert_allclose(trace, ref_trace, rtol=1e-12, atol=0)
    for p, ref in zip(params, ref_thetas, strict=True):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# AMSGrad (torch.optim.Adam's option; it used to be refused)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_amsgrad_with_zero_hypergrad_lr_is_bitwise_torch_adam(dtype: torch.dtype, foreach: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, generator=gen, dtype=dtype)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    kwargs: dict[str, Any] = {
        "lr": 0.1,
        "amsgrad": True,
        "weight_decay": 0.1,
        "betas": (0.8, 0.9),
        "foreach": foreach,
    }
    ref, hd = torch.optim.Adam([a], **kwargs), AdamHD([b], hypergrad_lr=0.0, **kwargs)
    for t in range(10):
        scale = 1.0 + 0.9 * math.sin(t)  # gradients that shrink and grow, so the running max matters
        for p, opt in ((a, ref), (b, hd)):
            opt.zero_grad()
            (scale * p.abs().pow(2).sum()).backward()
            opt.step()
        assert torch.equal(a, b)
    state = hd.state[b]
    assert not torch.equal(state["max_exp_avg_sq"], state["exp_avg_sq"])  # the max is in use
    assert hd.param_groups[0]["hypergrad"] != 0.0


def test_amsgrad_state_dict_resume_is_bitwise() -> None:
    def fresh() -> tuple[list[Tensor], AdamHD]:
        params = _params()
        return params, AdamHD(params, lr=0.05, amsgrad=True, betas=(0.5, 0.6), hypergrad_lr=1e-3)

    def steps(params: list[Tensor], opt: AdamHD, ts: range) -> None:
        for t in ts:
            opt.zero_grad()
            ((1.0 + 0.5 * math.cos(t)) * _f(torch.cat([p.reshape(-1) for p in params]))).backward()
            opt.step()

    full_params, full = fresh()
    steps(full_params, full, range(10))
    params_a, opt_a = fresh()
    steps(params_a, opt_a, range(4))
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    params_b = [p.detach().clone().requires_grad_() for p in params_a]
    opt_b = AdamHD(params_b)  # defaults everywhere: the saved groups must win (amsgrad included)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt_b.param_groups[0]["amsgrad"] is True
    steps(params_b, opt_b, range(4, 10))
    for p, q in zip(full_params, params_b, strict=True):
        assert torch.equal(p, q)
    assert opt_b.param_groups[0]["lr"] == full.param_groups[0]["lr"]


# --------------------------------------------------------------------------------------------
# group values edited after construction


def test_numpy_float32_hypergrad_lr_keeps_the_rate_a_python_float() -> None:
    # Before: a NumPy float32 hypergrad_lr (accepted as a real number) made every later lr a
    # np.float32, so the rate was silently accumulated in single precision.
    w = torch.ones(3, dtype=DT, requires_grad=True)
    v = torch.ones(3, dtype=DT, requires_grad=True)
    opt = SGDHD([{"params": [w], "hypergrad_lr": np.float32(0.01)}], lr=0.1)
    ref = SGDHD([v], lr=0.1, hypergrad_lr=float(np.float32(0.01)))
    for _ in range(5):
        for p, o in ((w, opt), (v, ref)):
            o.zero_grad()
            (p**2).sum().backward()
            o.step()
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and type(group["hypergrad_lr"]) is float
    assert group["lr"] == ref.param_groups[0]["lr"] != 0.1
    group["hypergrad_lr"] = np.float32(0.01)  # edited later: still double precision
    opt.zero_grad()
    (w**2).sum().backward()
    opt.step()
    assert type(group["lr"]) is float


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hypergrad_lr", -1e-3, "Invalid hypergrad_lr: -0.001"),
        ("hypergrad_lr", float("nan"), "Invalid hypergrad_lr: nan"),
        ("lr", torch.tensor(0.1), "needs a Python float learning rate"),
    ],
)
def test_group_values_edited_to_invalid_ones_are_refused_at_step(
    cls: type[Any], key: str, value: object, message: str
) -> None:
    # Before: a negative hypergrad_lr was used as is (the rate then climbs *up* the objective's
    # hypergradient) and a Tensor lr was silently replaced by a float copy, cutting it off from
    # whoever held the tensor.
    w = torch.ones(2, dtype=DT, requires_grad=True)
    opt = cls([w], lr=0.1, hypergrad_lr=1e-3)
    w.grad = torch.ones(2, dtype=DT)
    opt.step()
    before, group = w.detach().clone(), opt.param_groups[0]
    lr, saved = group["lr"], group[key]
    group[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.step()
    assert torch.equal(w, before) and group[key] is value
    group[key] = saved
    assert group["lr"] == lr
    opt.step()  # fine again
    assert not torch.equal(w, before)


# --------------------------------------------------------------------------------------------
# construction: torch's errors and warnings, plus an optimiser with nothing in it


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_construction_errors_match_torch(cls: type[Any]) -> None:
    p, q = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])
    # torch accepts this; an optimiser whose every group is empty tunes nothing: refused
    with pytest.raises(ValueError, match=f"{cls.__name__} got an empty parameter list"):
        cls([{"params": []}, {"params": [], "lr": 0.1}])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": [p]}, {"params": [p]}])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        cls([p, p])
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        cls(p)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        cls([p * 2])
    # an empty group beside a full one is harmless (e.g. a "no decay" group of a model without biases)
    opt = cls([{"params": [p]}, {"params": [], "weight_decay": 0.0}])
    opt.add_param_group({"params": []})
    p.grad = torch.ones(2)
    opt.step()
    opt.step()
    assert [g["hypergrad"] for g in opt.param_groups][1:] == [0.0, 0.0]
    named = cls([("w", p), ("v", q)])
    assert named.param_groups[0]["param_names"] == ["w", "v"]


# --------------------------------------------------------------------------------------------
# the torch.optim contract as PyTorch's own optimizer tests use it

CONTRACT_CASES: list[tuple[type[Any], dict[str, Any], dict[str, Any]]] = [
    (
        SGDHD,
        {"lr": 0.02, "momentum": 0.9, "nesterov": True, "hypergrad_lr": 1e-3},
        {"momentum": 0.5, "dampening": 0.5},
    ),
    (SGDHD, {"lr": 0.02, "weight_decay": 0.1, "maximize": True, "hypergrad_lr": 1e-3}, {"hypergrad_lr": 0.0}),
    (AdamHD, {"lr": 0.01, "amsgrad": True, "hypergrad_lr": 1e-3}, {"weight_decay": 0.1, "lr": 0.02}),
]


def _contract_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _contract_run(model: nn.Module, opt: Any, ts: range) -> list[Tensor]:
    gen = torch.Generator().manual_seed(11)
    batches = [
        (torch.randn(8, 5, generator=gen, dtype=DT), torch.randn(8, 2, generator=gen, dtype=DT))
        for _ in range(12)
    ]
    losses = []
    for t in ts:
        x, y = batches[t]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()  # set_to_none: the unused parameter keeps grad None
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).detach())
    return losses


@pytest.mark.parametrize(
    ("cls", "kwargs", "second"), CONTRACT_CASES, ids=["sgd-nesterov", "sgd-maximize", "adam-amsgrad"]
)
def test_state_dict_round_trip_into_a_fresh_optimizer_continues_bitwise(
    cls: type[Any], kwargs: dict[str, Any], second: dict[str, Any]
) -> None:
    def make() -> tuple[nn.Module, nn.Parameter, Any]:
        model = _contract_model()
        unused = nn.Parameter(torch.ones(3, dtype=DT))  # never reached by the loss: grad None
        groups = [{"params": model[0].parameters()}, {"params": [*model[2].parameters(), unused], **second}]
        return model, unused, cls(groups, **kwargs)

    model_full, _, opt_full = make()
    losses_full = _contract_run(model_full, opt_full, range(10))
    model_a, _, opt_a = make()
    _contract_run(model_a, opt_a, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, unused_b, opt_b = make()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.state_dict()["param_groups"] == opt_a.state_dict()["param_groups"]  # deterministic
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    losses_b = _contract_run(model_b, opt_b, range(4, 10))
    assert all(torch.equal(a, b) for a, b in zip(losses_full[4:], losses_b, strict=True))
    for p, q in zip(model_full.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_full.param_groups]
    assert unused_b not in opt_b.state and torch.equal(unused_b, torch.ones(3, dtype=DT))
    moved = [g["lr"] != kwargs.get("lr") for g in opt_full.param_groups]
    assert moved[0]


@pytest.mark.parametrize(
    ("cls", "kwargs", "second"), CONTRACT_CASES, ids=["sgd-nesterov", "sgd-maximize", "adam-amsgrad"]
)
def test_older_state_dict_without_flags_and_with_float_steps_loads_and_steps(
    cls: type[Any], kwargs: dict[str, Any], second: dict[str, Any]
) -> None:
    model = _contract_model()
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}], **kwargs)
    _contract_run(model, opt, range(3))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in (
            "foreach",
            "fused",
            "differentiable",
            "capturable",
            "maximize",
            "hypergrad",
            "lr_min",
            "lr_max",
        ):
            group.pop(flag, None)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    other = _contract_model()
    other.load_state_dict(model.state_dict())
    loaded = cls([{"params": other[0].parameters()}, {"params": other[2].parameters()}], **kwargs)
    loaded.load_state_dict(old)
    losses = _contract_run(other, loaded, range(3, 6))
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(g["lr"] > 0 and isinstance(g["hypergrad"], float) for g in loaded.param_groups)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_every_hook_runs_once(cls: type[Any]) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    for base in (torch.optim.SGD, torch.optim.Adam):  # wraps the parents' step with the hook runner
        base([torch.zeros(1, requires_grad=True)])
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = cls([w], lr=0.1, hypergrad_lr=1e-3)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: calls.append("global-pre")),
        register_optimizer_step_post_hook(lambda *_: calls.append("global-post")),
        opt.register_step_pre_hook(lambda *_: calls.append("pre")),
        opt.register_step_post_hook(lambda *_: calls.append("post")),
        opt.register_state_dict_pre_hook(lambda *_: calls.append("sd-pre")),
        opt.register_state_dict_post_hook(lambda *_: calls.append("sd-post")),
        opt.register_load_state_dict_pre_hook(lambda *_: calls.append("load-pre")),
        opt.register_load_state_dict_post_hook(lambda *_: calls.append("load-post")),
    ]
    try:
        for _ in range(2):
            w.grad = torch.ones(2, dtype=DT)
            opt.step()
        opt.load_state_dict(opt.state_dict())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global-pre", "pre", "post", "global-post"] * 2 + [
        "sd-pre",
        "sd-post",
        "load-pre",
        "load-post",
    ]


def test_pre_hook_sees_and_can_change_the_gradient_the_hypergradient_uses() -> None:
    # clip_grad_norm_ in a step pre-hook: h is the dot product of the *clipped* gradients
    w = torch.tensor([3.0, -4.0], dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=0.01)

    def clip(o: Any, *_: Any) -> None:
        nn.utils.clip_grad_norm_(o.param_groups[0]["params"], 1.0)

    opt.register_step_pre_hook(clip)
    clipped = []
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        assert w.grad is not None and float(w.grad.norm()) > 2.0
        opt.step()
        clipped.append(w.grad.detach().clone())  # clipped in place by the hook
        assert float(clipped[-1].norm()) == pytest.approx(1.0, rel=1e-5)
    assert opt.param_groups[0]["hypergrad"] == pytest.approx(float(clipped[1] @ clipped[0]), rel=1e-14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.01 * float(clipped[1] @ clipped[0]), rel=1e-14)


def test_lbfgs_style_closure_returns_its_loss_and_runs_once_even_under_no_grad() -> None:
    model = _contract_model()
    opt = AdamHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    x, y = torch.randn(4, 5, dtype=DT), torch.randn(4, 2, dtype=DT)
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    with torch.no_grad():
        second = opt.step(closure)
    assert calls == 2 and isinstance(second, Tensor) and second.requires_grad
    assert second.item() < first.item()
    assert opt.param_groups[0]["hypergrad"] != 0.0


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_zero_grad_set_to_none_then_step_moves_nothing_and_forgets_directions(cls: type[Any]) -> None:
    model = _contract_model()
    opt = cls(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    _contract_run(model, opt, range(3))
    lr = opt.param_groups[0]["lr"]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["hypergrad"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all("hd_direction" not in opt.state[p] for p in model.parameters())
    # set_to_none=False: zero gradients take a (zero) step and keep a (zero) direction for SGD
    opt.zero_grad(set_to_none=False)
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == 0.0 and opt.param_groups[0]["lr"] == lr


# --------------------------------------------------------------------------------------------
# LR schedulers and SWA attached to a self-tuning rate


def test_multiplicative_scheduler_composes_with_the_tuned_rate() -> None:
    w = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=0.05, hypergrad_lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(6):
        opt.zero_grad()
        (w**2).sum().backward()
        prev = w.detach().clone()
        opt.step()
        tuned = opt.param_groups[0]["lr"]
        # the step used the tuned rate: θ_t = θ_{t-1} − α_t ∇f(θ_{t-1}) exactly
        torch.testing.assert_close(w.detach(), prev - tuned * 2 * prev, rtol=1e-15, atol=0)
        sched.step()
        expected = tuned * 0.5 if (t + 1) % 2 == 0 else tuned
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-15)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_overwriting_scheduler_keeps_only_a_one_step_correction() -> None:
    # OneCycleLR sets the rate outright: each step uses schedule + β h, the next schedule value
    # replaces it (documented; the tuning does not accumulate)
    w = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=0.05, hypergrad_lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=8)
    dummy = torch.zeros(1, requires_grad=True)
    plain = torch.optim.SGD([dummy], lr=0.05)
    plain_sched = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=0.2, total_steps=8)
    for _ in range(6):
        scheduled = opt.param_groups[0]["lr"]
        assert scheduled == plain.param_groups[0]["lr"]
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
        h = opt.param_groups[0]["hypergrad"]
        assert opt.param_groups[0]["lr"] == pytest.approx(scheduled + 0.01 * h, rel=1e-15)
        dummy.grad = torch.zeros(1)
        plain.step()
        sched.step()
        plain_sched.step()


def test_swa_and_clipping_around_adamhd() -> None:
    model = _contract_model()
    opt = AdamHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    swa_sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.02, anneal_epochs=2)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 5, generator=gen, dtype=DT), torch.randn(16, 2, generator=gen, dtype=DT)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert torch.isfinite(norm)
        opt.step()
        averaged.update_parameters(model)
        swa_sched.step()
    assert int(averaged.n_averaged) == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02, rel=1e-12)  # annealed onto swa_lr
    assert all(torch.isfinite(p).all() for p in averaged.parameters())


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_float32_follows_float64(cls: type[Any]) -> None:
    traces = []
    for dtype in (torch.float32, DT):
        params = [p.detach().to(dtype).requires_grad_() for p in _params()]
        opt = (
            cls(params, lr=0.05, hypergrad_lr=1e-3, momentum=0.5)
            if cls is SGDHD
            else cls(params, lr=0.05, hypergrad_lr=1e-3)
        )
        lrs = []
        for _ in range(15):
            opt.zero_grad()
            _f(torch.cat([p.reshape(-1) for p in params]).to(DT)).backward()
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
        traces.append(lrs)
    assert abs(traces[1][-1] - 0.05) > 1e-3
    np.testing.assert_allclose(traces[0], traces[1], rtol=1e-5)
