"""Round 27 (schedules): training-script features around the hyperoptimiser.

Early stopping that reloads the best weights, EMA / mean-teacher copies updated between steps,
progressive unfreezing, learning-rate schedules, clipping and gradient accumulation, each
against central differences of the same script written in plain ``torch.optim`` (float64).

Fixed with these tests (each failed before its fix):

1. ``Unrolled`` notices weights changed outside ``step()`` through their version counters only.
   ``torch.nn.utils.vector_to_parameters(best, model.parameters())`` (a public torch utility,
   the usual way to put back a flat vector of best weights) and ``p.data = best`` replace the
   storage without a version bump, so the replay started from the weights before the reload
   and went through steps the real run had thrown away: the hypergradient was that of the
   abandoned trajectory and the logged outer loss too (1.255 for the real 1.147), with no
   warning (the replay check runs every 16th hyperstep only). The same blind spot for the
   model's parameters that ``inner_optimizer`` does not train: a mean teacher updated MoCo-style
   (``p_t.data = p_t.data * m + p_s.data * (1 - m)``, the MoCo reference code) was not seen, so
   the replay ran every recorded step with the current teacher without the ``ReplayWarning``
   the same update written in place gives.(Fix: the data pointer joins the
   version counter.)
2. Fused ``torch.optim`` kernels (``Adam(fused=True)``) move no version counter either: an
   auxiliary task's step on the trained weights between two steps, or a second, fused optimiser
   stepping the part left out of ``inner_optimizer`` (the documented two-optimiser pattern),
   went unseen in the same way (outer loss 1.255 for the real 1.210; no warning).
   (Fix: the fused-step counts ``write_count`` keeps, read only when
   a fused step was taken anywhere since the last look.)
3. ``Implicit`` with ``Neumann``'s default step size and plain SGD takes the scheduled learning
   rate, and "power" only where it is exactly 0. At the end of a ``OneCycleLR`` (4e-6 of the
   optimiser's rate) or after ``ReduceLROnPlateau`` cut it three times, the series is worth as
   little as at 0: hypergradients of -6.1e-7 and -7.4e-5 for the IFT's -0.36, status "fixed",
   no warning. (Fix: a rate below 1% of the optimiser's own is treated as 0.)
4. ``Implicit`` solved over every weight that requires grad, also those of a param group held at
   a learning rate of 0 while the others train (a backbone frozen through the schedule:
   ``LambdaLR`` with a lambda per group returning 0 for the first epochs). The steps never move
   them, yet the IFT took them for weights at their rest point: the head's decay got 0.071 for
   the IFT's 0.043 over the head, the held backbone's decay 0.010 for 0, silently.
   (Fix: such groups are constants of the solve, as frozen weights.)

Passing tests here cover what earlier rounds did not: best weights put back with
``load_state_dict`` inside the window, and an EMA teacher updated in place (the controls).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _data(
    n_batches: int = 10,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
        for _ in range(n_batches)
    ]
    val = (torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT))
    return batches, val


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _train(m: nn.Module, h: hg.hparams.WeightDecay, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)


def _val(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _central(
    run: Callable[[list[torch.Tensor]], float], params: list[torch.Tensor], eps: float = 1e-6
) -> torch.Tensor:
    """Central differences of ``run(delta)`` in every entry of ``params``."""
    out = []
    for j, p in enumerate(params):
        for k in range(p.numel()):
            d = [torch.zeros_like(q) for q in params]
            d[j].view(-1)[k] = eps
            out.append((run(d) - run([-x for x in d])) / (2 * eps))
    return torch.tensor(out, dtype=DT)


def _flat(grads: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# ----------------------------------------------------------------------------- 1. best weights put back


def _put_back(model: nn.Module, best: torch.Tensor, how: str) -> None:
    if how == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(best, model.parameters())
    elif how == "assign_data":
        off = 0
        for p in model.parameters():
            p.data = best[off : off + p.numel()].view_as(p).clone()
            off += p.numel()
    elif how == "fused_adam_step":  # not a reload: an auxiliary task's step by a fused optimiser
        aux = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
        aux.zero_grad()
        (model(best[: 3 * 5].view(5, 3)) ** 2).mean().backward()
        aux.step()
        aux.zero_grad(set_to_none=True)
    else:  # "load_state_dict": in place, seen through the version counters (the control)
        off, state = 0, {}
        for n, p in model.named_parameters():
            state[n] = best[off : off + p.numel()].view_as(p)
            off += p.numel()
        model.load_state_dict(state)


_N, _SAVE, _ROLL, _K = 7, 2, 5, 4  # best weights saved before step 2, put back before step 5


@pytest.mark.parametrize(
    "how",
    [
        "vector_to_parameters",
        "assign_data",
        "fused_adam_step",
        "load_state_dict",
    ],
)
def test_best_weights_put_back_mid_window_start_a_new_episode(how: str) -> None:
    """Early stopping's rollback inside the window: the hypergradient must be that of the steps
    taken since the weights were put back (the real run's), not of the ones thrown away. And an
    auxiliary task's step by a fused optimiser (``Adam(fused=True)``) between two steps: weights
    changed outside ``step()`` as well."""
    batches, val = _data()

    def real(delta: list[torch.Tensor] | None) -> float:
        model = _mlp()
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        for i in range(_N):
            if i == _SAVE:
                best = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            if i == _ROLL:
                _put_back(model, best, how)
                if delta is not None:  # the hyperparameters perturbed for the steps since
                    with torch.no_grad():
                        for p, d in zip(hp.parameters(), delta, strict=True):
                            p.add_(d)
            opt.zero_grad()
            _train(model, hp, batches[i]).backward()
            opt.step()
        with torch.no_grad():
            return float(_val(model, hp, val))

    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hopt = hg.Unrolled(
        model,
        hp,
        _train,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=_K,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(_N):
            if i == 1:  # an earlier hyperstep (the replay check of the first one is past)
                hopt.hyper_step(val_batch=val)
            if i == _SAVE:
                best = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            if i == _ROLL:
                _put_back(model, best, how)
            hopt.step(batches[i])
        grads, info = hopt.hypergradient(val_batch=val)
    ref = _central(real, [p.detach() for p in hp.parameters()])
    assert info.outer_loss == pytest.approx(real(None), rel=1e-12)
    assert info.unrolled_steps == _N - _ROLL
    torch.testing.assert_close(_flat(grads), ref, rtol=1e-6, atol=1e-10)
    assert any(
        issubclass(w.category, hg.ReplayWarning) and "outside hopt.step()" in str(w.message) for w in caught
    )


# ----------------------------------------------------------------------------- 2. a mean teacher


class _StudentTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.student = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        self.teacher = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _consistency(
    m: nn.Module, h: hg.hparams.WeightDecay, b: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    x, y = b
    out = m.student(x)
    return ((out - y) ** 2).mean() + 0.5 * ((out - m.teacher(x)) ** 2).mean() + h.penalty(m.student)


def _ema(model: _StudentTeacher, how: str, m: float = 0.5) -> None:
    for pt, ps in zip(model.teacher.parameters(), model.student.parameters(), strict=True):
        if how == "moco":  # MoCo's reference code
            pt.data = pt.data * m + ps.data * (1.0 - m)
        else:
            with torch.no_grad():
                pt.mul_(m).add_(ps, alpha=1.0 - m)


@pytest.mark.parametrize(
    "how",
    [
        "moco",
        "in_place",
    ],
)
def test_mean_teacher_updated_between_steps_is_warned_about(how: str) -> None:
    batches, val = _data()
    model = _StudentTeacher()
    hp = hg.hparams.WeightDecay(model.student, per="layer", init=0.05)
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
    hopt = hg.Unrolled(
        model,
        hp,
        _consistency,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    hopt.step(batches[0])
    hopt.hyper_step(val_batch=val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, 4):
            hopt.step(batches[i])
            _ema(model, how)
        hopt.hyper_step(val_batch=val)
    assert any(issubclass(w.category, hg.ReplayWarning) and "teacher" in str(w.message) for w in caught), [
        str(w.message)[:120] for w in caught
    ]


# ----------------------------------------------------------------------------- 3. a second, fused optimiser


@pytest.mark.parametrize(
    "fused",
    [
        True,
        False,
    ],
)
def test_second_optimiser_stepping_the_left_out_part_is_warned_about(fused: bool) -> None:
    """The documented two-optimiser pattern (parameters outside inner_optimizer get their
    gradient in step(), a second optimiser steps them): the replay runs every recorded step with
    the part's current values, which the ReplayWarning says; a fused second optimiser (whose
    kernels move no version counter) must be seen as the plain one is."""
    batches, val = _data()
    model = _mlp()

    def tl(m: nn.Module, h: hg.hparams.WeightDecay, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m[2])

    hp = hg.hparams.WeightDecay(model[2], per="layer", init=0.05)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    second = torch.optim.Adam(model[0].parameters(), lr=0.01, fused=fused)
    hopt = hg.Unrolled(
        model,
        hp,
        tl,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hopt.step(batches[0])
        second.step()
        second.zero_grad()
        hopt.hyper_step(val_batch=val)  # (the first hyperstep's replay check is past)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(1, 4):
            hopt.step(batches[i])
            assert model[0].weight.grad is not None  # (step() gave the left-out part its gradient)
            second.step()
            second.zero_grad()
        hopt.hyper_step(val_batch=val)
    assert any(issubclass(w.category, hg.ReplayWarning) and "0.weight" in str(w.message) for w in caught), [
        str(w.message)[:120] for w in caught
    ]


# ----------------------------------------------------------------------------- 4. Neumann at a decayed rate


def _ridge_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g, dtype=DT)
    y = x @ torch.randn(5, 1, generator=g, dtype=DT) + 0.3 * torch.randn(64, 1, generator=g, dtype=DT)
    xv = torch.randn(32, 5, generator=g, dtype=DT)
    return (x, y), (xv, xv @ torch.randn(5, 1, generator=g, dtype=DT))


def _ift_at(model: nn.Linear, decay: float, train: tuple, val: tuple) -> float:
    """dL_V/d raw by the implicit function theorem at the model's weights, written out: the
    training loss is quadratic, H = 2/n X'X + d I exactly, the mixed term d * theta."""
    x1 = torch.cat([train[0], torch.ones(len(train[0]), 1, dtype=DT)], 1)
    xv1 = torch.cat([val[0], torch.ones(len(val[0]), 1, dtype=DT)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    h = 2 / len(x1) * x1.T @ x1 + decay * torch.eye(6, dtype=DT)
    v = 2 / len(xv1) * xv1.T @ (xv1 @ theta - val[1].reshape(-1))
    return float(-(decay * theta) @ torch.linalg.solve(h, v))


@pytest.mark.parametrize(
    "schedule",
    [
        "onecycle_end",
        "plateau_cut_three_times",
        "cosine_at_zero",  # the documented case (a rate of 0: power iteration), the control
    ],
)
def test_neumann_default_step_size_at_a_decayed_learning_rate(schedule: str) -> None:
    """Plain SGD, Neumann's default step size: the inner learning rate, "power" where that is 0.
    At the end of a schedule the rate is rarely exactly 0 but tiny, and a series at it is worth
    as little as one at 0. Against the IFT written out at the same weights."""
    train, val = _ridge_data()
    torch.manual_seed(0)
    model = nn.Linear(5, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1)

    def tl(m: nn.Module, h: hg.hparams.WeightDecay, b: tuple) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.Implicit(
        model,
        hp,
        tl,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Neumann(steps=60),
    )
    steps = 150
    if schedule == "onecycle_end":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.3, total_steps=steps + 1, cycle_momentum=False
        )
    elif schedule == "cosine_at_zero":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    for i in range(steps):
        loss = hopt.step(train)
        if schedule == "plateau_cut_three_times":
            sched.step(float(loss) if i < steps - 3 else 1e9)  # (three epochs without progress at the end)
        else:
            sched.step()
    lr = opt.param_groups[0]["lr"]
    assert (lr == 0.0) == (schedule == "cosine_at_zero") and lr < 1e-3
    grads, info = hopt.hypergradient(train_batch=train, val_batch=val)
    exact = _ift_at(model, float(hp.value[0]), train, val)
    assert abs(exact) > 1e-2
    assert float(grads[0]) == pytest.approx(exact, rel=1e-3), (float(grads[0]), exact, info.solver_residual)


# ----------------------------------------------------------------------------- 5. a group held at lr 0


def test_implicit_treats_a_group_held_at_learning_rate_zero_as_constants() -> None:
    """Freezing through the schedule (``LambdaLR`` with one lambda per group, 0 for the backbone
    for the first epochs): the steps never move the backbone, so the rest point the IFT solves
    for is that of the head alone, the backbone a constant (as ``requires_grad_(False)`` makes
    it). Against the IFT over the head written out with autograd at the same weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=g, dtype=DT)
    xv = torch.randn(32, 3, generator=g, dtype=DT)
    val = (xv, torch.sin(xv.sum(1, keepdim=True)))
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.0 if e < 100 else 1.0, lambda e: 1.0])
    hopt = hg.Implicit(
        model,
        hp,
        _train,
        _val,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-12),
    )
    backbone = [p.detach().clone() for p in model[0].parameters()]
    for _ in range(30):
        hopt.step((x, y))
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(backbone, model[0].parameters(), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (the backbone's decay reaches nothing)
        grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=val)

    # the IFT over the head: -(d theta)' H^-1 dL_V/dtheta, the backbone's decay 0
    head = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])
    d = float(hp.value[1])

    def loss_at(theta: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor], penalty: bool) -> torch.Tensor:
        w, b = theta[:4].view(1, 4), theta[4:]
        out = nn.functional.linear(torch.tanh(model[0](batch[0])), w, b)
        return ((out - batch[1]) ** 2).mean() + (d / 2 * (theta**2).sum() if penalty else 0)

    h = torch.autograd.functional.hessian(lambda t: loss_at(t, (x, y), True), head)
    theta = head.clone().requires_grad_()
    (v,) = torch.autograd.grad(loss_at(theta, val, False), theta)
    expected = -(d * head) @ torch.linalg.solve(h.detach(), v)
    assert float(grads[1]) == pytest.approx(float(expected), rel=1e-8)
    assert float(grads[0]) == 0.0
    assert info.solver_status == "converged"
