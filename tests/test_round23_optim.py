"""Round 23: the inner optimisers in Unrolled's replay against torch.optim itself, in float64.

What earlier rounds covered (not repeated here): every optimiser's options on real and complex
weights, tensor learning rates, every scheduler kind, OptimizerSetting on the other settings,
hypersteps every step, the one-node heavy-ball step, clipping, lazily created state, resume
mid-window (test_inner_optimizers.py, test_round19_*.py, test_round20_schedulers.py, ...). A
sweep done for this round (every option combination, three param groups of different options in
a shuffled order with a weight in no group and state created mid-window, clipping, each
scheduler, reverse / forward / checkpointed, two OptimizerSettings at once, hg.optim against a
plain torch loop) found the replay exact everywhere but where torch.optim creates a state from
its *defaults* rather than from the param group (below).

Found and fixed (each test failed before its fix):

- torch.optim.Adagrad creates a missing state (after ``inner.state.clear()``, the README's
  episode reset, or for a weight of a group added later) with the *constructor's*
  ``initial_accumulator_value`` (``self.defaults``), whatever the param group says; the replay
  filled it with the group's value, so a group with an ``initial_accumulator_value`` of its own
  was replayed from another accumulator (the replayed weights 0.26 away from the real ones after
  3 steps, and the hypergradient that of other steps; the ReplayWarning blamed randomness).
- ``inner_optimizer.step`` replaced on the instance (``opt.step = projected_step``, clamping the
  weights after the class's step) runs in every real step, while the replay runs the class's
  step: unlike optimiser hooks, it was not named; only the generic "did not reproduce training"
  ReplayWarning of the first hyperstep said anything (LR schedulers' own counting wrapper of
  ``opt.step`` must stay quiet: a passing guard).
- A model parameter in no param group that the step's forward pass changes in place (a running
  statistic kept as a frozen ``nn.Parameter`` instead of a buffer) is neither recorded (as
  buffers are) nor named: the replay runs every step with its final value and changes the real
  tensor again, so ``hopt.hypergradient()``, which promises to change nothing, moved it (by 0.075
  here), with only the generic ReplayWarning.

Also new and passing: three shuffled param groups + a weight in no group + lazily created state
+ binding clipping + StepLR together, and a relative ``OptimizerSetting`` on a momentum that
OneCycleLR cycles, against central differences of torch.optim.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


# ----------------------------------------------------------------------------- the problem


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _data(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)) for _ in range(n)
    ]


def _loss(model: nn.Module, lam: Any, batch: Any) -> Tensor:
    """MSE plus ``lam * ||w||^2``: ``lam`` is a plain number in the references, the
    hyperparameter's value in the hyperoptimiser."""
    x, y = batch
    return ((model(x) - y) ** 2).mean() + lam * sum((p**2).sum() for p in model.parameters())


def _hp(lam: float) -> hg.hparams.Hparam:
    return hg.hparams.Hparam(torch.tensor([lam], dtype=DT), "real")  # value = raw: d/dλ directly


