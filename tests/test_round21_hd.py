"""Round 21: hypergradient descent (``hg.optim.SGDHD`` / ``AdamHD``) and the differentiable
``torch.optim`` steps the replay runs (``hypergrad._inner``), checked against independent
references over whole grids of options rather than a few hand-picked cases.

* SGDHD / AdamHD against a reference that never reads their formulas: a plain ``torch.optim``
  SGD / Adam whose learning rate is set by Baydin et al.'s rule ``α_t = clamp(α_{t-1} + β h_t)``,
  ``h_t = <∇F(θ_{t-1}), d_{t-1}>``, with ``d_{t-1}`` read off the displacement the real step made,
  ``(θ_{t-2} - θ_{t-1}) / α_{t-1}``; through ``add_param_group`` mid-run, a ``weights_only``
  checkpoint loaded into a fresh optimiser mid-run, a multiplicative scheduler,
  ``zero_grad(set_to_none=False)``, weights that sit steps out, per-group bounds.
* What a state_dict / param group of another optimiser does to AdamHD / SGDHD (two bugs: an
  NAdam, RAdam or Adamax state loaded into AdamHD silently, and a group's values that the
  constructor refuses were accepted when given per group).
* Every option combination of the eleven replayed optimisers: the replay equals ``torch.optim``
  bit for bit (float32, float64, complex, foreach); a tuned scalar setting's derivative (reverse
  and forward mode) equals central differences of the plain steps; ``update_exactly`` gives the
  real step's values bit for bit with a tuned setting of another dtype.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import random
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from hypergrad import _inner as I
from hypergrad.optim import SGDHD, AdamHD

S = torch.optim
DT = torch.float64


# ============================================================================================
# 1. SGDHD / AdamHD against a displacement-based reference, through the torch.optim idioms
#    (add_param_group mid-run, a weights_only checkpoint into a fresh optimiser, ExponentialLR,
#    zero_grad(set_to_none=False), weights that sit out steps, per-group lr_min / lr_max).
#    Not covered before: existing reference loops re-derive d_t from the update formulas and
#    never combine a mid-run group, a reload into a fresh object and a scheduler in one run.


def _hd_scenario(seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    kind = ("sgd", "adam")[seed % 2]
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for gi in range(3):
        ps = [
            torch.randn(rnd.choice([(3,), (2, 2), (1,)]), generator=gen, dtype=DT).requires_grad_()
            for _ in range(rnd.choice([1, 2]))
        ]
        g: dict[str, Any] = {
            "params": ps,
            "lr": rnd.choice([0.01, 0.05, 0.1]),
            # one group untuned (torch's steps exactly)
            "hypergrad_lr": ([2e-2, 5e-3, 0.0] if kind == "sgd" else [1e-2, 2e-3, 0.0])[gi],
            "weight_decay": rnd.choice([0.0, 0.1]),
            "maximize": gi == 1 and seed % 3 == 0,
        }
        if rnd.random() < 0.5:
            g["lr_max"] = g["lr"] * 1.5
        g["lr_min"] = g["lr"] * rnd.choice([0.2, 0.5])  # (> 0: the reference reads d off the step)
        if kind == "sgd":
            g["momentum"] = rnd.choice([0.0, 0.5, 0.9])
            if g["momentum"] and rnd.random() < 0.5:
                g["nesterov"] = True
            elif g["momentum"]:
                g["dampening"] = rnd.choice([0.0, 0.3])
        else:
            g["betas"] = rnd.choice([(0.9, 0.999), (0.5, 0.7)])
            g["amsgrad"] = rnd.random() < 0.5
            g["eps"] = rnd.choice([1e-8, 1e-3])
        groups.append(g)
    return {
        "kind": kind,
        "groups": groups,
        "signs": [-1.0 if g["maximize"] else 1.0 for g in groups for _ in g["params"]],
        "foreach": rnd.choice([False, True]),
        "sched": seed % 4 in (1, 2),
        "reload": seed % 4 in (2, 3),
        "set_to_none": seed % 5 != 0,
        "sits_out": {(rnd.randrange(4), rnd.randrange(1, 9)) for _ in range(3)},  # (weight, step)
    }


_HD_KEYS = ("hypergrad_lr", "lr_min", "lr_max")


def _reference_hd(sc: dict[str, Any], steps: int, late_at: int) -> list[list[float]]:
    """The scenario run by a plain torch.optim optimiser whose rates a hand loop sets."""
    groups = sc["groups"]
    base = S.SGD if sc["kind"] == "sgd" else S.Adam
    params = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in groups]
    plain = [
        {**{k: v for k, v in g.items() if k not in _HD_KEYS}, "params": ps}
        for g, ps in zip(groups, params, strict=True)
    ]
    opt = base(plain[:2], foreach=sc["foreach"])
    sched = S.lr_scheduler.ExponentialLR(opt, gamma=0.9) if sc["sched"] else None
    meta = [(g["hypergrad_lr"], g.get("lr_min", 0.0), g.get("lr_max", math.inf)) for g in groups]
    direction: dict[int, Tensor] = {}
    lrs = []
    flat = [p for ps in params for p in ps]
    for t in range(steps):
        if t == late_at:
            opt.add_param_group(plain[2])
        opt.zero_grad(set_to_none=sc["set_to_none"])
        _loss(flat, t, sc["sits_out"], sc["signs"]).backward()
        before = {}
        for gi, g in enumerate(opt.param_groups):
            beta, lo, hi = meta[gi]
            h = 0.0
            for p in g["params"]:
                if p.grad is not None and id(p) in direction:
                    eff = (-p.grad if g["maximize"] else p.grad) + g["weight_decay"] * p.detach()
                    h += float((eff * direction[id(p)]).sum())
            if beta != 0:
                g["lr"] = min(max(g["lr"] + beta * h, lo), hi)
            before.update({id(p): p.detach().clone() for p in g["params"]})
        opt.step()
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    direction.pop(id(p), None)
                else:
                    assert g["lr"] > 0  # (the scenarios keep the rates positive)
                    direction[id(p)] = (before[id(p)] - p.detach()) / g["lr"]
        if sched is not None:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs + [[float(x) for p in flat for x in p.detach().reshape(-1)]]


def _loss(flat: list[Tensor], t: int, sits_out: set[tuple[int, int]], signs: list[float]) -> Tensor:
    """A smooth non-quadratic loss of all the weights (those of the group added later too, which
    then enter it with the gradient they accumulated); a weight listed in ``sits_out`` for step
    ``t`` is not reached (its grad stays None, or 0). ``signs``: -1 for the weights of a group
    that maximises (it ascends minus the loss)."""
    total = torch.zeros((), dtype=DT)
    for i, p in enumerate(flat):
        if (i, t) in sits_out:
            continue
        c = torch.full_like(p, 0.3 * (i + 1) * math.sin(t + i))
        term = 0.5 * ((p - c) ** 2).sum() * (1 + 0.2 * i) + torch.log(torch.cosh(p)).sum()
        total = total + signs[i] * term
    return total


@pytest.mark.parametrize("seed", range(8))
def test_hd_matches_a_displacement_reference_through_add_group_reload_and_scheduler(seed: int) -> None:
    sc = _hd_scenario(seed)
    steps, late_at = 12, 4
    ref = _reference_hd(copy.deepcopy(sc), steps, late_at)
    groups = sc["groups"]
    cls = SGDHD if sc["kind"] == "sgd" else AdamHD
    flat = [p for g in groups for p in g["params"]]
    opt = cls([dict(g) for g in groups[:2]], foreach=sc["foreach"])
    sched = S.lr_scheduler.ExponentialLR(opt, gamma=0.9) if sc["sched"] else None
    lrs = []
    for t in range(steps):
        if t == late_at:
            opt.add_param_group(dict(groups[2]))
        if sc["reload"] and t == 8:  # a checkpoint on disk, loaded into freshly built objects
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict() if sched else None}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            opt = cls([dict(g) for g in groups], foreach=sc["foreach"])
            opt.load_state_dict(saved["opt"])
            if sched is not None:
                sched = S.lr_scheduler.ExponentialLR(opt, gamma=0.9)
                sched.load_state_dict(saved["sched"])
        opt.zero_grad(set_to_none=sc["set_to_none"])
        _loss(flat, t, sc["sits_out"], sc["signs"]).backward()
        opt.step()
        if sched is not None:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    final = [float(x) for p in flat for x in p.detach().reshape(-1)]
    moved = [abs(a - g["lr"]) > 1e-3 * g["lr"] for a, g in zip(lrs[-1], groups, strict=True)]
    assert moved[0]  # the tuned rates really moved (group 2's is untuned: beta = 0)
    for got, want in zip(lrs, ref[:-1], strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-13)
    assert final == pytest.approx(ref[-1], rel=1e-9, abs=1e-12)


# ============================================================================================
# 2. A state of another optimiser, and group values the constructor refuses


def _stepped(make: Any) -> Any:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, generator=gen, dtype=DT).requires_grad_()
    opt = make([w])
    for _ in range(2):
        w.grad = torch.randn(3, generator=gen, dtype=DT)
        opt.step()
    return opt


@pytest.mark.parametrize("other", [S.NAdam, S.RAdam, S.Adamax], ids=lambda c: c.__name__)
def test_adamhd_refuses_the_state_of_nadam_radam_and_adamax_at_load(other: type[S.Optimizer]) -> None:
    """AdamHD's docstring: ``load_state_dict`` raises ``ValueError``, before anything is replaced,
    "for a group saved ... by another optimiser". SGD's and Adam-with-another-flag's are refused
    (tests/test_round12_optim.py); NAdam's, RAdam's and Adamax's groups have every key AdamHD
    required, so they loaded: NAdam's (mu_product, momentum_decay) and RAdam's (its rectified
    step) went on as plain Adam without a word, Adamax's (``exp_inf`` instead of ``exp_avg_sq``)
    died at the next step with a bare ``KeyError``."""
    saved = _stepped(lambda ps: other(ps, lr=0.01)).state_dict()
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = AdamHD([w], lr=0.02, hypergrad_lr=1e-3)
    with pytest.raises(ValueError, match=r"param group 0\b"):
        opt.load_state_dict(copy.deepcopy(saved))
    assert opt.param_groups[0]["lr"] == 0.02 and not opt.state  # nothing replaced


def test_adam_and_adamhd_states_still_load_into_adamhd() -> None:
    """The other side of the refusal above (passes today; guards the fix): torch Adam's state
    (also one without the flags newer torch added) and AdamHD's own load and step."""
    for make in (
        lambda ps: S.Adam(ps, lr=0.01, amsgrad=True),
        lambda ps: S.Adam(ps, lr=0.01, foreach=True),
        lambda ps: AdamHD(ps, lr=0.01, hypergrad_lr=1e-3),
    ):
        saved = copy.deepcopy(_stepped(make).state_dict())
        for g in saved["param_groups"]:
            for flag in ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"):
                g.pop(flag, None)
        w = torch.zeros(3, dtype=DT, requires_grad=True)
        opt = AdamHD([w], lr=0.5, hypergrad_lr=1e-3)
        opt.load_state_dict(saved)
        w.grad = torch.ones(3, dtype=DT)
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=0.5)
        assert torch.isfinite(w).all()


