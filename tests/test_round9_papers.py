"""Round 9: miniature research scripts from the papers behind hypergrad, written from the README
and the public docstrings as a new user would, each hypergradient or learned result checked
against an independent truth (a closed form, central differences of the real procedure run with
plain ``torch.optim``, or a brute-force grid). Float64, tiny sizes, seconds in all.

Papers: Lorraine et al. 2020 (per-weight L2 + a learned augmentation network, IFT), Franceschi
et al. 2017 / Baydin et al. 2018 (learning rate and momentum, forward mode and
hypergradient descent), Maclaurin et al. 2015 / Wang et al. 2018 (dataset distillation),
Ren et al. 2018 (per-example weights, data hyper-cleaning), MacKay et al. 2019 / Lorraine &
Duvenaud 2018 (self-tuning networks, best-response hypernetworks), Immer et al. 2021/2023
(marginal likelihood)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import hypergrad as hg

DT = torch.float64


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _central(f: Callable[[], float], t: Tensor, eps: float = 1e-6) -> Tensor:
    """Central differences of ``f`` w.r.t. every entry of the leaf ``t`` (edited in place)."""
    out = torch.zeros_like(t)
    flat, g = t.data.view(-1), out.view(-1)
    for i in range(flat.numel()):
        v = flat[i].item()
        flat[i] = v + eps
        fp = f()
        flat[i] = v - eps
        fm = f()
        flat[i] = v
        g[i] = (fp - fm) / (2 * eps)
    return out


# --------------------------------------------------------------- 0. the README's drop-in example


def test_readme_drop_in_example_runs_verbatim() -> None:
    """The README's "Drop it into a training script" block, verbatim (float32, digits): it
    runs, every logged value is finite, the decays moved and stayed positive."""
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-3)

    def train_loss(model, hparams, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y) + hparams.penalty(model)

    def val_loss(model, hparams, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    hopt = hg.Implicit(model, hp, train_loss, val_loss,
                       inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                       outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2, fused=True),
                       solver=hg.Neumann(steps=5))
    from sklearn.datasets import load_digits
    x, y = (torch.tensor(a) for a in load_digits(return_X_y=True))
    x = x.float() / 16
    batches = [((x[i:i + 64], y[i:i + 64]), (x[1536:], y[1536:])) for i in range(0, 1536, 64)] * 3
    before = hp.value.clone()
    infos = []
    for i, (train_batch, val_batch) in enumerate(batches):
        hopt.step(train_batch)
        if i % 10 == 0:
            info = hopt.hyper_step(train_batch=train_batch, val_batch=val_batch)
            infos.append((info.outer_loss, info.hypergrad_norm, info.solver_residual))
    assert len(infos) == 8
    assert all(math.isfinite(float(v)) for row in infos for v in row)
    assert infos[-1][0] < infos[0][0]
    assert (hp.value > 0).all() and not torch.equal(hp.value, before)


# ------------------------------------------- 1. dataset distillation (Maclaurin 2015, Wang 2018)


class _Distilled(nn.Module):
    """Learned images, learned (soft) labels and, as in Wang et al., the learned step size: the
    whole training set is hyperparameters."""

    def __init__(self, n: int, d: int, c: int, inner: torch.optim.Optimizer) -> None:
        super().__init__()
        self.images = nn.Parameter(torch.randn(n, d, dtype=DT))
        self.labels = nn.Parameter(torch.randn(n, c, dtype=DT))
        self.lr = hg.hparams.LearningRate(inner)


def _distill_loss(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    assert batch == ()
    logits = model(hp.images)
    return -(F.softmax(hp.labels, -1) * F.log_softmax(logits, -1)).sum(-1).mean()


def _ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _distill_truth(init: dict[str, Tensor], hp: nn.Module, k: int, mom: float,
                   val: tuple[Tensor, Tensor]) -> float:
    """K real torch.optim.SGD steps on the distilled data from ``init``; the validation loss."""
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    m.load_state_dict(init)
    opt = torch.optim.SGD(m.parameters(), lr=float(hp.lr.value[0]), momentum=mom)
    for _ in range(k):
        opt.zero_grad()
        _distill_loss(m, hp, ()).backward()
        opt.step()
    with torch.no_grad():
        return float(_ce(m, hp, val))


@pytest.mark.parametrize(("checkpoint", "mode"), [(False, "reverse"), (True, "reverse"),
                                                  (False, "forward")])
def test_dataset_distillation_episodes_from_reinitialised_weights_match_fd(checkpoint: bool,
                                                                            mode: str) -> None:
    """Episodes of K SGD(momentum) steps on learned images and labels with a learned step size
    (``step(())``) from freshly initialised weights (``reset_parameters``,
    ``inner.state.clear()``, ``start_episode()``), a window longer than the episode, three
    episodes with outer steps between them: each episode's hypergradient equals central
    differences of the K real torch.optim steps from that episode's initialisation, with
    ``checkpoint=True`` and in forward mode as in reverse mode."""
    torch.manual_seed(0)
    k, mom = 4, 0.5
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=mom)
    hp = _Distilled(3, 4, 3, inner)
    hopt = hg.Unrolled(model, hp, _distill_loss, _ce, inner_optimizer=inner,
                       outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
                       steps=k + 2, checkpoint=checkpoint, mode=mode)
    val = (torch.randn(20, 4, dtype=DT), torch.randint(0, 3, (20,)))
    for episode in range(3):
        with torch.no_grad():
            for mod in model:
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
        inner.state.clear()
        hopt.start_episode()
        init = copy.deepcopy(model.state_dict())
        for _ in range(k):
            hopt.step(())
        grads, info = hopt.hypergradient(val_batch=val)
        assert info.unrolled_steps == k
        for p, g in zip(hp.parameters(), grads, strict=True):
            fd = _central(lambda init=init: _distill_truth(init, hp, k, mom, val), p)
            torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9, msg=f"episode {episode}")
        hopt.hyper_step(val_batch=val)


# ------------------------------------------------ 2. data hyper-cleaning (Ren et al. 2018)


def _weighted_ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    x, y, index = batch
    return (hp(index) * F.cross_entropy(model(x), y, reduction="none")).mean()


def _val_ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize(("sampler", "mode"), [("shuffle_drop_last", "reverse"),
                                               ("replacement", "reverse"),
                                               ("replacement", "forward")])
def test_hyper_cleaning_over_a_dataloader_matches_fd_of_the_real_run(sampler: str, mode: str) -> None:
    """Per-example weights read through ``WithIndex`` from a ``DataLoader`` (shuffled with
    ``drop_last``, or a ``RandomSampler`` with replacement, whose batches repeat indices),
    Adam as the inner optimiser, Unrolled over the last K batches: the hypergradient of every
    example weight equals central differences of the real run on the same batches (repeated
    indices count twice; examples outside the window get exactly 0)."""
    torch.manual_seed(1)
    n, k = 10, 3
    x, y = torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))
    ds = hg.data.WithIndex(TensorDataset(x, y))
    g = torch.Generator().manual_seed(3)
    if sampler == "replacement":
        loader = DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True,
                                                                     num_samples=20, generator=g))
    else:
        loader = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True, generator=g)
    val = (torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,)))
    model = nn.Linear(3, 2).to(DT)
    init = copy.deepcopy(model.state_dict())
    hp = hg.hparams.ExampleWeights(n, init=0.7, dtype=DT)
    with torch.no_grad():
        hp.raw.add_(0.3 * torch.randn(n, dtype=DT))
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    hopt = hg.Unrolled(model, hp, _weighted_ce, _val_ce, inner_optimizer=inner,
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=k, mode=mode)
    batches = []
    for _ in range(2):
        for b in loader:
            batches.append(b)
            hopt.step(b)
    if sampler == "replacement":
        assert any(len(set(b[2].tolist())) < len(b[2]) for b in batches[-k:])
    grads, _ = hopt.hypergradient(val_batch=val)

    def truth() -> float:
        m = nn.Linear(3, 2).to(DT)
        m.load_state_dict(init)
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        h = copy.deepcopy(hp)
        for i, b in enumerate(batches):
            opt.zero_grad()
            # steps before the window are constants of the truncated hypergradient
            hh = h if i >= len(batches) - k else copy.deepcopy(hp_before)
            _weighted_ce(m, hh, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_val_ce(m, h, val))

    hp_before = copy.deepcopy(hp)
    fd = _central(truth, hp.raw)
    seen = torch.zeros(n, dtype=torch.bool)
    for b in batches[-k:]:
        seen[b[2]] = True
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-10)
    assert (grads[0][~seen] == 0).all() and (grads[0][seen] != 0).all()


# ------------------------- 3. learning rate and momentum (Franceschi 2017, Baydin 2018)


def _mse(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _two_group_sgd(model: nn.Module, nesterov: bool) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.6},
                            {"params": model[2].parameters(), "lr": 0.05, "momentum": 0.3}],
                           lr=0.1, momentum=0.5, nesterov=nesterov)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_lr_and_momentum_per_group_match_fd_of_the_k_step_run(mode: str) -> None:
    """``LearningRate`` and ``Momentum`` of a two-group Nesterov SGD, K = 6 steps over
    different batches, one hyperstep: equal to central differences of the six real
    ``torch.optim.SGD`` steps in the groups' learning rates and momenta."""
    torch.manual_seed(2)
    k = 6
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    init = copy.deepcopy(model.state_dict())
    inner = _two_group_sgd(model, nesterov=True)
    hp = nn.ModuleDict({"lr": hg.hparams.LearningRate(inner), "mom": hg.hparams.Momentum(inner)})
    hopt = hg.Unrolled(model, hp, _mse, _mse, inner_optimizer=inner,
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01), steps=k, mode=mode)
    batches = [(torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)) for _ in range(k)]
    val = (torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT))
    for b in batches:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=val)

    def run(lrs: Tensor, moms: Tensor) -> float:
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        m.load_state_dict(init)
        opt = _two_group_sgd(m, nesterov=True)
        for grp, lr, mu in zip(opt.param_groups, lrs.tolist(), moms.tolist(), strict=True):
            grp["lr"], grp["momentum"] = lr, mu
        for b in batches:
            opt.zero_grad()
            _mse(m, None, b).backward()  # type: ignore[arg-type]
            opt.step()
        with torch.no_grad():
            return float(_mse(m, None, val))  # type: ignore[arg-type]

    lr_v, mom_v = hp["lr"].value.clone(), hp["mom"].value.clone()
    # chain rule through the containers' maps onto their domains, done by autograd
    names = [n for n, _ in hp.named_parameters()]
    dval_draw = {}
    for name, raw in hp.named_parameters():
        fd = _central(lambda: run(hp["lr"].value, hp["mom"].value), raw, eps=1e-6)
        dval_draw[name] = fd
    got = dict(zip(names, grads, strict=True))
    for name in names:
        torch.testing.assert_close(got[name], dval_draw[name], rtol=1e-6, atol=1e-10)
    assert torch.equal(hp["lr"].value, lr_v) and torch.equal(hp["mom"].value, mom_v)


