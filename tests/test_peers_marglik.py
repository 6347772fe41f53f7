"""Marginal likelihood against what researchers' models and scripts do (laplace-torch-style cases).

Every number is checked in float64 against an independent reference: the exact evidence of Bayesian
linear regression (a Gaussian's log density, differentiated by autograd), or a linearised-Laplace
evidence written out here from explicit per-output Jacobians (``torch.autograd.grad`` of each
output, on the model as the user wrote it), or central finite differences. Cases: in-place
activations, weights tied between two layers, ``nn.Linear`` subclasses and hooks (the layerwise
kernel's assumptions), frozen bodies (last-layer Laplace), hyperparameters and model in different
dtypes, empty batches, padding labels, BatchNorm without running statistics, counts given as NumPy
integers, inference mode, non-finite batches with an outer scheduler, and resuming.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64


def _data(n: int = 12, d: int = 4, c: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g)


def _reference(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior: hg.hparams.PriorPrecision,
    *,
    data_size: int | None = None,
    subset_size: int | None = None,
) -> Tensor:
    """The linearised-Laplace classification bound from explicit Jacobians ``(BC, P)``: one
    ``autograd.grad`` per output on the model as written (tied weights summed by autograd itself),
    the softmax Hessian ``diag(p) - p p^T`` per example, ``log det(I + Lambda_k K_k)`` per block."""
    params = dict(model.named_parameters())
    prec = prior.precisions()
    names = [n for n in prior.names if params[n].requires_grad]
    f = model(x)
    b, c = f.shape
    rows = []
    for i in range(b):
        for j in range(c):
            gs = torch.autograd.grad(
                f[i, j], [params[n] for n in names], retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                        for n, g in zip(names, gs, strict=True)
                    ]
                )
            )
    jac = torch.stack(rows).detach()
    pinv = torch.cat([(1 / prec[n]).expand(params[n].shape).reshape(-1) for n in names])
    kern = (jac * pinv) @ jac.T
    p = torch.softmax(f.detach(), 1)
    lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    size = b if subset_size is None else subset_size
    logdet = sum(
        torch.linalg.slogdet(
            torch.eye((min(s + size, b) - s) * c, dtype=DT)
            + (lam @ kern)[s * c : (s + size) * c, s * c : (s + size) * c]
        )[1]
        for s in range(0, b, size)
    )
    loglik = -F.cross_entropy(f.detach(), y, reduction="sum")
    quad = sum((prec[n] * params[n].detach().square()).sum() for n in names)
    n_data = b if data_size is None else data_size
    return n_data / b * (loglik - 0.5 * logdet) - 0.5 * quad


def _agree(model: nn.Module, per: str = "layer", kernels: Sequence[str] = ("auto", "dense")) -> None:
    """The library's bound (value and gradient w.r.t. the raw precisions) equals the reference."""
    x, y = _data()
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.7).to(DT)
    with torch.no_grad():
        for r in prior.raw:
            r.add_(0.3 * torch.randn(r.shape, dtype=DT))
    ref = _reference(model, x, y, prior, data_size=40, subset_size=4)
    gref = torch.autograd.grad(ref, list(prior.raw))
    for kernel in kernels:
        got = hg.log_evidence_bound(model, x, y, prior, data_size=40, subset_size=4, kernel=kernel)
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-9, msg=f"kernel={kernel}")
        for a, b in zip(torch.autograd.grad(got, list(prior.raw)), gref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"kernel={kernel}")


# ------------------------------------------------------------------ the layerwise kernel's assumptions


def test_inplace_relu_after_a_linear_layer_gives_the_true_evidence_and_gradient() -> None:
    # before: the layerwise kernel took the output gradients w.r.t. the tensor ReLU(inplace=True)
    # had overwritten (those of the activation): -22.376 against the true -22.004 (exact evidence)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).to(DT)
    _agree(model, kernels=("auto", "layerwise", "dense"))
    x, y = _data()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.7).to(DT)
    raw = prior.raw[0]

    def bound() -> float:
        return float(hg.log_evidence_bound(model, x, y, prior, data_size=40, subset_size=4).detach())

    (grad,) = torch.autograd.grad(
        hg.log_evidence_bound(model, x, y, prior, data_size=40, subset_size=4), [raw]
    )
    torch.testing.assert_close(grad, central_difference(bound, raw, eps=1e-6), rtol=1e-6, atol=1e-8)


