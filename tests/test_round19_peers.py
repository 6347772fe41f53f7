"""Round 19: bug reports filed against peer libraries (higher, torchopt, laplace-torch), each
replayed through hypergrad's API and checked against an independent reference (closed form,
central finite differences of real float64 training, or live-tensor counts).

Not repeated here (already in tests/test_peers_*.py, test_contract.py): Adam's NaN at a missing
gradient, memory between ordinary hypersteps, clipping, BatchNorm statistics, torchopt's CG
iterates on logistic regression. What is new:

* exactly-zero gradient *entries* (a dead input feature) under every replayable optimiser: the
  ``sqrt(0)`` of higher#125 / torchopt#26, which a ``None`` gradient does not reach;
* 0-dim weights and hyperparameters through the implicit solvers (torchopt#222: CG's
  ``maxiter = size = 0`` for scalars gave a zero gradient);
* many episodes (re-initialised weights, cleared optimiser state, ``start_episode``) with a
  meta-batch of ``hypergradient`` calls: live tensors bounded (higher#6, torchopt#113/#218), and
  the optimiser state left detached between rollouts (higher#114);
* group settings edited by hand between steps (no scheduler): the replay follows them
  (the "lr schedulers / param-group changes ignored by the differentiable optimiser" reports);
* hg.optim's hypergradient-descent optimisers over many steps: bounded tensors, detached state
  (torchopt#218 "memory keeps increasing in MetaAdam due to gradient link").
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
S = torch.optim


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    """Float64 default dtype: ASGD's ``eta`` and NAdam's ``mu_product`` are 0-dim tensors of the
    default dtype in torch.optim, which in float32 would quantise the finite-difference reference."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _mse(m: nn.Module, h: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


def _penalised(m: nn.Module, h: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecated module attributes warn on isinstance
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


# ------------------------------------------------------------------ 1. sqrt(0) at dead features

ZERO_GRAD_OPTS: dict[str, Callable[[Any], S.Optimizer]] = {
    "adam": lambda p: S.Adam(p, lr=0.05),
    "adamw": lambda p: S.AdamW(p, lr=0.05),
    "adam_amsgrad": lambda p: S.Adam(p, lr=0.05, amsgrad=True),
    "rmsprop": lambda p: S.RMSprop(p, lr=0.01),
    "rmsprop_centered": lambda p: S.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
    "adagrad": lambda p: S.Adagrad(p, lr=0.1),
    "adamax": lambda p: S.Adamax(p, lr=0.05),
    "nadam": lambda p: S.NAdam(p, lr=0.05),
    "radam": lambda p: S.RAdam(p, lr=0.05),
    "adadelta": lambda p: S.Adadelta(p, lr=0.5),
    "rprop": lambda p: S.Rprop(p, lr=0.01),
    "asgd": lambda p: S.ASGD(p, lr=0.05),
}


def _dead_feature_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, generator=g)
        x[:, 2] = 0.0  # the weights reading feature 2 get an exactly-zero gradient every step
        out.append((x, torch.randn(8, 2, generator=g)))
    return out


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("name", list(ZERO_GRAD_OPTS))
def test_exactly_zero_gradient_entries_give_the_finite_difference_lr_hypergradient(
    name: str, mode: str
) -> None:
    """higher#125 "In DifferentiableAdam, sqrt() is non-differentiable at zero" and torchopt#26
    "Got 'nan' when using MetaAdam as inner_opt": a weight entry whose gradient is exactly 0 (here a
    feature that is always 0) keeps ``exp_avg_sq`` (square averages, accumulators) at 0, and the
    derivative of ``sqrt`` there is inf, which times a zero cotangent is NaN. The learning rate's
    hypergradient through 4 steps must be finite and equal central differences of real training."""
    make, k = ZERO_GRAD_OPTS[name], 4
    data = _dead_feature_batches(k + 1)
    model = _linear()
    opt = make(model.parameters())
    hp = hg.hparams.LearningRate(opt)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=S.SGD(hp.parameters(), lr=0.0),
        steps=k,
        mode=mode,
    )
    for b in data[:k]:
        hopt.step(b)
    # the scenario: the gradient entries of the weights reading feature 2 are exactly zero
    (gw,) = torch.autograd.grad(_mse(model, hp, data[0]), [model.weight])
    assert float(gw[:, 2].abs().max()) == 0.0 and float(gw.abs().max()) > 0
    got = _flat(hopt.hypergradient(val_batch=data[k])[0])
    assert torch.isfinite(got).all()

    def outer(raw: torch.Tensor) -> float:
        m = _linear()
        o = make(m.parameters())
        h = hg.hparams.LearningRate(o)
        with torch.no_grad():
            h.raw.copy_(raw)
        h.write()
        for b in data[:k]:
            o.zero_grad()
            _mse(m, h, b).backward()
            o.step()
        with torch.no_grad():
            return float(_mse(m, h, data[k]))

    raw, eps = hp.raw.detach().clone(), 1e-6
    fd = (outer(raw + eps) - outer(raw - eps)) / (2 * eps)
    assert abs(fd) > 1e-3
    torch.testing.assert_close(got, torch.full_like(got, fd), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ 2. scalar weights (torchopt#222)


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))


