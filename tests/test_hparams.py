"""Hyperparameter containers: values, constraints, penalties and the errors for bad values."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad.hparams import Constraint, from_raw, to_raw


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("per,count", [("global", 1), ("layer", 2), ("parameter", 3 * 4 + 4 + 4 * 2 + 2)])
def test_weight_decay_counts_and_penalty(per: str, count: int) -> None:
    model = _model()
    hp = hg.hparams.WeightDecay(model, per=per, init=0.3)
    assert sum(p.numel() for p in hp.parameters()) == count
    expected = 0.5 * 0.3 * sum(float(p.detach().square().sum()) for p in model.parameters())
    assert float(hp.penalty(model).detach()) == pytest.approx(expected, rel=1e-6)
    for name, d in hp.decays().items():
        assert torch.allclose(d, torch.tensor(0.3)), name


def test_weight_decay_penalty_matches_torch_sgd_weight_decay() -> None:
    """0.5 * d * w^2 is the scale of torch.optim.SGD(weight_decay=d)."""
    model = _model()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1)
    x = torch.randn(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x).sum() + hp.penalty(model)).backward()
    opt.step()
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1, weight_decay=0.1)
    twin(x).sum().backward()
    opt2.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_weight_decay_layer_and_include() -> None:
    model = _model()
    hp = hg.hparams.WeightDecay(model, per="layer", include=lambda n: n.endswith("weight"))
    assert hp.names == ("0.weight", "2.weight")
    assert hp.layers == ("0", "2")
    with torch.no_grad():
        hp.raw[1].fill_(math.log(2.0))
    sq0 = float(model[0].weight.detach().square().sum())
    sq2 = float(model[2].weight.detach().square().sum())
    expected = 0.5 * (1e-4 * sq0 + 2.0 * sq2)
    assert float(hp.penalty(model).detach()) == pytest.approx(expected, rel=1e-6)


def test_weight_decay_penalty_with_other_model_names_is_clear() -> None:
    hp = hg.hparams.WeightDecay(_model())
    with pytest.raises(KeyError, match="no parameter"):
        hp.penalty(nn.Linear(3, 2))


@pytest.mark.parametrize("init", [0.0, -1.0, math.inf, math.nan])
def test_weight_decay_init_out_of_domain(init: float) -> None:
    with pytest.raises(ValueError, match="weight decay init"):
        hg.hparams.WeightDecay(_model(), init=init)


def test_weight_decay_bad_per() -> None:
    with pytest.raises(ValueError, match="per"):
        hg.hparams.WeightDecay(_model(), per="neuron")


_BOUNDS: dict[Constraint, dict[str, float]] = {
    Constraint.INTERVAL: {"low": 0.1, "high": 1.5},
    Constraint.GREATER_THAN: {"low": 0.1},
}


@pytest.mark.parametrize("c", list(Constraint))
def test_constraints_round_trip(c: Constraint) -> None:
    value = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    b = _BOUNDS.get(c, {})
    assert torch.allclose(from_raw(to_raw(value, c, **b), c, **b), value, rtol=1e-14)


@pytest.mark.parametrize(
    "init,constraint",
    [(0.0, "positive"), (-0.1, "positive"), (1.0, "unit"), (0.0, "unit"), (math.nan, "real")],
)
def test_hparam_out_of_domain(init: float, constraint: str) -> None:
    with pytest.raises(ValueError, match="Hparam init"):
        hg.hparams.Hparam(init, constraint)


def test_hparam_shape_and_unknown_constraint() -> None:
    h = hg.hparams.Hparam(0.3, "unit", shape=(2, 3))
    assert h.raw.shape == (2, 3) and torch.allclose(h(), torch.full((2, 3), 0.3))
    with pytest.raises(ValueError, match="bounded"):
        hg.hparams.Hparam(0.3, "bounded")


def test_example_weights() -> None:
    ew = hg.hparams.ExampleWeights(5, init=0.25)
    w = ew(torch.tensor([0, 4, 4]))
    assert w.shape == (3,) and torch.allclose(w, torch.full((3,), 0.25))
    with pytest.raises(TypeError, match="integer"):
        ew(torch.tensor([0.0]))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ExampleWeights init"):
            hg.hparams.ExampleWeights(5, init=bad)
    with pytest.raises(ValueError, match="number of examples"):
        hg.hparams.ExampleWeights(0)


def test_optimizer_settings_write_into_param_groups() -> None:
    model = _model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
        lr=0.1,
        momentum=0.9,
    )
    lr = hg.hparams.LearningRate(opt)
    mom = hg.hparams.Momentum(opt, init=0.5)
    assert torch.allclose(lr.value, torch.tensor([0.1, 0.5]))
    with torch.no_grad():
        lr.raw.add_(math.log(2.0))
    lr.write()
    mom.write()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 1.0])
    assert [g["momentum"] for g in opt.param_groups] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="momentum init"):
        hg.hparams.Momentum(opt, init=1.0)
    with pytest.raises(ValueError, match="no setting 'momentum'"):
        hg.hparams.Momentum(torch.optim.Adam(model.parameters()))
    assert list(dict(lr.named_parameters())) == ["raw"]  # the optimiser is not a submodule


def test_hyper_optimizer_writes_tuned_learning_rate_before_each_step() -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = hg.hparams.LearningRate(inner)

    def loss(m, h, b):
        return m(b).square().mean()

    hopt = hg.Unrolled(
        model, lr, loss, loss, inner_optimizer=inner, outer_optimizer=torch.optim.SGD(lr.parameters(), lr=1.0)
    )
    x = torch.randn(4, 3)
    hopt.step(x)
    hopt.hyper_step(val_batch=x)
    hopt.step(x)
    assert inner.param_groups[0]["lr"] == pytest.approx(float(lr.value[0].detach()))
    assert inner.param_groups[0]["lr"] != pytest.approx(0.1)


# ---- bounded hyperparameters ---------------------------------------------------------------


def test_interval_maps_into_range_with_closed_form_value_and_derivative() -> None:
    low, high = -2.0, 3.0
    raw = torch.linspace(-30.0, 30.0, 61, dtype=torch.float64, requires_grad=True)
    v = from_raw(raw, "interval", low=low, high=high)
    assert bool(((v > low) & (v < high)).all())
    s = 1.0 / (1.0 + torch.exp(-raw.detach()))
    assert torch.allclose(v.detach(), low + (high - low) * s, rtol=1e-15, atol=1e-15)
    (g,) = torch.autograd.grad(v.sum(), raw)
    assert torch.allclose(g, (high - low) * s * (1 - s), rtol=1e-12, atol=1e-300)
    assert float(from_raw(torch.zeros((), dtype=torch.float64), "interval", low=low, high=high)) == 0.5


@pytest.mark.parametrize("low,high", [(-2.0, 3.0), (0.9, 1.0), (1e-3, 1e3)])
def test_interval_round_trip_near_the_bounds(low: float, high: float) -> None:
    w = high - low
    v = torch.tensor(
        [low + 1e-12 * w, low + 1e-6 * w, low + 0.5 * w, high - 1e-6 * w, high - 1e-12 * w],
        dtype=torch.float64,
    )
    raw = to_raw(v, "interval", low=low, high=high)
    assert bool(torch.isfinite(raw).all()) and bool((raw.diff() > 0).all())
    back = from_raw(raw, "interval", low=low, high=high)
    eps = torch.finfo(torch.float64).eps
    assert torch.allclose(back, v, rtol=0, atol=4 * eps * max(abs(low), abs(high)))
    assert bool(((back > low) & (back < high)).all())
    r = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert torch.allclose(to_raw(from_raw(r, "interval", low, high), "interval", low, high), r, atol=1e-12)


def test_greater_than_maps_into_range_and_round_trips() -> None:
    low = -1.5
    raw = torch.linspace(-30.0, 30.0, 61, dtype=torch.float64)
    v = from_raw(raw, "greater_than", low=low)
    assert bool((v > low).all())
    assert torch.allclose(v, low + torch.exp(raw), rtol=1e-15)
    near = torch.tensor([low + 1e-12, low + 1e-6, 0.0, 1e6], dtype=torch.float64)
    back = from_raw(to_raw(near, "greater_than", low=low), "greater_than", low=low)
    assert torch.allclose(back, near, rtol=1e-15, atol=4 * torch.finfo(torch.float64).eps * abs(low))
    assert bool((back > low).all())


def test_hparam_bounds_pick_the_constraint() -> None:
    h = hg.hparams.Hparam(0.9, low=0.5, high=1.0, shape=(2,), dtype=torch.float64)
    assert h.constraint is Constraint.INTERVAL and (h.low, h.high) == (0.5, 1.0)
    assert torch.allclose(h(), torch.full((2,), 0.9, dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(h.raw.detach(), torch.full((2,), math.log(0.4 / 0.1), dtype=torch.float64))
    with torch.no_grad():
        h.raw.fill_(100.0)  # any raw value stays inside the interval's closure
    assert float(h.value.max()) <= 1.0
    g = hg.hparams.Hparam(3.0, low=1.0, dtype=torch.float64)
    assert g.constraint is Constraint.GREATER_THAN and g.high is None
    assert float(g.raw.detach()) == pytest.approx(math.log(2.0), rel=1e-15)
    assert hg.hparams.Hparam(0.5).constraint is Constraint.POSITIVE
    explicit = hg.hparams.Hparam(0.5, "interval", low=0.0, high=2.0, dtype=torch.float64)
    assert float(explicit.value) == pytest.approx(0.5, rel=1e-15)
    assert "low=0.0, high=2.0" in repr(explicit)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init": 0.5, "low": 1.0, "high": 1.0}, "low < high"),
        ({"init": 0.5, "low": 2.0, "high": 1.0}, "low < high"),
        ({"init": 1.0, "low": 0.0, "high": 1.0}, r"Hparam init must lie in \(0.0, 1.0\)"),
        ({"init": 0.0, "low": 0.0, "high": 1.0}, "Hparam init must lie in"),
        ({"init": -1.0, "low": 0.0, "high": 1.0}, "Hparam init must lie in"),
        ({"init": 1.0, "low": 1.0}, r"Hparam init must be > 1.0"),
        ({"init": 0.5, "low": -math.inf, "high": 1.0}, "low must be finite"),
        ({"init": 0.5, "low": 0.0, "high": math.nan}, "high must be finite"),
        ({"init": 0.5, "low": math.nan}, "low must be finite"),
        ({"init": 0.5, "high": 1.0}, "needs both low and high"),
        ({"init": 0.5, "constraint": "interval"}, "needs both low and high"),
        ({"init": 0.5, "constraint": "interval", "low": 0.0}, "needs both low and high"),
        ({"init": 0.5, "constraint": "greater_than"}, "takes low only"),
        ({"init": 0.5, "constraint": "greater_than", "low": 0.0, "high": 1.0}, "takes low only"),
        ({"init": 0.5, "constraint": "unit", "low": 0.0, "high": 1.0}, "only apply to"),
        ({"init": 0.5, "constraint": "positive", "low": 0.0}, "only apply to"),
        ({"init": 0.5, "constraint": "real", "high": 1.0}, "only apply to"),
    ],
)
def test_hparam_bad_bounds_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hg.hparams.Hparam(**kwargs)


def test_raw_maps_refuse_missing_or_extra_bounds() -> None:
    x = torch.tensor([0.5])
    with pytest.raises(ValueError, match="needs both low and high"):
        from_raw(x, "interval")
    with pytest.raises(ValueError, match="only apply to"):
        to_raw(x, "unit", low=0.0)
    with pytest.raises(TypeError, match="low must be a real number"):
        hg.hparams.Hparam(0.5, low="a", high=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_weight_decay_max_penalty_is_half_sum_d_w2_with_d_in_0_max(per: str) -> None:
    model = _model().double()
    m = 0.5
    hp = hg.hparams.WeightDecay(model, per=per, init=0.2, max=m)
    assert hp.max == m
    for d in hp.decays().values():
        assert torch.allclose(d, torch.full_like(d, 0.2), rtol=1e-14)
    with torch.no_grad():  # spread the raw values, including far past the bound
        for r in hp.raw:
            r.copy_(torch.randn(r.shape, dtype=r.dtype) * 3)
        hp.raw[0].view(-1)[0] = 30.0
    decays = {n: m * torch.sigmoid(hp.raw[hp._index[n]].detach()) for n in hp.names}
    expected = 0.5 * sum((decays[n] * p.detach().square()).sum() for n, p in model.named_parameters())
    assert torch.allclose(hp.penalty(model).detach(), expected, rtol=1e-14)
    for n, d in hp.decays().items():
        assert torch.allclose(d, decays[n], rtol=1e-15)
    v = hp.value
    assert v.shape == (sum(r.numel() for r in hp.raw),)
    assert bool(((v > 0) & (v <= m)).all())
    assert torch.allclose(v, torch.cat([m * torch.sigmoid(r.detach()).reshape(-1) for r in hp.raw]))
    # gradient of the penalty w.r.t. raw: 0.5 w^2 * M s (1 - s)
    (g,) = torch.autograd.grad(hp.penalty(model), hp.raw[0])
    s = torch.sigmoid(hp.raw[0].detach())
    w2 = {n: p.detach().square() for n, p in model.named_parameters()}
    owned = [n for n in hp.names if hp._index[n] == 0]
    w2sum = w2[owned[0]] if per == "parameter" else sum(w2[n].sum() for n in owned)
    assert torch.allclose(g, 0.5 * w2sum * m * s * (1 - s), rtol=1e-12)
    assert "max=0.5" in repr(hp)


@pytest.mark.parametrize("init,m", [(0.5, 0.5), (1.0, 0.5), (0.0, 0.5)])
def test_weight_decay_init_must_lie_below_max(init: float, m: float) -> None:
    with pytest.raises(ValueError, match="Invalid weight decay init"):
        hg.hparams.WeightDecay(_model(), init=init, max=m)


@pytest.mark.parametrize("m", [0.0, -1.0, math.inf, math.nan])
def test_weight_decay_bad_max(m: float) -> None:
    with pytest.raises(ValueError, match="Invalid weight decay max"):
        hg.hparams.WeightDecay(_model(), init=1e-4, max=m)


def test_weight_decay_without_max_value_is_exp_raw() -> None:
    hp = hg.hparams.WeightDecay(_model().double(), per="parameter", init=0.3)
    assert hp.max is None
    with torch.no_grad():
        hp.raw[1].add_(1.0)
    expected = torch.cat([r.detach().exp().reshape(-1) for r in hp.raw])
    assert torch.allclose(hp.value, expected, rtol=1e-15)


# ---- logging: detached values, values(), summary() -----------------------------------------


def _containers() -> dict[str, nn.Module]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "Hparam": hg.hparams.Hparam(0.3, "unit"),
        "Hparam-interval": hg.hparams.Hparam(0.3, low=0.0, high=2.0),
        "Hparam-greater_than": hg.hparams.Hparam(0.3, low=0.1),
        "WeightDecay": hg.hparams.WeightDecay(model, per="global", init=0.1),
        "WeightDecay-max": hg.hparams.WeightDecay(model, per="parameter", init=0.1, max=1.0),
        "ExampleWeights": hg.hparams.ExampleWeights(1, init=0.25),
        "LearningRate": hg.hparams.LearningRate(opt),
        "Momentum": hg.hparams.Momentum(opt),
    }


@pytest.mark.parametrize(
    "name",
    list(_containers()),
)
def test_value_is_detached_and_float_does_not_warn(name: str) -> None:
    v = _containers()[name].value  # type: ignore[union-attr]
    assert isinstance(v, torch.Tensor) and not v.requires_grad and v.grad_fn is None
    float(v.reshape(-1)[0])  # warnings are errors in this suite


def test_forward_stays_differentiable() -> None:
    c = _containers()
    assert c["Hparam"]().requires_grad and c["Hparam-interval"]().requires_grad
    assert c["ExampleWeights"](torch.tensor([0])).requires_grad
    wd = c["WeightDecay-max"]
    assert isinstance(wd, hg.hparams.WeightDecay) and wd.penalty(_model()).requires_grad


def _logged_hparams() -> nn.ModuleDict:
    model = _model().double()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
        lr=0.1,
        momentum=0.9,
    )
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="parameter", init=1e-3, max=0.1),
            "global_wd": hg.hparams.WeightDecay(model, per="global", init=1e-2),
            "lr": hg.hparams.LearningRate(opt),
            "inner": nn.ModuleDict(
                {
                    "scale": hg.hparams.Hparam(2.0, low=1.0, dtype=torch.float64),
                    "vec": hg.hparams.Hparam(0.5, "unit", shape=(3,), dtype=torch.float64),
                }
            ),
            "w": hg.hparams.ExampleWeights(10, init=0.5, dtype=torch.float64),
            "loose": nn.ParameterDict(
                {
                    "t": nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64)),
                    "s": nn.Parameter(torch.tensor(4.0, dtype=torch.float64)),
                }
            ),
        }
    )
    with torch.no_grad():
        for p in hp.parameters():
            p.add_(torch.randn_like(p))
    return hp


def test_values_walks_nested_containers_and_loose_parameters() -> None:
    hp = _logged_hparams()
    vals = hg.hparams.values(hp)
    assert set(vals) == {"wd", "global_wd", "lr", "inner.scale", "inner.vec", "w", "loose.t", "loose.s"}
    assert all(not v.requires_grad for v in vals.values())
    wd = hp["wd"]
    assert torch.equal(vals["wd"], torch.cat([0.1 * torch.sigmoid(r.detach()).reshape(-1) for r in wd.raw]))
    assert torch.equal(vals["global_wd"], hp["global_wd"].raw[0].detach().exp().reshape(1))
    assert torch.equal(vals["lr"], hp["lr"].raw.detach().exp())
    assert torch.equal(vals["inner.scale"], 1.0 + hp["inner"]["scale"].raw.detach().exp())
    assert torch.equal(vals["inner.vec"], torch.sigmoid(hp["inner"]["vec"].raw.detach()))
    assert torch.equal(vals["w"], torch.sigmoid(hp["w"].raw.detach()))
    assert torch.equal(vals["loose.t"], hp["loose"]["t"].detach())
    # a container passed on its own is named "value"; a bare parameter module by its parameters
    assert list(hg.hparams.values(hp["w"])) == ["value"]
    assert set(hg.hparams.values(hp["loose"])) == {"t", "s"}


def test_summary_matches_torch_statistics() -> None:
    hp = _logged_hparams()
    out = hg.hparams.summary(hp)
    stats = ("mean", "min", "max", "std")
    expected: dict[str, float] = {}
    wd = torch.cat([0.1 * torch.sigmoid(r.detach()).reshape(-1) for r in hp["wd"].raw])
    lr = hp["lr"].raw.detach().exp()
    vec = torch.sigmoid(hp["inner"]["vec"].raw.detach())
    w = torch.sigmoid(hp["w"].raw.detach())
    t = hp["loose"]["t"].detach()
    for name, v in (("wd", wd), ("lr", lr), ("inner.vec", vec), ("w", w), ("loose.t", t)):
        for k, s in zip(stats, (v.mean(), v.min(), v.max(), v.std()), strict=True):
            expected[f"{name}.{k}"] = float(s)
    expected["global_wd"] = float(hp["global_wd"].raw[0].detach().exp())
    expected["inner.scale"] = float(1.0 + hp["inner"]["scale"].raw.detach().exp())
    expected["loose.s"] = float(hp["loose"]["s"].detach())
    assert set(out) == set(expected)
    assert all(type(v) is float for v in out.values())
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, rel=1e-12), k
    assert out["wd.max"] < 0.1 and out["wd.std"] > 0
    assert hg.hparams.summary(hp["global_wd"]) == {"value": pytest.approx(expected["global_wd"], rel=1e-12)}


def test_summary_of_float32_hparams_is_float64_and_warning_free() -> None:
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(_model(), per="layer", init=0.1)})
    with torch.no_grad():
        hp["wd"].raw[1].fill_(math.log(0.3))
    out = hg.hparams.summary(hp)
    assert list(out) == ["wd.mean", "wd.min", "wd.max", "wd.std"]
    assert out["wd.mean"] == pytest.approx(0.2, rel=1e-6)
    assert out["wd.std"] == pytest.approx(
        float(torch.tensor([0.1, 0.3], dtype=torch.float64).std()), rel=1e-6
    )


def test_summary_names_self_tuned_hyperparameters_and_their_scale() -> None:
    hp = torch.nn.ModuleDict(
        {
            "stn": hg.hparams.SelfTuned(
                dropout=hg.hparams.Rate(0.2, high=0.9), cut=hg.hparams.Integer(4, 0, 16)
            )
        }
    )
    s = hg.hparams.summary(hp)
    assert abs(s["stn.dropout"] - 0.2) < 1e-6 and s["stn.cut"] == 4.0
    assert abs(s["stn.sigma.mean"] - 0.5) < 1e-6 and "stn.raw" not in s and "stn.raw_scale.mean" not in s


def test_real_hparam_value_is_a_detached_copy() -> None:
    h = hg.hparams.Hparam(0.5, "real")
    v = h.value
    assert not v.requires_grad and v.data_ptr() != h.raw.data_ptr()
    v.add_(1.0)
    assert float(h.raw.detach()) == 0.5


def test_summary_gives_a_translation_range_in_pixels() -> None:
    hp = torch.nn.ModuleDict({"shift": hg.hparams.RandomTranslation((8, 8), init=0.5, max=4.0)})
    s = hg.hparams.summary(hp)
    assert set(s) == {"shift.mean", "shift.min", "shift.max", "shift.std"}
    assert abs(s["shift.mean"] - float(hp["shift"].value.mean())) < 1e-6


def test_a_learning_rate_changed_in_its_last_digits_is_named_with_every_digit():
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.01)
    lr = hg.hparams.LearningRate(opt, dtype=torch.float32)
    lr.write()
    written = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = written * (1 + 1e-12)  # e.g. a state_dict saved in another precision
    said = rf"was changed from {re.escape(repr(written))} to .*load_state_dict"
    with pytest.raises(ValueError, match=said):
        lr.check()


def test_example_weights_refuse_a_column_of_indices_that_would_broadcast_to_b_by_b():
    ew = hg.hparams.ExampleWeights(10)
    losses = torch.rand(4)
    assert (ew(torch.tensor([1, 2, 3, 4])) * losses).shape == (4,)
    with pytest.raises(ValueError, match=r"shape \(B,\); got \(4, 1\).*\(B, B\)"):
        ew(torch.tensor([[1], [2], [3], [4]]))
    assert ew(torch.tensor(3)).shape == ()  # one example, 0-dim, still fine


def test_per_layer_weight_decay_keeps_a_parametrised_layer_whole():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)),
        nn.ReLU(),
        parametrizations.orthogonal(nn.Linear(4, 4)),
        nn.Linear(4, 1),
    )
    wd = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    assert wd.layers == ("0", "2", "3")
    top = parametrizations.weight_norm(nn.Linear(2, 2))  # the root module parametrised
    assert hg.hparams.WeightDecay(top, per="layer").layers == ("",)
