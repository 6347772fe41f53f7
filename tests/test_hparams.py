"""Hyperparameter containers: values, constraints, penalties and the errors for bad values."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("c", list(Constraint))
def test_constraints_round_trip(c: Constraint) -> None:
    value = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(from_raw(to_raw(value, c), c), value, rtol=1e-14)


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
