"""Round 13, marginal likelihood on realistic models: conv nets, regression variants, many classes.

Float64 proofs against an independent reference: per-example ``torch.func.jacrev`` Jacobians
stacked into the dense GGN, :math:`\\log\\det(P_0 + J^\\top\\Lambda J) - \\log\\det P_0`, with
``torch.logdet`` and autograd for the hypergradient (no code of the library). Conv1d/Conv2d with
padding, stride, groups and dilation, pooling, GroupNorm/LayerNorm, a residual block and SiLU/GELU;
a frozen conv feature extractor under a linear head (layerwise = dense = reference); multi-output
regression with a learned noise; 100 classes with ``outputs="each"`` and ``"all"``.

Fix: the softmax whitener took ``softmax(f).sqrt()``; where a probability underflowed to 0 (a
logit gap above ~104 in float32) the derivative of the square root was infinite, and every
hypergradient that differentiates through the outputs (``through_map=True``, a learned
augmentation) was NaN while the bound itself was finite: every hyperstep was refused.
"""

from __future__ import annotations

import math

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
    *,
    likelihood: str = "classification",
    sigma: Tensor | None = None,
) -> Tensor:
    """The linearised-Laplace log evidence from per-example ``jacrev`` Jacobians and a dense
    ``(P, P)`` GGN (``prec``: a precision per trained parameter name, scalar or shaped)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def one(theta: dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, {**params, **theta}, (xi.unsqueeze(0),)).reshape(-1)

    theta = {n: params[n] for n in names}
    rows = []
    for i in range(x.shape[0]):
        jac = torch.func.jacrev(one)(theta, x[i])
        rows.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1))
    j = torch.stack(rows)  # (N, C, P)
    out = model(x).detach().reshape(x.shape[0], -1)
    delta = torch.cat([(prec[n] * torch.ones_like(params[n])).reshape(-1) for n in names])
    w = torch.cat([params[n].reshape(-1) for n in names])
    if likelihood == "classification":
        p = out.softmax(1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        ggn = torch.einsum("ncp,ncd,ndq->pq", j, lam, j)
        log_lik = -F.cross_entropy(out, y, reduction="sum")
    else:
        assert sigma is not None
        ggn = torch.einsum("ncp,ncq->pq", j, j) / sigma**2
        r = y.reshape(out.shape) - out
        log_lik = -0.5 * (r / sigma).square().sum() - out.numel() * (
            sigma.log() + 0.5 * math.log(2 * math.pi)
        )
    log_det = torch.logdet(torch.diag(delta) + ggn) - delta.log().sum()
    return log_lik - 0.5 * (delta * w.square()).sum() - 0.5 * log_det


def _reference_with_grads(
    model: nn.Module, prior: hg.hparams.PriorPrecision, x: Tensor, y: Tensor, **kw: object
) -> tuple[Tensor, list[Tensor]]:
    """The reference and its gradient w.r.t. copies of the prior's raw tensors."""
    raw = [r.detach().clone().requires_grad_(True) for r in prior.parameters()]
    prec = {n: raw[prior._index[n]].exp() for n in prior.names}
    value = _reference(model, x, y, prec, **kw)  # type: ignore[arg-type]
    return value.detach(), list(torch.autograd.grad(value, raw))


def _randomise(prior: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for r in prior.parameters():
            r.normal_(0.0, scale)


def _assert_close(got: Tensor | list[Tensor], want: Tensor | list[Tensor], rtol: float = 1e-9) -> None:
    got = [got] if isinstance(got, Tensor) else got
    want = [want] if isinstance(want, Tensor) else want
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(
            a.detach(), b.detach(), rtol=rtol, atol=rtol * (1.0 + float(b.detach().abs().max()))
        )


# ------------------------------------------------------------------ conv nets


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, ch)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.norm(self.conv(x)))


def _conv2d(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=2, stride=2, dilation=2),
        nn.GELU(),
        _Residual(4),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.LayerNorm(16),
        nn.Linear(16, classes),
    )


