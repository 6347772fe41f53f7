"""Misuse and unusual-but-legal use, over every family of the contract registry, as other
libraries' suites and real training scripts exercise an optimiser."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
from test_contract import BY_ID, IDS, METHODS, _assert_same, _batches, _setup, _snapshot
from torch import nn

import hypergrad as hg

each_method = pytest.mark.parametrize("m", METHODS, ids=IDS)
VB = _batches(1, seed=99)[0]


def _tensors(hopt: hg.HyperOptimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*hopt.model.parameters(), *hopt.hparams.parameters()]]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@each_method
def test_hparams_converted_after_construction_is_named_and_changes_nothing(m) -> None:
    """Before: ``hparams.to(torch.float32)`` after building the optimisers went through the whole
    hypergradient, wrote ``.grad`` and failed inside Adam ("expected dtype double for `end` but
    got dtype float"), after Adam had already advanced its step counter. Now every call names
    the converted hyperparameter and leaves everything as it was (model conversion was named
    already)."""
    hopt = _setup(m)
    batches = _batches(4)
    for b in batches[:3]:
        hopt.step(b)
    hopt.hyper_step(train_batch=batches[2], val_batch=VB)
    hopt.hparams.to(torch.float32)
    before = _snapshot(hopt)
    calls = (
        lambda: hopt.step(batches[3]),
        lambda: hopt.hyper_step(train_batch=batches[3], val_batch=VB),
        lambda: hopt.hypergradient(train_batch=batches[3], val_batch=VB),
    )
    named = r"hyperparameter '.+' is now torch.float32 .* was torch.float64"
    for call in calls:
        with pytest.raises(ValueError, match=named):
            call()
    after = _snapshot(hopt)
    for key in ("model", "hparams", "inner", "outer"):
        _assert_same(before[key], after[key], key)  # Adam's step counter included
    assert hopt.hyper_steps == 1 and hopt.inner_steps == 3
    hopt.hparams.to(torch.float64)  # converted back: it goes on
    hopt.step(batches[3])
    assert not hopt.hyper_step(train_batch=batches[3], val_batch=VB).skipped


def test_hyperparameters_built_in_another_dtype_than_the_model_are_not_taken_for_converted() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).double()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2).float()

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

    hopt = hg.Implicit(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        solver=hg.Identity(),
    )
    b = _batches(1)[0]
    hopt.step(b)
    hopt.hyper_step(train_batch=b, val_batch=VB)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in hp.parameters())


def _other(m: hg.HyperOptimizer) -> str:
    """A registry row of another method class than ``m``'s."""
    return next(r.id for r in METHODS if type(_setup(r)) is not type(m))


@each_method
def test_a_state_of_another_family_or_architecture_is_refused_and_nothing_loads(m) -> None:
    hopt = _setup(m)
    batches = _batches(3)
    for b in batches:
        hopt.step(b)
    before = _snapshot(hopt)
    other = _setup(BY_ID[_other(hopt)], seed=1)
    other.step(batches[0])
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    foreign = torch.load(buf, weights_only=True)
    with pytest.raises(ValueError, match=rf"saved by '{type(other).__name__}', not '{type(hopt).__name__}'"):
        hopt.load_state_dict(foreign)
    # the same family, but a model with another hidden width: named by the model's own load
    wide = _setup(m, seed=2).state_dict()
    key = next(k for k, v in wide["model"].items() if v.dim() == 2)
    wide["model"][key] = torch.zeros(tuple(s + 1 for s in wide["model"][key].shape), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"size mismatch for {key.replace('.', '[.]')}"):
        hopt.load_state_dict(wide)
    after = _snapshot(hopt)
    for key in ("model", "hparams", "inner", "outer"):
        _assert_same(before[key], after[key], key)


@each_method
def test_stale_grads_left_by_the_user_do_not_leak_into_steps_or_hypergradients(m) -> None:
    """``inner_optimizer.zero_grad(set_to_none=False)`` and garbage ``.grad`` on weights and
    hyperparameters before every call give bit for bit the run of a clean script."""

    def run(dirty: bool) -> list[torch.Tensor]:
        hopt = _setup(m)
        batches = _batches(4)
        for i, b in enumerate(batches):
            if dirty:
                hopt.inner_optimizer.zero_grad(set_to_none=False)
                for p in [*hopt.model.parameters(), *hopt.hparams.parameters()]:
                    p.grad = torch.full_like(p, 1e3 * (i + 1))
            hopt.step(b)
        if dirty:
            for p in [*hopt.model.parameters(), *hopt.hparams.parameters()]:
                p.grad = torch.full_like(p, -1e3)
        hopt.hyper_step(train_batch=batches[-1], val_batch=VB)
        return _tensors(hopt) + [p.grad.clone() for p in hopt.hparams.parameters()]  # type: ignore[union-attr]

    torch.manual_seed(0)
    clean = run(False)
    torch.manual_seed(0)
    assert _equal(run(True), clean)


def test_a_step_after_stale_grads_equals_plain_pytorch() -> None:
    m = BY_ID["implicit-cg"]
    hopt = _setup(m)
    ref = _setup(m)  # same seed: the same weights
    b = _batches(1)[0]
    for p in hopt.model.parameters():
        p.grad = torch.ones_like(p)
    hopt.step(b)
    ref.inner_optimizer.zero_grad()
    ref.train_loss(ref.model, ref.hparams, b).backward()
    ref.inner_optimizer.step()
    assert _equal(list(hopt.model.parameters()), list(ref.model.parameters()))


@each_method
def test_optimizer_step_hooks_run_once_per_real_step(m) -> None:
    """Hooks registered on the optimisers (``register_step_pre_hook`` / ``_post_hook``) run as
    torch.optim documents: once per ``step`` (inner) and per outer step of ``hyper_step``;
    ``hypergradient`` steps nothing, so runs none."""
    hopt = _setup(m)
    seen: list[str] = []
    for name, opt in (("inner", hopt.inner_optimizer), ("outer", hopt.outer_optimizer)):
        opt.register_step_pre_hook(lambda o, a, k, n=name: seen.append(f"{n}-pre"))
        opt.register_step_post_hook(lambda o, a, k, n=name: seen.append(f"{n}-post"))
    batches = _batches(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # Unrolled: the replay runs no hooks (it says so)
        for b in batches:
            hopt.step(b)
        assert seen == ["inner-pre", "inner-post"] * 3
        seen.clear()
        hopt.hypergradient(train_batch=batches[-1], val_batch=VB)
        assert seen == []
        hopt.hyper_step(train_batch=batches[-1], val_batch=VB)
    outer_steps = 2 if m.id == "marglik-parametric" else 1  # (outer_steps=2)
    assert seen == ["outer-pre", "outer-post"] * outer_steps


@each_method
def test_hyper_step_before_any_step(m) -> None:
    """Unrolled has nothing to differentiate through and says so; the others give at the
    initial weights exactly what ``hypergradient`` gives."""
    hopt = _setup(m)
    b = _batches(1)[0]
    if isinstance(hopt, hg.Unrolled):
        before = _snapshot(hopt)
        with pytest.raises(ValueError, match=r"needs at least one inner step"):
            hopt.hyper_step(train_batch=b, val_batch=VB)
        after = _snapshot(hopt)
        torch.testing.assert_close(after["hparams"], before["hparams"], rtol=0, atol=0)
        return
    rng = torch.get_rng_state()
    grads, _ = hopt.hypergradient(train_batch=b, val_batch=VB)
    torch.set_rng_state(rng)
    info = hopt.hyper_step(train_batch=b, val_batch=VB)
    assert not info.skipped and info.hyper_steps == 1
    for g, p in zip(grads, hopt.hparams.parameters(), strict=True):
        assert torch.equal(g, p.grad)  # type: ignore[arg-type]


def test_two_hyperoptimizers_sharing_one_hparams_module_each_write_their_own_hypergradient() -> None:
    """Two models tuned with one ``hparams`` (and one outer optimiser each): each ``hyper_step``
    replaces ``.grad`` with its own hypergradient, never adds the other's."""
    torch.manual_seed(0)
    models = [nn.Linear(4, 3).double() for _ in range(2)]
    hp = nn.Module()
    hp.log_decay = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        penalty = sum((w**2).sum() for w in m.parameters())
        return nn.functional.cross_entropy(m(b[0]), b[1]) + h.log_decay.exp() * penalty

    hopts = [
        hg.Implicit(
            model,
            hp,
            loss,
            lambda m, h, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            solver=hg.CG(maxiter=10),
        )
        for model in models
    ]
    b = _batches(1)[0]
    for h in hopts:
        h.step(b)
    alone = [h.hypergradient(train_batch=b, val_batch=VB)[0] for h in hopts]
    for h, g in zip(hopts, alone, strict=True):
        h.hyper_step(train_batch=b, val_batch=VB)
        for a, p in zip(g, hp.parameters(), strict=True):
            assert torch.equal(a, p.grad)  # type: ignore[arg-type]
    assert not torch.equal(alone[0][0], alone[1][0])


@each_method
def test_resuming_then_changing_the_inner_lr_and_mode_goes_on_like_the_straight_run(m) -> None:
    """Loaded from ``torch.load(weights_only=True)`` mid-run, then the user lowers the inner
    learning rate (and, for a BatchNorm model, switches to ``eval()``): bit for bit the run that
    made the same changes without stopping."""
    batches = _batches(8)

    def go(hopt: hg.HyperOptimizer, start: int, stop: int) -> None:
        for i in range(start, stop):
            hopt.step(batches[i])
            if i % 2:
                hopt.hyper_step(train_batch=batches[i], val_batch=VB)

    def change(hopt: hg.HyperOptimizer) -> None:
        for g in hopt.inner_optimizer.param_groups:
            g["lr"] = 0.03
        if m.id.startswith("implicit"):
            hopt.model.eval()

    straight = _setup(m)
    go(straight, 0, 4)
    buf = io.BytesIO()
    torch.save(straight.state_dict(), buf)
    change(straight)
    go(straight, 4, 8)
    resumed = _setup(m, seed=7)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    change(resumed)
    go(resumed, 4, 8)
    assert _equal(_tensors(straight), _tensors(resumed))
