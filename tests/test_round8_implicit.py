"""``hg.Implicit`` as research scripts drive it (round 8): inner optimisers that climb the
training objective, Neumann step sizes too large for a warm start, float64 models in large units,
per-example weights indexed by small integer dtypes and sampled with replacement, augmentation
networks and distilled images as hyperparameters, tied layers, lazy layers, dict outputs.

Every hypergradient is checked in float64 against a closed form (ridge, weighted ridge) or
``hypergrad.testing.dense_ift_hypergradient`` (the IFT by dense Hessian and mixed Jacobians on the
user's own losses), with tolerances that can fail. The tests of the fixes (marked "failed
before") failed before them:

* ``all_finite`` cast every norm to float32: a float64 model whose loss exceeded 3.4e38 (a
  regression in large units) had every ``step`` refused ("the training loss or its gradient is
  not finite (loss = 2.5e+49)") and every ``hyper_step`` too;
* an inner optimiser with ``maximize=True`` (climbing a log-likelihood) settles at a maximum,
  where ``H`` is negative definite: ``Neumann`` returned a hypergradient with relative error
  4e63 (default step size) and 1e87 (``"power"``), status "diverging"; ``CG`` the solution 0
  ("nonpositive_curvature", 100% off); ``Direct`` the right one, but "nonpositive_curvature";
* a warm-started ``Neumann`` whose ``alpha`` is slightly too large (|1 - alpha lambda_max| = 1.1)
  said "fixed" while its iterate drifted away, warm start after warm start: the hypergradient
  went from 0.4% off (as from 0) to 11% off before the residual passed 1 and it restarted;
* ``ExampleWeights`` read ``uint8`` indices as a mask: a batch ``[1, 1, 2, 3, 4]`` of a
  5-example dataset (sampling with replacement) got the weights of examples 0..4, silently;
  an index ``>= n`` gave torch's bare "index 10 is out of bounds for dimension 0 with size 10".
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
import hypergrad.testing as ht
from hypergrad._functional import all_finite

DT = torch.float64


def _rel(a: Any, b: Any) -> float:
    a = torch.cat([t.reshape(-1).to(DT) for t in a]) if isinstance(a, (list, tuple)) else a.reshape(-1).to(DT)
    b = torch.cat([t.reshape(-1).to(DT) for t in b]) if isinstance(b, (list, tuple)) else b.reshape(-1).to(DT)
    return float((a - b).norm() / b.norm())


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def _implicit(
    model: nn.Module,
    hp: nn.Module,
    lt: Any,
    lv: Any,
    solver: hg.LinearSolver,
    inner: torch.optim.Optimizer | None = None,
    outer_lr: float = 0.0,
) -> hg.Implicit:
    return hg.Implicit(
        model,
        hp,
        lt,
        lv,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1) if inner is None else inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=outer_lr),
        solver=solver,
    )


def _data(seed: int, n: int, d: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


# ----------------------------------------------------------------------------- finiteness in float64


def test_all_finite_judges_each_dtype_in_its_own_range() -> None:
    # failed before: every finite float64 value above 3.4e38 read as inf (cast to float32)
    assert all_finite(torch.tensor([1e39, -1e300], dtype=DT))
    assert all_finite([torch.full((3,), 1e200, dtype=DT)])  # (its 2-norm squared overflows)
    assert all_finite(torch.tensor([6e4], dtype=torch.float16), torch.tensor(1e39, dtype=DT))
    assert not all_finite(torch.tensor([1e200, float("nan")], dtype=DT))
    assert not all_finite(torch.tensor([1.0], dtype=DT), torch.tensor([float("inf")], dtype=torch.float32))
    assert not all_finite(torch.tensor([1e39], dtype=DT), [torch.tensor([1.0, float("-inf")], dtype=DT)])


def test_a_float64_model_in_large_units_trains_and_hypersteps_exactly() -> None:
    # failed before: NonFiniteError "the training loss or its gradient is not finite (loss = 2e+49)"
    s = 1e25  # targets in units where the squared error is ~1e50: finite in float64
    p = ht.ridge(n_features=5)
    exact = p.exact_hypergradient()[0] * s**2  # (w* and dL_V/dw scale by s: the product by s^2)
    x, y = p.train_batch
    xv, yv = p.val_batch
    p.solve_inner()
    with torch.no_grad():
        p.model.weight.mul_(s)
    hopt = _implicit(p.model, p.hparams, p.train_loss, p.val_loss, hg.CG(maxiter=20, tol=1e-13))
    loss = hopt.step((x, y * s))
    assert 1e48 < float(loss) < 1e50
    info = hopt.hyper_step(train_batch=(x, y * s), val_batch=(xv, yv * s))
    assert not info.skipped and info.solver_status == "converged"
    assert 1e48 < info.outer_loss < 1e50
    assert _rel(p.hparams.raw[0].grad, exact) < 1e-8


# ----------------------------------------------------------------------------- maximize=True


@pytest.mark.parametrize(
    ("solver", "hvps"),
    [
        (hg.Neumann(steps=300), 300 + 1),  # (+ 1: the curvature probe)
        (hg.Neumann(steps=300, alpha="power"), 300 + 1 + 20),  # (+ 20: power iteration)
        (hg.CG(maxiter=50, tol=1e-12), None),
        (hg.Direct(), 5 + 1),
    ],
    ids=["neumann-lr", "neumann-power", "cg", "direct"],
)
def test_a_maximised_training_objective_gives_the_closed_form_hypergradient(
    solver: hg.LinearSolver, hvps: int | None
) -> None:
    # failed before: Neumann 'diverging' (1e63 off), CG 'nonpositive_curvature' (x = 0, 100% off),
    # Direct exact but 'nonpositive_curvature'
    p = ht.ridge(n_features=5)
    p.solve_inner()
    exact = p.exact_hypergradient()[0]
    x, y = p.train_batch

    def gain(m: nn.Module, h: nn.Module, b: Any) -> Tensor:  # climbed: its maximum is the ridge optimum
        return -p.train_loss(m, h, b)

    inner = torch.optim.SGD(p.model.parameters(), lr=0.1, maximize=True)
    hopt = _implicit(p.model, p.hparams, gain, p.val_loss, solver, inner)
    for _ in range(3):
        hopt.step(p.train_batch)  # (ascent keeps the weights at the maximum)
    assert _rel(p.model.weight.detach(), torch.linalg.solve(p.hessian(), x.T @ y / len(y))) < 1e-10
    info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert info.solver_status in ("fixed", "converged")
    assert _rel(p.hparams.raw[0].grad, exact) < 1e-9
    if hvps is not None:
        assert info.solver_iterations == hvps


def test_maximize_with_coupled_weight_decay_settles_where_the_decay_is_subtracted() -> None:
    # SGD(maximize=True, weight_decay=d) on G = -L_T: the rest point of w += lr (dG/dw - d w) is
    # the minimum of L_T + d/2 |w|^2 (a ridge with every decay raised by d)
    p = ht.ridge(n_features=5)
    x, y = p.train_batch
    xv, yv = p.val_batch
    d = 0.3

    def w_star(r: Tensor) -> Tensor:
        a = x.T @ x / len(y) + torch.diag(r.exp().reshape(-1)) + d * torch.eye(5, dtype=DT)
        return torch.linalg.solve(a, x.T @ y / len(y))

    r = p.hparams.raw[0].detach().clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(0.5 * ((xv @ w_star(r) - yv) ** 2).mean(), r)
    with torch.no_grad():
        p.model.weight.copy_(w_star(r).reshape(1, -1))
    inner = torch.optim.SGD(p.model.parameters(), lr=0.1, maximize=True, weight_decay=d)
    for solver in (hg.Neumann(steps=300), hg.CG(maxiter=50, tol=1e-13)):
        hopt = _implicit(
            p.model, p.hparams, lambda m, h, b: -p.train_loss(m, h, b), p.val_loss, solver, inner
        )
        grads, info = hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
        assert info.solver_status in ("fixed", "converged")
        assert _rel(grads[0], exact) < 1e-9


def test_a_maximised_log_likelihood_matches_the_logistic_closed_form() -> None:
    # a realistic case: the log-likelihood of a logistic regression, climbed by SGD(maximize=True)
    p = ht.logistic()
    p.solve_inner()
    exact = p.exact_hypergradient()[0]
    for solver in (hg.Neumann(steps=400, alpha="power"), hg.CG(maxiter=60, tol=1e-13)):
        inner = torch.optim.SGD(p.model.parameters(), lr=0.5, maximize=True)
        hopt = _implicit(
            p.model, p.hparams, lambda m, h, b: -p.train_loss(m, h, b), p.val_loss, solver, inner
        )
        grads, info = hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
        assert info.solver_status in ("fixed", "converged")
        assert _rel(grads[0], exact) < 1e-8


def test_a_descent_ascent_game_keeps_the_indefinite_hessian() -> None:
    """One group descends, one ascends (maximize=True): the rest point is a saddle of L_T, H is
    indefinite and S H (S = diag(+-1)) not symmetric, which CG and Direct assume; H is kept, Direct
    solves it exactly (LU) and Neumann says it diverges, as before."""
    g = torch.Generator().manual_seed(0)
    n = 4
    a_ = torch.randn(n, n, generator=g, dtype=DT)
    a_ = a_ @ a_.T / n + 0.5 * torch.eye(n, dtype=DT)
    b_ = torch.randn(n, n, generator=g, dtype=DT)
    b_ = b_ @ b_.T / n + 0.5 * torch.eye(n, dtype=DT)
    c_ = 0.5 * torch.randn(n, n, generator=g, dtype=DT)
    a, c = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)

    class Game(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Parameter(torch.zeros(n, dtype=DT))
            self.z = nn.Parameter(torch.zeros(n, dtype=DT))

    hp = hg.hparams.Hparam(torch.full((n,), 0.5, dtype=DT), "real")

    def lt(m: Any, h: Any, b: Any) -> Tensor:
        return 0.5 * m.u @ a_ @ m.u - 0.5 * m.z @ b_ @ m.z + m.u @ c_ @ m.z - h() @ m.u - a @ m.z

    def lv(m: Any, h: Any, b: Any) -> Tensor:
        return 0.5 * ((m.u - c) ** 2).sum() + 0.5 * ((m.z + c) ** 2).sum()

    model = Game()
    inner = torch.optim.SGD([{"params": [model.u]}, {"params": [model.z], "maximize": True}], lr=0.1)
    hopt = _implicit(model, hp, lt, lv, hg.Direct(), inner)
    for _ in range(600):
        hopt.step(())
    ref = ht.dense_ift_hypergradient(model, hp, lt, lv, (), ())
    grads, info = hopt.hypergradient((), ())
    assert info.solver_status == "nonpositive_curvature"  # (indefinite: LU, exact)
    assert _rel(grads, ref) < 1e-10
    hopt.solver = hg.Neumann(steps=50, alpha=0.1)
    _, info = hopt.hypergradient((), ())
    assert info.solver_status == "diverging"


# ----------------------------------------------------------------------------- warm Neumann, alpha too large


def test_a_warm_started_neumann_says_its_residual_grows() -> None:
    # failed before: status 'fixed' (the residual stayed below |v| while growing 2.4 times)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
    ev = torch.linspace(1.0, 5.0, 8, dtype=DT)
    h = (q * ev) @ q.T
    v = torch.randn(8, generator=g, dtype=DT)
    x = torch.linalg.solve(h, v)
    near = (x + 1e-3 * q[:, -1],)  # a good start, off along the top eigenvector
    hvp = lambda u: (h @ u[0],)  # noqa: E731
    r = hg.Neumann(steps=10, alpha=2.2 / 5.0).solve(hvp, (v,), x0=near)  # |1 - 2.2| = 1.2 there
    assert r.status.value == "diverging" and float(r.residual) < 1
    r = hg.Neumann(steps=10, alpha=1.0 / 5.0).solve(hvp, (v,), x0=near)  # converging: no alarm
    assert r.status.value == "fixed"
    assert float((r.solution[0] - x).norm()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_a_warm_neumann_from_a_converged_start_raises_no_false_alarm(dtype: torch.dtype) -> None:
    # rounding noise in v - H x0 must not read as growth
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=DT))
        ev = torch.logspace(0, 3 * float(torch.rand((), generator=g, dtype=DT)), 20, dtype=DT)
        h = ((q * ev) @ q.T).to(dtype)
        v = torch.randn(20, generator=g, dtype=DT)
        x = torch.linalg.solve((q * ev) @ q.T, v)
        steps = int(torch.randint(2, 15, (), generator=g))
        r = hg.Neumann(steps=steps, alpha=1.0 / float(ev[-1])).solve(
            lambda u, h=h: (h @ u[0],), (v.to(dtype),), x0=(x.to(dtype),)
        )
        assert r.status.value == "fixed", (seed, float(r.residual))


def test_a_warm_neumann_with_too_large_alpha_stays_as_accurate_as_from_zero() -> None:
    # failed before: error 0.4% -> 0.2% -> 0.6% -> 1.6% -> 4.2% -> 10.9% with status 'fixed'
    p = ht.ridge(n_features=5, cond=6.7)
    p.solve_inner()
    exact = p.exact_hypergradient()[0]
    alpha = 2.1 / float(torch.linalg.eigvalsh(p.hessian())[-1])  # |1 - alpha lambda_max| = 1.1
    cold = _implicit(p.model, p.hparams, p.train_loss, p.val_loss, hg.Neumann(steps=10, alpha=alpha))
    cold_grad, _ = cold.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
    floor = _rel(cold_grad[0], exact)
    assert 1e-3 < floor < 1e-2  # (truncated, no growth seen from 0 in 10 terms)
    hopt = _implicit(
        p.model, p.hparams, p.train_loss, p.val_loss, hg.Neumann(steps=10, alpha=alpha, warm_start=True)
    )
    for _ in range(8):
        info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
        assert info.solver_status == "fixed"
        assert _rel(p.hparams.raw[0].grad, exact) < 1.5 * floor


# ----------------------------------------------------------------------------- per-example weights


def test_small_integer_example_indices_are_positions_not_a_mask() -> None:
    # failed before: uint8 [1, 1, 2, 3, 4] selected the weights of examples 0..4
    ew = hg.hparams.ExampleWeights(5, dtype=DT)
    with torch.no_grad():
        ew.raw.copy_(torch.arange(5, dtype=DT))
    index = [1, 1, 2, 3, 4]
    want = torch.sigmoid(torch.tensor(index, dtype=DT))
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(ew(torch.tensor(index, dtype=dtype)), want), dtype
    with pytest.raises(IndexError, match=r"example index 5, but holds weights for 5 examples"):
        ew(torch.tensor([0, 5], dtype=torch.uint8))
    with pytest.raises(IndexError, match="negative example index"):
        ew(torch.tensor([0, -1], dtype=torch.int8))


def test_hyper_cleaning_with_replacement_and_uint8_indices_matches_the_dense_ift() -> None:
    """Hyper-cleaning (per-example weights) on a full-size batch drawn with replacement, its
    indices stored as uint8 (failed before: silently the weights of examples 0..n-1); duplicates
    sum their terms."""
    n = 12
    x, y = _data(1, n)
    xv, yv = _data(2, 9)
    idx = torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(3))
    assert len(set(idx.tolist())) < n and 0 in idx.tolist()  # duplicates: a mask would differ
    model = nn.Linear(3, 1).to(DT)
    ew = hg.hparams.ExampleWeights(n, init=0.6, dtype=DT)

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb, i = b
        return (h(i) * (m(xb).squeeze(-1) - yb) ** 2).mean() + 1e-2 * (m.weight**2).sum()

    hopt = _implicit(model, ew, lt, _mse, hg.Direct())
    small = (x[idx], y[idx], idx.to(torch.uint8))
    for _ in range(200):
        hopt.step(small)
    ref = ht.dense_ift_hypergradient(model, ew, lt, _mse, (x[idx], y[idx], idx), (xv, yv))
    hopt.hyper_step(train_batch=small, val_batch=(xv, yv))
    assert _rel(ew.raw.grad, ref[0]) < 1e-10
    unseen = [k for k in range(n) if k not in idx.tolist()]
    assert bool((ew.raw.grad[unseen] == 0).all()) and bool((ew.raw.grad[idx] != 0).all())


def test_hyper_cleaning_through_with_index_and_a_data_loader_matches_the_dense_ift() -> None:
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from hypergrad.data import WithIndex

    n = 10
    x, y = _data(4, n)
    xv, yv = _data(5, 8)
    ds = WithIndex(TensorDataset(x, y))
    sampler = RandomSampler(ds, replacement=True, num_samples=n, generator=torch.Generator().manual_seed(0))
    batch = next(iter(DataLoader(ds, batch_size=n, sampler=sampler)))
    model = nn.Linear(3, 1).to(DT)
    hp = nn.ModuleDict(
        {"ew": hg.hparams.ExampleWeights(n, dtype=DT), "l2": hg.hparams.Hparam(0.05, dtype=DT)}
    )

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb, i = b
        return (h["ew"](i) * (m(xb).squeeze(-1) - yb) ** 2).mean() + h["l2"]() * (m.weight**2).sum()

    hopt = _implicit(model, hp, lt, _mse, hg.Direct())
    for _ in range(100):
        hopt.step(batch)
    ref = ht.dense_ift_hypergradient(model, hp, lt, _mse, batch, (xv, yv))
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=(xv, yv))
    assert _rel(grads, ref) < 1e-10


# ----------------------------------------------------------------------------- hyperparameter modules


def test_an_augmentation_network_with_batchnorm_as_hyperparameters_matches_the_dense_ift() -> None:
    """Lorraine et al. (2020)'s learned augmentation: the hyperparameters are a network whose
    output feeds the training loss, next to a per-weight decay and a temperature used by both
    losses (a direct term). Its BatchNorm statistics are left as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    aug = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh()).to(DT)
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="parameter", init=0.05, max=1.0),
            "t": hg.hparams.Hparam(1.5),
            "aug": aug,
        }
    ).to(DT)
    x, _ = _data(6, 24)
    y = torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(0))
    xv, _ = _data(7, 16)
    yv = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb = b
        return nn.functional.cross_entropy(m(xb + 0.2 * h["aug"](xb)) / h["t"](), yb) + h["wd"].penalty(m)

    def lv(m: nn.Module, h: Any, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(b[0]) / h["t"](), b[1])

    hopt = _implicit(model, hp, lt, lv, hg.Direct())
    for _ in range(50):
        hopt.step((x, y))
    stats = [b.clone() for b in aug.buffers()]
    grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert all(torch.equal(a, b) for a, b in zip(stats, aug.buffers(), strict=True))
    ref = ht.dense_ift_hypergradient(model, hp, lt, lv, (x, y), (xv, yv))
    assert _rel(grads, ref) < 1e-10
    assert all(float(g.abs().max()) > 0 for g in grads)


