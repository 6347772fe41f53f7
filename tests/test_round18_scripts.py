"""Round 18: published hyperparameter-optimisation scripts written from the README alone.

Each test is a small, faithful version of a research script, every number it relies on checked in
float64 against a closed form or central differences of the real training procedure (plain
``torch.optim`` loops written out here, not hypergrad's own steps):

* Shaban et al. 2019, truncated back-propagation: ``Unrolled(steps=K)`` after T > K steps on a
  quadratic is the K-term truncated sum, whose bias falls as (1 - eta mu)^K;
* Franceschi et al. 2018, bilevel hyper-representation: a shared feature extractor as the
  hyperparameter, linear heads trained from zero for each episode, a meta-batch of episodes
  summed by hand and stepped by an outer Adam under a StepLR;
* Pedregosa 2016, HOAG: CG warm-started across hypersteps with a tolerance decreasing over them
  (the solver replaced between hypersteps), on ridge's closed form;
* Lorraine et al. 2020 / a learned schedule: a ModuleDict of per-weight decays, a learning-rate
  multiplier on a LambdaLR schedule and an augmentation network, Unrolled against central
  differences of the written-out SGD-momentum run; a resume mid-script, bit-exact; and the
  hyperparameters' history logged with ``hg.hparams.summary``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- 1. Shaban et al. 2019 (truncation)


class _Vec(nn.Module):
    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self) -> Tensor:
        return self.w


def _quadratic(seed: int = 0, d: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    a = q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=DT)) @ q.T
    return (
        a,
        torch.randn(d, generator=g, dtype=DT),
        torch.randn(d, generator=g, dtype=DT),
        torch.randn(d, generator=g, dtype=DT),
    )


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_truncated_backprop_is_the_k_term_sum_and_its_bias_falls_geometrically(mode: str) -> None:
    """L_T = 1/2 w'Aw - lam'w, L_V = 1/2 |w - t|^2, T = 12 SGD steps (lr eta) from w0. Through
    the last K steps dw_T/dlam = eta sum_{k<K} B^k = A^-1 (I - B^K), B = I - eta A, so the
    K-truncated hypergradient is A^-1 (I - B^K)(w_T - t) (Shaban et al.'s Prop. 3.1 setting);
    K = T is the full derivative, which central differences of the real torch.optim run give."""
    a, lam0, t, w0 = _quadratic()
    eta, T = 0.3, 12

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        w = m()
        return 0.5 * w @ a @ w - h() @ w

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return 0.5 * ((m() - t) ** 2).sum()

    def real_run(lam: Tensor) -> Tensor:
        w = nn.Parameter(w0.clone())
        opt = torch.optim.SGD([w], lr=eta)
        for _ in range(T):
            opt.zero_grad()
            (0.5 * w @ a @ w - lam @ w).backward()
            opt.step()
        return w.detach()

    w_t = real_run(lam0)
    b_mat = torch.eye(4, dtype=DT) - eta * a
    errors = []
    full = torch.linalg.solve(a, (torch.eye(4, dtype=DT) - torch.linalg.matrix_power(b_mat, T)) @ (w_t - t))
    for k in (1, 3, 6, T):
        model = _Vec(w0)
        hp = hg.hparams.Hparam(lam0, "real")
        opt = torch.optim.SGD(model.parameters(), lr=eta)
        hopt = hg.Unrolled(
            model,
            hp,
            train,
            val,
            inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=k,
            mode=mode,
        )
        for _ in range(T):
            hopt.step(())
        torch.testing.assert_close(model.w.detach(), w_t, rtol=0, atol=1e-14)
        got = hopt.hypergradient(val_batch=())[0][0]
        eye_minus = torch.eye(4, dtype=DT) - torch.linalg.matrix_power(b_mat, k)
        truth = torch.linalg.solve(a, eye_minus @ (w_t - t))
        assert _rel(got, truth) < 1e-12, k
        errors.append(float((got - full).norm()))
    assert errors[-1] < 1e-12 * float(full.norm())
    # the bias |A^-1 (B^K - B^T)(w_T - t)| <= (1 - eta mu)^K |A^-1| |w_T - t| falls geometrically
    rate = 1 - eta * 0.5
    bound = torch.linalg.matrix_norm(torch.linalg.inv(a), 2) * (w_t - t).norm() * 2
    for k, e in zip((1, 3, 6), errors[:3], strict=True):
        assert e <= float(bound) * rate**k
    assert errors[0] > errors[1] > errors[2] > 0

    def outer(i: int, s: float) -> float:
        lam = lam0.clone()
        lam[i] += s
        return float(0.5 * ((real_run(lam) - t) ** 2).sum())

    fd = torch.tensor([(outer(i, 1e-5) - outer(i, -1e-5)) / 2e-5 for i in range(4)], dtype=DT)
    assert _rel(full, fd) < 1e-8


# ------------------------------------------------- 2. Franceschi et al. 2018 (hyper-representation)


def _episodes(n: int, seed: int = 0) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        proto = torch.randn(3, 5, generator=g, dtype=DT)
        ys, yq = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
        xs = proto[ys] + 0.5 * torch.randn(6, 5, generator=g, dtype=DT)
        xq = proto[yq] + 0.5 * torch.randn(9, 5, generator=g, dtype=DT)
        out.append(((xs, ys), (xq, yq)))
    return out


@pytest.mark.parametrize(
    "mode,checkpoint,momentum", [("reverse", False, 0.0), ("reverse", True, 0.9), ("forward", False, 0.9)]
)
def test_hyper_representation_episodes_summed_by_hand_match_fd_of_the_real_episodes(
    mode: str, checkpoint: bool, momentum: float
) -> None:
    """A feature extractor rep (the hyperparameters) shared by all episodes; each episode trains
    a linear head from zero for K = 5 SGD steps on its support set (a fresh optimiser state) and
    scores the query set. The meta-gradient of a meta-batch of 2 episodes, summed by hand from
    ``hopt.hypergradient``, must be the central difference of the sum of the two real episodes
    (plain torch.optim, written out); then the outer Adam (under a StepLR) steps on it, and the
    next meta-batch is again the real one's derivative at the new rep."""
    torch.manual_seed(0)
    rep = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).to(DT)
    head = nn.Linear(4, 3).to(DT)
    K, lr = 5, 0.5

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(h(b[0])), b[1])

    inner = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    outer_opt = torch.optim.Adam(rep.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(outer_opt, step_size=1, gamma=0.5)
    hopt = hg.Unrolled(
        head,
        rep,
        train,
        train,
        inner_optimizer=inner,
        outer_optimizer=outer_opt,
        steps=K,
        mode=mode,
        checkpoint=checkpoint,
    )

    def real_meta_loss(r: nn.Module, eps: list[Any]) -> float:
        total = 0.0
        for support, query in eps:
            h = nn.Linear(4, 3).to(DT)
            nn.init.zeros_(h.weight), nn.init.zeros_(h.bias)
            o = torch.optim.SGD(h.parameters(), lr=lr, momentum=momentum)
            for _ in range(K):
                o.zero_grad()
                train(h, r, support).backward()
                o.step()
            with torch.no_grad():
                total += float(train(h, r, query))
        return total

    data = _episodes(4)
    for meta in range(2):
        batch = data[2 * meta : 2 * meta + 2]
        total = [torch.zeros_like(p) for p in rep.parameters()]
        for support, query in batch:
            with torch.no_grad():
                for p in head.parameters():
                    p.zero_()
            inner.state.clear()
            hopt.start_episode()
            for _ in range(K):
                hopt.step(support)
            grads, _ = hopt.hypergradient(val_batch=query)
            total = [a + g for a, g in zip(total, grads, strict=True)]
        fd = [
            ht.central_difference(lambda b=batch: real_meta_loss(rep, b), p, eps=1e-6)
            for p in rep.parameters()
        ]
        assert _rel(_flat(total), _flat(fd)) < 1e-7, meta
        outer_opt.zero_grad()
        for p, g in zip(rep.parameters(), total, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in rep.parameters()]
        outer_opt.step()
        sched.step()
        assert all(not torch.equal(b, p) for b, p in zip(before, rep.parameters(), strict=True))
    assert outer_opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


# ----------------------------------------------------------------------------- 3. Pedregosa 2016 (HOAG)


def test_hoag_warm_started_cg_with_a_decreasing_tolerance_tracks_ridge_closed_form() -> None:
    """HOAG: at hyperstep k the inner problem is solved (here exactly) and H^-1 g by CG to a
    tolerance eps_k decreasing over hypersteps, warm-started from the previous solution. The
    script replaces ``hopt.solver`` with ``dataclasses.replace(hopt.solver, tol=eps_k)``; each
    hypergradient must be within cond * eps_k of ridge's closed form, CG must stop converged, and
    the warm start must save HVPs against a cold start at the same tolerance."""
    prob = ht.ridge(n_features=8, cond=20.0, seed=1)
    opt_in = torch.optim.SGD(prob.model.parameters(), lr=0.01)
    hopt = hg.Implicit(
        prob.model,
        prob.hparams,
        prob.train_loss,
        prob.val_loss,
        inner_optimizer=opt_in,
        outer_optimizer=torch.optim.SGD(prob.hparams.parameters(), lr=0.5),
        solver=hg.CG(maxiter=50, tol=1e-2, warm_start=True),
    )
    cold = hg.Implicit(
        prob.model,
        prob.hparams,
        prob.train_loss,
        prob.val_loss,
        inner_optimizer=opt_in,
        outer_optimizer=torch.optim.SGD(prob.hparams.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-2),
    )
    warm_its, cold_its = [], []
    for k in range(6):
        tol = 1e-2 / (k + 1) ** 3
        hopt.solver = dataclasses.replace(hopt.solver, tol=tol)
        cold.solver = dataclasses.replace(cold.solver, tol=tol)
        prob.solve_inner()
        truth = _flat(prob.exact_hypergradient())
        c_grads, c_info = cold.hypergradient(train_batch=prob.train_batch, val_batch=prob.val_batch)
        info = hopt.hyper_step(train_batch=prob.train_batch, val_batch=prob.val_batch)
        got = _flat(p.grad for p in prob.hparams.parameters())
        assert info.solver_status == "converged" and info.solver_residual <= tol
        assert _rel(got, truth) < 20.0 * tol, (k, _rel(got, truth), tol)  # cond(H) = 20
        assert _rel(_flat(c_grads), truth) < 20.0 * tol
        warm_its.append(info.solver_iterations)
        cold_its.append(c_info.solver_iterations)
    assert sum(warm_its[1:]) < sum(cold_its[1:]), (warm_its, cold_its)


# ------------------------------- 4. Lorraine et al. 2020 / a learned schedule: several kinds at once

_BASE_LR, _MOM = 0.2, 0.9


def _schedule(t: int) -> float:
    return 1.0 / (1.0 + 0.5 * t)


def _script(seed: int = 0) -> tuple[nn.Module, nn.ModuleDict, Any, Any, Any, Any]:
    """The model, the ModuleDict {per-weight decays, a lr multiplier, an augmentation net}, the
    inner SGD (momentum) under a LambdaLR, and the outer Adam under a StepLR."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    aug = nn.Linear(3, 3).to(DT)
    with torch.no_grad():
        aug.weight.mul_(0.3)
        aug.bias.mul_(0.3)
    inner = torch.optim.SGD(model.parameters(), lr=_BASE_LR, momentum=_MOM)
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="parameter", init=0.05),
            "lr": hg.hparams.LearningRate(inner, relative=True, init=1.3),
            "aug": aug,
        }
    )
    inner_sched = torch.optim.lr_scheduler.LambdaLR(inner, _schedule)
    outer = torch.optim.Adam(hp.parameters(), lr=0.02)
    outer_sched = torch.optim.lr_scheduler.StepLR(outer, step_size=1, gamma=0.7)
    return model, hp, inner, inner_sched, outer, outer_sched


def _train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    x, y = b
    return F.cross_entropy(m(x + h["aug"](x)), y) + h["wd"].penalty(m)


def _val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _data(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)
    ]


def _real_run(model0: nn.Module, hp: nn.ModuleDict, batches: list[Any], val: Any) -> float:
    """The script written out in plain torch.optim: SGD with momentum at lr = base * schedule(t)
    * multiplier, the augmentation applied to the input, the decays' penalty in the loss."""
    model = copy.deepcopy(model0)
    opt = torch.optim.SGD(model.parameters(), lr=_BASE_LR, momentum=_MOM)
    mult = float(hp["lr"].value[0])
    decays = hp["wd"].value.split([p.numel() for p in model.parameters()])
    aug = hp["aug"]
    for t, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _BASE_LR * _schedule(t) * mult
        opt.zero_grad()
        with torch.no_grad():
            xa = x + aug(x)
        pen = sum(0.5 * (d.view_as(p) * p**2).sum() for d, p in zip(decays, model.parameters(), strict=True))
        (F.cross_entropy(model(xa), y) + pen).backward()
        opt.step()
    with torch.no_grad():
        return float(_val(model, hp, val))


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_decays_lr_multiplier_and_augmentation_net_together_match_fd_of_the_written_out_run(
    mode: str,
) -> None:
    """Unrolled over all T = 4 steps of the run (hypergradient of every kind at once) against
    central differences of the plain torch.optim run in every raw hyperparameter."""
    model, hp, inner, inner_sched, outer, _ = _script()
    model0 = copy.deepcopy(model)
    data = _data(5)
    hopt = hg.Unrolled(
        model, hp, _train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=4, mode=mode
    )
    for b in data[:4]:
        hopt.step(b)
        inner_sched.step()
    grads, _ = hopt.hypergradient(val_batch=data[4])
    hp_fd = copy.deepcopy(hp)
    fd = [
        ht.central_difference(lambda: _real_run(model0, hp_fd, data[:4], data[4]), p, eps=1e-6)
        for p in hp_fd.parameters()
    ]
    names = [n for n, _ in hp.named_parameters()]
    for n, g, f in zip(names, grads, fd, strict=True):
        assert f.abs().max() > 1e-6, n
        assert _rel(g.reshape(-1), f.reshape(-1)) < 1e-6, n


def test_a_resume_mid_script_with_both_schedulers_is_bit_exact_and_the_summary_is_the_values() -> None:
    """Steps, hypersteps every 3 steps, both schedulers stepping; a checkpoint after the second
    hyperstep (hopt.state_dict() plus the two schedulers' states, as a script saves them) loaded
    into objects built afresh must continue bit-identically; the history logged with
    ``hg.hparams.summary`` is each container's constrained value."""
    data = _data(12)

    def run(stop: int | None, state: dict[str, Any] | None) -> tuple[Any, ...]:
        model, hp, inner, inner_sched, outer, outer_sched = _script()
        hopt = hg.Unrolled(model, hp, _train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=3)
        start = 0
        history: list[dict[str, float]] = []
        if state is not None:
            hopt.load_state_dict(state["hopt"])
            inner_sched.load_state_dict(state["inner_sched"])
            outer_sched.load_state_dict(state["outer_sched"])
            start = state["i"]
        for i in range(start, 12):
            if i == stop:
                return (
                    {
                        "hopt": copy.deepcopy(hopt.state_dict()),
                        "inner_sched": inner_sched.state_dict(),
                        "outer_sched": outer_sched.state_dict(),
                        "i": i,
                    },
                )
            hopt.step(data[i])
            inner_sched.step()
            if i % 3 == 2:
                info = hopt.hyper_step(val_batch=data[(i + 1) % 12])
                outer_sched.step()
                s = hg.hparams.summary(hp)
                history.append(s)
                assert s["lr"] == float(hp["lr"].value[0])
                wd = hp["wd"].value.double()
                assert s["wd.mean"] == pytest.approx(float(wd.mean()), rel=1e-14)
                assert s["wd.min"] == float(wd.min()) and s["wd.max"] == float(wd.max())
                aug_mean = float(hp["aug"].weight.detach().mean())
                assert s["aug.weight.mean"] == pytest.approx(aug_mean, rel=1e-12)
                assert info.outer_loss is not None
        return model, hp, inner, outer, history

    straight = run(None, None)
    saved = run(6, None)[0]
    resumed = run(None, saved)
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight[1].parameters(), resumed[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight[3].param_groups[0]["lr"] == resumed[3].param_groups[0]["lr"]
    assert straight[4][-2:] == resumed[4]
    assert len(straight[4]) == 4 and straight[4][0] != straight[4][-1]


def test_a_schedule_computed_from_hyperparameters_by_a_lambdalr_is_named_disconnected() -> None:
    """Micaelli & Storkey's per-step schedule is not expressible as a LambdaLR reading
    hyperparameters (the scheduler writes Python floats): the script gets a DisconnectedWarning
    naming the schedule, not a silent zero, while the multiplier on that schedule
    (``LearningRate(relative=True)``) still gets its hypergradient."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sched_hp = hg.hparams.Hparam(torch.ones(5, dtype=DT))
    hp = nn.ModuleDict({"sched": sched_hp, "lr": hg.hparams.LearningRate(inner, relative=True)})
    ls = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: float(sched_hp.value[min(t, 4)]))

    def mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1])

    hopt = hg.Unrolled(
        model,
        hp,
        mse,
        mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=5,
    )
    data = [(torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)) for _ in range(6)]
    for b in data[:5]:
        hopt.step(b)
        ls.step()
    with pytest.warns(hg.DisconnectedWarning, match=r"'sched\.raw'"):
        grads, _ = hopt.hypergradient(val_batch=data[5])
    assert float(grads[0].abs().max()) == 0.0 and float(grads[1].abs().max()) > 1e-4


# ---------------------------------------------------------- 5. Meta-SGD across episodes, resumed


class _MetaSGD(nn.Module):
    def __init__(self, init: nn.Module, inner: torch.optim.Optimizer) -> None:
        super().__init__()
        self.phi = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in init.parameters()])
        self.lr = hg.hparams.LearningRate(inner)


def _meta_loss(model: nn.Module, meta: nn.Module, batch: Any) -> Tensor:
    params = {n: f + p for (n, p), f in zip(model.named_parameters(), meta.phi, strict=True)}
    return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])


def _meta_tasks(n: int) -> list[Any]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            (torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)),
            (torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)),
        )
        for _ in range(n)
    ]


def _meta_script(mode: str) -> tuple[nn.Module, _MetaSGD, Any, Any, Any]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    src = copy.deepcopy(model)
    inner = torch.optim.Adam([{"params": [p]} for p in model.parameters()], lr=0.05)
    meta = _MetaSGD(src, inner)
    outer = torch.optim.Adam(meta.parameters(), lr=0.01)
    hopt = hg.Unrolled(
        model, meta, _meta_loss, _meta_loss, inner_optimizer=inner, outer_optimizer=outer, steps=3, mode=mode
    )
    return model, meta, inner, outer, hopt


def _meta_run(
    mode: str, tasks: list[Any], stop: tuple[int, int, int] | None = None, state: dict[str, Any] | None = None
) -> Any:
    """Meta-iterations of 2 tasks of 3 inner Adam steps from delta = 0 (state cleared); stop at
    (meta-iteration, task, inner step) and return a checkpoint, or resume from one."""
    model, meta, inner, outer, hopt = _meta_script(mode)
    first: list[Tensor] | None = None
    pos, total = (0, 0, 0), None
    if state is not None:
        hopt.load_state_dict(state["hopt"])
        pos, total = state["pos"], [t.clone() for t in state["total"]]
    for it in range(pos[0], 2):
        if total is None or it > pos[0]:
            total = [torch.zeros_like(p) for p in meta.parameters()]
        for task in range(pos[1] if it == pos[0] else 0, 2):
            support, query = tasks[2 * it + task]
            resumed_here = state is not None and (it, task) == pos[:2]
            if not resumed_here:
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                inner.state.clear()
                hopt.start_episode()
            for k in range(pos[2] if resumed_here else 0, 3):
                if (it, task, k) == stop:
                    return {
                        "hopt": copy.deepcopy(hopt.state_dict()),
                        "pos": stop,
                        "total": [t.clone() for t in total],
                    }
                hopt.step(support)
            grads, info = hopt.hypergradient(val_batch=query)
            assert info.unrolled_steps == 3
            total = [a + g for a, g in zip(total, grads, strict=True)]
        if first is None and state is None:
            first = [t.clone() for t in total]
        outer.zero_grad()
        for p, g in zip(meta.parameters(), total, strict=True):
            p.grad = g.clone()
        outer.step()
    return model, meta, first


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_meta_sgd_with_adam_episodes_matches_fd_and_resumes_mid_episode_bit_exactly(mode: str) -> None:
    """Meta-SGD (a learned init phi and one Adam learning rate per tensor) over a meta-batch of
    tasks, each from delta = 0 with a fresh Adam state: the summed meta-gradient is the central
    difference of the real episodes (plain torch.optim.Adam written out), and a checkpoint taken
    in the middle of an episode of the second meta-iteration resumes bit-identically."""
    tasks = _meta_tasks(4)
    model, meta, first = _meta_run(mode, tasks)
    _, meta0, *_ = _meta_script(mode)

    def real(m: _MetaSGD) -> float:
        total = 0.0
        for support, query in tasks[:2]:
            net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
            with torch.no_grad():
                for p, f in zip(net.parameters(), m.phi, strict=True):
                    p.copy_(f)
            lrs = m.lr.value.tolist()
            opt = torch.optim.Adam(
                [{"params": [p], "lr": lr} for p, lr in zip(net.parameters(), lrs, strict=True)]
            )
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(net(support[0]), support[1]).backward()
                opt.step()
            with torch.no_grad():
                total += float(F.cross_entropy(net(query[0]), query[1]))
        return total

    fd = [ht.central_difference(lambda: real(meta0), p, eps=1e-6) for p in meta0.parameters()]
    assert first is not None
    assert _rel(_flat(first), _flat(fd)) < 1e-6
    saved = _meta_run(mode, tasks, stop=(1, 1, 1))
    model_r, meta_r, _ = _meta_run(mode, tasks, state=saved)
    for a, b in zip(
        list(model.parameters()) + list(meta.parameters()),
        list(model_r.parameters()) + list(meta_r.parameters()),
        strict=True,
    ):
        assert torch.equal(a, b)


# ------------------------------------------------------ 6. Baydin et al. 2018 vs Unrolled(steps=1)


@pytest.mark.parametrize(
    "hd_cls,base_cls,kw",
    [
        (hg.optim.SGDHD, torch.optim.SGD, {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
        (hg.optim.SGDHD, torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
        (hg.optim.SGDHD, torch.optim.SGD, {"momentum": 0.0, "weight_decay": 0.05}),
        (hg.optim.AdamHD, torch.optim.Adam, {"weight_decay": 0.05, "amsgrad": True}),
        (hg.optim.AdamHD, torch.optim.Adam, {"weight_decay": 0.05, "betas": (0.8, 0.9)}),
    ],
    ids=["sgd-dampening", "sgd-nesterov", "sgd-plain", "adam-amsgrad", "adam-betas"],
)
def test_hypergradient_descent_is_a_one_step_unroll_at_every_step(
    hd_cls: Any, base_cls: Any, kw: dict[str, Any]
) -> None:
    """Baydin et al.'s h_{t+1} = <g_{t+1}, d_t> is -dF/d(lr_t) through the last step alone, F the
    next batch's objective with torch's L2 term: at every step of a run (not only the first, where
    SGD's d_t = g_t), SGDHD's / AdamHD's ``group["hypergrad"]`` equals ``Unrolled(steps=1)``'s
    hypergradient in the learning rate, and both equal a central difference in the last step's
    rate of the real run."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    init, ref = copy.deepcopy(net), copy.deepcopy(net)
    data = _data(5)
    wd = kw["weight_decay"]

    def ce(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    def objective(m: nn.Module, h: Any, b: Any) -> Tensor:
        return ce(m, h, b) + 0.5 * wd * sum((p**2).sum() for p in m.parameters())

    opt = base_cls(net.parameters(), lr=0.1, **kw)
    hp = hg.hparams.LearningRate(opt)
    hopt = hg.Unrolled(
        net,
        hp,
        ce,
        objective,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=1,
    )
    hd = hd_cls(ref.parameters(), lr=0.1, hypergrad_lr=0.0, **kw)

    def real(t: int, lr_last: float) -> float:
        m = copy.deepcopy(init)
        o = base_cls(m.parameters(), lr=0.1, **kw)
        for s in range(t + 1):
            o.param_groups[0]["lr"] = lr_last if s == t else 0.1
            o.zero_grad()
            ce(m, None, data[s]).backward()
            o.step()
        with torch.no_grad():
            return float(objective(m, None, data[t + 1]))

    hd.zero_grad()
    ce(ref, None, data[0]).backward()
    hd.step()
    for t in range(3):
        hopt.step(data[t])
        unrolled = -float(hopt.hypergradient(val_batch=data[t + 1])[0][0]) / float(hp.value)
        hd.zero_grad()
        ce(ref, None, data[t + 1]).backward()
        hd.step()  # h_{t+1} = <g_{t+1}, d_t>, computed before its base step
        fd = -(real(t, 0.1 + 1e-6) - real(t, 0.1 - 1e-6)) / 2e-6
        assert hd.param_groups[0]["hypergrad"] == pytest.approx(unrolled, rel=1e-10, abs=0)
        assert unrolled == pytest.approx(fd, rel=1e-7)


# ------------------------------------------------- 7. two containers tuning one optimiser setting


@pytest.mark.parametrize("order", ["absolute_first", "relative_first"])
def test_two_containers_tuning_the_same_learning_rate_are_refused_by_name(order: str) -> None:
    """A ModuleDict holding an absolute ``LearningRate`` and a relative one of the same optimiser
    (a script adding a multiplier next to a rate it already tunes) must be refused at
    construction, naming both. Before: with the absolute one first the replay called
    ``float()`` on the tuned tensor (torch's 'Converting a tensor with requires_grad=True to a
    scalar' UserWarning, an error under filterwarnings=error); with the relative one first the
    second ``step`` raised 'param_groups[0]['lr'] was changed ... outside hypergrad (by a
    scheduler ...)', blaming a scheduler the script does not have."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    a, b = hg.hparams.LearningRate(inner), hg.hparams.LearningRate(inner, relative=True, init=1.5)
    hp = nn.ModuleDict({"a": a, "b": b} if order == "absolute_first" else {"b": b, "a": a})

    def mse(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    data = [(torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)) for _ in range(4)]
    with pytest.raises(ValueError, match=r"hparams\.[ab] and hparams\.[ab] both tune inner_optimizer's 'lr'"):
        hopt = hg.Unrolled(
            model,
            hp,
            mse,
            mse,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=2,
        )
        for batch in data[:3]:
            hopt.step(batch)
        hopt.hypergradient(val_batch=data[3])


def test_hoag_resumed_between_hypersteps_keeps_its_warm_start_bit_exactly() -> None:
    """The HOAG loop above checkpointed after its third hyperstep (``hopt.state_dict()`` holds
    the warm start) and loaded into a problem and ``Implicit`` built afresh: the remaining
    hypersteps (tolerance re-set by the script) give bit-identical hypergradients, iteration
    counts and hyperparameters, and the warm start is what makes the counts lower."""

    def run(stop: int | None, state: dict[str, Any] | None, warm: bool = True) -> Any:
        prob = ht.ridge(n_features=8, cond=20.0, seed=1)
        hopt = hg.Implicit(
            prob.model,
            prob.hparams,
            prob.train_loss,
            prob.val_loss,
            inner_optimizer=torch.optim.SGD(prob.model.parameters(), lr=0.01),
            outer_optimizer=torch.optim.Adam(prob.hparams.parameters(), lr=0.005),
            solver=hg.CG(maxiter=50, tol=1e-2, warm_start=warm),
        )
        start, out = 0, []
        if state is not None:
            hopt.load_state_dict(state["hopt"])
            start = state["k"]
        for k in range(start, 6):
            if k == stop:
                return {"hopt": copy.deepcopy(hopt.state_dict()), "k": k}
            hopt.solver = dataclasses.replace(hopt.solver, tol=1e-2 / (k + 1) ** 3)
            prob.solve_inner()
            info = hopt.hyper_step(train_batch=prob.train_batch, val_batch=prob.val_batch)
            out.append((_flat(p.grad for p in prob.hparams.parameters()).clone(), info.solver_iterations))
        return out, prob.hparams.value

    straight, hp_straight = run(None, None)
    resumed, hp_resumed = run(None, run(3, None))
    cold, _ = run(None, None, warm=False)
    assert torch.equal(hp_straight, hp_resumed)
    for (g1, i1), (g2, i2) in zip(straight[3:], resumed, strict=True):
        assert torch.equal(g1, g2) and i1 == i2
    assert sum(i for _, i in straight[1:]) < sum(i for _, i in cold[1:])


# ------------------------------------------ 8. Micaelli & Storkey 2021: schedules shared over intervals


class _Schedules(nn.Module):
    """A learning-rate multiplier on a LambdaLR schedule, the momentum, and a weight-decay
    schedule shared over intervals of 2 steps (the step index travels in the batch)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__()
        self.lr = hg.hparams.LearningRate(inner, relative=True, init=0.8)
        self.mom = hg.hparams.Momentum(inner)
        self.decay = hg.hparams.Hparam(torch.tensor([0.02, 0.05, 0.1], dtype=DT))


def _scheduled_train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    x, y, t = b
    return F.cross_entropy(m(x), y) + 0.5 * h.decay()[t // 2] * sum((p**2).sum() for p in m.parameters())


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_interval_shared_lr_momentum_and_decay_schedules_match_fd_of_the_written_out_run(mode: str) -> None:
    """Micaelli & Storkey's setting at small scale: all 6 steps differentiated (forward mode, as
    they do, and reverse), the learning rate as a multiplier on a LambdaLR schedule, the momentum
    and a 3-interval weight-decay schedule; central differences of the plain torch.optim run."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model0 = copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.7)
    hp = _Schedules(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: 0.5 * (1 + math.cos(t / 6 * math.pi)))
    hopt = hg.Unrolled(
        model,
        hp,
        _scheduled_train,
        _val,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=6,
        mode=mode,
    )
    data = [(x, y, torch.tensor(t)) for t, (x, y) in enumerate(_data(6, seed=4))]
    val = _data(1, seed=5)[0]
    lrs = []
    for b in data:
        lrs.append(inner.param_groups[0]["lr"])
        hopt.step(b)
        sched.step()
    grads, _ = hopt.hypergradient(val_batch=val)
    hp_fd = copy.deepcopy(hp)

    def real() -> float:
        m = copy.deepcopy(model0)
        o = torch.optim.SGD(m.parameters(), lr=0.3, momentum=float(hp_fd.mom.value[0]))
        for lr, b in zip(lrs, data, strict=True):
            o.param_groups[0]["lr"] = lr * float(hp_fd.lr.value[0])
            o.zero_grad()
            _scheduled_train(m, hp_fd, b).backward()
            o.step()
        with torch.no_grad():
            return float(_val(m, hp_fd, val))

    fd = [ht.central_difference(real, p, eps=1e-6) for p in hp_fd.parameters()]
    for n, g, f in zip([n for n, _ in hp.named_parameters()], grads, fd, strict=True):
        assert f.abs().min() > 1e-5, n
        assert _rel(g.reshape(-1), f.reshape(-1)) < 1e-6, n


# ------------------------------------- 9. Lorraine et al. 2020: Neumann's alpha under a LambdaLR


def test_lorraine_neumann_alpha_follows_the_scheduled_inner_lr_and_converges_to_the_dense_ift() -> None:
    """Per-weight decays and an augmentation network tuned by the IFT with Neumann at
    ``alpha=None`` (plain SGD: the inner learning rate) after 300 steps under a LambdaLR: alpha
    is the *scheduled* rate at the hyperstep (bit-identical to ``alpha=`` that number, not the
    base rate), and with enough terms the hypergradient is the dense IFT's at the reached point."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(model, per="parameter", init=0.3), "aug": nn.Linear(3, 3).to(DT)}
    )  # (decays >= 0.3: H >= 0.3 I, few terms needed)
    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(40, 3, generator=g, dtype=DT), torch.randint(0, 2, (40,), generator=g))
    vb = (torch.randn(20, 3, generator=g, dtype=DT), torch.randint(0, 2, (20,), generator=g))
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda t: 1.0 / (1.0 + 0.01 * t))

    def make(solver: hg.LinearSolver) -> hg.Implicit:
        return hg.Implicit(
            model,
            hp,
            _train,
            _val,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=solver,
        )

    hopt = make(hg.Neumann(steps=5))
    for _ in range(300):
        hopt.step(tb)
        sched.step()
    lr = inner.param_groups[0]["lr"]
    assert lr == pytest.approx(0.125)
    got = _flat(hopt.hypergradient(train_batch=tb, val_batch=vb)[0])

    def neumann(**kw: Any) -> Tensor:
        return _flat(make(hg.Neumann(**kw)).hypergradient(train_batch=tb, val_batch=vb)[0])

    assert torch.equal(got, neumann(steps=5, alpha=lr))
    assert _rel(got, neumann(steps=5, alpha=0.5)) > 1e-3
    long = neumann(steps=600)
    dense = _flat(ht.dense_ift_hypergradient(model, hp, _train, _val, tb, vb))
    assert _rel(long, dense) < 1e-6
