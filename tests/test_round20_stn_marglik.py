"""Round 20: self-tuning networks and the marginal likelihood (helper stnml).

Bugs (xfail, strict; fixes proposed in /tmp/round20/stnml-*.diff):

* The layerwise kernel paired each ``nn.Linear`` layer's row ``r`` with example ``r``: a model that
  reorders the batch before a layer and restores the order after it (``x[perm]`` ... ``h[inv]``,
  e.g. sorting by length) is still per example, so every check passed, but the kernel paired one
  example's output gradients and activations with another's whitening (a silently wrong evidence).
* The per-example check ran the first example alone only: a model mixing each example with the
  earlier ones (causal attention over the rows of the batch) got an evidence, not the ValueError.
* A :class:`~hypergrad.hparams.SelfTuned` loaded from a Delta-STN's ``state_dict()`` outside the
  method (the model and its hyperparameters rebuilt for evaluation) fed the layers ``raw`` instead
  of the centred zeros: ``model(x, hp)`` and ``layer.fixed(hp)`` were silently another network.

The other tests cover combinations no earlier test had (each says which).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------------------ references


def _reference_evidence(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: Any,
    likelihood: str,
    sigma: torch.Tensor | None = None,
    blocks: list[slice] | None = None,
) -> torch.Tensor:
    r"""The linearised-Laplace evidence written out with dense matrices: the Jacobian of the whole
    batch's outputs w.r.t. the flat trained (covered) weights by ``torch.autograd.functional``,
    :math:`\Lambda` (softmax: ``diag p - p p^T``; Gaussian: ``I / sigma^2``), and per block
    :math:`\log\det(P_0 + J^\top\Lambda J) - \log\det P_0`, no kernel trick."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n in prior.names}
    names = list(params)
    prec = {n: v.detach() for n, v in prior.precisions().items()}
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = theta.split(sizes)
        return torch.func.functional_call(
            model, {n: p.view(params[n].shape) for n, p in zip(names, parts, strict=True)}, (x,)
        )

    with torch.no_grad():
        out = f(flat)
    jac = torch.autograd.functional.jacobian(f, flat)  # (B, C, P)
    b, c = out.shape
    delta = torch.cat(
        [(prec[n].expand(params[n].shape) if prec[n].dim() == 0 else prec[n]).reshape(-1) for n in names]
    )
    if likelihood == "classification":
        log_lik = -F.cross_entropy(out, y, reduction="sum")
        p = out.softmax(1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        assert sigma is not None
        s = sigma.detach()
        r = (y.reshape(out.shape) - out) / s
        log_lik = (-0.5 * r.square() - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum()
        lam = torch.eye(c, dtype=out.dtype).expand(b, c, c) / s**2
    log_det = out.new_zeros(())
    for blk in blocks or [slice(0, b)]:
        ggn = torch.einsum("bcp,bcd,bdq->pq", jac[blk], lam[blk], jac[blk])
        log_det = log_det + torch.logdet(torch.diag(delta) + ggn) - delta.log().sum()
    return log_lik - 0.5 * log_det - 0.5 * (delta * flat.square()).sum()


def _central(fn: Any, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the float ``fn()`` w.r.t. every entry of the leaf ``t``."""
    out = torch.zeros_like(t)
    for i in range(t.numel()):
        with torch.no_grad():
            t.view(-1)[i] += eps
        a = fn()
        with torch.no_grad():
            t.view(-1)[i] -= 2 * eps
        b = fn()
        with torch.no_grad():
            t.view(-1)[i] += eps
        out.view(-1)[i] = (a - b) / (2 * eps)
    return out


# ------------------------------------------------------------------------------ marglik bugs


class _Reordering(nn.Module):
    """Per example, but the hidden layer sees the batch in reverse order (restored after it), as
    a model that sorts its batch by length and unsorts it would."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        perm = torch.arange(len(x) - 1, -1, -1)
        return self.l2(torch.tanh(self.l1(x[perm]))[perm])


def test_a_model_that_reorders_the_batch_inside_gets_the_evidence_of_its_per_example_jacobians() -> None:
    torch.manual_seed(0)
    model = _Reordering().to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 2, 1, 0])
    # it is per example: one example alone gives its row of the batch
    assert torch.allclose(model(x[:1]), model(x)[:1])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.5).to(DT)
    ref = _reference_evidence(model, x, y, prior, "classification")
    dense = hg.log_evidence(model, x, y, prior, kernel="dense").detach()
    assert float(dense) == pytest.approx(float(ref), abs=1e-9)  # (the dense kernel was right)
    got = hg.log_evidence(model, x, y, prior).detach()  # kernel="auto": layerwise for nn.Linear layers
    assert float(got) == pytest.approx(float(ref), abs=1e-9)
    # the block bound (N = 12 for a batch of 6): the blocks' Laplace terms, scaled by N / B
    bound = hg.log_evidence_bound(model, x, y, prior, data_size=12, subset_size=2).detach()
    blocks = [slice(0, 2), slice(2, 4), slice(4, 6)]
    ref_blocks = _reference_evidence(model, x, y, prior, "classification", blocks=blocks)
    quad = _quad(prior, model)
    want = 2 * (ref_blocks + 0.5 * quad) - 0.5 * quad  # N/B (log lik - log det / 2) - quad / 2
    assert float(bound) == pytest.approx(float(want), abs=1e-8)


