"""Round 16, the marginal-likelihood family as a new user meets it (laplace-torch's test ideas,
Immer et al.'s online and invariance-learning scripts).

Float64 proofs against an independent reference (per-example ``torch.func.jacrev`` Jacobians
stacked into the dense GGN, :math:`\\log\\det(P_0 + J^\\top\\Lambda J) - \\log\\det P_0`, with
``torch.logdet`` and autograd: no code of the library) or central differences of the real
procedure (the MAP refitted at each perturbed hyperparameter).

Fixes:

* the MAP step broadcast per-weight prior precisions against a weight resized since the
  PriorPrecision was built (a head of 3 outputs replaced by one of 1: the head trained with three
  times its penalty, refused only at the first hyperstep);
* ``RandomTranslation`` given uint8 images failed in ``torch.rand`` with
  ``"check_uniform_bounds" not implemented for 'Byte'``, naming neither the layer nor the fix;
  an init inside ``(0, max)`` whose raw value saturates the sigmoid sat on the edge forever;
* complex class labels crashed in ``round()``; an augmentation of one's own crashed on ``.raw``;
* float32 kernels: the Gram products rounded in float32 moved the eigenvalues of ``I + K`` that
  sit near 1. A float32 MLP fitting a clean curve got, at sigma = 0.01, a noise hypergradient of
  -44.4 for the true +5.7 (and a NaN bound with one block); a linear regression at its MAP with
  sigma = 1e-3 a NaN; a logistic regression with about as many kernel rows as weights a bound
  1.9 (54) nats off. Those kernels are formed and factored in float64 now, and any other float32
  kernel whose Cholesky fails is formed again in float64 (with the same sampled outputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------ an independent dense reference


def _reference(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prec: dict[str, Tensor],
    names: list[str],
    *,
    likelihood: str = "classification",
    sigma: Tensor | None = None,
) -> Tensor:
    """The linearised-Laplace log evidence from dense Jacobians (parametric form)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(theta: dict[str, Tensor]) -> Tensor:
        p = dict(params)
        p.update(theta)
        return torch.func.functional_call(model, (p, buffers), (x,), tie_weights=True)

    theta = {n: params[n] for n in names}
    out = f(theta).reshape(x.shape[0], -1)
    jac = torch.func.jacrev(f)(theta)
    j = torch.cat([jac[n].reshape(out.numel(), -1) for n in names], 1)
    delta = torch.cat([prec[n].expand(params[n].shape).reshape(-1) for n in names])
    quad = sum((prec[n] * theta[n] ** 2).sum() for n in names)
    if likelihood == "classification":
        log_lik = -F.cross_entropy(out, y, reduction="sum")
        p = out.softmax(1)
        lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    else:
        assert sigma is not None
        log_lik = torch.distributions.Normal(out.reshape(-1), sigma).log_prob(y.reshape(-1)).sum()
        lam = torch.eye(out.numel(), dtype=out.dtype) / sigma**2
    a = torch.diag(delta) + j.T @ lam @ j
    return log_lik - 0.5 * quad - 0.5 * (torch.logdet(a) - delta.log().sum())


def _state(*objs: object) -> list[Tensor]:
    """Every tensor in the objects' state dicts (and ``.grad`` of parameters), flattened."""
    out: list[Tensor] = []

    def walk(v: object) -> None:
        if isinstance(v, Tensor):
            out.append(v.detach().clone())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for e in v:
                walk(e)

    for o in objs:
        if isinstance(o, nn.Module):
            walk(o.state_dict())
            walk([p.grad for p in o.parameters() if p.grad is not None])
        elif isinstance(o, torch.optim.Optimizer):
            walk(o.state_dict())
    return out


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ fixes