BAD_GROUPS: list[tuple[type[Any], dict[str, Any], dict[str, Any], str]] = [
    (SGDHD, {"lr": 0.1, "momentum": 0.9}, {"momentum": -0.5}, "momentum"),
    (SGDHD, {"lr": 0.1}, {"weight_decay": -0.1}, "weight_decay"),
    (SGDHD, {"lr": 0.1}, {"nesterov": True}, "Nesterov"),  # no momentum: silently plain SGD
    (SGDHD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, {"nesterov": True}, "Nesterov"),
    (AdamHD, {"lr": 0.01}, {"betas": (1.0, 0.999)}, "beta"),
    (AdamHD, {"lr": 0.01}, {"betas": (0.9, -0.1)}, "beta"),
    (AdamHD, {"lr": 0.01}, {"eps": -1e-8}, "epsilon"),
    (AdamHD, {"lr": 0.01}, {"weight_decay": -0.1}, "weight_decay"),
]


@pytest.mark.parametrize("how", ["add_param_group", "constructor_group"])
@pytest.mark.parametrize(
    ("cls", "kwargs", "group", "named"),
    BAD_GROUPS,
    ids=[f"{c.__name__}-{'-'.join(g)}-{i}" for i, (c, _, g, _) in enumerate(BAD_GROUPS)],
)
def test_group_values_the_constructor_refuses_are_refused_per_group(
    cls: type[Any], kwargs: dict[str, Any], group: dict[str, Any], named: str, how: str
) -> None:
    """``add_param_group``'s docstring: "Its values are checked as the constructor checks its
    arguments". ``SGDHD([w], momentum=-0.5)`` raises torch's "Invalid momentum value"; the same
    value in a group (added later, or in the parameter list) trained silently: a negative
    momentum oscillates, ``nesterov=True`` without momentum is plain SGD, ``betas[0] = 1`` never
    moves Adam's first moment off zero."""
    with pytest.raises(ValueError):  # the constructor refuses it (torch's own check)
        cls([torch.zeros(2, requires_grad=True)], **{**kwargs, **group})
    w, v = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=named):
        if how == "add_param_group":
            opt = cls([w], **kwargs)
            opt.add_param_group({"params": [v], **group})
        else:
            cls([{"params": [w]}, {"params": [v], **group}], **kwargs)


