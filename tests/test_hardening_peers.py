"""Marginal likelihood and self-tuning networks, checked the way their peers check them.

* The linearised-Laplace evidence against laplace-torch's ``"full"`` GGN Laplace (values and
  gradients w.r.t. the prior precision and the noise; regression and classification; one
  precision, one per layer, one per weight; biases off, frozen weights, batches of 1), and, for a
  frozen feature extractor (last-layer Laplace), against the closed-form evidence of Bayesian
  linear regression on the features, its gradient included (float64).
* The pure evidence functions refuse settings that would give a silent wrong number.
* STN layers against plain ``F.conv*d`` for every option ``nn.Conv*d`` takes; per-example
  augmentations at their edges, compared with the authors' formulas; the hyperstep's eval mode
  restoring each module's own mode (a frozen BatchNorm stays frozen), with an LR scheduler on the
  inner optimiser and ``val_steps > 1``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------------ marginal likelihood


def _set_precisions(prior: hg.hparams.PriorPrecision, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in prior.raw:
            r.copy_(torch.rand(r.shape, generator=g, dtype=r.dtype) * 2 - 1)  # precisions in (1/e, e)


def _laplace_case(
    likelihood: str, per: str, bias: bool = True, frozen: bool = False
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, hg.hparams.PriorPrecision]:
    torch.manual_seed(3)
    c = 2 if likelihood == "regression" else 3
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, c)).to(DT)
    if frozen:
        model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = (
        torch.randn(10, c, generator=g, dtype=DT)
        if likelihood == "regression"
        else torch.randint(0, c, (10,), generator=g)
    )
    prior = hg.hparams.PriorPrecision(model, per=per).to(DT)
    _set_precisions(prior, 5)
    return model, x, y, prior


@pytest.mark.parametrize(
    "likelihood, per, bias, frozen, batch",
    [
        ("regression", "global", True, False, 4),
        ("regression", "layer", False, False, 1),
        ("regression", "parameter", True, True, 3),
        ("classification", "global", True, True, 1),
        ("classification", "layer", True, False, 4),
        ("classification", "parameter", False, False, 10),
    ],
)
def test_evidence_and_its_gradients_match_laplace_torch_full_laplace(
    likelihood: str, per: str, bias: bool, frozen: bool, batch: int
) -> None:
    pytest.importorskip("laplace")
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    model, x, y, prior = _laplace_case(likelihood, per, bias, frozen)
    sigma = torch.tensor(0.7, dtype=DT, requires_grad=True)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    default = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch's and curvlinops' own warnings
        torch.set_default_dtype(DT)  # curvlinops makes some tensors in the default dtype
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure="full",
            backend=CurvlinopsGGN,
            **({"sigma_noise": 0.7} if likelihood == "regression" else {}),
        )
        la.fit(loader)
        pp = torch.cat([prior.precisions()[n].expand_as(p).reshape(-1) for n, p in trained])
        ref = la.log_marginal_likelihood(pp, sigma if likelihood == "regression" else None)
        torch.set_default_dtype(default)
    noise = sigma if likelihood == "regression" else None
    for form in ("ntk", "parametric"):
        ours = hg.log_evidence(model, x, y, prior, likelihood=likelihood, noise=noise, form=form)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-9)
    wrt = list(prior.parameters()) + ([sigma] if noise is not None else [])
    g_ref = torch.autograd.grad(ref, wrt)
    g_ours = torch.autograd.grad(hg.log_evidence(model, x, y, prior, likelihood=likelihood, noise=noise), wrt)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _blr_log_evidence(
    phi: torch.Tensor, y: torch.Tensor, prec_w: torch.Tensor, prec_b: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """sum_c log N(y_c | 0, Phi diag(1/delta_c) Phi^T + sigma^2 I), Phi = [features, 1]."""
    design = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], dim=1)
    total = torch.zeros((), dtype=phi.dtype)
    for c in range(y.shape[1]):
        inv = 1 / torch.cat([prec_w[c], prec_b[c].reshape(1)])
        cov = (design * inv) @ design.T + sigma**2 * torch.eye(len(phi), dtype=phi.dtype)
        total = total + torch.distributions.MultivariateNormal(
            torch.zeros(len(phi), dtype=phi.dtype), cov
        ).log_prob(y[:, c])
    return total


def test_last_layer_evidence_with_frozen_features_is_bayesian_linear_regression() -> None:
    torch.manual_seed(0)
    feats = nn.Sequential(nn.Linear(3, 6), nn.Tanh()).to(DT).requires_grad_(False)
    head = nn.Linear(6, 2).to(DT)
    model = nn.Sequential(feats, head)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 3, generator=g, dtype=DT)
    y = torch.randn(15, 2, generator=g, dtype=DT)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="parameter"),
            "noise": hg.hparams.ObservationNoise(0.6),
        }
    ).to(DT)
    assert hp["prior"].names == ("1.weight", "1.bias")  # the frozen layer is not covered
    _set_precisions(hp["prior"], 2)
    prec = hp["prior"].precisions()
    sigma = hp["noise"]()
    phi = feats(x)
    design = torch.cat([phi, torch.ones(15, 1, dtype=DT)], dim=1)
    with torch.no_grad():  # the MAP, per output: (D^T D / s^2 + diag(delta_c))^-1 D^T y_c / s^2
        for c in range(2):
            d = torch.cat([prec["1.weight"][c], prec["1.bias"][c].reshape(1)])
            a = design.T @ design / sigma**2 + torch.diag(d)
            w = torch.linalg.solve(a, design.T @ y[:, c] / sigma**2)
            head.weight[c], head.bias[c] = w[:-1], w[-1]
    closed = _blr_log_evidence(phi, y, prec["1.weight"], prec["1.bias"], sigma)
    raws = list(hp.parameters())
    g_closed = torch.autograd.grad(closed, raws)  # at the MAP, the partial derivative is the total one
    for form, kernel in (("ntk", "dense"), ("parametric", "auto")):
        ev = hg.log_evidence(
            model, x, y, hp["prior"], likelihood="regression", noise=hp["noise"], form=form, kernel=kernel
        )
        torch.testing.assert_close(ev, closed, rtol=1e-11, atol=1e-9)
        for a, b in zip(torch.autograd.grad(ev, raws), g_closed, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # the same through MarginalLikelihood: outer loss -q/N, .grad its gradient
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=15,
        bound="exact",
        inner_optimizer=torch.optim.SGD(head.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    info = hopt.hyper_step(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(-float(closed.detach()) / 15, rel=1e-11)
    for r, b in zip(raws, g_closed, strict=True):
        assert r.grad is not None
        torch.testing.assert_close(r.grad, -b / 15, rtol=1e-8, atol=1e-12)


def test_bound_with_batches_of_one_example_is_the_sum_of_single_example_evidences() -> None:
    """M = 1: the log det splits into one term per example, so the bound at B = N is the sum
    of each example's own kernel, with the prior term counted once."""
    model, x, y, prior = _laplace_case("classification", "layer")
    n = len(x)
    b1 = hg.log_evidence_bound(model, x, y, prior, data_size=n, subset_size=1)
    quad = sum((prior.precisions()[k] * p.detach().square()).sum() for k, p in model.named_parameters())
    per_example = [hg.log_evidence(model, x[i : i + 1], y[i : i + 1], prior) + 0.5 * quad for i in range(n)]
    torch.testing.assert_close(b1, torch.stack(per_example).sum() - 0.5 * quad, rtol=1e-12, atol=1e-10)
    assert float(b1.detach()) < float(hg.log_evidence(model, x, y, prior).detach())  # a lower bound


