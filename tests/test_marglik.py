"""Marginal likelihood: the linearised-Laplace evidence, its NTK lower bounds and MarginalLikelihood.

Float64 proofs against closed forms (Bayesian linear regression, scikit-learn's BayesianRidge),
Fischer's inequality (bounds below the exact value, tightening along nested partitions), the two
forms and the two kernel paths against each other, finite differences, and the naive rescaled-GGN
estimator shown to over-estimate (so the bound checks here would catch it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _regression(n: int = 40, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    return x, y


def _linear_at_map(x: torch.Tensor, y: torch.Tensor, delta: float, sigma: float) -> nn.Linear:
    d = x.shape[1]
    model = nn.Linear(d, 1, bias=False).to(DT)
    a = delta * torch.eye(d, dtype=DT) + x.T @ x / sigma**2
    with torch.no_grad():
        model.weight.copy_(torch.linalg.solve(a, x.T @ y / sigma**2)[None])
    return model


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _classification(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def test_exact_evidence_of_bayesian_linear_regression_is_the_closed_form() -> None:
    x, y = _regression()
    delta, sigma = 2.0, 0.7
    model = _linear_at_map(x, y, delta, sigma)
    prior = hg.hparams.PriorPrecision(model, init=delta).to(DT)
    cov = sigma**2 * torch.eye(len(y), dtype=DT) + x @ x.T / delta
    closed = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=DT), cov).log_prob(y)
    for form in ("ntk", "parametric"):
        for kernel in ("auto", "dense"):
            ev = hg.log_evidence(
                model,
                x,
                y,
                prior,
                likelihood="regression",
                noise=torch.tensor(sigma, dtype=DT),
                form=form,
                kernel=kernel,
            )
            torch.testing.assert_close(ev, closed, rtol=1e-12, atol=1e-10)
    per_weight = hg.hparams.PriorPrecision(model, per="parameter", init=delta).to(DT)
    ev = hg.log_evidence(
        model, x, y, per_weight, likelihood="regression", noise=torch.tensor(sigma, dtype=DT)
    )
    torch.testing.assert_close(ev, closed, rtol=1e-12, atol=1e-10)


def test_hyper_step_reaches_bayesian_ridge() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _regression(60, 5)
    ref = sklearn.BayesianRidge(
        fit_intercept=False, alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0, tol=1e-12, max_iter=10_000
    ).fit(x.numpy(), y.numpy())
    model = nn.Linear(5, 1, bias=False).to(DT)
    hp = nn.ModuleDict(
        {"prior": hg.hparams.PriorPrecision(model, init=1.0), "noise": hg.hparams.ObservationNoise(init=1.0)}
    ).to(DT)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=60,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        subset_size=60,
    )
    for _ in range(150):  # the inner problem solved exactly (closed-form MAP), then one hyperstep
        lam, s2 = float(hp["prior"].value[0]), float(hp["noise"].value) ** 2
        with torch.no_grad():
            a = lam * torch.eye(5, dtype=DT) + x.T @ x / s2
            model.weight.copy_(torch.linalg.solve(a, x.T @ y / s2)[None])
        hopt.hyper_step(train_batch=(x, y))
    assert float(hp["prior"].value[0]) == pytest.approx(ref.lambda_, rel=1e-2)
    assert 1 / float(hp["noise"].value) ** 2 == pytest.approx(ref.alpha_, rel=1e-2)


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_bound_is_exact_for_one_block_and_tightens_along_nested_partitions(per) -> None:
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.5).to(DT)
    x, y = _classification()
    exact = hg.log_evidence(model, x, y, prior)
    one_block = hg.log_evidence_bound(model, x, y, prior, data_size=24)
    torch.testing.assert_close(one_block, exact, rtol=1e-12, atol=1e-10)
    for chain in ((1, 2, 4, 8, 24), (1, 3, 6, 12, 24)):
        values = [_f(hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=m)) for m in chain]
        assert all(v <= _f(exact) + 1e-9 for v in values)
        assert all(a < b for a, b in zip(values[:-1], values[1:], strict=False)), values
    for m in (1, 5, 7, 24):  # any M (a last smaller block included), each output separately too
        for outputs in ("all", "each"):
            b = hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=m, outputs=outputs)
            assert _f(b) <= _f(exact) + 1e-9


def test_stochastic_single_batch_estimator_averages_to_the_partition_bound() -> None:
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.5).to(DT)
    x, y = _classification()
    full = hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=4)
    singles = [
        hg.log_evidence_bound(model, x[i : i + 4], y[i : i + 4], prior, data_size=24) for i in range(0, 24, 4)
    ]
    torch.testing.assert_close(torch.stack(singles).mean(), full, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("per", ["layer", "parameter"])
def test_ntk_and_parametric_forms_and_both_kernels_agree(likelihood, per) -> None:
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.3).to(DT)
    x, y = _classification()
    noise = None
    if likelihood == "regression":
        y = torch.randn(24, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
        noise = hg.hparams.ObservationNoise(init=0.4).to(DT)
    kw = {"likelihood": likelihood, "noise": noise, "data_size": 24, "subset_size": 6}
    ntk = hg.log_evidence_bound(model, x, y, prior, **kw)
    dense = hg.log_evidence_bound(model, x, y, prior, kernel="dense", **kw)
    param = hg.log_evidence_bound(model, x, y, prior, form="parametric", **kw)
    torch.testing.assert_close(ntk, dense, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ntk, param, rtol=1e-12, atol=1e-10)
    each = hg.log_evidence_bound(model, x, y, prior, outputs="each", **kw)
    each_dense = hg.log_evidence_bound(model, x, y, prior, outputs="each", kernel="dense", **kw)
    torch.testing.assert_close(each, each_dense, rtol=1e-12, atol=1e-10)
    assert _f(each) <= _f(ntk) + 1e-9
    # the parametric form is the "all" bound: asking it for "each" used to return "all" silently
    assert _f(each) < _f(ntk) - 1e-6  # (the two differ here, so that would have been wrong)
    for outputs in ("each", "sampled"):
        with pytest.raises(ValueError, match=f"outputs='{outputs}' has no parametric form"):
            hg.log_evidence_bound(model, x, y, prior, form="parametric", outputs=outputs, **kw)


def test_sampled_output_is_unbiased_for_each_output() -> None:
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.3).to(DT)
    x, y = _classification()
    each = _f(hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=6, outputs="each"))
    torch.manual_seed(0)
    draws = [
        _f(hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=6, outputs="sampled"))
        for _ in range(300)
    ]
    mean, sd = sum(draws) / len(draws), torch.tensor(draws).std().item()
    assert abs(mean - each) < 4 * sd / math.sqrt(len(draws))


def _naive(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: float, n: int) -> torch.Tensor:
    """The naive estimator: log det(P0 + (N/M) G_b) on one batch (what the library must NOT use)."""
    params = dict(model.named_parameters())
    theta = {k: v.detach() for k, v in params.items()}
    jac = torch.func.vmap(
        torch.func.jacrev(lambda p, xi: torch.func.functional_call(model, p, (xi[None],))[0]),
        in_dims=(None, 0),
    )(theta, x)
    j = torch.cat([v.reshape(len(x), 3, -1) for v in jac.values()], dim=2)
    f = model(x).detach()
    p = torch.softmax(f, 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", j, lam, j)
    dim = ggn.shape[0]
    logdet = torch.logdet(delta * torch.eye(dim, dtype=DT) + n / len(x) * ggn) - dim * math.log(delta)
    quad = delta * sum(float(v.square().sum()) for v in theta.values())
    loglik = -nn.functional.cross_entropy(f, y, reduction="sum")
    return n / len(x) * loglik - 0.5 * logdet - 0.5 * quad


def test_naive_rescaled_ggn_estimator_over_estimates_and_would_be_caught() -> None:
    model = _mlp()
    delta = 0.5
    prior = hg.hparams.PriorPrecision(model, init=delta).to(DT)
    x, y = _classification()
    exact = _f(hg.log_evidence(model, x, y, prior))
    for m in (2, 4, 6):
        naive = [float(_naive(model, x[i : i + m], y[i : i + m], delta, 24)) for i in range(0, 24, m)]
        ours = [
            _f(hg.log_evidence_bound(model, x[i : i + m], y[i : i + m], prior, data_size=24))
            for i in range(0, 24, m)
        ]
        assert sum(naive) / len(naive) > exact  # the check below would fail for it ...
        assert sum(ours) / len(ours) <= exact  # ... and holds for the bound


def test_gradients_match_central_finite_differences() -> None:
    model = _mlp()
    x, _ = _classification()
    y = torch.randn(24, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer", init=0.4),
            "noise": hg.hparams.ObservationNoise(0.6),
        }
    ).to(DT)
    raws = list(hp.parameters())

    def bound() -> torch.Tensor:
        return hg.log_evidence_bound(
            model, x, y, hp["prior"], likelihood="regression", noise=hp["noise"], data_size=100, subset_size=8
        )

    grads = torch.autograd.grad(bound(), raws)
    eps = 1e-6
    for r, g in zip(raws, grads, strict=True):
        with torch.no_grad():
            r += eps
            up = _f(bound())
            r -= 2 * eps
            down = _f(bound())
            r += eps
        assert float(g) == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_augmentation_range_gradient_matches_finite_differences_and_kernels_agree() -> None:
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.5).to(DT)
    aug = hg.hparams.RandomTranslation((4,), init=0.7, max=1.5).to(DT)
    x, y = _classification()

    def bound(kernel: str = "auto") -> torch.Tensor:
        torch.manual_seed(3)  # the same augmentation draws every time
        return hg.log_evidence_bound(
            model, x, y, prior, data_size=24, subset_size=6, augmentation=aug, samples=3, kernel=kernel
        )

    (g,) = torch.autograd.grad(bound(), [aug.raw])
    torch.testing.assert_close(bound("dense"), bound(), rtol=1e-12, atol=1e-10)
    eps = 1e-6
    with torch.no_grad():
        aug.raw += eps
        up = _f(bound())
        aug.raw -= 2 * eps
        down = _f(bound())
        aug.raw += eps
    assert float(g[0]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)


def test_random_translation_moves_signals_by_whole_pixels_and_keeps_layout() -> None:
    aug = hg.hparams.RandomTranslation((8,), init=1.0, max=2.0).to(DT)
    with torch.no_grad():
        aug.raw.fill_(30.0)  # range -> max = 2 pixels
    x = torch.zeros(1, 8, dtype=DT)
    x[0, 3] = 1.0
    torch.manual_seed(0)
    out = aug(x, samples=50).detach()
    assert out.shape == (50, 8)
    centre = (out * torch.arange(8, dtype=DT)).sum(1) / out.sum(1).clamp_min(1e-12)
    assert float((centre - 3).abs().max()) <= 2 + 1e-9 and float((centre - 3).abs().max()) > 1.5
    img = hg.hparams.RandomTranslation((4, 4), init=0.5)
    assert img(torch.randn(3, 1, 4, 4), samples=2).shape == (6, 1, 4, 4)
    with pytest.raises(ValueError, match="init"):
        hg.hparams.RandomTranslation((8,), init=5.0, max=2.0)


def _hopt(model: nn.Module, hp: nn.Module, **kw) -> hg.MarginalLikelihood:
    kw = {"likelihood": "classification", "data_size": 100} | kw
    return hg.MarginalLikelihood(
        model,
        hp,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        **kw,
    )


def test_unsupported_models_and_bad_settings_get_clear_errors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    hopt = _hopt(model, hp)
    batch = _classification(16)
    hopt.step(batch)
    with pytest.raises(ValueError, match="BatchNorm layer in training mode"):
        hopt.hyper_step(train_batch=batch)
    model.eval()
    assert hopt.hyper_step(train_batch=batch).hypergrad_norm > 0  # eval mode: defined (dense kernel)
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3)).to(DT)
    hp2 = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(drop)}).to(DT)
    with pytest.raises(ValueError, match="Dropout in training mode"):
        _hopt(drop, hp2).hyper_step(train_batch=batch)
    m = _mlp()
    with pytest.raises(ValueError, match="ObservationNoise"):
        _hopt(m, nn.ModuleDict({"p": hg.hparams.PriorPrecision(m)}).to(DT), likelihood="regression")
    with pytest.raises(ValueError, match="exactly one"):
        _hopt(m, nn.ModuleDict({"w": hg.hparams.WeightDecay(m)}).to(DT))
    partial = nn.ModuleDict({"p": hg.hparams.PriorPrecision(m, include=lambda n: n.startswith("0."))}).to(DT)
    with pytest.raises(ValueError, match="not covered"):
        _hopt(m, partial)
    ok = nn.ModuleDict({"p": hg.hparams.PriorPrecision(m)}).to(DT)
    for bad in (
        {"data_size": 0},
        {"subset_size": 0},
        {"outer_steps": 0},
        {"kernel": "kron"},
        {"bound": "naive"},
        {"bound": "parametric", "outputs": "each"},
    ):
        with pytest.raises(ValueError):
            _hopt(m, ok, **bad)
    with pytest.raises(ValueError, match="whole data set"):
        _hopt(m, ok, bound="exact").hyper_step(train_batch=batch)
    with pytest.raises(ValueError, match="layerwise"):
        hg.log_evidence_bound(
            m, *batch, hg.hparams.PriorPrecision(m, per="parameter").to(DT), data_size=16, kernel="layerwise"
        )


def test_exact_bound_in_the_loop_equals_log_evidence_and_outer_steps_are_atomic() -> None:
    model = _mlp()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=0.5)}).to(DT)
    batch = _classification(24)
    exact = _f(hg.log_evidence(model, *batch, hp["prior"]))
    hopt = _hopt(model, hp, data_size=24, bound="exact")
    grads, info = hopt.hypergradient(train_batch=batch)
    assert info.outer_loss == pytest.approx(-exact / 24, rel=1e-12)
    k3 = _hopt(model, hp, data_size=24, bound="parametric", outer_steps=3)
    before = [p.detach().clone() for p in hp.parameters()]
    info = k3.hyper_step(train_batch=batch)
    assert info.hyper_steps == 1 and k3.hyper_steps == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, hp.parameters(), strict=True))
    moved = [p.detach().clone() for p in hp.parameters()]
    bad = (batch[0].clone(), batch[1])
    bad[0][0, 0] = float("nan")
    with pytest.raises(hg.NonFiniteError):
        k3.hyper_step(train_batch=bad)
    assert all(torch.equal(a, b) for a, b in zip(moved, hp.parameters(), strict=True))
    assert k3.hyper_steps == 1


def test_schedule_helper_and_training_raises_the_evidence() -> None:
    torch.manual_seed(0)
    model = _mlp()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1e-2)}).to(DT)
    x, y = _classification(96, seed=4)
    hopt = _hopt(model, hp, data_size=96, subset_size=16, burn_in=5, every=5)
    start = _f(hg.log_evidence(model, x, y, hp["prior"]))
    due = []
    for i in range(60):
        sl = slice((i % 3) * 32, (i % 3 + 1) * 32)
        hopt.step((x[sl], y[sl]))
        if hopt.hyper_step_due():
            due.append(hopt.inner_steps)
            hopt.hyper_step(train_batch=(x[sl], y[sl]))
    assert due[:3] == [5, 10, 15]
    assert _f(hg.log_evidence(model, x, y, hp["prior"])) > start


def test_output_gradients_fall_back_to_one_backward_pass_per_output(monkeypatch) -> None:
    """The layerwise kernel takes the C output gradients in one vectorised backward pass; where
    that pass fails (an operation without a batching rule), one pass per output gives the same
    bound and gradient."""
    model = _mlp()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.5).to(DT)
    x, y = _classification()

    def value_and_grad() -> tuple[torch.Tensor, ...]:
        out = []
        for outputs in ("all", "each"):
            b = hg.log_evidence_bound(model, x, y, prior, data_size=24, subset_size=6, outputs=outputs)
            out += [b.detach(), *torch.autograd.grad(b, list(prior.parameters()))]
        return tuple(out)

    batched = value_and_grad()
    real_grad = torch.autograd.grad
    calls = []

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls.append(1)
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    looped = value_and_grad()
    assert len(calls) == 2  # the fallback was taken
    for a, b in zip(batched, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_through_map_is_the_total_derivative_of_the_bound_at_the_map() -> None:
    """through_map=True: the hypergradient is d/dlambda of the bound at theta*(lambda), the MAP
    moving with the precisions (central differences around MAPs solved to 1e-16 by L-BFGS and
    Newton); the default fixed-weights one differs (so the test would catch a missing term)."""
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # torch.func.hessian below: torch 2.13 warns once when forward AD loads
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = v.split([s.numel() for s in shapes])
        return {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def fit(raw: list[float]) -> nn.ModuleDict:
        """Priors at ``raw`` and the model moved to their MAP."""
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer").to(DT)})
        with torch.no_grad():
            for p, r in zip(hp["prior"].parameters(), raw, strict=True):
                p.fill_(r)
        prec = {n: v.detach() for n, v in hp["prior"].precisions().items()}

        def objective(v: torch.Tensor) -> torch.Tensor:
            w = unflat(v)
            penalty = sum((prec[n] * w[n].square()).sum() for n in names)
            return F.cross_entropy(torch.func.functional_call(model, w, (x,)), y) + 0.5 * penalty / 12

        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(v)
            value.backward()
            return value

        opt.step(closure)
        v = v.detach()
        for _ in range(5):  # Newton to the last digit
            v = v - torch.linalg.solve(torch.func.hessian(objective)(v), torch.func.grad(objective)(v))
        assert float(torch.func.grad(objective)(v).norm()) < 1e-12
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(unflat(v)[n])
        return hp

    def outer(raw: list[float]) -> float:  # -bound / N at the MAP of raw
        hp = fit(raw)
        return -_f(hg.log_evidence_bound(model, x, y, hp["prior"], data_size=12, subset_size=4)) / 12

    raw0 = [0.2, -0.3]
    hp = fit(raw0)
    kw = {"likelihood": "classification", "data_size": 12, "subset_size": 4}
    opts = {
        "inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.0),
        "outer_optimizer": torch.optim.SGD(hp.parameters(), lr=0.0),
    }
    total, info = hg.MarginalLikelihood(
        model, hp, through_map=True, solver=hg.CG(maxiter=500, tol=1e-14, damping=0.0), **kw, **opts
    ).hypergradient(train_batch=(x, y))
    fixed, _ = hg.MarginalLikelihood(model, hp, **kw, **opts).hypergradient(train_batch=(x, y))
    eps = 1e-5
    for i in range(2):
        up, down = list(raw0), list(raw0)
        up[i] += eps
        down[i] -= eps
        fd = (outer(up) - outer(down)) / (2 * eps)
        assert float(total[i]) == pytest.approx(fd, rel=1e-7, abs=1e-10)
        assert abs(float(fixed[i]) - fd) > 0.1 * abs(fd)  # the fixed-weights partial is not it
    assert info.solver_status == "converged"


def test_through_map_solver_must_be_a_linear_solver() -> None:
    model = _mlp()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer").to(DT)})
    with pytest.raises(TypeError, match="solver must be an hg.LinearSolver"):
        hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=24,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
            through_map=True,
            solver="cg",  # type: ignore[arg-type]
        )


def test_a_weight_decay_given_for_the_prior_is_named_with_the_container_to_use():
    model = torch.nn.Linear(3, 2)
    wd = hg.hparams.WeightDecay(model)
    said = r"found 0\): a WeightDecay is a penalty in train_loss.*PriorPrecision"
    with pytest.raises(ValueError, match=said):
        hg.MarginalLikelihood(
            model,
            wd,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.1),
            data_size=10,
            likelihood="classification",
        )
