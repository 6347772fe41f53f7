"""Round 26 (laplace): hg.MarginalLikelihood against the semantics a laplace-torch user expects.

References are written here in plain torch: the closed-form Bayesian linear-regression evidence
log N(y | 0, X S X^T + s^2 I) (exact for a model linear in its weights at its MAP), a dense GGN
Laplace evidence built with torch.autograd.functional, and data parallelism simulated by two
threads whose all-reduce is a barrier (so the ranks' numbers can be compared with the
single-process run on the concatenated batch without spawning processes).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg
import hypergrad._base as hg_base

DT = torch.float64


# ------------------------------------------------------------------------------------ helpers


class _Exchange:
    """Two simulated ranks meeting at a barrier (a timeout instead of a hang)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots: list[list[torch.Tensor] | None] = [None, None]


class _ThreadRanks:
    """Stands in for ``hopt.ranks`` (a DistributedDataParallel group of two): ``mean_`` averages
    the tensors of the two threads in place, as ``all_reduce`` / size does."""

    def __init__(self, real: Any, exchange: _Exchange, rank: int) -> None:
        self.module, self.wrapped, self.group = real.module, real.wrapped, None
        self.size, self.exchange, self.rank = 2, exchange, rank

    def mean_(self, ts: Any) -> None:
        ex = self.exchange
        ex.slots[self.rank] = [t.detach().clone() for t in ts]
        ex.barrier.wait()
        other = ex.slots[1 - self.rank]
        assert other is not None
        means = [(a + b) / 2 for a, b in zip(ex.slots[0], ex.slots[1], strict=True)]  # type: ignore[arg-type]
        ex.barrier.wait()
        with torch.no_grad():
            for t, m in zip(ts, means, strict=True):
                t.copy_(m)

    def mean(self, ts: Any) -> tuple[torch.Tensor, ...]:
        out = [t.detach().clone() for t in ts]
        self.mean_(out)
        return tuple(out)


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.clone()


def _on_two_thread_ranks(monkeypatch: pytest.MonkeyPatch, make: Any, shards: list[Any]) -> list[Any]:
    """``make()`` -> (hopt, hp) for each of two ranks (built here, one after the other: they seed
    torch's generator), then ``hyper_step`` on each rank's shard, side by side in two threads;
    returns ``(info, hypergradient)`` per rank."""
    # (training calls take turns in one process; the simulated ranks must run side by side)
    monkeypatch.setattr(hg_base, "_CALL_LOCK", contextlib.nullcontext())
    exchange, errors = _Exchange(), []
    out: list[Any] = [None, None]
    built = [make() for _ in range(2)]
    for rank, (hopt, _) in enumerate(built):
        hopt.ranks = _ThreadRanks(hopt.ranks, exchange, rank)

    def work(rank: int) -> None:
        try:
            hopt, hp = built[rank]
            info = hopt.hyper_step(train_batch=shards[rank])
            out[rank] = (info, [_grad(p) for p in hp.parameters()])
        except BaseException as e:  # (reported below, not lost in the thread)
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert out[0] is not None and out[1] is not None
    return out


# ------------------------------------------------------------------------- data parallel (DDP)


