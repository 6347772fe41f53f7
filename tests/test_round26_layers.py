"""Round 26, hg.nn layers and per-example helpers: new failure modes only.

Checked against independent references written here (plain torch layers with the weights built
by hand, torch.func.jvp, closed forms)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------ dropout at rates near 1


def test_dropout_rate_near_one_keeps_the_expectation_on_float32() -> None:
    """Inverted dropout must keep E[y] = x. torch's float32 uniforms are multiples of 2^-24, so
    ``u < keep`` holds with probability 2^-24 for every keep in (0, 2^-24]; a rate of 1 - 1e-12
    (a Python float, which the docstring says is kept as a valid float64 rate below 1; or a
    float64 SelfTuned driving a float32 model) kept each entry with probability 6e-8 and scaled
    the survivors by 1e12: the mean of 2^23 ones came out 1.2e5 instead of 1. With a correct
    keep probability a survivor is rare; whatever survives must be scaled so that the mean stays
    O(1) (2^23 samples: Poisson counts)."""
    assert bool(((torch.rand(4096) * 2**24) % 1 == 0).all())  # (the lattice the argument uses)
    x = torch.ones(1, 2**23)
    for rate in (1 - 1e-12, torch.tensor([1 - 1e-12], dtype=DT)):
        torch.manual_seed(1)  # (a seed where the current code lets one entry survive)
        y = hg.nn.dropout(x, rate)
        assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
        mean = float(y.double().mean())
        assert mean < 50.0, f"E[y] should be 1, the sample mean is {mean:.4g}"


# ------------------------------------------------------------------ grouped convolutions, hooks on .conv


def test_grouped_stn_conv_does_not_use_a_stale_hook_computed_weight() -> None:
    """``torch.nn.utils.weight_norm(layer.conv)`` (hook-based, as ``prune`` and the old
    ``spectral_norm``) recomputes ``conv.weight`` from ``weight_g`` / ``weight_v`` in a forward
    pre-hook. With ``groups=1`` the layer calls ``conv(x)`` and the hook runs; with ``groups > 1``
    it called ``conv._conv_forward`` with ``conv.weight`` directly: after ``g`` moved, the output
    was that of the weight at the time weight_norm was applied (1.7 off here), and a second
    training step failed with "modified by an inplace operation". Either the right output or a
    clear error naming the hooks."""
    torch.manual_seed(0)
    x, f = torch.randn(2, 4, 5, 5, dtype=DT), torch.zeros(1, dtype=DT)
    for groups in (1, 2):
        layer = hg.nn.StnConv2d(4, 6, 3, 1, padding=1, groups=groups, dtype=DT)
        with pytest.warns(FutureWarning):  # (deprecated, still torch's most used weight_norm)
            nn.utils.weight_norm(layer.conv)
        with torch.no_grad():
            layer.conv.weight_g.mul_(2.0)
        g, v = layer.conv.weight_g, layer.conv.weight_v
        w = g * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # g v / |v| per channel, by hand
        ref = torch.nn.functional.conv2d(x, w[:6], layer.conv.bias[:6], padding=1, groups=groups)
        try:
            y = layer(x, f)  # (features 0: the ordinary half only)
        except ValueError as e:
            assert groups != 1 and "hook" in str(e) and "parametriz" in str(e)
            continue
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_grouped_stn_conv_under_a_parametrize_weight_norm_follows_its_g_and_exports_it() -> None:
    # New (passes): the remedy the fix above names. torch.nn.utils.parametrizations.weight_norm
    # computes conv.weight on each access, so the grouped path (which reads conv.weight[:o] and
    # [o:] directly) and fixed() both see the current g, v.
    torch.manual_seed(0)
    x, f = torch.randn(2, 4, 5, 5, dtype=DT), torch.randn(1, dtype=DT)
    layer = hg.nn.StnConv2d(4, 6, 3, 1, padding=1, groups=2, padding_mode="reflect", dtype=DT)
    with torch.no_grad():
        layer.hnet.normal_()
    nn.utils.parametrizations.weight_norm(layer.conv)
    with torch.no_grad():
        layer.conv.parametrizations.weight.original0.mul_(3.0)  # g
    g, v = layer.conv.parametrizations.weight.original0, layer.conv.parametrizations.weight.original1
    w = g * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # by hand
    b = layer.conv.bias
    s = (layer.hnet @ f).reshape(1, -1, 1, 1)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    conv = torch.nn.functional.conv2d
    ref = conv(xp, w[:6], b[:6], groups=2) + s * conv(xp, w[6:], b[6:], groups=2)
    torch.testing.assert_close(layer(x, f), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.fixed(f)(x), ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ Delta-STN's linearised layers, directly


def _linearised(layer: nn.Module, x: torch.Tensor, xt: torch.Tensor, delta: torch.Tensor, *rest):
    import torch.autograd.forward_ad as fwAD

    from hypergrad._stn_hparams import Draw, linearising
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # (torch's one-off torch.jit.script deprecation warning, silenced)
    with fwAD.dual_level(), linearising():
        out = layer(fwAD.make_dual(x, xt), *rest, Draw(delta, {}, linear=True))
        out = out[0] if isinstance(out, tuple) else out
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def test_linearised_grouped_padded_convolutions_and_lstm_cell_match_torch_func_jvp() -> None:
    # New: the layers' own primal / tangent of Delta-STN's response step (output at Delta = 0,
    # JVP along (x', Delta)) checked directly against torch.func.jvp of the unlinearised layer,
    # for the grouped path (two convolutions), circular / reflect padding, low rank, and an LSTM
    # cell whose input carries a tangent (earlier tests: ungrouped zero-padded layers, or whole
    # STN runs).
    _linearised(hg.nn.StnLinear(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    torch.manual_seed(0)
    layers = [
        (hg.nn.StnConv2d(4, 6, 3, 2, padding=1, groups=2, padding_mode="circular", dtype=DT), (3, 4, 5, 5)),
        (
            hg.nn.StnConv1d(4, 6, 3, 2, padding="same", dilation=2, padding_mode="reflect", rank=2, dtype=DT),
            (3, 4, 9),
        ),
        (hg.nn.StnLinear(4, 5, 2, bias=False, rank=2, dtype=DT), (3, 4)),
    ]
    for layer, shape in layers:
        with torch.no_grad():
            layer.hnet.normal_()
        x, delta = torch.randn(shape, dtype=DT), torch.randn(3, 2, dtype=DT)
        xt = torch.randn_like(x)
        ref_p, ref_t, *_ = torch.func.jvp(layer, (x, torch.zeros_like(delta)), (xt, delta))
        p, t = _linearised(layer, x, xt, delta)
        torch.testing.assert_close(p, ref_p, rtol=0, atol=1e-13)
        torch.testing.assert_close(t, ref_t, rtol=1e-12, atol=1e-12)
        assert float(t.detach().abs().max()) > 1e-3  # (a tangent that matters)
    cell = hg.nn.StnLSTMCell(3, 4, 2, dtype=DT)
    with torch.no_grad():
        cell.gates.hnet.normal_()
    x, delta, xt = torch.randn(2, 3, dtype=DT), torch.randn(2, 2, dtype=DT), torch.randn(2, 3, dtype=DT)
    h, c = torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    ref_p, ref_t, *_ = torch.func.jvp(
        lambda a, f: cell(a, (h, c), f)[0], (x, torch.zeros_like(delta)), (xt, delta)
    )
    p, t = _linearised(cell, x, xt, delta, (h, c))
    torch.testing.assert_close(p, ref_p, rtol=0, atol=1e-13)
    torch.testing.assert_close(t, ref_t, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the LSTM recipe, misused


def test_lstm_cell_called_like_a_one_input_layer_says_where_the_hyperparameters_go() -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9))
    cell = hg.nn.StnLSTMCell(3, 4, hp.size)
    x = torch.randn(2, 3)
    for wrong in (hp, hp.draw(2), torch.zeros(1)):
        with pytest.raises(TypeError, match=r"StnLSTMCell needs the hyperparameters") as err:
            cell(x, wrong)
        assert "cell(x, state, hparams)" in str(err.value) and "layer(x, hparams)" not in str(err.value)
        assert "cell(x, None, hparams)" in str(err.value)
    h, c = cell(x, None, hp)  # (the right call)
    assert h.shape == c.shape == (2, 4)


# ------------------------------------------------------------------ augmentations in Delta-STN's JVP


def test_augmentations_carry_a_forward_mode_tangent_with_the_primals_own_draw() -> None:
    # New: in Delta-STN's response step the model runs on dual numbers, so the per-example
    # helpers see a tangent; each must apply to it the very mask / window / shift of the primal
    # (they are linear in x, noise aside): the tangent must be f(x + t) - f(x) under the same seed.
    import torch.autograd.forward_ad as fwAD

    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()
    x, t = torch.randn(4, 2, 6, 7, dtype=DT), torch.randn(4, 2, 6, 7, dtype=DT)
    helpers = {
        "dropout": lambda v: hg.nn.dropout(v, torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=DT)),
        "cutout": lambda v: hg.nn.cutout(v, torch.tensor([0, 2, 3, 20])),
        "random_shift": lambda v: hg.nn.random_shift(v, torch.tensor([0, 1, 3, 9])),
        "gaussian_noise": lambda v: hg.nn.gaussian_noise(v, torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=DT)),
    }
    for name, f in helpers.items():
        torch.manual_seed(7)
        plain = f(x)
        torch.manual_seed(7)
        moved = f(x + t)
        torch.manual_seed(7)
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t)))
        assert torch.equal(primal, plain), name
        assert tangent is not None, name
        torch.testing.assert_close(tangent, moved - plain, rtol=1e-12, atol=1e-12, msg=name)
        if name != "gaussian_noise":
            assert bool((tangent == 0).any()) and bool((tangent != 0).any()), name  # (a mask that acts)


# ------------------------------------------------------------------ NumPy integers as layer arguments


def test_stn_layers_take_numpy_integer_rank_and_groups_like_n_hparams() -> None:
    """A sweep grid built with NumPy (np.arange, a pandas column) hands np.int64 values: the
    layers took them for n_hparams (and HyperNet for rank, nn.Conv2d for groups) but refused
    them for rank and groups with a message quoting a valid-looking 2."""
    np = pytest.importorskip("numpy")
    two = np.int64(2)
    lin = hg.nn.StnLinear(4, 3, n_hparams=two, rank=two)
    assert lin.rank == 2 and type(lin.rank) is int and lin.weight.shape == (3 + 2, 4)
    conv = hg.nn.StnConv2d(4, 6, 3, two, groups=two, padding=1)
    assert conv.conv.groups == 2 and conv(torch.randn(1, 4, 5, 5), torch.zeros(2)).shape == (1, 6, 5, 5)
    low = hg.nn.StnConv1d(4, 6, 3, two, rank=np.int32(3))
    assert low.rank == 3 and low.hyper_out is not None and low.hyper_out.shape == (6, 3)
    cell = hg.nn.StnLSTMCell(3, 4, two, rank=two)
    assert cell.gates.rank == 2
    bad: Any
    for bad in (0, True, 1.5, np.float64(2.0)):  # (still refused)
        with pytest.raises(ValueError, match="rank must be an int >= 1"):
            hg.nn.StnLinear(4, 3, 2, rank=bad)
        with pytest.raises(ValueError, match="groups must be an int >= 1"):
            hg.nn.StnConv2d(4, 4, 3, 2, groups=bad)