def test_dataset_distillation_with_learned_images_matches_the_dense_ift() -> None:
    """The hyperparameters are the synthetic images (labels a buffer); train_loss reads no
    batch: step(()) and hyper_step(train_batch=(), ...)."""

    class Synthetic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.randn(6, 4, dtype=DT))
            self.register_buffer("y", torch.arange(6) % 3)

    model, syn = nn.Linear(4, 3).to(DT), Synthetic()
    xv = torch.randn(30, 4, dtype=DT)
    yv = torch.randint(0, 3, (30,))

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(h.x), h.y) + 1e-2 * (m.weight**2).sum()

    def lv(m: nn.Module, h: Any, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    hopt = _implicit(model, syn, lt, lv, hg.CG(maxiter=60, tol=1e-13), inner, outer_lr=0.1)
    for _ in range(400):
        hopt.step(())
    ref = ht.dense_ift_hypergradient(model, syn, lt, lv, (), (xv, yv))
    before = syn.x.detach().clone()
    info = hopt.hyper_step(train_batch=(), val_batch=(xv, yv))
    assert info.solver_status == "converged"
    assert _rel(syn.x.grad, ref[0]) < 1e-9
    assert not torch.equal(before, syn.x.detach())


# ----------------------------------------------------------------------------- models


def test_a_layer_shared_at_two_positions_of_a_sequential_matches_the_dense_ift() -> None:
    shared = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 1).to(DT))
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
    assert len(list(hp.raw)) == 4  # the shared layer's two tensors once

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h.penalty(m)

    batch, val = _data(8, 20), _data(9, 15)
    hopt = _implicit(model, hp, lt, _mse, hg.Direct())
    for _ in range(50):
        hopt.step(batch)
    ref = ht.dense_ift_hypergradient(model, hp, lt, _mse, batch, val)
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=val)
    assert _rel(grads, ref) < 1e-10
    assert model[0] is model[2] and type(model[2].weight) is nn.Parameter


