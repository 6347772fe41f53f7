"""Round 11, marginal likelihood: laplace-torch's tests translated, and what a new user would try.

Float64 proofs: the classification evidence of a linear model against the Laplace evidence built
from a dense Hessian (``torch.autograd.functional.hessian``: for a model linear in its weights the
GGN is the Hessian), the minibatch hypersteps of :class:`~hypergrad.MarginalLikelihood` against the
partition bound of the whole data set, parametrised layers against dense Jacobians. Fixes: an inner
optimiser's own weight decay (AdamW's default 0.01) silently trained the weights to another MAP;
bool and complex regression targets (a crash and a complex "evidence"); a sparse ``nn.Embedding``
crashed; ``RandomTranslation`` moved inputs of another layout along the wrong axes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _flat(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    return names, shapes, torch.cat([params[n].detach().reshape(-1) for n in names])


def _unflat(names: list[str], shapes: list[torch.Size], v: Tensor) -> dict[str, Tensor]:
    chunks = v.split([math.prod(s) for s in shapes])
    return {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}


def _precision_vector(model: nn.Module, prior: hg.hparams.PriorPrecision) -> Tensor:
    params = dict(model.named_parameters())
    prec = prior.precisions()
    return torch.cat([(prec[n] * torch.ones_like(params[n])).reshape(-1) for n in _flat(model)[0]])


# ------------------------------------------------------------------ laplace-torch's tests, translated


@pytest.mark.parametrize("classes", [2, 4], ids=["binary", "multiclass"])
@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_classification_evidence_of_a_linear_model_is_the_dense_hessian_laplace(
    classes: int, per: str
) -> None:
    """laplace-torch's ``log_marginal_likelihood`` with ``hessian_structure="full"``: for a single
    ``nn.Linear`` the GGN is exactly the Hessian of the summed cross-entropy, so the evidence is
    log p(D|theta) - theta^T P0 theta / 2 - (log det(P0 + H) - log det P0) / 2 with H from
    ``torch.autograd.functional.hessian``; both forms and both kernels, and the gradient w.r.t.
    the log precisions (weights fixed) against that of the dense formula."""
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(15, 3, generator=g, dtype=DT)
    y = torch.randint(0, classes, (15,), generator=g)
    torch.manual_seed(classes)
    model = nn.Linear(3, classes).to(DT)
    prior = hg.hparams.PriorPrecision(model, per=per, init=0.5).to(DT)
    with torch.no_grad():
        for r in prior.raw:
            r.add_(0.5 * torch.randn(r.shape, generator=g, dtype=DT))
    names, shapes, theta = _flat(model)

    def nll(v: Tensor) -> Tensor:
        out = torch.func.functional_call(model, _unflat(names, shapes, v), (x,))
        return F.cross_entropy(out, y, reduction="sum")

    h = torch.autograd.functional.hessian(nll, theta)
    delta = _precision_vector(model, prior)
    ref = (
        -nll(theta)
        - 0.5 * (delta * theta.square()).sum()
        - 0.5 * (torch.logdet(torch.diag(delta) + h) - delta.log().sum())
    )
    gref = torch.autograd.grad(ref, list(prior.parameters()))
    assert float(torch.linalg.eigvalsh(h)[-1]) > 1.0  # a real curvature term, not a vanishing one
    for form in ("ntk", "parametric"):
        for kernel in ("auto", "dense"):
            ev = hg.log_evidence(model, x, y, prior, form=form, kernel=kernel)
            torch.testing.assert_close(ev, ref, rtol=1e-12, atol=1e-10)
            for a, b in zip(torch.autograd.grad(ev, list(prior.parameters())), gref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_minibatch_hypersteps_average_to_the_partition_bound_of_the_data_set() -> None:
    """The evidence of N examples estimated from batches of B: over the N/B disjoint batches of an
    epoch, the mean of ``info.outer_loss`` is -(1/N) times the partition bound of the whole data
    set (blocks of M within each batch), and the mean of the hypergradients written into
    ``.grad`` is -(1/N) times its gradient; B = M = N is the exact evidence."""
    g = torch.Generator().manual_seed(3)
    n, b = 24, 6
    x, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=0.7)}).to(DT)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=n,
        subset_size=3,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    losses, grads = [], []
    for i in range(0, n, b):
        info = hopt.hyper_step(train_batch=(x[i : i + b], y[i : i + b]))
        losses.append(info.outer_loss)
        grads.append(torch.stack([p.grad for p in hp.parameters()]))  # type: ignore[misc]
    bound = hg.log_evidence_bound(model, x, y, hp["prior"], data_size=n, subset_size=3)
    gbound = torch.stack(torch.autograd.grad(bound, list(hp.parameters())))
    assert sum(losses) / len(losses) == pytest.approx(-float(bound.detach()) / n, rel=1e-12)
    torch.testing.assert_close(torch.stack(grads).mean(0), -gbound / n, rtol=1e-10, atol=1e-13)
    exact = hg.log_evidence(model, x, y, hp["prior"])
    assert float(bound.detach()) < float(exact.detach())  # the bound, below the evidence (Fischer)
    whole = hopt.hyper_step(train_batch=(x, y))  # subset_size=3 still: the bound of one batch
    assert whole.outer_loss == pytest.approx(-float(bound.detach()) / n, rel=1e-12)


def test_prior_precision_log_det_is_that_of_the_diagonal_prior() -> None:
    """``PriorPrecision.log_det`` (public, used by no test before): sum of log delta over every
    covered entry, for each structure, differentiable w.r.t. the raw tensors."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).to(DT)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for per in ("global", "layer", "parameter"):
        prior = hg.hparams.PriorPrecision(model, per=per, init=1.3).to(DT)
        with torch.no_grad():
            for r in prior.raw:
                r.add_(torch.randn(r.shape, generator=g, dtype=DT))
        delta = _precision_vector(model, prior)
        ld = prior.log_det(sizes)
        torch.testing.assert_close(ld, torch.logdet(torch.diag(delta)), rtol=1e-12, atol=1e-12)
        for a, r in zip(torch.autograd.grad(ld, list(prior.raw)), prior.raw, strict=True):
            counts = torch.zeros_like(r)  # d/draw: the number of entries each raw value covers
            for name in prior.names:
                if prior.raw[prior._index[name]] is r:
                    counts = counts + (sizes[name] if r.dim() == 0 else 1)
            torch.testing.assert_close(a, counts)