class _StepSchedule(nn.Module):
    """Franceschi et al.'s per-iteration learning-rate schedule, eta_t = softplus(raw_t), for plain
    SGD at lr=1 written as a loss scale; the step number travels in the batch (recorded by value)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.full((k,), -1.0, dtype=DT) + 0.1 * torch.arange(k, dtype=DT))

    def forward(self, t: Tensor) -> Tensor:
        return F.softplus(self.raw[t])


def _scheduled_mse(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    x, y, t = batch
    return hp(t) * _mse(model, hp, (x, y))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_per_step_learning_rate_schedule_matches_fd(mode: str) -> None:
    """A learned schedule eta_1..eta_K (one hyperparameter per step, the step index in the batch):
    forward and reverse mode equal central differences of the K real SGD steps."""
    torch.manual_seed(4)
    k = 5
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    init = copy.deepcopy(model.state_dict())
    hp = _StepSchedule(k)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    hopt = hg.Unrolled(model, hp, _scheduled_mse, _mse, inner_optimizer=inner,
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01), steps=k, mode=mode)
    batches = [(torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT), torch.tensor(t))
               for t in range(k)]
    val = (torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT))
    for b in batches:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=val)

    def run() -> float:
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        m.load_state_dict(init)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        for x, y, t in batches:
            opt.param_groups[0]["lr"] = float(F.softplus(hp.raw.detach()[t]))
            opt.zero_grad()
            _mse(m, hp, (x, y)).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(m, hp, val))

    torch.testing.assert_close(grads[0], _central(run, hp.raw), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("variant", ["adam", "l2", "amsgrad"])
def test_adamhd_hypergradient_is_minus_the_fd_derivative_in_the_last_learning_rate(variant: str) -> None:
    """Baydin et al.: AdamHD's ``group["hypergrad"]`` at step t is
    ``-d f(theta_{t-1}) / d alpha_{t-1}``: central differences of real ``torch.optim.Adam`` runs
    whose last step's learning rate is perturbed (hypergrad_lr=0, so the rate is constant), with
    an L2 weight decay (f then includes its quadratic) or AMSGrad."""
    kw: dict[str, Any] = {"adam": {}, "l2": {"weight_decay": 0.3},
                          "amsgrad": {"amsgrad": True}}[variant]
    wd = kw.get("weight_decay", 0.0) if variant == "l2" else 0.0
    torch.manual_seed(5)
    a = torch.randn(6, 3, dtype=DT)
    b = torch.randn(6, dtype=DT)
    f = lambda w: 0.5 * ((a @ w - b) ** 2).mean() + 0.1 * (w ** 4).sum()  # noqa: E731
    w0 = torch.randn(3, dtype=DT)
    t, lr = 6, 0.05
    w = w0.clone().requires_grad_()
    opt = hg.optim.AdamHD([w], lr=lr, hypergrad_lr=0.0, **kw)
    for _ in range(t):
        opt.zero_grad()
        f(w).backward()
        opt.step()
    h = opt.param_groups[0]["hypergrad"]

    def adam(last_lr: float) -> float:
        v = w0.clone().requires_grad_()
        o = torch.optim.Adam([v], lr=lr, **kw)
        for i in range(t - 1):
            if i == t - 2:
                o.param_groups[0]["lr"] = last_lr
            o.zero_grad()
            f(v).backward()
            o.step()
        with torch.no_grad():
            return float(f(v) + 0.5 * wd * (v ** 2).sum())

    eps = 1e-6
    fd = (adam(lr + eps) - adam(lr - eps)) / (2 * eps)
    assert h == pytest.approx(-fd, rel=1e-6, abs=1e-12)


# ------------------ 4. per-weight L2 and a learned augmentation network (Lorraine et al. 2020)


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class _L2AndAug(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decay = hg.hparams.WeightDecay(model, per="parameter", init=0.2)
        self.aug = nn.Conv2d(1, 1, 3, padding=1)  # a learned augmentation network
        with torch.no_grad():
            self.aug.weight.mul_(0.3)


def _aug_train(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x + hp.aug(x)), y) + hp.decay.penalty(model)


def _newton(model: nn.Module, hp: nn.Module, batch: Any, iters: int = 6) -> Tensor:
    """Newton's method with the dense Hessian (from near a minimum), to the optimum in float64
    rounding; returns the Hessian's eigenvalues there."""
    params = list(model.parameters())
    for _ in range(iters + 1):
        g = _flat(torch.autograd.grad(_aug_train(model, hp, batch), params, create_graph=True))
        h = torch.stack([_flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g])
        if g.norm() < 1e-14:
            break
        step = torch.linalg.solve(h, g.detach())
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) - step, params)
    return torch.linalg.eigvalsh(h)


