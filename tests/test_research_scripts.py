"""The core loops of research scripts, ported to hypergrad's public API as a README reader would,
against an independent reference computing the same thing: MAML (a learned initialisation and
per-tensor inner learning rates) and dataset distillation against `higher`, iMAML against the
closed form, data hyper-cleaning and learning-rate tuning under schedulers against central
differences of plain torch.optim training, a learned augmentation network against torchopt.
Float64 throughout, tiny sizes."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import hypergrad as hg

DT = torch.float64


def _mlp(n_in: int = 3, hidden: int = 4, n_out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


def _task(n: int = 6) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))


# ----------------------------------------------------------------------------- 1. MAML


class _Meta(nn.Module):
    """MAML / Meta-SGD meta-parameters: the initialisation phi and one learning rate per tensor."""

    def __init__(self, init: nn.Module, inner: torch.optim.Optimizer) -> None:
        super().__init__()
        self.phi = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in init.parameters()])
        self.lr = hg.hparams.LearningRate(inner)


def _at_phi_plus_delta(model: nn.Module, meta: nn.Module, x: Tensor) -> Tensor:
    """The model at weights phi + delta (delta: the model's own, trained from 0 each episode)."""
    params = {n: f + p for (n, p), f in zip(model.named_parameters(), meta.phi, strict=True)}
    return functional_call(model, params, (x,))


def _maml_loss(model: nn.Module, meta: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(_at_phi_plus_delta(model, meta, batch[0]), batch[1])


def test_maml_learned_init_and_per_tensor_lrs_match_higher() -> None:
    """MAML with a learned initialisation (weights phi + delta, delta reset to 0 and
    ``start_episode()`` per task) and Meta-SGD-style inner learning rates (one param group per
    tensor, ``LearningRate``), hypergradients summed over a meta-batch of tasks: equal to
    ``higher.innerloop_ctx`` differentiating the same K SGD steps from phi."""
    higher = pytest.importorskip("higher")
    k, src, model = 3, _mlp(), _mlp()
    tasks = [(_task(), _task(5)) for _ in range(2)]
    inner = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.1)
    meta = _Meta(src, inner)
    outer = torch.optim.Adam(meta.parameters(), lr=1e-2)
    hopt = hg.Unrolled(
        model, meta, _maml_loss, _maml_loss, inner_optimizer=inner, outer_optimizer=outer, steps=k
    )
    total = [torch.zeros_like(p) for p in meta.parameters()]
    for support, query in tasks:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        hopt.start_episode()
        for _ in range(k):
            hopt.step(support)
        grads, info = hopt.hypergradient(val_batch=query)
        assert info.unrolled_steps == k
        total = [t + g for t, g in zip(total, grads, strict=True)]

    ref = copy.deepcopy(src)
    lrs = torch.full((len(meta.phi),), 0.1, dtype=DT, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p]} for p in ref.parameters()], lr=0.1)
    for support, query in tasks:
        with higher.innerloop_ctx(
            ref, opt, override={"lr": list(lrs.unbind())}, copy_initial_weights=False
        ) as (
            fmodel,
            diffopt,
        ):
            for _ in range(k):
                diffopt.step(F.cross_entropy(fmodel(support[0]), support[1]))
            F.cross_entropy(fmodel(query[0]), query[1]).backward()
    for mine, p in zip(total[:-1], ref.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(mine, p.grad, rtol=1e-10, atol=1e-12)
    assert lrs.grad is not None  # LearningRate's raw tensor is log lr: d/draw = lr * d/dlr
    torch.testing.assert_close(total[-1], lrs.grad * 0.1, rtol=1e-10, atol=1e-12)


def test_maml_copying_phi_into_the_weights_warns_with_the_reparametrisation() -> None:
    """The naive port (copy phi into the weights each episode) has no gradient path from phi:
    a DisconnectedWarning that says how to write a learned initialisation, not a silent 0."""
    model = nn.Linear(3, 2).to(DT)
    phi = hg.hparams.Hparam(torch.randn(2, 3, dtype=DT), "real")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    mse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    hopt = hg.Unrolled(
        model, phi, mse, mse, inner_optimizer=inner, outer_optimizer=torch.optim.SGD(phi.parameters(), lr=0.1)
    )
    batch = (torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))
    with torch.no_grad():
        model.weight.copy_(phi())
    hopt.start_episode()
    hopt.step(batch)
    with pytest.warns(hg.DisconnectedWarning, match=r"phi \+ delta"):
        hopt.hyper_step(val_batch=batch)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_episodes_with_cleared_inner_state_match_fresh_torch_optim(optimizer: str) -> None:
    """``start_episode()`` keeps the inner optimiser's state (momentum, Adam's moments and step
    count); research code starts each task with a fresh optimiser, which is
    ``inner.state.clear()`` here. The second episode's hypergradient w.r.t. the learned
    initialisation equals central differences of a fresh torch.optim run from phi."""
    k = 3

    def make(ps: object) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(ps, lr=0.05)  # type: ignore[arg-type]
        return torch.optim.SGD(ps, lr=0.3, momentum=0.9)  # type: ignore[arg-type]

    supports, query = [_task(), _task()], _task(5)
    model = nn.Linear(3, 2).to(DT)
    inner = make(model.parameters())
    meta = nn.Module()
    meta.phi = nn.ParameterList([nn.Parameter(torch.randn_like(p)) for p in model.parameters()])
    hopt = hg.Unrolled(
        model,
        meta,
        _maml_loss,
        _maml_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(meta.parameters(), lr=0.0),
        steps=k,
    )
    for support in supports:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        inner.state.clear()
        hopt.start_episode()
        for _ in range(k):
            hopt.step(support)
    grads, _ = hopt.hypergradient(val_batch=query)

    def outer_loss(delta: float) -> float:
        m = nn.Linear(3, 2).to(DT)
        with torch.no_grad():
            for p, f in zip(m.parameters(), meta.phi, strict=True):
                p.copy_(f)
            m.weight[0, 1] += delta
        opt = make(m.parameters())
        for _ in range(k):
            opt.zero_grad()
            F.cross_entropy(m(supports[1][0]), supports[1][1]).backward()
            opt.step()
        with torch.no_grad():
            return float(F.cross_entropy(m(query[0]), query[1]))

    fd = (outer_loss(1e-6) - outer_loss(-1e-6)) / 2e-6
    assert abs(float(grads[0][0, 1]) - fd) < 1e-8


