"""``hg.MarginalLikelihood`` in the training loop a researcher writes (Immer et al. 2021, laplace-torch's
``marglik_training``): the hyperstep against the bound's gradient taken directly, the schedule with LR
schedulers on both optimisers, resuming mid-run, frozen hyperparameters, float32 against float64, and
the errors a wrong ``data_size`` or an uncovered weight must give at the first step, not later.
(The pure functions' own edge cases are in test_peers_marglik.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _data(c: int, n: int = 12, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, 1, generator=g, dtype=DT) if c == 1 else torch.randint(0, c, (n,), generator=g)
    return x, y


def _mlp(d: int, c: int, dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).to(dtype)


def _hopt(model: nn.Module, hp: nn.Module, c: int, **kw: object) -> hg.MarginalLikelihood:
    kw.setdefault("data_size", 40)
    return hg.MarginalLikelihood(
        model,
        hp,
        likelihood="regression" if c == 1 else "classification",
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ the hyperstep is the bound's gradient


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize("c", [1, 2])  # regression with the noise learned too; two classes
@pytest.mark.parametrize("outputs, kernel", [("all", "auto"), ("each", "dense")])
def test_hyper_step_writes_the_gradient_of_the_bound_taken_directly(
    per: str, c: int, outputs: str, kernel: str
) -> None:
    x, y = _data(c)
    model = _mlp(3, c)
    hp: dict[str, nn.Module] = {"prior": hg.hparams.PriorPrecision(model, per=per, init=0.7)}
    if c == 1:
        hp["noise"] = hg.hparams.ObservationNoise(init=0.4)
    hps = nn.ModuleDict(hp).to(DT)
    hopt = _hopt(model, hps, c, subset_size=4, outputs=outputs, kernel=kernel)
    for _ in range(3):
        hopt.step((x, y))
    info = hopt.hyper_step(train_batch=(x, y))
    bound = hg.log_evidence_bound(
        model, x, y, hps["prior"], data_size=40, likelihood="regression" if c == 1 else "classification",
        noise=hps["noise"] if c == 1 else None, subset_size=4, outputs=outputs, kernel=kernel,
    )  # fmt: skip
    ref = torch.autograd.grad(-bound / 40, list(hps.parameters()))
    for p, r in zip(hps.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)
    assert info.outer_loss == pytest.approx(float(-bound.detach() / 40), rel=1e-14)


def test_learned_translation_with_several_samples_gets_the_bound_gradient_under_the_same_draws() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 16, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    for per in ("layer", "parameter"):  # layerwise and dense kernels
        model = _mlp(16, 3)
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per=per),
                "shift": hg.hparams.RandomTranslation((4, 4)),
            }
        ).to(DT)
        hopt = _hopt(model, hp, 3, augmentation_samples=3, subset_size=4)
        for _ in range(2):
            hopt.step((x, y))
        torch.manual_seed(5)
        hopt.hyper_step(train_batch=(x, y))
        torch.manual_seed(5)
        bound = hg.log_evidence_bound(
            model, x, y, hp["prior"], data_size=40, subset_size=4, augmentation=hp["shift"], samples=3
        )
        ref = torch.autograd.grad(-bound / 40, list(hp.parameters()))
        assert float(ref[-1].abs().max()) > 1e-3  # the range does get a gradient
        for p, r in zip(hp.parameters(), ref, strict=True):
            torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)


def test_regression_outputs_b_or_b1_and_targets_b_or_b1_are_one_problem() -> None:
    class Squeezed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).squeeze(-1)

    x, y = _data(1)
    seen = []
    for squeezed in (True, False):
        for target in (y, y.reshape(-1)):
            torch.manual_seed(0)
            model = (Squeezed() if squeezed else nn.Linear(3, 1)).to(DT)
            hp = nn.ModuleDict(
                {
                    "prior": hg.hparams.PriorPrecision(model, per="layer"),
                    "noise": hg.hparams.ObservationNoise(),
                }
            ).to(DT)
            hopt = _hopt(model, hp, 1, data_size=24)
            loss = hopt.step((x, target))
            info = hopt.hyper_step(train_batch=(x, target))
            seen.append((float(loss), info.outer_loss, *[float(p.grad.sum()) for p in hp.parameters()]))
    assert all(s == seen[0] for s in seen), seen


def test_float32_run_tracks_float64() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 16, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    for per in ("global", "parameter"):
        out = []
        for dt in (torch.float32, DT):
            model = _mlp(16, 3, dt)
            hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per, init=1e-3)}).to(dt)
            hopt = hg.MarginalLikelihood(
                model, hp, likelihood="classification", data_size=1000, subset_size=12,
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
            )  # fmt: skip
            for _ in range(15):
                hopt.step((x.to(dt), y))
                info = hopt.hyper_step(train_batch=(x.to(dt), y))
            out.append(([p.detach().double() for p in hp.parameters()], info.outer_loss))
        (a, la), (b, lb) = out
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-4)
        assert la == pytest.approx(lb, rel=1e-6)


# ------------------------------------------------------------------ the loop: schedule, resume, freezing


def _loop_parts(bn: bool = False) -> tuple[nn.Module, nn.Module, hg.MarginalLikelihood, list[object]]:
    torch.manual_seed(0)
    layers = [
        nn.Linear(16, 8),
        *([nn.BatchNorm1d(8)] if bn else []),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    ]
    model = nn.Sequential(*layers).to(DT)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer"),
            "shift": hg.hparams.RandomTranslation((4, 4)),
        }
    ).to(DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=40, augmentation_samples=2, subset_size=3,
        outputs="sampled", outer_steps=2, burn_in=2, every=3,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    scheds: list[object] = [
        torch.optim.lr_scheduler.CosineAnnealingLR(hopt.inner_optimizer, T_max=20),
        torch.optim.lr_scheduler.StepLR(hopt.outer_optimizer, step_size=1, gamma=0.7),
    ]
    return model, hp, hopt, scheds


def _loop(model: nn.Module, hopt: hg.MarginalLikelihood, scheds: list, steps: range, log: list) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 16, generator=g, dtype=DT), torch.randint(0, 3, (40,), generator=g)
    for _ in steps:
        idx = torch.randperm(40)[:6]  # torch's RNG: in the state_dict
        model.train()
        hopt.step((x[idx], y[idx]))
        scheds[0].step()
        if hopt.hyper_step_due():
            model.eval()
            hopt.hyper_step(train_batch=(x[idx], y[idx]))
            scheds[1].step()
            log.append(hopt.inner_steps)


def test_schedule_with_lr_schedulers_and_resume_mid_run_is_bit_identical() -> None:
    m1, hp1, h1, s1 = _loop_parts()
    log1: list[int] = []
    _loop(m1, h1, s1, range(14), log1)
    assert log1 == [2, 5, 8, 11, 14]  # after burn_in = 2 steps, then every 3
    assert h1.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.7**5)
    m2, hp2, h2, s2 = _loop_parts()
    log2: list[int] = []
    _loop(m2, h2, s2, range(6), log2)
    saved = copy.deepcopy((h2.state_dict(), s2[0].state_dict(), s2[1].state_dict()))  # type: ignore[attr-defined]
    torch.manual_seed(99)  # the state_dict brings torch's RNG back
    m3, hp3, h3, s3 = _loop_parts()
    h3.load_state_dict(saved[0])
    s3[0].load_state_dict(saved[1])  # type: ignore[attr-defined]
    s3[1].load_state_dict(saved[2])  # type: ignore[attr-defined]
    _loop(m3, h3, s3, range(6, 14), log2)
    assert log2 == log1 and (h3.inner_steps, h3.hyper_steps) == (14, 5)
    for a, b in zip(
        [*m1.parameters(), *hp1.parameters()], [*m3.parameters(), *hp3.parameters()], strict=True
    ):
        assert torch.equal(a, b)
    for o1, o3 in ((h1.inner_optimizer, h3.inner_optimizer), (h1.outer_optimizer, h3.outer_optimizer)):
        for st1, st3 in zip(o1.state.values(), o3.state.values(), strict=True):
            assert all(torch.equal(st1[k], st3[k]) for k in st1)


def test_batchnorm_in_training_mode_at_hyper_step_is_refused_changing_nothing() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 16, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    for through_map in (False, True):
        model, hp, hopt, _ = _loop_parts(bn=True)
        hopt.through_map = through_map
        model.train()
        hopt.step((x, y))
        before = copy.deepcopy((model.state_dict(), hp.state_dict(), hopt.outer_optimizer.state_dict()))
        with pytest.raises(ValueError, match=r"model\.1 is a BatchNorm layer in training mode"):
            hopt.hyper_step(train_batch=(x, y))
        after = (model.state_dict(), hp.state_dict())
        for a, b in zip(before[:2], after, strict=True):
            assert all(torch.equal(v, b[k]) for k, v in a.items())
        assert hopt.hyper_steps == 0 and not hopt.outer_optimizer.state


@pytest.mark.parametrize("outer_steps", [1, 3])
def test_a_hyperparameter_frozen_mid_run_stays_put_while_the_others_learn(outer_steps: int) -> None:
    x, y = _data(1)
    model = _mlp(3, 1)
    hp = nn.ModuleDict(
        {"prior": hg.hparams.PriorPrecision(model, per="parameter"), "noise": hg.hparams.ObservationNoise()}
    ).to(DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="regression", data_size=24, outer_steps=outer_steps,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        outer_optimizer=torch.optim.AdamW(hp.parameters(), lr=0.05, weight_decay=0.1),
    )  # fmt: skip
    for _ in range(2):
        hopt.step((x, y))
        hopt.hyper_step(train_batch=(x, y))  # Adam's moments for the noise too
    hp["noise"].raw.requires_grad_(False)
    noise, prior = hp["noise"].raw.clone(), [t.clone() for t in hp["prior"].raw]
    for _ in range(2):
        hopt.step((x, y))
        hopt.hyper_step(train_batch=(x, y))
    assert torch.equal(hp["noise"].raw, noise) and hp["noise"].raw.grad is None
    assert not any(torch.equal(a, b) for a, b in zip(prior, hp["prior"].raw, strict=True))


# ------------------------------------------------------------------ errors at the first step, not later


def test_step_refuses_a_batch_larger_than_data_size_changing_nothing() -> None:
    """``data_size=len(loader)`` (batches, not examples) used to train for all of ``burn_in`` with
    the prior scaled by the wrong N, refused only at the first hyperstep."""
    x, y = _data(2)
    model = _mlp(3, 2)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model)}).to(DT)
    hopt = _hopt(model, hp, 2, data_size=4, burn_in=100)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"batch holds 12 examples but data_size=4.*len\(dataset\)"):
        hopt.step((x, y))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert hopt.inner_steps == 0
    assert float(hopt.step((x[:4], y[:4]))) > 0  # a batch of N is fine


def test_weights_added_to_the_inner_optimiser_without_a_prior_are_refused_at_step() -> None:
    """A head unfrozen and added with ``add_param_group`` after the PriorPrecision was built used to
    train with no prior at all (a warning), refused only at the next hyperstep."""
    x, y = _data(2)
    model = _mlp(3, 2)
    model[2].requires_grad_(False)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=24, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    hopt.step((x, y))
    hopt.hyper_step(train_batch=(x, y))
    model[2].requires_grad_(True)
    inner.add_param_group({"params": list(model[2].parameters())})
    head = copy.deepcopy(model[2].state_dict())
    with pytest.raises(ValueError, match=r"\['2\.weight', '2\.bias'\] are not covered by the PriorPrecision"):
        hopt.step((x, y))
    assert all(torch.equal(v, model[2].state_dict()[k]) for k, v in head.items())
    model[2].requires_grad_(False)  # frozen again: it trains on
    assert hopt.step((x, y)).isfinite()


def test_a_nonfinite_outer_step_within_outer_steps_names_the_hyperstep_and_undoes_all() -> None:
    """The message said "hyper step 2" for the second outer step of the first hyperstep (whose
    count stays 1 after the refusal)."""
    x, y = _data(3)
    model = _mlp(3, 3)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=24, outer_steps=3,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.StepLR(hopt.outer_optimizer, step_size=1, gamma=0.5)
    hopt.step((x, y))
    hopt.hyper_step(train_batch=(x, y))
    sched.step()
    hopt.outer_optimizer.param_groups[0]["lr"] = 1e4  # the first outer step overflows the precision
    before = copy.deepcopy((hp.state_dict(), hopt.outer_optimizer.state_dict()["state"]))
    with pytest.raises(
        hg.NonFiniteError, match=r"hyper step 1: .*outer step 2 of outer_steps=3; the 1 before"
    ):
        hopt.hyper_step(train_batch=(x, y))
    assert hopt.hyper_steps == 1
    assert all(torch.equal(v, hp.state_dict()[k]) for k, v in before[0].items())
    now = hopt.outer_optimizer.state_dict()["state"]
    assert all(torch.equal(v, now[i][k]) for i, st in before[1].items() for k, v in st.items())
    hopt.outer_optimizer.param_groups[0]["lr"] = 0.05
    sched.step()  # the scheduler still drives the restored optimiser
    assert hopt.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert hopt.hyper_step(train_batch=(x, y)).hyper_steps == 2


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_refused_hyperstep_keeps_the_users_tensor_learning_rate_in_the_outer_optimiser(mode: str) -> None:
    """Undoing the outer steps went through ``outer_optimizer.load_state_dict``, which replaces the
    param groups by copies: a tensor learning rate the user updates in place (a hand-written warmup)
    then silently stopped reaching the optimiser."""
    x, y = _data(3)
    model = _mlp(3, 3)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    lr = torch.tensor(0.1, dtype=DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=24, outer_steps=3, on_nonfinite=mode,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=lr),
    )  # fmt: skip
    group = hopt.outer_optimizer.param_groups[0]
    hopt.step((x, y))
    lr.fill_(1e4)  # the first outer step overflows the precision: all three are undone
    with pytest.raises(hg.NonFiniteError) if mode == "raise" else pytest.warns(hg.NonFiniteWarning):
        hopt.hyper_step(train_batch=(x, y))
    assert not hopt.outer_optimizer.state  # the Adam state the undone steps created is gone
    assert hopt.outer_optimizer.param_groups[0] is group and group["lr"] is lr
    lr.fill_(0.05)  # the user's schedule goes on
    values = [p.detach().clone() for p in hp.parameters()]
    hopt.hyper_step(train_batch=(x, y))
    moved = [float((p.detach() - v).abs().max()) for p, v in zip(hp.parameters(), values, strict=True)]
    assert 0.14 < max(moved) < 0.1501  # three Adam steps of about lr = 0.05 each


@pytest.mark.parametrize("per", ["layer", "parameter"])  # layerwise and dense kernels
def test_rrelu_in_training_mode_is_refused_at_hyper_step_like_dropout(per: str) -> None:
    """Train-mode RReLU draws its slopes at random: the layerwise bound was a different number at
    every call (1.5645 then 1.5696, same weights), the dense one crashed in vmap ("we do not yet
    support aten::rrelu_with_noise")."""
    x, y = _data(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.RReLU(), nn.Linear(8, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per)}).to(DT)
    hopt = _hopt(model, hp, 3, data_size=24)
    hopt.step((x, y))  # trains with random slopes, as in plain PyTorch
    values = [p.detach().clone() for p in hp.parameters()]
    with pytest.raises(ValueError, match=r"model\.1 is RReLU in training mode"):
        hopt.hyper_step(train_batch=(x, y))
    assert hopt.hyper_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(values, hp.parameters(), strict=True))
    model.eval()
    grads, info = hopt.hypergradient(train_batch=(x, y))
    assert hopt.hypergradient(train_batch=(x, y))[1].outer_loss == info.outer_loss  # deterministic
    # eval-mode RReLU is a leaky ReLU of slope (lower + upper) / 2: the same bound and gradient
    # (the dense kernel has no vmap rule for rrelu_with_noise and takes one backward per output)
    leaky = copy.deepcopy(model)
    leaky[1] = nn.LeakyReLU((model[1].lower + model[1].upper) / 2)
    hp2 = copy.deepcopy(hp)
    ref, ref_info = _hopt(leaky, hp2, 3, data_size=24).hypergradient(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(ref_info.outer_loss, rel=1e-13)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