def test_evidence_functions_refuse_settings_that_would_give_a_wrong_number() -> None:
    model, x, y, prior = _laplace_case("classification", "layer")
    with pytest.raises(ValueError, match="classification.*no observation noise"):
        hg.log_evidence(model, x, y, prior, noise=0.5)  # it used to rescale the kernel silently
    yr = torch.randn(10, 3, dtype=DT)
    for bad in (-0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise must be a finite standard deviation > 0"):
            hg.log_evidence(model, x, yr, prior, likelihood="regression", noise=bad)
    with pytest.raises(ValueError, match="one real standard deviation"):
        hg.log_evidence(model, x, yr, prior, likelihood="regression", noise=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="data_size=5"):
        hg.log_evidence_bound(model, x, y, prior, data_size=5)  # N/B < 1 would shrink the evidence
    with pytest.raises(ValueError, match="Invalid data_size"):
        hg.log_evidence_bound(model, x, y, prior, data_size=True)  # type: ignore[arg-type]
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    with pytest.raises(ValueError, match=r"2\.weight \(2, 5\) vs \(3, 5\)"):
        hg.log_evidence(model, x, y, hg.hparams.PriorPrecision(other, per="parameter").to(DT))
    elsewhere = hg.hparams.PriorPrecision(nn.Sequential(nn.Identity(), nn.Linear(3, 3)).to(DT))
    model2 = nn.Sequential(nn.Linear(3, 3)).to(DT)
    with pytest.raises(ValueError, match="covers none of the model's trainable weights"):
        hg.log_evidence(model2, x, y, elsewhere)


def test_a_python_float_noise_is_not_rounded_to_float32_in_a_float64_evidence() -> None:
    model, x, _, prior = _laplace_case("regression", "layer")
    y = torch.randn(10, 2, dtype=DT)
    a = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=0.7)
    b = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=torch.tensor(0.7, dtype=DT))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-12)  # float32 0.7 was off by ~1e-6