def test_a_resized_layer_under_a_per_weight_prior_is_refused_at_step_changing_nothing() -> None:
    torch.manual_seed(0)
    n = 20
    x, y = torch.randn(n, 4), torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    hp = nn.ModuleDict(
        {"prior": hg.hparams.PriorPrecision(model, per="parameter"), "noise": hg.hparams.ObservationNoise()}
    )
    model[2] = nn.Linear(8, 1)  # the head replaced: 3 -> 1 outputs (broadcastable against (3, 8))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="regression", data_size=n, inner_optimizer=inner, outer_optimizer=outer
    )
    before = _state(model, hp, inner, outer)
    with pytest.raises(ValueError, match=r"2\.weight \(3, 8\) vs \(1, 8\).*resized"):
        hopt.step((x, y))
    assert _same(before, _state(model, hp, inner, outer)) and hopt.inner_steps == 0
    # a shape that does not broadcast got torch's bare "size of tensor a (3) must match"
    model[2] = nn.Linear(8, 5)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=n,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer,
    )
    with pytest.raises(ValueError, match=r"2\.bias \(3,\) vs \(5,\)"):
        hopt.step((x, torch.randn(n, 5)))


def test_random_translation_refuses_integer_images_naming_the_conversion() -> None:
    aug = hg.hparams.RandomTranslation((4, 4), init=0.5)
    with pytest.raises(ValueError, match=r"floating-point.*uint8.*x\.float\(\) / 255"):
        aug(torch.randint(0, 255, (3, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="complex64"):
        aug(torch.randn(3, 16, dtype=torch.complex64))
    with pytest.raises(TypeError, match="list"):
        aug([[0.0] * 16])  # type: ignore[arg-type]
    # floating-point inputs of any precision still move, and the range still gets a gradient
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = aug(torch.randn(3, 16, dtype=dt), samples=2)
        assert out.dtype == dt and out.shape == (6, 16)
        (g,) = torch.autograd.grad(out.float().square().sum(), [aug.raw])
        assert torch.isfinite(g).all() and bool(g.abs().sum() > 0)


def test_a_translation_range_init_that_saturates_the_sigmoid_is_refused() -> None:
    # inside (0, max) as asked, but the raw value's sigmoid is exactly 1 (or 0) in float32: the
    # range sat at max (or 0) with a zero gradient, never to move
    for init in (2.0 * (1 - 1e-9), 1e-50):
        with pytest.raises(ValueError, match=r"translation range init.*edge.*set_default_dtype"):
            hg.hparams.RandomTranslation((8, 8), init=init)
    for init in (1e-30, 2.0 * (1 - 1e-6), 0.5):  # close to the edges, still movable
        aug = hg.hparams.RandomTranslation((8, 8), init=init)
        assert 0 < float(aug.value.min()) and float(aug.value.max()) < 2.0
        (g,) = torch.autograd.grad(aug(torch.randn(4, 64)).square().sum(), [aug.raw])
        assert bool((g != 0).all())


def test_complex_or_bool_class_labels_are_refused_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    prior = hg.hparams.PriorPrecision(model)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    # complex labels crashed in round(): '"round_vml_cpu" not implemented for 'ComplexFloat''
    for bad in (y.to(torch.complex64), y.bool()):
        with pytest.raises(ValueError, match=rf"integer class labels \(B,\), got {bad.dtype}"):
            hg.log_evidence(model, x, bad, prior)
    # whole-number float labels remain the integer labels they hold
    assert torch.equal(hg.log_evidence(model, x, y.float(), prior), hg.log_evidence(model, x, y, prior))


def _sharp_linear_regression(dt: torch.dtype) -> tuple[nn.Linear, Tensor, Tensor, float]:
    """A linear model at the MAP of a nearly noise-free regression (sigma = 1e-3), in ``dt``."""
    torch.manual_seed(0)
    b, d, s = 64, 4, 1e-3
    x = torch.randn(b, d, dtype=DT) * 3
    y = x @ torch.randn(d, 1, dtype=DT) + s * torch.randn(b, 1, dtype=DT)
    phi = torch.cat([x, torch.ones(b, 1, dtype=DT)], 1)
    w = torch.linalg.solve(phi.T @ phi / s**2 + torch.eye(d + 1, dtype=DT), phi.T @ y / s**2)
    model = nn.Linear(d, 1).to(dt)
    with torch.no_grad():
        model.weight.copy_(w[:d].T)
        model.bias.copy_(w[d])
    return model, x, y, s


def _blr_evidence(x: Tensor, y: Tensor, log_prec: Tensor, log_sigma: Tensor) -> Tensor:
    """Bayesian linear regression (weights and bias, one precision): log N(y; 0, Phi Phi^T / d + s^2 I)."""
    phi = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    cov = phi @ phi.T / log_prec.exp() + log_sigma.exp() ** 2 * torch.eye(x.shape[0], dtype=x.dtype)
    return torch.distributions.MultivariateNormal(torch.zeros(x.shape[0], dtype=x.dtype), cov).log_prob(
        y[:, 0]
    )


def test_a_sharp_float32_regression_at_its_map_gets_the_closed_form_evidence_not_nan() -> None:
    # I + J J^T / sigma^2 with entries ~1e7 and 60 eigenvalues of 1: the float32 Gram product
    # rounds it indefinite, the Cholesky failed, the NTK bound was NaN (the parametric one fine)
    # and every hyperstep was refused
    model, x, y, s = _sharp_linear_regression(torch.float32)
    lp = torch.zeros((), dtype=DT, requires_grad=True)
    ls = torch.tensor(s, dtype=DT).log().requires_grad_(True)
    truth = _blr_evidence(x, y, lp, ls)
    g_truth = torch.autograd.grad(truth, [lp, ls])
    x32, y32 = x.float(), y.float()
    for kw in ({"kernel": "layerwise"}, {"kernel": "dense"}, {"form": "parametric"}):
        prior = hg.hparams.PriorPrecision(model, init=1.0)
        noise = hg.hparams.ObservationNoise(s)
        e = hg.log_evidence(model, x32, y32, prior, likelihood="regression", noise=noise, **kw)
        assert e.dtype == torch.float32
        assert float(e.detach()) == pytest.approx(float(truth.detach()), rel=1e-5), kw
        g = torch.autograd.grad(e, [prior.raw[0], noise.raw])
        for a, t in zip(g, g_truth, strict=True):
            assert float(a) == pytest.approx(float(t), rel=1e-3), kw
    # in the loop: the float32 hyperstep is accepted, with the hypergradient of the closed form
    prior = hg.hparams.PriorPrecision(model, init=1.0)
    hp = nn.ModuleDict({"prior": prior, "noise": hg.hparams.ObservationNoise(s)})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=x.shape[0],
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    info = hopt.hyper_step(train_batch=(x32, y32))
    assert not info.skipped
    for p, t in zip(hp.parameters(), g_truth, strict=True):
        assert p.grad is not None
        assert float(p.grad) == pytest.approx(-float(t) / x.shape[0], rel=1e-3)


def test_a_float32_mlp_fitting_a_clean_curve_gets_the_float64_noise_hypergradient() -> None:
    # at the noise level of a good fit (sigma = 0.01), the float32 noise hypergradient of the
    # bound had the wrong sign (-44.4 for +5.7: sigma would have been driven down) and the bound
    # was 10 nats off; with one block it was NaN
    torch.manual_seed(0)
    n = 256
    x = torch.linspace(-3, 3, n)[:, None]
    y = torch.sin(2 * x) + 0.01 * torch.randn(n, 1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(1500):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert float(F.mse_loss(model(x), y).detach().sqrt()) < 0.03
    out = []
    for dt in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dt)
        prior = hg.hparams.PriorPrecision(m, per="layer", init=1.0)
        noise = hg.hparams.ObservationNoise(0.01, dtype=dt)
        for sub in (None, 64):
            e = hg.log_evidence_bound(
                m,
                x.to(dt),
                y.to(dt),
                prior,
                data_size=n,
                likelihood="regression",
                noise=noise,
                subset_size=sub,
            )
            g = torch.autograd.grad(e, [*prior.raw, noise.raw])
            out.append(torch.stack([e.detach().double(), *(t.double() for t in g)]))
    for a, b in ((out[0], out[2]), (out[1], out[3])):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3 * float(a[1:].abs().max()))


@pytest.mark.parametrize(
    ("features", "examples", "delta", "outputs"), [(8, 64, 1e-4, "all"), (20, 55, 1e-6, "sampled")]
)
def test_a_float32_kernel_with_about_as_many_rows_as_weights_is_the_float64_one(
    features: int, examples: int, delta: float, outputs: str
) -> None:
    # a logistic regression whose kernel has more rows than weights (27 weights, 64 x 3 rows:
    # eigenvalues of exactly 1 to keep) or nearly as many (63 weights, 55 rows): in float32 the
    # bound was 1.9 and 54 nats off, silently
    torch.manual_seed(0)
    x = torch.randn(examples, features, dtype=DT)
    y = torch.randint(0, 3, (examples,))
    model = nn.Linear(features, 3).to(DT)
    out = []
    for dt in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dt)
        prior = hg.hparams.PriorPrecision(m, init=delta)
        torch.manual_seed(1)
        e = hg.log_evidence_bound(m, x.to(dt), y, prior, data_size=1000, outputs=outputs)
        (g,) = torch.autograd.grad(e, [prior.raw[0]])
        out.append(torch.stack([e.detach().double(), g.double()]))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=0.0)