def test_valid_groups_still_add_and_match_torch() -> None:
    """Guards the fix above (passes today): valid per-group settings are accepted and step as
    torch's, and a refused group leaves the optimiser as it was."""
    w, v = torch.ones(2, dtype=DT, requires_grad=True), torch.ones(3, dtype=DT, requires_grad=True)
    opt = SGDHD([w], lr=0.1, momentum=0.9, nesterov=True, hypergrad_lr=0.0)
    opt.add_param_group({"params": [v], "momentum": 0.5, "nesterov": False, "dampening": 0.2, "lr": 0.3})
    ref_w, ref_v = w.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = S.SGD([ref_w], lr=0.1, momentum=0.9, nesterov=True)
    ref.add_param_group({"params": [ref_v], "momentum": 0.5, "nesterov": False, "dampening": 0.2, "lr": 0.3})
    for t in range(3):
        for p, q in ((w, ref_w), (v, ref_v)):
            p.grad = torch.full_like(p, math.cos(t)) + p.detach()
            q.grad = torch.full_like(q, math.cos(t)) + q.detach()
        opt.step()
        ref.step()
    assert torch.equal(w, ref_w) and torch.equal(v, ref_v)
    a = AdamHD([w], lr=0.01)
    a.add_param_group({"params": [v], "betas": (0.0, 0.5), "eps": 0.0, "weight_decay": 0.0})
    assert len(a.param_groups) == 2