# ----------------------------------------------------------------------------- 2. iMAML


def test_imaml_proximal_term_cg_matches_closed_form() -> None:
    r"""iMAML: L_T = ||Xw - y||^2 / 2 + lam/2 ||w - phi||^2, phi the hyperparameters; after
    training to the optimum from phi, Implicit + CG gives lam (A + lam I)^-1 grad L_V(w*), the
    closed form (Rajeswaran et al. 2019)."""
    lam, n_in = 2.0, 4
    x, y = torch.randn(10, n_in, dtype=DT), torch.randn(10, 1, dtype=DT)
    xv, yv = torch.randn(7, n_in, dtype=DT), torch.randn(7, 1, dtype=DT)
    model = nn.Linear(n_in, 1, bias=False).to(DT)
    meta = nn.Module()
    meta.phi = nn.ParameterList([nn.Parameter(torch.randn_like(p)) for p in model.parameters()])

    def fit(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((m(b[0]) - b[1]) ** 2).sum()

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        prox = sum(((w - f) ** 2).sum() for w, f in zip(m.parameters(), h.phi, strict=True))
        return fit(m, h, b) + lam / 2 * prox

    hopt = hg.Implicit(
        model,
        meta,
        train_loss,
        fit,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        outer_optimizer=torch.optim.SGD(meta.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-13),
    )
    with torch.no_grad():
        model.weight.copy_(meta.phi[0])
    hopt.start_episode()
    for _ in range(2000):
        hopt.step((x, y))
    grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    assert info.solver_status == "converged"

    a = x.T @ x + lam * torch.eye(n_in, dtype=DT)
    w_star = torch.linalg.solve(a, x.T @ y + lam * meta.phi[0].detach().T)
    torch.testing.assert_close(model.weight.detach().T, w_star, rtol=0, atol=1e-12)
    expected = lam * torch.linalg.solve(a, xv.T @ (xv @ w_star - yv))
    torch.testing.assert_close(grads[0], expected.T, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- 3. dataset distillation


def test_step_without_a_batch_says_to_pass_an_empty_one() -> None:
    """Dataset distillation's training loss reads only the hyperparameters (the images); a
    ``step(None)`` is refused with an error that says what to pass instead."""
    model = nn.Linear(3, 2).to(DT)
    images = hg.hparams.Hparam(torch.randn(2, 3, dtype=DT), "real")
    loss = lambda m, h, b: F.cross_entropy(m(h()), torch.arange(2))  # noqa: E731
    hopt = hg.Unrolled(
        model,
        images,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(images.parameters(), lr=0.1),
    )
    with pytest.raises(ValueError, match=r"pass \(\)"):
        hopt.step(None)
    hopt.step(())  # what it says works
    assert hopt.hyper_step(val_batch=(torch.randn(4, 3, dtype=DT), torch.arange(4) % 2)).unrolled_steps == 1


def _distill_net(conv: bool) -> nn.Module:
    if not conv:
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DT)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv_bn_dropout"])
def test_dataset_distillation_matches_higher(conv: bool) -> None:
    """Learned images, learned soft labels and a learned inner learning rate, K SGD steps from
    freshly initialised weights each episode (``reset_parameters`` + ``start_episode``), the
    hypergradient summed over two episodes; the conv variant trains BatchNorm and dropout in
    train mode and validates in eval mode. Equal to higher through the same steps."""
    higher = pytest.importorskip("higher")
    k = 3
    model = _distill_net(conv)
    inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    shape = (3, 1, 4, 4) if conv else (3, 5)
    hp = nn.ModuleDict(
        {
            "images": hg.hparams.Hparam(torch.randn(shape, dtype=DT), "real"),
            "labels": hg.hparams.Hparam(2 * torch.eye(3, dtype=DT), "real"),
            "lr": hg.hparams.LearningRate(inner),
        }
    )

    def distilled(m: nn.Module, h: nn.Module, b: tuple[()]) -> Tensor:
        return F.cross_entropy(m(h["images"]()), F.softmax(h["labels"](), -1))

    def real(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    hopt = hg.Unrolled(
        model,
        hp,
        distilled,
        real,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=k,
    )
    val = (torch.randn((12, *shape[1:]), dtype=DT), torch.randint(0, 3, (12,)))
    inits, total = [], [torch.zeros_like(p) for p in hp.parameters()]
    for episode in range(2):
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        inits.append(copy.deepcopy(model.state_dict()))
        inner.state.clear()
        hopt.start_episode()
        torch.manual_seed(100 + episode)  # the dropout masks
        for _ in range(k):
            hopt.step(())
        model.eval()
        grads, _ = hopt.hypergradient(val_batch=val)
        model.train()
        total = [t + g for t, g in zip(total, grads, strict=True)]

    images = hp["images"].raw.detach().clone().requires_grad_(True)
    labels = hp["labels"].raw.detach().clone().requires_grad_(True)
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    for episode, init in enumerate(inits):
        ref = _distill_net(conv)
        ref.load_state_dict(init)
        opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
        torch.manual_seed(100 + episode)
        with higher.innerloop_ctx(ref, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(k):
                diffopt.step(F.cross_entropy(fmodel(images), F.softmax(labels, -1)))
            fmodel.eval()
            F.cross_entropy(fmodel(val[0]), val[1]).backward()
    torch.testing.assert_close(total[0], images.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total[1], labels.grad, rtol=1e-9, atol=1e-12)
    assert lr.grad is not None
    torch.testing.assert_close(total[2], (lr.grad * 0.2).reshape(1), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 4. hyper-cleaning

_N = 8


def _cleaning_data() -> tuple[hg.data.WithIndex, tuple[Tensor, Tensor]]:
    x, y = torch.randn(_N, 3, dtype=DT), torch.randint(0, 2, (_N,))
    return hg.data.WithIndex(TensorDataset(x, y)), (torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,)))


def _weighted(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    x, y, index = b
    per_example = F.cross_entropy(m(x), y, reduction="none")
    return (h(index) * per_example).mean() + 0.05 * sum((p**2).sum() for p in m.parameters())


def _ce(m: nn.Module, h: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _example_weights(raw: Tensor) -> hg.hparams.ExampleWeights:
    ew = hg.hparams.ExampleWeights(_N, dtype=DT)
    with torch.no_grad():
        ew.raw.copy_(raw)
    return ew


def _central(f: Callable[[Tensor], float], x: Tensor, eps: float = 1e-6) -> Tensor:
    out = torch.zeros_like(x)
    for j in range(x.numel()):
        d = torch.zeros_like(x)
        d.view(-1)[j] = eps
        out.view(-1)[j] = (f(x + d) - f(x - d)) / (2 * eps)
    return out


def test_hyper_cleaning_unrolled_over_a_shuffled_loader_matches_fd() -> None:
    """Per-example weights, (x, y, index) batches from a shuffled DataLoader over WithIndex, two
    epochs of SGD with momentum all unrolled: central differences of the same torch.optim run."""
    ds, val = _cleaning_data()
    raw = torch.randn(_N, dtype=DT) * 0.5
    model = nn.Linear(3, 2).to(DT)
    init = copy.deepcopy(model.state_dict())
    ew = _example_weights(raw)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    hopt = hg.Unrolled(
        model,
        ew,
        _weighted,
        _ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
        steps=6,
    )
    loader = DataLoader(ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5))
    taken = []
    for _ in range(2):
        for batch in loader:
            hopt.step(batch)
            taken.append(batch)
    assert len(taken) == 6 and not torch.equal(taken[0][2], torch.arange(3))  # shuffled
    grads, _ = hopt.hypergradient(val_batch=val)

    def outer_loss(r: Tensor) -> float:
        m = nn.Linear(3, 2).to(DT)
        m.load_state_dict(init)
        h, opt = _example_weights(r), torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        for batch in taken:
            opt.zero_grad()
            _weighted(m, h, batch).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, h, val))

    torch.testing.assert_close(grads[0], _central(outer_loss, raw), rtol=1e-6, atol=1e-9)


def test_hyper_cleaning_implicit_matches_fd_of_the_optimum() -> None:
    """Implicit + CG on the whole (shuffled) training set as one batch, after training to the
    optimum: central differences of the exact optimum (Newton's method) of the weighted loss."""
    ds, val = _cleaning_data()
    raw = torch.randn(_N, dtype=DT) * 0.5
    model = nn.Linear(3, 2).to(DT)
    ew = _example_weights(raw)
    hopt = hg.Implicit(
        model,
        ew,
        _weighted,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-14),
    )
    loader = DataLoader(ds, batch_size=_N, shuffle=True, generator=torch.Generator().manual_seed(2))
    for _ in range(300):
        for batch in loader:
            hopt.step(batch)
    batch = next(iter(loader))
    grads, info = hopt.hypergradient(train_batch=batch, val_batch=val)
    assert info.solver_status == "converged"
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    full = (ds.dataset.tensors[0], ds.dataset.tensors[1], torch.arange(_N))

    def outer_loss(r: Tensor) -> float:
        h = _example_weights(r)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def params(v: Tensor) -> dict[str, Tensor]:
            return dict(
                zip(
                    names,
                    (t.reshape(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes, strict=True)),
                    strict=True,
                )
            )

        class At(nn.Module):
            def __init__(self, v: Tensor) -> None:
                super().__init__()
                self.p = params(v)

            def forward(self, x: Tensor) -> Tensor:
                return functional_call(model, self.p, (x,))

            def parameters(self, recurse: bool = True):  # type: ignore[no-untyped-def]
                return iter(self.p.values())

        f = lambda v: _weighted(At(v), h, full)  # noqa: E731
        for _ in range(12):  # Newton
            flat = flat - torch.linalg.solve(
                torch.autograd.functional.hessian(f, flat), torch.func.grad(f)(flat)
            )
        with torch.no_grad():
            return float(_ce(At(flat), h, val))

    torch.testing.assert_close(grads[0], _central(outer_loss, raw), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 5. lr / momentum tuning

_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.3, total_steps=7, cycle_momentum=False
    ),
    "warmup": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
}


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("scheduler", sorted(_SCHEDULERS))
def test_relative_lr_and_momentum_under_a_scheduler_match_fd(mode: str, scheduler: str) -> None:
    """A multiplier per param group on the scheduled learning rate
    (``LearningRate(opt, relative=True)``) and SGD's momentum, the scheduler stepped after each
    ``hopt.step`` as after ``optimizer.step()``: central differences of the same torch.optim run
    with the multiplied rates."""
    k = 6
    xs, ys = torch.randn(k, 5, 3, dtype=DT), torch.randn(k, 5, 1, dtype=DT)
    val = (torch.randn(7, 3, dtype=DT), torch.randn(7, 1, dtype=DT))
    mse = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731

    def build() -> tuple[nn.Module, torch.optim.Optimizer, object]:
        torch.manual_seed(3)
        m = _mlp(3, 4, 1)
        opt = torch.optim.SGD(
            [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.05}], lr=0.1, momentum=0.8
        )
        return m, opt, _SCHEDULERS[scheduler](opt)

    model, opt, sched = build()
    hp = nn.ModuleDict(
        {
            "lr": hg.hparams.LearningRate(opt, relative=True, init=1.3),
            "mom": hg.hparams.Momentum(opt, init=0.7),
        }
    )
    hopt = hg.Unrolled(
        model,
        hp,
        mse,
        mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=k,
        mode=mode,
    )
    for i in range(k):
        hopt.step((xs[i], ys[i]))
        sched.step()  # type: ignore[attr-defined]
    grads, _ = hopt.hypergradient(val_batch=val)

    def outer_loss(raw: Tensor) -> float:
        mult, mom = raw[:2].exp().tolist(), torch.sigmoid(raw[2:]).tolist()
        m, o, s = build()
        for i in range(k):
            for g, mu, mo in zip(o.param_groups, mult, mom, strict=True):
                g["lr"], g["momentum"] = g["lr"] * mu, mo
            o.zero_grad()
            mse(m, None, (xs[i], ys[i])).backward()
            o.step()
            for g, mu in zip(o.param_groups, mult, strict=True):
                g["lr"] = g["lr"] / mu
            s.step()  # type: ignore[attr-defined]
        with torch.no_grad():
            return float(mse(m, None, val))

    raw = torch.cat([hp["lr"].raw.detach(), hp["mom"].raw.detach()])
    torch.testing.assert_close(torch.cat(list(grads)), _central(outer_loss, raw), rtol=1e-6, atol=1e-9)


