"""Round 25, hyperparameter containers in real uses (helper "hparams").

Every hypergradient here is float64 and checked against an independent reference: the dense IFT
(``hg.testing.dense_ift_hypergradient``, plain autograd on the ordinary penalty) or central finite
differences of the real training loop.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergrad as hg
from hypergrad.testing import central_difference, dense_ift_hypergradient

DT = torch.float64


def _data(n_train: int = 12, n_val: int = 8, d_in: int = 3, d_out: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n_train, d_in, generator=g, dtype=DT),
        torch.randn(n_train, d_out, generator=g, dtype=DT),
        torch.randn(n_val, d_in, generator=g, dtype=DT),
        torch.randn(n_val, d_out, generator=g, dtype=DT),
    )


# ---------------------------------------------------------------------------------------------
# 1. A WeightDecay penalty evaluated on weights the train_loss transforms (functional_call on
#    w * s, w + noise, phi + delta): the by-hand second-order terms of Implicit and Unrolled were
#    matched to the weights by identity, found none, and were dropped: a hypergradient of exactly
#    0 (with a DisconnectedWarning blaming the user), where autograd's is far from 0.


class _LossWithPenalty(nn.Module):
    """A training objective as a module (a Lightning-style ``forward`` returning the loss), run
    through ``functional_call`` on transformed weights: the penalty sees the substituted tensors."""

    def __init__(self, model: nn.Module, hp: hg.hparams.WeightDecay) -> None:
        super().__init__()
        self.model = model
        self.hp = [hp]  # (a list: not a submodule)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.model(x) - y) ** 2).mean() + self.hp[0].penalty(self.model)


def _scaled_train_loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    assert isinstance(h, hg.hparams.WeightDecay)
    x, y = b
    scaled = {f"model.{n}": 1.5 * p for n, p in m.named_parameters()}
    return functional_call(_LossWithPenalty(m, h), scaled, (x, y))


def _mse(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def test_implicit_penalty_on_transformed_weights_matches_the_dense_ift() -> None:
    x, y, xv, yv = _data(20)
    torch.manual_seed(1)
    model = nn.Linear(3, 2).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.3)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=300,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _scaled_train_loss(model, hp, (x, y))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    ref = dense_ift_hypergradient(model, hp, _scaled_train_loss, _mse, (x, y), (xv, yv))
    hopt = hg.Implicit(
        model,
        hp,
        _scaled_train_loss,
        _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the DisconnectedWarning of the bug)
        got, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert max(float(r.abs().max()) for r in ref) > 1e-3
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


def test_unrolled_penalty_on_transformed_weights_matches_finite_differences() -> None:
    x, y, xv, yv = _data(12)

    def run(raw: torch.Tensor | None = None) -> tuple[nn.Module, hg.Unrolled]:
        torch.manual_seed(1)
        model = nn.Linear(3, 2).to(DT)
        hp = hg.hparams.WeightDecay(model, per="global", init=0.3)
        if raw is not None:
            with torch.no_grad():
                hp.raw[0].copy_(raw)
        hopt = hg.Unrolled(
            model,
            hp,
            _scaled_train_loss,
            _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=3,
        )
        for i in range(3):
            hopt.step((x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]))
        return model, hopt

    model, hopt = run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = hopt.hypergradient(val_batch=(xv, yv))
    assert isinstance(hopt.hparams, hg.hparams.WeightDecay)
    t = hopt.hparams.raw[0].detach().clone()
    fd = central_difference(lambda: float(_mse(run(t)[0], None, (xv, yv)).detach()), t, eps=1e-6)  # type: ignore[arg-type]
    assert abs(float(fd)) > 1e-3
    torch.testing.assert_close(got[0], fd, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 2. OptimizerSetting(relative=True) on a setting asked for in 'unit' (a momentum, RMSprop's
#    alpha): the requested constraint was dropped for the multiplier's 'positive', and a product
#    of 1 or more was written into the optimiser silently (a momentum of 1.08: divergence), by
#    an init or by an outer step that the round-24 domain guard accepted.


def _relative_momentum(init: float) -> tuple[nn.Module, torch.optim.Optimizer, hg.hparams.OptimizerSetting]:
    torch.manual_seed(1)
    model = nn.Linear(2, 1).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, hg.hparams.OptimizerSetting(opt, "momentum", "unit", init=init, relative=True)


def test_relative_unit_setting_refuses_to_write_a_momentum_of_one_or_more() -> None:
    model, opt, hp = _relative_momentum(1.2)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=2,
    )
    written: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: written.append(o.param_groups[0]["momentum"]))
    x, y, _, _ = _data(4, d_in=2, d_out=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the ReplayWarning about the observing hook)
        hopt.step((x, y))
    assert written == []  # nothing reached the optimiser
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_outer_step_taking_a_relative_momentum_past_one_is_refused_and_undone() -> None:
    model, opt, hp = _relative_momentum(1.05)  # 0.945: inside (0, 1)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0),
        steps=2,
    )
    x, y, xv, yv = _data(8, d_in=2, d_out=1)
    hopt.step((x[:4], y[:4]))
    hopt.step((x[4:], y[4:]))
    raw = hp.raw.detach().clone()

    def push_up(optimizer: torch.optim.Optimizer, *_: object) -> None:
        hp.raw.grad = torch.full_like(hp.raw, -1.0)  # log-multiplier + 1: x e, 0.945 -> 2.6

    opt_hook = hopt.outer_optimizer.register_step_pre_hook(push_up)
    try:
        with pytest.raises(hg.NonFiniteError, match="leave their domain"):
            hopt.hyper_step(val_batch=(xv, yv))
    finally:
        opt_hook.remove()
    assert torch.equal(hp.raw.detach(), raw)  # undone


def test_relative_unit_setting_inside_the_domain_still_trains() -> None:
    """Passes today; guards the fix above against refusing a legitimate multiplier (0.9 x 1.05)
    or changing what is written."""
    model, opt, hp = _relative_momentum(1.05)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=2,
    )
    written: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: written.append(o.param_groups[0]["momentum"]))
    x, y, _, _ = _data(4, d_in=2, d_out=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the ReplayWarning about the observing hook)
        hopt.step((x, y))
    assert written == pytest.approx([0.9 * 1.05], rel=1e-12)
    assert opt.param_groups[0]["momentum"] == 0.9  # given back after the step


# ---------------------------------------------------------------------------------------------
# 3. (Pass today; not covered before: no test tuned Adadelta's rho nor ASGD's lambd / alpha.)
#    Settings read by torch.optim inside its step's scalar arithmetic, tuned per param group
#    under a StepLR, against central differences of torch's own steps.


@pytest.mark.parametrize(
    "make, settings",
    [
        (lambda groups: torch.optim.Adadelta(groups, lr=1.0, rho=0.8), [("rho", "unit")]),
        (
            lambda groups: torch.optim.ASGD(groups, lr=0.05, lambd=0.01, alpha=0.75),
            [("lambd", "positive"), ("alpha", "positive")],
        ),
    ],
    ids=["adadelta-rho", "asgd-lambd-alpha"],
)
def test_scalar_optimizer_settings_per_group_match_finite_differences(make: object, settings: list) -> None:
    x, y, xv, yv = _data(12, d_out=1)
    k = 3
    # ASGD keeps its step size eta and averaging weight mu as tensors of torch's default dtype:
    # in float32 the central differences would see a rounded eta (0 for alpha), not the float64 steps
    default = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:

        def run(raws: list[torch.Tensor] | None = None) -> tuple[nn.Module, hg.Unrolled]:
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
            opt = make([{"params": model[0].parameters()}, {"params": model[2].parameters()}])  # type: ignore[operator]
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
            hp = nn.ModuleDict({n: hg.hparams.OptimizerSetting(opt, n, c) for n, c in settings})
            hp.add_module("lr", hg.hparams.LearningRate(opt, relative=True))
            if raws is not None:
                with torch.no_grad():
                    for p, r in zip(hp.parameters(), raws, strict=True):
                        p.copy_(r)
            hopt = hg.Unrolled(
                model, hp, _mse, _mse, inner_optimizer=opt,
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=k,
            )  # fmt: skip
            for i in range(k):
                hopt.step((x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]))
                sched.step()
            return model, hopt

        _, hopt = run()
        got, _ = hopt.hypergradient(val_batch=(xv, yv))
        base = [p.detach().clone() for p in hopt.hparams.parameters()]
        for j, b in enumerate(base):
            t = b.clone()

            def outer(j: int = j, t: torch.Tensor = t) -> float:
                raws = [c.clone() for c in base]
                raws[j] = t
                return float(_mse(run(raws)[0], nn.Module(), (xv, yv)).detach())

            fd = central_difference(outer, t, eps=1e-6)
            assert float(fd.abs().max()) > 1e-5
            torch.testing.assert_close(got[j], fd, rtol=1e-5, atol=1e-9)
    finally:
        torch.set_default_dtype(default)