A, C, D, LAM = 2.0, 1.0, 0.2, 0.5


def _scalar_train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return 0.5 * A * (m.w - C) ** 2 + 0.5 * h() * m.w**2


def _scalar_val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return 0.5 * (m.w - D) ** 2


@pytest.mark.parametrize(
    "solver",
    [
        lambda: hg.CG(maxiter=10, tol=1e-12),
        lambda: hg.CG(maxiter=10, tol=1e-12, warm_start=True),
        lambda: hg.Neumann(steps=200),
        lambda: hg.Neumann(steps=200, alpha="power"),
        lambda: hg.Direct(),
    ],
    ids=["cg", "cg_warm", "neumann_lr", "neumann_power", "direct"],
)
def test_a_zero_dim_weight_and_hyperparameter_get_the_closed_form_hypergradient(
    solver: Callable[[], Any],
) -> None:
    """torchopt#222 "Custom root fails for scalar inputs": its CG took ``maxiter = b.size = 0``
    for a 0-dim right-hand side and returned a zero gradient. Here a 0-dim weight ``w`` and a 0-dim
    hyperparameter ``lam``: inner ``A/2 (w - C)^2 + lam/2 w^2`` (so ``w* = A C / (A + lam)``),
    outer ``(w - D)^2 / 2``; ``dL/dlam = (w* - D) * (-A C / (A + lam)^2)``."""
    model = _Scalar()
    h = hg.hparams.Hparam(torch.tensor(LAM), "real")
    hopt = hg.Implicit(
        model,
        h,
        _scalar_train,
        _scalar_val,
        inner_optimizer=S.SGD(model.parameters(), lr=0.3),
        outer_optimizer=S.SGD(h.parameters(), lr=0.0),
        solver=solver(),
    )
    for _ in range(200):
        hopt.step(())
    w_star = A * C / (A + LAM)
    assert abs(float(model.w.detach()) - w_star) < 1e-12
    (g,), info = hopt.hypergradient(train_batch=(), val_batch=())
    assert g.shape == torch.Size([])
    exact = (w_star - D) * (-A * C / (A + LAM) ** 2)
    assert abs(float(g) - exact) < 1e-10 * abs(exact), (float(g), exact, info.solver_status)


# ------------------------------------------------------------------ 3. episodes: memory and detached state


def _episode_run(kind: str, episodes: int) -> tuple[list[int], S.Optimizer, nn.Module]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    # forward mode takes a pass per hyperparameter: one decay per layer keeps it cheap
    hp = hg.hparams.WeightDecay(model, per="layer" if kind == "forward" else "parameter", init=1e-2)
    inner = S.Adam(model.parameters(), lr=0.01)
    outer = S.Adam(hp.parameters(), lr=0.01)
    common: dict[str, Any] = dict(inner_optimizer=inner, outer_optimizer=outer)
    if kind == "implicit_cg_warm":
        hopt: hg.HyperOptimizer = hg.Implicit(
            model, hp, _penalised, _mse, solver=hg.CG(maxiter=5, warm_start=True), **common
        )
    else:
        hopt = hg.Unrolled(
            model,
            hp,
            _penalised,
            _mse,
            steps=3,
            mode="forward" if kind == "forward" else "reverse",
            checkpoint=kind == "checkpoint",
            **common,
        )
    counts = []
    for ep in range(episodes):
        for mod in model:
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        inner.state.clear()
        hopt.start_episode()
        for _ in range(3):
            hopt.step((x, y))
        # a meta-batch of two tasks, summed by hand (README's recipe), then a hyper_step
        total = [torch.zeros_like(p) for p in hp.parameters()]
        for task in range(2):
            grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(x + 0.1 * task, y))
            total = [t + gr for t, gr in zip(total, grads, strict=True)]
        for p, t in zip(hp.parameters(), total, strict=True):
            p.grad = t
        outer.step()
        hopt.hyper_step(train_batch=(x, y), val_batch=(x, y))
        if ep + 1 in (6, episodes):
            counts.append(_live_tensors())
    return counts, inner, hp


