"""Round 19, the marginal-likelihood family (hg.MarginalLikelihood, log_evidence(_bound),
PriorPrecision / ObservationNoise / RandomTranslation) as laplace-torch's ``marglik_training``
users meet it.

Proofs are float64 against an independent dense reference written here (per-example Jacobians
from ``torch.func.jacrev`` stacked into the GGN / the kernel; ``torch.logdet``; autograd on that
formula), the closed-form Bayesian-linear-regression evidence, or central differences.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------ an independent dense reference


def _reference_bound(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prec: dict[str, Tensor],
    names: list[str],
    *,
    data_size: int,
    subset: int | None = None,
    likelihood: str = "classification",
    sigma: Tensor | None = None,
) -> Tensor:
    r"""The partitioned linearised-Laplace bound of Immer et al. (2023), written out densely:
    :math:`\tfrac NB(\log p(y_b\mid f) - \tfrac12\sum_k\log\det(I + \Lambda_k J_k P_0^{-1}J_k^\top))
    - \tfrac12\theta^\top P_0\theta` over consecutive blocks ``k`` of ``subset`` examples."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(theta: dict[str, Tensor]) -> Tensor:
        p = dict(params)
        p.update(theta)
        return torch.func.functional_call(model, (p, buffers), (x,), tie_weights=True).reshape(x.shape[0], -1)

    theta = {n: params[n] for n in names}
    out = f(theta)
    b, c = out.shape
    jac = torch.func.jacrev(f)(theta)
    j = torch.cat([jac[n].reshape(b, c, -1) for n in names], 2)  # (B, C, P)
    delta = torch.cat([prec[n].expand(params[n].shape).reshape(-1) for n in names])
    quad = sum((prec[n] * theta[n] ** 2).sum() for n in names)
    if likelihood == "classification":
        log_lik = -F.cross_entropy(out, y, reduction="sum")
        p = out.softmax(1)
        lams = [torch.diag(q) - torch.outer(q, q) for q in p]
    else:
        assert sigma is not None
        log_lik = torch.distributions.Normal(out.reshape(-1), sigma).log_prob(y.reshape(-1)).sum()
        lams = [torch.eye(c, dtype=out.dtype) / sigma**2 for _ in range(b)]
    m = subset or b
    log_det = out.new_zeros(())
    for s in range(0, b, m):
        idx = range(s, min(s + m, b))
        jb = torch.cat([j[i] for i in idx], 0)
        lb = torch.block_diag(*[lams[i] for i in idx])
        k = (jb / delta) @ jb.T
        log_det = log_det + torch.logdet(torch.eye(k.shape[0], dtype=k.dtype) + lb @ k)
    return data_size / b * (log_lik - 0.5 * log_det) - 0.5 * quad


# ------------------------------------------------------------------ bugs