# ============================================================================================
# 3. The replayed steps (hypergrad._inner) over every option combination. Existing tests check
#    a few named configurations each; these walk the full grids of options.

GRIDS: dict[type[S.Optimizer], dict[str, list[Any]]] = {
    S.SGD: dict(lr=[0.1], momentum=[0, 0.9], dampening=[0, 0.3], weight_decay=[0, 0.1],
                nesterov=[False, True], maximize=[False, True]),
    S.Adam: dict(lr=[0.01], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3], weight_decay=[0, 0.1],
                 amsgrad=[False, True], maximize=[False, True], decoupled_weight_decay=[False, True]),
    S.AdamW: dict(lr=[0.01], weight_decay=[0, 0.1], amsgrad=[False, True], maximize=[False, True]),
    S.RMSprop: dict(lr=[0.01], alpha=[0.99, 0.5], eps=[1e-8, 1e-2], weight_decay=[0, 0.1], momentum=[0, 0.9],
                    centered=[False, True], maximize=[False, True]),
    S.Adagrad: dict(lr=[0.1], lr_decay=[0, 0.1], weight_decay=[0, 0.1], initial_accumulator_value=[0, 0.5],
                    eps=[1e-10, 1e-2], maximize=[False, True]),
    S.Adamax: dict(lr=[0.01], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-2], weight_decay=[0, 0.1],
                   maximize=[False, True]),
    S.NAdam: dict(lr=[0.01], weight_decay=[0, 0.1], momentum_decay=[4e-3, 0.1],
                  decoupled_weight_decay=[False, True], maximize=[False, True]),
    S.RAdam: dict(lr=[0.01], betas=[(0.9, 0.999), (0.5, 0.6)], weight_decay=[0, 0.1],
                  decoupled_weight_decay=[False, True], maximize=[False, True]),
    S.Adadelta: dict(lr=[1.0, 0.5], rho=[0.9, 0.5], eps=[1e-6, 1e-2], weight_decay=[0, 0.1],
                     maximize=[False, True]),
    S.ASGD: dict(lr=[0.01], lambd=[1e-4, 0.1], alpha=[0.75, 0.5], t0=[1e6, 2.0], weight_decay=[0, 0.1],
                 maximize=[False, True]),
    S.Rprop: dict(lr=[0.01], etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50), (1e-3, 0.02)],
                  maximize=[False, True]),
}  # fmt: skip
_NO_FOREACH = (S.NAdam, S.RAdam, S.ASGD)  # (refused by the replay with foreach=True)