class _Tied(nn.Module):
    """Two layers sharing one weight matrix (a tied encoder), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("per", ["global", "layer"])
def test_weight_tied_between_two_layers_counts_both_uses(per: str) -> None:
    # before: the layerwise kernel summed J_a J_a^T + J_b J_b^T and dropped the cross terms of the
    # shared weight: -17.989 against the true -17.974 (exact evidence, per layer)
    torch.manual_seed(0)
    _agree(_Tied().to(DT), per=per)


def test_a_linear_subclass_computing_otherwise_is_not_taken_for_nn_linear() -> None:
    class Scaled(nn.Linear):  # e.g. a masked or rescaled weight
        def forward(self, a: Tensor) -> Tensor:
            return F.linear(a, 2 * self.weight, self.bias)

    torch.manual_seed(0)
    # before: the layerwise kernel assumed z = W a + b: -23.658 against the true -25.505
    _agree(nn.Sequential(Scaled(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT))


def test_a_forward_hook_on_a_linear_layer_is_part_of_the_model() -> None:
    # before: the layerwise kernel read the hooked output and the unhooked weight's input:
    # -23.419 against the true -26.635 (exact evidence)
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hooked[0].register_forward_hook(lambda m, i, o: 3 * o)
    _agree(hooked)
    with pytest.raises(ValueError, match="no hooks, not tied"):
        prior = hg.hparams.PriorPrecision(hooked, per="layer").to(DT)
        hg.log_evidence_bound(hooked, *_data(), prior, data_size=12, kernel="layerwise")


def test_frozen_body_is_last_layer_laplace_with_either_kernel_and_either_way_of_leaving_it_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    frozen = copy.deepcopy(model)
    frozen[0].requires_grad_(False)
    _agree(frozen)  # the reference's Jacobian holds the last layer's columns only
    x, y = _data()
    a = hg.log_evidence(frozen, x, y, hg.hparams.PriorPrecision(frozen, per="layer", init=0.7).to(DT))
    only_last = hg.hparams.PriorPrecision(
        model, per="layer", init=0.7, include=lambda n: n.startswith("2.")
    ).to(DT)
    b = hg.log_evidence(model, x, y, only_last)
    everything = hg.log_evidence(model, x, y, hg.hparams.PriorPrecision(model, per="layer", init=0.7).to(DT))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    assert abs(float((a - everything).detach())) > 1e-3  # the body's uncertainty is a different number


def test_models_with_batchnorm_in_eval_mode_use_the_running_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    model(torch.randn(64, 4, dtype=DT))  # running statistics away from 0 / 1
    model.eval()
    _agree(model)
    affine_free = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False), nn.Tanh(), nn.Linear(8, 3)
    ).to(DT)
    affine_free(torch.randn(64, 4, dtype=DT))
    affine_free.eval()
    _agree(affine_free, kernels=("auto", "layerwise", "dense"))


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode_too() -> None:
    # before: torch's "Expected more than 1 value per channel when training" from inside the
    # Jacobian (the layer normalises with batch statistics even in eval mode)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3)).to(
        DT
    )
    model.eval()
    prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
    with pytest.raises(ValueError, match="without running statistics"):
        hg.log_evidence_bound(model, *_data(), prior, data_size=12)
    hp = nn.ModuleDict({"prior": prior})
    hopt = _hopt(model, hp)
    model.train()
    hopt.step(_data())  # training is unaffected
    model.eval()
    before = copy.deepcopy(hp.state_dict())
    with pytest.raises(ValueError, match="without running statistics"):
        hopt.hyper_step(train_batch=_data())
    assert all(torch.equal(v, hp.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------ Bayesian linear regression, exactly


def _blr() -> tuple[Tensor, Tensor, nn.Linear, nn.ModuleDict]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    y = x @ torch.randn(4, 1, generator=g, dtype=DT) + 0.3 + 0.4 * torch.randn(30, 1, generator=g, dtype=DT)
    model = nn.Linear(4, 1).to(DT)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="parameter"),
            "noise": hg.hparams.ObservationNoise(0.8),
        }
    ).to(DT)
    with torch.no_grad():
        for r in hp["prior"].raw:
            r.copy_(0.4 * torch.randn(r.shape, generator=g, dtype=DT))
    return x, y, model, hp


def _closed_form(x: Tensor, raws: Sequence[Tensor], log_sigma: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """log N(y | 0, sigma^2 I + Phi P0^-1 Phi^T) with Phi = [x, 1] (weights then bias), and the MAP."""
    phi = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    delta = torch.cat([r.reshape(-1) for r in raws]).exp()
    s2 = (2 * log_sigma).exp()
    cov = s2 * torch.eye(len(x), dtype=DT) + (phi / delta) @ phi.T
    ev = torch.distributions.MultivariateNormal(torch.zeros(len(x), dtype=DT), cov).log_prob(y[:, 0])
    a = torch.diag(delta) + phi.T @ phi / s2
    return ev, torch.linalg.solve(a, phi.T @ y / s2).detach()


def test_regression_evidence_and_hypergradient_per_weight_with_bias_are_the_closed_form() -> None:
    x, y, model, hp = _blr()
    raws = [r.detach().clone().requires_grad_() for r in hp["prior"].raw]
    ls = hp["noise"].raw.detach().clone().requires_grad_()
    closed, theta = _closed_form(x, raws, ls, y)
    with torch.no_grad():
        model.weight.copy_(theta[:4].T)
        model.bias.copy_(theta[4])
    # the total derivative of the Gaussian's log density (the MAP moving with the hyperparameters):
    # at the MAP of a linear model it equals the partial derivative the library takes
    gclosed = torch.autograd.grad(closed, [*raws, ls])
    for form in ("ntk", "parametric"):
        ev = hg.log_evidence(model, x, y, hp["prior"], likelihood="regression", noise=hp["noise"], form=form)
        torch.testing.assert_close(ev, closed, rtol=1e-12, atol=1e-10)
        for a, b in zip(torch.autograd.grad(ev, list(hp.parameters())), gclosed, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the hyperstep's .grad is -(1/N) of it (bound='exact': the whole data set, one block)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=30,
        bound="exact",
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    info = hopt.hyper_step(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(-float(closed.detach()) / 30, rel=1e-12)
    for p, b in zip(hp.parameters(), gclosed, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, -b / 30, rtol=1e-9, atol=1e-12)


def test_regression_block_bound_is_the_sum_of_block_gaussians_and_float32_follows_float64() -> None:
    x, y, model, hp = _blr()
    raws = list(hp["prior"].raw)
    _, theta = _closed_form(x, raws, hp["noise"].raw, y)
    with torch.no_grad():
        model.weight.copy_(theta[:4].T)
        model.bias.copy_(theta[4])

    def closed() -> Tensor:  # log-lik - theta^T P0 theta / 2 - sum_k log det(I + K_kk / s2) / 2
        phi = torch.cat([x, torch.ones(30, 1, dtype=DT)], 1)
        delta = torch.cat([r.reshape(-1) for r in raws]).exp()
        s2 = (2 * hp["noise"].raw).exp()
        k = (phi / delta) @ phi.T
        r = y[:, 0] - phi @ theta[:, 0]
        loglik = -0.5 * r.square().sum() / s2 - 15 * torch.log(2 * math.pi * s2)
        dets = sum(
            torch.logdet(torch.eye(10, dtype=DT) + k[i : i + 10, i : i + 10] / s2) for i in (0, 10, 20)
        )
        return loglik - 0.5 * (delta * theta[:, 0].square()).sum() - 0.5 * dets

    ref = closed()
    gref = torch.autograd.grad(ref, list(hp.parameters()))
    got = hg.log_evidence_bound(
        model, x, y, hp["prior"], likelihood="regression", noise=hp["noise"], data_size=30, subset_size=10
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, list(hp.parameters())), gref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m32, hp32 = copy.deepcopy(model).float(), copy.deepcopy(hp).float()
    got32 = hg.log_evidence_bound(
        m32,
        x.float(),
        y.float(),
        hp32["prior"],
        likelihood="regression",
        noise=hp32["noise"],
        data_size=30,
        subset_size=10,
    )
    assert got32.dtype == torch.float32
    assert float(got32.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for a, b in zip(torch.autograd.grad(got32, list(hp32.parameters())), gref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per", ["global", "parameter"])
def test_hyperparameters_in_another_dtype_than_the_model(per: str) -> None:
    # before: a float64 prior on a float32 model crashed the dense kernel ("expected m1 and m2 to
    # have the same dtype"); a float32 prior on a float64 model must not round the kernel either
    torch.manual_seed(0)
    m64 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    m32 = copy.deepcopy(m64).float()
    x, y = _data()
    ref = hg.log_evidence_bound(
        m64, x, y, hg.hparams.PriorPrecision(m64, per=per, init=0.5).to(DT), data_size=40
    )
    mixed = hg.log_evidence_bound(
        m32, x.float(), y, hg.hparams.PriorPrecision(m32, per=per, init=0.5).to(DT), data_size=40
    )
    assert mixed.dtype == torch.float32
    assert float(mixed.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    prior32 = hg.hparams.PriorPrecision(m64, per=per, init=0.5)  # forgot .double(): 0.5 is exact in float32
    torch.testing.assert_close(
        hg.log_evidence_bound(m64, x, y, prior32, data_size=40), ref, rtol=1e-13, atol=0.0
    )
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(m32, per=per, init=0.5)}).to(DT)
    hopt = _hopt(m32, hp)
    info = hopt.hyper_step(train_batch=(x.float(), y))
    assert not info.skipped and math.isfinite(info.outer_loss)
    assert all(
        p.grad is not None and p.grad.dtype == DT and bool(p.grad.ne(0).any()) for p in hp.parameters()
    )


# ------------------------------------------------------------------ clear errors instead of crashes


def _hopt(model: nn.Module, hp: nn.Module, **kw: object) -> hg.MarginalLikelihood:
    opts: dict = {"likelihood": "classification", "data_size": 40, **kw}
    return hg.MarginalLikelihood(
        model,
        hp,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        **opts,
    )


def test_empty_batches_get_a_clear_error_everywhere() -> None:
    # before: RuntimeError "cannot reshape tensor of 0 elements into shape [0, -1]"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model)}).to(DT)
    x, y = _data()
    with pytest.raises(ValueError, match="no examples"):
        hg.log_evidence_bound(model, x[:0], y[:0], hp["prior"], data_size=40)
    with pytest.raises(ValueError, match="no examples"):  # not "Invalid data_size: 0"
        hg.log_evidence(model, x[:0], y[:0], hp["prior"])
    hopt = _hopt(model, hp)
    with pytest.raises(ValueError, match="no examples"):
        hopt.step((x[:0], y[:0]))
    with pytest.raises(ValueError, match="no examples"):
        hopt.hyper_step(train_batch=(x[:0], y[:0]))
    assert hopt.inner_steps == 0 and hopt.hyper_steps == 0
    # mismatched and mis-typed targets (already refused clearly; kept so)
    before = copy.deepcopy((model.state_dict(), hp.state_dict()))
    for bad, match in (
        ((x, y[:-1]), r"integer labels \(B,\) = \(12,\)"),
        ((x, y.to(DT) + 0.5), "not whole numbers"),
        ((x, F.one_hot(y, 3)), "one-hot or soft labels"),
    ):
        with pytest.raises(ValueError, match=match):
            hopt.step(bad)
        with pytest.raises(ValueError, match=match):
            hopt.hyper_step(train_batch=bad)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in hp.state_dict().items())


def test_padding_and_out_of_range_labels_are_refused_not_skipped() -> None:
    # before: a label -100 (cross_entropy's ignore_index) was left out of the likelihood but kept
    # in the kernel: -20.336 instead of an error (-21.324 with the true label)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model)}).to(DT)
    x, y = _data()
    hopt = _hopt(model, hp)
    for bad in (-100, -1, 3):
        yb = y.clone()
        yb[0] = bad
        with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
            hg.log_evidence(model, x, yb, hp["prior"])
        with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
            hopt.step((x, yb))
    assert hopt.inner_steps == 0


def test_counts_as_numpy_or_tensor_integers_are_accepted_and_floats_or_bools_refused() -> None:
    # before: data_size=np.int64(40) (a mask's sum, a dataset's shape) was "Invalid data_size: 40"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model)}).to(DT)
    x, y = _data()
    ref = hg.log_evidence_bound(model, x, y, hp["prior"], data_size=40, subset_size=4)
    got = hg.log_evidence_bound(
        model, x, y, hp["prior"], data_size=np.int64(40), subset_size=torch.tensor(4), samples=np.int32(1)
    )
    torch.testing.assert_close(got, ref, rtol=0.0, atol=0.0)
    a = _hopt(model, hp, data_size=np.int64(40), subset_size=np.int64(4), outer_steps=np.int16(1))
    assert type(a.data_size) is int and type(a.subset_size) is int
    assert a.hyper_step(train_batch=(x, y)).outer_loss == pytest.approx(-float(ref.detach()) / 40, rel=1e-12)
    for bad in ({"data_size": 40.0}, {"data_size": True}, {"subset_size": 2.5}, {"every": 0}):
        with pytest.raises(ValueError, match="Invalid"):
            _hopt(model, hp, **bad)
    with pytest.raises(ValueError, match="Invalid subset_size"):
        hg.log_evidence_bound(model, x, y, hp["prior"], data_size=40, subset_size=0.5)  # type: ignore[arg-type]


def test_a_prior_that_is_not_a_prior_precision_and_inputs_of_another_dtype_get_clear_errors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x, y = _data()
    with pytest.raises(TypeError, match="PriorPrecision"):  # before: AttributeError 'float' ... 'names'
        hg.log_evidence_bound(model, x, y, 1.0, data_size=40)  # type: ignore[arg-type]
    prior = hg.hparams.PriorPrecision(model).to(DT)
    for kernel in ("auto", "dense"):  # before: RuntimeError from a matmul
        with pytest.raises(ValueError, match=r"convert the batch with \.to\(torch\.float64\)"):
            hg.log_evidence_bound(model, x.float(), y, prior, data_size=40, kernel=kernel)


def test_a_model_returning_a_tuple_gets_a_clear_error() -> None:
    # before: AttributeError "'tuple' object has no attribute 'reshape'" (both kernels and step)
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.head(x), x  # (logits, features), as many research models return

    model = Both().to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model)}).to(DT)
    x, y = _data()
    for kernel in ("auto", "dense"):
        with pytest.raises(TypeError, match="returns one tensor"):
            hg.log_evidence(model, x, y, hp["prior"], kernel=kernel)
    with pytest.raises(TypeError, match="returns one tensor"):
        _hopt(model, hp).step((x, y))


def test_the_bound_under_inference_mode_is_the_same_number() -> None:
    # before: RuntimeError "element 0 of tensors does not require grad" (the layerwise kernel)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
    x, y = _data()
    ref = hg.log_evidence_bound(model, x, y, prior, data_size=40, subset_size=4)
    with torch.inference_mode():
        got = hg.log_evidence_bound(model, x, y, prior, data_size=40, subset_size=4)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-13)


# ------------------------------------------------------------------ a training loop, guarded and resumed


def test_nonfinite_batch_with_outer_scheduler_changes_nothing_and_a_resume_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1)).to(DT)
    hp = nn.ModuleDict(
        {"prior": hg.hparams.PriorPrecision(model, per="layer"), "noise": hg.hparams.ObservationNoise()}
    ).to(DT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=g, dtype=DT)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=DT)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def make(m: nn.Module, h: nn.Module) -> tuple[hg.MarginalLikelihood, torch.optim.lr_scheduler.StepLR]:
        hopt = hg.MarginalLikelihood(
            m,
            h,
            likelihood="regression",
            data_size=40,
            subset_size=5,
            outer_steps=2,
            on_nonfinite="skip",
            inner_optimizer=torch.optim.Adam(m.parameters(), lr=1e-2),
            outer_optimizer=torch.optim.Adam(h.parameters(), lr=0.1),
        )
        return hopt, torch.optim.lr_scheduler.StepLR(hopt.outer_optimizer, step_size=1, gamma=0.5)

    def run(hopt: hg.MarginalLikelihood, sched: torch.optim.lr_scheduler.StepLR, epochs: int) -> None:
        for _ in range(epochs):
            for b in batches:
                hopt.step(b)
            assert not hopt.hyper_step(train_batch=batches[0]).skipped
            sched.step()

    hopt, sched = make(model, hp)
    run(hopt, sched, 2)
    state = copy.deepcopy((model.state_dict(), hp.state_dict(), hopt.state_dict(), sched.state_dict()))
    bad = (x[:10], y[:10].clone())
    bad[1][3] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = hopt.hyper_step(train_batch=bad)
    assert info.skipped and any("not finite" in str(w.message) for w in caught)
    for a, b in zip(state[:2], (model.state_dict(), hp.state_dict()), strict=True):
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert hopt.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    # resume from the saved state: the same next two epochs, bit for bit
    m2, hp2 = copy.deepcopy(model), copy.deepcopy(hp)
    m2.load_state_dict(state[0])
    hp2.load_state_dict(state[1])
    hopt2, sched2 = make(m2, hp2)
    hopt2.load_state_dict(state[2])
    sched2.load_state_dict(state[3])
    run(hopt, sched, 2)
    run(hopt2, sched2, 2)
    for a, b in ((model, m2), (hp, hp2)):
        for (n, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(v, w), n
    assert not torch.equal(hp.state_dict()["prior.raw.0"], state[1]["prior.raw.0"])  # it did move
