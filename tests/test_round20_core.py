"""Round 20 (my own findings beside the helpers' files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)


def _hypergradient(make: Callable[..., hg.HyperOptimizer], shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2)

    def train_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return (nn.functional.cross_entropy(m(b[0]), b[1]) + h.penalty(m)).reshape(shape)

    def val_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1]).reshape(shape)

    hopt = make(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1e-2),
    )
    batch = _data()
    for _ in range(3):
        hopt.step(batch)
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=batch)
    return torch.cat([g.flatten() for g in grads])


MAKERS = {
    "implicit-cg": lambda *a, **k: hg.Implicit(*a, solver=hg.CG(maxiter=10), **k),
    "unrolled": lambda *a, **k: hg.Unrolled(*a, steps=3, **k),
    "unrolled-forward": lambda *a, **k: hg.Unrolled(*a, steps=3, mode="forward", **k),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_one_element_loss_is_a_scalar_as_for_backward(name: str) -> None:
    """A loss of shape (1,) (``loss = torch.zeros(1)`` accumulated over terms, common in research
    code) was refused by every HyperOptimizer although ``loss.backward()`` takes it, and so do
    ``hg.unrolled_hypergradient`` and ``hg.testing.dense_ift_hypergradient``. Now it is the
    scalar: the hypergradient is bit-identical to the 0-d loss's."""
    ref = _hypergradient(MAKERS[name], ())
    got = _hypergradient(MAKERS[name], (1,))
    assert ref.abs().max() > 1e-6
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    got11 = _hypergradient(MAKERS[name], (1, 1))
    torch.testing.assert_close(got11, ref, rtol=0, atol=0)


def test_a_loss_of_several_entries_is_still_refused_naming_its_shape() -> None:
    with pytest.raises(ValueError, match=r"must return a scalar Tensor; train_loss returned \(2,\)"):
        _two()


def _two() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    hp = hg.hparams.WeightDecay(model, init=1e-2)

    def train_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")[:2]

    hopt = hg.Implicit(
        model, hp, train_loss, train_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1e-2),
    )  # fmt: skip
    hopt.step(_data())


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 50)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.emb(t)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.head(a + h)


def test_attention_with_adam_gives_no_false_replay_warning() -> None:
    """Attention's key bias has gradient exactly 0 (softmax is invariant to it), so training
    computes rounding noise there, and Adam's first steps turn noise into steps of +-lr. The
    replay runs SDPA's math kernel (twice differentiable), training the fused one: another
    noise, so those 32 of 7,474 entries ended 6e-4 away, and every transformer tuned with Adam
    got a ReplayWarning saying its hypergradient was that of other steps. The check now
    tolerates a fraction of 1% of the entries; a replay that is really off (own-Generator
    dropout, a step counter: tests/test_replay.py and others) still warns."""
    torch.manual_seed(0)
    model = _Attention()
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-3)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())

    def train_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return loss(m, h, b) + h.penalty(m)

    hopt = hg.Unrolled(
        model, hp, train_loss, loss, steps=5,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 50, (8, 16), generator=g), torch.randint(0, 50, (8, 16), generator=g)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)
        for _ in range(5):
            hopt.step(batch())
        info = hopt.hyper_step(val_batch=batch())
    assert info.hypergrad_norm > 0