def test_through_map_reports_the_training_loss_of_the_concatenated_batch_on_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each rank's bound is its shard's scaled by N/B, and the hypergradient their mean: the bound
    of the concatenated batch partitioned along the shards (subset_size = the shard). The
    fixed-weights path and hg.Implicit report the concatenated batch's training loss on every
    rank; through_map reported each rank's own (1.169 and 1.206 for 1.187 here), and the
    divergence guard judged that per rank, so two ranks could disagree on refusing a hyperstep
    (their hyperparameters then differ, silently)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, dtype=DT, generator=g), torch.randint(0, 3, (12,), generator=g)

    def make() -> tuple[hg.MarginalLikelihood, nn.ModuleDict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer").to(DT)})
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=24, subset_size=6, through_map=True,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=hg.CG(maxiter=30, tol=1e-14, damping=0.0),
        )  # fmt: skip
        return hopt, hp

    hopt, hp = make()
    single = hopt.hyper_step(train_batch=(x, y))
    single_grads = [_grad(p) for p in hp.parameters()]
    ranks = _on_two_thread_ranks(monkeypatch, make, [(x[:6], y[:6]), (x[6:], y[6:])])
    for info, grads in ranks:
        # (what already holds: the simulation is faithful)
        assert info.outer_loss == pytest.approx(single.outer_loss, rel=1e-12)
        for a, b in zip(grads, single_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for info, _ in ranks:
        assert info.train_loss == pytest.approx(single.train_loss, rel=1e-12)


def test_fixed_weights_hyperstep_under_simulated_ddp_is_the_concatenated_batch_partitioned_along_shards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(Passes: the fixed-weights path's documented DDP semantics, its training loss included,
    checked against one process on the concatenated batch; the same harness as the test above.)"""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, dtype=DT, generator=g), torch.randn(8, 2, dtype=DT, generator=g)

    def make() -> tuple[hg.MarginalLikelihood, nn.ModuleDict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="parameter").to(DT),
                "noise": hg.hparams.ObservationNoise(0.7, dtype=DT),
            }
        )
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="regression", data_size=20, subset_size=4,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )  # fmt: skip
        return hopt, hp

    hopt, hp = make()
    single = hopt.hyper_step(train_batch=(x, y))
    single_grads = [_grad(p) for p in hp.parameters()]
    for info, grads in _on_two_thread_ranks(monkeypatch, make, [(x[:4], y[:4]), (x[4:], y[4:])]):
        assert info.outer_loss == pytest.approx(single.outer_loss, rel=1e-12)
        assert info.train_loss == pytest.approx(single.train_loss, rel=1e-12)
        for a, b in zip(grads, single_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------- Bayesian linear regression: the exact evidence


class _TiedTwoInputs(nn.Module):
    """``f(x) = W x[:, :3] + b1 + W x[:, 3:] + b2``: two layers sharing one weight, linear in its
    weights (so the linearised Laplace evidence is exact at the MAP)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 1), nn.Linear(3, 1)
        self.l2.weight = self.l1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(x[:, :3]) + self.l2(x[:, 3:])