def _solve_inner(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    """L-BFGS to near a minimum, then Newton."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _aug_train(model, hp, batch)
        loss.backward()
        return loss

    opt.step(closure)
    return _newton(model, hp, batch)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_per_weight_decay_and_augmentation_network_match_fd_of_the_optimum(solver: str) -> None:
    """A tiny CNN with a decay per weight and a convolutional augmentation network (an
    ``nn.Module`` of hyperparameters) trained to its optimum: ``Implicit`` with CG (tight) and
    with Neumann (many terms, alpha from power iteration) gives the directional derivative of
    the validation loss at the *re-solved* optimum (central differences, Newton re-solves)
    along random directions in both the decays and the augmentation network."""
    torch.manual_seed(6)
    model = _TinyCNN().to(DT)
    hp = _L2AndAug(model).to(DT)
    train = (torch.randn(24, 1, 6, 6, dtype=DT), torch.randint(0, 3, (24,)))
    val = (torch.randn(16, 1, 6, 6, dtype=DT), torch.randint(0, 3, (16,)))
    assert _solve_inner(model, hp, train)[0] > 0  # a minimum, not a saddle
    slv = (hg.CG(maxiter=300, tol=1e-12) if solver == "cg"
           else hg.Neumann(steps=1000, alpha="power"))
    hopt = hg.Implicit(model, hp, _aug_train, _val_ce,
                       inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), solver=slv)
    grads, info = hopt.hypergradient(train_batch=train, val_batch=val)
    w_star = copy.deepcopy(model.state_dict())
    hps = list(hp.parameters())
    eps = 1e-5
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        dirs = [torch.randn(p.shape, dtype=DT, generator=gen) for p in hps]
        vals = []
        for sgn in (1, -1):
            with torch.no_grad():
                for p, d in zip(hps, dirs, strict=True):
                    p.add_(sgn * eps * d)
            _newton(model, hp, train)
            with torch.no_grad():
                vals.append(float(_val_ce(model, hp, val)))
                for p, d in zip(hps, dirs, strict=True):
                    p.sub_(sgn * eps * d)
            model.load_state_dict(w_star)
        fd = (vals[0] - vals[1]) / (2 * eps)
        got = float(sum((g * d).sum() for g, d in zip(grads, dirs, strict=True)))
        rtol = 1e-6 if solver == "cg" else 1e-4
        assert got == pytest.approx(fd, rel=rtol), (solver, info.solver_status, got, fd)


# ------------------ 5. self-tuning networks and best-response hypernetworks (MacKay 2019, Lorraine 2018)


class _StnMLP(nn.Module):
    """Dropout on the hidden units and an integer circular shift of the input (augmentation)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(6, 8, n, dtype=DT)
        self.l2 = hg.nn.StnLinear(8, 3, n, dtype=DT)

    def forward(self, x: Tensor, hp: Any) -> Tensor:
        d = hp.draw(len(x))
        if self.training:
            x = torch.stack([torch.roll(xi, int(s)) for xi, s in zip(x, d["shift"].reshape(-1), strict=True)])
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"].reshape(-1), self.training)
        return self.l2(h, d)


class _StnLM(nn.Module):
    """A one-layer LSTM language model: embedding, variational dropout, StnLSTMCell, StnLinear."""

    def __init__(self, n: int, vocab: int = 7, hidden: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4, dtype=DT)
        self.cell = hg.nn.StnLSTMCell(4, hidden, n_hparams=n, dtype=DT)
        self.out = hg.nn.StnLinear(hidden, vocab, n, dtype=DT)
        self.hidden = hidden

    def forward(self, tokens: Tensor, hp: Any) -> Tensor:  # tokens (T, B)
        d = hp.draw(tokens.shape[1])
        e = self.emb(tokens)
        mask = hg.nn.dropout(torch.ones_like(e[0]), d["dropout"].reshape(-1), self.training)
        h = c = torch.zeros(tokens.shape[1], self.hidden, dtype=DT)
        outs = []
        for t in range(tokens.shape[0]):
            h, c = self.cell(e[t] * mask, (h, c), d)
            outs.append(self.out(h, d))
        return torch.stack(outs)


def _stn_ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0], hp), batch[1])