class _CausalOverRows(nn.Module):
    """Rows of the batch taken for time steps: causal self-attention across them. Example ``n``'s
    output depends on examples ``0..n``; the first example's alone does not."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        scores = self.q(h) @ self.k(h).T / 2.0
        future = torch.ones(len(x), len(x), dtype=torch.bool).triu(1)
        a = scores.masked_fill(future, float("-inf")).softmax(1) @ self.v(h)
        return self.out(torch.tanh(a))


def test_a_model_mixing_each_example_with_the_earlier_ones_is_refused_like_one_mixing_all() -> None:
    torch.manual_seed(0)
    model = _CausalOverRows().to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        assert torch.allclose(model(x[:1]), model(x)[:1])  # the first example is unmixed ...
        assert float((model(x[-1:]) - model(x)[-1:]).abs().max()) > 0.1  # ... the last is not
    prior = hg.hparams.PriorPrecision(model, init=1.0).to(DT)
    with pytest.raises(ValueError, match="depends on the other examples in the batch"):
        hg.log_evidence(model, x, y, prior)
    hopt = hg.MarginalLikelihood(
        model,
        nn.ModuleDict({"prior": prior}),
        likelihood="classification",
        data_size=6,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(prior.parameters(), lr=0.1),
    )
    before = prior.raw[0].detach().clone()
    with pytest.raises(ValueError, match="depends on the other examples in the batch"):
        hopt.hyper_step(train_batch=(x, y))
    assert torch.equal(prior.raw[0].detach(), before)


def _quad(prior: Any, model: nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    with torch.no_grad():
        return sum((v * params[n].square()).sum() for n, v in prior.precisions().items())  # type: ignore[return-value]


# ------------------------------------------------------------------------------ marglik: coverage


class _Mixed(nn.Module):
    """A first layer without bias, BatchNorm (eval, running statistics set), a frozen layer and
    a last layer without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)
        self.l2 = nn.Linear(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.l3 = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.frozen(torch.tanh(self.l2(self.bn(self.l1(x)))))))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize("bn_affine", [True, False], ids=["bn-trained", "bn-frozen"])
