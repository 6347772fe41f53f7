"""A ``torch.compile``d model: inner steps run the compiled module; hypergradients (which need
double backward, which compiled graphs lack) run on the module under it. Same results as eager."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def _run(method: str, compiled: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = torch.compile(eager, backend="aot_eager") if compiled else eager
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2)
    kw: dict[str, Any] = (
        {"solver": hg.CG(maxiter=10, damping=1e-3)} if method == "implicit" else {"steps": 3}
    )
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(
        model, hp, _train, _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        **kw,
    )
    data = _batches(7)
    for i, b in enumerate(data[:6]):
        hopt.step(b)
        if i % 3 == 2:
            hopt.hyper_step(train_batch=b, val_batch=data[6])
    return [p.detach().clone() for p in eager.parameters()], [p.detach().clone() for p in hp.parameters()]


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_compiled_model_trains_and_tunes_like_eager(method: str) -> None:
    torch._dynamo.reset()
    w_eager, h_eager = _run(method, compiled=False)
    w_comp, h_comp = _run(method, compiled=True)
    for a, b in zip(w_eager + h_eager, w_comp + h_comp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    moved_apart = [not torch.equal(h, torch.full_like(h, h.flatten()[0])) for h in h_comp]
    assert any(moved_apart)


def test_weight_decay_names_look_through_wrappers() -> None:
    eager = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled = torch.compile(eager, backend="aot_eager")
    a = hg.hparams.WeightDecay(eager, per="parameter")
    b = hg.hparams.WeightDecay(compiled, per="parameter")
    assert a.names == b.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_()
    torch.testing.assert_close(b.penalty(compiled), a.penalty(eager))
    torch.testing.assert_close(b.penalty(eager), a.penalty(compiled))
    assert copy.deepcopy(b).names == a.names