def _lm_ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    logits = model(batch[:-1], hp)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1:].reshape(-1))


@pytest.mark.parametrize("net", ["mlp", "lstm"])
def test_stn_hypergradient_is_the_derivative_of_the_validation_loss_through_the_response(net: str) -> None:
    """MacKay et al.'s hyperstep on a dropout rate and an integer shift (MLP) or a dropout rate
    (StnLSTMCell language model), after some self-tuning training: with a vanishing
    perturbation scale and no entropy term, the hypergradient of the raw hyperparameters equals
    central differences of the eval-mode validation loss of the trained network."""
    torch.manual_seed(7)
    specs: dict[str, Any] = {"dropout": hg.hparams.Rate(0.3, high=0.9)}
    if net == "mlp":
        specs["shift"] = hg.hparams.Integer(1, 0, 3)
    tiny = dict(scale=1e-9, scale_range=(1e-10, 1.0), learn_scale=False, dtype=DT)
    hp = hg.hparams.SelfTuned(**tiny, **specs)  # type: ignore[arg-type]
    if net == "mlp":
        model: nn.Module = _StnMLP(hp.size)
        loss: Callable[..., Tensor] = _stn_ce
        train = (torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,)))
        val: Any = (torch.randn(12, 6, dtype=DT), torch.randint(0, 3, (12,)))
    else:
        model = _StnLM(hp.size)
        loss = _lm_ce
        train = torch.randint(0, 7, (6, 4))
        val = torch.randint(0, 7, (6, 3))
    hopt = hg.SelfTuning(model, hp, loss, loss, entropy_weight=0.0,
                         inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                         outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1))
    for _ in range(6):
        hopt.step(train)
    # a hyperparameter away from its initial value, so the response is not at its centre
    with torch.no_grad():
        hp.raw.add_(0.2)
    grads, _ = hopt.hypergradient(val_batch=val)
    assert model.training

    def f() -> float:
        model.eval()
        with torch.no_grad():
            v = float(loss(model, hp, val))
        model.train()
        return v

    got = dict(zip([n for n, _ in hp.named_parameters()], grads, strict=True))
    fd = _central(f, hp.raw, eps=1e-6)
    torch.testing.assert_close(got["raw"], fd, rtol=1e-6, atol=1e-10)
    assert (fd.abs() > 1e-6).all()


def test_best_response_on_ridge_recovers_the_validation_optimal_penalty() -> None:
    """Lorraine & Duvenaud 2018 on ridge regression: the hypergradient is the derivative of the
    validation loss of the generated weights (central differences), and 800 steps of local
    best-response training find the penalty within 35% of the brute-force grid's minimiser
    of the closed-form validation loss (started 10x below it)."""
    torch.manual_seed(0)
    n, d = 30, 8
    wt = torch.randn(d, 1, dtype=DT)
    x = torch.randn(n, d, dtype=DT)
    y = x @ wt + 1.5 * torch.randn(n, 1, dtype=DT)
    xv = torch.randn(200, d, dtype=DT)
    yv = xv @ wt + 1.5 * torch.randn(200, 1, dtype=DT)

    def closed_form_val(lam: float) -> float:
        w = torch.linalg.solve(x.T @ x / n + lam * torch.eye(d, dtype=DT), x.T @ y / n)
        return float(((xv @ w - yv) ** 2).mean())

    grid = torch.logspace(-4, 1, 1001, dtype=DT).tolist()
    best = min(grid, key=closed_form_val)
    torch.manual_seed(1)
    hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False,
                              scale=0.5, dtype=DT)
    net = hg.nn.HyperNet(nn.Linear(d, 1, bias=False).to(DT), hp.size).to(DT)

    def train(m: Any, h: Any, b: Any) -> Tensor:
        w = m.weights(h)["weight"]
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + h.draw(1)["decay"][0] * (w ** 2).sum()

    def val(m: Any, h: Any, b: Any) -> Tensor:
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean()

    hopt = hg.BestResponse(net, hp, train, val,
                           inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
                           outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1))
    for i in range(800):
        hopt.step((x, y))
        if i == 50:
            g, _ = hopt.hypergradient(val_batch=(xv, yv))
            fd = _central(lambda: float(val(net, hp, (xv, yv)).detach()), hp.raw)
            torch.testing.assert_close(g[0], fd, rtol=1e-6, atol=1e-12)
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=(xv, yv))
    lam = float(hp.current()["decay"][0])
    assert 0.001 < best < 1  # an interior optimum
    assert abs(math.log(lam / best)) < math.log(1.35), (lam, best)


# ------------------------------------- 6. marginal likelihood (Immer et al. 2021, 2023)


