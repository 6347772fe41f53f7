"""Round 19 (the session's own changes): Unrolled's per-step overheads, kept exact."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _mlp(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o)).to(DT)


def test_a_fused_optimizer_other_than_the_outer_one_is_seen_by_the_replay() -> None:
    """Unrolled notices hyperparameters moved by any fused ``torch.optim`` step (whose kernels do
    not bump version counters), not only by its own outer optimiser: here the run's outer
    optimiser is plain SGD and the user steps the hyperparameters with a separate fused Adam on
    ``hypergradient()``'s output. Before, only a fused *outer* optimiser was checked (by comparing
    every value at every step: 0.5 ms a step for 269k decays), and this run replayed the steps
    taken after the outer step with the old values (3e-6 off). Its hypergradients must equal those of the
    same run stepping with a non-fused Adam (whose writes bump version counters)."""
    torch.manual_seed(0)
    xs, ys = torch.randn(10, 6, 3, dtype=DT), torch.randn(10, 6, 1, dtype=DT)
    val = (torch.randn(7, 3, dtype=DT), torch.randn(7, 1, dtype=DT))

    def loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    def run(fused: bool) -> list[Tensor]:
        torch.manual_seed(3)
        model = _mlp(3, 4, 1)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        outer = torch.optim.SGD(hp.parameters(), lr=0.1)  # never stepped
        mine = torch.optim.Adam(hp.parameters(), lr=0.2, fused=fused, foreach=None if fused else False)
        hopt = hg.Unrolled(model, hp, loss, loss, inner_optimizer=inner, outer_optimizer=outer, steps=3)
        out = []
        for i in range(10):
            hopt.step((xs[i], ys[i]))
            if i % 2 == 1:  # (every 2 steps, K = 3: a move inside a window)
                grads, _ = hopt.hypergradient(val_batch=val)
                out.append(torch.cat([g.reshape(-1) for g in grads]))
                for p, g in zip(hp.parameters(), grads, strict=True):
                    p.grad = g
                mine.step()
        grads, _ = hopt.hypergradient(val_batch=val)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
        return out

    plain, fused = run(fused=False), run(fused=True)
    assert len(plain) == 6
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(plain[0], plain[-1])  # (the outer steps did move them)


def test_fused_steps_are_counted_per_tensor() -> None:
    """The write counter moves with a fused optimiser's step (the version counter does not) and
    with an in-place write, and stays for a non-fused optimiser that holds other tensors."""
    from hypergrad._functional import write_count

    p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    p.grad, q.grad = torch.randn(5), torch.randn(5)
    before = write_count(p)
    torch.optim.Adam([p], lr=0.1, fused=True).step()
    after = write_count(p)
    assert after != before and after[0] == before[0]  # (the fused kernel left _version alone)
    torch.optim.SGD([q], lr=0.1).step()
    assert write_count(p) == after
    with torch.no_grad():
        p.add_(1.0)
    assert write_count(p) != after