class _ComplexLinear(nn.Module):
    """A layer with complex weights and real outputs (as in signal processing): WeightDecay (and
    so PriorPrecision) supports complex weights, and the MAP step trains them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, dtype=torch.complex128))
        self.b = nn.Parameter(torch.zeros(2, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(torch.complex128) @ self.w).real + self.b


def test_complex_weights_are_refused_by_name_before_training_not_at_the_first_hyperstep() -> None:
    model = _ComplexLinear()
    prior = hg.hparams.PriorPrecision(model, init=0.7)
    x = torch.randn(6, 3, dtype=DT)
    # regression with a plain float noise: the error named a complex noise the user never gave
    with pytest.raises(ValueError, match="complex"):
        hg.log_evidence(model, x, torch.randn(6, 2, dtype=DT), prior, likelihood="regression", noise=0.5)
    with pytest.raises(ValueError, match="complex"):  # (was NotImplementedError from softmax)
        hg.log_evidence(model, x, torch.randint(0, 2, (6,)), prior)
    hp = nn.ModuleDict({"prior": prior})
    # refused when built, not after burn_in MAP steps at the first hyper_step
    with pytest.raises(ValueError, match="complex"):
        hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=6,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            burn_in=100,
        )


@pytest.mark.filterwarnings("ignore:hyperparameter 'prior.raw.0' does not reach")  # (the body's precision)
@pytest.mark.parametrize("how", ["frozen", "not_in_optimizer"])
@pytest.mark.parametrize("through_map", [False, True])
def test_the_logged_train_loss_is_the_map_objective_that_step_returns_with_untrained_covered_weights(
    how: str, through_map: bool
) -> None:
    # last-layer Laplace the laplace-torch way: a prior over the whole network, only the head
    # trained. step() minimises mean NLL + 1/2 theta^T P0 theta / N over every covered weight
    # (the body's term is a constant there); hyper_step's info.train_loss must be that number.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer", init=3.0),
            "noise": hg.hparams.ObservationNoise(0.4, dtype=DT),
        }
    )
    if how == "frozen":
        for p in model[0].parameters():
            p.requires_grad_(False)
    trained = list(model[2].parameters())
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=40,
        inner_optimizer=torch.optim.SGD(trained, lr=0.0),  # lr 0: the weights stay where step evaluated
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        through_map=through_map,
        solver=hg.CG(maxiter=50, tol=1e-10, damping=0.0),
    )
    batch = (torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT))
    step_loss = float(hopt.step(batch))
    # the same number by hand: mean Gaussian NLL + prior over every covered weight / N
    with torch.no_grad():
        nll = -torch.distributions.Normal(model(batch[0]), 0.4).log_prob(batch[1]).sum() / 8
        quad = sum(3.0 * (p**2).sum() for p in model.parameters())
    assert step_loss == pytest.approx(float(nll + 0.5 * quad / 40), rel=1e-12)
    _, info = hopt.hypergradient(train_batch=batch)
    # (was 0.5 * 3 * |body|^2 / 40 lower: the body's share of the prior term dropped)
    assert info.train_loss == pytest.approx(step_loss, rel=1e-10)
    info = hopt.hyper_step(train_batch=batch)
    assert info.train_loss == pytest.approx(step_loss, rel=1e-10)


@pytest.mark.parametrize(
    ("per", "bound"), [("parameter", "ntk"), ("layer", "parametric"), ("parameter", "exact")]
)
def test_a_layerwise_kernel_that_can_never_apply_is_refused_at_construction_not_after_burn_in(
    per: str, bound: str
) -> None:
    # both are known when the MarginalLikelihood is built (the bound, the prior's structure), as
    # the Neumann step-size rules that it already refuses there for the same reason; a run with
    # burn_in=1000 trained 1000 MAP steps before "kernel='layerwise' needs the NTK form".
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per)})
    with pytest.raises(ValueError, match="layerwise"):
        hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=10,
            bound=bound,
            kernel="layerwise",
            burn_in=1000,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )


def test_a_layerwise_kernel_that_does_apply_is_still_accepted_and_agrees_with_dense() -> None:
    # (the other side of the construction-time check above: global / per-layer precisions with
    # the NTK form or the exact evidence keep the layerwise kernel, whose number is the dense one)
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    for per, bound in [("global", "ntk"), ("layer", "exact")]:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        grads = []
        for kernel in ["layerwise", "dense"]:
            hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per, init=0.8)})
            hopt = hg.MarginalLikelihood(
                model,
                hp,
                likelihood="classification",
                data_size=6,
                bound=bound,
                kernel=kernel,
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            )
            grads.append(hopt.hypergradient(train_batch=(x, y))[0])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_augmentation_samples_without_a_random_translation_are_refused_not_ignored() -> None:
    # a user whose model augments its inputs itself (in training mode) sets augmentation_samples=4
    # expecting the outputs averaged over 4 draws, as Immer et al.'s invariance setup does; only a
    # RandomTranslation is ever sampled, so the setting did nothing at all: the bound with 4
    # "samples" was bit for bit the bound with 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    prior = hg.hparams.PriorPrecision(model, per="layer")
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="RandomTranslation"):
        hg.log_evidence_bound(model, x, y, prior, data_size=6, samples=4)
    hp = nn.ModuleDict({"prior": prior})
    with pytest.raises(ValueError, match="RandomTranslation"):
        hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=6,
            augmentation_samples=4,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )


@pytest.mark.parametrize("which", ["outer", "inner"])
def test_an_optimizer_with_maximize_true_is_refused_instead_of_minimising_the_evidence(which: str) -> None:
    # "maximise the marginal likelihood": outer_optimizer=SGD(..., maximize=True) reads right and
    # does the opposite (hyper_step hands the optimiser -bound / N). Shown first with the
    # hypergradient: the step it takes lowers the bound at the same weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    prior = hg.hparams.PriorPrecision(model, init=1.0)
    hp = nn.ModuleDict({"prior": prior})
    before = float(hg.log_evidence(model, x, y, prior).detach())
    grads = torch.autograd.grad(-hg.log_evidence(model, x, y, prior) / 12, list(prior.parameters()))
    with torch.no_grad():
        for r, g in zip(prior.parameters(), grads, strict=True):
            r.add_(0.5 * g)  # what SGD(lr=0.5, maximize=True) does with that hypergradient
        assert float(hg.log_evidence(model, x, y, prior)) < before
        for r, g in zip(prior.parameters(), grads, strict=True):
            r.sub_(0.5 * g)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, maximize=which == "inner")
    outer = torch.optim.SGD(hp.parameters(), lr=0.5, maximize=which == "outer")
    with pytest.raises(ValueError, match="maximize"):
        hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=12, inner_optimizer=inner, outer_optimizer=outer
        )


@pytest.mark.parametrize("how", ["appended", "unfrozen"])
def test_the_pure_evidence_refuses_trainable_weights_the_prior_never_knew(how: str) -> None:
    # prior.penalty warns in exactly this case and MarginalLikelihood refuses it; the evidence
    # functions returned a number as if the new head were fixed (here -5.64 / -45.9), not the
    # evidence of the network whose weights all train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    if how == "unfrozen":
        model.append(nn.Tanh())
        model.append(nn.Linear(4, 2).double())
        model[4].requires_grad_(False)
        prior = hg.hparams.PriorPrecision(model, per="layer")
        model[4].requires_grad_(True)
    else:
        prior = hg.hparams.PriorPrecision(model, per="layer")
        model.append(nn.Tanh())
        model.append(nn.Linear(4, 2).double())
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="4.weight"):
        hg.log_evidence(model, x, y, prior)
    with pytest.raises(ValueError, match="4.weight"):
        hg.log_evidence_bound(model, x, y, prior, data_size=60, subset_size=2)


def test_weights_left_out_of_the_prior_on_purpose_are_still_conditioned_on() -> None:
    # (the other side of the check above: include= and requires_grad_(False) at build leave the
    # head's bias out on purpose; the evidence is then that of the other weights, the bias a
    # constant: the dense reference over the covered names only)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.6, include=lambda n: n != "2.bias")
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    names = ["0.weight", "0.bias", "2.weight"]
    prec = {n: torch.tensor(0.6, dtype=DT) for n in names}
    ref = _reference_bound(model, x, y, prec, names, data_size=6)
    assert float(hg.log_evidence(model, x, y, prior).detach()) == pytest.approx(float(ref), rel=1e-10)


@pytest.mark.parametrize("kernel", ["auto", "dense"])
def test_the_bound_with_an_augmentation_leaves_the_weights_grad_alone(kernel: str) -> None:
    # the pure-function loop of a user without hg.MarginalLikelihood (laplace-torch style):
    #   opt.zero_grad(); outer.zero_grad()
    #   map_loss.backward(); (-bound / N).backward()   # one backward each
    #   opt.step(); outer.step()
    # the MAP step then took the bound's weight gradient too (N/B-scaled nats). The docstring:
    # "Differentiable w.r.t. the prior precisions, the noise and the augmentation range (not
    # w.r.t. the weights: the Jacobians are taken as constants)". Without an augmentation it
    # holds; with one the outputs (and the layer factors) kept the weights in their graph.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 8, dtype=DT), torch.randint(0, 2, (6,))
    prior = hg.hparams.PriorPrecision(model, per="layer")
    aug = hg.hparams.RandomTranslation((8,), init=1.0).double()
    torch.manual_seed(5)
    want = torch.autograd.grad(
        hg.log_evidence_bound(model, x, y, prior, data_size=60, augmentation=aug, samples=2, kernel=kernel),
        [aug.raw, *prior.raw],
    )
    torch.manual_seed(5)  # (the same translations)
    bound = hg.log_evidence_bound(
        model, x, y, prior, data_size=60, augmentation=aug, samples=2, kernel=kernel
    )
    (-bound / 60).backward()
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad has norm {float(p.grad.norm()):.3g}"
    got = [aug.raw.grad, *(r.grad for r in prior.raw)]
    for g, w in zip(got, want, strict=True):  # (the hyperparameters' gradients are untouched)
        torch.testing.assert_close(g, -w / 60, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ passing: new coverage


def _bn_dropout_mlp(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, c)
    ).double()


def test_online_loop_with_bn_dropout_a_per_weight_prior_and_ragged_batches_is_the_dense_bound() -> None:
    # laplace-torch's marglik_training, diagonal prior, in the README's loop: model.train() for the
    # MAP steps (dropout and BatchNorm statistics moving), model.eval() around hyper_step; N = 23
    # in batches of 7, 7, 7, 2 (the last one ragged), blocks of M = 3 (so 3, 3, 1 and 2), burn-in 2,
    # a hyperstep every 3 inner steps, K = 2 outer SGD steps per hyperstep. Each hyperstep must
    # be two SGD steps on -bound/N of the dense float64 reference (not covered so far: the
    # per-weight prior with BatchNorm in eval mode, ragged last blocks, K > 1 with classification).
    torch.manual_seed(0)
    n, lr = 23, 0.3
    x = torch.randn(n, 3, dtype=DT)
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 1).long()  # 3 classes, imbalanced
    model = _bn_dropout_mlp(3)
    prior = hg.hparams.PriorPrecision(model, per="parameter", init=2.0)
    hp = nn.ModuleDict({"prior": prior})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=n,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=lr),
        subset_size=3,
        burn_in=2,
        every=3,
        outer_steps=2,
    )
    names = [nm for nm, _ in model.named_parameters()]
    raws = list(prior.raw)

    def ref_grad(raw_values: list[Tensor], xb: Tensor, yb: Tensor) -> tuple[Tensor, list[Tensor]]:
        leaves = [r.detach().clone().requires_grad_(True) for r in raw_values]
        prec = {nm: r.exp() for nm, r in zip(names, leaves, strict=True)}
        loss = -_reference_bound(model, xb, yb, prec, names, data_size=n, subset=3) / n
        return loss.detach(), list(torch.autograd.grad(loss, leaves))

    due_at = []
    for t in range(12):
        lo = 7 * (t % 4)
        xb, yb = x[lo : lo + 7], y[lo : lo + 7]
        model.train()
        hopt.step((xb, yb))
        if not hopt.hyper_step_due():
            continue
        due_at.append(hopt.inner_steps)
        model.eval()
        r0 = [r.detach().clone() for r in raws]
        loss0, g0 = ref_grad(r0, xb, yb)
        r1 = [a - lr * g for a, g in zip(r0, g0, strict=True)]
        loss1, g1 = ref_grad(r1, xb, yb)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        info = hopt.hyper_step(train_batch=(xb, yb))
        assert not info.skipped and info.hyper_steps == len(due_at)
        assert info.outer_loss == pytest.approx(float(loss1), rel=1e-9)  # the last outer step's
        for r, a, g, b in zip(raws, r1, g1, g0, strict=True):
            torch.testing.assert_close(r.detach(), a - lr * g, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(r.grad, b, rtol=1e-9, atol=1e-12)  # the first step's
        assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
        assert not hopt.hyper_step_due()  # once per count
    assert due_at == [2, 5, 8, 11]


def _regression_setup(seed: int, **kw: object) -> tuple[nn.Module, nn.ModuleDict, hg.MarginalLikelihood]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.5),
            "noise": hg.hparams.ObservationNoise(0.7, dtype=DT),
            "shift": hg.hparams.RandomTranslation((8,), init=0.8),
        }
    ).double()
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression",
        data_size=22,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        **kw,  # type: ignore[arg-type]
    )
    return model, hp, hopt


def _run(
    hopt: hg.MarginalLikelihood, data: tuple[Tensor, Tensor], start: int, stop: int
) -> list[tuple[object, ...]]:
    log: list[tuple[object, ...]] = []
    x, y = data
    for t in range(start, stop):
        lo = 5 * (t % 5)
        batch = (x[lo : lo + 5], y[lo : lo + 5])  # 5, 5, 5, 5, 2
        loss = hopt.step(batch)
        log.append(("step", t, float(loss)))
        if hopt.hyper_step_due():
            info = hopt.hyper_step(train_batch=batch)
            log.append(("hyper", t, info.outer_loss, info.train_loss, info.hyper_steps, info.hypergrad_norm))
    return log


def test_resume_mid_burn_in_with_sampled_outputs_and_a_learned_translation_repeats_the_run_bit_for_bit() -> (
    None
):
    # every hyperstep draws from torch's generator here (the sampled output of each block, the
    # translations of each augmented copy), as every MAP step does (the translations): a run
    # checkpointed inside the burn-in, through torch.save, and resumed in a fresh process-like
    # setup (other seed, other initial weights) must repeat the straight run bit for bit,
    # schedule included (not covered so far: resumes were tested through the MAP with a fixed
    # draw-free bound).
    kw = dict(burn_in=4, every=2, outer_steps=2, subset_size=2, outputs="sampled", augmentation_samples=3)
    torch.manual_seed(1)
    data = (torch.randn(22, 8, dtype=DT), torch.randn(22, 3, dtype=DT))
    model_a, hp_a, a = _regression_setup(0, **kw)
    straight = _run(a, data, 0, 11)
    model_b, hp_b, b = _regression_setup(0, **kw)
    first = _run(b, data, 0, 3)  # inside the burn-in
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # another generator state: the checkpoint must bring its own back
    model_c, hp_c, c = _regression_setup(7, **kw)
    c.load_state_dict(torch.load(buf))
    assert not c.hyper_step_due() and c.inner_steps == 3
    resumed = first + _run(c, data, 3, 11)
    assert [e for e in straight if e[0] == "hyper"] and resumed == straight
    for x, y in [(model_a, model_c), (hp_a, hp_c)]:
        for (k, u), (_, v) in zip(x.state_dict().items(), y.state_dict().items(), strict=True):
            assert torch.equal(u, v), k
    assert a.hyper_steps == c.hyper_steps == 4


def test_hyper_step_due_counts_accepted_hypersteps_only_and_survives_a_checkpoint_taken_right_after_one() -> (
    None
):
    torch.manual_seed(1)
    data = (torch.randn(22, 8, dtype=DT), torch.randn(22, 3, dtype=DT))
    batch = (data[0][:5], data[1][:5])
    model, hp, hopt = _regression_setup(0, burn_in=2, every=3, on_nonfinite="skip")
    due = []
    for _ in range(9):
        hopt.step(batch)
        due.append(hopt.hyper_step_due())
    assert due == [False, True, False, False, True, False, False, True, False]  # 2, 5, 8
    # a refused hyperstep (an overflowing precision: the bound is -inf) leaves it due at the same
    # count; an accepted one ends it there, and a checkpoint taken right then keeps it ended
    model, hp, hopt = _regression_setup(0, burn_in=2, every=3, on_nonfinite="skip")
    hopt.step(batch)
    hopt.step(batch)
    prior = hp["prior"]
    assert isinstance(prior, hg.hparams.PriorPrecision)
    raw = prior.raw[0]
    keep = raw.detach().clone()
    with torch.no_grad():
        raw.fill_(1e4)  # exp(1e4) = inf
    with pytest.warns(hg.NonFiniteWarning):
        info = hopt.hyper_step(train_batch=batch)
    assert info.skipped and info.hyper_steps == 0 and hopt.hyper_step_due()
    with torch.no_grad():
        raw.copy_(keep)
    info = hopt.hyper_step(train_batch=batch)
    assert not info.skipped and info.hyper_steps == 1 and not hopt.hyper_step_due()
    state = copy.deepcopy(hopt.state_dict())
    _, _, other = _regression_setup(3, burn_in=2, every=3, on_nonfinite="skip")
    other.load_state_dict(state)
    assert not other.hyper_step_due() and other.inner_steps == 2
    # a hyperstep taken by hand off the schedule does not move it
    other.step(batch)
    other.hyper_step(train_batch=batch)  # at 3
    assert not other.hyper_step_due()
    other.step(batch)
    assert not other.hyper_step_due()
    other.step(batch)
    assert other.hyper_step_due() and other.inner_steps == 5


def test_ragged_blocks_of_a_float32_model_match_the_float64_bound_and_tighten_along_nested_blocks() -> None:
    # B = 7 examples in blocks of M = 1, 2, 4, 7 (the last block ragged: 1, 3): nested partitions,
    # so the bound rises with M (Fischer) and M = B = N is the exact evidence; a float32 model
    # (the library forms these kernels in float32: rows <= 3/4 of the weights) must give the
    # float64 reference's numbers and hypergradient, whatever the kernel. (Earlier rounds checked
    # partitions whose blocks divide the batch, and float32 against float32-vs-float64 of itself.)
    torch.manual_seed(3)
    ref_model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model = copy.deepcopy(ref_model).float()
    x = torch.randn(7, 4, dtype=DT)
    y = torch.tensor([0, 0, 0, 0, 1, 2, 0])  # imbalanced
    names = [n for n, _ in ref_model.named_parameters()]
    raw = torch.tensor([0.3, -0.4], dtype=DT)  # per-layer precisions e^0.3, e^-0.4
    refs = []
    for m in [1, 2, 4, 7]:
        leaf = raw.clone().requires_grad_(True)
        prec = {n: leaf[0 if n.startswith("0.") else 1].exp() for n in names}
        ref = _reference_bound(ref_model, x, y, prec, names, data_size=7, subset=m)
        (g_ref,) = torch.autograd.grad(ref, leaf)
        refs.append(float(ref.detach()))
        for kernel in ["layerwise", "dense"]:
            prior = hg.hparams.PriorPrecision(model, per="layer")
            with torch.no_grad():
                for r, v in zip(prior.raw, raw, strict=True):
                    r.fill_(float(v))
            got = hg.log_evidence_bound(model, x.float(), y, prior, data_size=7, subset_size=m, kernel=kernel)
            assert got.dtype == torch.float32
            assert float(got.detach()) == pytest.approx(refs[-1], rel=2e-5, abs=2e-4)
            g = torch.autograd.grad(got, list(prior.raw))
            torch.testing.assert_close(torch.stack(g).double(), g_ref, rtol=1e-4, atol=1e-4)
    assert refs == sorted(refs) and refs[0] < refs[-1] - 1e-3


def test_gradient_clamping_hooks_on_the_weights_do_not_leak_into_the_jacobians() -> None:
    # a common training trick: p.register_hook(lambda g: g.clamp(-c, c)) on every weight. It acts
    # on the weights' gradients in the MAP steps, not on the network's function: both kernels
    # must keep the Jacobians of the outputs (the layerwise one differentiates w.r.t. the layer
    # outputs, the dense one substitutes detached copies), so the evidence and its hypergradient
    # are those of the unhooked network. (Not covered so far.)
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    hooked = copy.deepcopy(plain)
    for p in hooked.parameters():
        p.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    names = [n for n, _ in plain.named_parameters()]
    prec = {n: torch.tensor(0.5, dtype=DT) for n in names}
    ref = float(_reference_bound(plain, x, y, prec, names, data_size=6))
    for kernel in ["auto", "dense"]:
        prior = hg.hparams.PriorPrecision(hooked, per="layer", init=0.5)
        got = hg.log_evidence(hooked, x, y, prior, kernel=kernel)
        assert float(got.detach()) == pytest.approx(ref, rel=1e-10)
        prior_plain = hg.hparams.PriorPrecision(plain, per="layer", init=0.5)
        want = torch.autograd.grad(
            hg.log_evidence(plain, x, y, prior_plain, kernel=kernel), list(prior_plain.raw)
        )
        have = torch.autograd.grad(got, list(prior.raw))
        torch.testing.assert_close(torch.stack(have), torch.stack(want), rtol=1e-10, atol=1e-12)


class _MaskedHead(nn.Module):
    """Class-incremental training: the logits of classes not seen yet are masked with -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.tensor([False, False, True])
        return self.net(x).masked_fill(mask, float("-inf"))