# ------------------------------------------------------------------------ self-tuning layers


def _reference_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dims: int, kw: dict[str, Any]
) -> torch.Tensor:
    """F.conv*d with explicit padding: 'same' and the padding modes worked out by hand."""
    k = weight.shape[2:]
    dil = kw.get("dilation", 1)
    pad = kw.get("padding", 0)
    if pad == "same":
        pads: list[int] = []
        for kk in reversed(k):
            total = dil * (kk - 1)
            pads += [total // 2, total - total // 2]
    elif pad == "valid":
        pads = [0] * (2 * dims)
    else:
        p = (pad,) * dims if isinstance(pad, int) else tuple(pad)
        pads = [v for q in reversed(p) for v in (q, q)]
    mode = kw.get("padding_mode", "zeros")
    x = F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(x, weight, bias, stride=kw.get("stride", 1), dilation=dil)


@pytest.mark.parametrize(
    "dims, kw",
    [
        (2, {"stride": 2, "padding": 1}),
        (2, {"padding": (1, 2), "stride": (2, 1), "dilation": 2}),
        (2, {"padding": "same", "dilation": 2, "bias": False}),
        (2, {"padding": "valid"}),
        (2, {"padding": 1, "padding_mode": "reflect"}),
        (2, {"padding": 2, "padding_mode": "circular", "bias": False}),
        (1, {"padding": 2, "padding_mode": "replicate", "stride": 2}),
        (1, {"padding": "same"}),
    ],
)
def test_stn_conv_is_a_per_example_convolution_for_every_nn_conv_option(
    dims: int, kw: dict[str, Any]
) -> None:
    cls = hg.nn.StnConv2d if dims == 2 else hg.nn.StnConv1d
    layer = cls(3, 4, 3, 2, **kw).to(DT)
    with torch.no_grad():
        layer.hnet.normal_()
    x = torch.randn(5, 3, *((9, 8) if dims == 2 else (11,)), dtype=DT)
    feats = torch.randn(5, 2, dtype=DT)
    w, b = layer.conv.weight, layer.conv.bias
    ref = []
    for i in range(5):
        s = layer.hnet @ feats[i]
        wi = w[:4] + s.reshape(4, *(1,) * (dims + 1)) * w[4:]
        bi = None if b is None else b[:4] + s * b[4:]
        ref.append(_reference_conv(x[i : i + 1], wi, bi, dims, kw))
    out = layer(x, feats)
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.fixed(feats[1])(x[1:2]), ref[1], rtol=1e-12, atol=1e-12)
    draw = hg.hparams.Draw(torch.zeros(5, 2, dtype=DT), {}, zero=True)  # the vanishing hyper half
    torch.testing.assert_close(
        layer(x, draw), _reference_conv(x, w[:4], None if b is None else b[:4], dims, kw)
    )


