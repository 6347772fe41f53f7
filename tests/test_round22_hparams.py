"""Round 22 (hp2): hg.hparams containers.

Bugs (xfail, strict): plausible misuse of the containers' constructors and of the logging helpers
died in an ``AttributeError`` from deep inside instead of a ``TypeError`` that names the mistake:
``WeightDecay(model.parameters())`` (torch.optim's calling convention), ``LearningRate(scheduler)``,
``summary(hopt)`` (the HyperOptimizer instead of its ``hparams``), ``ExampleWeights(dataset)``.

Passing tests, new: hand-added second derivatives of WeightDecay penalties checked against a
dense autograd reference (exact IFT with a direct solve) in configurations the earlier rounds did
not combine (two overlapping containers, one bounded per-entry, a coefficient that is itself a
tuned Hparam, ExampleWeights with repeated indices in the same loss); Unrolled through four
OptimizerSetting containers at once (relative lr under a scheduler, momentum, weight_decay,
dampening, two param groups with different values) against a hand-written unroll; every
constraint's raw <-> value round trip at extreme values in float32 / float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.func as tf
from torch import nn

import hypergrad as hg


def mse(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((20, 3), (20, 2), (15, 3), (15, 2))
    )


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


# --------------------------------------------------------------------------- bugs: clear errors


@pytest.mark.parametrize("kind", ["generator", "list", "optimizer"])
def test_weight_decay_given_parameters_or_optimizer_names_the_mistake(kind: str) -> None:
    model = nn.Linear(3, 2)
    arg = {
        "generator": lambda: model.parameters(),
        "list": lambda: list(model.parameters()),
        "optimizer": lambda: torch.optim.SGD(model.parameters(), lr=0.1),
    }[kind]()
    with pytest.raises(TypeError, match="model"):
        hg.hparams.WeightDecay(arg, per="layer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        hg.hparams.PriorPrecision(arg)  # type: ignore[arg-type]


def test_optimizer_setting_given_a_scheduler_or_model_names_the_mistake() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(TypeError, match=r"scheduler\.optimizer.*relative=True"):
        hg.hparams.LearningRate(sched)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimiser"):
        hg.hparams.Momentum(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimiser"):
        hg.hparams.OptimizerSetting(sched, "lr", "positive")  # type: ignore[arg-type]

    # a duck-typed optimiser (param_groups, no torch.optim base class) is still accepted
    class Duck:
        param_groups = [{"params": list(model.parameters()), "lr": 0.1}]

    assert hg.hparams.LearningRate(Duck()).value.tolist() == pytest.approx([0.1])  # type: ignore[arg-type]


def test_summary_given_the_hyper_optimizer_points_to_hparams() -> None:
    model = nn.Linear(3, 2)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    hopt = hg.Implicit(
        model,
        hp,
        lambda m, h, b: m(b).pow(2).sum() + h.penalty(m),
        lambda m, h, b: m(b).pow(2).sum(),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    with pytest.raises(TypeError, match=r"hopt\.hparams"):
        hg.hparams.summary(hopt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        hg.hparams.values({"wd": hp})  # type: ignore[arg-type]
    assert hg.hparams.summary(hopt.hparams) == pytest.approx({"value": 0.1})


def test_example_weights_given_a_dataset_says_len() -> None:
    ds = torch.utils.data.TensorDataset(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(TypeError, match=r"len\(dataset\)"):
        hg.hparams.ExampleWeights(ds)  # type: ignore[arg-type]
    # what stays as it was: a 0-dim integer tensor is a count, a float is refused by value
    assert hg.hparams.ExampleWeights(torch.tensor(4)).raw.shape == (4,)
    with pytest.raises(ValueError, match="number of examples"):
        hg.hparams.ExampleWeights(4.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- passing, new coverage


def _dense_ift(model: nn.Module, hp: nn.Module, tl, vl, tb, vb) -> list[torch.Tensor]:  # noqa: ANN001
    """dL_V/dlambda = direct - (d^2 L_T / dlambda dw) H^-1 dL_V/dw, all by plain autograd."""
    ws, hs = list(model.parameters()), list(hp.parameters())
    g = torch.autograd.grad(tl(model, hp, tb), ws, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in g])
    rows = [torch.autograd.grad(flat[i], ws, retain_graph=True) for i in range(flat.numel())]
    h = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in rows])
    gv = torch.autograd.grad(vl(model, hp, vb), ws + hs, allow_unused=True)
    x = torch.linalg.solve(h, torch.cat([t.reshape(-1) for t in gv[: len(ws)]]))
    mixed = torch.autograd.grad(flat @ x, hs, allow_unused=True)
    out = []
    for p, d, m in zip(hs, gv[len(ws) :], mixed, strict=True):
        r = torch.zeros_like(p)
        out.append(r + (0 if d is None else d) - (0 if m is None else m))
    return out


def test_implicit_by_hand_penalty_derivatives_match_dense_autograd_in_mixed_containers() -> None:
    """New: two WeightDecay containers penalising the same weights (one per-layer unbounded, one
    per-entry with max=), the second scaled by a tuned interval Hparam, next to ExampleWeights
    with repeated indices, all in one ModuleDict: Implicit + Direct (its HVPs and mixed term add
    the penalties' second derivatives by hand) against a dense autograd IFT, float64."""
    x, y, xv, yv = _data()
    idx = torch.tensor([0, 1, 1, 2, 5, 5, 5, 3, 3, 4, 6, 7, 8, 9, 10, 11, 12, 12, 13, 0])
    model = _model()
    hp = nn.ModuleDict(
        {
            "a": hg.hparams.WeightDecay(model, per="layer", init=0.1),
            "b": hg.hparams.WeightDecay(
                model, per="parameter", init=0.05, max=0.2, include=lambda n: n.endswith("weight")
            ),
            "s": hg.hparams.Hparam(0.8, "interval", low=0.1, high=2.0),
            "ew": hg.hparams.ExampleWeights(30, init=0.7),
        }
    )
    with torch.no_grad():  # spread the decays and weights so every entry's term differs
        hp["b"].raw[0].add_(torch.linspace(-1.0, 1.5, 12).reshape(4, 3))
        hp["ew"].raw.add_(torch.linspace(-1.0, 1.0, 30))

    def tl(m, h, b):  # noqa: ANN001, ANN202
        per = ((m(b[0]) - b[1]) ** 2).mean(1)
        w = h["ew"](idx)
        return (w * per).sum() / w.sum() + h["a"].penalty(m) + h["s"]() * h["b"].penalty(m) / 2

    def vl(m, h, b):  # noqa: ANN001, ANN202
        return mse(m, b)

    ref = _dense_ift(model, hp, tl, vl, (x, y), (xv, yv))
    hopt = hg.Implicit(
        model,
        hp,
        tl,
        vl,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    got, _ = hopt.hypergradient((x, y), (xv, yv))
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref, strict=True):
        assert float(b.abs().max()) > 1e-6
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _manual_unroll(model: nn.Module, lr, mom, wd, damp, batches, xv, yv) -> torch.Tensor:  # noqa: ANN001
    """torch.optim.SGD's update, written out per group (group 0: layer 0, group 1: layer 2)."""
    w = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buf: dict[str, torch.Tensor] = {}
    for t, b in enumerate(batches):
        loss = mse(lambda z, w=w: tf.functional_call(model, w, (z,)), b)
        g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        new = {}
        for (n, v), gi in zip(w.items(), g, strict=True):
            k = 0 if n.startswith("0.") else 1
            gi = gi + wd[k] * v
            buf[n] = gi if t == 0 else mom[k] * buf[n] + (1 - damp[k]) * gi
            new[n] = v - lr[t][k] * buf[n]
        w = new
    return mse(lambda z: tf.functional_call(model, w, (z,)), (xv, yv))


def test_unrolled_four_optimizer_settings_on_two_groups_match_a_hand_unroll() -> None:
    """New: LearningRate(relative=True) under a StepLR, Momentum, OptimizerSetting('weight_decay')
    and OptimizerSetting('dampening', 'unit') in one ModuleDict, on an SGD with two param groups
    holding different values of each: Unrolled's replay against the update written out."""
    x, y, xv, yv = _data(1)
    batches = [(x[6 * i : 6 * i + 6], y[6 * i : 6 * i + 6]) for i in range(3)]
    model = _model()
    opt = torch.optim.SGD(
        [
            {
                "params": model[0].parameters(),
                "lr": 0.1,
                "momentum": 0.5,
                "weight_decay": 0.01,
                "dampening": 0.1,
            },
            {
                "params": model[2].parameters(),
                "lr": 0.03,
                "momentum": 0.8,
                "weight_decay": 0.2,
                "dampening": 0.3,
            },
        ],
        lr=0.1,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hp = nn.ModuleDict(
        {
            "lr": hg.hparams.LearningRate(opt, init=1.2, relative=True),
            "mom": hg.hparams.Momentum(opt),
            "wd": hg.hparams.OptimizerSetting(opt, "weight_decay", "positive"),
            "damp": hg.hparams.OptimizerSetting(opt, "dampening", "unit"),
        }
    )
    raws = {k: m.raw.detach().clone().requires_grad_(True) for k, m in hp.items()}
    mult = raws["lr"].exp()
    lrs = [[0.1 * 0.5**t * mult[0], 0.03 * 0.5**t * mult[1]] for t in range(3)]
    loss = _manual_unroll(
        _model(),
        lrs,
        torch.sigmoid(raws["mom"]),
        raws["wd"].exp(),
        torch.sigmoid(raws["damp"]),
        batches,
        xv,
        yv,
    )
    ref = torch.autograd.grad(loss, list(raws.values()))
    hopt = hg.Unrolled(
        model,
        hp,
        lambda m, h, b: mse(m, b),
        lambda m, h, b: mse(m, b),
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    for b in batches:
        hopt.step(b)
        sched.step()
    # the scheduler still owns the groups' values: relative mode took its multiplier off again
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 0.125, 0.03 * 0.125], rel=1e-12)
    got, info = hopt.hypergradient(val_batch=(xv, yv))
    assert info.outer_loss == pytest.approx(float(loss.detach()), rel=1e-12)
    for a, b in zip(got, ref, strict=True):
        assert float(b.abs().max()) > 1e-6
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def _extreme_cases() -> list[tuple[torch.dtype, float, str, dict]]:
    cases: list[tuple[torch.dtype, float, str, dict]] = []
    for dt in (torch.float32, torch.float64):
        fi = torch.finfo(dt)
        cases += [(dt, v, "positive", {}) for v in (fi.tiny, 1e-30, 1e-3, 1e30, fi.max / 2)]
        cases += [(dt, v, "unit", {}) for v in (fi.tiny, 1e-30, 1e-7, 1 - 1e-7, 1 - fi.eps)]
        cases += [(dt, v, "real", {}) for v in (-fi.max / 2, 0.0, fi.max / 2)]
        for lo, hi in ((0.0, 1.0), (-1e30, 1e30), (1e6, 1e6 + 1), (0.1, 0.3)):
            cases += [
                (dt, lo + (hi - lo) * f, "interval", {"low": lo, "high": hi})
                for f in (1e-12, 1e-6, 0.5, 1 - 1e-6)
            ]
        for lo in (-1e30, -5.0, 1e6):
            cases += [(dt, lo + off, "greater_than", {"low": lo}) for off in (1e-30, 1e-6, 1.0, 1e35)]
    return cases


def test_every_constraint_round_trips_or_refuses_at_extreme_values() -> None:
    """New (as a sweep): an Hparam either refuses an init with ValueError, or holds a value inside
    the open domain, within 1e-3 of the init rounded to its dtype, with a finite non-zero
    derivative (a value on the domain's edge would never move)."""
    built = 0
    for dt, v, c, kw in _extreme_cases():
        try:
            h = hg.hparams.Hparam(v, c, dtype=dt, **kw)
        except ValueError:
            continue
        built += 1
        val = float(h.value)
        lo, hi = kw.get("low"), kw.get("high")
        if c == "positive":
            inside = val > 0
        elif c == "unit":
            inside = 0 < val < 1
        elif c == "interval":
            inside = lo < val < hi
        elif c == "greater_than":
            inside = val > lo
        else:
            inside = math.isfinite(val)
        want = float(torch.tensor(v, dtype=dt))
        assert inside, (dt, v, c, kw, val)
        assert abs(val - want) <= 1e-3 * max(abs(want), 1e-300), (dt, v, c, kw, val)
        (grad,) = torch.autograd.grad(h().sum(), h.raw)
        assert math.isfinite(float(grad)) and float(grad) != 0.0, (dt, v, c, kw)
    assert built >= 60


def test_one_weight_decay_shared_by_two_hyper_optimizers_matches_separate_copies() -> None:
    """New: one bounded per-entry WeightDecay (built on model A) shared by an Implicit on A and an
    Unrolled on a same-shaped model B: each hypergradient equals, bit for bit, the one computed
    with its own copy of the container (the penalties' recording state must not leak between
    the two methods, nor between their interleaved steps)."""
    x, y, xv, yv = _data(2)

    def tl(m, h, b):  # noqa: ANN001, ANN202
        return mse(m, b) + h.penalty(m)

    def build(hp_a: nn.Module, hp_b: nn.Module) -> list[hg.HyperOptimizer]:
        torch.manual_seed(5)
        ma = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        mb = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        a = hg.Implicit(
            ma,
            hp_a,
            tl,
            lambda m, h, b: mse(m, b),
            inner_optimizer=torch.optim.SGD(ma.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp_a.parameters(), lr=0.0),
            solver=hg.Direct(),
        )
        b = hg.Unrolled(
            mb,
            hp_b,
            tl,
            lambda m, h, b: mse(m, b),
            inner_optimizer=torch.optim.SGD(mb.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp_b.parameters(), lr=0.0),
            steps=3,
        )
        return [a, b]

    template = hg.hparams.WeightDecay(_model(), per="parameter", init=0.1, max=0.5)
    with torch.no_grad():
        template.raw[0].add_(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
    shared = copy.deepcopy(template)
    results = []
    for pair in (build(shared, shared), build(copy.deepcopy(template), copy.deepcopy(template))):
        for _ in range(3):
            for h in pair:
                h.step((x, y))
        results.append([h.hypergradient((x, y), (xv, yv))[0] for h in pair])
    for got, want in zip(results[0], results[1], strict=True):
        for a, b in zip(got, want, strict=True):
            assert float(b.abs().max()) > 1e-8
            assert torch.equal(a, b)
