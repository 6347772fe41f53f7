"""Gradient clipping in the inner step: ``hopt.step(batch, max_grad_norm=c)`` is
``clip_grad_norm_(weights, c)`` between ``backward()`` and ``optimizer.step()``, and Unrolled
replays and differentiates it (checked against central differences of real ``torch.optim``
training with ``clip_grad_norm_``, in float64)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
K = 4
CLIP = 0.05  # below every step's gradient norm here (~0.2-0.6): the clipping binds


def _batches(n: int = K + 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(12, 5, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)
    ]


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _build() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.5)
    return m, opt, hp


def _real(lam: torch.Tensor | None, data: list, clip: float | None) -> tuple[float, nn.Module]:
    """L_V after K torch.optim steps with clip_grad_norm_ (at hyperparameters ``lam``)."""
    model, opt, hp = _build()
    if lam is not None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(lam, hp.parameters())
    for b in data[:K]:
        opt.zero_grad()
        _train(model, hp, b).backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > clip  # it binds
        opt.step()
    with torch.no_grad():
        return float(_ce(model, hp, data[K])), model


def _hopt(kind: str, **kw: Any) -> hg.HyperOptimizer:
    model, opt, hp = _build()
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    if kind == "implicit":
        return hg.Implicit(model, hp, _train, _ce, inner_optimizer=opt, outer_optimizer=outer, **kw)
    mode, _, ckpt = kind.partition("-")
    return hg.Unrolled(
        model, hp, _train, _ce, inner_optimizer=opt, outer_optimizer=outer, steps=K,
        mode=mode, checkpoint=bool(ckpt), **kw,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["implicit", "reverse", "forward"])
def test_step_clips_like_clip_grad_norm(kind: str) -> None:
    data = _batches()
    hopt = _hopt(kind)
    for b in data[:K]:
        hopt.step(b, max_grad_norm=CLIP)
    _, real = _real(None, data, CLIP)
    for got, want in zip(hopt.model.parameters(), real.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["reverse", "reverse-ckpt", "forward"])
def test_unrolled_differentiates_through_the_clipping(kind: str) -> None:
    data = _batches()
    hopt = _hopt(kind)
    lam0 = torch.nn.utils.parameters_to_vector(hopt.hparams.parameters()).detach().clone()
    for b in data[:K]:
        hopt.step(b, max_grad_norm=CLIP)
    _, real = _real(None, data, CLIP)
    for got, want in zip(hopt.replayed_weights(), real.parameters(), strict=True):  # replay = real steps
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    grads, _ = hopt.hypergradient(val_batch=data[K])
    g = torch.cat([t.reshape(-1) for t in grads])
    eps = 1e-6
    fd = torch.zeros_like(lam0)
    for i in range(len(lam0)):
        e = torch.zeros_like(lam0)
        e[i] = eps
        fd[i] = (_real(lam0 + e, data, CLIP)[0] - _real(lam0 - e, data, CLIP)[0]) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))
    # the clipping matters: the hypergradient of the unclipped steps is far from it
    unclipped = torch.zeros_like(lam0)
    for i in range(len(lam0)):
        e = torch.zeros_like(lam0)
        e[i] = eps
        unclipped[i] = (_real(lam0 + e, data, None)[0] - _real(lam0 - e, data, None)[0]) / (2 * eps)
    assert float((unclipped - fd).abs().max()) > 0.1 * float(fd.abs().max())


def test_recorded_clipping_survives_a_resume() -> None:
    data = _batches()
    a = _hopt("reverse")
    for b in data[:K]:
        a.step(b, max_grad_norm=CLIP)
    state = copy.deepcopy(a.state_dict())
    b_ = _hopt("reverse")
    b_.load_state_dict(state)
    ga, _ = a.hypergradient(val_batch=data[K])
    gb, _ = b_.hypergradient(val_batch=data[K])
    for x, y in zip(ga, gb, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", True, torch.tensor([1.0, 2.0])])
def test_bad_max_grad_norm_is_named(bad: Any) -> None:
    hopt = _hopt("reverse")
    before = [p.detach().clone() for p in hopt.model.parameters()]
    with pytest.raises(ValueError, match="max_grad_norm"):
        hopt.step(_batches()[0], max_grad_norm=bad)
    assert all(torch.equal(p, q) for p, q in zip(hopt.model.parameters(), before, strict=True))


def test_nonfinite_step_with_clipping_is_still_refused() -> None:
    hopt = _hopt("reverse", on_nonfinite="skip")
    x, y = _batches()[0]
    before = [p.detach().clone() for p in hopt.model.parameters()]
    with pytest.warns(RuntimeWarning):
        hopt.step((x * math.nan, y), max_grad_norm=CLIP)
    assert all(torch.equal(p, q) for p, q in zip(hopt.model.parameters(), before, strict=True))