def _closed_form_neg_evidence_per_datum(
    phi: torch.Tensor, y: torch.Tensor, prec: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """-log N(y | 0, phi diag(1/prec) phi^T + sigma^2 I) / N, differentiable in prec and sigma."""
    n = len(y)
    cov = phi @ torch.diag(1 / prec) @ phi.T + sigma**2 * torch.eye(n, dtype=DT)
    return -torch.distributions.MultivariateNormal(torch.zeros(n, dtype=DT), cov).log_prob(y) / n


@pytest.mark.parametrize("through_map", [False, True])
def test_per_layer_precisions_of_two_layers_sharing_a_weight_give_the_closed_form_evidence_gradient(
    through_map: bool,
) -> None:
    """(Passes; not covered before: a tied weight in a regression model with per-layer
    precisions and a learned noise, through MarginalLikelihood.hyper_step, against the closed
    form. The shared weight belongs to its first layer, l1 (its precision and l1.bias's); l2's
    precision covers l2.bias alone. At the MAP the fixed-weights partial and the total derivative
    both equal the closed form's gradient.)"""
    g = torch.Generator().manual_seed(3)
    n = 10
    x = torch.randn(n, 6, dtype=DT, generator=g)
    w_true = torch.tensor([0.5, -1.0, 0.3], dtype=DT)
    y = (x[:, :3] + x[:, 3:]) @ w_true + 0.2 * torch.randn(n, dtype=DT, generator=g)
    torch.manual_seed(0)
    model = _TiedTwoInputs().to(DT)
    prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
    assert prior.names == ("l1.weight", "l1.bias", "l2.bias") and len(prior.raw) == 2
    with torch.no_grad():
        prior.raw[0].fill_(0.4)
        prior.raw[1].fill_(-0.7)
    noise = hg.hparams.ObservationNoise(0.5, dtype=DT)
    hp = nn.ModuleDict({"prior": prior, "noise": noise})
    # the closed form: features (x1 + x2, 1, 1) for (W, b1, b2)
    phi = torch.cat([x[:, :3] + x[:, 3:], torch.ones(n, 2, dtype=DT)], 1)
    d1, d2 = prior.raw[0].exp(), prior.raw[1].exp()
    prec = torch.stack([d1, d1, d1, d1, d2])
    sigma = noise()
    with torch.no_grad():  # the MAP, in closed form
        theta = torch.linalg.solve(torch.diag(prec) + phi.T @ phi / sigma**2, phi.T @ y / sigma**2)
        model.l1.weight.copy_(theta[:3][None])
        model.l1.bias.copy_(theta[3:4])
        model.l2.bias.copy_(theta[4:5])
    ref = _closed_form_neg_evidence_per_datum(phi, y, prec, sigma)
    ref_grads = torch.autograd.grad(ref, [prior.raw[0], prior.raw[1], noise.raw])
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="regression", data_size=n, through_map=through_map,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-14, damping=0.0),
    )  # fmt: skip
    weights = [p.detach().clone() for p in model.parameters()]
    info = hopt.hyper_step(train_batch=(x, y[:, None]))
    assert info.outer_loss == pytest.approx(float(ref.detach()), rel=1e-12)
    for got, want in zip([prior.raw[0].grad, prior.raw[1].grad, noise.raw.grad], ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for w, p in zip(weights, model.parameters(), strict=True):  # the hyperstep moved no weight
        assert torch.equal(w, p.detach())


# --------------------------------------------------- classification logits: one row per example


class _TwoViews(nn.Module):
    """Logits of two views of each example stacked, ``(2B, C)`` (the average over views forgotten)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.cat([x, -x]))))


class _PerPosition(nn.Module):
    """Per-position logits reshaped to ``(B*T, C)``, as the (B, T, C) error message advised."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 2) -> (B*T, 3)
        return self.l1(torch.tanh(x)).reshape(-1, 3)


def test_classification_logits_with_another_number_of_rows_than_examples_are_refused_by_name() -> None:
    """Classification needs logits (B, C). A model returning (2B, C) (two views stacked) with
    labels (B,) went through the bound and the MAP step as one 6-way softmax per example whose
    labels index the first view's classes: a number, silently. The (B, T, C) refusal advised
    "reshape outputs to (B*T, C) and labels to (B*T,)"; done so, the next error said "one-hot or
    soft labels are not supported" of integer labels. Both now name the rows."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    views = _TwoViews().to(DT)
    prior = hg.hparams.PriorPrecision(views).to(DT)
    assert views(x).shape == (10, 3)  # the premise
    for kernel in ("auto", "dense"):
        with pytest.raises(ValueError, match="one row per example"):
            hg.log_evidence_bound(views, x, y, prior, data_size=20, kernel=kernel)
    hopt = hg.MarginalLikelihood(
        views, nn.ModuleDict({"prior": prior}), likelihood="classification", data_size=20,
        inner_optimizer=torch.optim.SGD(views.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(prior.parameters(), lr=0.1),
    )  # fmt: skip
    before = [p.detach().clone() for p in views.parameters()]
    with pytest.raises(ValueError, match="one row per example"):
        hopt.step((x, y))
    assert all(torch.equal(a, p) for a, p in zip(before, views.parameters(), strict=True))

    positions = _PerPosition().to(DT)
    xs, ys = torch.randn(4, 5, 2, dtype=DT), torch.randint(0, 3, (4 * 5,))
    with pytest.raises(ValueError, match="one row per example"):
        hg.log_evidence(positions, xs, ys, hg.hparams.PriorPrecision(positions).to(DT))


def test_per_example_logits_of_a_model_with_an_augmentation_still_pass_the_row_check() -> None:
    """(Passes: the guard's other side. With a RandomTranslation the model sees B * S rows and
    gives B * S rows of logits, averaged per example: the bound is finite and agrees between the
    kernels, the same draws.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    prior = hg.hparams.PriorPrecision(model, per="layer").to(DT)
    aug = hg.hparams.RandomTranslation((6,), init=1.0).to(DT)
    x, y = torch.randn(5, 6, dtype=DT), torch.randint(0, 3, (5,))
    values = []
    for kernel in ("auto", "dense"):
        torch.manual_seed(7)
        values.append(
            hg.log_evidence_bound(
                model, x, y, prior, data_size=10, augmentation=aug, samples=3, kernel=kernel
            )
        )
    assert bool(torch.isfinite(values[0]))
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-10)


# ----------------------------------------------- classification: a dense GGN Laplace reference


def _ggn_bound_reference(
    model: nn.Module, names: list[str], prec: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    n_data: int, block: int,
) -> torch.Tensor:  # fmt: skip
    """N/B (log p(y_b | f) - 1/2 sum_k [log det(P0 + G_k) - log det P0]) - 1/2 theta^T P0 theta,
    G_k = sum_{n in block k} J_n^T (diag p - p p^T) J_n with dense Jacobians from
    torch.autograd.functional.jacobian (the parametric Laplace of each block, written out)."""
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def f(v: torch.Tensor) -> torch.Tensor:
        chunks = v.split(sizes)
        parts = {n: c.reshape(params[n].shape) for n, c in zip(names, chunks, strict=True)}
        return torch.func.functional_call(model, parts, (x,))

    out = f(flat)
    jac = torch.autograd.functional.jacobian(f, flat)  # (B, C, P)
    p = torch.softmax(out, 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    pv = torch.cat([prec[n].expand(params[n].shape).reshape(-1) for n in names])
    log_lik = -nn.functional.cross_entropy(out, y, reduction="sum")
    log_det = torch.zeros((), dtype=DT)
    for i in range(0, len(y), block):
        g = torch.einsum("bcp,bcd,bdq->pq", jac[i : i + block], lam[i : i + block], jac[i : i + block])
        log_det = log_det + torch.logdet(torch.diag(pv) + g) - pv.log().sum()
    return n_data / len(y) * (log_lik - 0.5 * log_det) - 0.5 * (pv * flat**2).sum()


@pytest.mark.parametrize("per", ["layer", "parameter"])
def test_classification_hyperstep_is_the_blockwise_ggn_laplace_with_a_frozen_bias(per: str) -> None:
    """(Passes; not covered before in this combination: MarginalLikelihood.hyper_step on a tiny
    tanh MLP whose first bias is frozen (excluded from the prior: conditioned on), blocks of 3 in a
    batch of 6 of N = 20, against the parametric Laplace of each block written out with dense
    autograd Jacobians and the softmax Hessian: outer loss -bound/N and its gradient.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    model[0].bias.requires_grad_(False)
    prior = hg.hparams.PriorPrecision(model, per=per).to(DT)
    assert "0.bias" not in prior.names
    with torch.no_grad():
        for r in prior.raw:
            r.copy_(0.5 * torch.randn(r.shape, dtype=DT))
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, dtype=DT, generator=g), torch.randint(0, 3, (6,), generator=g)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = -_ggn_bound_reference(model, names, prior.precisions(), x, y, 20, 3) / 20
    ref_grads = torch.autograd.grad(ref, list(prior.raw))
    hopt = hg.MarginalLikelihood(
        model, nn.ModuleDict({"prior": prior}), likelihood="classification", data_size=20, subset_size=3,
        inner_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        outer_optimizer=torch.optim.SGD(prior.parameters(), lr=0.0),
    )  # fmt: skip
    info = hopt.hyper_step(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(float(ref.detach()), rel=1e-11)
    for r, want in zip(prior.raw, ref_grads, strict=True):
        assert r.grad is not None
        torch.testing.assert_close(r.grad, want, rtol=1e-9, atol=1e-13)