def _reg_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def _my_evidence(model: nn.Module, x: Tensor, y: Tensor, deltas: Tensor, sigma: Tensor) -> Tensor:
    """Written out: the linearised-Laplace log evidence of a 2-layer regression MLP at its current
    weights, log p(D|theta) - theta' P0 theta / 2 + logdet(P0) / 2 - logdet(P0 + J'J / s^2) / 2,
    one prior precision per ``nn.Linear``; batched over leading dims of ``deltas (..., 2)`` and
    ``sigma (...)``."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(model, ps, (x,)).reshape(-1))(params)
    j = torch.cat([jac[n].reshape(len(x), -1) for n in names], 1)  # (N, P)
    theta = torch.cat([params[n].reshape(-1) for n in names])
    layer = torch.cat([torch.full((params[n].numel(),), int(n.startswith("2")), dtype=torch.long)
                       for n in names])
    with torch.no_grad():
        f = model(x).reshape(-1)
    prec = deltas[..., layer]  # (..., P)
    s2 = sigma[..., None, None] ** 2
    ggn = j.T @ j
    post = torch.diag_embed(prec) + ggn / s2
    n = len(x)
    loglik = (-0.5 * ((y.reshape(-1) - f) ** 2).sum() / sigma ** 2 - n * torch.log(sigma)
              - 0.5 * n * math.log(2 * math.pi))
    return (loglik - 0.5 * (prec * theta ** 2).sum(-1) + 0.5 * torch.log(prec).sum(-1)
            - 0.5 * torch.linalg.slogdet(post)[1])


def _regression_data(n: int = 20) -> tuple[Tensor, Tensor]:
    x = torch.linspace(-2, 2, n, dtype=DT)[:, None]
    return x, torch.sin(2 * x) + 0.3 * torch.randn(n, 1, dtype=DT)


def _fit_map(model: nn.Module, x: Tensor, y: Tensor, deltas: Tensor, sigma: float, iters: int = 300) -> None:
    """The MAP weights by L-BFGS, then Newton, on N * Gaussian NLL + theta' P0 theta / 2 (written
    out)."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, tolerance_grad=1e-13,
                            tolerance_change=1e-18, history_size=50, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        nll = 0.5 * ((model(x) - y) ** 2).sum() / sigma ** 2
        return nll + sum(0.5 * deltas[int(n.startswith("2"))] * (p ** 2).sum()
                         for n, p in model.named_parameters())

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    for _ in range(3):
        g = _flat(torch.autograd.grad(objective(), params, create_graph=True))
        h = torch.stack([_flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g])
        with torch.no_grad():
            step = torch.linalg.solve(h, g)
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) - step, params)


def test_marglik_exact_evidence_is_the_written_out_one_and_its_maximiser_beats_a_grid() -> None:
    """Immer et al. 2021 on a small regression MLP at its MAP weights: ``log_evidence`` equals the
    evidence written out from a ``jacrev`` Jacobian at several points; ``MarginalLikelihood``
    with ``bound="exact"`` (weights held, 400 outer Adam steps, no inner step) lands on a
    per-layer prior precision and noise whose written-out evidence is at least the best of a
    brute-force 16^3 grid, inside that grid's best cell."""
    torch.manual_seed(8)
    x, y = _regression_data()
    model = _reg_mlp()
    _fit_map(model, x, y, torch.tensor([1.0, 1.0], dtype=DT), 0.3)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.0).to(DT)
    for d1, d2, s in [(1.0, 1.0, 0.3), (0.2, 5.0, 0.7), (3.0, 0.1, 0.1)]:
        with torch.no_grad():
            for r, v in zip(prior.raw, (d1, d2), strict=True):
                r.fill_(math.log(v))
        got = hg.log_evidence(model, x, y.reshape(-1), prior, likelihood="regression", noise=s)
        want = _my_evidence(model, x, y, torch.tensor([d1, d2], dtype=DT), torch.tensor(s, dtype=DT))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)

    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
                        "noise": hg.hparams.ObservationNoise(init=1.0)}).to(DT)
    hopt = hg.MarginalLikelihood(model, hp, likelihood="regression", data_size=len(x),
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                 outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
                                 bound="exact", outer_steps=400)
    info = hopt.hyper_step(train_batch=(x, y.reshape(-1)))
    deltas, sigma = hp["prior"].value, hp["noise"].value
    learned = float(_my_evidence(model, x, y, deltas, sigma))
    assert info.outer_loss == pytest.approx(-float(_my_evidence(
        model, x, y, hp["prior"].value, hp["noise"].value)) / len(x), rel=1e-2)

    ld = torch.linspace(-4, 3, 16, dtype=DT)
    ls = torch.linspace(-3, 0.5, 16, dtype=DT)
    g1, g2, g3 = torch.meshgrid(ld, ld, ls, indexing="ij")
    ev = _my_evidence(model, x, y, torch.stack([g1, g2], -1).exp(), g3.exp())
    i = int(ev.argmax())
    best = (float(g1.reshape(-1)[i]), float(g2.reshape(-1)[i]), float(g3.reshape(-1)[i]))
    assert learned >= float(ev.max()) - 1e-9
    cell = (float(ld[1] - ld[0]), float(ls[1] - ls[0]))
    at = (math.log(deltas[0]), math.log(deltas[1]), math.log(sigma))
    assert abs(at[0] - best[0]) <= cell[0] and abs(at[1] - best[1]) <= cell[0]
    assert abs(at[2] - best[2]) <= cell[1], (at, best)