def test_logits_masked_with_minus_inf_give_the_evidence_of_the_unmasked_classes() -> None:
    # a masked class has p = 0: its whitened output is 0 (no NaN from sqrt(p) or inf - inf), the
    # per-example check must not trip on inf - inf, and the evidence is that of the softmax over
    # the other two classes (the masked row of the head still under the prior: its Jacobian is
    # 0). Reference: the dense formula on the same network sliced to its first two logits. Then
    # a MAP step and a hyperstep of the class on it are finite and accepted. (Not covered so far.)
    torch.manual_seed(0)
    model = _MaskedHead().double()
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    sliced = nn.Sequential(model.net, _Take2())
    names = [n for n, _ in sliced.named_parameters()]
    raw = torch.tensor([0.2, -0.3], dtype=DT, requires_grad=True)
    prec = {n: raw[0 if n.startswith("0.0.") else 1].exp() for n in names}
    ref = _reference_bound(sliced, x, y, prec, names, data_size=6)
    (g_ref,) = torch.autograd.grad(ref, raw)
    for kernel in ["auto", "dense"]:
        for form in ["ntk", "parametric"]:
            prior = hg.hparams.PriorPrecision(model, per="layer")
            with torch.no_grad():
                prior.raw[0].fill_(0.2)
                prior.raw[1].fill_(-0.3)
            got = hg.log_evidence(model, x, y, prior, kernel=kernel, form=form)
            assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
            g = torch.stack(torch.autograd.grad(got, list(prior.raw)))
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=6,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    assert math.isfinite(float(hopt.step((x, y))))
    info = hopt.hyper_step(train_batch=(x, y))
    assert not info.skipped and math.isfinite(info.outer_loss) and math.isfinite(info.hypergrad_norm)


class _Take2(nn.Module):
    def forward(self, f: Tensor) -> Tensor:
        return f[:, :2]
