"""Tests for hypergrad.optim: SGD-HD and Adam-HD (Baydin et al., ICLR 2018)."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hypergrad.optim import SGDHD, AdamHD

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------
# helpers


def _mlp(seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


def _batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen, dtype=DTYPE)
        y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(16, 1, generator=gen, dtype=DTYPE)
        out.append((x, y))
    return out


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]
) -> list[list[Tensor]]:
    """Run one step per batch; return a snapshot of the parameters after every step."""
    snapshots = []
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


def _assert_bitwise(a: list[list[Tensor]], b: list[list[Tensor]]) -> None:
    assert len(a) == len(b)
    for step, (ps, qs) in enumerate(zip(a, b, strict=True)):
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p, q), f"trajectories differ at step {step}"


def _quadratic(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An SPD matrix A (eigenvalues in [1, 4]), a vector b and a start θ0, all of size 6."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a = q @ np.diag(np.linspace(1.0, 4.0, 6)) @ q.T
    a = 0.5 * (a + a.T)
    return a, rng.standard_normal(6), rng.standard_normal(6)


# --------------------------------------------------------------------------------------------
# 1. hypergrad_lr = 0 is torch's optimiser, bit for bit

SGD_CONFIGS: list[dict[str, Any]] = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.1},
    {"momentum": 0.5, "weight_decay": 0.1, "nesterov": True, "maximize": True},
]
ADAM_CONFIGS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.1},
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "maximize": True},
]


def _ids(configs: list[dict[str, Any]]) -> list[str]:
    return [",".join(f"{k}={v}" for k, v in c.items()) or "plain" for c in configs]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("hd_cls", "torch_cls", "kwargs"),
    [(SGDHD, torch.optim.SGD, {"lr": 0.05, **c}) for c in SGD_CONFIGS]
    + [(AdamHD, torch.optim.Adam, {"lr": 0.01, **c}) for c in ADAM_CONFIGS],
    ids=[f"SGD[{i}]" for i in _ids(SGD_CONFIGS)] + [f"Adam[{i}]" for i in _ids(ADAM_CONFIGS)],
)
def test_zero_hypergrad_lr_is_bitwise_torch(
    hd_cls: type[Any],
    torch_cls: type[Any],
    kwargs: dict[str, Any],
    foreach: bool,
) -> None:
    batches = _batches(8)
    model_ref, model_hd = _mlp(), _mlp()
    ref = torch_cls(model_ref.parameters(), foreach=foreach, **kwargs)
    hd = hd_cls(model_hd.parameters(), foreach=foreach, hypergrad_lr=0.0, **kwargs)
    _assert_bitwise(_train(model_ref, ref, batches), _train(model_hd, hd, batches))
    group = hd.param_groups[0]
    assert group["lr"] == kwargs["lr"] and isinstance(group["lr"], float)
    # the hypergradient is still computed (for logging) even though it is not applied
    assert isinstance(group["hypergrad"], float) and group["hypergrad"] != 0.0
    for p in model_hd.parameters():
        assert hd.state[p]["hd_direction"].shape == p.shape


# --------------------------------------------------------------------------------------------
# 2. the learning-rate sequence matches an independent numpy implementation


def _sgd_hd_numpy(
    grad: Callable[[np.ndarray], np.ndarray],
    theta: np.ndarray,
    steps: int,
    lr: float,
    hypergrad_lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    lr_min: float = 0.0,
    lr_max: float = math.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SGD-HD written out; ``lr_min=-math.inf`` gives the unclamped rule of the paper."""
    alpha, d_prev, buf = lr, None, None
    lrs, hs = [], []
    for _ in range(steps):
        g = grad(theta) + weight_decay * theta
        h = 0.0 if d_prev is None else float(g @ d_prev)
        alpha = min(max(alpha + hypergrad_lr * h, lr_min), lr_max)
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1.0 - dampening) * g
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        theta = theta - alpha * d
        d_prev = d
        lrs.append(alpha)
        hs.append(h)
    return np.array(lrs), np.array(hs), theta


