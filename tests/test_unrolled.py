"""Unrolled hypergradients against an independent NumPy forward-mode computation, `higher`,
finite differences, and between forward and reverse mode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64
K = 6

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_wd": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.03)),
    "momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.9))),
    "adam_wd_amsgrad": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.02, amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
}


def _numpy_forward_mode(
    p: ht.BilevelProblem, w0: np.ndarray, cls: type, kw: dict, k: int, rho: float = 0.1
) -> np.ndarray:
    """dL_V/d raw through k optimiser steps, carried forward as a Jacobian Z = dw/dd (NumPy)."""
    a, b = (t.numpy() for t in p.train_batch)
    c, cv = (t.numpy() for t in p.val_batch)
    d = p.hparams.raw[0].detach().exp().numpy()
    n = len(w0)
    w, z = w0.copy(), np.zeros((n, n))
    lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
    buf = dbuf = m = dm = v = dv = vmax = dvmax = None
    for t in range(1, k + 1):
        g = (a + np.diag(d)) @ w - b
        dg = (a + np.diag(d)) @ z + np.diag(w)
        if cls is torch.optim.SGD:
            mu, damp = kw.get("momentum", 0.0), kw.get("dampening", 0.0)
            g, dg = g + wd * w, dg + wd * z
            if mu:
                if buf is None:
                    buf, dbuf = g.copy(), dg.copy()
                else:
                    buf, dbuf = mu * buf + (1 - damp) * g, mu * dbuf + (1 - damp) * dg
                if kw.get("nesterov"):
                    g, dg = g + mu * buf, dg + mu * dbuf
                else:
                    g, dg = buf, dbuf
            w, z = w - lr * g, z - lr * dg
        else:
            b1, b2 = kw.get("betas", (0.9, 0.999))
            eps = 1e-8
            if cls is torch.optim.AdamW:
                w, z = w * (1 - lr * wd), z * (1 - lr * wd)
            elif wd:
                g, dg = g + wd * w, dg + wd * z
            if m is None:
                m, dm, v, dv = np.zeros(n), np.zeros((n, n)), np.zeros(n), np.zeros((n, n))
            m, dm = b1 * m + (1 - b1) * g, b1 * dm + (1 - b1) * dg
            v, dv = b2 * v + (1 - b2) * g * g, b2 * dv + (1 - b2) * 2 * g[:, None] * dg
            if kw.get("amsgrad"):
                if vmax is None:
                    vmax, dvmax = v.copy(), dv.copy()
                else:
                    take = v > vmax
                    vmax = np.where(take, v, vmax)
                    dvmax = np.where(take[:, None], dv, dvmax)
                vv, dvv = vmax, dvmax
            else:
                vv, dvv = v, dv
            bc1, bc2s = 1 - b1**t, np.sqrt(1 - b2**t)
            denom = np.sqrt(vv) / bc2s + eps
            ddenom = dvv / (2 * np.sqrt(vv)[:, None] * bc2s)
            step = lr / bc1
            w = w - step * m / denom
            z = z - step * (dm / denom[:, None] - (m / denom**2)[:, None] * ddenom)
    gv = c.T @ (c @ w - cv)
    dd = z.T @ gv + rho
    return dd * d


def _unrolled(
    p: ht.BilevelProblem,
    cls: type,
    kw: dict,
    k: int,
    mode: str = "reverse",
    hparams: nn.Module | None = None,
    train_loss=None,
) -> hg.Unrolled:
    hp = p.hparams if hparams is None else hparams
    return hg.Unrolled(
        p.model,
        hp,
        train_loss or p.train_loss,
        p.val_loss,
        inner_optimizer=cls(p.model.parameters(), **kw),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=k,
        mode=mode,
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_reverse_matches_numpy_forward_mode(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    p = ht.quadratic(dim=6)
    w0 = np.random.default_rng(1).standard_normal(6)
    with torch.no_grad():
        p.model.w.copy_(torch.from_numpy(w0))
    hopt = _unrolled(p, cls, kw, K)
    for _ in range(K):
        hopt.step(p.train_batch)
    info = hopt.hyper_step(val_batch=p.val_batch)
    assert info.unrolled_steps == K
    ref = _numpy_forward_mode(p, w0, cls, kw, K)
    got = p.hparams.raw[0].grad
    assert got is not None
    assert np.abs(got.numpy() - ref).max() <= 1e-10 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", ["momentum", "adam_wd_amsgrad", "adamw"])
def test_forward_mode_equals_reverse_mode(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    grads = {}
    for mode in ("reverse", "forward"):
        p = ht.quadratic(dim=5)
        with torch.no_grad():
            p.model.w.normal_(generator=torch.Generator().manual_seed(3))
        hopt = _unrolled(p, cls, kw, 4, mode=mode)
        for _ in range(4):
            hopt.step(p.train_batch)
        hopt.hyper_step(val_batch=p.val_batch)
        grads[mode] = p.hparams.raw[0].grad.clone()  # type: ignore[union-attr]
    assert torch.allclose(grads["forward"], grads["reverse"], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
def test_matches_higher(name: str) -> None:
    """`higher` as a second, independent reference. Its Adam places eps as sqrt(v) + eps, before
    the bias correction (torch.optim: sqrt(v)/sqrt(1 - beta2^t) + eps), so Adam is compared at
    eps = 0, where the two formulas agree."""
    higher = pytest.importorskip("higher")
    cls, kw = OPTIMIZERS[name]
    if cls is torch.optim.Adam:
        kw = dict(kw, eps=0.0)
    p = ht.quadratic(dim=6)
    with torch.no_grad():
        p.model.w.normal_(generator=torch.Generator().manual_seed(4))
    model0 = copy.deepcopy(p.model)
    hopt = _unrolled(p, cls, kw, K)
    for _ in range(K):
        hopt.step(p.train_batch)
    hopt.hyper_step(val_batch=p.val_batch)
    ours = p.hparams.raw[0].grad.clone()  # type: ignore[union-attr]

    p.hparams.raw[0].grad = None
    opt = cls(model0.parameters(), **kw)
    with higher.innerloop_ctx(model0, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(p.train_loss(fmodel, p.hparams, p.train_batch))
        p.val_loss(fmodel, p.hparams, p.val_batch).backward()
    ref = p.hparams.raw[0].grad
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def _real_trajectory_loss(
    model0: nn.Module,
    cls: type,
    kw: dict,
    lr_raw: torch.Tensor,
    mom_raw: torch.Tensor | None,
    p: ht.BilevelProblem,
    k: int,
) -> float:
    """L_V after k real torch.optim steps with the given (raw) lr / momentum: for finite diffs."""
    model = copy.deepcopy(model0)
    kw = dict(kw, lr=float(lr_raw.exp()))
    if mom_raw is not None:
        kw["momentum"] = float(torch.sigmoid(mom_raw.detach()))
    opt = cls(model.parameters(), **kw)
    for _ in range(k):
        opt.zero_grad()
        p.train_loss(model, p.hparams, p.train_batch).backward()
        opt.step()
    with torch.no_grad():
        return float(p.val_loss(model, p.hparams, p.val_batch))


@pytest.mark.parametrize(
    "cls,kw,tune_momentum",
    [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.7), True),
        (torch.optim.Adam, dict(lr=0.05), False),
    ],
)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_inner_learning_rate_and_momentum_match_finite_differences(cls, kw, tune_momentum, mode) -> None:
    p = ht.quadratic(dim=5)
    with torch.no_grad():
        p.model.w.normal_(generator=torch.Generator().manual_seed(5))
    model0 = copy.deepcopy(p.model)
    inner = cls(p.model.parameters(), **kw)

    class Settings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lr = hg.hparams.LearningRate(inner)
            if tune_momentum:
                self.momentum = hg.hparams.Momentum(inner)

    hp = Settings()

    def train_loss(m, h, b):
        return p.train_loss(m, p.hparams, b)

    def val_loss(m, h, b):
        return p.val_loss(m, p.hparams, b)

    hopt = hg.Unrolled(
        p.model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=K,
        mode=mode,
    )
    for _ in range(K):
        hopt.step(p.train_batch)
    hopt.hyper_step(val_batch=p.val_batch)

    def f() -> float:
        mom = hp.momentum.raw[0] if tune_momentum else None
        return _real_trajectory_loss(model0, cls, kw, hp.lr.raw[0].detach(), mom, p, K)

    fd = ht.central_difference(f, hp.lr.raw, eps=1e-6)
    assert hp.lr.raw.grad is not None
    assert torch.allclose(hp.lr.raw.grad, fd, rtol=1e-6, atol=1e-10)
    if tune_momentum:
        fdm = ht.central_difference(f, hp.momentum.raw, eps=1e-6)
        assert torch.allclose(hp.momentum.raw.grad, fdm, rtol=1e-6, atol=1e-10)


def test_adam_through_zero_second_moment_has_no_nans() -> None:
    """A weight whose gradient is exactly zero keeps Adam's second moment at 0; the derivative of
    sqrt there is infinite, and naive unrolling returns NaN. Ours must stay finite and exact."""

    class WithDead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, dtype=DT))
            self.dead = nn.Parameter(torch.zeros(3, dtype=DT))  # used with a zero coefficient

        def forward(self, x=None):
            return self.w

    p = ht.quadratic(dim=4)
    model = WithDead()

    def train_loss(m, h, b):
        return p.train_loss(m, h, b) + 0.0 * m.dead.sum()

    class HP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.raw = nn.ParameterList([nn.Parameter(torch.full((4,), -1.0, dtype=DT))])

        def penalty(self, m):
            return 0.5 * (self.raw[0].exp() * m.w.square()).sum()

    hp = HP()
    p.hparams.raw[0].data.copy_(hp.raw[0].data)
    p.model.w.data.normal_(generator=torch.Generator().manual_seed(6))
    model.w.data.copy_(p.model.w.data)
    hopt = hg.Unrolled(
        model,
        hp,
        train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=4,
    )
    for _ in range(4):
        hopt.step(p.train_batch)
    assert torch.equal(hopt.inner_optimizer.state[model.dead]["exp_avg_sq"], torch.zeros(3, dtype=DT))
    hopt.hyper_step(val_batch=p.val_batch)
    got = hp.raw[0].grad
    assert got is not None and bool(torch.isfinite(got).all())
    ref = _numpy_forward_mode(p, p.model.w.detach().numpy(), torch.optim.Adam, dict(lr=0.05), 4)
    assert np.abs(got.numpy() - ref).max() < 1e-10 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_replay_reproduces_the_real_trajectory(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}]
    inner = cls(groups, **kw)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01)

    def loss(m, h, b):
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    for _ in range(7):  # more steps than the window: the ring keeps the last 3
        hopt.step((torch.randn(8, 4, dtype=DT), torch.randn(8, 2, dtype=DT)))
    for replayed, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.allclose(replayed, real, rtol=0, atol=1e-14)


@pytest.mark.parametrize("train_mode", [True, False])
def test_mlp_with_batchnorm_matches_finite_differences(train_mode: bool) -> None:
    model = ht.BatchNormMLP(hidden=6).to(DT).train(train_mode)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)
    batches = [(torch.randn(10, 3, dtype=DT), torch.randn(10, dtype=DT)) for _ in range(4)]
    vb = (torch.randn(10, 3, dtype=DT), torch.randn(10, dtype=DT))

    def mse(m, h, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    def train(m, h, b):
        return mse(m, h, b) + h.penalty(m)

    model0 = copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9)
    hopt = hg.Unrolled(
        model,
        hp,
        train,
        mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), **kw),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=4,
    )
    for b in batches:
        hopt.step(b)
    hopt.hyper_step(val_batch=vb)
    ours = [h.grad.clone() for h in hp.parameters()]  # type: ignore[union-attr]

    def f() -> float:
        m = copy.deepcopy(model0)
        opt = torch.optim.SGD(m.parameters(), **kw)
        for b in batches:
            grads = torch.autograd.grad(train(m, hp, b), list(m.parameters()))
            for w, g in zip(m.parameters(), grads, strict=True):
                w.grad = g
            opt.step()
        with torch.no_grad():
            return float(mse(m, hp, vb))

    for h, g in zip(hp.parameters(), ours, strict=True):
        fd = ht.central_difference(f, h, eps=1e-6)
        assert torch.allclose(g, fd, rtol=1e-6, atol=1e-9)
    # the real model's running statistics saw each real step exactly once, like plain training
    ref = copy.deepcopy(model0)
    opt = torch.optim.SGD(ref.parameters(), **kw)
    for b in batches:
        opt.zero_grad()
        train(ref, hp.requires_grad_(False), b).backward()
        opt.step()
    for (n, a), (_, r) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.allclose(a, r, rtol=0, atol=1e-14), n


def test_unsupported_inner_optimizer_is_refused() -> None:
    p = ht.quadratic()
    with pytest.raises(TypeError, match="SparseAdam"):
        _unrolled(p, torch.optim.SparseAdam, dict(lr=0.01), 2)


def test_unrolled_needs_a_recorded_step_and_a_val_batch() -> None:
    p = ht.quadratic()
    hopt = _unrolled(p, torch.optim.SGD, dict(lr=0.1), 2)
    with pytest.raises(ValueError, match="at least one inner step"):
        hopt.hyper_step(val_batch=p.val_batch)
    hopt.step(p.train_batch)
    with pytest.raises(ValueError, match="val_batch"):
        hopt.hyper_step(train_batch=p.train_batch)


def test_implicit_refuses_optimizer_settings() -> None:
    p = ht.quadratic()
    inner = torch.optim.SGD(p.model.parameters(), lr=0.1)
    hp = hg.hparams.LearningRate(inner)
    with pytest.raises(ValueError, match="Unrolled"):
        hg.Implicit(
            p.model,
            hp,
            p.train_loss,
            p.val_loss,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )


def _anchored_run(
    k: int, every: int, n: int, fused: bool = False
) -> tuple[hg.Unrolled, list[list[torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    hopt = hg.Unrolled(
        model,
        hp,
        lambda m, h, b: nn.functional.cross_entropy(m(b[0]), b[1]) + h.penalty(m),
        lambda m, h, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1, fused=fused),
        steps=k,
    )
    g = torch.Generator().manual_seed(0)
    before: list[list[torch.Tensor]] = []  # the real weights before each step
    for i in range(n):
        b = (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
        before.append([p.detach().clone() for p in model.parameters()])
        hopt.step(b)
        if (i + 1) % every == 0:
            hopt.hyper_step(val_batch=b)
    return hopt, before


@pytest.mark.parametrize("fused", [False, True])  # a fused outer Adam does not bump version counters
@pytest.mark.parametrize("k,every", [(5, 5), (5, 7), (4, 2), (3, 1)])
def test_replay_keeps_few_snapshots_and_starts_from_the_real_weights(k: int, every: int, fused: bool) -> None:
    n = 23
    hopt, before = _anchored_run(k, every, n, fused)
    anchors = sum(r.anchor is not None for r in hopt._records)
    assert len(hopt._records) <= 2 * k
    # the memory target: 2 snapshots, not K, when hypersteps come every K steps; one more when
    # they come less often (a snapshot every K steps and one after each hyperstep); at most K
    assert anchors <= (2 if every == k else 3 if every > k else k)
    # the window's first step starts from the real weights of that time, re-run from the anchor
    # with the hyperparameters each step used (here they changed inside the re-run part)
    start, _, _ = hopt._start()
    for a, b in zip(start, before[n - k], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_replay_reuses_each_decay_once_with_the_same_hypergradient(monkeypatch):
    """Inside the replay a per-weight decay's exp is computed once per hyperstep, not once per
    replayed step (the same graph node reused): same hypergradient as recomputing it every step,
    and a raw tensor changed in place is recomputed, not served stale."""
    import contextlib

    import hypergrad._unrolled as unrolled_mod
    from hypergrad import hparams as hp_mod

    def run(reuse: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2)
        calls = [0]
        exp = torch.exp

        def counting_exp(x: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return exp(x)

        def train(m, h, b):
            return nn.functional.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

        def val(m, h, b):
            return nn.functional.cross_entropy(m(b[0]), b[1])

        hopt = hg.Unrolled(
            model, hp, train, val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=4,
        )
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
                   for _ in range(5)]
        for b in batches[:4]:
            hopt.step(b)
        ctx = hp_mod._reusing_values if reuse else contextlib.nullcontext
        with monkeypatch.context() as mp:
            mp.setattr(unrolled_mod, "_reusing_values", ctx)
            mp.setattr(torch, "exp", counting_exp)
            hopt.hyper_step(val_batch=batches[4])
        return [p.grad.clone() for p in hp.parameters()], calls[0]

    g_reuse, n_reuse = run(True)
    g_each, n_each = run(False)
    n_tensors = 4  # two weights, two biases
    assert n_reuse == n_tensors and n_each == 4 * n_tensors
    for a, b in zip(g_reuse, g_each, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)

    raw = torch.zeros(3, dtype=DT, requires_grad=True)
    with hp_mod._reusing_values():
        first = hp_mod._memo(raw, "exp", torch.exp)
        assert hp_mod._memo(raw, "exp", torch.exp) is first
        with torch.no_grad():
            raw.add_(1.0)
        torch.testing.assert_close(hp_mod._memo(raw, "exp", torch.exp), torch.full((3,), np.e, dtype=DT))
    assert hp_mod._THREAD.memo is None


@pytest.mark.parametrize("use", ["scaled_twice", "nested", "unused"])
def test_replayed_penalty_gradient_equals_autograds(use: str) -> None:
    """The reverse-mode replay adds WeightDecay's gradient c * d * w itself (the penalty gives only
    its value, the coefficient c read from a probe): the same hypergradient as differentiating the
    penalty by autograd, whatever coefficient the loss gives it, how often it calls it, how the
    containers nest, or when it does not use it."""
    import warnings

    def run(own_path: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        wd = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
        other = hg.hparams.WeightDecay(model, per="layer", init=0.01)
        hp = nn.ModuleDict({"a": wd, "b": other})

        def train(m, h, b):
            ce = nn.functional.cross_entropy(m(b[0]), b[1])
            if use == "scaled_twice":
                return ce + 0.3 * h["a"].penalty(m) + 0.7 * h["a"].penalty(m) + h["b"].penalty(m)
            if use == "nested":
                return ce + h["a"].penalty(m) * 2.0 + h["b"].penalty(m) / 3.0
            return ce + 0.0 * sum(p.sum() for p in h.parameters())  # hyperparameters, no penalty

        def val(m, h, b):
            return nn.functional.cross_entropy(m(b[0]), b[1])

        hopt = hg.Unrolled(
            model, hp, train, val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3,
        )
        if not own_path:
            hopt._decays = []
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))
                for _ in range(4)]
        for b in data[:3]:
            hopt.step(b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.DisconnectedWarning)  # ("unused": by design)
            grads, _ = hopt.hypergradient(val_batch=data[3])
        return list(grads)

    ours, autograd = run(True), run(False)
    for a, b in zip(ours, autograd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    if use != "unused":
        assert all(float(a.abs().max()) > 0 for a in ours)


def test_a_state_recorded_on_several_ranks_is_refused_by_a_run_of_another_size():
    """Its recorded steps hold one rank's shards of the batches: replayed as whole batches they
    give another hypergradient (2.8e-5 relative off in a 2-rank DDP run resumed in one process)."""
    p = ht.quadratic(dim=4)

    def build() -> hg.Unrolled:
        return hg.Unrolled(
            p.model,
            p.hparams,
            p.train_loss,
            p.val_loss,
            inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.1),
            steps=3,
        )

    hopt = build()
    hopt.step(p.train_batch)
    state = hopt.state_dict()
    assert state["method"]["world"] == 1
    two = copy.deepcopy(state)
    two["method"]["world"] = 2  # as rank 0 of a 2-rank run saves it
    before = [t.detach().clone() for t in p.model.parameters()]
    fresh = build()
    with pytest.raises(ValueError, match="saved in a run of 2 data-parallel ranks"):
        fresh.load_state_dict(two)
    assert all(torch.equal(a, b) for a, b in zip(before, p.model.parameters(), strict=True))
    fresh.load_state_dict(state)  # the same size: fine
    fresh.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