def test_marglik_through_map_hypergradient_matches_fd_of_the_resolved_map() -> None:
    """``through_map=True`` (exact bound, full batch, a tight CG): the hypergradient of the
    per-layer precisions and the noise equals central differences of the written-out evidence
    at the MAP re-solved (L-BFGS) for each perturbed hyperparameter; the default
    (weights held) equals central differences with the weights held."""
    torch.manual_seed(9)
    x, y = _regression_data()
    model = _reg_mlp()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
                        "noise": hg.hparams.ObservationNoise(init=0.4)}).to(DT)
    with torch.no_grad():
        for r, v in zip(hp["prior"].raw, (0.3, -0.5), strict=True):
            r.fill_(v)
    _fit_map(model, x, y, hp["prior"].value, float(hp["noise"].value))
    theta = copy.deepcopy(model.state_dict())
    kw: dict[str, Any] = dict(likelihood="regression", data_size=len(x), bound="exact",
                              inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                              outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0))
    held, _ = hg.MarginalLikelihood(model, hp, **kw).hypergradient(train_batch=(x, y.reshape(-1)))
    total, _ = hg.MarginalLikelihood(model, hp, through_map=True,
                                     solver=hg.CG(maxiter=200, tol=1e-13, damping=0.0),
                                     **kw).hypergradient(train_batch=(x, y.reshape(-1)))

    def evidence(resolve: bool) -> float:
        if resolve:
            model.load_state_dict(theta)
            _fit_map(model, x, y, hp["prior"].value, float(hp["noise"].value), iters=100)
        v = float(_my_evidence(model, x, y, hp["prior"].value, hp["noise"].value))
        model.load_state_dict(theta)
        return -v / len(x)  # outer loss: -evidence / N

    for i, raw in enumerate(hp.parameters()):
        torch.testing.assert_close(held[i], _central(lambda: evidence(False), raw, 1e-5),
                                   rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(total[i], _central(lambda: evidence(True), raw, 1e-5),
                                   rtol=1e-5, atol=1e-8)


def test_marglik_learned_translation_range_hypergradient_matches_fd_of_the_bound() -> None:
    """A learned invariance (Immer et al. 2022): ``RandomTranslation`` on 1-D signals with
    ``augmentation_samples=4``, after a few MAP steps. The hypergradient of the per-layer
    precisions and the range equals central differences of ``-log_evidence_bound / N`` with the
    same draws (the global RNG reseeded), and ``outer_loss`` is that bound."""
    torch.manual_seed(10)
    x, y = torch.randn(12, 8, dtype=DT), torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer"),
                        "shift": hg.hparams.RandomTranslation((8,), init=1.0)}).to(DT)
    hopt = hg.MarginalLikelihood(model, hp, likelihood="classification", data_size=12,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
                                 augmentation_samples=4)
    for _ in range(5):
        hopt.step((x, y))
    torch.manual_seed(3)
    grads, info = hopt.hypergradient(train_batch=(x, y))

    def bound() -> float:
        torch.manual_seed(3)
        with torch.no_grad():
            return -float(hg.log_evidence_bound(model, x, y, hp["prior"], data_size=12,
                                                augmentation=hp["shift"], samples=4)) / 12

    assert info.outer_loss == pytest.approx(bound(), rel=1e-12)
    for g, p in zip(grads, hp.parameters(), strict=True):
        torch.testing.assert_close(g, _central(bound, p), rtol=1e-6, atol=1e-10)
    assert float(grads[-1].abs().sum()) > 1e-4


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdhd_hypergradient_is_minus_the_fd_derivative_in_the_last_learning_rate(nesterov: bool) -> None:
    """SGDN-HD (momentum, dampening 0, weight decay, optionally Nesterov): ``group["hypergrad"]``
    at step t is ``-d f(theta_{t-1}) / d alpha_{t-1}``, with f the objective *without* the weight
    decay term (torch adds it to the gradient) plus the decay's quadratic, by central
    differences of real ``torch.optim.SGD`` runs."""
    torch.manual_seed(11)
    a, b = torch.randn(6, 3, dtype=DT), torch.randn(6, dtype=DT)
    wd = 0.1
    f = lambda w: 0.5 * ((a @ w - b) ** 2).mean() + 0.1 * (w ** 4).sum()  # noqa: E731
    w0 = torch.randn(3, dtype=DT)
    t, lr = 5, 0.05
    w = w0.clone().requires_grad_()
    opt = hg.optim.SGDHD([w], lr=lr, momentum=0.7, nesterov=nesterov, weight_decay=wd,
                         hypergrad_lr=0.0)
    for _ in range(t):
        opt.zero_grad()
        f(w).backward()
        opt.step()
    h = opt.param_groups[0]["hypergrad"]

    def sgd(last_lr: float) -> float:
        v = w0.clone().requires_grad_()
        o = torch.optim.SGD([v], lr=lr, momentum=0.7, nesterov=nesterov, weight_decay=wd)
        for i in range(t - 1):
            if i == t - 2:
                o.param_groups[0]["lr"] = last_lr
            o.zero_grad()
            f(v).backward()
            o.step()
        with torch.no_grad():
            return float(f(v) + 0.5 * wd * (v ** 2).sum())

    eps = 1e-6
    fd = (sgd(lr + eps) - sgd(lr - eps)) / (2 * eps)
    assert h == pytest.approx(-fd, rel=1e-6, abs=1e-12)


# ------------------------------------------------------------ 7. more of the same scripts


def test_distillation_through_dropout_and_adam_matches_fd_with_checkpoint_and_forward_mode() -> None:
    """Dataset distillation through a network with ``nn.Dropout`` in training mode and Adam as
    the inner optimiser (a ``val_loss`` that switches to eval mode itself): reverse, reverse with
    ``checkpoint=True`` (each step replayed twice, the masks the same both times) and forward
    mode all equal central differences of the real run with the same global-RNG seed."""
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(DT)

    def distill(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return -(F.softmax(h.labels, -1) * F.log_softmax(m(h.images), -1)).sum(-1).mean()

    def val_eval(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        was = m.training
        m.eval()
        out = F.cross_entropy(m(b[0]), b[1])
        m.train(was)
        return out

    hp = nn.Module()
    hp.images = nn.Parameter(torch.randn(5, 4, dtype=DT))
    hp.labels = nn.Parameter(torch.randn(5, 3, dtype=DT))
    val = (torch.randn(20, 4, dtype=DT), torch.randint(0, 3, (20,)))
    k = 3
    init = copy.deepcopy(make().state_dict())
    results = []
    for checkpoint, mode in [(False, "reverse"), (True, "reverse"), (False, "forward")]:
        model = make()
        model.load_state_dict(init)
        hopt = hg.Unrolled(model, hp, distill, val_eval,
                           inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.1),
                           outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
                           steps=k, checkpoint=checkpoint, mode=mode)
        torch.manual_seed(123)
        for _ in range(k):
            hopt.step(())
        results.append(_flat(hopt.hypergradient(val_batch=val)[0]))

    def truth() -> float:
        m = make()
        m.load_state_dict(init)
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        torch.manual_seed(123)
        for _ in range(k):
            opt.zero_grad()
            distill(m, hp, ()).backward()
            opt.step()
        with torch.no_grad():
            return float(val_eval(m, hp, val))

    fd = torch.cat([_central(truth, p).reshape(-1) for p in hp.parameters()])
    for got in results:
        torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-9)