def test_dict_outputs_argmax_and_an_integer_buffer_match_the_dense_ift_and_the_buffer_stays() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            self.calls += 1
            logits = self.lin(x)
            return {"logits": logits, "pred": logits.argmax(-1), "calls": self.calls}

    model = Counting().to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    x, _ = _data(10, 20)
    y = (x[:, 0] > 0).long()
    xv, _ = _data(11, 12)
    yv = (xv[:, 0] > 0).long()

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(b[0])["logits"], b[1]) + h.penalty(m)

    def lv(m: nn.Module, h: Any, b: Any) -> Tensor:
        out = m(b[0])
        hits = (out["pred"] == b[1]).to(DT).mean()  # (no gradient: argmax)
        return nn.functional.cross_entropy(out["logits"], b[1]) + 0.0 * hits

    hopt = _implicit(model, hp, lt, lv, hg.Direct())
    for _ in range(30):
        hopt.step((x, y))
    assert int(model.calls) == 30
    grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert int(model.calls) == 30
    ref = ht.dense_ift_hypergradient(model, hp, lt, lv, (x, y), (xv, yv))
    assert _rel(grads, ref) < 1e-10


def test_lazy_layers_and_a_no_grad_target_inside_the_loss_match_the_dense_ift() -> None:
    """A LazyLinear initialised by the first step (the WeightDecay built per layer before), and
    a self-distillation target computed under torch.no_grad() inside the training loss."""
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb = b
        with torch.no_grad():
            target = 0.5 * yb + 0.5 * m(xb).squeeze(-1)
        return ((m(xb).squeeze(-1) - target) ** 2).mean() + h.penalty(m)

    batch, val = _data(12, 20), _data(13, 15)
    hopt = _implicit(model, hp, lt, _mse, hg.Direct())
    for _ in range(50):
        hopt.step(batch)
    assert model[0].weight.shape == (4, 3)
    ref = ht.dense_ift_hypergradient(model, hp, lt, _mse, batch, val)
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=val)
    assert _rel(grads, ref) < 1e-10