def test_stn_conv_refuses_what_it_cannot_do_by_name() -> None:
    with pytest.raises(ValueError, match="rank=2 with groups=2 is not supported"):
        hg.nn.StnConv2d(4, 4, 3, 2, groups=2, rank=2)
    with pytest.raises(ValueError, match=r"divisible by groups \(2\)"):
        hg.nn.StnConv2d(3, 4, 3, 2, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        hg.nn.StnConv2d(4, 4, 3, 2, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="same"):
        hg.nn.StnConv2d(4, 4, 3, 2, padding="same", stride=2)


def test_stn_lstm_cell_accepts_no_state_like_nn_lstm_cell() -> None:
    cell = hg.nn.StnLSTMCell(3, 4, n_hparams=1).to(DT)
    x, f = torch.randn(2, 3, dtype=DT), torch.randn(2, 1, dtype=DT)
    zero = torch.zeros(2, 4, dtype=DT)
    h, c = cell(x, None, f)
    h0, c0 = cell(x, (zero, zero), f)
    assert torch.equal(h, h0) and torch.equal(c, c0)


def test_dropout_at_the_edges_of_its_range() -> None:
    x = torch.randn(3, 20000, dtype=DT)
    assert torch.equal(hg.nn.dropout(x, torch.zeros(3, dtype=DT)), x)  # rate 0: identity
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5, high=0.9), dtype=DT)
    with torch.no_grad():
        hp.raw.fill_(40.0)  # sigmoid saturates: the rate is clamped just under 0.9
    p = hp.draw(3)["p"]
    assert bool((p < 0.9).all()) and float(p[0]) == pytest.approx(0.9)
    y = hg.nn.dropout(torch.ones(3, 20000, dtype=DT), p)
    kept = (y != 0).double().mean(1)
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(kept, torch.full((3,), 0.1, dtype=DT), atol=0.01, rtol=0)
    torch.testing.assert_close(y.mean(1), torch.ones(3, dtype=DT), atol=0.1, rtol=0)  # inverted scaling
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hg.nn.dropout(x, torch.ones(3, dtype=DT))


def test_cutout_at_length_zero_and_at_the_image_size_matches_the_authors_window() -> None:
    x = torch.ones(4000, 2, 8, 8)
    assert torch.equal(hg.nn.cutout(x, 0), x)
    y = hg.nn.cutout(x, torch.full((4000,), 8))
    holes = (y == 0).sum((2, 3)).double()
    assert torch.equal(holes[:, 0], holes[:, 1])  # one square for all channels
    # centre c uniform on {0..7}, window [c - 4, c + 4) clipped: 4, 5, 6, 7, 8, 7, 6, 5 rows
    rows = torch.tensor([4, 5, 6, 7, 8, 7, 6, 5], dtype=DT)
    assert int(holes.min()) >= 16 and int(holes.max()) == 64
    assert float(holes[:, 0].mean()) == pytest.approx(float(rows.mean()) ** 2, rel=0.03)
    z = hg.nn.cutout(torch.ones(4000, 1, 7, 9), 3)  # odd length, non-square image: 3 x 3 inside
    inner = (z[:, 0, 1:-1, 1:-1] == 0).sum((1, 2))
    assert int((z == 0).sum((1, 2, 3)).max()) == 9 and int(inner.max()) == 9


def test_integer_hyperparameters_are_floored_per_example_in_the_draw() -> None:
    spec = hg.hparams.Integer(4, 0, 16)
    hp = hg.hparams.SelfTuned(k=spec, dtype=DT)
    raw = torch.linspace(-6, 6, 101, dtype=DT)[:, None]
    vals = hp.values_of(raw)["k"]
    cont = 17 * torch.sigmoid(raw[:, 0])  # l + (h + 1 - l) sigma(r)
    assert torch.equal(vals.double(), torch.floor(cont).clamp(0, 16))
    assert int(vals.min()) == 0 and int(vals.max()) == 16


