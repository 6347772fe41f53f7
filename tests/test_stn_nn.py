"""hg.nn (STN layers, per-example augmentations) and the self-tuning hyperparameter containers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad._stn_hparams import _Mode

DT = torch.float64


# ----------------------------------------------------------------------------- layer equivalence


def _randomise(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)


@pytest.mark.parametrize("rank", [None, 2])
def test_stn_linear_at_fixed_hyperparameters_is_a_linear_layer(rank: int | None) -> None:
    layer = hg.nn.StnLinear(5, 4, n_hparams=3, rank=rank).to(DT)
    _randomise(layer)
    x = torch.randn(6, 5, dtype=DT)
    lam = torch.randn(6, 3, dtype=DT)  # a different lambda per example
    out = layer(x, lam)
    w_h, b_h = layer.weight[4:].detach(), layer.bias[4:].detach()  # type: ignore[index]
    if rank is not None:
        assert layer.hyper_out is not None and w_h.shape == (rank, 5)
        w_h, b_h = layer.hyper_out.detach() @ w_h, layer.hyper_out.detach() @ b_h
    for i in range(6):
        ref = nn.Linear(5, 4).to(DT)
        s = layer.hnet.detach() @ lam[i]
        with torch.no_grad():  # W = W_e + diag(V lam) W_h, b = b_e + (V lam) * b_h, copied by hand
            ref.weight.copy_(layer.weight[:4] + s[:, None] * w_h)
            ref.bias.copy_(layer.bias[:4] + s * b_h)
        torch.testing.assert_close(out[i], ref(x[i : i + 1])[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(layer.fixed(lam[i])(x[i : i + 1])[0], out[i], rtol=1e-13, atol=1e-13)


def test_stn_linear_with_a_zero_response_is_its_elementary_layer() -> None:
    layer = hg.nn.StnLinear(5, 4, n_hparams=2).to(DT)
    with torch.no_grad():
        layer.hnet.zero_()
    ref = nn.Linear(5, 4).to(DT)
    with torch.no_grad():
        ref.weight.copy_(layer.weight[:4])
        ref.bias.copy_(layer.bias[:4])
    x = torch.randn(3, 5, dtype=DT)
    assert torch.equal(layer(x, torch.randn(3, 2, dtype=DT)), ref(x))


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("dims", [1, 2])
def test_stn_conv_at_fixed_hyperparameters_is_a_convolution(dims: int, rank: int | None) -> None:
    cls, plain = (hg.nn.StnConv2d, nn.Conv2d) if dims == 2 else (hg.nn.StnConv1d, nn.Conv1d)
    layer = cls(3, 5, 3, n_hparams=2, stride=1, padding=1, rank=rank).to(DT)
    _randomise(layer)
    shape = (4, 3) + (7,) * dims
    x = torch.randn(shape, dtype=DT)
    lam = torch.randn(4, 2, dtype=DT)
    out = layer(x, lam)
    w = layer.conv.weight.detach()
    w_h, b_h = w[5:], layer.conv.bias.detach()[5:]  # type: ignore[index]
    if rank is not None:  # W_h = U P, by hand: U (5, r), P the r hyper channels
        assert layer.hyper_out is not None and w.shape[0] == 5 + rank
        u = layer.hyper_out.detach()
        w_h, b_h = torch.einsum("or,r...->o...", u, w_h), u @ b_h
    for i in range(4):
        ref = plain(3, 5, 3, padding=1).to(DT)
        s = layer.hnet.detach() @ lam[i]
        with torch.no_grad():
            ref.weight.copy_(w[:5] + s.reshape((5,) + (1,) * (dims + 1)) * w_h)
            ref.bias.copy_(layer.conv.bias[:5] + s * b_h)  # type: ignore[index]
        torch.testing.assert_close(out[i], ref(x[i : i + 1])[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.fixed(lam[i])(x[i : i + 1])[0], out[i], rtol=1e-12, atol=1e-12)


def test_lstm_cell_at_zero_response_is_an_lstm_cell() -> None:
    cell = hg.nn.StnLSTMCell(3, 4, n_hparams=2).to(DT)
    with torch.no_grad():
        cell.gates.hnet.zero_()
    ref = nn.LSTMCell(3, 4).to(DT)
    with torch.no_grad():
        w = cell.gates.weight[:16]
        ref.weight_ih.copy_(w[:, :3])
        ref.weight_hh.copy_(w[:, 3:])
        ref.bias_ih.copy_(cell.gates.bias[:16])  # type: ignore[index]
        ref.bias_hh.zero_()
    x, h, c = (torch.randn(5, k, dtype=DT) for k in (3, 4, 4))
    out = cell(x, (h, c), torch.randn(5, 2, dtype=DT))
    for a, b in zip(out, ref(x, (h, c)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("rank", [None, 3])
def test_lstm_cell_at_fixed_hyperparameters_is_an_lstm_cell(rank: int | None) -> None:
    cell = hg.nn.StnLSTMCell(3, 4, n_hparams=2, rank=rank).to(DT)
    _randomise(cell)
    assert cell.gates.rank == rank
    lam = torch.randn(2, dtype=DT)
    fixed = cell.gates.fixed(lam)  # the gates at lambda: W = W_e + diag(V lam) W_h
    ref = nn.LSTMCell(3, 4).to(DT)
    with torch.no_grad():
        ref.weight_ih.copy_(fixed.weight[:, :3])
        ref.weight_hh.copy_(fixed.weight[:, 3:])
        ref.bias_ih.copy_(fixed.bias)
        ref.bias_hh.zero_()
    x, h, c = (torch.randn(5, k, dtype=DT) for k in (3, 4, 4))
    out = cell(x, (h, c), lam.expand(5, -1))
    for a, b in zip(out, ref(x, (h, c)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layers_name_a_hyperparameter_count_mismatch() -> None:
    layer = hg.nn.StnLinear(4, 3, n_hparams=3)
    with pytest.raises(ValueError, match=r"n_hparams=3.*\(5, 2\)"):
        layer(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="4 rows of hyperparameters for a batch of 5"):
        layer(torch.randn(5, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="SelfTuned"):
        layer(torch.randn(5, 4), [0.1, 0.2, 0.3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_hparams must be an int >= 1"):
        hg.nn.StnLinear(4, 3, n_hparams=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"StnConv2d: rank must be an int >= 1 or None"):
            hg.nn.StnConv2d(2, 3, 3, n_hparams=1, rank=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "spec",
    [
        hg.hparams.Rate(0.1, high=0.9),
        hg.hparams.Rate(0.3, low=0.2, high=0.5),
        hg.hparams.Positive(0.2),
        hg.hparams.Positive(3.0, transform="exp"),
    ],
    ids=["rate", "rate-interval", "softplus", "exp"],
)
def test_continuous_transforms_map_into_range_and_round_trip(spec) -> None:
    raw = torch.linspace(-15, 15, 301, dtype=DT)
    v = spec.value(raw)
    if isinstance(spec, hg.hparams.Rate):
        assert bool(((v > spec.low) & (v < spec.high)).all())
    else:
        assert bool((v > 0).all())
    torch.testing.assert_close(spec.raw(v), raw, rtol=1e-9, atol=1e-9)
    init = torch.tensor(spec.init, dtype=DT)
    assert math.isclose(float(spec.value(spec.raw(init))), spec.init, rel_tol=1e-12)


def test_rates_stay_strictly_inside_where_the_sigmoid_saturates() -> None:
    rate = hg.hparams.Rate(0.5)  # (0, 1): a dropout rate of exactly 1 would divide by zero
    v = rate.value(torch.tensor([-100.0, 40.0]))  # float32: sigmoid rounds to 0 and 1
    assert 0 < float(v[0]) and float(v[1]) < 1
    x = hg.nn.dropout(torch.ones(2, 5), v)
    assert bool(torch.isfinite(x).all())


def test_integers_floor_correctly_and_every_value_is_reachable() -> None:
    spec = hg.hparams.Integer(4, 0, 16)
    raw = torch.linspace(-40, 40, 20001, dtype=DT)
    v = spec.value(raw)
    c = spec.continuous(raw)
    assert bool(((v >= 0) & (v <= 16)).all())
    assert torch.equal(v, torch.floor(c).clamp(0, 16))
    assert sorted(set(v.long().tolist())) == list(range(17))
    for k in range(17):  # each integer's own raw value, and the edges of its interval
        assert int(spec.value(spec.raw(torch.tensor(float(k), dtype=DT)))) == k
        edge = torch.tensor(k / 17, dtype=DT)  # sigma(r) at the interval's left edge
        r = torch.logit(edge + 1e-9) if k else torch.tensor(-50.0, dtype=DT)
        assert int(spec.value(r)) == k
    assert int(spec.value(torch.tensor(1e4, dtype=DT))) == 16  # sigma(r) == 1 exactly: clamped


def test_out_of_range_specs_are_named() -> None:
    with pytest.raises(ValueError, match=r"init=0\.95 is out of range.*\(0, 0\.9\)"):
        hg.hparams.Rate(0.95, high=0.9)
    with pytest.raises(ValueError, match=r"0 <= low < high <= 1"):
        hg.hparams.Rate(0.5, high=1.5)
    with pytest.raises(ValueError, match=r"init=0 is out of range"):
        hg.hparams.Rate(0, high=0.9)
    with pytest.raises(ValueError, match=r"init=-1 is out of range; it must be > 0"):
        hg.hparams.Positive(-1)
    with pytest.raises(ValueError, match=r"init=20 is out of range \[0, 16\]"):
        hg.hparams.Integer(20, 0, 16)
    with pytest.raises(ValueError, match="must be an integer"):
        hg.hparams.Integer(2.5, 0, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'softmax' is not a valid PositiveTransform"):
        hg.hparams.Positive(1.0, transform="softmax")
    with pytest.raises(ValueError, match="is not a hg.hparams.Rate"):
        hg.hparams.SelfTuned(p=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        hg.hparams.SelfTuned()
    with pytest.raises(ValueError, match=r"scale=5 is out of range"):
        hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5), scale=5)


def test_sigma_stays_in_range_whatever_the_outer_step() -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5), scale_range=(0.05, 2.0), dtype=DT)
    for value in (-1e6, 1e6, 0.0):
        with torch.no_grad():
            hp.raw_scale.fill_(value)
        s = hp.scale()
        assert bool(((s >= 0.05) & (s <= 2.0)).all()) and bool(torch.isfinite(hp.entropy()))


def test_draws_are_shared_within_a_step_and_fresh_across_steps() -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5), k=hg.hparams.Integer(3, 0, 8), dtype=DT)
    assert torch.equal(hp.draw(4).features, hp.raw.detach().expand(4, -1))  # outside: the mean
    with hp._drawing(_Mode.TRAIN):
        a, b = hp.draw(4), hp.draw(4)
        assert a is b and not a.features.requires_grad
        assert a["k"].dtype == torch.long and a["p"].shape == (4,)
    with hp._drawing(_Mode.TRAIN):
        assert not torch.equal(hp.draw(4).features, a.features)
    with pytest.raises(KeyError, match="no hyperparameter 'q'"):
        a["q"]


# ----------------------------------------------------------------------------- augmentations


def test_dropout_uses_each_examples_rate_and_checks_it() -> None:
    x = torch.ones(3, 20000, dtype=DT)
    y = hg.nn.dropout(x, torch.tensor([0.0, 0.25, 0.75]))
    kept = (y != 0).double().mean(1)
    assert float(kept[0]) == 1.0 and abs(float(kept[1]) - 0.75) < 0.02 and abs(float(kept[2]) - 0.25) < 0.02
    torch.testing.assert_close(y.mean(1), torch.ones(3, dtype=DT), rtol=0.05, atol=0.05)
    assert torch.equal(hg.nn.dropout(x, torch.tensor([0.5] * 3), training=False), x)
    with pytest.raises(ValueError, match=r"rates must lie in \[0, 1\)"):
        hg.nn.dropout(x, torch.tensor([0.0, 1.0, 0.2]))
    with pytest.raises(ValueError, match=r"one value per example, shape \(3,\)"):
        hg.nn.dropout(x, torch.tensor([0.1, 0.2]))


def test_cutout_zeroes_at_most_size_positions_per_example() -> None:
    x = torch.ones(200, 2, 30)
    size = torch.arange(200) % 12
    y = hg.nn.cutout(x, size)
    zeros = (y[:, 0] == 0).sum(1)
    assert bool((zeros <= size).all()) and bool((y[:, 0] == y[:, 1]).all())  # one window per example
    inside = (zeros == size).float().mean()
    assert float(inside) > 0.5  # windows away from the border are whole
    img = hg.nn.cutout(torch.ones(50, 1, 9, 9), torch.full((50,), 3))
    assert bool(((img == 0).sum((1, 2, 3)) <= 9).all()) and int((img == 0).sum()) > 0
    with pytest.raises(ValueError, match="sizes must be integers"):
        hg.nn.cutout(x, torch.full((200,), 2.5))


def test_random_shift_shifts_each_example_within_its_range() -> None:
    x = torch.arange(1.0, 21.0).expand(300, 20).clone()
    m = torch.arange(300) % 5
    y = hg.nn.random_shift(x, m)
    for i in range(300):
        ok = []
        for k in range(-int(m[i]), int(m[i]) + 1):
            ref = torch.zeros(20)
            if k >= 0:
                ref[k:] = x[i, : 20 - k]
            else:
                ref[:k] = x[i, -k:]
            ok.append(torch.equal(y[i], ref))
        assert any(ok), i
    assert torch.equal(y[m == 0], x[m == 0])


def test_gaussian_noise_scale_per_example() -> None:
    y = hg.nn.gaussian_noise(torch.zeros(2, 50000, dtype=DT), torch.tensor([0.5, 0.0]))
    assert abs(float(y[0].std()) - 0.5) < 0.01 and float(y[1].abs().max()) == 0.0
    with pytest.raises(ValueError, match="std must be >= 0"):
        hg.nn.gaussian_noise(torch.zeros(2, 3), torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: (hg.nn.StnLinear(5, 6, 2), hg.nn.StnLinear(6, 3, 2)), (4, 5)),
        (lambda: (hg.nn.StnLinear(5, 6, 2, rank=2), hg.nn.StnLinear(6, 3, 2, rank=3)), (4, 5)),
        (
            lambda: (hg.nn.StnConv2d(2, 3, 3, 2, padding=1), hg.nn.StnConv2d(3, 2, 3, 2, stride=2)),
            (4, 2, 6, 6),
        ),
        (lambda: (hg.nn.StnConv1d(2, 3, 3, 2, padding=1), hg.nn.StnConv1d(3, 2, 3, 2)), (4, 2, 9)),
    ],
    ids=["linear", "low-rank", "conv2d", "conv1d"],
)
def test_layers_linearise_their_output_like_forward_mode_ad(make, shape) -> None:
    """Delta-STN's response step: inside the linearised model call the layers compute primal and
    tangent themselves; both equal torch.func.jvp of the plain network in the perturbation."""
    import torch.autograd.forward_ad as fwAD

    from hypergrad._stn_hparams import Draw, linearising
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # torch 2.13 warns (jit deprecation) the first time forward AD loads
    torch.manual_seed(0)
    first, second = (m.to(DT) for m in make())
    for layer in (first, second):
        with torch.no_grad():
            layer.hnet.normal_(0, 0.5)
    x, delta = torch.randn(*shape, dtype=DT), torch.randn(shape[0], 2, dtype=DT)

    def net(features: torch.Tensor | Draw) -> torch.Tensor:
        return second(torch.tanh(first(x, features)), features)

    primal, tangent = torch.func.jvp(net, (torch.zeros_like(delta),), (delta,))
    with fwAD.dual_level(), linearising():
        out = net(Draw(delta, {}, linear=True))
        fast_primal, fast_tangent = fwAD.unpack_dual(out)
    torch.testing.assert_close(fast_primal, primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_tangent, tangent, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((fast_primal + fast_tangent).square().sum(), list(first.parameters()))
    ref = torch.autograd.grad((primal + tangent).square().sum(), list(first.parameters()))
    for a, b in zip(grads, ref, strict=True):  # and reverse mode through both
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- per-batch perturbation


def test_per_batch_specs_share_one_perturbation_and_leave_the_others_and_the_stream_alone() -> None:
    """``per_batch=True`` (the authors' ``minibatch=False``): every example of a training or
    validation draw shares those entries; the others are perturbed per example with exactly the
    noise they had without the option (same random stream)."""
    specs = {"p": hg.hparams.Rate(0.3, high=0.9, size=2), "n": hg.hparams.Positive(0.5)}
    plain = hg.hparams.SelfTuned(dtype=DT, **specs)
    batched = hg.hparams.SelfTuned(
        dtype=DT, p=specs["p"], n=hg.hparams.Positive(0.5, per_batch=True)
    )
    for mode in (_Mode.TRAIN, _Mode.VAL):
        torch.manual_seed(3)
        with plain._drawing(mode):
            a = plain.draw(6)
        torch.manual_seed(3)
        with batched._drawing(mode):
            b = batched.draw(6)
        assert torch.equal(a.features[:, :2], b.features[:, :2])  # per-example entries unchanged
        assert torch.equal(b.features[:, 2], b.features[:1, 2].expand(6))  # one draw for the batch
        assert torch.equal(b.features[0], a.features[0])  # (the first example's noise)
        assert len(set(b["n"].tolist())) == 1 and len(set(a["n"].tolist())) == 6
        assert len(set(b["p"][:, 0].tolist())) == 6
    with batched._drawing(_Mode.VAL):  # still differentiable w.r.t. lambda and sigma
        f = batched.draw(5).features
    g_raw, g_scale = torch.autograd.grad(f[:, 2].sum(), [batched.raw, batched.raw_scale])
    assert float(g_raw[2]) == 5.0 and float(g_raw[:2].abs().sum()) == 0.0 and float(g_scale[2]) != 0.0
    with pytest.raises(ValueError, match="per_batch must be True or False"):
        hg.hparams.Integer(2, 0, 4, per_batch=1)  # type: ignore[arg-type]


def test_per_batch_is_part_of_the_spec_a_state_is_checked_against() -> None:
    loss = lambda m, h, b: (m(b[0], h) ** 2).mean()  # noqa: E731

    def hopt(hp: hg.hparams.SelfTuned) -> hg.SelfTuning:
        torch.manual_seed(0)
        model = hg.nn.StnLinear(2, 2, hp.size)
        return hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )

    state = hopt(hg.hparams.SelfTuned(n=hg.hparams.Positive(0.5))).state_dict()
    hopt(hg.hparams.SelfTuned(n=hg.hparams.Positive(0.5))).load_state_dict(state)  # same specs
    with pytest.raises(ValueError, match="per_batch=True"):
        hopt(hg.hparams.SelfTuned(n=hg.hparams.Positive(0.5, per_batch=True))).load_state_dict(state)


@pytest.mark.parametrize(
    "layer, x",
    [
        (lambda: hg.nn.StnLinear(3, 2, n_hparams=1), torch.randn(4, 3)),
        (lambda: hg.nn.StnConv1d(1, 2, 3, n_hparams=1), torch.randn(4, 1, 8)),
        (lambda: hg.nn.StnConv2d(1, 2, 3, n_hparams=1), torch.randn(4, 1, 6, 6)),
    ],
)
def test_an_stn_layer_inside_nn_sequential_says_it_needs_the_hyperparameters(layer, x):
    net = torch.nn.Sequential(layer(), torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"needs the hyperparameters: call it as layer\(x, hparams\)"):
        net(x)
    cell = hg.nn.StnLSTMCell(3, 2, n_hparams=1)
    with pytest.raises(TypeError, match="StnLSTMCell needs the hyperparameters"):
        cell(torch.randn(4, 3), None)