def test_outer_steps_outside_hyper_step_with_a_fused_optimizer_are_replayed() -> None:
    """Stepping a fused outer Adam (the README's recommendation) yourself on ``hypergradient()``'s
    output (e.g. after summing over tasks) changes the hyperparameters without bumping their
    version counters; Unrolled used to miss the change and replay the steps taken after it with
    the old values, a silently wrong hypergradient. Now it equals the ``hyper_step`` run's."""
    xs, ys = torch.randn(12, 5, 3, dtype=DT), torch.randn(12, 5, 1, dtype=DT)
    val = (torch.randn(7, 3, dtype=DT), torch.randn(7, 1, dtype=DT))

    def loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h["wd"].penalty(m)

    def run(manual: bool) -> list[Tensor]:
        torch.manual_seed(3)
        model = _mlp(3, 4, 1)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(inner),
                "wd": hg.hparams.WeightDecay(model, per="layer", init=1e-2),
            }
        )
        outer = torch.optim.Adam(hp.parameters(), lr=0.1, fused=True)
        hopt = hg.Unrolled(model, hp, loss, loss, inner_optimizer=inner, outer_optimizer=outer, steps=3)
        out = []
        for i in range(12):
            hopt.step((xs[i], ys[i]))
            if i % 2:
                grads, _ = hopt.hypergradient(val_batch=val)
                out.append(torch.cat([g.reshape(-1) for g in grads]))
                if manual:
                    for p, g in zip(hp.parameters(), grads, strict=True):
                        p.grad = g
                    outer.step()
                else:
                    hopt.hyper_step(val_batch=val)
        return out

    for a, b in zip(run(manual=False), run(manual=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- 6. augmentation network


def _augment(aug: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
    return x + torch.tanh(aug(torch.cat([x, noise], 1)))


def test_augmentation_network_neumann_matches_torchopt() -> None:
    """A learned augmentation network (its weights the hyperparameters) applied in the training
    loss only, Implicit with Neumann-5 after training: equal to torchopt's ``custom_root`` with
    its Neumann solver (``solve_inv(ns=True)``) at the same weights and step size."""
    torchopt = pytest.importorskip("torchopt")
    model, aug = _mlp(4, 6, 3), nn.Linear(6, 4).to(DT)
    batch = (torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,)), torch.randn(12, 2, dtype=DT))
    val = (torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,)))

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, noise = b
        return F.cross_entropy(m(_augment(h, x, noise)), y) + 1e-2 * sum((p**2).sum() for p in m.parameters())

    hopt = hg.Implicit(
        model,
        aug,
        train_loss,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(aug.parameters(), lr=1e-2),
        solver=hg.Neumann(steps=5, alpha=0.5),
    )
    for _ in range(100):
        hopt.step(batch)
    grads, _ = hopt.hypergradient(train_batch=batch, val_batch=val)

    names = [n for n, _ in model.named_parameters()]
    aug_names = [n for n, _ in aug.named_parameters()]

    def inner_objective(
        params: tuple[Tensor, ...], hps: tuple[Tensor, ...], x: Tensor, y: Tensor, noise: Tensor
    ) -> Tensor:
        a = dict(zip(aug_names, hps, strict=True))
        xa = x + torch.tanh(functional_call(aug, a, (torch.cat([x, noise], 1),)))
        logits = functional_call(model, dict(zip(names, params, strict=True)), (xa,))
        return F.cross_entropy(logits, y) + 1e-2 * sum((p**2).sum() for p in params)

    solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=5, alpha=0.5)

    @torchopt.diff.implicit.custom_root(torch.func.grad(inner_objective, argnums=0), argnums=1, solve=solve)
    def solution(
        params: tuple[Tensor, ...], hps: tuple[Tensor, ...], x: Tensor, y: Tensor, noise: Tensor
    ) -> tuple[Tensor, ...]:
        return tuple(p.detach() for p in params)

    hps = tuple(aug.parameters())
    w = solution(tuple(p.detach() for p in model.parameters()), hps, *batch)
    ref = torch.autograd.grad(
        F.cross_entropy(functional_call(model, dict(zip(names, w, strict=True)), (val[0],)), val[1]), hps
    )
    for mine, theirs in zip(grads, ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def _bn_augmenter() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(DT)


def _bn_aug_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(m(b[0] + h(b[0])), b[1])


@pytest.mark.parametrize(
    "method",
    ["implicit", "unrolled", "unrolled_forward"],
)
def test_hypersteps_leave_an_augmentation_networks_batchnorm_statistics(method: str) -> None:
    """The hyperparameter module's own buffers (the BatchNorm statistics of a learned
    augmentation network in train mode) move with the real steps only, as the model's do: the
    hypergradient's forward passes (Implicit's training loss, each replayed step; forward mode:
    each replay per hyperparameter entry, 56 here) used to update them."""
    model, aug = nn.Linear(4, 3).to(DT), _bn_augmenter()
    batch = (torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,)))
    kwargs: dict[str, object] = {
        "implicit": {"solver": hg.CG(maxiter=5)},
        "unrolled": {"steps": 2},
        "unrolled_forward": {"steps": 2, "mode": "forward"},
    }[method]
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(
        model,
        aug,
        _bn_aug_loss,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(aug.parameters(), lr=0.1),
        **kwargs,  # type: ignore[arg-type]
    )
    hopt.step(batch)
    hopt.step(batch)
    stats = {k: v.clone() for k, v in aug.state_dict().items() if "running" in k or "tracked" in k}
    assert int(stats["1.num_batches_tracked"]) == 2  # the real steps did move them
    hopt.hypergradient(train_batch=batch, val_batch=batch)
    hopt.hyper_step(train_batch=batch, val_batch=batch)
    for k, v in stats.items():
        assert torch.equal(aug.state_dict()[k], v), k


def test_a_refused_step_leaves_an_augmentation_networks_statistics() -> None:
    """A non-finite step skipped (``on_nonfinite="skip"``) leaves the hyperparameter module's
    BatchNorm statistics as they were, like the model's."""
    model, aug = nn.Linear(4, 3).to(DT), _bn_augmenter()
    hopt = hg.Implicit(
        model,
        aug,
        _bn_aug_loss,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(aug.parameters(), lr=0.1),
        on_nonfinite="skip",
    )
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    hopt.step((x, y))
    before = copy.deepcopy(aug.state_dict())
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    with pytest.warns(hg.NonFiniteWarning):
        hopt.step((x_bad, y))
    for k, v in before.items():
        assert torch.equal(aug.state_dict()[k], v), k


def test_replayed_weights_before_any_step_is_a_clear_error() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    hp = hg.hparams.WeightDecay(model, init=0.1)
    def val(m: nn.Module, h: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
        return m(b[0]).square().mean()

    hopt = hg.Unrolled(
        model, hp, lambda m, h, b: val(m, h, b) + h.penalty(m), val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs at least one inner step"):
        hopt.replayed_weights()