# ------------------------------------------------------------------------ the self-tuning loop


class _Block(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = hg.nn.StnLinear(4, 8, n)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor, d: hg.hparams.Draw) -> torch.Tensor:
        return torch.relu(self.bn(self.lin(x, d)))


class _Net(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.block = _Block(n)
        self.frozen = nn.BatchNorm1d(8)
        self.out = hg.nn.StnLinear(8, 3, n)
        self.seen: list[dict[str, bool]] = []
        self.fail = False

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        self.seen.append({n: m.training for n, m in self.named_modules()})
        if self.fail:
            raise RuntimeError("boom")
        d = hp.draw(len(x))
        h = self.frozen(self.block(x, d))
        return self.out(hg.nn.dropout(h, d["p"], self.training), d)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


@pytest.mark.parametrize("delta", [False, True])
def test_hyper_step_runs_in_eval_mode_and_gives_each_module_its_own_mode_back(delta: bool) -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _Net(hp.size).to(DT)
    model.frozen.eval().requires_grad_(False)  # a BatchNorm the user froze on purpose
    with torch.no_grad():
        model.frozen.running_mean.normal_()
    frozen_stats = model.frozen.running_mean.clone()
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(inner, milestones=[3], gamma=0.0)
    hopt = hg.SelfTuning(
        model,
        hp,
        _ce,
        _ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        delta=delta,
        warmup=2,
        train_steps=2,
        val_steps=2,
    )
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
    expected = {n: n != "frozen" for n, _ in model.named_modules()}
    hypersteps, due = 0, []
    for i in range(7):
        before = model.out.weight.detach().clone()
        hopt.step(batch)
        sched.step()
        assert torch.equal(before, model.out.weight) == (i >= 3)  # the scheduler's lr 0 is obeyed
        due.append(hopt.hyper_due())
        if due[-1]:
            for _ in range(hopt.val_steps):
                model.seen.clear()
                hopt.hyper_step(val_batch=batch)
                assert model.seen and all(not any(s.values()) for s in model.seen)  # all eval
                hypersteps += 1
        assert {n: m.training for n, m in model.named_modules()} == expected
    assert due == [False, True, False, True, False, True, False] and hypersteps == 6
    assert torch.equal(model.frozen.running_mean, frozen_stats)
    assert len(hp.history()) == 6
    model.fail = True  # a validation loss that raises still gives the modes back
    with pytest.raises(RuntimeError, match="boom"):
        hopt.hyper_step(val_batch=batch)
    assert {n: m.training for n, m in model.named_modules()} == expected


def test_hypergradient_is_finite_at_the_upper_bound_of_a_dropout_rate() -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _Net(hp.size).to(DT)
    with torch.no_grad():
        hp.raw.fill_(30.0)
    hopt = hg.SelfTuning(
        model,
        hp,
        _ce,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    batch = (torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,)))
    loss = hopt.step(batch)
    assert math.isfinite(float(loss))
    hopt.hyper_step(val_batch=batch)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in hp.parameters())


def test_hypernet_over_an_lstm_leaves_no_generated_weights_behind() -> None:
    """A HyperNet whose base holds an nn.LSTM: the LSTM computes with the generated weights (its
    output depends on the hyperparameters) and afterwards its own weight list points at the
    template's tensors again, not at the generated ones (which would keep their graph alive)."""

    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 4, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    net = hg.nn.HyperNet(Base().double(), n_hparams=1)
    with torch.no_grad():
        for p in net.parameters():  # a visible response to the hyperparameter
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    lam = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    out = net(x, hparams=lam)
    (g,) = torch.autograd.grad(out.square().sum(), lam)
    assert float(g.abs()) > 0
    lstm = net.base.rnn
    own = [getattr(lstm, n) for n in lstm._flat_weights_names]
    assert all(a is b for a, b in zip(lstm._flat_weights, own, strict=True))
    assert not any(w.grad_fn is not None for w in lstm._flat_weights)