def test_a_float32_model_with_float64_example_weights_and_scale_is_close_to_float64() -> None:
    x, y = _data(14, 12)
    val = _data(15, 10)
    idx = torch.arange(12)

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb, i = b
        return (h["ew"](i) * (m(xb).squeeze(-1) - yb) ** 2).mean() + h["l2"]() * (m.weight**2).sum()

    def build(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        model = nn.Linear(3, 1).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.3, -0.2, 0.5]]))
            model.bias.fill_(0.1)
        hp = nn.ModuleDict(
            {"ew": hg.hparams.ExampleWeights(12, init=0.6, dtype=DT), "l2": hg.hparams.Hparam(0.1, dtype=DT)}
        )
        return model, hp

    model64, hp64 = build(DT)
    hopt64 = _implicit(model64, hp64, lt, _mse, hg.Direct())
    for _ in range(300):
        hopt64.step((x, y, idx))
    ref = ht.dense_ift_hypergradient(model64, hp64, lt, _mse, (x, y, idx), val)
    model32, hp32 = build(torch.float32)
    with torch.no_grad():
        for a, b in zip(model32.parameters(), model64.parameters(), strict=True):
            a.copy_(b)
    hopt32 = _implicit(model32, hp32, lt, _mse, hg.CG(maxiter=10, tol=1e-7))
    batch32 = (x.float(), y.float(), idx)
    grads, info = hopt32.hypergradient(train_batch=batch32, val_batch=tuple(t.float() for t in val))
    assert [g.dtype for g in grads] == [DT, DT]
    assert _rel(grads, ref) < 1e-5