def test_a_float32_kernel_that_fails_to_factor_is_formed_again_in_float64_with_the_same_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a kernel far wider than its rows (600 weights, 32 rows) factored in float32; where that
    # fails (forced here: a float32 Cholesky that says it failed) it is formed again in float64,
    # drawing the same outputs for outputs="sampled" and leaving the generator where one
    # attempt would
    torch.manual_seed(0)
    x, y = torch.randn(32, 200, dtype=DT), torch.randint(0, 3, (32,))
    model = nn.Linear(200, 3).to(DT)
    prior64 = hg.hparams.PriorPrecision(model, init=0.1).to(DT)
    m32 = copy.deepcopy(model).float()
    prior32 = hg.hparams.PriorPrecision(m32, init=0.1)
    real = hg._marglik._logdet_pd
    tries: list[torch.dtype] = []

    def failing_in_float32(a: Tensor) -> Tensor:
        tries.append(a.dtype)
        out = real(a)
        return out * float("nan") if a.dtype == torch.float32 else out

    for outputs in ("sampled", "all"):
        torch.manual_seed(3)
        e64 = hg.log_evidence_bound(model, x, y, prior64, data_size=100, outputs=outputs, subset_size=16)
        after = torch.get_rng_state()
        with monkeypatch.context() as mp:
            mp.setattr(hg._marglik, "_logdet_pd", failing_in_float32)
            torch.manual_seed(3)
            tries.clear()
            e32 = hg.log_evidence_bound(
                m32, x.float(), y, prior32, data_size=100, outputs=outputs, subset_size=16
            )
        assert torch.float32 in tries and torch.float64 in tries  # (float32 first: not square)
        assert e32.dtype == torch.float32 and torch.equal(torch.get_rng_state(), after)
        assert float(e32.detach()) == pytest.approx(float(e64.detach()), rel=1e-6)


