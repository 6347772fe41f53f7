"""Unrolled against central differences of *real* training: the same K ``torch.optim`` steps (with
their schedulers, param groups, hooks, tied or shared weights) re-run from the same start at
lambda +- eps, in float64. A reference that shares no code with the replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
K = 4
Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer, Any, nn.Module]]


def _batches(seed: int = 0, n: int = K + 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 5, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g))
        for _ in range(n)
    ]


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _real_outer(build: Build, lam: torch.Tensor, data: list) -> float:
    """L_V after K plain torch.optim steps at hyperparameters ``lam``."""
    model, opt, sched, hp = build()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(lam, hp.parameters())
    for b in data[:K]:
        opt.zero_grad()
        _train(model, hp, b).backward()
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        return float(_ce(model, hp, data[K]))


def _check(build: Build, mode: str = "reverse", eps: float = 1e-6) -> None:
    data = _batches()
    model, opt, sched, hp = build()
    lam0 = torch.nn.utils.parameters_to_vector(hp.parameters()).detach().clone()
    hopt = hg.Unrolled(
        model, hp, _train, _ce, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=K, mode=mode,
    )
    for b in data[:K]:
        hopt.step(b)
        if sched is not None:
            sched.step()
    trained = [w for w in model.parameters() if w.requires_grad]
    for got, real in zip(hopt.replayed_weights(), trained, strict=True):
        torch.testing.assert_close(got, real.detach(), rtol=1e-12, atol=1e-12)
    hopt.hyper_step(val_batch=data[K])
    g = torch.nn.utils.parameters_to_vector([p.grad for p in hp.parameters()])
    fd = torch.zeros_like(lam0)
    for i in range(len(lam0)):
        e = torch.zeros_like(lam0)
        e[i] = eps
        fd[i] = (_real_outer(build, lam0 + e, data) - _real_outer(build, lam0 - e, data)) / (2 * eps)
    assert fd.abs().max() > 1e-5  # the check has something to check
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _with(make_opt: Callable[[nn.Module], torch.optim.Optimizer], sched: Callable | None = None) -> Build:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, Any, nn.Module]:
        m = _mlp()
        opt = make_opt(m)
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.05)
        return m, opt, None if sched is None else sched(opt), hp

    return build


OPTIMIZERS: dict[str, Build] = {
    "rmsprop": _with(lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, alpha=0.9)),
    "rmsprop_centered_momentum_wd": _with(
        lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True, weight_decay=0.01)
    ),
    "adagrad": _with(
        lambda m: torch.optim.Adagrad(
            m.parameters(), lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1
        )
    ),
    "sgd_onecycle": _with(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=10),
    ),
    "adam_groups_steplr": _with(
        lambda m: torch.optim.Adam(
            [{"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.01}, {"params": m[2].parameters()}],
            lr=0.02,
            betas=(0.8, 0.95),
        ),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_finite_differences_of_real_training(name: str) -> None:
    _check(OPTIMIZERS[name])


@pytest.mark.parametrize("name", ["rmsprop_centered_momentum_wd", "adagrad"])
def test_forward_mode_matches_finite_differences_of_real_training(name: str) -> None:
    _check(OPTIMIZERS[name], mode="forward")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 3, bias=False)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3, bias=False)
        self.out.weight = self.mid.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 5)
        self.b = self.a  # the same submodule twice
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(self.frozen(x))))))


def _tied() -> tuple[nn.Module, torch.optim.Optimizer, Any, nn.Module]:
    m = _Tied().double()
    return m, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), None, hg.hparams.WeightDecay(
        m, per="parameter", init=0.05
    )


def _shared() -> tuple[nn.Module, torch.optim.Optimizer, Any, nn.Module]:
    m = _Shared().double()
    hp = hg.hparams.WeightDecay(m, per="parameter", init=0.05, include=lambda n: not n.startswith("unused"))
    return m, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True), None, hp


def _hooked() -> tuple[nn.Module, torch.optim.Optimizer, Any, nn.Module]:
    m = _mlp()
    m[0].register_forward_hook(lambda mod, i, o: o * 1.5)
    m[2].register_forward_pre_hook(lambda mod, i: (i[0] + 0.1,))
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.05)
    return m, torch.optim.AdamW(m.parameters(), lr=0.05), None, hp


@pytest.mark.parametrize("build", [_tied, _shared, _hooked], ids=["tied", "shared_frozen_unused", "hooks"])
def test_model_structure_matches_finite_differences_of_real_training(build: Build) -> None:
    _check(build)


def test_unsupported_optimizer_is_named() -> None:
    m = _mlp()
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.05)
    names = "ASGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, Muon, NAdam, RAdam, RMSprop, Rprop, SGD"
    with pytest.raises(TypeError, match=rf"{names}; got SparseAdam"):
        hg.Unrolled(
            m, hp, _train, _ce, inner_optimizer=torch.optim.SparseAdam(m.parameters()),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=2,
        )
