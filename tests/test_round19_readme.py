"""Round 19 (readme): the project as a newcomer meets it: scripts written from README.md alone
for each family, with ordinary training-loop conventions, and what the README's prose promises.

README.md's blocks, the docstrings' ``>>>`` examples (``--doctest-modules``) and the CLI commands
are already executed by test_round10_docs.py / test_round17_docs.py / test_cli.py; these tests
cover what those do not.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg


# ---------------------------------------------------------------- Implicit: Neumann's step size
def _alpha(hopt: hg.Implicit) -> Any:
    solver = hopt.current_solver()
    assert isinstance(solver, hg.Neumann)
    return solver.alpha


class _Vec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))


def test_neumann_power_step_size_is_refreshed_when_the_curvature_outgrew_it_by_2_to_3_times() -> None:
    """README: by default (momentum SGD) α = 1/λ̂_max from power iteration, refreshed every 10
    hypersteps "and 20 more at once when the series grows by more than 2 per term because the
    curvature outgrew the estimate". A curvature 2-3x the estimate gives a factor 1 - αλ in
    (-2, -1): the series alternates and grows by less than 2 per term, so nothing is refreshed and
    the hypergradient is the diverged sum. (Seen in `hypergrad run overfit_val --quick`: the
    estimate 0.414 from hyperstep 1 stays while λ_max grows to 1.19; 6 of 8 hypersteps diverge.)

    Train loss ½ Σ c h_i (w_i − λ_i)², validation ½‖w − t‖², weights at the optimum w = λ:
    dL_V/dλ = w − t exactly (any c). The first hyperstep estimates λ_max = 1 (c = 1); then the
    curvature grows to c = 2.5 (a sharper region) and the next hypergradient, with α = 1 still,
    sums (1 − 2.5)^j: 2.5·(1 − 1.5⁶)/2.5 = −10.4 times the truth on the first coordinate."""
    h = torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    scale = {"c": 1.0}
    model: Any = _Vec()
    hp = hg.hparams.Hparam(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), "real")
    with torch.no_grad():
        model.w.copy_(hp.value)

    def train_loss(m: Any, p: Any, b: object) -> torch.Tensor:
        return 0.5 * (scale["c"] * h * (m.w - p()) ** 2).sum()

    def val_loss(m: Any, p: Any, b: object) -> torch.Tensor:
        return 0.5 * ((m.w - t) ** 2).sum()

    hopt = hg.Implicit(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),  # -> "power"
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Neumann(steps=5),
    )
    hopt.step(())  # at the optimum: the weights do not move
    first = hopt.hyper_step(train_batch=(), val_batch=())
    assert first.solver_status == "fixed"
    assert _alpha(hopt) == pytest.approx(1.0, rel=1e-3)  # 1 / λ_max at c = 1
    truth = (model.w.detach() - t).clone()

    scale["c"] = 2.5  # λ_max 2.5 = 2.5 / λ̂: 1 − αλ = −1.5
    hopt.step(())
    (g,), info = hopt.hypergradient(train_batch=(), val_batch=())
    # a refreshed α = 1/2.5 gives Neumann-5's usual truncation (≤ 2% here); the stale one gives
    # [7.27, 0, -2.90] against [-0.70, 1.80, -2.90]
    torch.testing.assert_close(g, truth, rtol=0.05, atol=0.0)
    assert info.solver_status == "fixed"


def test_neumann_power_on_negative_curvature_with_a_current_estimate_is_the_plain_series() -> None:
    """README: status ``diverging`` = "α is too large or H is not positive definite there". With
    an indefinite H whose |λ_min| < λ_max and a current estimate α = 1/λ_max, the series grows by
    1 + |λ_min|/λ_max < 2 per term: the hypergradient is the plain Neumann sum at that α (no
    second solve, nothing silently swapped in), reported as diverging. (Passes today; pins what a
    refresh on any diverging series, as proposed for the test above, must leave alone.)

    Train loss ½ Σ h_i (w_i − λ_i)² with h = (1, −0.6), validation ½‖w − t‖², w = λ: the
    hypergradient is h ⊙ α Σ_{j≤5} (1 − α h)^j ⊙ (w − t) with α = 1."""
    h = torch.tensor([1.0, -0.6], dtype=torch.float64)
    t = torch.tensor([2.0, -1.0], dtype=torch.float64)
    model: Any = _Vec()
    model.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    hp = hg.hparams.Hparam(torch.tensor([0.5, 0.25], dtype=torch.float64), "real")
    with torch.no_grad():
        model.w.copy_(hp.value)

    def train_loss(m: Any, p: Any, b: object) -> torch.Tensor:
        return 0.5 * (h * (m.w - p()) ** 2).sum()

    def val_loss(m: Any, p: Any, b: object) -> torch.Tensor:
        return 0.5 * ((m.w - t) ** 2).sum()

    hopt = hg.Implicit(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Neumann(steps=5),
    )
    hopt.step(())
    hopt.hyper_step(train_batch=(), val_batch=())  # estimate |λ|_max = 1
    (g,), info = hopt.hypergradient(train_batch=(), val_batch=())
    alpha = 1.0
    series = sum((1 - alpha * h) ** j for j in range(6)) * alpha
    expected = h * series * (model.w.detach() - t)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)
    assert info.solver_status == "diverging"
    assert _alpha(hopt) == pytest.approx(1.0, rel=1e-6)