@pytest.mark.parametrize("which", ["orthogonal", "spectral_norm"])
def test_parametrised_layers_get_the_evidence_of_their_dense_jacobians(which: str) -> None:
    """``torch.nn.utils.parametrize`` layers (weight norm is tested elsewhere): the prior covers
    the stored tensors (``parametrizations.weight.original``); the evidence is that of the dense
    Jacobian w.r.t. them (``torch.autograd.functional.jacobian`` of a ``functional_call``)."""
    torch.manual_seed(1)
    wrap = {
        "orthogonal": nn.utils.parametrizations.orthogonal,
        "spectral_norm": nn.utils.parametrizations.spectral_norm,
    }[which]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), wrap(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))
    model = model.to(DT).eval()  # (spectral norm's power iteration runs in training mode only)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 3, generator=g, dtype=DT), torch.randn(9, 2, generator=g, dtype=DT)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.8).to(DT)
    assert any("parametrizations.weight.original" in n for n in prior.names)
    names, shapes, theta = _flat(model)
    sigma = 0.4

    def f(v: Tensor) -> Tensor:
        return torch.func.functional_call(model, _unflat(names, shapes, v), (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, theta) / sigma
    delta = _precision_vector(model, prior)
    r = (y.reshape(-1) - f(theta)) / sigma
    loglik = -0.5 * r.square().sum() - r.numel() * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    ref = (
        loglik
        - 0.5 * (delta * theta.square()).sum()
        - 0.5 * torch.logdet(torch.eye(len(r), dtype=DT) + (jac / delta) @ jac.T)
    )
    for form in ("ntk", "parametric"):
        ev = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=sigma, form=form)
        torch.testing.assert_close(ev, ref, rtol=1e-11, atol=1e-9)


# ------------------------------------------------------------------ fixes


def _blr(n: int = 20, d: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=DT)
    return x, x @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)


def _regression_hopt(model: nn.Module, inner: torch.optim.Optimizer, n: int) -> hg.MarginalLikelihood:
    hp = nn.ModuleDict(
        {"prior": hg.hparams.PriorPrecision(model, init=2.0), "noise": hg.hparams.ObservationNoise(0.5)}
    ).to(DT)
    return hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=n,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.01),  # its default weight_decay is 0.01
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=torch.tensor(1e-3)),
        lambda ps: torch.optim.ASGD(ps, lr=0.1),  # its default lambd is 1e-4
    ],
    ids=["adamw-default", "adam", "sgd-tensor", "asgd-default"],
)
def test_an_inner_optimiser_with_a_weight_decay_of_its_own_is_refused(make) -> None:
    """Before: accepted silently, and the weights trained to the MAP of prior + decay (SGD with
    weight_decay=0.01 on 40 examples ended 4.7e-3 from the closed-form MAP of the stated prior;
    at that shifted point the evidence and its hypergradient are not the ones the bound assumes).
    laplace-torch's ``marglik_training`` zeroes the decay with a warning; here the user's
    optimiser is not edited behind their back: a clear error."""
    x, y = _blr()
    model = nn.Linear(3, 1).to(DT)
    with pytest.raises(ValueError, match=r"param group 0 has (weight_decay|lambd)=.*PriorPrecision"):
        _regression_hopt(model, make(model.parameters()), len(x))


