"""hg.nn's per-example augmentations and hg.nn.HyperNet / hg.BestResponse, as other libraries test
theirs (torch's dropout tests, torchvision's RandomErasing, the STN authors' scripts).

What is checked, and against what:

* dropout: the expectation and the keep fraction in float16 / bfloat16 (statistically, fixed seed,
  tolerances a bias would fail), rates near 1 in half precision, the exact 1/(1 - p) scaling and
  its gradient in float32 / float64 for every way of giving the rates;
* cutout / random_shift: inputs with inf kept finite where they were, channels_last kept,
  sizes far beyond the image, eval mode as the identity (``x`` itself);
* HyperNet: frozen base parameters (not generated, not trained, saved), buffers a module reassigns,
  bases mixing dtypes, a float32 hypernetwork on a float64 base, tied weights, bad arguments;
* BestResponse: the hypergradient through a low-rank hypernetwork around a BatchNorm base against
  central differences in float64, with local and global sampling.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64


# ------------------------------------------------------------------ dropout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_dropout_keeps_the_expectation_in_half_precision(dtype: torch.dtype, p: float) -> None:
    """A keep probability compared against float16 / bfloat16 uniforms was quantised: in bfloat16
    at p = 0.9 the mean came out 1.023 (keep fraction 0.1036), at p = 0.99 1.17."""
    torch.manual_seed(0)
    n = 1_000_000
    y = hg.nn.dropout(torch.ones(1, n, dtype=dtype), p).double()
    sd = ((p / (1 - p)) / n) ** 0.5  # std of the mean of n scaled Bernoullis
    assert y.dtype == torch.float64 and abs(float(y.mean()) - 1) < 5 * sd + 2e-3  # (+ 1/keep rounding)
    kept = float((y != 0).double().mean())
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p)) / n) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_rates_near_one_are_valid_in_half_precision(dtype: torch.dtype) -> None:
    """The rate was rounded to x's dtype before the range check: 0.9999 (fp16) and 0.999 (bf16)
    became 1.0 and a valid rate was refused."""
    torch.manual_seed(0)
    x = torch.ones(8, 4000, dtype=dtype)
    for rate in (0.999, 0.9999, torch.full((8,), 0.9999, dtype=DT)):
        y = hg.nn.dropout(x, rate)
        assert y.dtype == dtype and y.shape == x.shape and bool(torch.isfinite(y).all())
        assert float((y != 0).float().mean()) < 0.01
    assert bool((hg.nn.dropout(torch.ones(2, 3, dtype=DT), 1 - 1e-12) >= 0).all())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hg.nn.dropout(x, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "rate",
    [
        lambda: torch.tensor([0.0, 0.25, 0.5, 0.75]),
        lambda: torch.tensor(0.5, dtype=DT),
        lambda: 0.5,
        lambda: torch.tensor([0, 0, 0, 0]),
        lambda: 0,
    ],
)
def test_dropout_scales_survivors_by_exactly_one_over_keep(dtype: torch.dtype, rate: Any) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    r = rate()
    y = hg.nn.dropout(x, r)
    p = torch.as_tensor(r, dtype=DT).expand(4).reshape(4, 1, 1, 1)
    keep = (1 - p).to(dtype)
    mask = y != 0
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.where(mask, x / keep, 0), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, mask / keep, rtol=0, atol=0)
    assert bool(mask[p.expand_as(x) == 0].all())
    # eval mode: x itself, not a copy
    assert hg.nn.dropout(x, r, training=False) is x


# ------------------------------------------------------------------ cutout, random_shift


def test_random_shift_fills_with_zeros_not_with_nan_where_x_holds_inf() -> None:
    """The zero fill was a product, ``inf * 0 = nan``: an infinite entry shifted out of the window
    turned the filled positions into nan."""
    torch.manual_seed(0)
    x = torch.tensor([[1.0, 2.0, float("inf")], [float("-inf"), 5.0, 6.0]]).repeat(50, 1)
    y = hg.nn.random_shift(x, 2)
    assert not bool(torch.isnan(y).any())
    for row_x, row_y in zip(x, y, strict=True):  # each row is x shifted by some s in {-2..2}
        assert any(
            torch.equal(row_y, torch.cat([row_x, torch.zeros(3)])[(torch.arange(3) - s) % 6])
            for s in range(-2, 3)
        )


def test_cutout_and_random_shift_keep_channels_last() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6).to(memory_format=torch.channels_last)
    for f in (hg.nn.cutout, hg.nn.random_shift):
        y = f(x, torch.tensor([0, 2, 3]))
        assert y.is_contiguous(memory_format=torch.channels_last), f.__name__
        assert torch.equal(y[0], x[0])
    v = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    assert hg.nn.random_shift(v, 1).is_contiguous(memory_format=torch.channels_last_3d)


def test_sizes_far_beyond_the_image_act_like_any_size_that_covers_it() -> None:
    """A whole-valued float of 1e30 was cast to int64 and refused as 'min -9223372036854775808'."""
    torch.manual_seed(0)
    x = torch.ones(4, 2, 5, 7)
    for size in (1e30, 2**62, torch.tensor([1e30, 15.0, 2**62, 14.0])):
        assert float(hg.nn.cutout(x, size).abs().sum()) == 0  # >= 2 max(H, W): always all of it
        assert float(hg.nn.cutout(x[:, 0, 0], size).abs().sum()) == 0
    y = hg.nn.random_shift(torch.ones(200, 5), 1e30)
    assert float(y.sum()) == 0  # |shift| < 5 has probability ~1e-29
    y = hg.nn.random_shift(torch.ones(200, 5), 2**62)  # (2m + 1 overflowed int64)
    assert float(y.sum()) == 0
    with pytest.raises(ValueError, match="integers"):
        hg.nn.cutout(x, 2.5)
    with pytest.raises(ValueError, match=">= 0"):
        hg.nn.random_shift(x, -1.0)


def test_gaussian_noise_names_a_std_that_overflows_half_precision() -> None:
    """std was checked after the cast to float16: a finite 1e6 became inf and was refused as
    'must be finite, got range [inf, inf]'."""
    x = torch.zeros(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="std 1000000.0 overflows x's dtype, torch.float16"):
        hg.nn.gaussian_noise(x, 1e6)
    with pytest.raises(ValueError, match=">= 0 and finite"):
        hg.nn.gaussian_noise(x, torch.tensor([1.0, -1.0]))
    assert hg.nn.gaussian_noise(x, torch.tensor([0, 1])).dtype == torch.float16  # integer stds


def test_augmentations_are_the_identity_in_eval_mode_and_reproducible_under_a_seed() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    helpers = ((hg.nn.dropout, 0.5), (hg.nn.gaussian_noise, 1.0), (hg.nn.cutout, 4), (hg.nn.random_shift, 2))
    for f, v in helpers:
        assert f(x, v, training=False) is x  # type: ignore[operator]
        torch.manual_seed(3)
        a = f(x, v)  # type: ignore[operator]
        torch.manual_seed(3)
        assert torch.equal(a, f(x, v)) and a.dtype == x.dtype  # type: ignore[operator]


# ------------------------------------------------------------------ HyperNet


def test_frozen_base_parameters_are_neither_generated_nor_trained() -> None:
    """A frozen backbone (requires_grad=False) was folded into the generated weights, trained by
    the inner optimiser and moved by the response."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    base[0].requires_grad_(False)
    frozen = base[0].weight.detach().clone()
    hp = hg.hparams.SelfTuned(a=hg.hparams.Positive(0.5, transform="exp"), learn_scale=False, dtype=DT)
    net = hg.nn.HyperNet(base, hp.size)
    assert net.names == ("2.weight", "2.bias") and net.base_weights.numel() == 5
    assert {"base_state.0.weight", "base_state.0.bias"} <= set(net.state_dict())
    w = net.weights(torch.zeros(1, dtype=DT))
    assert torch.equal(w["0.weight"], frozen) and set(w) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    loss = lambda m, h, b: ((m(b[0], hparams=h) - b[1]) ** 2).mean()  # noqa: E731
    hopt = hg.BestResponse(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        b = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
        hopt.step(b)
        hopt.hyper_step(val_batch=b)
    assert torch.equal(net.weights(hp.raw.detach())["0.weight"], frozen)
    assert torch.equal(base[0].weight, frozen)
    with pytest.raises(ValueError, match="frozen"):
        hg.nn.HyperNet(nn.Linear(2, 2).requires_grad_(False), 1)


class _RunningMean(nn.Module):
    """A module that *reassigns* its buffer (``self.mean = ...``), as hand-written normalisers do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("mean", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.training:
            self.mean = 0.5 * self.mean + 0.5 * y.detach().mean(0)
        return y - self.mean


def test_a_buffer_the_base_reassigns_is_kept() -> None:
    """The reassigned tensor was dropped when the substitution was undone: the statistic never moved."""
    torch.manual_seed(0)
    base = _RunningMean()
    net = hg.nn.HyperNet(base, 1)
    x = torch.randn(5, 2)
    plain = copy.deepcopy(base)  # at lambda = 0 the generated weights are base's own
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(net(x, hparams=torch.zeros(1)), plain(x))
        torch.testing.assert_close(net.base_state.get_buffer("mean"), plain.mean)
        assert float(plain.mean.abs().min()) > 0
        assert torch.equal(base.mean, torch.zeros(2))  # the template stays untouched
        assert torch.equal(net.state_dict()["base_state.mean"], plain.mean)
        net.eval()
        plain.eval()
        torch.testing.assert_close(net(x, hparams=torch.zeros(1)), plain(x))
    # through BestResponse: the inner steps move it, the (eval-mode) hypersteps leave it
    hp = hg.hparams.SelfTuned(a=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False)
    net.train()
    loss = lambda m, h, b: ((m(b[0], hparams=h) - b[1]) ** 2).mean()  # noqa: E731
    hopt = hg.BestResponse(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    before = net.base_state.get_buffer("mean").clone()
    hopt.step((torch.randn(4, 2), torch.randn(4, 2)))
    moved = net.base_state.get_buffer("mean").clone()
    assert not torch.equal(moved, before)
    hopt.hyper_step(val_batch=(torch.randn(4, 2), torch.randn(4, 2)))
    assert torch.equal(net.base_state.get_buffer("mean"), moved)
    assert torch.equal(hopt.state_dict()["model"]["base_state.mean"], moved)


def test_generated_weights_keep_each_parameter_dtype_and_follow_a_cast() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2).to(DT)
            self.b = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x.to(DT)).float())

    net = hg.nn.HyperNet(Mixed(), 2, rank=1)
    w = net.weights(torch.zeros(2))
    assert (w["a.weight"].dtype, w["b.weight"].dtype) == (DT, torch.float32)
    assert net(torch.randn(4, 3), hparams=torch.ones(2)).dtype == torch.float32  # (was a dtype error)
    net.double()
    assert all(t.dtype == DT for t in net.weights(torch.zeros(2)).values())
    net.float()
    assert all(t.dtype == torch.float32 for t in net.weights(torch.zeros(2)).values())
    assert net.base_weights.dtype == torch.float32


def test_a_float32_hypernetwork_drives_a_float64_base() -> None:
    """lambda was cast to the base's float64 before a float32 response: 'mat1 and mat2 must have
    the same dtype'."""
    torch.manual_seed(0)
    net = hg.nn.HyperNet(nn.Linear(2, 1).to(DT), 1, hypernet=nn.Linear(1, 3))
    out = net(torch.randn(4, 2, dtype=DT), hparams=torch.ones(1, dtype=DT))
    assert out.dtype == DT and net.flat(torch.ones(1)).dtype == DT
    out.sum().backward()
    assert net.response is not None and net.response.weight.grad is not None  # type: ignore[union-attr]


def test_tied_weights_are_generated_once_and_act_everywhere() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3, bias=False)
            self.dec = nn.Linear(3, 3, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    base = Tied()
    original = base.enc.weight
    net = hg.nn.HyperNet(base, 1, init_std=1.0)
    lam = torch.full((1,), 2.0)
    w = net.weights(lam)["enc.weight"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(x, hparams=lam), torch.tanh(x @ w.T) @ w.T)
    assert net.names == ("enc.weight",)
    assert base.enc.weight is original and base.dec.weight is original


def test_bad_hypernet_arguments_are_named() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"rank must be an int >= 1, got 2\.0"):
        hg.nn.HyperNet(lin, 1, rank=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        hg.nn.HyperNet(lin, 1, rank=0)
    with pytest.raises(ValueError, match="not both"):
        hg.nn.HyperNet(lin, 1, rank=2, hypernet=nn.Linear(1, 6))
    with pytest.raises(ValueError, match="init_std"):
        hg.nn.HyperNet(lin, 1, init_std=float("nan"))
    with pytest.raises(ValueError, match="n_hparams must be an int >= 1, got 0"):
        hg.nn.HyperNet(lin, 0)
    with pytest.raises(ValueError, match="no parameters"):
        hg.nn.HyperNet(nn.ReLU(), 1)
    net = hg.nn.HyperNet(lin, np.int64(3))  # a numpy integer is an integer
    assert net.n_hparams == 3 and type(net.n_hparams) is int
    with pytest.raises(ValueError, match=r"n_hparams=3; got hyperparameters \(2,\)"):
        net(torch.ones(1, 2), hparams=torch.zeros(2))


# ------------------------------------------------------------------ BestResponse's hypergradient


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_best_response_hypergradient_through_a_low_rank_batchnorm_hypernet(sampling: str) -> None:
    """dL_V/dlambda through w_phi(lambda), after some training (BatchNorm statistics moved), in eval
    mode, against central differences of the validation loss in float64."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        a=hg.hparams.Positive(0.1, transform="exp"),
        b=hg.hparams.Rate(0.4),
        learn_scale=False,
        scale=0.3,
        dtype=DT,
    )
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    net = hg.nn.HyperNet(base, hp.size, rank=2, init_std=0.3)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        w = m.weights(h)["3.weight"]
        return F.cross_entropy(m(b[0], hparams=h), b[1]) + h.draw(1)["a"][0] * (w**2).sum()

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        sampling=sampling,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        hopt.step((torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)))
    stats = net.state_dict()["base_state.1.running_mean"].clone()
    vb = (torch.randn(32, 4, generator=g, dtype=DT), torch.randint(0, 3, (32,), generator=g))
    (grad,), _ = hopt.hypergradient(val_batch=vb)
    assert torch.equal(net.state_dict()["base_state.1.running_mean"], stats)  # eval: untouched
    assert net.training

    def f() -> float:
        net.eval()
        with torch.no_grad():
            out = float(val(net, hp, vb))
        net.train()
        return out

    fd = central_difference(f, hp.raw, eps=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-5


@pytest.mark.parametrize("bad", [float("inf"), True, 0.0, float("nan")])
def test_best_response_names_a_bad_prior_scale(bad: Any) -> None:
    """An infinite prior scale was accepted and the first step raised a NonFiniteError (nan
    loss); True was read as 1.0."""
    hp = hg.hparams.SelfTuned(a=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False)
    net = hg.nn.HyperNet(nn.Linear(3, 1), hp.size)
    loss = lambda m, h, b: ((m(b[0], hparams=h) - b[1]) ** 2).mean()  # noqa: E731
    with pytest.raises(ValueError, match="Invalid prior_scale"):
        hg.BestResponse(
            net,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            sampling="global",
            prior_scale=bad,
        )
