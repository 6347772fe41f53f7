"""Round 22 (ml2): the marginal-likelihood bound against references written out here.

* A model that sorts its batch inside (and unsorts the outputs) whose batch happens to hold the
  smallest key first and the largest last: the round-20 check of the layerwise kernel runs only
  the first and the last example alone, which such a sort leaves in place, while it reorders the
  rows between them. The layerwise kernel then paired one example's output gradients with
  another's softmax curvature and block, silently.
* A float32 classification kernel with a weak prior (delta ~ 1e-6): its entries reach
  |J|^2 / delta, its Cholesky still succeeds, and the log det (and the precision's
  hypergradient) is silently off by the rounding of the kernel, where float64 (taken only once
  the Cholesky fails, at a weaker prior still) is exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import hypergrad as hg

DT = torch.float64


def _reference_bound(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: hg.hparams.PriorPrecision,
    data_size: int,
    blocks: list[slice],
) -> torch.Tensor:
    """The NTK block bound of a classifier written out with per-example Jacobians of the
    whole model (jacrev on one example at a time: no batch-level trick can reorder them)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    prec = {n: v.detach() for n, v in prior.precisions().items()}
    rows = []
    logits = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = jacrev(lambda p, xi=xi: functional_call(model, p, (xi,))[0])(params)  # noqa: B023
        rows.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1))
        with torch.no_grad():
            logits.append(model(xi)[0])
    f = torch.stack(logits)
    d = torch.cat(
        [prec[n].expand(params[n].numel()) if prec[n].dim() == 0 else prec[n].reshape(-1) for n in names]
    )
    ll = -torch.nn.functional.cross_entropy(f, y, reduction="sum")
    p = f.softmax(1)
    log_det = torch.zeros((), dtype=DT)
    for blk in blocks:
        idx = range(x.shape[0])[blk]
        j = torch.cat([rows[i] for i in idx])  # (m C, P)
        lam = torch.block_diag(*[torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in idx])
        g = j.T @ lam @ j
        log_det = log_det + torch.logdet(torch.diag(d) + g) - d.log().sum()
    theta = torch.cat([params[n].reshape(-1) for n in names])
    return data_size / x.shape[0] * (ll - 0.5 * log_det) - 0.5 * (d * theta**2).sum()