def _hyper(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return lambda m, h, b: loss(m, h()[0], b)


def _central(f: Callable[[float], float], x: float, h: float = 1e-6) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


# ----------------------------------------------------------------------------- Adagrad's lazy state


@pytest.mark.parametrize("new_episode", [True, False], ids=["start_episode", "mid_window"])
@pytest.mark.parametrize("mode, ck", [("reverse", False), ("forward", False), ("reverse", True)])
def test_adagrad_state_recreated_after_clear_uses_the_defaults_accumulator(
    mode: str, ck: bool, new_episode: bool
) -> None:
    """``inner.state.clear()`` on an Adagrad whose first group has ``initial_accumulator_value=2.0``
    of its own (the constructor's is 0.0): torch recreates each weight's ``sum`` from
    ``self.defaults``, i.e. 0.0. Either as the README's episode reset (then
    ``hopt.start_episode()``: the anchor holds the empty state) or mid-window without it (the
    record of the next step holds the changed state), the replayed steps must end on the real
    weights bit for bit, and the hypergradient equal central differences of torch.optim's own
    steps from the clear on (the window is exactly those steps)."""
    lam0, k = 0.05, 3
    data, val = _data(2 + k), _data(1, seed=7)[0]
    model = _mlp()
    opt = torch.optim.Adagrad(
        [
            {"params": model[0].parameters(), "initial_accumulator_value": 2.0},
            {"params": model[2].parameters()},
        ],
        lr=0.1,
    )
    hp = _hp(lam0)
    hopt = hg.Unrolled(
        model, hp, _hyper(_loss), _hyper(_loss), inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=k, mode=mode, checkpoint=ck,
    )  # fmt: skip
    for b in data[:2]:
        hopt.step(b)
    opt.state.clear()  # a fresh optimiser state (for a new episode, as the README says)
    if new_episode:
        hopt.start_episode()
    start = copy.deepcopy((model, opt))
    for b in data[2:]:
        hopt.step(b)
    # torch's own rule, which the replay must follow: the accumulator restarted from 0.0, not 2.0
    assert (opt.state[model[0].bias]["sum"] < 2.0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (the symptom; the assertions say it)
        grads, _ = hopt.hypergradient(val_batch=val)
    for r, w in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(r, w.detach())

    def outer(lam: float) -> float:
        m, o = copy.deepcopy(start)
        for b in data[2:]:
            o.zero_grad()
            _loss(m, lam, b).backward()
            o.step()
        with torch.no_grad():
            return float(_loss(m, lam, val))

    fd = _central(outer, lam0)
    assert abs(fd) > 1e-3
    assert abs(float(grads[0]) - fd) <= 1e-7 * abs(fd)


# ---------------------------------------------------------------------------- a step replaced on the instance


def _projected_step(opt: torch.optim.Optimizer) -> None:
    """Replace ``opt.step`` on the instance by projected gradient descent: the class's step, then
    every weight clamped into [-0.3, 0.3] (a box constraint, written as a wrapper because a
    change of the weights outside ``hopt.step()`` would end the episode)."""
    inner = opt.step

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        out = inner(closure)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.clamp_(-0.3, 0.3)
        return out

    # a bound method, as LR schedulers expect of the step they wrap
    opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]


@pytest.mark.parametrize("when", ["before_scheduler", "after_scheduler", "after_unrolled"])
def test_step_replaced_on_the_instance_is_named_like_an_optimizer_hook(when: str) -> None:
    """A step method set on the inner optimiser itself runs in every real step, but the replay
    runs the class's step: the hypergradient is that of other steps (here the projection is
    active: the replay ends 0.23 away from the real weights), as with the optimiser hooks that
    Unrolled names in a ReplayWarning at once. Before: only the generic ReplayWarning of the
    first hyperstep ("did not reproduce training"), none at the steps."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if when == "before_scheduler":
        _projected_step(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    if when == "after_scheduler":
        _projected_step(opt)
    hp = _hp(0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hopt = hg.Unrolled(
            model, hp, _hyper(_loss), _hyper(_loss), inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3,
        )  # fmt: skip
        if when == "after_unrolled":
            _projected_step(opt)
        for b in _data(3):
            hopt.step(b)
            sched.step()
    named = [
        w
        for w in caught
        if issubclass(w.category, hg.ReplayWarning) and "inner_optimizer.step" in str(w.message)
    ]
    assert len(named) == 1
    # (the projection did act: the replay, which cannot run it, ends away from the real weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)
        replayed = hopt.replayed_weights()
    off = [float((r - w.detach()).abs().max()) for r, w in zip(replayed, model.parameters(), strict=True)]
    assert max(off) > 0.1


def test_scheduler_wrapper_of_step_is_not_taken_for_a_replaced_step() -> None:
    """(Passes on the current code; guards the fix above.) LR schedulers wrap ``opt.step`` on the
    instance to count its calls: no ReplayWarning at the steps or the hyperstep, and the
    replay ends on the real weights bit for bit, under two schedulers sharing the wrapper."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=2), torch.optim.lr_scheduler.StepLR(opt, 2)],
        milestones=[2],
    )
    hp = _hp(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)
        hopt = hg.Unrolled(
            model, hp, _hyper(_loss), _hyper(_loss), inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3,
        )  # fmt: skip
        for b in _data(4):
            hopt.step(b)
            sched.step()
        hopt.hypergradient(val_batch=_data(1, seed=7)[0])
        replayed = hopt.replayed_weights()
    for r, w in zip(replayed, model.parameters(), strict=True):
        assert torch.equal(r, w.detach())


# ----------------------------------------------------------------------- groups, a weight in none, lazy state