def test_resume_with_warm_damped_cg_and_example_weights_is_bit_exact_under_weights_only_load() -> None:
    xs, ys = _data(16, 40)
    val = _data(17, 20)

    def build() -> tuple[nn.Module, nn.Module, hg.Implicit]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
        hp = nn.ModuleDict(
            {
                "wd": hg.hparams.WeightDecay(model, per="parameter", init=0.05),
                "ew": hg.hparams.ExampleWeights(40, dtype=DT),
            }
        )

        def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
            xb, yb, i = b
            return (h["ew"](i) * (m(xb).squeeze(-1) - yb) ** 2).mean() + h["wd"].penalty(m)

        hopt = hg.Implicit(
            model,
            hp,
            lt,
            _mse,
            inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
            solver=hg.CG(maxiter=5, damping=1.0, warm_start=True),
        )
        return model, hp, hopt

    def batch(k: int) -> tuple[Tensor, Tensor, Tensor]:
        i = torch.randperm(40, generator=torch.Generator().manual_seed(k))[:10]
        return xs[i], ys[i], i

    def run(hopt: hg.Implicit, a: int, b: int) -> None:
        for k in range(a, b):
            hopt.step(batch(k))
            if k % 3 == 2:
                hopt.hyper_step(train_batch=batch(k + 100), val_batch=val)

    m1, h1, o1 = build()
    run(o1, 0, 24)
    m2, h2, o2 = build()
    run(o2, 0, 12)
    assert o2._x0 is not None
    buf = io.BytesIO()
    torch.save({"m": m2.state_dict(), "h": h2.state_dict(), "o": o2.state_dict()}, buf)
    buf.seek(0)
    m3, h3, o3 = build()
    state = torch.load(buf, weights_only=True)
    m3.load_state_dict(state["m"])
    h3.load_state_dict(state["h"])
    o3.load_state_dict(state["o"])
    run(o3, 12, 24)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(h1.parameters(), h3.parameters(), strict=True))