def _combos(cls: type[S.Optimizer]) -> list[dict[str, Any]]:
    grid = GRIDS[cls]
    out = []
    for values in itertools.product(*grid.values()):
        kw = dict(zip(grid, values, strict=True))
        if cls is S.SGD and kw["nesterov"] and (kw["momentum"] == 0 or kw["dampening"] != 0):
            continue  # (torch refuses it)
        out.append(kw)
    return out


@pytest.mark.parametrize("cls", list(GRIDS), ids=lambda c: c.__name__)
def test_every_option_combination_replays_the_real_step_bit_for_bit(cls: type[S.Optimizer]) -> None:
    """Each combination, in float32 and float64 (alternating), real and complex weights, foreach
    off and on: 5 replayed steps (a zero gradient at one) equal torch.optim's, weights and state."""
    count = 0
    for i, kw in enumerate(_combos(cls)):
        dtype = (torch.float32, DT)[i % 2]
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        for foreach in (False, True) if cls not in _NO_FOREACH else (False,):
            gen = torch.Generator().manual_seed(i)
            ps = [torch.randn(3, 4, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype)]
            ps.append(torch.randn(3, generator=gen, dtype=cdtype))
            ps = [p.requires_grad_() for p in ps]
            opt = cls(ps, foreach=foreach, **kw)
            update = I.update_for(opt)
            weights = [p.detach().clone() for p in ps]
            states: list[dict[str, Any]] = [{} for _ in ps]
            for t in range(5):
                grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]
                if t == 3:
                    grads[0] = torch.zeros_like(grads[0])
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
                new, states = update(weights, grads, states, I.group_settings(opt.param_groups[0]))
                opt.step()
                weights = [x.detach() for x in new]
                where = f"{cls.__name__}({kw}, foreach={foreach}) {dtype} step {t}"
                for a, p in zip(weights, ps, strict=True):
                    assert torch.equal(a, p.detach()), where
                for st, p in zip(states, ps, strict=True):
                    for key, value in opt.state[p].items():
                        if isinstance(value, Tensor) and key in st:
                            assert torch.equal(st[key].to(value.dtype), value), f"{where}: {key}"
            count += 1
    assert count >= 16


_A_GEN = torch.Generator().manual_seed(0)
_M = torch.randn(8, 8, generator=_A_GEN, dtype=DT)
_A = _M @ _M.T / 8 + torch.eye(8, dtype=DT)
_B = torch.randn(8, generator=_A_GEN, dtype=DT)
_C = torch.randn(8, generator=_A_GEN, dtype=DT)
_THETA0 = torch.randn(8, generator=_A_GEN, dtype=DT)

DERIVATIVE_CASES: list[tuple[type[S.Optimizer], dict[str, Any]]] = [
    (S.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    (S.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    (S.Adam, dict(lr=0.05, weight_decay=0.1, eps=1e-2, amsgrad=True, maximize=True)),
    (S.Adam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-2)),
    (S.AdamW, dict(lr=0.05, weight_decay=0.3, amsgrad=True, eps=1e-2)),
    (S.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-2, weight_decay=0.1, momentum=0.5, centered=True)),
    (S.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-2, weight_decay=0.1)),
    (S.Adagrad, dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, eps=1e-2, initial_accumulator_value=0.5)),
    (S.Adamax, dict(lr=0.05, eps=1e-2, weight_decay=0.1)),
    (S.NAdam, dict(lr=0.05, weight_decay=0.1, momentum_decay=0.1, eps=1e-2)),
    (S.NAdam, dict(lr=0.05, weight_decay=0.1, momentum_decay=0.1, decoupled_weight_decay=True, eps=1e-2)),
    (S.RAdam, dict(lr=0.05, weight_decay=0.1, eps=1e-2)),
    (S.RAdam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-2)),
    (S.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-2, weight_decay=0.1)),
    (S.ASGD, dict(lr=0.05, lambd=0.1, alpha=0.75, t0=2.0, weight_decay=0.1)),
]
_TUNABLE = (
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "eps",
    "alpha",
    "rho",
    "lambd",
    "lr_decay",
    "momentum_decay",
)


