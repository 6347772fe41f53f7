"""Round 20 (helper "frozen"): frozen, swapped, registered-later and refreshed weights.

Each bug test is ``xfail(strict=True)`` on the code it was found in; the proposed fixes are
/tmp/round20/frozen-<n>.diff: sections 2-7 below are frozen-1 to frozen-6 (section 1's bug, a
swapped frozen submodule, was fixed in the library during the round; its tests pass and stay).
References are plain torch autograd (``torch.func.functional_call``) or central differences of
real ``torch.optim`` runs, in float64.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch import Tensor

import hypergrad as hg

DT = torch.float64


def _mse(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _penalised(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return _mse(model, hp, batch) + hp.penalty(model)


def _data(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 1, generator=g, dtype=DT))
        for _ in range(n)
    ]


# ------------------------------------------------------------------ 1. a frozen submodule swapped


def _bn_model() -> nn.Sequential:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    m[1].requires_grad_(False)  # a frozen normaliser
    return m


@pytest.mark.parametrize("method", ["implicit", "reverse", "forward", "checkpoint"])
def test_hyperstep_leaves_the_buffers_of_a_swapped_in_frozen_module_alone(method: str) -> None:
    # Found failing in this round (FunctionalPair's buffer slots stayed on the old module: the
    # hypersteps updated the new module's real running statistics, Unrolled's outer loss 2% off,
    # its replay ran the steps taken with the old module with the new one); fixed meanwhile by
    # HyperOptimizer._refresh following the model's layout. Kept: the reference below (plain
    # autograd through the steps taken with the new module) is new.
    (b0, b1, b2), (val,) = _data(3), _data(1, seed=1)
    model = _bn_model()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT)
    kw: dict[str, Any] = dict(
        inner_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    if method == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(model, hp, _penalised, _mse, solver=hg.CG(maxiter=5), **kw)
    else:
        hopt = hg.Unrolled(
            model,
            hp,
            _penalised,
            _mse,
            steps=3,
            mode="forward" if method == "forward" else "reverse",
            checkpoint=method == "checkpoint",
            **kw,
        )
    hopt.step(b0)
    model[1] = nn.BatchNorm1d(4).to(DT).requires_grad_(False)  # the frozen normaliser swapped
    start = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    hopt.step(b1)
    hopt.step(b2)
    direct = None
    if method != "implicit":  # (Implicit: its losses in train mode, which update running statistics)
        model.eval()
        with torch.no_grad():
            direct = float(_mse(model, hp, val))
    kept = {n: b.clone() for n, b in model.named_buffers()}
    grads, info = hopt.hypergradient(train_batch=b2, val_batch=val)
    for n, b in model.named_buffers():
        assert torch.equal(b, kept[n]), f"hypergradient() changed buffer {n}"
    if method == "implicit":
        return
    # the validation loss is the model's at its real buffers (before: at buffers the replay moved)
    assert info.outer_loss == pytest.approx(direct, rel=1e-12, abs=0)
    # and the hypergradient is that of the two steps taken with the new module (the steps before
    # the swap were taken with another one), by plain autograd
    raw = hp.raw[0].detach().clone().requires_grad_(True)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: start[n] for n, p in model.named_parameters() if not p.requires_grad}
    w = {n: start[n] for n in trained}
    buffers = {n: start[n].clone() for n, _ in model.named_buffers()}
    ref = copy.deepcopy(model).train()
    for x, y in (b1, b2):
        w = {n: t if t.requires_grad else t.clone().requires_grad_(True) for n, t in w.items()}
        out = torch.func.functional_call(ref, {**w, **frozen, **buffers}, (x,))
        loss = ((out - y) ** 2).mean() + 0.5 * raw.exp() * sum((t**2).sum() for t in w.values())
        gs = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {n: t - 0.1 * g for (n, t), g in zip(w.items(), gs, strict=True)}
    ref.eval()
    now = {n: b.clone() for n, b in model.named_buffers()}
    out = torch.func.functional_call(ref, {**w, **frozen, **now}, (val[0],))
    (expected,) = torch.autograd.grad(((out - val[1]) ** 2).mean(), raw)
    assert abs(float(expected)) > 1e-4
    assert info.unrolled_steps == 2
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)


class _StnBn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.stn = hg.nn.StnLinear(3, 4, n).to(DT)
        self.norm = nn.BatchNorm1d(4).to(DT).requires_grad_(False)
        self.head = nn.Linear(4, 1).to(DT)

    def forward(self, x: Tensor, hp: Any) -> Tensor:
        return self.head(torch.tanh(self.norm(self.stn(x, hp.draw(len(x))))))


@pytest.mark.parametrize("family", ["implicit", "unrolled", "selftuning", "marglik"])
def test_a_refused_step_after_a_frozen_module_swap_leaves_its_statistics_alone(family: str) -> None:
    # Found failing in this round (the refused step's snapshot was of the old module's buffers, so
    # a NaN batch left NaN running statistics in the new one, against "nothing changed"); fixed
    # meanwhile with the layout check of HyperOptimizer._refresh. New: the guard path, all four
    # families.
    ((x, y),) = _data(1, seed=15)
    bad = x.clone()
    bad[0, 0] = float("nan")
    torch.manual_seed(0)
    common: dict[str, Any] = dict(on_nonfinite="skip")
    if family == "selftuning":
        hp: nn.Module = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.2, high=0.9)).to(DT)
        model: nn.Module = _StnBn(hp.size)

        def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return ((m(b[0], h) - b[1]) ** 2).mean()

        hopt: hg.HyperOptimizer = hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
            **common,
        )
    else:
        model = _bn_model()
        inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        if family == "marglik":
            hp = nn.ModuleDict(
                {
                    "prior": hg.hparams.PriorPrecision(model, per="layer"),
                    "noise": hg.hparams.ObservationNoise(),
                }
            ).to(DT)
            hopt = hg.MarginalLikelihood(
                model,
                hp,
                likelihood="regression",
                data_size=100,
                inner_optimizer=inner,
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
                **common,
            )
        else:
            hp = hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT)
            cls = hg.Implicit if family == "implicit" else hg.Unrolled
            hopt = cls(
                model,
                hp,
                _penalised,
                _mse,
                inner_optimizer=inner,
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
                **common,
            )
    hopt.step((x, y))
    norm = nn.BatchNorm1d(4).to(DT).requires_grad_(False)
    if family == "selftuning":
        model.norm = norm
    else:
        model[1] = norm
    hopt.start_episode()  # (says the swap is intended)
    hopt.step((x, y))
    kept = {n: b.clone() for n, b in norm.named_buffers()}
    with pytest.warns(hg.NonFiniteWarning):
        hopt.step((bad, y))
    for n, b in norm.named_buffers():
        assert torch.equal(b, kept[n]), f"the refused step changed {n}"


def test_a_swapped_frozen_module_without_buffers_keeps_the_unrolled_window_exact() -> None:
    # (passes before the fix too: a frozen head swapped between hypersteps is read live.) New:
    # the trained weights' hypergradient through a head replaced by assignment (model.head =
    # nn.Linear(...), frozen) equals plain autograd through the steps taken with the new head,
    # once start_episode() says the old steps are void.
    (b0, b1, b2), (val,) = _data(3), _data(1, seed=2)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model[2].requires_grad_(False)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.2).to(DT)
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        steps=4,
        inner_optimizer=torch.optim.SGD(model[0].parameters(), lr=0.2, momentum=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    hopt.step(b0)
    model[2] = nn.Linear(4, 1).to(DT).requires_grad_(False)
    hopt.start_episode()
    w0 = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    bufs = {
        n: s["momentum_buffer"].clone()
        for n, s in zip(
            ["weight", "bias"], [hopt.inner_optimizer.state[p] for p in model[0].parameters()], strict=True
        )
    }
    hopt.step(b1)
    hopt.step(b2)
    grads, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 2
    raw = hp.raw[0].detach().clone().requires_grad_(True)
    head = model[2]
    w, m = dict(w0), dict(bufs)
    for x, y in (b1, b2):
        w = {n: t if t.requires_grad else t.clone().requires_grad_(True) for n, t in w.items()}
        out = head(torch.tanh(torch.func.functional_call(model[0], w, (x,))))
        loss = ((out - y) ** 2).mean() + 0.5 * raw.exp() * sum((t**2).sum() for t in w.values())
        gs = dict(zip(w, torch.autograd.grad(loss, list(w.values()), create_graph=True), strict=True))
        m = {n: 0.5 * m[n] + gs[n] for n in w}
        w = {n: w[n] - 0.2 * m[n] for n in w}
    out = head(torch.tanh(torch.func.functional_call(model[0], w, (val[0],))))
    (expected,) = torch.autograd.grad(((out - val[1]) ** 2).mean(), raw)
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ 2. a frozen group registered later


def _fd_of_real_runs(
    make: Callable[[], tuple[nn.Module, nn.Module, torch.optim.Optimizer]],
    batches: list[Any],
    val: Any,
    between: Callable[[int, nn.Module, torch.optim.Optimizer], None],
    eps: float = 1e-6,
    from_step: int = 0,
) -> list[Tensor]:
    """Central differences of the validation loss after real torch.optim runs over ``batches``, the
    hyperparameters perturbed from step ``from_step`` on (where the episode began)."""

    def run(values: list[Tensor]) -> float:
        model, hp, opt = make()
        for k, b in enumerate(batches):
            if k == from_step:
                with torch.no_grad():
                    for p, v in zip(hp.parameters(), values, strict=True):
                        p.copy_(v)
            between(k, model, opt)
            opt.zero_grad()
            _penalised(model, hp, b).backward(
                inputs=[p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            )
            opt.step()
        with torch.no_grad():
            return float(_mse(model, hp, val))

    _, hp, _ = make()
    base = [p.detach().clone() for p in hp.parameters()]
    out = []
    for i, b in enumerate(base):
        g = torch.zeros_like(b)
        for j in range(b.numel()):
            up, down = [t.clone() for t in base], [t.clone() for t in base]
            up[i].view(-1)[j] += eps
            down[i].view(-1)[j] -= eps
            g.view(-1)[j] = (run(up) - run(down)) / (2 * eps)
        out.append(g)
    return out


def _frozen_backbone() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model[0].requires_grad_(False)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.3).to(DT)
    return model, hp, torch.optim.Adam(model[2].parameters(), lr=0.05)


def _register_backbone(k: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if k == 2:  # gradual unfreezing: the backbone's group registered now, unfrozen later
        opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})


def test_registering_a_frozen_group_keeps_the_unrolled_window() -> None:
    batches, (val,) = _data(4), _data(1, seed=1)
    model, hp, opt = _frozen_backbone()
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        steps=4,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    for k, b in enumerate(batches):
        _register_backbone(k, model, opt)
        hopt.step(b)  # (a ReplayWarning is an error here: pytest's filterwarnings)
    grads, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 4
    fd = _fd_of_real_runs(_frozen_backbone, batches, val, _register_backbone)
    assert float(fd[0].abs()) > 1e-4
    for g, f in zip(grads, fd, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-9)


def test_unfreezing_a_registered_group_starts_an_episode_that_matches_fd() -> None:
    # (passes before the fix too; new: a group registered frozen in the constructor and unfrozen
    # mid-run, with Adam, whose state for the unfrozen weights starts at their first step; the
    # episode begins at the unfreezing, so the reference perturbs the decays from there on)
    batches, (val,) = _data(5), _data(1, seed=4)

    def make() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        model[0].requires_grad_(False)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.3, include=lambda n: n.startswith("2.")).to(DT)
        opt = torch.optim.Adam(
            [{"params": list(model[0].parameters()), "lr": 0.02}, {"params": list(model[2].parameters())}],
            lr=0.05,
        )
        return model, hp, opt

    def unfreeze(k: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        if k == 2:
            model[0].requires_grad_(True)

    model, hp, opt = make()
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        steps=5,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    for k, b in enumerate(batches):
        unfreeze(k, model, opt)
        hopt.step(b)
    grads, info = hopt.hypergradient(val_batch=val)
    fd = _fd_of_real_runs(make, batches, val, unfreeze, from_step=2)
    assert info.unrolled_steps == 3
    assert max(float(f.abs().max()) for f in fd) > 1e-4
    for g, f in zip(grads, fd, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ 3. a frozen teacher refreshed


class _Distilled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.student = nn.Linear(3, 1, bias=False).to(DT)
        self.teacher = nn.Linear(3, 1, bias=False).to(DT).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


def _distill(model: nn.Module, hp: nn.Module, x: Tensor) -> Tensor:
    return ((model(x) - model.teacher(x)) ** 2).mean() + hp.penalty(model)


def _reference(w: Tensor, teachers: list[Tensor], xs: list[Tensor], raw: Tensor, val: Any) -> Tensor:
    """Plain autograd through SGD(lr=0.1) steps from ``w`` with the teacher each step really had."""
    raw = raw.detach().clone().requires_grad_(True)
    for x, t in zip(xs, teachers, strict=True):
        w = w if w.requires_grad else w.clone().requires_grad_(True)
        loss = ((x @ w.T - x @ t.T) ** 2).mean() + 0.5 * raw.exp() * (w**2).sum()
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - 0.1 * g
    (out,) = torch.autograd.grad(((val[0] @ w.T - val[1]) ** 2).mean(), raw)
    return out


def _teacher_run() -> tuple[hg.Unrolled, _Distilled, nn.Module, list[Tensor], Any]:
    model = _Distilled()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.3).to(DT)
    hopt = hg.Unrolled(
        model,
        hp,
        _distill,
        _mse,
        steps=3,
        inner_optimizer=torch.optim.SGD(model.student.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 3, generator=g, dtype=DT) for _ in range(6)]
    val = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
    return hopt, model, hp, xs, val


def test_a_frozen_teacher_refreshed_inside_the_window_is_not_silent() -> None:
    hopt, model, hp, xs, val = _teacher_run()
    ws, ts = [], []
    for k in range(6):
        ws.append(model.student.weight.detach().clone())
        ts.append(model.teacher.weight.detach().clone())
        hopt.step(xs[k])
        if k == 4:
            with torch.no_grad():
                model.teacher.weight.add_(1.0)  # the target network refreshed (in place)
        if k < 4:  # windows before the refresh: exact
            grads, _ = hopt.hypergradient(val_batch=val)
            w0 = max(0, k - 2)
            ref = _reference(ws[w0], ts[w0 : k + 1], xs[w0 : k + 1], hp.raw[0], val)
            torch.testing.assert_close(grads[0], ref, rtol=1e-9, atol=1e-12)
            hopt.hyper_step(val_batch=val)
    # the window (steps 3, 4, 5) replays steps 3 and 4 with the refreshed teacher: the truth is
    # _reference(ws[3], ts[3:6], ...) (-0.023 here); the replay gives -0.209, and must say so
    truth = _reference(ws[3], ts[3:6], xs[3:6], hp.raw[0], val)
    grads, _ = _quiet(lambda: hopt.hypergradient(val_batch=val))
    assert float((grads[0] - truth).abs()) > 0.1 * float(truth.abs())  # (why it must warn)
    with pytest.warns(hg.ReplayWarning, match="teacher.weight"):
        hopt.hyper_step(val_batch=val)


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)
        return fn()


def test_a_frozen_teacher_refreshed_then_start_episode_is_exact_and_quiet() -> None:
    # (passes before the fix too; new coverage, and a guard that the fix's check stays quiet once
    # start_episode() says the steps before the change are void)
    hopt, model, hp, xs, val = _teacher_run()
    for k in range(2):
        hopt.step(xs[k])
        hopt.hyper_step(val_batch=val)
    with torch.no_grad():
        model.teacher.weight.mul_(-2.0)
    hopt.start_episode()
    w, t = model.student.weight.detach().clone(), model.teacher.weight.detach().clone()
    for k in range(2, 5):
        hopt.step(xs[k])
    grads, info = hopt.hypergradient(val_batch=val)  # (any ReplayWarning would be an error)
    assert info.unrolled_steps == 3
    ref = _reference(w, [t] * 3, xs[2:5], hp.raw[0], val)
    assert abs(float(ref)) > 1e-3
    torch.testing.assert_close(grads[0], ref, rtol=1e-9, atol=1e-12)


def test_a_frozen_max_norm_embedding_renormalised_by_the_losses_gives_no_replay_warning() -> None:
    # (passes before the fix too.) A frozen nn.Embedding(max_norm=...) is renormalised in place by
    # every forward pass (the step's own, the replay's, the validation loss's, which the hyperstep
    # puts back): none of that is a change made outside step(), so no ReplayWarning; and the
    # hypergradient matches central differences of real torch.optim runs.
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, 6, (8,), generator=g) for _ in range(4)]
    ys = [torch.randn(8, 1, generator=g, dtype=DT) for _ in range(4)]
    val = (torch.tensor([6, 7, 6, 7, 0, 1]), torch.randn(6, 1, generator=g, dtype=DT))  # unseen rows

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.emb = nn.Embedding(8, 3, max_norm=0.5).to(DT).requires_grad_(False)
            with torch.no_grad():
                self.emb.weight.mul_(3.0)
            self.head = nn.Linear(3, 1).to(DT)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.emb(x))

    def make() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        model = Net()
        hp = hg.hparams.WeightDecay(model, per="parameter", init=0.2).to(DT)
        return model, hp, torch.optim.SGD(model.head.parameters(), lr=0.3, momentum=0.5)

    batches = list(zip(tokens, ys, strict=True))
    model, hp, opt = make()
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        steps=4,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    for b in batches[:2]:
        hopt.step(b)
        hopt.hyper_step(val_batch=val)
    for b in batches[2:]:
        hopt.step(b)
    grads, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 4
    fd = _fd_of_real_runs(make, batches, val, lambda k, m, o: None)
    assert max(float(f.abs().max()) for f in fd) > 1e-4
    for gr, f in zip(grads, fd, strict=True):
        torch.testing.assert_close(gr, f, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ 4. a frozen part converted later


class _Encoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.encoder = nn.Linear(3, 4).to(DT).requires_grad_(False)  # listed first: the first parameter
        self.head = nn.Linear(4, 1).to(DT)

    def features(self, x: Tensor) -> Tensor:
        enc = self.encoder
        return torch.tanh(enc(x.to(enc.weight.dtype))).to(self.head.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _head_losses(
    model: _Encoded, raw: Tensor, train: Any, val: Any
) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """L_T and L_V of the head's flat weights (w, b) and the raw decay, by hand."""
    ft, fv = model.features(train[0]).detach(), model.features(val[0]).detach()

    def lt(flat: Tensor, r: Tensor) -> Tensor:
        w, b = flat[:4], flat[4:]
        return ((ft @ w + b - train[1][:, 0]) ** 2).mean() + 0.5 * r.exp() * (flat**2).sum()

    def lv(flat: Tensor) -> Tensor:
        w, b = flat[:4], flat[4:]
        return ((fv @ w + b - val[1][:, 0]) ** 2).mean()

    return lt, lv


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_frozen_encoder_converted_after_construction_trains_and_tunes(method: str) -> None:
    batches, (val,) = _data(3, seed=8), _data(1, seed=9)
    model = _Encoded()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.5).to(DT)
    kw: dict[str, Any] = dict(
        inner_optimizer=torch.optim.SGD(model.head.parameters(), lr=0.2),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    if method == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(model, hp, _penalised, _mse, solver=hg.Direct(), **kw)
    else:
        hopt = hg.Unrolled(model, hp, _penalised, _mse, steps=3, **kw)
    model.encoder.to(torch.float32)  # the frozen encoder halved, after construction
    flat0 = torch.cat([model.head.weight.detach()[0], model.head.bias.detach()])
    for b in batches:
        hopt.step(b)
    grads, _ = hopt.hypergradient(train_batch=batches[-1], val_batch=val)
    raw = hp.raw[0].detach().clone().requires_grad_(True)
    flat = torch.cat([model.head.weight.detach()[0], model.head.bias.detach()])
    if method == "implicit":  # the dense IFT at the current weights
        lt, lv = _head_losses(model, raw, batches[-1], val)
        hess = torch.autograd.functional.hessian(lambda f: lt(f, raw.detach()), flat)
        v = torch.func.grad(lv)(flat)
        x = torch.linalg.solve(hess, v)
        (gw,) = torch.autograd.grad(lt(flat.requires_grad_(True), raw), flat, create_graph=True)
        (expected,) = torch.autograd.grad(gw, raw, -x)
    else:  # plain autograd through the three SGD steps
        w = flat0.clone().requires_grad_(True)
        for b in batches:
            lt, _ = _head_losses(model, raw, b, val)
            (g,) = torch.autograd.grad(lt(w, raw), w, create_graph=True)
            w = w - 0.2 * g
        _, lv = _head_losses(model, raw, batches[0], val)
        (expected,) = torch.autograd.grad(lv(w), raw)
    assert abs(float(expected)) > 1e-4
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ 5. a tied weight listed twice


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(5, 3).to(DT)
        self.mid = nn.Linear(3, 3).to(DT)
        self.head = nn.Linear(3, 5, bias=False).to(DT)
        self.head.weight = self.emb.weight  # tied embeddings / lm_head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _ce(model: nn.Module, hp: nn.Module, batch: Any) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_unrolled_refuses_a_tied_weight_listed_twice_in_the_inner_optimizer() -> None:
    model = _TiedLM()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)
    with pytest.warns(UserWarning, match="duplicate parameters"):  # (torch's own)
        inner = torch.optim.SGD(
            [*model.emb.parameters(), *model.mid.parameters(), *model.head.parameters()], lr=0.5
        )
    with pytest.raises(ValueError, match=r"'emb.weight' 2 times"):
        hg.Unrolled(
            model,
            hp,
            lambda m, h, b: _ce(m, h, b) + h.penalty(m),
            _ce,
            steps=3,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )


