"""``Unrolled(checkpoint=True)``: one replayed step's graph alive at a time. The same
hypergradient as the plain reverse mode (float64, to rounding) for every replayed optimiser,
with BatchNorm, dropout (replayed RNG), frozen weights and tuned optimiser settings; a lower
allocator peak; clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


class _Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(5, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.2)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(self.drop(F.relu(self.bn(self.a(x)))))))


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 5, generator=g, dtype=DT), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.02, amsgrad=True, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
}


def _run(make_opt: Callable, checkpoint: bool, tune_lr: bool = False, steps: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _Net().to(DT)
    wd = hg.hparams.WeightDecay(model, per="parameter", init=1e-2)
    opt = make_opt(model.parameters())
    hp: nn.Module = wd
    if tune_lr:
        hp = nn.ModuleDict({"wd": wd, "lr": hg.hparams.LearningRate(opt, relative=True)}).to(DT)

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        decay = h["wd"] if isinstance(h, nn.ModuleDict) else h
        return _ce(m, h, b) + decay.penalty(m)  # type: ignore[operator]

    hopt = hg.Unrolled(
        model, hp, train, _ce, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.05), steps=steps, checkpoint=checkpoint,
    )
    data = _batches(12)
    vb = _batches(1, size=24)[0]
    torch.manual_seed(1)  # the dropout masks of the real steps (replayed from the recorded RNG)
    for i, b in enumerate(data[:10]):
        hopt.step(b)
        if i % 5 == 4:
            hopt.hyper_step(val_batch=vb)
    return [p.grad.clone() for p in hp.parameters()] + [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpointed_equals_plain_reverse_mode(name: str) -> None:
    plain, ckpt = _run(OPTIMIZERS[name], False), _run(OPTIMIZERS[name], True)
    assert any(float(g.abs().max()) > 0 for g in plain)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


def test_checkpointed_with_a_tuned_learning_rate() -> None:
    plain, ckpt = (_run(OPTIMIZERS["sgd_momentum_nesterov"], c, tune_lr=True) for c in (False, True))
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


def test_checkpointed_peak_is_lower() -> None:
    """The allocator's peak above the live baseline during a K = 6 hyperstep on an MLP: one step's
    graph at a time instead of six."""
    from torch.profiler import ProfilerActivity, profile

    def peak(checkpoint: bool) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
        hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-3)
        hopt = hg.Unrolled(
            model, hp, lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + h.penalty(m),
            lambda m, h, b: F.cross_entropy(m(b[0]), b[1]),
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=6, checkpoint=checkpoint,
        )
        g = torch.Generator().manual_seed(0)
        data = [
            (torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)) for _ in range(7)
        ]
        for b in data[:6]:
            hopt.step(b)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            hopt.hyper_step(val_batch=data[6])
        assert prof.profiler is not None
        running = best = 0
        for e in prof.profiler.kineto_results.events():
            if e.name() == "[memory]":
                running += e.nbytes()
                best = max(best, running)
        return best

    plain, ckpt = peak(False), peak(True)
    assert ckpt < 0.6 * plain, (ckpt, plain)


def test_checkpoint_is_a_reverse_mode_option() -> None:
    model = nn.Linear(3, 2)
    hp = hg.hparams.WeightDecay(model, per="global")
    kw: dict[str, Any] = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    with pytest.raises(ValueError, match="reverse-mode option"):
        hg.Unrolled(model, hp, _ce, _ce, mode="forward", checkpoint=True, **kw)
    with pytest.raises(TypeError, match="checkpoint must be True or False"):
        hg.Unrolled(model, hp, _ce, _ce, checkpoint="yes", **kw)  # type: ignore[arg-type]