def test_a_weight_decay_added_to_the_inner_optimiser_later_is_refused_at_step_changing_nothing() -> None:
    """A param group added (or a group's ``weight_decay`` set) after construction: refused at the
    next step before anything moves; without a decay, the loop reaches the closed-form MAP."""
    x, y = _blr()
    torch.manual_seed(0)
    body = nn.Linear(3, 1).to(DT)
    inner = torch.optim.AdamW(body.parameters(), lr=0.05, weight_decay=0.0)
    hopt = _regression_hopt(body, inner, len(x))
    for _ in range(600):
        hopt.step((x, y))
    delta, s2 = 2.0, 0.25
    phi = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    wmap = torch.linalg.solve(delta * torch.eye(4, dtype=DT) + phi.T @ phi / s2, phi.T @ y / s2)
    got = torch.cat([body.weight.detach().reshape(-1), body.bias.detach()])
    torch.testing.assert_close(got, wmap, rtol=0, atol=1e-8)
    inner.param_groups[0]["weight_decay"] = 0.01
    before = [p.detach().clone() for p in body.parameters()]
    state = {k: v.clone() for k, v in inner.state[body.weight].items()}
    steps = hopt.inner_steps
    with pytest.raises(ValueError, match=r"weight_decay=0.01"):
        hopt.step((x, y))
    assert hopt.inner_steps == steps
    for p, q in zip(body.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for k, v in inner.state[body.weight].items():
        assert torch.equal(v, state[k])
    inner.param_groups[0]["weight_decay"] = 0.0
    hopt.step((x, y))  # and on again


def test_regression_targets_must_be_real_numbers_integers_included() -> None:
    """Before: bool targets crashed in the subtraction ("Subtraction, the `-` operator, with a
    bool tensor is not supported"), complex ones gave a complex "evidence" (-51.37+0j). Integer
    targets (counts) are numbers: the same evidence as their float values."""
    x, y = _blr(12)
    model = nn.Linear(3, 1).to(DT)
    prior = hg.hparams.PriorPrecision(model).to(DT)
    counts = torch.randint(0, 5, (12,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        hg.log_evidence(model, x, counts, prior, likelihood="regression", noise=1.0),
        hg.log_evidence(model, x, counts.to(DT), prior, likelihood="regression", noise=1.0),
    )
    for bad in (counts > 2, y.to(torch.complex128)):
        with pytest.raises(ValueError, match=r"regression' needs real targets .*" + str(bad.dtype)):
            hg.log_evidence(model, x, bad, prior, likelihood="regression", noise=1.0)
    hopt = _regression_hopt(model, torch.optim.SGD(model.parameters(), lr=0.1), 12)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"needs real targets"):
        hopt.step((x, counts > 2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l(self.e(x).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback
def test_a_sparse_embedding_gets_the_evidence_of_the_dense_one() -> None:
    """``nn.Embedding(sparse=True)`` (trained with SGD or SparseAdam): vmap cannot batch its
    sparse backward, and the one-pass-per-output fallback stacked sparse gradients: "reshape is
    not implemented for sparse tensors". Now the evidence, its gradient and a hyperstep's .grad
    are those of the same model with a dense embedding."""
    torch.manual_seed(0)
    sparse, dense = _Bag(True).to(DT), _Bag(False).to(DT)
    dense.load_state_dict(sparse.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 10, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    grads = []
    for model in (sparse, dense):
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=0.6)}).to(DT)
        ev = hg.log_evidence(model, x, y, hp["prior"])
        grads.append((ev.detach(), *torch.autograd.grad(ev, list(hp.parameters()))))
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=8,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )
        hopt.hyper_step(train_batch=(x, y))
        grads.append(tuple(p.grad for p in hp.parameters()))  # type: ignore[misc]
        hopt.step((x, y))  # the MAP step trains the sparse embedding too
    for a, b in zip(grads[:2], grads[2:], strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sparse.e.weight, dense.e.weight, rtol=1e-12, atol=1e-14)


def test_random_translation_refuses_a_layout_other_than_its_shape_or_flat() -> None:
    """Only the number of entries was checked: an 8 x 8 image given to RandomTranslation((64,))
    was moved as a 64-long signal (its rows running into each other), (B, 4, 16) inputs to
    RandomTranslation((8, 8)) as 8 x 8 images. Accepted: (B, *shape), (B, prod(shape)) and
    either with a channel axis of one, all the same translation under the same draws."""
    aug = hg.hparams.RandomTranslation((8, 8), init=1.5).to(DT)
    img = torch.randn(3, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    outs = []
    for shape in ((3, 8, 8), (3, 64), (3, 1, 8, 8), (3, 1, 64)):
        torch.manual_seed(4)
        out = aug(img.reshape(shape), samples=2)
        assert out.shape == (6, *shape[1:])
        outs.append(out.reshape(6, 64))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"got inputs of shape \(3, 4, 16\).*wrong axes"):
        aug(img.reshape(3, 4, 16))
    with pytest.raises(ValueError, match=r"RandomTranslation\(64,\) got inputs of shape \(3, 8, 8\)"):
        hg.hparams.RandomTranslation((64,)).to(DT)(img)


class _Centred(nn.Module):
    """Inputs centred with the batch's own mean inside the model: one example's output depends
    on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x - x.mean(0, keepdim=True))))


def test_a_model_mixing_the_examples_of_a_batch_is_refused_like_batchnorm_in_training_mode() -> None:
    """Before: a silent number, a different one per kernel (-16.06 layerwise, -14.21 dense: the
    dense Jacobians are those of single examples, for which x - x.mean(0) is 0). The evidence of
    such a model is not defined (as with BatchNorm in training mode, which is refused): now a
    clear error from the pure functions and from hyper_step, which changes nothing; the same
    model without the batch statistic (centred by a fixed vector) is accepted."""
    torch.manual_seed(0)
    model = _Centred().to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=DT) + 2, torch.randint(0, 3, (10,), generator=g)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    words = r"output for one example depends on the other examples in the batch"
    for kernel in ("auto", "dense"):
        with pytest.raises(ValueError, match=words):
            hg.log_evidence(model, x, y, hp["prior"], kernel=kernel)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=10,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    hopt.step((x, y))  # training such a model is the user's business
    before = [p.detach().clone() for p in hp.parameters()]
    with pytest.raises(ValueError, match=words):
        hopt.hyper_step(train_batch=(x, y))
    assert all(torch.equal(p, q) for p, q in zip(hp.parameters(), before, strict=True))
    assert all(p.grad is None for p in hp.parameters()) and hopt.hyper_steps == 0
    # one example alone: nothing to mix, and a per-example model is untouched by the check
    hg.log_evidence_bound(model, x[:1], y[:1], hp["prior"], data_size=10)
    fixed = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    fixed.load_state_dict(
        {
            "0.weight": model.a.weight,
            "0.bias": model.a.bias - model.a.weight @ x.mean(0),
            "2.weight": model.b.weight,
            "2.bias": model.b.bias,
        }
    )
    prior = hg.hparams.PriorPrecision(fixed, per="layer").to(DT)
    a, b = (hg.log_evidence(fixed, x, y, prior, kernel=k) for k in ("auto", "dense"))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.a, self.l = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l(self.a(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback
def test_attention_built_without_batch_first_on_batch_major_inputs_is_caught() -> None:
    """A common slip: ``nn.MultiheadAttention`` (``batch_first=False``) given ``(B, T, d)`` inputs
    attends across the batch. Before: a silent evidence; now the batch-mixing error. With
    ``batch_first=True`` the same weights give the evidence as before (both kernels agree)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    wrong, right = _Attention(False).to(DT).eval(), _Attention(True).to(DT).eval()
    right.load_state_dict(wrong.state_dict())
    with pytest.raises(ValueError, match=r"depends on the other examples in the batch"):
        hg.log_evidence(wrong, x, y, hg.hparams.PriorPrecision(wrong).to(DT))
    prior = hg.hparams.PriorPrecision(right).to(DT)
    a, b = (hg.log_evidence(right, x, y, prior, kernel=k) for k in ("auto", "dense"))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_prior_precision_init_that_underflows_names_the_prior_precision() -> None:
    """Failed before: ``PriorPrecision(init=1e-300)`` on a float32 model (a precision of 0.0)
    was refused as a "weight decay init", a name the user never wrote."""
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^prior precision init must be > 0"):
        hg.hparams.PriorPrecision(model, init=1e-300)
    with pytest.raises(ValueError, match=r"^weight decay init must be > 0"):
        hg.hparams.WeightDecay(model, init=1e-300)
    held = hg.hparams.PriorPrecision(model.double(), init=1e-300)  # float64 holds it
    assert float(held.raw[0].detach().exp()) == pytest.approx(1e-300, rel=1e-12)