def test_an_augmentation_of_ones_own_is_refused_naming_random_translation() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.1))

        def forward(self, x: Tensor, samples: int = 1) -> Tensor:
            return x.repeat_interleave(samples, 0) * (1 + self.scale)

    model = nn.Linear(16, 3)
    prior = hg.hparams.PriorPrecision(model)
    x, y = torch.randn(5, 16), torch.randint(0, 3, (5,))
    # both failed with "'Scale' object has no attribute 'raw'"
    for aug in (Scale(), lambda x, s: x):
        with pytest.raises(TypeError, match=r"augmentation must be an hg\.hparams\.RandomTranslation"):
            hg.log_evidence_bound(model, x, y, prior, data_size=10, augmentation=aug, samples=2)  # type: ignore[arg-type]


# ------------------------------------------------------------------ proofs (no fix needed)


class _SharedFrozenUnused(nn.Module):
    """A submodule applied twice, a frozen layer between, and a head that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.frozen(h))
        return self.head(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_shared_frozen_and_unused_weights_get_the_dense_evidence_and_its_gradient(per: str) -> None:
    torch.manual_seed(0)
    model = _SharedFrozenUnused().to(DT)
    x, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.5).to(DT)
    with torch.no_grad():
        for r in prior.raw:
            r.add_(0.3 * torch.randn_like(r))
    assert "frozen.weight" not in prior.names and "unused.weight" in prior.names
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    truth = _reference(model, x, y, prior.precisions(), names)
    g_truth = torch.autograd.grad(truth, list(prior.parameters()))
    for kw in ({"kernel": "auto"}, {"kernel": "dense"}, {"form": "parametric"}):
        e = hg.log_evidence(model, x, y, prior, **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(e, truth, rtol=1e-10, atol=1e-10)
        for a, t in zip(torch.autograd.grad(e, list(prior.parameters())), g_truth, strict=True):
            torch.testing.assert_close(a, t, rtol=1e-9, atol=1e-11)