def _conv1d(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, stride=2, groups=2),
        nn.SiLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 3, dilation=2, padding=2, bias=False),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


_NETS = {"conv2d": (_conv2d, (1, 8, 8)), "conv1d": (_conv1d, (2, 16))}


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize("net", sorted(_NETS))
def test_conv_nets_get_the_evidence_and_hypergradient_of_per_example_jacobians(net: str, per: str) -> None:
    """Conv1d/Conv2d (padding, stride, groups, dilation), pooling, GroupNorm/LayerNorm, a residual
    block, SiLU/GELU: the exact evidence and its gradient w.r.t. every precision (one, per layer,
    per weight: conv weights and norm scales included) equal the dense reference's."""
    make, shape = _NETS[net]
    torch.manual_seed(1)
    model = make().to(DT).eval()
    x, y = torch.randn(8, *shape, dtype=DT), torch.randint(0, 3, (8,))
    prior = hg.hparams.PriorPrecision(model, per=per).to(DT)
    _randomise(prior)
    value = hg.log_evidence(model, x, y, prior)
    grads = torch.autograd.grad(value, list(prior.parameters()))
    want, want_grads = _reference_with_grads(model, prior, x, y)
    _assert_close(value, want)
    _assert_close(list(grads), want_grads)
    if per != "parameter":
        _assert_close(hg.log_evidence(model, x, y, prior, form="parametric"), want)
        with pytest.raises(ValueError, match="layerwise"):
            hg.log_evidence(model, x, y, prior, kernel="layerwise")


@pytest.mark.parametrize("per", ["global", "layer"])
def test_a_frozen_conv_extractor_under_a_linear_head_gets_the_same_evidence_from_both_kernels(
    per: str,
) -> None:
    """Only an MLP head trains (the conv extractor frozen): the layerwise kernel applies, and it,
    the dense one and the reference (over the head's weights only) agree for the bound of blocks
    of 4 and for the exact evidence, gradient included."""
    torch.manual_seed(2)
    features = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.GroupNorm(1, 3), nn.SiLU(), nn.Flatten()
    )
    head = nn.Sequential(nn.Linear(48, 6), nn.GELU(), nn.Linear(6, 4))
    model = nn.Sequential(features, head).to(DT).eval()
    features.requires_grad_(False)
    x, y = torch.randn(8, 1, 8, 8, dtype=DT), torch.randint(0, 4, (8,))
    prior = hg.hparams.PriorPrecision(model, per=per).to(DT)
    assert all(n.startswith("1.") for n in prior.names)
    _randomise(prior)
    out = {}
    for kernel in ("layerwise", "dense"):
        for sub in (4, None):
            b = hg.log_evidence_bound(model, x, y, prior, data_size=8, subset_size=sub, kernel=kernel)
            out[kernel, sub] = (b.detach(), torch.autograd.grad(b, list(prior.parameters())))
    want, want_grads = _reference_with_grads(model, prior, x, y)
    _assert_close(out["layerwise", None][0], want)
    _assert_close(list(out["layerwise", None][1]), want_grads)
    for sub in (4, None):
        _assert_close(out["dense", sub][0], out["layerwise", sub][0])
        _assert_close(list(out["dense", sub][1]), list(out["layerwise", sub][1]))
    assert float(out["layerwise", 4][0]) < float(want)  # Fischer: blocks lose the cross terms