class _TwoHeads(nn.Module):
    """A trunk, two heads (head ``c`` first used mid-window: its optimiser state is created
    there) and ``free``, a weight the loss reaches that no param group holds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
        self.free = nn.Parameter(torch.randn(4))
        self.to(DT)

    def forward(self, x: Tensor, use_c: bool) -> Tensor:
        h = torch.tanh(self.a(x) + self.free)
        return self.c(h) if use_c else self.b(h)


def _two_head_loss(model: nn.Module, lam: Any, batch: Any) -> Tensor:
    x, y, use_c = batch  # (the penalty on the trunk only: a head's gradient is None where it is unused)
    return ((model(x, use_c) - y) ** 2).mean() + lam * sum((p**2).sum() for p in model.a.parameters())


_SHUFFLED_GROUPS: dict[str, Callable[[_TwoHeads], torch.optim.Optimizer]] = {
    # each group mixes tensors of two modules, in another order than model.parameters()
    "sgd": lambda m: torch.optim.SGD(
        [
            {"params": [m.c.bias, m.a.weight], "nesterov": True},
            {"params": [m.b.weight, m.c.weight, m.a.bias], "lr": 0.1, "dampening": 0.3, "weight_decay": 0.05},
            {"params": [m.b.bias], "momentum": 0.0, "maximize": True},
        ],
        lr=0.05,
        momentum=0.9,
    ),
    "adam": lambda m: torch.optim.Adam(
        [
            {"params": [m.c.bias, m.a.weight], "amsgrad": True},
            {
                "params": [m.b.weight, m.c.weight, m.a.bias],
                "decoupled_weight_decay": True,
                "weight_decay": 0.1,
            },
            {"params": [m.b.bias], "maximize": True, "betas": (0.5, 0.8)},
        ],
        lr=0.01,
    ),
}


@pytest.mark.parametrize("opt_name", sorted(_SHUFFLED_GROUPS))
@pytest.mark.parametrize("mode, ck", [("reverse", False), ("forward", False), ("reverse", True)])
def test_shuffled_groups_weight_in_no_group_lazy_state_clipping_and_schedule(
    opt_name: str, mode: str, ck: bool
) -> None:
    """(Passes on the current code: earlier rounds checked these one at a time, never together.)
    Param groups of different options holding the weights in another order than the model
    (the replay maps weights to groups by identity), a weight the loss reaches that no group
    holds (a constant of the replay, stepped by nothing), a head first reached at the window's
    third step (its state created there), gradient clipping that binds and a StepLR inside the
    window: the replay ends on the real weights bit for bit and the hypergradient equals central
    differences of torch.optim's own steps (clip_grad_norm_ over the optimiser's weights)."""
    lam0, k = 0.05, 4
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT), i in (3, 5))
        for i in range(1 + k)
    ]
    val = (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT), True)
    model = _TwoHeads()
    opt = _SHUFFLED_GROUPS[opt_name](model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    hp = _hp(lam0)
    hopt = hg.Unrolled(
        model, hp, _hyper(_two_head_loss), _hyper(_two_head_loss), inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=k, mode=mode, checkpoint=ck,
    )  # fmt: skip
    hopt.step(data[0], max_grad_norm=0.3)
    sched.step()
    start = copy.deepcopy((model, opt, sched))
    for b in data[1:]:
        hopt.step(b, max_grad_norm=0.3)
        sched.step()
    assert start[0].c.weight not in start[1].state and model.c.weight in opt.state  # (created in the window)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)
        grads, _ = hopt.hypergradient(val_batch=val)
        replayed = hopt.replayed_weights()
    in_groups = {id(p) for grp in opt.param_groups for p in grp["params"]}
    trained = [p for p in model.parameters() if id(p) in in_groups]  # (in the model's order)
    for r, w in zip(replayed, trained, strict=True):
        assert torch.equal(r, w.detach())

    def outer(lam: float) -> float:
        m, o, s = copy.deepcopy(start)
        trained = [p for grp in o.param_groups for p in grp["params"]]
        for b in data[1:]:
            m.zero_grad()
            _two_head_loss(m, lam, b).backward()
            torch.nn.utils.clip_grad_norm_([p for p in trained if p.grad is not None], 0.3)
            o.step()
            s.step()
        with torch.no_grad():
            return float(_two_head_loss(m, lam, val))

    fd = _central(outer, lam0)
    assert abs(fd) > 1e-3
    assert abs(float(grads[0]) - fd) <= 1e-7 * abs(fd)


# ------------------------------------------------------------------ a weight in no group, changed by the step


class _FrozenRunningCentre(nn.Module):
    """A linear model on inputs centred by a running mean kept as a frozen ``nn.Parameter`` (not a
    buffer), updated in place by every training forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1).to(DT)
        self.centre = nn.Parameter(torch.zeros(3, dtype=DT), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.centre.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x - self.centre)


