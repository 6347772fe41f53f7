"""Review of the day's features: WeightDecay's shortcut penalties (Unrolled's valued penalty,
Implicit's first-order penalty and by-hand second derivatives) against plain autograd when the
training loss is not ``c * penalty + rest`` with ``c`` free of the weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(12, 5, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g))
        for _ in range(n)
    ]


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _weight_scaled(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + (1 + m[0].weight.sum() ** 2) * h.penalty(m)


def _squared(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + 10 * h.penalty(m) ** 2


def _hp_scaled(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.scale() * h.wd.penalty(m)


class _Scaled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        self.scale = hg.hparams.Hparam(torch.tensor(2.0, dtype=DT))


def _setup(loss: Any) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    hp: nn.Module = (
        _Scaled(model) if loss is _hp_scaled else hg.hparams.WeightDecay(model, per="layer", init=0.05)
    )
    return model, hp, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def _unrolled(loss: Any, plain: bool, checkpoint: bool = False) -> torch.Tensor:
    data = _batches(4)
    model, hp, opt = _setup(loss)
    hopt = hg.Unrolled(
        model, hp, loss, _ce, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, checkpoint=checkpoint,
    )
    if plain:
        hopt._decays = []  # the ordinary penalty, differentiated by autograd
    for b in data[:3]:
        hopt.step(b)
    hopt.hyper_step(val_batch=data[3])
    return torch.cat([p.grad.reshape(-1) for p in hp.parameters()])


@pytest.mark.parametrize("loss", [_weight_scaled, _squared, _hp_scaled])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_unrolled_valued_penalty_matches_autograd(loss: Any, checkpoint: bool) -> None:
    # f(w) * penalty and penalty ** 2 lost product-rule terms (1.7-11% off)
    ref = _unrolled(loss, plain=True)
    got = _unrolled(loss, plain=False, checkpoint=checkpoint)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def _implicit(loss: Any, analytic: bool) -> torch.Tensor:
    data = _batches(2)
    model, hp, opt = _setup(loss)
    hopt = hg.Implicit(
        model, hp, loss, _ce, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=hg.Direct(),
    )
    hopt.analytic_penalties = analytic
    for _ in range(2):
        hopt.step(data[0])
    hopt.hyper_step(train_batch=data[0], val_batch=data[1])
    return torch.cat([p.grad.reshape(-1) for p in hp.parameters()])


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("loss", [_weight_scaled, _squared, _hp_scaled])
def test_implicit_first_order_penalty_matches_autograd(loss: Any) -> None:
    # the by-hand mixed term missed d(penalty)/d(lambda) * f'(w) x (2-32% off)
    ref = _implicit(loss, analytic=False)
    torch.testing.assert_close(_implicit(loss, analytic=True), ref, rtol=1e-10, atol=1e-14)


def test_neumann_warm_start_does_not_compound_growth() -> None:
    # an indefinite Hessian: the warm-started Richardson iteration multiplied its error by ~30 every
    # hyperstep (status 'fixed', hypergradient 5 -> 1.7e5 in three hypersteps)
    a = torch.diag(torch.tensor([1.0, -5.0, 0.5], dtype=DT))

    class _M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.1, 0.2, 0.3], dtype=DT))

    def run(warm: bool) -> list[torch.Tensor]:
        m, h = _M(), hg.hparams.Hparam(torch.ones(3, dtype=DT), "real")
        hopt = hg.Implicit(
            m, h, lambda m, h, b: 0.5 * m.w @ a @ m.w + (h() * m.w).sum(), lambda m, h, b: (m.w**2).sum(),
            inner_optimizer=torch.optim.Adam(m.parameters(), lr=1e-9),
            outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.0),
            solver=hg.Neumann(steps=5, warm_start=warm),
        )
        out = []
        b = torch.zeros(1, dtype=DT)
        for _ in range(4):
            hopt.step(b)
            hopt.hyper_step(train_batch=b, val_batch=b)
            out.append(h.raw.grad.clone())
        return out

    for got, ref in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