# ----------------------------------------------------------------------------- saddles, frozen layers


def _tanh_net_at_a_saddle() -> tuple[nn.Module, nn.Module, Any, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
    batch, val = _data(18, 20), _data(19, 15)

    def lt(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h.penalty(m)

    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(150):
        inner.zero_grad()
        lt(model, hp, batch).backward()
        inner.step()
    return model, hp, lt, batch, val


def test_damped_cg_on_an_indefinite_hessian_is_the_damped_ift_and_too_little_damping_is_said() -> None:
    """CG(damping=d) solves (H + d I) x = dL_V/dw: the dense IFT of the training loss plus
    d/2 |w - w_now|^2 (same gradient here, Hessian H + d I). With too little damping for the
    negative eigenvalue, CG says 'nonpositive_curvature'."""
    model, hp, lt, batch, val = _tanh_net_at_a_saddle()
    now = [p.detach().clone() for p in model.parameters()]
    eigs = _hessian_eigenvalues(model, hp, lt, batch)
    assert float(eigs[0]) < 0 < float(eigs[-1])  # a saddle
    d = 0.5 - float(eigs[0])  # (H + d I) positive definite, smallest eigenvalue 0.5

    def damped(m: nn.Module, h_: Any, b: Any) -> Tensor:
        return lt(m, h_, b) + 0.5 * d * sum(
            ((p - q) ** 2).sum() for p, q in zip(m.parameters(), now, strict=True)
        )

    ref = ht.dense_ift_hypergradient(model, hp, damped, _mse, batch, val)
    hopt = _implicit(model, hp, lt, _mse, hg.CG(maxiter=100, tol=1e-13, damping=d))
    grads, info = hopt.hypergradient(train_batch=batch, val_batch=val)
    assert info.solver_status == "converged"
    assert _rel(grads, ref) < 1e-9
    hopt.solver = hg.CG(maxiter=100, tol=1e-13, damping=-0.5 * float(eigs[0]))
    _, info = hopt.hypergradient(train_batch=batch, val_batch=val)
    assert info.solver_status == "nonpositive_curvature"


def _hessian_eigenvalues(model: nn.Module, hp: nn.Module, lt: Any, batch: Any) -> Tensor:
    ws = [p for p in model.parameters()]
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(lt(model, hp, batch), ws, create_graph=True)])
    rows = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], ws, retain_graph=True)])
        for i in range(len(g))
    ]
    return torch.linalg.eigvalsh(torch.stack(rows))