def test_a_conv_net_learns_layer_precisions_online_with_the_hypergradient_of_the_reference() -> None:
    """MarginalLikelihood on a conv net (per-layer precisions on the conv weights, norm layers in
    eval mode): a MAP step trains, the fixed-weights hypergradient of the whole batch is minus
    the reference's gradient over N, and the outer step moves every precision."""
    torch.manual_seed(3)
    model = _conv2d().to(DT).eval()
    x, y = torch.randn(10, 1, 8, 8, dtype=DT), torch.randint(0, 3, (10,))
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer").to(DT)})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=10,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    first = hopt.step((x, y))
    assert float(hopt.step((x, y))) < float(first)
    prior = hp["prior"]
    assert isinstance(prior, hg.hparams.PriorPrecision)
    _, want = _reference_with_grads(model, prior, x, y)
    before = [r.detach().clone() for r in prior.parameters()]
    hopt.hyper_step(train_batch=(x, y))
    got = [r.grad for r in prior.parameters()]
    assert all(g is not None for g in got)
    _assert_close([g for g in got if g is not None], [-g / 10 for g in want])
    after = list(prior.parameters())
    assert len(before) == 6 and all(
        float((a.detach() - b).abs()) > 0 for a, b in zip(after, before, strict=True)
    )


# ------------------------------------------------------------------ regression variants


class _Squeezed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).squeeze(-1)


@pytest.mark.parametrize("kernel", ["layerwise", "dense"])
def test_a_single_output_regression_is_the_same_with_b_or_b_by_1_outputs_and_targets(kernel: str) -> None:
    """Outputs (B,) or (B, 1), targets (B,) or (B, 1): all four give the reference's evidence."""
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, dtype=DT)
    sigma = torch.tensor(0.3, dtype=DT)
    prior = hg.hparams.PriorPrecision(mlp, per="layer").to(DT)
    _randomise(prior)
    want, _ = _reference_with_grads(mlp, prior, x, y, likelihood="regression", sigma=sigma)
    for model in (mlp, _Squeezed(mlp)):
        pr = hg.hparams.PriorPrecision(model, per="layer").to(DT)
        pr.load_state_dict(dict(zip(pr.state_dict(), prior.state_dict().values(), strict=True)))
        for targets in (y, y[:, None]):
            got = hg.log_evidence(model, x, targets, pr, likelihood="regression", noise=sigma, kernel=kernel)
            _assert_close(got, want)


