"""Mixed precision: losses under bfloat16 autocast give hypergradients close to float32's."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg


def _hypergradient(method: str, autocast: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3))
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)

    def ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(b[0])
        return nn.functional.cross_entropy(out.float(), b[1])

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return ce(m, h, b) + h.penalty(m)

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    hopt: hg.HyperOptimizer
    if method == "implicit":
        hopt = hg.Implicit(
            model,
            hp,
            train,
            ce,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.Neumann(steps=5, alpha=0.1),
        )
    else:
        hopt = hg.Unrolled(model, hp, train, ce, inner_optimizer=inner, outer_optimizer=outer, steps=4)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(128, 8, generator=g), torch.randint(0, 3, (128,), generator=g)) for _ in range(5)]
    for b in batches[:4]:
        hopt.step(b)
    grads, info = hopt.hypergradient(train_batch=batches[3], val_batch=batches[4])
    assert not info.skipped
    return torch.cat([t.reshape(-1) for t in grads])


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_bfloat16_autocast_hypergradient_is_close_to_float32(method: str) -> None:
    full, half = _hypergradient(method, False), _hypergradient(method, True)
    assert torch.isfinite(half).all() and float(half.norm()) > 0
    cosine = float(torch.nn.functional.cosine_similarity(full, half, dim=0))
    assert cosine > 0.999, cosine
    assert float((half - full).norm() / full.norm()) < 0.02
