"""Hardening of ``hg.Unrolled``'s replay: the replayed steps must be the real ``torch.optim`` steps
(weights equal to the real ones, bit for bit where the arithmetic allows) and the hypergradient
that of real training (central differences of plain ``torch.optim`` runs, float64), under what
research scripts do: train/eval switches around the hyperstep, schedulers, tuned settings of
every supported optimiser, sparse embeddings, and randomness the replay cannot see."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
K = 3
Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(n: int = K + 1, seed: int = 0, dtype: torch.dtype = DT) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 5, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)
    ]


def _ce(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _mlp(*middle: nn.Module, dtype: torch.dtype = DT) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), *middle, nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _unrolled(model: nn.Module, hp: nn.Module, opt: torch.optim.Optimizer, **kw: Any) -> hg.Unrolled:
    kw.setdefault("train_loss", _train)
    kw.setdefault("val_loss", _ce)
    return hg.Unrolled(
        model,
        hp,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=K,
        **kw,
    )


def _assert_fd(
    grads: tuple[torch.Tensor, ...], hp: nn.Module, outer: Callable[[torch.Tensor], float]
) -> None:
    """``grads`` against central differences of ``outer`` (L_V after real training at raw values)."""
    lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()
    got = torch.cat([g.reshape(-1) for g in grads])
    eps = 1e-6
    fd = torch.zeros_like(lam0)
    for i in range(len(lam0)):
        e = torch.zeros_like(lam0)
        e[i] = eps
        fd[i] = (outer(lam0 + e) - outer(lam0 - e)) / (2 * eps)
    assert fd.abs().max() > 1e-5  # the check has something to check
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))


# ----------------------------------------------------------------------------- train / eval modes


def _val_in_eval_mode(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    return _ce(m, h, b)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_hyperstep_in_eval_mode_replays_the_steps_in_train_mode(checkpoint: bool) -> None:
    """A script that calls ``model.eval()`` before the hyperstep (to validate without dropout)
    must still get the training steps replayed in train mode, as they were taken: the replay
    used the current mode (dropout off, BatchNorm on running statistics), 0.1 off the real
    weights and a wrong hypergradient, silently."""
    data = _batches()

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        m = _mlp(nn.Dropout(0.3))
        return (
            m,
            hg.hparams.WeightDecay(m, per="layer", init=0.05),
            torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
        )

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        torch.manual_seed(7)
        for b in data[:K]:
            opt.zero_grad()
            _train(m, hp, b).backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            return float(_ce(m, hp, data[K]))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, checkpoint=checkpoint)
    torch.manual_seed(7)
    for b in data[:K]:
        hopt.step(b)
    model.eval()
    grads, _ = hopt.hypergradient(val_batch=data[K])
    assert not model.training  # the user's mode is left as it was
    _assert_fd(grads, hp, outer)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real)


def test_batchnorm_steps_replay_in_their_own_mode() -> None:
    """BatchNorm in train mode for the steps, eval mode for the hyperstep (or the other way
    round for a step): the replay reproduces the weights and running statistics bit for bit."""
    data = _batches(K + 2)
    model = _mlp(nn.BatchNorm1d(6))
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = _unrolled(model, hp, torch.optim.Adam(model.parameters(), lr=0.05))
    hopt.step(data[0])
    model.eval()  # one step on frozen statistics, as a fine-tuning script might
    hopt.step(data[1])
    model.train()
    hopt.step(data[2])
    model.eval()
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real)
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------- optimiser arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.Adam(
            [
                {"params": m[0].parameters(), "betas": (0.3, 0.6), "weight_decay": 0.1},
                {"params": m[2].parameters()},
            ],
            lr=0.01,
        ),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, amsgrad=True, maximize=True),
        lambda m: torch.optim.Adam(
            m.parameters(), lr=0.02, foreach=True, decoupled_weight_decay=True, weight_decay=0.1
        ),
    ],
    ids=["adam_groups_wd", "adamw_amsgrad_maximize", "adam_foreach_decoupled"],
)
def test_adam_replay_is_bit_exact(
    make: Callable[[nn.Module], torch.optim.Optimizer], dtype: torch.dtype
) -> None:
    """The replay uses torch.optim's own operations (lerp, addcmul, addcdiv), so the replayed
    Adam weights are the real ones bit for bit (they differed in the last bits: 5e-17 in
    float64, 4e-8 in float32, growing with the window)."""
    model = _mlp(dtype=dtype)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(dtype)
    hopt = _unrolled(model, hp, make(model))
    hopt.steps = 6  # a longer window than the other tests
    for b in _batches(6, dtype=dtype):
        hopt.step(b)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_tuned_rmsprop_alpha_matches_finite_differences(mode: str) -> None:
    """RMSprop's ``alpha`` as a hyperparameter: reverse mode raised a TypeError (``addcmul``'s
    ``value=`` takes numbers only) and forward mode silently took the dual number's value, losing
    its tangent (hypergradient -3e-4 where real training gives +4.6e-3)."""
    data = _batches()

    def build() -> tuple[nn.Module, torch.optim.Optimizer, hg.hparams.OptimizerSetting]:
        m = _mlp()
        opt = torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True, alpha=0.9)
        return m, opt, hg.hparams.OptimizerSetting(opt, "alpha", "unit")

    def outer(lam: torch.Tensor) -> float:
        m, opt, hp = build()
        with torch.no_grad():
            hp.raw.copy_(lam)
        for b in data[:K]:
            hp.write()
            opt.zero_grad()
            _ce(m, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, hp, data[K]))

    model, opt, hp = build()
    hopt = _unrolled(model, hp, opt, train_loss=_ce, mode=mode)
    for b in data[:K]:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=data[K])
    _assert_fd(grads, hp, outer)


_S = torch.optim.lr_scheduler
SCHEDULES: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], Callable[[Any], Any]]] = {
    "adam_onecycle_cycles_betas": (
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
        lambda o: _S.OneCycleLR(o, max_lr=0.05, total_steps=6),
    ),
    "sgd_warm_restarts": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
        lambda o: _S.CosineAnnealingWarmRestarts(o, T_0=2),
    ),
    "sgd_plateau": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, dampening=0.3),
        lambda o: _S.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=10.0),
    ),
    "rmsprop_sequential": (
        lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, weight_decay=0.01),
        lambda o: _S.SequentialLR(
            o, [_S.LinearLR(o, start_factor=0.1, total_iters=1), _S.ExponentialLR(o, 0.7)], milestones=[1]
        ),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedules_changing_within_the_window_match_real_training(name: str) -> None:
    """Learning rate (and OneCycle's betas) changing at every step of the window: replayed weights
    equal the real ones and the hypergradient matches central differences of real training."""
    make_opt, make_sched = SCHEDULES[name]
    data = _batches()

    def advance(sched: Any, loss: torch.Tensor) -> None:
        sched.step(float(loss)) if isinstance(sched, _S.ReduceLROnPlateau) else sched.step()

    def outer(lam: torch.Tensor) -> float:
        m = _mlp()
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.05)
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        opt = make_opt(m)
        sched = make_sched(opt)
        for b in data[:K]:
            opt.zero_grad()
            loss = _train(m, hp, b)
            loss.backward()
            opt.step()
            advance(sched, loss.detach())
        with torch.no_grad():
            return float(_ce(m, hp, data[K]))

    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    opt = make_opt(model)
    sched = make_sched(opt)
    hopt = _unrolled(model, hp, opt)
    for b in data[:K]:
        advance(sched, hopt.step(b))
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real)
    grads, _ = hopt.hypergradient(val_batch=data[K])
    _assert_fd(grads, hp, outer)


# ----------------------------------------------------------------------------- sparse gradients


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb((x.abs() * 3).long().clamp(max=9)).mean(1)))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_sparse_embedding_matches_finite_differences(checkpoint: bool) -> None:
    """``nn.Embedding(sparse=True)`` with SGD (which takes sparse gradients) and a decay on the
    embedding too: the replay (whose gradient is the dense one of the same values) matches real
    training, in both reverse modes."""
    data = _batches()

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        m = _Bag(sparse=True).double()
        return (
            m,
            hg.hparams.WeightDecay(m, per="layer", init=0.05),
            torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5),
        )

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        for b in data[:K]:
            opt.zero_grad()
            _train(m, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, hp, data[K]))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, checkpoint=checkpoint)
    for b in data[:K]:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=data[K])
    _assert_fd(grads, hp, outer)


# ----------------------------------------------------------------------------- refusals and warnings


@pytest.mark.parametrize(
    "cls,flag",
    [(torch.optim.SGD, "fused"), (torch.optim.Adam, "capturable"), (torch.optim.SGD, "differentiable")],
)
def test_unsupported_flags_name_the_flag_and_the_fix(cls: type, flag: str) -> None:
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({flag}=True\).*{flag}=False"):
        _unrolled(model, hp, cls(model.parameters(), lr=0.1, **{flag: True}))


def test_flag_set_on_a_group_after_construction_is_refused_at_the_next_step() -> None:
    """A group whose flags change later (or a group added with other flags) is checked at each
    step, before anything moves: not replayed as something else."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = _unrolled(model, hp, opt)
    data = _batches()
    hopt.step(data[0])
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["differentiable"] = True
    with pytest.raises(ValueError, match=r"differentiable=True\) \(param group 0\)"):
        hopt.step(data[1])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_optimizer_subclass_is_refused_by_name() -> None:
    class ClippedSGD(torch.optim.SGD):
        pass

    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    with pytest.raises(TypeError, match="got ClippedSGD"):
        _unrolled(model, hp, ClippedSGD(model.parameters(), lr=0.1))


_NOISE = torch.Generator().manual_seed(3)


def _numpy_noise(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    x = b[0] + 0.5 * torch.from_numpy(np.random.randn(*b[0].shape))  # noqa: NPY002 - the global RNG
    return _train(m, h, (x, b[1]))


def _own_generator_noise(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    x = b[0] + 0.5 * torch.randn(b[0].shape, generator=_NOISE, dtype=b[0].dtype)
    return _train(m, h, (x, b[1]))


@pytest.mark.parametrize("how", ["numpy", "generator", "projection"])
@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_steps_the_replay_cannot_reproduce_are_warned_about(how: str, mode: str) -> None:
    """Randomness the replay cannot see, or weights edited through ``.data`` (no version bump):
    the replayed steps end elsewhere than the real ones, and the hyperstep says so instead of
    returning another trajectory's hypergradient silently."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    kw: dict[str, Any] = {"checkpoint": True} if mode == "checkpoint" else {"mode": mode}
    loss = {"numpy": _numpy_noise, "generator": _own_generator_noise, "projection": _train}[how]
    hopt = _unrolled(
        model, hp, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), train_loss=loss, **kw
    )
    data = _batches()
    for b in data[:K]:
        hopt.step(b)
        if how == "projection":  # e.g. a constraint applied after every step
            for p in model.parameters():
                p.data.clamp_(-0.05, 0.05)
    with pytest.warns(hg.ReplayWarning, match="did not reproduce training"):
        hopt.hyper_step(val_batch=data[K])


def test_moved_hyperparameters_within_the_window_are_no_false_alarm() -> None:
    """A hyperstep every step moves the hyperparameters inside the window: the replay (current
    hyperparameters throughout) differs from the real weights on purpose, without a warning;
    nor is there one for exactly reproduced steps."""
    model = _mlp(nn.Dropout(0.2))
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = hg.Unrolled(
        model,
        hp,
        _train,
        _ce,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=10.0),
        steps=K,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in _batches(6, seed=1):
            hopt.step(b)
            hopt.hyper_step(val_batch=b)
    moved = [a - p.detach() for a, p in zip(hopt.replayed_weights(), model.parameters(), strict=True)]
    assert max(float(d.abs().max()) for d in moved) > 1e-6  # the replay did differ


def test_recorded_modes_survive_a_resume_into_a_fresh_object() -> None:
    """The train/eval modes of the recorded steps are part of the checkpoint (``weights_only``
    loading included): a fresh object resumed mid-window in eval mode replays them in train mode
    and gives the straight run's hypergradient bit for bit."""
    data = _batches(K + 2)

    def make(seed: int) -> hg.Unrolled:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 3)).double()
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.05)
        return _unrolled(m, hp, torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9))

    straight = make(0)
    for b in data[:K]:
        straight.step(b)
    buf = io.BytesIO()
    torch.save(straight.state_dict(), buf)
    buf.seek(0)
    resumed = make(1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for hopt in (straight, resumed):
        hopt.model.eval()
    a, _ = straight.hypergradient(val_batch=data[K])
    b, _ = resumed.hypergradient(val_batch=data[K])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for got, real in zip(resumed.replayed_weights(), resumed.model.parameters(), strict=True):
        assert torch.equal(got, real)