def test_overlapping_windows_with_hyperparameters_changing_every_step_match_fd() -> None:
    """Hyper-cleaning with a learned learning rate, a hyperstep after every step (the weights
    and the inner learning rate move every step, Adam inside): the hypergradient is central
    differences of the run whose steps before the window use the hyperparameters of their time
    and whose last K steps use the current ones (the documented truncation), reconstructed with
    plain torch.optim; reverse, ``checkpoint=True`` and forward mode alike."""
    torch.manual_seed(0)
    n, k = 10, 3
    x, y = torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))
    val = (torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,)))
    init = copy.deepcopy(nn.Linear(3, 2).to(DT).state_dict())

    class _HP(nn.Module):
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            super().__init__()
            self.ew = hg.hparams.ExampleWeights(n, init=0.6, dtype=DT)
            self.lr = hg.hparams.LearningRate(inner)

    def weighted(m: nn.Module, h: Any, b: Any) -> Tensor:
        return (h(b[2]) * F.cross_entropy(m(b[0]), b[1], reduction="none")).mean()

    for checkpoint, mode in [(False, "reverse"), (True, "reverse"), (False, "forward")]:
        model = nn.Linear(3, 2).to(DT)
        model.load_state_dict(init)
        inner = torch.optim.Adam(model.parameters(), lr=0.1)
        hp = _HP(inner)
        hopt = hg.Unrolled(model, hp, lambda m, h, b: weighted(m, h.ew, b), _val_ce,
                           inner_optimizer=inner, steps=k, checkpoint=checkpoint, mode=mode,
                           outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.5))
        gen = torch.Generator().manual_seed(1)
        history = []
        for s in range(8):
            idx = torch.randperm(n, generator=gen)[:4]
            batch = (x[idx], y[idx], idx)
            history.append((batch, torch.sigmoid(hp.ew.raw.detach()).clone(), float(hp.lr.value[0])))
            hopt.step(batch)
            assert inner.param_groups[0]["lr"] == pytest.approx(history[-1][2], rel=1e-15)
            if 1 <= s < 7:
                hopt.hyper_step(val_batch=val)
        grads, info = hopt.hypergradient(val_batch=val)
        assert info.unrolled_steps == k

        def truth(history: list[Any] = history, hp: _HP = hp) -> float:
            m = nn.Linear(3, 2).to(DT)
            m.load_state_dict(init)
            opt = torch.optim.Adam(m.parameters(), lr=0.1)
            for i, (b, w, lr) in enumerate(history):
                in_window = i >= len(history) - k
                opt.param_groups[0]["lr"] = float(hp.lr.value[0]) if in_window else lr
                opt.zero_grad()
                weights = hp.ew if in_window else (lambda index, w=w: w[index])
                weighted(m, weights, b).backward()
                opt.step()
            with torch.no_grad():
                return float(_val_ce(m, None, val))  # type: ignore[arg-type]

        for g, p in zip(grads, hp.parameters(), strict=True):
            torch.testing.assert_close(g, _central(truth, p), rtol=1e-6, atol=1e-10,
                                       msg=f"{mode} checkpoint={checkpoint}")


def test_learning_to_reweight_one_step_lookahead_is_ren_et_al_closed_form() -> None:
    """Ren et al. 2018 (learning to reweight): per-batch weights eps = 0, one real SGD step at
    eps = 0 (the weights do not move), ``Unrolled(steps=1).hypergradient``, then the real
    re-weighted step taken outside ``step()`` and ``start_episode()`` per batch. The
    hypergradient equals the closed form -alpha / B * <grad l_i(theta), grad L_val(theta)>,
    over three batches, without a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    b_size, alpha = 6, 0.1

    class _Eps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eps = nn.Parameter(torch.zeros(b_size, dtype=DT))

    hp = _Eps()

    def eps_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return (h.eps * F.cross_entropy(m(b[0]), b[1], reduction="none")).mean()

    hopt = hg.Unrolled(model, hp, eps_loss, _val_ce,
                       inner_optimizer=torch.optim.SGD(model.parameters(), lr=alpha),
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=1)
    real = torch.optim.SGD(model.parameters(), lr=alpha)
    val = (torch.randn(10, 3, dtype=DT), torch.randint(0, 2, (10,)))
    params = list(model.parameters())
    for _ in range(3):
        batch = (torch.randn(b_size, 3, dtype=DT), torch.randint(0, 2, (b_size,)))
        with torch.no_grad():
            hp.eps.zero_()
        hopt.start_episode()
        before = [p.detach().clone() for p in params]
        hopt.step(batch)
        assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
        grads, _ = hopt.hypergradient(val_batch=val)
        gv = torch.autograd.grad(_val_ce(model, hp, val), params)
        want = torch.stack([
            -alpha / b_size * sum((a * c).sum() for a, c in zip(torch.autograd.grad(
                F.cross_entropy(model(batch[0][i:i + 1]), batch[1][i:i + 1]), params), gv, strict=True))
            for i in range(b_size)])
        torch.testing.assert_close(grads[0], want, rtol=1e-10, atol=1e-15)
        w = torch.clamp(-grads[0], min=0)
        w = w / w.sum() if w.sum() > 0 else w
        real.zero_grad()
        (w * F.cross_entropy(model(batch[0]), batch[1], reduction="none")).sum().backward()
        real.step()


# ------------------- 8. the optimiser's weight_decay as the hyperparameter of an IFT script


def _ridge_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(12)
    x, xv = torch.randn(20, 4, dtype=DT), torch.randn(15, 4, dtype=DT)
    w = torch.randn(4, 1, dtype=DT)
    return x, x @ w + 0.5 * torch.randn(20, 1, dtype=DT), xv, xv @ w + 0.5 * torch.randn(15, 1, dtype=DT)


def test_implicit_with_the_decay_moved_into_the_loss_matches_the_ridge_closed_form() -> None:
    """What an IFT script tuning ``SGD(weight_decay=d)`` must write instead: ``WeightDecay`` in
    ``train_loss`` (the optimiser's decay 0), which has the optimum of SGD with
    ``weight_decay=d``: the CG hypergradient in d equals the ridge closed form
    dL_V/dd = -g_V' (A + d I)^-1 w*, A the Hessian of the mean squared error."""
    x, y, xv, yv = _ridge_data()
    model = nn.Linear(4, 1, bias=False).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.3).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    hopt = hg.Implicit(model, hp, lambda m, h, b: _mse(m, h, b) + h.penalty(m), _mse,
                       inner_optimizer=inner, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
                       solver=hg.CG(maxiter=50, tol=1e-14))
    for _ in range(400):
        hopt.step((x, y))
    d = float(hp.value)
    a = 2 * x.T @ x / len(x)
    w_star = torch.linalg.solve(a + d * torch.eye(4, dtype=DT), 2 * x.T @ y / len(x))
    torch.testing.assert_close(model.weight.detach().T, w_star, rtol=1e-10, atol=1e-12)
    g_v = 2 * xv.T @ (xv @ w_star - yv) / len(xv)
    want = -(g_v.T @ torch.linalg.solve(a + d * torch.eye(4, dtype=DT), w_star)) * d  # d(raw) = d(log d)
    grads, _ = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    torch.testing.assert_close(grads[0].reshape(()), want.reshape(()), rtol=1e-8, atol=1e-14)
    # and SGD(weight_decay=d) reaches the same optimum
    m2 = nn.Linear(4, 1, bias=False).to(DT)
    opt = torch.optim.SGD(m2.parameters(), lr=0.2, weight_decay=d)
    for _ in range(400):
        opt.zero_grad()
        _mse(m2, None, (x, y)).backward()  # type: ignore[arg-type]
        opt.step()
    torch.testing.assert_close(m2.weight.detach().T, w_star, rtol=1e-10, atol=1e-12)