@pytest.mark.parametrize("kernel", ["layerwise", "dense"])
def test_multi_output_regression_with_a_learned_noise_matches_the_reference(kernel: str) -> None:
    """Targets (B, 3) from an MLP: the evidence and its gradient w.r.t. the precisions and the
    (learned, shared) noise equal the reference's; ``outputs="each"`` is a lower bound."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(9, 4, dtype=DT), torch.randn(9, 3, dtype=DT)
    prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
    noise = hg.hparams.ObservationNoise(init=0.7, dtype=DT)
    _randomise(prior)
    value = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=noise, kernel=kernel)
    grads = torch.autograd.grad(value, [*prior.parameters(), *noise.parameters()])
    raw = [r.detach().clone().requires_grad_(True) for r in prior.parameters()]
    log_sigma = next(iter(noise.parameters())).detach().clone().requires_grad_(True)
    ref = _reference(
        model,
        x,
        y,
        {n: raw[prior._index[n]].exp() for n in prior.names},
        likelihood="regression",
        sigma=log_sigma.exp(),
    )
    want = torch.autograd.grad(ref, [*raw, log_sigma])
    _assert_close(value, ref)
    _assert_close(list(grads), list(want))
    each = hg.log_evidence_bound(
        model, x, y, prior, data_size=9, likelihood="regression", noise=noise, outputs="each", kernel=kernel
    )
    assert float(each.detach()) < float(value.detach())


def test_regression_noise_or_targets_that_do_not_fit_are_refused_clearly() -> None:
    """One noise per output is not supported (a clear error, not a broadcast); a heteroscedastic
    (mean, log variance) output without matching targets is refused naming the shapes; a
    MarginalLikelihood on a float64 model refuses float32 targets at step and hyper_step."""
    torch.manual_seed(6)
    model = nn.Linear(3, 2).to(DT)
    prior = hg.hparams.PriorPrecision(model).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    with pytest.raises(TypeError, match="observation noise init"):
        hg.hparams.ObservationNoise(init=torch.tensor([1.0, 2.0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one sigma per output is not supported"):
        hg.log_evidence(
            model,
            x,
            torch.randn(6, 2, dtype=DT),
            prior,
            likelihood="regression",
            noise=torch.ones(2, dtype=DT),
        )
    with pytest.raises(ValueError, match=r"targets of shape \(6,\) do not match.*6 examples of 2 values"):
        hg.log_evidence(model, x, torch.randn(6, dtype=DT), prior, likelihood="regression", noise=1.0)
    hp = nn.ModuleDict({"prior": prior, "noise": hg.hparams.ObservationNoise(dtype=DT)})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=6,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    before = [p.detach().clone() for p in model.parameters()]
    y32 = torch.randn(6, 2)
    with pytest.raises(ValueError, match="float32 tensor, but the model's parameters are torch.float64"):
        hopt.step((x, y32))
    with pytest.raises(ValueError, match="float32 tensor, but the model's parameters are torch.float64"):
        hopt.hyper_step(train_batch=(x, y32))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert (hopt.inner_steps, hopt.hyper_steps) == (0, 0)


# ------------------------------------------------------------------ classification


def test_a_binary_problem_needs_two_logits_and_then_is_the_logistic_evidence() -> None:
    """One logit is refused (a softmax over one output is constant), in the bound and the MAP
    step; with two logits the evidence is the reference's."""
    torch.manual_seed(7)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    one = nn.Linear(3, 1).to(DT)
    prior1 = hg.hparams.PriorPrecision(one).to(DT)
    with pytest.raises(ValueError, match="for a binary problem return two logits"):
        hg.log_evidence(one, x, y, prior1)
    hp = nn.ModuleDict({"prior": prior1})
    hopt = hg.MarginalLikelihood(
        one,
        hp,
        likelihood="classification",
        data_size=8,
        inner_optimizer=torch.optim.SGD(one.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    with pytest.raises(ValueError, match="for a binary problem return two logits"):
        hopt.step((x, y))
    two = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    prior2 = hg.hparams.PriorPrecision(two, per="layer").to(DT)
    _randomise(prior2)
    want, _ = _reference_with_grads(two, prior2, x, y)
    _assert_close(hg.log_evidence(two, x, y, prior2), want)


def test_a_hundred_classes_each_and_all_agree_across_kernels_and_order_as_fischer_says() -> None:
    """C = 100: the layerwise and dense kernels give the same bound and gradient for
    ``outputs="all"`` and ``"each"``; ``"each"`` (100 kernels (M, M)) is below ``"all"`` (one
    (MC, MC)), blocks below the whole batch, and the whole batch with ``"all"`` is the reference."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 100)).to(DT)
    x, y = torch.randn(8, 5, dtype=DT), torch.randint(0, 100, (8,))
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.5).to(DT)
    got = {}
    for kernel in ("layerwise", "dense"):
        for outputs in ("all", "each"):
            for sub in (4, None):
                b = hg.log_evidence_bound(
                    model, x, y, prior, data_size=8, outputs=outputs, subset_size=sub, kernel=kernel
                )
                got[kernel, outputs, sub] = (
                    b.detach(),
                    list(torch.autograd.grad(b, list(prior.parameters()))),
                )
    for key in [k for k in got if k[0] == "dense"]:
        _assert_close(got[key][0], got[("layerwise", *key[1:])][0])
        _assert_close(got[key][1], got[("layerwise", *key[1:])][1])
    want, want_grads = _reference_with_grads(model, prior, x, y)
    _assert_close(got["layerwise", "all", None][0], want)
    _assert_close(got["layerwise", "all", None][1], want_grads)
    value = {k[1:]: float(v[0]) for k, v in got.items() if k[0] == "layerwise"}
    assert value["each", 4] < value["all", 4] < value["all", None]
    assert value["each", 4] < value["each", None] < value["all", None]


# ------------------------------------------------------------------ the fix: underflowing probabilities


def _confident(dtype: torch.dtype, gap: float) -> nn.Module:
    torch.manual_seed(9)
    head = nn.Linear(64, 3)
    with torch.no_grad():
        head.weight.mul_(0.05)
        head.bias.copy_(torch.tensor([gap, 0.0, -gap]))
    return nn.Sequential(nn.Flatten(), head).to(dtype)


def test_an_augmentation_hypergradient_is_finite_where_a_probability_underflows() -> None:
    """Logits 1600 apart (float64: the smallest probability is exactly 0): the gradient w.r.t.
    the translation range and the precision was NaN (the bound finite); it now equals central
    differences of the bound (the same augmentation drawn for every evaluation)."""
    model = _confident(DT, 800.0)
    x, y = torch.randn(6, 8, 8, dtype=DT), torch.tensor([0, 0, 1, 0, 2, 0])
    prior = hg.hparams.PriorPrecision(model).to(DT)
    aug = hg.hparams.RandomTranslation((8, 8), init=1.0).to(DT)
    assert float(model(x).detach().softmax(1).min()) == 0.0

    def bound() -> Tensor:
        torch.manual_seed(0)
        return hg.log_evidence_bound(
            model, x, y, prior, data_size=6, augmentation=aug, samples=3, subset_size=3
        )

    grads = torch.autograd.grad(bound(), [aug.raw, *prior.parameters()])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    eps = 1e-5
    for p, g in zip([aug.raw, *prior.parameters()], grads, strict=True):
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = float(bound())
                p.view(-1)[i] -= 2 * eps
                down = float(bound())
                p.view(-1)[i] += eps
            assert float(g.reshape(-1)[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-4)


def test_a_through_map_hyperstep_of_a_confident_float32_model_is_that_of_float64() -> None:
    """Logits 120 apart in float32 (a probability underflowing to 0; e^-120 in float64): the
    through-the-MAP hyperstep was refused as non-finite at every call; it now gives the float64
    hypergradient (to float32 precision) and moves the precision."""
    x, y = torch.randn(6, 64), torch.tensor([0, 0, 1, 0, 2, 0])
    result = {}
    for dtype in (torch.float32, DT):
        model = _confident(dtype, 60.0)
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model).to(dtype)})
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=6,
            through_map=True,
            solver=hg.CG(maxiter=50, tol=1e-10, damping=1e-3),
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1e-3),
        )
        if dtype == torch.float32:
            assert float(model(x).detach().softmax(1).min()) == 0.0
        info = hopt.hyper_step(train_batch=(x.to(dtype), y))
        assert not info.skipped
        result[dtype] = next(iter(hp.parameters())).grad
    got, want = result[torch.float32], result[DT]
    assert got is not None and want is not None
    assert float(got) == pytest.approx(float(want), rel=1e-3)


# ------------------------------------------------------------------ through the MAP


def _through_map_against_differences(
    model: nn.Module, x: Tensor, y: Tensor, raw0: list[float], **kw: str
) -> None:
    """``through_map``'s hypergradient equals central differences of -bound/N around MAPs solved
    to the last digit (L-BFGS, then Newton with the dense Hessian); ``kw``: the bound's options."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n_data = x.shape[0]

    def unflat(v: Tensor) -> dict[str, Tensor]:
        chunks = v.split([math.prod(s) for s in shapes])
        return {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def fit(raw: list[float]) -> hg.hparams.PriorPrecision:
        prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
        with torch.no_grad():
            for p, r in zip(prior.parameters(), raw, strict=True):
                p.fill_(r)
        prec = {n: v.detach() for n, v in prior.precisions().items()}

        def objective(v: Tensor) -> Tensor:
            w = unflat(v)
            penalty = sum((prec[n] * w[n].square()).sum() for n in names)
            return F.cross_entropy(torch.func.functional_call(model, w, (x,)), y) + 0.5 * penalty / n_data

        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], max_iter=1000, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = objective(v)
            value.backward()
            return value

        opt.step(closure)
        v = v.detach()
        for _ in range(3):
            g = torch.autograd.functional.jacobian(objective, v)
            v = v - torch.linalg.solve(torch.autograd.functional.hessian(objective, v), g)
        assert float(torch.autograd.functional.jacobian(objective, v).norm()) < 1e-11
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(unflat(v)[n])
        return prior

    outputs, form = kw.get("outputs", "all"), kw.get("bound", "ntk")

    def outer(raw: list[float]) -> float:
        b = hg.log_evidence_bound(
            model, x, y, fit(raw), data_size=n_data, subset_size=4, outputs=outputs, form=form
        )
        return -float(b.detach()) / n_data

    hp = nn.ModuleDict({"prior": fit(raw0)})
    total, info = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=n_data,
        subset_size=4,
        through_map=True,
        solver=hg.CG(maxiter=500, tol=1e-14, damping=0.0),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        **kw,  # type: ignore[arg-type]
    ).hypergradient(train_batch=(x, y))
    assert info.solver_status == "converged"
    eps = 1e-5
    for i in range(len(raw0)):
        up, down = list(raw0), list(raw0)
        up[i] += eps
        down[i] -= eps
        fd = (outer(up) - outer(down)) / (2 * eps)
        assert float(total[i]) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_through_map_on_a_conv_net_is_the_total_derivative_of_the_bound() -> None:
    """A conv net (strided conv, GroupNorm, SiLU, average pooling, linear head; per-layer
    precisions) under the dense kernel, differentiated through its Jacobians."""
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.GroupNorm(1, 2),
        nn.SiLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)
    x, y = torch.randn(8, 1, 6, 6, dtype=DT), torch.randint(0, 3, (8,))
    _through_map_against_differences(model.eval(), x, y, [0.3, -0.2, 0.1])