@pytest.mark.parametrize("kind", ["reverse", "checkpoint", "forward", "implicit_cg_warm"])
def test_many_episodes_keep_a_bounded_number_of_live_tensors_and_detached_state(kind: str) -> None:
    """higher#6 "Memory leak when performing inner loop on a copy", torchopt#113 (a new inner
    net per task leaked) and torchopt#218 (MetaAdam kept a gradient link across steps): 20
    episodes of re-initialised weights, cleared Adam state, ``start_episode``, three steps, a
    meta-batch of ``hypergradient`` calls and a ``hyper_step``. The number of live tensors after
    episode 6 and after episode 20 must be the same (a graph kept per episode would add dozens).
    higher#114 (Adam's state not detached between rollouts): the inner optimiser's state and the
    hyperparameters' ``.grad`` carry no graph."""
    counts, inner, hp = _episode_run(kind, 20)
    assert counts[1] <= counts[0], counts
    for state in inner.state.values():
        for key, v in state.items():
            if torch.is_tensor(v):
                assert v.grad_fn is None and not v.requires_grad, key
    for p in hp.parameters():
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad


@pytest.mark.parametrize("cls", [hg.optim.SGDHD, hg.optim.AdamHD], ids=lambda c: c.__name__)
def test_hypergradient_descent_optimisers_do_not_accumulate_tensors_over_steps(
    cls: type[S.Optimizer],
) -> None:
    """torchopt#218 "[BUG] Memory keep increase in MetaAdam due to gradient link": hg.optim's
    learning-rate-adapting optimisers keep the previous update to differentiate the step in the
    learning rate; 250 steps must not keep more tensors than 50, nor any state with a graph."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = cls(model.parameters(), lr=0.01)
    counts = []
    for i in range(250):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if i + 1 in (50, 250):
            counts.append(_live_tensors())
    assert counts[1] <= counts[0], counts
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                assert v.grad_fn is None and not v.requires_grad
    assert all(
        not torch.is_tensor(v) or not v.requires_grad for grp in opt.param_groups for v in grp.values()
    )


# ------------------------------------------------------------------ 4. group settings edited by hand


def _edit_groups(opt: S.Optimizer, t: int) -> None:
    """What scripts do instead of a scheduler: halve lr, change betas / momentum, add a decay."""
    for group in opt.param_groups:
        if t == 1:
            group["lr"] *= 0.5
        if t == 2 and "betas" in group:
            group["betas"] = (0.5, 0.9)
        if t == 2 and "momentum" in group:
            group["momentum"] = 0.3
        if t == 3:
            group["weight_decay"] = 0.05


EDIT_OPTS: dict[str, Callable[[Any], S.Optimizer]] = {
    "adam": lambda p: S.Adam(p, lr=0.05),
    "sgd_momentum": lambda p: S.SGD(p, lr=0.1, momentum=0.9),
    "rmsprop_momentum": lambda p: S.RMSprop(p, lr=0.01, momentum=0.5),
}


@pytest.mark.parametrize("mode", ["reverse", "forward", "checkpoint"])
@pytest.mark.parametrize("name", list(EDIT_OPTS))
def test_group_settings_edited_between_steps_are_replayed(name: str, mode: str) -> None:
    """Peers' differentiable optimisers read their settings once (higher's ``override`` /
    torchopt's MetaOptimizer built with fixed hyperparameters), so a script's manual
    ``group["lr"] *= 0.5`` mid-episode was ignored in the meta-gradient. Here lr, betas /
    momentum and weight_decay are changed by hand inside a 5-step window; the per-layer decay's
    hypergradient must equal central differences of the same real training."""
    make, k = EDIT_OPTS[name], 5
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, 4, generator=g), torch.randn(12, 2, generator=g)) for _ in range(k + 1)]

    def build() -> tuple[nn.Module, S.Optimizer, hg.hparams.WeightDecay]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        o = make(m.parameters())
        return m, o, hg.hparams.WeightDecay(m, per="layer", init=1e-2)

    model, opt, hp = build()
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=S.SGD(hp.parameters(), lr=0.0),
        steps=k,
        mode="forward" if mode == "forward" else "reverse",
        checkpoint=mode == "checkpoint",
    )
    for t in range(k):
        _edit_groups(opt, t)
        hopt.step(data[t])
    got = _flat(hopt.hypergradient(val_batch=data[k])[0])
    raw0 = _flat([p.detach() for p in hp.parameters()])

    def outer(raw: torch.Tensor) -> float:
        m, o, h = build()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(raw, list(h.parameters()))
        for t in range(k):
            _edit_groups(o, t)
            o.zero_grad()
            _penalised(m, h, data[t]).backward()
            o.step()
        with torch.no_grad():
            return float(_mse(m, h, data[k]))

    fd = torch.zeros_like(raw0)
    for i in range(len(raw0)):
        e = torch.zeros_like(raw0)
        e[i] = 1e-5
        fd[i] = (outer(raw0 + e) - outer(raw0 - e)) / 2e-5
    assert fd.abs().max() > 1e-4
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()))


@pytest.mark.parametrize(
    "solver",
    [lambda: hg.CG(maxiter=5, tol=1e-14), lambda: hg.Direct(), lambda: hg.Neumann(steps=400, alpha=0.1)],
    ids=["cg", "direct", "neumann"],
)
def test_torchopt_222_root_of_a_cubic_through_the_functional_api(solver: Callable[[], Any]) -> None:
    """torchopt#222's own example (from jaxopt's docs): the root of ``F(x, f) = f x^3 - x - 2``,
    differentiated in the scalar ``f`` by implicit differentiation; torchopt's CG set
    ``maxiter = x.size = 0`` for a 0-dim ``x`` and returned 0. Here ``F`` is the gradient of
    ``L_T = f x^4 / 4 - x^2 / 2 - 2 x`` and ``L_V = x``, so the IFT hypergradient is
    ``dx*/df = -x*^3 / (3 f x*^2 - 1)``."""
    f = torch.tensor(1.0, requires_grad=True)
    x = torch.tensor(1.5)
    for _ in range(50):  # Newton on F
        x = x - (f.detach() * x**3 - x - 2) / (3 * f.detach() * x**2 - 1)
    x = x.detach().requires_grad_(True)
    assert abs(float(f.detach() * x.detach() ** 3 - x.detach() - 2)) < 1e-14

    (g,), val, _ = hg.implicit_hypergradient(
        lambda: f * x**4 / 4 - x**2 / 2 - 2 * x, lambda: x, [x], [f], solver()
    )
    xs = float(x.detach())
    exact = -(xs**3) / (3 * 1.0 * xs**2 - 1)
    assert g.shape == torch.Size([])
    assert abs(float(g) - exact) < 1e-10 * abs(exact), (float(g), exact)
    assert abs(float(val) - xs) < 1e-15


# ------------------------------------------------------------------ 5. per-group rates (RAdam#24)


def _two_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


GROUP_OPTS: dict[str, Callable[[nn.Sequential], S.Optimizer]] = {
    # beta2 = 0.9 so RAdam's rectified branch is reached at step 6 of the 8 replayed
    "radam": lambda m: S.RAdam(
        [
            {"params": m[0].parameters(), "lr": 0.05, "betas": (0.9, 0.9)},
            {"params": m[2].parameters(), "lr": 0.01, "betas": (0.8, 0.95)},
        ]
    ),
    "radam_decoupled": lambda m: S.RAdam(
        [
            {"params": m[0].parameters(), "lr": 0.05, "betas": (0.9, 0.9)},
            {"params": m[2].parameters(), "lr": 0.01},
        ],
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
    "nadam": lambda m: S.NAdam(
        [
            {"params": m[0].parameters(), "lr": 0.05, "momentum_decay": 0.01},
            {"params": m[2].parameters(), "lr": 0.01},
        ]
    ),
    "adamax": lambda m: S.Adamax(
        [
            {"params": m[0].parameters(), "lr": 0.05},
            {"params": m[2].parameters(), "lr": 0.01, "betas": (0.5, 0.9)},
        ]
    ),
    "adadelta": lambda m: S.Adadelta(
        [{"params": m[0].parameters(), "lr": 0.5, "rho": 0.5}, {"params": m[2].parameters(), "lr": 1.0}]
    ),
    "asgd": lambda m: S.ASGD(
        [
            {"params": m[0].parameters(), "lr": 0.05, "t0": 2},
            {"params": m[2].parameters(), "lr": 0.01, "lambd": 0.1},
        ]
    ),
}


@pytest.mark.parametrize("name", list(GROUP_OPTS))
def test_each_param_groups_learning_rate_gets_its_own_hypergradient(name: str) -> None:
    """LiyuanLucasLiu/RAdam#24 "Does RAdam break training with different learning rates for
    different param_groups?" (a step size cached from the first group's rate; copied into
    Ranger and over9000): one learned rate per group, each group with its own betas / decay, 8
    steps through RAdam's unrectified and rectified phases; both entries equal central
    differences of real float64 training."""
    make, k = GROUP_OPTS[name], 8
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, 4, generator=g), torch.randn(12, 2, generator=g)) for _ in range(k + 1)]
    model = _two_layer()
    opt = make(model)
    hp = hg.hparams.LearningRate(opt)
    hopt = hg.Unrolled(
        model, hp, _mse, _mse, inner_optimizer=opt, outer_optimizer=S.SGD(hp.parameters(), lr=0.0), steps=k
    )
    for b in data[:k]:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=data[k])[0])
    assert got.shape == (2,)

    def outer(raw: torch.Tensor) -> float:
        m = _two_layer()
        o = make(m)
        h = hg.hparams.LearningRate(o)
        with torch.no_grad():
            h.raw.copy_(raw)
        h.write()
        for b in data[:k]:
            o.zero_grad()
            _mse(m, h, b).backward()
            o.step()
        with torch.no_grad():
            return float(_mse(m, h, data[k]))

    raw0 = hp.raw.detach().clone()
    fd = torch.tensor([(outer(raw0 + e) - outer(raw0 - e)) / 2e-6 for e in torch.eye(2) * 1e-6])
    assert fd.abs().min() > 1e-4  # both groups matter
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


# ------------------------------------------------------------------ 6. every family: the meta-batch recipe


def _contract() -> Any:
    import test_contract  # the contract registry: every family with its problem

    return test_contract


@pytest.mark.parametrize("mid", [m.id for m in _contract().METHODS])
def test_the_meta_batch_recipe_keeps_no_gradient_link_in_any_family(mid: str) -> None:
    """torchopt#218 ("memory keeps increasing ... due to gradient link"): a user who sums
    ``hopt.hypergradient(...)`` over tasks (README's meta-batch recipe), writes it to ``.grad``,
    steps the outer optimiser and keeps every ``info`` for logging must not be holding graphs:
    the returned hypergradients and every ``info`` field carry none, and meta-iteration 20 keeps
    no more live tensors than meta-iteration 8 (Unrolled's ring of recorded steps fills and
    empties with a period of 12 here, so both counts are taken at the same phase; what
    test_contract's allocator check does not see: the tensors the user keeps)."""
    import dataclasses

    # the contract's problems as test_contract runs them (their float64 is explicit; under a
    # float64 default dtype the best-response hypernetwork draws another initialisation, from which
    # SGD with momentum 0.9 diverges by step 14 even without hypersteps)
    torch.set_default_dtype(torch.float32)
    tc = _contract()
    m = tc.BY_ID[mid]
    hopt = tc._setup(m)
    batches, vb = tc._batches(4), tc._batches(2, seed=3)
    kept: list[Any] = []
    counts: list[int] = []
    for it in range(20):
        hopt.step(batches[it % 4])
        total = [torch.zeros_like(p) for p in hopt.hparams.parameters()]
        for task in range(2):
            grads, info = hopt.hypergradient(train_batch=batches[it % 4], val_batch=vb[task])
            for gr in grads:
                assert gr.grad_fn is None and not gr.requires_grad
            for key, value in dataclasses.asdict(info).items():
                assert not (torch.is_tensor(value) and value.requires_grad), key
            kept.append(info)
            total = [t + gr for t, gr in zip(total, grads, strict=True)]
        for p, t in zip(hopt.hparams.parameters(), total, strict=True):
            p.grad = t
        hopt.outer_optimizer.step()
        if it + 1 in (8, 20):
            counts.append(_live_tensors())
    assert counts[1] <= counts[0], counts