def test_implicit_refuses_a_learning_rate_and_points_to_unrolled() -> None:
    model = nn.Linear(4, 1).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hp = hg.hparams.LearningRate(inner)
    with pytest.raises(ValueError, match="Unrolled"):
        hg.Implicit(model, hp, _mse, _mse, inner_optimizer=inner,
                    outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1))


@pytest.mark.parametrize(("optimizer", "name"), [("SGD", "weight_decay"), ("ASGD", "lambd"),
                                                 ("AdamW", "weight_decay")])
def test_implicit_refusing_the_optimizers_decay_names_it_and_the_penalty_container(optimizer: str,
                                                                                  name: str) -> None:
    """A user tuning ``SGD(weight_decay=...)`` (or ASGD's ``lambd``, a decay too) with the IFT
    gets an error that names the setting, says how to write it (``hg.hparams.WeightDecay`` in
    ``train_loss``), and does not claim that the decay leaves the optimum where it is; AdamW's
    decoupled decay, which no loss term reproduces, is pointed to ``hg.Unrolled``."""
    model = nn.Linear(4, 1).to(DT)
    inner = getattr(torch.optim, optimizer)(model.parameters(), lr=0.1, **{name: 0.1})
    hp = hg.hparams.OptimizerSetting(inner, name, "positive")
    with pytest.raises(ValueError) as err:
        hg.Implicit(model, hp, _mse, _mse, inner_optimizer=inner,
                    outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1))
    msg = str(err.value)
    assert name in msg and "not change the inner optimum" not in msg
    assert ("hg.Unrolled" if optimizer == "AdamW" else "hg.hparams.WeightDecay") in msg


def test_marglik_online_through_the_map_lands_on_the_evidence_maximiser_over_maps() -> None:
    """Immer et al. 2021's online loop on logistic regression (``bound="exact"``, Adam on the
    weights, a hyperstep every 5 steps after 100): with ``through_map=True`` the learned prior
    precision is the maximiser over delta of the written-out evidence at the MAP re-solved for
    each delta (a brute-force grid, refined by a parabola), to 0.05 in log delta; the
    fixed-weights default lands elsewhere (the documented difference)."""
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 3, dtype=DT)
    y = (torch.rand(n, dtype=DT) < torch.sigmoid(x @ torch.tensor([1.0, -0.5, 0.3], dtype=DT))).long()

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Linear(3, 2).to(DT)

    def evidence_at_map(log_delta: float, m: nn.Module) -> float:
        delta = math.exp(log_delta)
        params = list(m.parameters())
        for _ in range(30):  # Newton on the (strictly convex) MAP objective
            obj = (F.cross_entropy(m(x), y, reduction="sum")
                   + 0.5 * delta * sum((p ** 2).sum() for p in params))
            g = _flat(torch.autograd.grad(obj, params, create_graph=True))
            if g.norm() < 1e-12:
                break
            h = torch.stack([_flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g])
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(
                    torch.nn.utils.parameters_to_vector(params) - torch.linalg.solve(h, g), params)
        # the written-out evidence: log p(D|theta) - delta/2 |theta|^2 + P/2 log delta
        #   - 1/2 logdet(delta I + J' Lambda J), Lambda the softmax Hessians
        with torch.no_grad():
            prob = F.softmax(m(x), -1)
        jac = torch.func.jacrev(lambda ps: torch.func.functional_call(m, ps, (x,)))(
            {k: v.detach() for k, v in m.named_parameters()})
        j = torch.cat([jac[k].reshape(n, 2, -1) for k, _ in m.named_parameters()], -1)  # (N, C, P)
        lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        ggn = torch.einsum("ncp,ncd,ndq->pq", j, lam, j)
        theta = _flat(p.detach() for p in params)
        p_count = theta.numel()
        with torch.no_grad():
            loglik = -float(F.cross_entropy(m(x), y, reduction="sum"))
        return (loglik - 0.5 * delta * float(theta @ theta) + 0.5 * p_count * log_delta
                - 0.5 * float(torch.linalg.slogdet(delta * torch.eye(p_count, dtype=DT) + ggn)[1]))

    grid = torch.linspace(0.0, 4.0, 21, dtype=DT).tolist()
    m = make()
    evs = [evidence_at_map(v, m) for v in grid]
    i = max(range(1, len(grid) - 1), key=lambda j: evs[j])
    assert evs[i] > max(evs[0], evs[-1])  # an interior maximum
    h = grid[1] - grid[0]
    best = grid[i] + h * (evs[i - 1] - evs[i + 1]) / (2 * (evs[i - 1] - 2 * evs[i] + evs[i + 1]))

    learned = {}
    for through_map in (True, False):
        model = make()
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="global", init=1.0)}).to(DT)
        hopt = hg.MarginalLikelihood(model, hp, likelihood="classification", data_size=n,
                                     inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                                     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
                                     bound="exact", through_map=through_map, burn_in=100, every=5)
        for _ in range(800):
            hopt.step((x, y))
            if hopt.hyper_step_due():
                hopt.hyper_step(train_batch=(x, y))
        learned[through_map] = math.log(float(hp["prior"].value))
    assert abs(learned[True] - best) < 0.05, (learned, best)
    assert abs(learned[False] - best) > 0.1, (learned, best)


def test_implicit_distillation_without_a_train_batch_says_to_pass_an_empty_one() -> None:
    """Dataset distillation by the IFT (the distilled images are the hyperparameters,
    ``train_loss`` reads no batch): a hyperstep without ``train_batch`` is refused with an error
    that says ``train_batch=()``, as ``step()`` says ``step(())``; with it, the call works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    hp = _Distilled(3, 4, 3, inner)
    del hp.lr  # a setting: Implicit cannot tune it
    hopt = hg.Implicit(model, hp, _distill_loss, _ce, inner_optimizer=inner,
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
                       solver=hg.CG(maxiter=5, damping=1e-2))
    for _ in range(5):
        hopt.step(())
    val = (torch.randn(20, 4, dtype=DT), torch.randint(0, 3, (20,)))
    grads, _ = hopt.hypergradient(train_batch=(), val_batch=val)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    with pytest.raises(ValueError, match=r"train_batch=\(\)"):
        hopt.hypergradient(val_batch=val)