@pytest.mark.parametrize(
    "kw",
    [{"outputs": "each"}, {"outputs": "each", "kernel": "dense"}, {"bound": "parametric"}],
    ids=["each-layerwise", "each-dense", "parametric"],
)
def test_through_map_of_the_per_output_and_parametric_bounds_is_their_total_derivative(
    kw: dict[str, str],
) -> None:
    """``through_map`` with ``outputs="each"`` (layerwise and dense kernels) and with the
    parametric form (a (P, P) Cholesky, dense Jacobians) on an MLP: the total derivative of
    the bound it names, not of the ``"all"`` one."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    _through_map_against_differences(model, x, y, [0.2, -0.1], **kw)


# ------------------------------------------------------------------ string options


def test_an_unknown_likelihood_bound_or_outputs_is_refused_naming_the_choices() -> None:
    """A heteroscedastic or Bernoulli likelihood, a Kronecker bound or a misspelt ``outputs`` was
    refused as ``'bernoulli' is not a valid Likelihood``, without the choices."""
    model = nn.Linear(3, 2).to(DT)
    prior = hg.hparams.PriorPrecision(model).to(DT)
    hp = nn.ModuleDict({"prior": prior})
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0])
    opts: dict[str, torch.optim.Optimizer] = {
        "inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "outer_optimizer": torch.optim.SGD(hp.parameters(), lr=0.1),
    }
    with pytest.raises(
        ValueError,
        match=r"'heteroscedastic' is not a valid Likelihood \(choose from 'classification', 'regression'\)",
    ):
        hg.MarginalLikelihood(model, hp, likelihood="heteroscedastic", data_size=4, **opts)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"'kron' is not a valid Bound \(choose from 'ntk', 'parametric', 'exact'\)"
    ):
        hg.MarginalLikelihood(model, hp, likelihood="classification", data_size=4, bound="kron", **opts)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"'every' is not a valid Outputs \(choose from 'all', 'each', 'sampled'\)"
    ):
        hg.log_evidence_bound(model, x, y, prior, data_size=4, outputs="every")
    with pytest.raises(ValueError, match=r"'bernoulli' is not a valid Likelihood \(choose from"):
        hg.log_evidence(model, x, y, prior, likelihood="bernoulli")
    bound = hg.log_evidence_bound(model, x, y, prior, data_size=4, outputs="each", form="ntk")
    assert bool(torch.isfinite(bound))