def test_evidence_bound_and_gradient_of_a_mixed_model_are_the_dense_laplace_written_out(
    likelihood: str, per: str, bn_affine: bool
) -> None:
    """New: biases off, a frozen layer, BatchNorm in eval mode (its affine weights trained or
    frozen: the dense or the layerwise kernel), every prior structure, random precisions, both
    likelihoods with a learned noise, against the Laplace evidence written out with a dense
    Jacobian and GGN (not the library's kernels); the block bound against its blocks; and the
    gradient w.r.t. the raw precisions and the raw noise against central differences."""
    torch.manual_seed(1)
    model = _Mixed().to(DT)
    if not bn_affine:
        model.bn.requires_grad_(False)
    with torch.no_grad():
        model.bn.running_mean.normal_()  # type: ignore[union-attr]
        model.bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    model.eval()
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.7).to(DT)
    with torch.no_grad():
        for r in prior.raw:
            r.uniform_(-1.0, 1.0)
    x = torch.randn(8, 3, dtype=DT)
    y = torch.randint(0, 3, (8,)) if likelihood == "classification" else torch.randn(8, 3, dtype=DT)
    noise = hg.hparams.ObservationNoise(0.6, dtype=DT) if likelihood == "regression" else None
    sigma = None if noise is None else noise().detach()
    kw: dict[str, Any] = {"likelihood": likelihood, "noise": noise}
    ref = _reference_evidence(model, x, y, prior, likelihood, sigma)
    for kernel in ("auto", "dense"):
        for form in ("ntk", "parametric"):
            got = hg.log_evidence(model, x, y, prior, kernel=kernel, form=form, **kw).detach()
            assert float(got) == pytest.approx(float(ref), abs=1e-9), (kernel, form)
    blocks = [slice(0, 3), slice(3, 6), slice(6, 8)]
    ref_b = _reference_evidence(model, x, y, prior, likelihood, sigma, blocks)
    got_b = hg.log_evidence_bound(model, x, y, prior, data_size=8, subset_size=3, **kw).detach()
    assert float(got_b) == pytest.approx(float(ref_b), abs=1e-9)
    # the gradient of the block bound w.r.t. every hyperparameter, against central differences
    hps = list(prior.raw) + ([] if noise is None else [noise.raw])

    def bound() -> float:
        with torch.no_grad():
            return float(hg.log_evidence_bound(model, x, y, prior, data_size=20, subset_size=3, **kw))

    grads = torch.autograd.grad(
        hg.log_evidence_bound(model, x, y, prior, data_size=20, subset_size=3, **kw), hps
    )
    for h, g in zip(hps, grads, strict=True):
        fd = _central(bound, h, eps=1e-5)
        torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ STN bugs


def _delta_stn(steps: int = 12) -> tuple[Any, hg.hparams.SelfTuned, Any]:
    torch.manual_seed(0)

    def make_hp() -> hg.hparams.SelfTuned:
        return hg.hparams.SelfTuned(drop=hg.hparams.Rate(0.3, high=0.9), pen=hg.hparams.Positive(0.1))

    hp = make_hp()

    class Net(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.l1, self.l2 = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n)

        def forward(self, x: torch.Tensor, h: Any) -> torch.Tensor:
            d = h.draw(len(x))
            return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["drop"], self.training), d)

    model = Net(hp.size).to(DT)
    hp = hp.to(DT)
    with torch.no_grad():  # a visible response
        model.l1.hnet.normal_(0, 0.5)
        model.l2.hnet.normal_(0, 0.5)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        delta=True,
        train_steps=1,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    for _ in range(steps):
        b = (torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,)))
        hopt.step(b)
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=b)
    return model, hp, (Net, make_hp)