def _replayed(cls: type[S.Optimizer], kw: dict[str, Any], name: str, value: Any, steps: int = 6) -> Tensor:
    """``c·θ_K + ½‖θ_K‖²`` after K replayed steps on ``½θᵀAθ − bᵀθ + Σ log cosh θ`` with the
    setting ``name`` replaced by ``value`` (a number, a tensor requiring grad, or a dual)."""
    opt = cls([torch.zeros(8, dtype=DT, requires_grad=True)], **kw)
    update = I.update_for(opt)
    group = {**I.group_settings(opt.param_groups[0]), name: value}
    theta, states = _THETA0.clone(), [{}]
    for _ in range(steps):
        grad = _A @ theta - _B + torch.tanh(theta)
        (theta,), states = update([theta], [grad], states, group)
    return _C @ theta + 0.5 * theta @ theta


@pytest.fixture
def default_float64() -> Any:
    """Float64 default dtype, so that the optimisers' 0-dim state (NAdam's mu_product, ASGD's
    eta) is float64: in float32 it quantises the plain steps' dependence on the setting, and
    central differences of them are off by up to 60% (NAdam's momentum_decay)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(before)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("cls", "kw"), DERIVATIVE_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(DERIVATIVE_CASES)]
)
def test_every_tuned_scalar_setting_has_the_central_difference_derivative(
    cls: type[S.Optimizer], kw: dict[str, Any], default_float64: None
) -> None:
    """Every scalar setting of the configuration (the ones ``OptimizerSetting`` can tune), in
    reverse and forward mode, against central differences of the plain (number-valued) steps:
    54 (optimiser, options, setting) cases where tests/test_round7_optim.py checks 16,
    half of them tuple betas."""
    checked = 0
    for name in (n for n in _TUNABLE if kw.get(n, 0) != 0):
        v = float(kw[name])
        h = 1e-6 * v
        fd = (float(_replayed(cls, kw, name, v + h)) - float(_replayed(cls, kw, name, v - h))) / (2 * h)
        x = torch.tensor(v, dtype=DT, requires_grad=True)
        out = _replayed(cls, kw, name, x)
        reverse = float(torch.autograd.grad(out, x)[0]) if out.requires_grad else 0.0
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(
                _replayed(cls, kw, name, fwAD.make_dual(torch.tensor(v, dtype=DT), torch.ones((), dtype=DT)))
            ).tangent
        forward = 0.0 if tangent is None else float(tangent)
        tol = 1e-6 * max(1.0, abs(fd))
        assert abs(reverse - fd) <= tol, f"{name}: reverse {reverse} vs finite differences {fd}"
        assert abs(forward - fd) <= tol, f"{name}: forward {forward} vs finite differences {fd}"
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    ("cls", "kw"), DERIVATIVE_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(DERIVATIVE_CASES)]
)
def test_update_exactly_with_a_tuned_setting_of_another_dtype_is_the_real_step(
    cls: type[S.Optimizer], kw: dict[str, Any]
) -> None:
    """A tuned setting held as a log in float64 (or float32) over float32 (or float64) weights:
    ``update_exactly`` gives torch.optim's values bit for bit, step after step, for each scalar
    setting of each optimiser (existing tests: lr, momentum and decays of SGD / Adam mostly)."""
    for name in (n for n in _TUNABLE if kw.get(n, 0) != 0):
        for wdt, hdt in ((torch.float32, DT), (DT, torch.float32)):
            foreach = cls not in _NO_FOREACH and name == "lr"
            gen = torch.Generator().manual_seed(1)
            ps = [
                torch.randn(5, generator=gen, dtype=wdt).requires_grad_(),
                torch.randn(2, 3, generator=gen, dtype=wdt).requires_grad_(),
            ]
            opt = cls(ps, foreach=foreach, **kw)
            update = I.update_for(opt)
            weights, states = [p.detach().clone() for p in ps], [{}, {}]
            raw = torch.tensor(float(kw[name]), dtype=hdt).log().requires_grad_()
            for t in range(4):
                grads = [torch.randn(p.shape, generator=gen, dtype=wdt) for p in ps]
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
                value = raw.exp()
                number = float(value.detach())
                opt.param_groups[0][name] = number
                group = {**I.group_settings(opt.param_groups[0]), name: value}
                new, states = I.update_exactly(update, weights, grads, states, group, {name: number})
                opt.step()
                weights = [x.detach() for x in new]
                states = [
                    {k: v.detach() if isinstance(v, Tensor) else v for k, v in s.items()} for s in states
                ]
                for a, p in zip(weights, ps, strict=True):
                    assert torch.equal(a, p.detach()), f"{name} {wdt} / {hdt} step {t}"
