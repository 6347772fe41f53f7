"""Round 12: ``hg.optim`` through torch.optim's own test idioms (common_optimizers.py, test_optim.py).

What these pin down, beyond tests/test_optim.py, test_hardening_optim.py and test_round7_optim.py:

1. A non-finite gradient (NaN or ±inf in one entry) used to turn the hypergradient non-finite and,
   through ``α_t = clamp(α_{t-1} + β h_t)``, the learning rate of the whole group: NaN (or +inf
   with ``lr_max = inf``) poisoned *every* parameter of the group in that very step, where torch's
   optimiser damages only the bad entry; ±inf with a finite bound was silently clamped to
   ``lr_max`` / ``lr_min``. Now the group keeps its rate, says so with a ``RuntimeWarning``, and the
   step is exactly torch's with the previous rate.
2. ``load_state_dict`` of a state this optimiser cannot run (``torch.optim.AdamW``'s decoupled
   weight decay, ``fused=True``, or another optimiser's groups: Adam into SGD-HD, SGD into
   Adam-HD) used to load, replace the optimiser's groups and state, and fail only at the next
   ``step`` (a ``ValueError`` or a ``KeyError: 'momentum'``). Now it is refused at load time with a
   message naming the group and key, and the optimiser is left as it was.
3. torch's idioms that hold already: deepcopy / pickle continue bit for bit, a step with no
   gradients creates no state and moves nothing, a step with zero gradients keeps the rate, and
   on a quadratic the learned rate follows Baydin's formula by hand and moves towards the optimal
   step from both sides, Adam-HD's follows it with the Adam direction, and ReduceLROnPlateau
   scales the tuned rate while LambdaLR replaces it (as documented).
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hypergrad.optim import SGDHD, AdamHD

DT = torch.float64


def _grads(gen: torch.Generator, *params: Tensor) -> list[Tensor]:
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _set_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


# --------------------------------------------------------------------------------------------
# 1. a non-finite gradient must not poison the learning rate


NON_FINITE_CASES: list[tuple[type[Any], Any, dict[str, Any]]] = [
    (SGDHD, torch.optim.SGD, {"hypergrad_lr": 0.01}),
    (SGDHD, torch.optim.SGD, {"hypergrad_lr": 0.01, "momentum": 0.9, "weight_decay": 0.1}),
    (AdamHD, torch.optim.Adam, {"hypergrad_lr": 1e-3}),
    (AdamHD, torch.optim.Adam, {"hypergrad_lr": 1e-3, "amsgrad": True, "maximize": True}),
]


@pytest.mark.parametrize("lr_max", [math.inf, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    ("cls", "base", "kwargs"), NON_FINITE_CASES, ids=["sgd", "sgd-momentum-wd", "adam", "adam-amsgrad-max"]
)
def test_a_non_finite_gradient_keeps_the_rate_and_damages_only_what_torch_would(
    cls: type[Any], base: Any, kwargs: dict[str, Any], bad: float, lr_max: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    u, v, z = (torch.randn(n, generator=gen, dtype=DT).requires_grad_() for n in (4, 3, 2))
    params = [u, v, z]
    opt = cls([{"params": [u, v]}, {"params": [z]}], lr=0.1, lr_max=lr_max, **kwargs)
    for _ in range(2):
        _set_grads(params, _grads(gen, *params))
        opt.step()
    # torch's optimiser, from the same state, with the rates that the step will use
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = base([{"params": twin_params[:2]}, {"params": twin_params[2:]}], lr=0.1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # our extra keys ride along unused
    lr0, lr1 = (g["lr"] for g in opt.param_groups)

    grads = _grads(gen, *params)
    grads[0][1] = bad  # one entry of one parameter of group 0
    _set_grads(params, grads)
    with pytest.warns(RuntimeWarning, match=r"non-finite hypergradient .* param group 0\b"):
        opt.step()
    group0, group1 = opt.param_groups
    assert not math.isfinite(group0["hypergrad"])  # logged as it was
    assert group0["lr"] == lr0  # kept: not NaN, not inf, not clamped to a bound
    # the healthy group takes its ordinary hypergradient step
    assert math.isfinite(group1["hypergrad"])
    assert group1["lr"] == min(max(lr1 + kwargs["hypergrad_lr"] * group1["hypergrad"], 0.0), lr_max)

    twin.param_groups[1]["lr"] = group1["lr"]
    _set_grads(twin_params, grads)
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
    # so only the bad entry is damaged, as with torch (before: every entry of u and v)
    assert torch.isfinite(v).all() and torch.isfinite(z).all()
    assert int((~torch.isfinite(u)).sum()) == 1


def test_a_group_with_zero_hypergrad_lr_is_torch_and_does_not_warn() -> None:
    w = torch.ones(3, dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=0.1, hypergrad_lr=0.0)
    w.grad = torch.ones(3, dtype=DT)
    opt.step()
    w.grad = torch.tensor([1.0, float("nan"), 1.0], dtype=DT)
    opt.step()  # filterwarnings = error: no warning, the rate is not being tuned
    assert opt.param_groups[0]["lr"] == 0.1 and math.isnan(opt.param_groups[0]["hypergrad"])


def test_the_warning_points_at_the_users_step_even_through_a_scheduler() -> None:
    w = torch.ones(2, dtype=DT, requires_grad=True)
    opt = AdamHD([w], lr=0.1, hypergrad_lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=5)  # wraps opt.step once more
    w.grad = torch.ones(2, dtype=DT)
    opt.step()
    w.grad = torch.tensor([float("inf"), 1.0], dtype=DT)
    with pytest.warns(RuntimeWarning, match="non-finite hypergradient") as record:
        opt.step()
    assert [r.filename for r in record] == [__file__]


# --------------------------------------------------------------------------------------------
# 2. load_state_dict of a state this optimiser cannot run: refused at once, nothing replaced


LOAD_CASES: list[tuple[type[Any], Any, str]] = [
    (AdamHD, lambda ps: torch.optim.AdamW(ps, lr=0.01), "decoupled_weight_decay=True"),
    (AdamHD, lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True), "fused=True"),
    (SGDHD, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True), "fused=True"),
    (SGDHD, lambda ps: torch.optim.Adam(ps, lr=0.01), "'momentum'"),
    (AdamHD, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), "'betas'"),
    (SGDHD, lambda ps: AdamHD(ps, lr=0.01), "'momentum'"),
]


@pytest.mark.parametrize(
    ("cls", "make_saved", "named"),
    LOAD_CASES,
    ids=["adamw", "adam-fused", "sgd-fused", "adam-into-sgdhd", "sgd-into-adamhd", "adamhd-into-sgdhd"],
)
def test_an_incompatible_state_dict_is_refused_at_load_and_changes_nothing(
    cls: type[Any], make_saved: Any, named: str
) -> None:
    gen = torch.Generator().manual_seed(1)
    saved_params = [
        torch.randn(3, generator=gen).requires_grad_(),
        torch.randn(2, generator=gen).requires_grad_(),
    ]
    saved = make_saved(saved_params)
    for _ in range(2):
        _set_grads(saved_params, _grads(gen, *saved_params))
        saved.step()

    params = [p.detach().clone().requires_grad_() for p in saved_params]
    twin_params = [p.detach().clone().requires_grad_() for p in saved_params]
    kwargs = {"lr": 0.01, "hypergrad_lr": 1e-3}
    opt, twin = cls(params, **kwargs), cls(twin_params, **kwargs)
    for _ in range(2):
        grads = _grads(gen, *params)
        _set_grads(params, grads)
        _set_grads(twin_params, grads)
        opt.step(), twin.step()

    with pytest.raises(ValueError, match=r"param group 0\b.*" + re.escape(named)):
        opt.load_state_dict(copy.deepcopy(saved.state_dict()))
    # untouched: it goes on exactly like its twin that never tried
    for _ in range(2):
        grads = _grads(gen, *params)
        _set_grads(params, grads)
        _set_grads(twin_params, grads)
        opt.step(), twin.step()
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"] != 0.01
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


def test_plain_torch_and_own_state_dicts_still_load() -> None:
    # the refusal is only for what cannot run: a foreach Adam state and an AdamHD state load
    gen = torch.Generator().manual_seed(2)
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.02, foreach=True), lambda ps: AdamHD(ps, lr=0.02)):
        ps = [torch.randn(3, generator=gen).requires_grad_()]
        src = make(ps)
        _set_grads(ps, _grads(gen, *ps))
        src.step()
        opt = AdamHD([torch.randn(3, generator=gen).requires_grad_()], lr=0.5)
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
        assert opt.param_groups[0]["lr"] == src.param_groups[0]["lr"]


def test_unpickling_an_incompatible_optimizer_is_refused() -> None:
    w = torch.zeros(2, requires_grad=True)
    opt = AdamHD([w], lr=0.01)
    opt.param_groups[0]["decoupled_weight_decay"] = True  # as a hand-edited pickle would carry
    blob = pickle.dumps(opt)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True"):
        pickle.loads(blob)


# --------------------------------------------------------------------------------------------
# 3. torch.optim's idioms that already hold


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_a_copied_model_and_optimizer_continue_bit_for_bit(cls: type[Any], how: str) -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, 1, generator=gen, dtype=DT))
        for _ in range(6)
    ]
    model = _mlp(0)
    opt = cls(model.parameters(), lr=0.05, hypergrad_lr=1e-2 if cls is SGDHD else 1e-3)

    def train(m: nn.Module, o: torch.optim.Optimizer, bs: list[tuple[Tensor, Tensor]]) -> list[float]:
        lrs = []
        for x, y in bs:
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            lrs.append(o.param_groups[0]["lr"])
        return lrs

    train(model, opt, batches[:3])
    pair = {"model": model, "opt": opt}
    copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert all(
        p is q
        for p, q in zip(copied["opt"].param_groups[0]["params"], copied["model"].parameters(), strict=True)
    )
    lrs = train(model, opt, batches[3:])
    assert train(copied["model"], copied["opt"], batches[3:]) == lrs
    for p, q in zip(model.parameters(), copied["model"].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_step_without_gradients_creates_no_state_and_moves_nothing(cls: type[Any]) -> None:
    # torch's test_step_is_noop_when_params_have_no_grad, plus the rate
    model = _mlp(1)
    frozen = nn.Linear(2, 2).to(DT).requires_grad_(False)
    opt = cls([{"params": model.parameters()}, {"params": frozen.parameters(), "lr": 0.3}], lr=0.1)
    before = [p.detach().clone() for p in [*model.parameters(), *frozen.parameters()]]
    for _ in range(3):
        opt.step()
    assert len(opt.state) == 0
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.3]
    assert [g["hypergrad"] for g in opt.param_groups] == [0.0, 0.0]
    for p, q in zip([*model.parameters(), *frozen.parameters()], before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_zero_gradients_keep_the_rate(cls: type[Any]) -> None:
    # torch's test_step_is_noop_for_zero_grads: nothing moves, and h = <0, d> = 0
    w = torch.randn(4, dtype=DT, requires_grad=True)
    before = w.detach().clone()
    opt = cls([w], lr=0.1, hypergrad_lr=0.5)
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["hypergrad"] == 0.0
    assert torch.equal(w, before)


@pytest.mark.parametrize(("lr0", "direction"), [(0.05, 1), (0.9, -1)], ids=["too-small", "too-large"])
def test_sgdhd_rate_follows_baydin_by_hand_and_moves_towards_the_optimal_step(
    lr0: float, direction: int
) -> None:
    # f(w) = a/2 ||w||²: the best constant step is 1/a. Below it the iterates keep their sign
    # (h = a² <w_{t-1}, w_{t-2}> > 0) and α grows; above it they flip (h < 0) and α shrinks.
    a, beta = 2.0, 0.02
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=lr0, hypergrad_lr=beta)
    prev_grad: Tensor | None = None
    lrs = [lr0]
    for _ in range(8):
        opt.zero_grad()
        (0.5 * a * (w**2).sum()).backward()
        assert w.grad is not None
        g = w.grad.detach().clone()
        h = 0.0 if prev_grad is None else float(g @ prev_grad)
        opt.step()
        assert opt.param_groups[0]["hypergrad"] == pytest.approx(h, rel=1e-14, abs=1e-300)
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1] + beta * h, rel=1e-14)
        lrs.append(opt.param_groups[0]["lr"])
        prev_grad = g
    moves = [b - c for b, c in zip(lrs[1:], lrs[:-1], strict=True)]
    assert all(direction * m >= 0 for m in moves)  # monotone, from the side it started on
    assert all(direction * (1 / a - lr) > 0 for lr in lrs)  # without crossing the optimum
    assert abs(lrs[-1] - 1 / a) < 0.05 < abs(lr0 - 1 / a)


def test_adamhd_rate_follows_baydin_by_hand_with_the_adam_direction() -> None:
    # α_t = α_{t-1} + β <g_t, u_{t-1}>, u = m̂ / (√v̂ + ε), computed here from scratch in float64
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, generator=gen, dtype=DT, requires_grad=True)
    b1, b2, eps, beta, wd = 0.8, 0.95, 1e-6, 0.01, 0.1
    opt = AdamHD([w], lr=0.02, betas=(b1, b2), eps=eps, weight_decay=wd, hypergrad_lr=beta)
    m = torch.zeros(5, dtype=DT)
    v = torch.zeros(5, dtype=DT)
    u_prev = torch.zeros(5, dtype=DT)
    lr = 0.02
    target = torch.randn(5, generator=gen, dtype=DT)
    for t in range(1, 7):
        opt.zero_grad()
        ((w - target) ** 4).sum().backward()
        assert w.grad is not None
        g = w.grad.detach() + wd * w.detach()
        lr = max(lr + beta * float(g @ u_prev), 0.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        expected_w = w.detach() - lr * u
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-13)
        torch.testing.assert_close(w.detach(), expected_w, rtol=1e-13, atol=1e-15)
        u_prev = u
    assert lr != 0.02


@pytest.mark.parametrize("cls", [SGDHD, AdamHD])
def test_reduce_on_plateau_scales_the_tuned_rate_and_lambda_lr_replaces_it(cls: type[Any]) -> None:
    # as documented: a multiplicative scheduler composes with the tuned rate, an outright one wins
    w = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    v = torch.tensor([0.5], dtype=DT, requires_grad=True)
    opt = cls([{"params": [w]}, {"params": [v]}], lr=0.05, hypergrad_lr=0.01)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for t in range(5):
        opt.zero_grad()
        ((w**2).sum() + (v**2).sum()).backward()
        opt.step()
        tuned = [g["lr"] for g in opt.param_groups]
        plateau.step(1.0)  # a flat metric: every step after the first is a plateau
        expected = tuned if t == 0 else [0.5 * lr for lr in tuned]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-15)
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]  # each group tuned its own

    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))
    base = [g["initial_lr"] for g in opt.param_groups]
    for epoch in range(1, 4):
        opt.zero_grad()
        ((w**2).sum() + (v**2).sum()).backward()
        opt.step()
        lam.step()
        assert [g["lr"] for g in opt.param_groups] == [b * (1.0 / (1 + epoch)) for b in base]
