"""Round 16 (core): Implicit and a model that keeps state in plain attributes.

- A language model whose forward stores its hidden state on itself (``self.hidden =
  h.detach()``, as char-RNN and AWD-LSTM-style scripts do): inside an Implicit hyperstep the
  validation loss wrote the validation batch's hidden state onto the model, the training loss
  (Hessian and mixed term) then started from it, and the next ``step`` did too. Each loss now
  starts from copies of the attributes' values at the hyperstep's start, as it starts from
  copies of the buffers: the hypergradient equals that of the same model keeping its state in
  registered buffers (float64, to rounding), and the model's attributes are left as they were.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64
V, E, B, T = 7, 4, 3, 5  # vocabulary, width, batch, sequence length


class _LM(nn.Module):
    """Embedding -> LSTM -> linear; the hidden state carried between batches in a registered
    buffer pair or in a plain attribute, which the forward reassigns (detached)."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, E, batch_first=True)
        self.out = nn.Linear(E, V)
        self.keep = keep
        if keep == "buffer":
            self.register_buffer("h", torch.zeros(1, B, E))
            self.register_buffer("c", torch.zeros(1, B, E))
        self.hidden: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        e = self.emb(x)
        if self.keep == "buffer":
            o, (h, c) = self.lstm(e, (self.h, self.c))
            self.h, self.c = h.detach(), c.detach()
        else:
            o, hidden = self.lstm(e, self.hidden)
            self.hidden = (hidden[0].detach(), hidden[1].detach())
        return self.out(o)


def _batches(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(n)
    ]


def _loss(model: nn.Module, hp: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def _train_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: tuple[Tensor, Tensor]) -> Tensor:
    return _loss(model, hp, batch) + hp.penalty(model)


def _run(keep: str, solver: hg.LinearSolver) -> tuple[hg.Implicit, nn.Module, list[Tensor]]:
    model = _LM(keep).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2).to(DT)
    hopt = hg.Implicit(
        model,
        hp,
        _train_loss,
        _loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0),
        solver=solver,
    )
    train, val = _batches(4, 1), _batches(2, 2)
    grads = []
    for k, b in enumerate(train):
        hopt.step(b)
        if k % 2 == 1:
            hopt.hyper_step(train_batch=train[k], val_batch=val[k // 2])
            grads.append(torch.cat([p.grad.reshape(-1) for p in hp.parameters()]).clone())
    return hopt, model, grads


@pytest.mark.parametrize(
    "solver",
    [hg.CG(maxiter=30, tol=1e-12, damping=0.1), hg.Neumann(steps=4, alpha=0.05)],
    ids=["cg", "neumann"],
)
def test_implicit_hypergradient_with_state_in_attributes_equals_state_in_buffers(solver):
    _, m_buf, g_buf = _run("buffer", solver)
    _, m_att, g_att = _run("attribute", solver)
    assert len(g_buf) == len(g_att) == 2
    for a, b in zip(g_att, g_buf, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the same training afterwards: the hidden state the last step left, and the same weights
    torch.testing.assert_close(m_att.hidden[0], m_buf.h)
    for p, q in zip(m_att.parameters(), m_buf.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_implicit_hyperstep_leaves_the_models_attribute_state_as_it_was():
    hopt, model, _ = _run("attribute", hg.CG(maxiter=5, tol=1e-10))
    train, val = _batches(1, 5), _batches(1, 6)
    hopt.step(train[0])
    before = model.hidden
    assert before is not None
    values = copy.deepcopy(before)
    hopt.hyper_step(train_batch=train[0], val_batch=val[0])
    assert model.hidden is before  # the very objects
    for a, b in zip(model.hidden, values, strict=True):
        assert torch.equal(a, b)