def test_parameter_in_no_group_changed_by_the_step_is_named_at_once() -> None:
    """Buffers are recorded with each step and substituted by copies in the replay; a parameter
    that no param group holds is neither. When the step's forward pass changes one in place, the
    replay runs every step with its final value and changes the real tensor again: here
    ``hopt.hypergradient()``, which promises to change nothing, moved ``centre`` by 0.075, with
    only the generic "did not reproduce training" ReplayWarning. A ReplayWarning naming the
    parameter at the step that changed it says what happened and what to do (register a buffer)."""
    model = _FrozenRunningCentre()
    opt = torch.optim.SGD(model.lin.parameters(), lr=0.1, momentum=0.9)
    hp = _hp(0.01)
    hopt = hg.Unrolled(
        model, hp, _hyper(_loss), _hyper(_loss), inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in _data(4):
            hopt.step(b)
    named = [w for w in caught if issubclass(w.category, hg.ReplayWarning) and "'centre'" in str(w.message)]
    assert len(named) == 1  # (once, not at every step)
    # the side effect the warning announces (it is there with or without the warning)
    before = model.centre.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)
        hopt.hypergradient(val_batch=_data(1, seed=7)[0])
    assert float((model.centre - before).abs().max()) > 0.01


def test_frozen_parameter_left_as_it_is_by_the_step_gives_no_warning() -> None:
    """(Passes on the current code; guards the fix above.) A frozen part the steps do not change
    (a backbone left out of the optimiser, with a no-grad trunk): no ReplayWarning, and the
    replay ends on the real weights bit for bit."""
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.Adam(model[2].parameters(), lr=0.01)
    hp = _hp(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)
        hopt = hg.Unrolled(
            model, hp, _hyper(_loss), _hyper(_loss), inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3,
        )  # fmt: skip
        for b in _data(4):
            hopt.step(b)
        replayed = hopt.replayed_weights()
    for r, w in zip(replayed, model[2].parameters(), strict=True):
        assert torch.equal(r, w.detach())


# -------------------------------------------------------------------------- a multiplier on a cycled momentum


@pytest.mark.parametrize(
    "opt_name",
    ["sgd-nesterov", "rmsprop-centred"],
)
@pytest.mark.parametrize("mode, ck", [("reverse", False), ("forward", False), ("reverse", True)])
def test_relative_momentum_setting_under_onecycle_momentum_cycle(opt_name: str, mode: str, ck: bool) -> None:
    """(Passes on the current code; not covered before: earlier rounds tuned momentum in absolute
    mode only, which refuses a scheduler that cycles it.) ``OptimizerSetting(opt, "momentum",
    relative=True)``: a learned multiplier on the momentum OneCycleLR cycles at every step (SGD
    with Nesterov, RMSprop centred: both keep a ``momentum`` key). Its hypergradient (w.r.t. the
    raw log-multiplier) equals central differences of torch.optim's own steps, each run with the
    scheduled momentum times the multiplier."""
    k = 4
    data, val = _data(1 + k), _data(1, seed=7)[0]
    model = _mlp()
    if opt_name == "sgd-nesterov":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=20)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.02, total_steps=20)
    hp = hg.hparams.OptimizerSetting(opt, "momentum", "unit", init=1.02, relative=True)
    mse = lambda m, h, b: _loss(m, 0.0, b)  # noqa: E731
    hopt = hg.Unrolled(
        model, hp, mse, mse, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=k, mode=mode, checkpoint=ck,
    )  # fmt: skip
    hopt.step(data[0])
    sched.step()
    start = copy.deepcopy((model, opt, sched))
    momenta = []
    for b in data[1:]:
        momenta.append(opt.param_groups[0]["momentum"])
        hopt.step(b)
        sched.step()
    assert len(set(momenta)) == k  # (cycled at every step of the window)
    grads, _ = hopt.hypergradient(val_batch=val)
    raw0 = float(hp.raw.detach())

    def outer(raw: float) -> float:
        m, o, s = copy.deepcopy(start)
        mult = float(torch.tensor(raw, dtype=hp.raw.dtype).exp())
        for b in data[1:]:
            o.zero_grad()
            _loss(m, 0.0, b).backward()
            base = o.param_groups[0]["momentum"]
            o.param_groups[0]["momentum"] = base * mult
            o.step()
            o.param_groups[0]["momentum"] = base
            s.step()
        with torch.no_grad():
            return float(_loss(m, 0.0, val))

    fd = _central(outer, raw0, h=1e-5)
    assert abs(fd) > 1e-5
    assert abs(float(grads[0]) - fd) <= 1e-6 * abs(fd)