def _adam_hd_numpy(
    grad: Callable[[np.ndarray], np.ndarray],
    theta: np.ndarray,
    steps: int,
    lr: float,
    hypergrad_lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    lr_min: float = 0.0,
    lr_max: float = math.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adam-HD written out; ``lr_min=-math.inf`` gives the unclamped rule of the paper."""
    b1, b2 = betas
    alpha, d_prev = lr, None
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    lrs, hs = [], []
    for t in range(1, steps + 1):
        g = grad(theta) + weight_decay * theta
        h = 0.0 if d_prev is None else float(g @ d_prev)
        alpha = min(max(alpha + hypergrad_lr * h, lr_min), lr_max)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        d = (m / (1.0 - b1**t)) / (np.sqrt(v / (1.0 - b2**t)) + eps)
        theta = theta - alpha * d
        d_prev = d
        lrs.append(alpha)
        hs.append(h)
    return np.array(lrs), np.array(hs), theta


REFERENCE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {"lr": 0.02, "hypergrad_lr": 2e-3}),
    ("sgd", {"lr": 0.02, "hypergrad_lr": 2e-3, "momentum": 0.7, "dampening": 0.2}),
    ("sgd", {"lr": 0.02, "hypergrad_lr": 5e-4, "momentum": 0.6, "nesterov": True}),
    ("sgd", {"lr": 0.02, "hypergrad_lr": 2e-3, "weight_decay": 0.3, "momentum": 0.5}),
    ("adam", {"lr": 0.01, "hypergrad_lr": 1e-3, "betas": (0.9, 0.99)}),
    ("adam", {"lr": 0.01, "hypergrad_lr": 1e-3, "weight_decay": 0.3, "eps": 1e-3}),
]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("kind", "kwargs"),
    REFERENCE_CASES,
    ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(REFERENCE_CASES)],
)
def test_matches_numpy_reference(kind: str, kwargs: dict[str, Any], foreach: bool, maximize: bool) -> None:
    a, b, theta0 = _quadratic()
    steps = 25

    def grad(theta: np.ndarray) -> np.ndarray:
        return a @ theta - b

    reference = _sgd_hd_numpy if kind == "sgd" else _adam_hd_numpy
    lrs_ref, hs_ref, theta_ref = reference(grad, theta0, steps, **kwargs)

    # θ split over two parameters (a 2x2 matrix and a 2-vector) plus a 2-vector in the same group,
    # so that h is a sum over the group's parameters
    theta_t = torch.tensor(theta0, dtype=DTYPE)
    params = [
        theta_t[:4].reshape(2, 2).clone().requires_grad_(),
        theta_t[4:].clone().requires_grad_(),
    ]
    a_t, b_t = torch.tensor(a, dtype=DTYPE), torch.tensor(b, dtype=DTYPE)
    cls = SGDHD if kind == "sgd" else AdamHD
    opt = cls(params, foreach=foreach, maximize=maximize, **kwargs)
    lrs, hs = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)  # grads get overwritten in place: no aliasing allowed
        theta = torch.cat([p.reshape(-1) for p in params])
        f = 0.5 * theta @ (a_t @ theta) - b_t @ theta
        (-f if maximize else f).backward()  # maximising -f is minimising f
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        hs.append(opt.param_groups[0]["hypergrad"])

    assert abs(lrs_ref[-1] - kwargs["lr"]) > 0.1 * kwargs["lr"]  # the lr really moved
    np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(hs, hs_ref, rtol=1e-9, atol=1e-12 * np.abs(hs_ref).max())
    theta_final = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    np.testing.assert_allclose(theta_final, theta_ref, rtol=1e-10, atol=1e-12)


def test_first_step_has_zero_hypergradient() -> None:
    w = torch.ones(3, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=1.0)
    (w**2).sum().backward()
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == 0.0
    assert opt.param_groups[0]["lr"] == 0.1
    # second step: h = <g_2, g_1> = <2 w_1, 2 w_0> = <1.6, 2> * 3
    opt.zero_grad()
    (w**2).sum().backward()
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == pytest.approx(3 * 1.6 * 2.0, rel=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 9.6, rel=1e-15)


# --------------------------------------------------------------------------------------------
# 3. the behaviour: a too-small learning rate grows and the loss ends lower


def _logistic_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen, dtype=DTYPE)
    w_true = torch.randn(10, generator=gen, dtype=DTYPE)
    y = (torch.rand(256, generator=gen, dtype=DTYPE) < torch.sigmoid(x @ w_true)).to(DTYPE)
    return x, y


def _fit_logistic(opt_factory: Callable[[list[Tensor]], Any], steps: int) -> tuple[float, float]:
    x, y = _logistic_data()
    w = torch.zeros(10, dtype=DTYPE, requires_grad=True)
    bias = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    opt = opt_factory([w, bias])

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + bias, y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        final = nn.functional.binary_cross_entropy_with_logits(x @ w + bias, y).item()
    return final, opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("base", "hd", "lr0"),
    [
        (
            lambda ps, lr: torch.optim.SGD(ps, lr=lr),
            lambda ps, lr: SGDHD(ps, lr=lr, hypergrad_lr=0.1),
            1e-3,
        ),
        (
            lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            lambda ps, lr: SGDHD(ps, lr=lr, momentum=0.9, hypergrad_lr=0.01),
            1e-3,
        ),
        (
            lambda ps, lr: torch.optim.Adam(ps, lr=lr),
            lambda ps, lr: AdamHD(ps, lr=lr, hypergrad_lr=1e-3),
            1e-4,
        ),
    ],
    ids=["sgd", "sgd-momentum", "adam"],
)
def test_too_small_lr_grows_and_beats_fixed_lr(base: Any, hd: Any, lr0: float) -> None:
    steps = 100
    loss_base, lr_base = _fit_logistic(lambda ps: base(ps, lr0), steps)
    loss_hd, lr_hd = _fit_logistic(lambda ps: hd(ps, lr0), steps)
    assert lr_base == lr0
    assert lr_hd > 10 * lr0
    assert loss_hd < loss_base - 0.05


# --------------------------------------------------------------------------------------------
# 4. param groups


def test_groups_are_independent_and_have_their_own_lr() -> None:
    batches = _batches(10)
    model_joint, model_split = _mlp(), _mlp()
    joint = SGDHD(
        [
            {"params": model_joint[0].parameters(), "hypergrad_lr": 0.05},
            {"params": model_joint[2].parameters(), "lr": 0.02},
        ],
        lr=0.05,
        momentum=0.5,
        hypergrad_lr=0.0,
    )
    first = SGDHD(model_split[0].parameters(), lr=0.05, momentum=0.5, hypergrad_lr=0.05)
    second = SGDHD(model_split[2].parameters(), lr=0.02, momentum=0.5, hypergrad_lr=0.0)
    snaps_joint: list[list[Tensor]] = []
    snaps_split: list[list[Tensor]] = []
    for x, y in batches:
        for model, opts, snaps in (
            (model_joint, [joint], snaps_joint),
            (model_split, [first, second], snaps_split),
        ):
            for opt in opts:
                opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            for opt in opts:
                opt.step()
            snaps.append([p.detach().clone() for p in model.parameters()])
    _assert_bitwise(snaps_joint, snaps_split)
    g0, g1 = joint.param_groups
    assert (g0["hypergrad_lr"], g1["hypergrad_lr"]) == (0.05, 0.0)
    assert g0["lr"] == first.param_groups[0]["lr"] != 0.05
    assert g1["lr"] == 0.02  # hypergrad_lr = 0: never moves...
    assert g1["hypergrad"] == second.param_groups[0]["hypergrad"] != 0.0  # ...but is logged


def test_group_hypergradient_sums_over_its_own_params() -> None:
    model = _mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    param_groups: list[dict[str, Any]] = [
        {"params": groups[0]},
        {"params": groups[1], "hypergrad_lr": 1e-4},
    ]
    opt = AdamHD(
        param_groups,
        lr=0.01,
        hypergrad_lr=1e-3,
    )
    (x, y), (x2, y2) = _batches(2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    directions = [[opt.state[p]["hd_direction"].clone() for p in ps] for ps in groups]
    lrs_before = [g["lr"] for g in opt.param_groups]
    opt.zero_grad()
    nn.functional.mse_loss(model(x2), y2).backward()
    expected = [
        sum(float((p.grad * d).sum()) for p, d in zip(ps, ds, strict=True))
        for ps, ds in zip(groups, directions, strict=True)
    ]
    opt.step()
    betas = (1e-3, 1e-4)
    for group, h, lr, beta in zip(opt.param_groups, expected, lrs_before, betas, strict=True):
        assert group["hypergrad"] == pytest.approx(h, rel=1e-12)
        assert group["lr"] == pytest.approx(lr + beta * h, rel=1e-15)
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


def test_add_param_group_takes_defaults_and_own_hypergrad_lr() -> None:
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    opt = SGDHD([a], lr=0.1, hypergrad_lr=0.02)
    opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [c], "hypergrad_lr": 0.5, "lr": 1})
    assert [g["hypergrad_lr"] for g in opt.param_groups] == [0.02, 0.02, 0.5]
    assert [g["hypergrad"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
    assert opt.param_groups[2]["lr"] == 1.0 and isinstance(opt.param_groups[2]["lr"], float)
    with pytest.raises(ValueError, match=re.escape("Invalid hypergrad_lr: -0.5")):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "hypergrad_lr": -0.5})
    assert len(opt.param_groups) == 3  # the bad group was not added


def test_param_without_grad_contributes_nothing_and_forgets_its_direction() -> None:
    u = torch.ones(2, dtype=DTYPE, requires_grad=True)
    v = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([u, v], lr=0.1, hypergrad_lr=0.1)
    (u.sum() + v.sum()).backward()
    opt.step()
    assert "hd_direction" in opt.state[v]
    v.grad = None  # v sits out a step: its old direction must not be used afterwards
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == pytest.approx(2.0)  # <1, 1> over u only
    assert "hd_direction" not in opt.state[v]
    v.grad = torch.ones(2, dtype=DTYPE)
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == pytest.approx(2.0)  # still u only


# --------------------------------------------------------------------------------------------
# 5. state_dict, closure, hooks, validation


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGDHD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, hypergrad_lr=0.01),
        lambda ps: SGDHD(ps, lr=0.05, hypergrad_lr=0.05),
        lambda ps: AdamHD(ps, lr=0.01, weight_decay=0.01, hypergrad_lr=1e-3),
    ],
    ids=["sgd-nesterov", "sgd", "adam"],
)
def test_state_dict_resume_is_exact(make: Callable[[Any], torch.optim.Optimizer]) -> None:
    batches = _batches(10)
    model = _mlp()
    opt = make(model.parameters())
    full = _train(model, opt, batches)

    model_a = _mlp()
    opt_a = make(model_a.parameters())
    _train(model_a, opt_a, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all("hd_direction" in s for s in saved["opt"]["state"].values())

    model_b = _mlp(seed=123)
    model_b.load_state_dict(saved["model"])
    opt_b = make(model_b.parameters())
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] != 0.05
    assert opt_b.param_groups[0]["hypergrad"] == opt_a.param_groups[0]["hypergrad"]
    resumed = _train(model_b, opt_b, batches[4:])
    _assert_bitwise(full[4:], resumed)
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_loads_a_plain_torch_state_dict() -> None:
    model, model_hd = _mlp(), _mlp()
    batches = _batches(4)
    ref = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, ref, batches[:2])
    model_hd.load_state_dict(model.state_dict())
    hd = SGDHD(model_hd.parameters(), lr=0.05, momentum=0.9, hypergrad_lr=0.0)
    hd.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch shares the buffers otherwise
    assert hd.param_groups[0]["hypergrad"] == 0.0
    # no stored direction yet, so the first resumed step has h = 0 and then continues like torch
    _assert_bitwise(_train(model, ref, batches[2:]), _train(model_hd, hd, batches[2:]))
    assert hd.param_groups[0]["hypergrad"] != 0.0


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_closure_returns_loss_and_matches_plain_step(cls: type[Any]) -> None:
    batches = _batches(5)
    model, model_closure = _mlp(), _mlp()
    opt = cls(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    opt_closure = cls(model_closure.parameters(), lr=0.01, hypergrad_lr=1e-3)
    snapshots = _train(model, opt, batches)
    calls = 0
    for (x, y), expected in zip(batches, snapshots, strict=True):

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            nonlocal calls
            calls += 1
            opt_closure.zero_grad()
            loss = nn.functional.mse_loss(model_closure(x), y)
            loss.backward()
            return loss

        loss = opt_closure.step(closure)
        assert isinstance(loss, Tensor) and loss.requires_grad  # evaluated with grad enabled
        for p, q in zip(model_closure.parameters(), expected, strict=True):
            assert torch.equal(p, q)
    assert calls == len(batches)
    assert opt_closure.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.01
    assert opt_closure.step() is None


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_step_hooks_run_once_per_step(cls: type[Any]) -> None:
    w = torch.zeros(2, requires_grad=True)
    torch.optim.SGD([w]), torch.optim.Adam([w])  # wraps the parents' step with the hook runner
    opt = cls([w], lr=0.1)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for _ in range(3):
        w.grad = torch.ones(2)
        opt.step()
    assert calls == ["pre", "post"] * 3


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_complex_params_match_their_real_view(cls: type[Any]) -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, generator=gen, dtype=torch.complex128)
    z = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    r = torch.zeros(3, 2, dtype=DTYPE, requires_grad=True)
    kwargs: dict[str, Any] = {"lr": 0.01, "hypergrad_lr": 1e-2 if cls is SGDHD else 1e-3}
    opt_z, opt_r = cls([z], **kwargs), cls([r], **kwargs)
    for _ in range(10):
        opt_z.zero_grad(), opt_r.zero_grad()
        (z - target).abs().pow(2).sum().backward()
        (r - torch.view_as_real(target)).pow(2).sum().backward()
        opt_z.step(), opt_r.step()
        assert opt_z.param_groups[0]["lr"] == pytest.approx(opt_r.param_groups[0]["lr"], rel=1e-12)
    assert opt_r.param_groups[0]["lr"] > 0.011
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(5, 2, sparse=True)
    opt = SGDHD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ps: SGDHD(ps, hypergrad_lr=-1.0), "Invalid hypergrad_lr: -1.0"),
        (lambda ps: AdamHD(ps, hypergrad_lr=-1e-3), "Invalid hypergrad_lr: -0.001"),
        (lambda ps: SGDHD(ps, hypergrad_lr=float("nan")), "Invalid hypergrad_lr: nan"),
        (lambda ps: AdamHD(ps, hypergrad_lr=float("inf")), "Invalid hypergrad_lr: inf"),
        (
            lambda ps: SGDHD([{"params": ps, "hypergrad_lr": -2.0}]),
            "Invalid hypergrad_lr: -2.0",
        ),
        (lambda ps: SGDHD(ps, lr=-0.1), "Invalid learning rate: -0.1"),
        (lambda ps: SGDHD(ps, lr_min=-1.0), "Invalid lr_min: -1.0"),
        (lambda ps: AdamHD(ps, lr_min=float("nan")), "Invalid lr_min: nan"),
        (lambda ps: SGDHD(ps, lr_min=float("inf")), "Invalid lr_min: inf"),
        (lambda ps: SGDHD(ps, lr_min=True), "Invalid lr_min: True"),
        (lambda ps: AdamHD(ps, lr_max=float("nan")), "Invalid lr_max: nan"),
        (lambda ps: SGDHD(ps, lr_max=-1.0), "Invalid lr_max: -1.0"),
        (lambda ps: SGDHD(ps, lr=0.1, lr_min=0.1, lr_max=0.1), "Invalid lr_max: 0.1"),  # not > lr_min
        (
            lambda ps: AdamHD(ps, lr_max=torch.tensor(1.0)),  # type: ignore[arg-type]
            "Invalid lr_max: tensor(1.)",
        ),
        (lambda ps: SGDHD(ps, lr=0.5, lr_max=0.1), "Invalid learning rate: 0.5 (outside [lr_min, lr_max]"),
        (lambda ps: AdamHD(ps, lr=1e-3, lr_min=0.01), "Invalid learning rate: 0.001"),
        (lambda ps: SGDHD([{"params": ps, "lr_min": -2.0}]), "Invalid lr_min: -2.0"),
        (
            lambda ps: AdamHD([{"params": ps, "lr_min": 0.5, "lr_max": 0.2, "lr": 0.3}]),
            "Invalid lr_max: 0.2",
        ),
        (lambda ps: SGDHD([{"params": ps, "lr_max": 1e-4}], lr=1e-3), "Invalid learning rate: 0.001"),
        (lambda ps: AdamHD([{"params": ps, "lr": -3.0}]), "Invalid learning rate: -3.0"),
        (lambda ps: SGDHD(ps, momentum=-0.5), "Invalid momentum value: -0.5"),
        (lambda ps: SGDHD(ps, weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
        (lambda ps: AdamHD(ps, betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
        (lambda ps: AdamHD(ps, eps=-1.0), "Invalid epsilon value: -1.0"),
        (
            lambda ps: SGDHD(ps, lr=torch.tensor(0.1)),  # type: ignore[arg-type]
            "needs a Python float learning rate",
        ),
        (lambda ps: AdamHD(ps, fused=True), "AdamHD does not support fused=True"),
        (lambda ps: AdamHD(ps, capturable=True), "AdamHD does not support capturable=True"),
        (lambda ps: AdamHD(ps, differentiable=True), "does not support differentiable=True"),
        (
            lambda ps: AdamHD(ps, decoupled_weight_decay=True),
            "does not support decoupled_weight_decay=True",
        ),
        (lambda ps: SGDHD(ps, fused=True), "SGDHD does not support fused=True"),
        (lambda ps: SGDHD(ps, differentiable=True), "SGDHD does not support differentiable=True"),
        (
            lambda ps: SGDHD([{"params": ps, "differentiable": True}]),
            "SGDHD does not support differentiable=True",
        ),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_value(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make([torch.zeros(2, requires_grad=True)])


def test_defaults_and_copy() -> None:
    w = torch.zeros(2, requires_grad=True)
    sgd, adam = SGDHD([w]), AdamHD([w])
    assert (sgd.defaults["lr"], sgd.defaults["hypergrad_lr"]) == (1e-3, 1e-3)
    assert (adam.defaults["lr"], adam.defaults["hypergrad_lr"]) == (1e-3, 1e-7)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adam, torch.optim.Adam)
    w.grad = torch.ones(2)
    adam.step()
    adam.step()
    clone = copy.deepcopy(adam)
    assert clone.param_groups[0]["hypergrad_lr"] == 1e-7
    assert clone.param_groups[0]["hypergrad"] == adam.param_groups[0]["hypergrad"] != 0.0


# --------------------------------------------------------------------------------------------
# 6. learning-rate bounds: lr_min (default 0) and lr_max (default inf)

# (kind, the bound that the unclamped rule crosses, noise on the quadratic's linear term, kwargs)
BOUND_CASES: list[tuple[str, str, float, dict[str, Any]]] = [
    # lr close to 2/L = 0.5: the iterates oscillate, h < 0, and a large β overshoots below 0
    ("sgd", "floor", 0.0, {"lr": 0.4, "hypergrad_lr": 0.01}),
    ("sgd", "floor", 0.0, {"lr": 0.1, "hypergrad_lr": 1e-3, "momentum": 0.9}),
    ("adam", "floor", 0.5, {"lr": 0.5, "hypergrad_lr": 0.2}),
    ("sgd", "floor", 0.0, {"lr": 0.4, "hypergrad_lr": 0.01, "lr_min": 0.05}),
    # a too-small lr grows past the ceiling
    ("sgd", "ceiling", 0.0, {"lr": 0.01, "hypergrad_lr": 2e-3, "lr_max": 0.1}),
    ("sgd", "ceiling", 0.5, {"lr": 0.01, "hypergrad_lr": 1e-3, "momentum": 0.5, "lr_max": 0.1}),
    ("adam", "ceiling", 0.0, {"lr": 1e-3, "hypergrad_lr": 1e-3, "lr_max": 0.05}),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("kind", "bound", "noise", "kwargs"),
    BOUND_CASES,
    ids=[f"{kind}-{bound}-{i}" for i, (kind, bound, _, _) in enumerate(BOUND_CASES)],
)
def test_lr_stays_within_bounds_and_matches_clamped_reference(
    kind: str, bound: str, noise: float, kwargs: dict[str, Any], foreach: bool
) -> None:
    a, b, theta0 = _quadratic()
    steps = 50
    targets = b + noise * np.random.default_rng(0).standard_normal((steps, 6))
    reference = _sgd_hd_numpy if kind == "sgd" else _adam_hd_numpy

    def run_reference(**overrides: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stream = iter(targets)
        return reference(lambda th: a @ th - next(stream), theta0, steps, **{**kwargs, **overrides})

    lr_min, lr_max = kwargs.get("lr_min", 0.0), kwargs.get("lr_max", math.inf)
    # the paper's unclamped rule really crosses the bound here (with the default floor: goes < 0)
    unclamped, _, _ = run_reference(lr_min=-math.inf, lr_max=math.inf)
    if bound == "floor":
        assert unclamped.min() < min(lr_min, 0.0)
    else:
        assert unclamped.max() > lr_max
    lrs_ref, _, theta_ref = run_reference()

    theta_t = torch.tensor(theta0, dtype=DTYPE)
    params = [theta_t[:4].clone().requires_grad_(), theta_t[4:].clone().requires_grad_()]
    a_t, targets_t = torch.tensor(a, dtype=DTYPE), torch.tensor(targets, dtype=DTYPE)
    cls = SGDHD if kind == "sgd" else AdamHD
    opt = cls(params, foreach=foreach, **kwargs)  # no lr_min given: the default floor 0 acts
    lrs = []
    for target in targets_t:
        opt.zero_grad()
        theta = torch.cat(params)
        (0.5 * theta @ (a_t @ theta) - target @ theta).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])

    assert min(lrs) >= lr_min and max(lrs) <= lr_max
    assert (lr_min if bound == "floor" else lr_max) in lrs  # the bound was hit, exactly
    np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-10, atol=1e-13)
    theta_final = torch.cat([p.detach() for p in params]).numpy()
    np.testing.assert_allclose(theta_final, theta_ref, rtol=1e-10, atol=1e-12)


def test_floor_closed_form_stops_the_ascent_and_recovers() -> None:
    # f(w) = w²/2 from w = 1 with α = 1.5, β = 4 (all values exact in binary floating point):
    # step 1: h = 0, α = 1.5, w = 1 - 1.5 = -0.5
    # step 2: h = <-0.5, 1> = -0.5, α = 1.5 - 2 = -0.5 unclamped, which would step *uphill* to
    #         w = -0.5 - (-0.5)(-0.5) = -0.75; the floor makes it α = 0 and w stays at -0.5
    # step 3: h = <-0.5, -0.5> = 0.25 > 0, α = 0 + 1 = 1, w = -0.5 - 1 * (-0.5) = 0, the minimum
    w = torch.ones((), dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=1.5, hypergrad_lr=4.0)
    trace = []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * w**2).backward()
        opt.step()
        trace.append((opt.param_groups[0]["hypergrad"], opt.param_groups[0]["lr"], w.item()))
    assert trace == [(0.0, 1.5, -0.5), (-0.5, 0.0, -0.5), (0.25, 1.0, 0.0)]


def test_per_group_bounds_act_on_their_own_group() -> None:
    a, b, theta0 = _quadratic()
    a_t, b_t = torch.tensor(a, dtype=DTYPE), torch.tensor(b, dtype=DTYPE)
    # group 0 oscillates (its lr would go below 0); group 1 starts too small (would pass 0.1)
    group0: dict[str, Any] = {"lr": 0.4, "hypergrad_lr": 0.05}
    group1: dict[str, Any] = {"lr": 0.01, "hypergrad_lr": 2e-3, "lr_min": 0.005, "lr_max": 0.1}

    def fresh() -> list[Tensor]:
        theta = torch.tensor(theta0, dtype=DTYPE)
        return [theta[:4].clone().requires_grad_(), theta[4:].clone().requires_grad_()]

    (u, v), (u_split, v_split) = fresh(), fresh()
    joint = SGDHD([{"params": [u], **group0}, {"params": [v], **group1}])
    split = [SGDHD([u_split], **group0), SGDHD([v_split], **group1)]
    assert [(g["lr_min"], g["lr_max"]) for g in joint.param_groups] == [(0.0, math.inf), (0.005, 0.1)]
    lrs = []
    for _ in range(50):
        for params, opts in (((u, v), [joint]), ((u_split, v_split), split)):
            for opt in opts:
                opt.zero_grad()
            theta = torch.cat(params)
            (0.5 * theta @ (a_t @ theta) - b_t @ theta).backward()
            for opt in opts:
                opt.step()
        assert torch.equal(u, u_split) and torch.equal(v, v_split)
        assert [g["lr"] for g in joint.param_groups] == [o.param_groups[0]["lr"] for o in split]
        lrs.append([g["lr"] for g in joint.param_groups])
    lr0, lr1 = zip(*lrs, strict=True)
    assert min(lr0) == 0.0 and max(lr0) <= 0.4  # group 0: default floor hit, no ceiling
    assert max(lr1) == 0.1 and min(lr1) >= 0.005  # group 1: its own ceiling hit


def test_add_param_group_takes_default_and_own_bounds() -> None:
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    opt = AdamHD([a], lr=0.1, lr_min=0.01, lr_max=1.0)
    opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [c], "lr": 2, "lr_min": 1, "lr_max": math.inf})
    assert [(g["lr_min"], g["lr_max"]) for g in opt.param_groups] == [
        (0.01, 1.0),
        (0.01, 1.0),
        (1.0, math.inf),
    ]
    assert all(isinstance(g[k], float) for g in opt.param_groups for k in ("lr_min", "lr_max"))
    bad: list[tuple[dict[str, Any], str]] = [
        ({"lr_min": -0.5}, "Invalid lr_min: -0.5"),
        ({"lr_max": 0.005}, "Invalid lr_max: 0.005"),  # below the inherited lr_min = 0.01
        ({"lr_min": 0.5}, "Invalid learning rate: 0.1"),  # the inherited lr is below the floor
        ({"lr": 5.0}, "Invalid learning rate: 5.0"),  # above the inherited ceiling
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], **extra})
    assert len(opt.param_groups) == 3  # no bad group was added


def test_bounds_act_only_through_hypergradient_updates() -> None:
    # hypergrad_lr = 0: the bounds are inert, a scheduler may leave them and the run is torch's
    batches = _batches(6)
    model_ref, model_hd = _mlp(), _mlp()
    ref = torch.optim.SGD(model_ref.parameters(), lr=0.05, momentum=0.9)
    hd = SGDHD(model_hd.parameters(), lr=0.05, momentum=0.9, hypergrad_lr=0.0, lr_min=0.02, lr_max=0.1)
    sched_ref, sched_hd = (torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.5**k) for o in (ref, hd))
    for batch in batches:
        _assert_bitwise(_train(model_ref, ref, [batch]), _train(model_hd, hd, [batch]))
        sched_ref.step()
        sched_hd.step()
    assert hd.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.05 * 1.5**6 > 0.1
    # hypergrad_lr > 0: an lr set outside the bounds is clamped at the next step
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=1e-3, lr_max=0.5)
    opt.param_groups[0]["lr"] = 3.0
    w.grad = torch.ones(2, dtype=DTYPE)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(w.detach(), torch.full((2,), 0.5, dtype=DTYPE))


def test_bounds_edited_to_invalid_values_are_refused_at_step() -> None:
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=1e-3)
    w.grad = torch.ones(2, dtype=DTYPE)
    opt.step()
    before = w.detach().clone()
    for key, value, message in (
        ("lr_min", -1.0, "Invalid lr_min: -1.0"),
        ("lr_max", float("nan"), "Invalid lr_max: nan"),
    ):
        group = opt.param_groups[0]
        saved = group[key]
        group[key] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.step()
        group[key] = saved
        assert torch.equal(w, before) and group["lr"] == 0.1  # nothing moved


def test_nan_hypergradient_is_not_hidden_by_the_clamp() -> None:
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=1e-3, lr_max=1.0)
    w.grad = torch.ones(2, dtype=DTYPE)
    opt.step()
    w.grad = torch.full((2,), float("nan"), dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="non-finite hypergradient nan in param group 0"):
        opt.step()
    assert math.isnan(opt.param_groups[0]["hypergrad"])  # logged, not hidden
    assert opt.param_groups[0]["lr"] == 0.1  # kept: not NaN, and not clamped to lr_max


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_state_dict_round_trips_bounds(cls: type[Any]) -> None:
    model = _mlp()
    groups = [
        {"params": model[0].parameters(), "lr_min": 0.001, "lr_max": 0.2},
        {"params": model[2].parameters(), "lr_max": 0.5},
    ]
    opt = cls(groups, lr=0.01, hypergrad_lr=1e-3, lr_min=0.002)
    _train(model, opt, _batches(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = _mlp()
    loaded = cls(other[0].parameters(), lr=0.01)  # default bounds: the saved groups' must win
    loaded.add_param_group({"params": other[2].parameters()})
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert [(g["lr_min"], g["lr_max"]) for g in loaded.param_groups] == [(0.001, 0.2), (0.002, 0.5)]


def _strip_bounds(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict as saved before lr_min / lr_max existed."""
    old = copy.deepcopy(state_dict)
    for group in old["param_groups"]:
        del group["lr_min"], group["lr_max"]
    return old


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_old_state_dict_without_bounds_loads_and_resumes_exactly(cls: type[Any]) -> None:
    batches = _batches(8)
    model = _mlp()
    opt = cls(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    full = _train(model, opt, batches)

    model_a = _mlp()
    opt_a = cls(model_a.parameters(), lr=0.01, hypergrad_lr=1e-3)
    _train(model_a, opt_a, batches[:3])
    old = _strip_bounds(opt_a.state_dict())
    model_b = _mlp(seed=5)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = cls(model_b.parameters(), lr=0.01, hypergrad_lr=1e-3)
    opt_b.load_state_dict(old)
    group = opt_b.param_groups[0]
    assert (group["lr_min"], group["lr_max"]) == (0.0, math.inf)
    assert group["lr"] == opt_a.param_groups[0]["lr"]
    _assert_bitwise(full[3:], _train(model_b, opt_b, batches[3:]))

    # the missing keys come from the constructor, like hypergrad_lr
    opt_c = cls(_mlp().parameters(), lr=0.01, lr_min=0.005, lr_max=0.5)
    opt_c.load_state_dict(old)
    assert (opt_c.param_groups[0]["lr_min"], opt_c.param_groups[0]["lr_max"]) == (0.005, 0.5)


def test_old_state_dict_with_a_negative_lr_is_clamped_at_the_next_step() -> None:
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=1e-3)
    w.grad = torch.ones(2, dtype=DTYPE)
    opt.step()
    old = _strip_bounds(opt.state_dict())
    old["param_groups"][0]["lr"] = -0.3  # what the unbounded optimiser could save
    opt.load_state_dict(old)  # loads; not refused
    assert opt.param_groups[0]["lr"] == -0.3
    before = w.detach().clone()
    opt.step()
    assert opt.param_groups[0]["hypergrad"] == 2.0  # <1, 1> + <1, 1>, far too small to help
    assert opt.param_groups[0]["lr"] == 0.0
    assert torch.equal(w, before)  # no step uphill


def test_old_pickled_optimizer_gets_default_bounds() -> None:
    w = torch.zeros(2, requires_grad=True)
    opt = AdamHD([w], lr=0.01)
    for key in ("lr_min", "lr_max"):  # as pickled before lr_min / lr_max existed
        del opt.defaults[key], opt.param_groups[0][key]
    clone = pickle.loads(pickle.dumps(opt))
    assert (clone.defaults["lr_min"], clone.defaults["lr_max"]) == (0.0, math.inf)
    assert (clone.param_groups[0]["lr_min"], clone.param_groups[0]["lr_max"]) == (0.0, math.inf)