def test_a_delta_stn_rebuilt_from_its_state_dicts_for_evaluation_is_the_same_network() -> None:
    model, hp, (Net, make_hp) = _delta_stn()
    model.eval()
    x = torch.randn(5, 4, dtype=DT)
    with torch.no_grad():
        want = model(x, hp)
        # what the trained network is at its lambda: the base weights (Delta-STN: w(lambda) = w0)
        assert torch.allclose(model.l1.fixed(hp)(x), model.l1(x, torch.zeros(hp.size, dtype=DT)))
    # the usual export: the state dicts of the model and of the hyperparameters
    saved_model, saved_hp = model.state_dict(), hp.state_dict()
    model2 = Net(hp.size).to(DT)
    model2.load_state_dict(saved_model)
    model2.eval()
    hp2 = make_hp().to(DT)
    hp2.load_state_dict(saved_hp)
    with torch.no_grad():
        got = model2(x, hp2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(model2.l1.fixed(hp2).weight, model.l1.fixed(hp).weight, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ STN: coverage


def test_containers_mixed_layers_and_every_spec_kind_get_the_seeded_hypergradient_of_the_val_loss() -> None:
    """New: STN layers inside ``nn.ModuleList`` and ``nn.ModuleDict`` next to plain layers, a
    reflect-padded StnConv1d and a low-rank StnLinear, a Rate, a per-batch exp Positive read by
    the training loss, an Integer at its lower bound (cutout 0) and one at its upper bound, a
    Positive of size 2 read by the validation loss; the whole perturbed hyperstep (lambda and sigma,
    entropy included) against central differences of the validation loss at the same draws
    (torch's generator re-seeded), plus the entropy term's closed form for sigma."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.3, high=0.9),
        pen=hg.hparams.Positive(0.2, transform="exp", per_batch=True),
        cut=hg.hparams.Integer(0, 0, 6),
        cut_max=hg.hparams.Integer(8, 0, 8),
        noise=hg.hparams.Positive(0.1, size=2),
        dtype=DT,
    )
    h_size = hp.size

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(
                [hg.nn.StnConv1d(1, 3, 3, h_size, padding=1, padding_mode="reflect"), nn.Conv1d(3, 3, 1)]
            )
            self.heads = nn.ModuleDict({"a": hg.nn.StnLinear(3 * 8, 6, h_size, rank=2), "b": nn.Linear(6, 3)})

        def forward(self, x: torch.Tensor, h: Any) -> torch.Tensor:
            d = h.draw(len(x))
            x = hg.nn.cutout(hg.nn.cutout(x, d["cut"], self.training), d["cut_max"], self.training)
            z = self.convs[1](torch.tanh(self.convs[0](x, d)))
            z = hg.nn.gaussian_noise(z, d["noise"][:, 0], self.training)
            z = hg.nn.dropout(torch.tanh(self.heads["a"](z.flatten(1), d)), d["drop"], self.training)
            return self.heads["b"](z)

    model = Net().to(DT)
    with torch.no_grad():
        for _, layer in hg.nn.stn_layers(model):
            layer.hnet.normal_(0, 0.3)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        reg = sum((p**2).sum() for p in m.parameters())
        return F.cross_entropy(m(b[0], h), b[1]) + h.draw(len(b[0]))["pen"][0] * reg * 1e-3

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1]) + 0.1 * h.draw(len(b[0]))["noise"].mean()

    tau = 0.01
    hopt = hg.SelfTuning(
        model,
        hp,
        train,
        val,
        entropy_weight=tau,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    xb, yb = torch.randn(5, 1, 8, dtype=DT), torch.randint(0, 3, (5,))
    for _ in range(4):
        hopt.step((xb, yb))
    vb = (torch.randn(4, 1, 8, dtype=DT), torch.randint(0, 3, (4,)))
    torch.manual_seed(5)
    grads, info = hopt.hypergradient(val_batch=vb)

    def val_loss() -> float:
        torch.manual_seed(5)  # the same perturbation
        return hopt.hypergradient(val_batch=vb)[1].outer_loss

    assert val_loss() == info.outer_loss
    fd_raw = _central(val_loss, hp.raw)
    torch.testing.assert_close(grads[0], fd_raw, rtol=1e-6, atol=1e-9)
    assert float(fd_raw[:2].abs().min()) > 1e-6  # (the rate and the penalty reach it)
    # sigma: the validation loss's part by differences, the entropy's in closed form
    lo, hi = hp.scale_range
    s = torch.sigmoid(hp.raw_scale.detach())
    entropy = (hi - lo) * s * (1 - s) / hp.scale().detach()  # d log sigma / d raw_scale
    fd_scale = _central(val_loss, hp.raw_scale)
    torch.testing.assert_close(grads[1], fd_scale - tau * entropy, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_best_response_with_a_custom_hypernetwork_over_a_batchnorm_base_matches_central_differences(
    sampling: str,
) -> None:
    """New: ``HyperNet(base, hypernet=an MLP)`` (not the linear or low-rank response) over a base
    with BatchNorm, a validation loss reading a Rate, an Integer and a Positive of size 2 directly,
    both samplings: the hyperstep's hypergradient against central differences of its outer loss
    (the best response at the unperturbed lambda is deterministic)."""
    hp = hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.3, high=0.9),
        pen=hg.hparams.Positive(0.2, transform="exp"),
        cut=hg.hparams.Integer(2, 0, 6),
        noise=hg.hparams.Positive(0.1, size=2),
        learn_scale=False,
        scale=0.3,
        dtype=DT,
    )
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    n_weights = sum(p.numel() for p in base.parameters())
    custom = nn.Sequential(nn.Linear(hp.size, 8), nn.Tanh(), nn.Linear(8, n_weights)).to(DT)
    net = hg.nn.HyperNet(base, hp.size, hypernet=custom)

    def train(m: Any, h: Any, b: Any) -> torch.Tensor:
        w = m.weights(h)
        reg = sum((v**2).sum() for v in w.values())
        return F.cross_entropy(m(b[0], hparams=h), b[1]) + h.draw(1)["pen"][0] * reg * 1e-2

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        d = h.draw(1)
        extra = 0.1 * d["noise"].mean() + 0.05 * d["drop"][0] ** 2 + 0.01 * d["cut"][0]
        return F.cross_entropy(m(b[0], hparams=h), b[1]) + extra

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        sampling=sampling,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    xb, yb = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    for _ in range(5):
        hopt.step((xb, yb))
    vb = (torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,)))
    grads, _ = hopt.hypergradient(val_batch=vb)
    fd = _central(lambda: hopt.hypergradient(val_batch=vb)[1].outer_loss, hp.raw)
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-6  # every entry reaches the validation loss


def _edge_stn(delta: bool) -> hg.SelfTuning:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.5, high=1.0),  # a rate up to 1 (kept strictly below it)
        cut=hg.hparams.Integer(0, 0, 8),  # at its lower bound: no cutout
        cut_max=hg.hparams.Integer(8, 0, 8),  # at its upper bound
        shift=hg.hparams.Integer(1, 0, 1, per_batch=True),
        dtype=DT,
    )
    h_size = hp.size

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([hg.nn.StnConv1d(1, 2, 3, h_size, padding=1), nn.Conv1d(2, 2, 1)])
            self.head = nn.ModuleDict({"h": hg.nn.StnLinear(16, 3, h_size)})

        def forward(self, x: torch.Tensor, h: Any) -> torch.Tensor:
            d = h.draw(len(x))
            x = hg.nn.cutout(hg.nn.cutout(x, d["cut"], self.training), d["cut_max"], self.training)
            x = hg.nn.random_shift(x, d["shift"], self.training)
            z = torch.relu(self.layers[1](self.layers[0](x, d)))
            return self.head["h"](hg.nn.dropout(z, d["drop"], self.training).flatten(1), d)

    model = Net().to(DT)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    return hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        delta=delta,
        train_steps=1,
        val_steps=2,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_batches_of_one_with_specs_at_their_bounds_train_and_resume_through_torch_save_bit_for_bit(
    delta: bool,
) -> None:
    """New: batches of one example (training and validation: one perturbation each), a Rate
    whose upper bound is 1, Integers at both bounds, a per-batch spec, StnConv1d / StnLinear in
    ``nn.ModuleList`` / ``nn.ModuleDict`` next to plain layers, two hypersteps per phase; a
    checkpoint taken half-way through ``torch.save`` / ``torch.load(weights_only=True)`` into
    freshly built objects (another seed) resumes to the straight run's weights and history."""
    g = torch.Generator().manual_seed(1)

    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(1, 1, 8, generator=g, dtype=DT), torch.randint(0, 3, (1,), generator=g)

    data = [(pair(), pair()) for _ in range(8)]

    def run(h: hg.SelfTuning, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            assert torch.isfinite(h.step(data[i][0]))
            while h.hyper_due():
                assert not h.hyper_step(val_batch=data[i][1]).skipped

    straight = _edge_stn(delta)
    run(straight, 0, 8)
    half = _edge_stn(delta)
    run(half, 0, 4)
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    resumed = _edge_stn(delta)
    torch.manual_seed(123)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, 4, 8)
    history = straight.hparams.history()
    assert len(history) == 16 and resumed.hparams.history() == history
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for row in history:  # the values stay inside their domains
        assert 0.0 < row["drop"] < 1.0 and 0 <= row["cut"] <= 8 and 0 <= row["cut_max"] <= 8