class _SortedByFirstFeature(nn.Module):
    """Sorts the batch by its first feature, runs an MLP, puts the outputs back in order (a
    sort by length before a packed RNN, written small). Per example: one example alone gives
    its row of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = x[:, 0].argsort()
        return self.net(x[order])[order.argsort()]


def test_a_sort_inside_the_model_that_keeps_the_first_and_last_example_in_place_gets_the_true_bound() -> None:
    torch.manual_seed(0)
    model = _SortedByFirstFeature().to(DT)
    x = torch.randn(6, 3, dtype=DT)
    # the smallest key first and the largest last; the ones between out of order
    x[:, 0] = torch.tensor([-5.0, 2.0, -1.0, 1.0, 0.5, 5.0], dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():  # per example, as the library's checks require
        assert torch.allclose(model(x[2:3]), model(x)[2:3])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.0).to(DT)
    blocks = [slice(0, 3), slice(3, 6)]
    want = _reference_bound(model, x, y, prior, data_size=6, blocks=blocks)
    dense = hg.log_evidence_bound(model, x, y, prior, data_size=6, subset_size=3, kernel="dense")
    # (the dense kernel is right)
    assert float(dense.detach()) == pytest.approx(float(want.detach()), abs=1e-8)
    got = hg.log_evidence_bound(model, x, y, prior, data_size=6, subset_size=3)  # kernel="auto"
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-8)  # (was -12.1446 for -12.2906)
    exact = hg.log_evidence(model, x, y, prior)
    whole = _reference_bound(model, x, y, prior, 6, [slice(0, 6)])
    assert float(exact.detach()) == pytest.approx(float(whole.detach()), abs=1e-8)


def test_the_sorting_model_on_a_batch_already_in_order_gets_the_true_bound() -> None:
    """(passes on the current code: the bound of a reordering model is right when the reordering
    is the identity, with kernel="auto" (layerwise today; a fix of the test above may send it to
    the dense kernel) and "dense")"""
    torch.manual_seed(0)
    model = _SortedByFirstFeature().to(DT)
    x = torch.randn(6, 3, dtype=DT)
    x[:, 0] = torch.linspace(-2.0, 2.0, 6, dtype=DT)  # already sorted: no reordering at all
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.7).to(DT)
    want = _reference_bound(model, x, y, prior, data_size=12, blocks=[slice(0, 4), slice(4, 6)])
    for kernel in ("auto", "dense"):
        got = hg.log_evidence_bound(model, x, y, prior, data_size=12, subset_size=4, kernel=kernel)
        assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-8)


def _mlp_at(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 3)).to(DT)
    x = torch.randn(20, 4, dtype=DT) * 3
    y = torch.randint(0, 3, (20,))
    return model.to(dtype), x.to(dtype), y


@pytest.mark.parametrize("subset_size", [None, 5])
def test_a_float32_kernel_of_a_weak_prior_gives_the_float64_bound_and_hypergradient(
    subset_size: int | None,
) -> None:
    delta = 1e-6
    m64, x64, y = _mlp_at(DT)
    p64 = hg.hparams.PriorPrecision(m64, per="layer", init=delta).to(DT)
    want = hg.log_evidence_bound(m64, x64, y, p64, data_size=100, subset_size=subset_size)
    g_want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(want, list(p64.parameters()))])
    m32, x32, _ = _mlp_at(torch.float32)
    p32 = hg.hparams.PriorPrecision(m32, per="layer", init=delta)
    got = hg.log_evidence_bound(m32, x32, y, p32, data_size=100, subset_size=subset_size)
    g_got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(got, list(p32.parameters()))])
    assert got.dtype == torch.float32
    # float32 rounding of the result (~1500 nats) and of the weights: ~1e-3 nats
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=0.02)  # (was 4.0 / 2.8 nats off)
    assert torch.allclose(g_got.double(), g_want, rtol=1e-4, atol=1e-4)  # (32.99 for 34.86)


@pytest.mark.parametrize("delta", [1e-2, 1e-8])
def test_a_float32_kernel_away_from_the_rounding_band_already_matches_float64(delta: float) -> None:
    """(passes on the current code: at a moderate prior float32 is accurate, and at a very weak
    one the Cholesky fails and the kernel is formed in float64; the band between them is the
    xfail above)"""
    m64, x64, y = _mlp_at(DT)
    p64 = hg.hparams.PriorPrecision(m64, per="layer", init=delta).to(DT)
    want = hg.log_evidence_bound(m64, x64, y, p64, data_size=100, subset_size=5)
    g_want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(want, list(p64.parameters()))])
    m32, x32, _ = _mlp_at(torch.float32)
    p32 = hg.hparams.PriorPrecision(m32, per="layer", init=delta)
    got = hg.log_evidence_bound(m32, x32, y, p32, data_size=100, subset_size=5)
    g_got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(got, list(p32.parameters()))])
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=0.02)
    assert torch.allclose(g_got.double(), g_want, rtol=1e-4, atol=1e-4)


def test_regression_with_two_outputs_blocks_and_per_output_kernels_is_the_written_out_laplace() -> None:
    """(passes on the current code; not covered before in this combination: a Gaussian
    likelihood with C = 2 outputs, per-layer precisions, blocks of 3 of a batch of 7 and
    outputs="each", layerwise and dense, against the Laplace terms written out with jacrev, and
    the noise's hypergradient against central differences)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.5).to(DT)
    noise = hg.hparams.ObservationNoise(init=0.7, dtype=DT)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # (7, 2, *shape)
    prec = prior.precisions()
    d = torch.cat([prec[n].detach().expand(params[n].numel()) for n in names])
    s = 0.7
    with torch.no_grad():
        f = model(x)
    ll = torch.distributions.Normal(f, s).log_prob(y).sum()
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def ref(blocks: list[slice], each: bool) -> float:
        ld = torch.zeros((), dtype=DT)
        for blk in blocks:
            for outs in ([0], [1]) if each else ([0, 1],):
                j = torch.cat([jac[n][blk][:, outs].reshape(-1, params[n].numel()) for n in names], 1)
                k = j / d @ j.T / s**2
                ld = ld + torch.logdet(torch.eye(k.shape[0], dtype=DT) + k)
        return float(20 / 7 * (ll - 0.5 * ld) - 0.5 * (d * theta**2).sum())

    blocks = [slice(0, 3), slice(3, 6), slice(6, 7)]
    for kernel in ("layerwise", "dense"):
        for each in (False, True):
            got = hg.log_evidence_bound(
                model,
                x,
                y,
                prior,
                data_size=20,
                likelihood="regression",
                noise=noise,
                subset_size=3,
                outputs="each" if each else "all",
                kernel=kernel,
            )
            assert float(got.detach()) == pytest.approx(ref(blocks, each), abs=1e-9)

    def bound() -> torch.Tensor:
        return hg.log_evidence_bound(
            model, x, y, prior, data_size=20, likelihood="regression", noise=noise, subset_size=3
        )

    (g,) = torch.autograd.grad(bound(), [noise.raw])
    h, vals = 1e-5, []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            noise.raw.add_(sign * h)
        vals.append(float(bound().detach()))
        with torch.no_grad():
            noise.raw.sub_(sign * h)
    assert float(g) == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-6)


def test_a_float32_parametric_bound_of_a_weak_per_weight_prior_gives_the_float64_hypergradient() -> None:
    torch.manual_seed(0)
    m64 = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    x64, y = torch.randn(40, 4, dtype=DT) * 3, torch.randint(0, 3, (40,))
    m32 = copy.deepcopy(m64).float()
    grads, values = [], []
    for model, x in ((m64, x64), (m32, x64.float())):
        prior = hg.hparams.PriorPrecision(model, per="parameter", init=1e-5)
        if model is m64:
            prior = prior.to(DT)
        b = hg.log_evidence_bound(model, x, y, prior, data_size=40, form="parametric")
        grads.append(
            torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(b, list(prior.parameters()))])
        )
        values.append(float(b.detach()))
    assert values[1] == pytest.approx(values[0], abs=5e-3)  # (was 0.09 nats off)
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert rel < 1e-4  # (was 0.016)


class _KeywordCalls(nn.Module):
    """An MLP whose layers are called with their input by keyword (``self.lin(input=h)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.tanh(self.a(input=x)))


def test_layers_called_with_their_input_by_keyword_get_the_bound_and_a_hyperstep() -> None:
    torch.manual_seed(0)
    model = _KeywordCalls().to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.3).to(DT)
    want = _reference_bound(model, x, y, prior, data_size=12, blocks=[slice(0, 3), slice(3, 6)])
    got = hg.log_evidence_bound(model, x, y, prior, data_size=12, subset_size=3)  # kernel="auto"
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-9)
    hp = nn.ModuleDict({"prior": prior})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=12,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        subset_size=3,
    )
    hopt.step((x, y))
    want = _reference_bound(model, x, y, prior, data_size=12, blocks=[slice(0, 3), slice(3, 6)])
    info = hopt.hyper_step(train_batch=(x, y))
    assert not info.skipped
    assert info.outer_loss == pytest.approx(-float(want.detach()) / 12, rel=1e-9)