# ------------------------------------------------------------------ 6. a HyperNet's base frozen later


def test_freezing_a_hypernet_base_layer_after_construction_is_not_silent() -> None:
    (b,), (val,) = _data(1, seed=10), _data(1, seed=11)
    hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False).to(DT)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    net = hg.nn.HyperNet(base, hp.size)

    def loss(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        return ((m(batch[0], hparams=h) - batch[1]) ** 2).mean()

    hopt = hg.BestResponse(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
    )
    hopt.step(b)
    w0 = net.weights(hp.raw.detach())["0.weight"].detach().clone()
    base[0].requires_grad_(False)  # "freeze the first layer from now on"
    with pytest.warns(UserWarning, match=r"\['0.weight', '0.bias'\] were trainable"):
        hopt.step(b)
    hopt.step(b)  # (warned once)
    hopt.hyper_step(val_batch=val)
    # what the warning says: the generated weight still trains (it is no constant)
    assert not torch.equal(net.weights(hp.raw.detach())["0.weight"].detach(), w0)


# ------------------------------------------------------------------ 7. a frozen backbone named in include


def _named_backbone() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model[0].requires_grad_(False)  # linear probing first, the backbone unfrozen later
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.2, include=["0.weight", "2.weight"]).to(DT)
    return model, hp, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)


def _unfreeze_backbone(k: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if k == 1:
        model[0].requires_grad_(True)


def test_weight_decay_penalises_a_frozen_backbone_named_in_include_once_it_trains() -> None:
    model, hp, _ = _frozen_backbone()
    with pytest.raises(ValueError, match="frozen"):  # (not "the model has no parameters")
        hg.hparams.WeightDecay(model, include=lambda n: n.startswith("0."))
    assert hg.hparams.WeightDecay(model, include=["0.weight"]).names == ("0.weight",)
    batches, (val,) = _data(4, seed=13), _data(1, seed=14)
    model, hp, opt = _named_backbone()
    assert hp.names == ("0.weight", "2.weight")
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        steps=4,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    for k, b in enumerate(batches):
        _unfreeze_backbone(k, model, opt)
        hopt.step(b)  # (no warning: the backbone is penalised from its first step)
    grads, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 3  # (the episode began at the unfreezing)
    fd = _fd_of_real_runs(_named_backbone, batches, val, _unfreeze_backbone, from_step=1)
    assert float(fd[0].abs()) > 1e-4  # the backbone's decay acts
    for g, f in zip(grads, fd, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-9)