def test_a_layer_frozen_and_thawed_between_hypersteps_follows_the_dense_ift() -> None:
    """requires_grad_(False) on the first layer mid-run: the IFT runs over the trained layer only
    (its decays get 0 and a DisconnectedWarning), and after thawing the hypergradient is the
    full one again."""
    model, hp, lt, batch, val = _tanh_net_at_a_saddle()
    hopt = _implicit(model, hp, lt, _mse, hg.Direct(), outer_lr=0.0)
    hopt.hyper_step(train_batch=batch, val_batch=val)
    model[0].requires_grad_(False)
    for _ in range(20):
        hopt.step(batch)
    with pytest.warns(hg.DisconnectedWarning, match="does not reach the losses"):
        grads, _ = hopt.hypergradient(train_batch=batch, val_batch=val)
    ref = ht.dense_ift_hypergradient(model, hp, lt, _mse, batch, val)  # (over the trained weights)
    assert float(grads[0].abs().max()) == 0 and float(grads[1].abs().max()) == 0
    assert _rel(grads, ref) < 1e-10
    model[0].requires_grad_(True)
    for _ in range(20):
        hopt.step(batch)
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=val)
    ref = ht.dense_ift_hypergradient(model, hp, lt, _mse, batch, val)
    assert _rel(grads, ref) < 1e-10 and float(grads[0].abs().max()) > 0
