"""``hg.Unrolled`` checked the way higher's and torchopt's test suites check their differentiable
optimisers, translated into this API.

- The replay is the real ``torch.optim`` step, bit for bit, for every variant of every supported
  optimiser (param groups with their own settings, ``maximize``, ``foreach``, a tensor learning
  rate, a layer without a gradient on every other step; float64 and float32): higher's and
  torchopt's "differentiable optimiser equals torch.optim's trajectory".
- The hypergradient of every tunable setting (SGD weight decay / dampening / Nesterov momentum,
  Adam eps / weight decay / lr with ``maximize``, AdamW decay, Adagrad lr / lr_decay / eps,
  RMSprop lr / momentum / eps / decay) equals central differences of real float64 training, in
  reverse, forward and checkpointed mode: higher's finite-difference checks.
- Complex weights (torch.optim runs Adam, RMSprop and Adagrad on their real views).
- Hypersteps at irregular intervals, windows longer than the steps taken: against central
  differences of real training restarted from the window's start; a step whose loss is a
  constant (an empty selection).
- Tied and shared weights in forward and checkpointed mode; a resume mid-window under LambdaLR;
  a pickled run.
- Hyperparameters that reach no loss are named (DisconnectedWarning) in every mode.
- ``hg.optim``'s hypergradient-descent optimisers against a one-step unrolled learning rate.
- The optimisers the replay does not know (SparseAdam, hg.optim's) are refused by
  name; float32 follows float64.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
S = torch.optim
Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(n: int, seed: int = 0, dtype: torch.dtype = DT) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 5, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)
    ]


def _mlp(dtype: torch.dtype = DT) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _groups(m: nn.Sequential) -> list[dict[str, Any]]:
    return [{"params": m[0].parameters()}, {"params": m[2].parameters()}]


def _central(outer: Callable[[torch.Tensor], float], lam0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    fd = torch.zeros_like(lam0)
    for i in range(len(lam0)):
        e = torch.zeros_like(lam0)
        e[i] = eps
        fd[i] = (outer(lam0 + e) - outer(lam0 - e)) / (2 * eps)
    return fd


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _assert_fd(got: torch.Tensor, fd: torch.Tensor, rtol: float = 1e-6) -> None:
    assert fd.abs().max() > 1e-5  # the check has something to check
    torch.testing.assert_close(got, fd, rtol=rtol, atol=rtol * float(fd.abs().max()))


MODES = ["reverse", "forward", "checkpoint"]


def _unrolled(
    model: nn.Module, hp: nn.Module, opt: S.Optimizer, mode: str, steps: int, **kw: Any
) -> hg.Unrolled:
    kw.setdefault("train_loss", _ce)
    kw.setdefault("val_loss", _ce)
    kw.setdefault("outer_optimizer", S.SGD(hp.parameters(), lr=0.0))
    return hg.Unrolled(
        model,
        hp,
        inner_optimizer=opt,
        steps=steps,
        mode="forward" if mode == "forward" else "reverse",
        checkpoint=mode == "checkpoint",
        **kw,
    )


# ----------------------------------------------------------------------------- 1. bit-exact replay


class _TwoHeads(nn.Module):
    """An MLP with an auxiliary head the loss reaches on every other step only (torch.optim skips
    it, its state and its weight decay included, on the others)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _two_heads_loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
    z = torch.tanh(m.body(b[0]))
    loss = F.cross_entropy(m.head(z), b[1]) + h.penalty(m)
    return loss + F.cross_entropy(m.aux(z), b[1]) if b[2] else loss


def _heads(m: _TwoHeads) -> list[dict[str, Any]]:
    return [{"params": [*m.body.parameters(), *m.aux.parameters()]}, {"params": m.head.parameters()}]


REPLAYS: dict[str, Callable[[_TwoHeads, torch.dtype], S.Optimizer]] = {
    "sgd_groups": lambda m, dt: S.SGD(
        [
            {"params": [*m.body.parameters(), *m.aux.parameters()], "momentum": 0.9, "dampening": 0.2},
            {"params": m.head.parameters(), "nesterov": True, "momentum": 0.5, "weight_decay": 0.01},
        ],
        lr=0.05,
    ),
    "sgd_maximize_wd": lambda m, dt: S.SGD(
        m.parameters(), lr=0.05, momentum=0.9, maximize=True, weight_decay=0.1
    ),
    "sgd_foreach": lambda m, dt: S.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True),
    "sgd_tensor_lr": lambda m, dt: S.SGD(m.parameters(), lr=torch.tensor(0.05, dtype=dt), momentum=0.9),
    "rmsprop_centered_maximize": lambda m, dt: S.RMSprop(_heads(m), lr=0.01, centered=True, maximize=True),
    "rmsprop_foreach_centered": lambda m, dt: S.RMSprop(
        m.parameters(), lr=0.01, momentum=0.5, centered=True, weight_decay=0.01, foreach=True
    ),
    "rmsprop_tensor_lr": lambda m, dt: S.RMSprop(
        m.parameters(), lr=torch.tensor(0.01, dtype=dt), momentum=0.3
    ),
    "adagrad_groups": lambda m, dt: S.Adagrad(
        [
            {"params": _heads(m)[0]["params"], "lr_decay": 0.05},
            {"params": m.head.parameters(), "weight_decay": 0.01},
        ],
        lr=0.1,
        initial_accumulator_value=0.1,
    ),
    "adagrad_foreach_maximize": lambda m, dt: S.Adagrad(m.parameters(), lr=0.1, maximize=True, foreach=True),
    "adam_tensor_betas": lambda m, dt: S.Adam(
        m.parameters(), lr=0.02, betas=(torch.tensor(0.8, dtype=dt), torch.tensor(0.9, dtype=dt))
    ),
}


@pytest.mark.parametrize("dtype", [DT, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(REPLAYS))
def test_replay_is_the_real_step_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """torch.optim's own operations, in its order: the replayed weights equal the real ones
    exactly. (A tensor learning rate (SGD, RMSprop) was applied as ``p - lr * d`` where torch.optim
    passes it as ``alpha=``, a tensor Adam beta2 as ``v * b2 + (1 - b2) * g * g`` where torch.optim
    uses ``mul``/``addcmul``, and centred RMSprop wrote its ``lerp`` out: all drifted in the last
    bits, 1e-17 in float64 and 4e-8 in float32.)"""
    model = _TwoHeads().to(dtype)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05, include=lambda n: n.startswith("body"))
    hp = hp.to(dtype)
    hopt = _unrolled(model, hp, REPLAYS[name](model, dtype), "reverse", 6, train_loss=_two_heads_loss)
    for i, (x, y) in enumerate(_batches(6, dtype=dtype)):
        aux = model.aux.weight.detach().clone()
        hopt.step((x, y, i % 2 == 0))
        assert torch.equal(model.aux.weight, aux) == (i % 2 == 1)  # skipped exactly when unreached
    for (n, real), replayed in zip(model.named_parameters(), hopt.replayed_weights(), strict=True):
        assert torch.equal(replayed, real.detach()), (n, float((replayed - real).abs().max()))


def _both_heads(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    z = torch.tanh(m.body(b[0]))
    return F.cross_entropy(m.head(z) + m.aux(z), b[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make",
    [
        lambda m: S.Adam(m.parameters(), lr=0.05, amsgrad=True, weight_decay=0.1),
        lambda m: S.RMSprop(m.parameters(), lr=0.01, centered=True, momentum=0.5),
        lambda m: S.SGD(m.parameters(), lr=0.1, momentum=0.9),
    ],
    ids=["adam_amsgrad", "rmsprop_centered", "sgd_momentum"],
)
def test_state_created_inside_the_window_matches_finite_differences(
    make: Callable[[nn.Module], S.Optimizer], mode: str
) -> None:
    """The auxiliary head gets its first gradient at the window's second step, so its optimiser
    state is born inside the window (and checkpointed mode must line up cotangents of state that
    one step's inputs lack and its outputs have); it is skipped on every other step."""
    data = [(x, y, i % 2 == 1) for i, (x, y) in enumerate(_batches(5))]

    def build() -> tuple[nn.Module, nn.Module, S.Optimizer]:
        m = _TwoHeads().double()
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.05, include=lambda n: not n.startswith("aux"))
        return m, hp, make(m)

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        for b in data[:4]:
            opt.zero_grad()
            _two_heads_loss(m, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_both_heads(m, hp, data[4]))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, mode, 4, train_loss=_two_heads_loss, val_loss=_both_heads)
    for b in data[:4]:
        hopt.step(b)
    assert len(opt.state[model.aux.weight]) > 0
    grads, _ = hopt.hypergradient(val_batch=data[4])
    lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()
    _assert_fd(_flat(grads), _central(outer, lam0))


# ----------------------------------------------------------------------------- 2. tuned settings


SETTINGS: dict[str, tuple[Callable[[nn.Sequential], S.Optimizer], str, str]] = {
    "sgd_weight_decay": (
        lambda m: S.SGD(_groups(m), lr=0.1, momentum=0.9, weight_decay=0.05),
        "weight_decay",
        "positive",
    ),
    "sgd_dampening": (lambda m: S.SGD(_groups(m), lr=0.1, momentum=0.9, dampening=0.3), "dampening", "unit"),
    "sgd_nesterov_momentum": (
        lambda m: S.SGD(_groups(m), lr=0.1, momentum=0.6, nesterov=True),
        "momentum",
        "unit",
    ),
    "adam_eps": (lambda m: S.Adam(_groups(m), lr=0.05, eps=1e-2), "eps", "positive"),
    "adam_amsgrad_weight_decay": (
        lambda m: S.Adam(_groups(m), lr=0.05, weight_decay=0.3, amsgrad=True),
        "weight_decay",
        "positive",
    ),
    "adam_maximize_lr": (lambda m: S.Adam(_groups(m), lr=0.05, maximize=True), "lr", "positive"),
    "adamw_weight_decay": (
        lambda m: S.AdamW(_groups(m), lr=0.05, weight_decay=0.3),
        "weight_decay",
        "positive",
    ),
    "adagrad_lr": (lambda m: S.Adagrad(_groups(m), lr=0.1, weight_decay=0.1), "lr", "positive"),
    "adagrad_lr_decay": (lambda m: S.Adagrad(_groups(m), lr=0.1, lr_decay=0.2), "lr_decay", "positive"),
    "adagrad_eps": (lambda m: S.Adagrad(_groups(m), lr=0.1, eps=0.1), "eps", "positive"),
    "rmsprop_lr": (lambda m: S.RMSprop(_groups(m), lr=0.01, momentum=0.5, centered=True), "lr", "positive"),
    "rmsprop_momentum": (lambda m: S.RMSprop(_groups(m), lr=0.01, momentum=0.5), "momentum", "unit"),
    "rmsprop_eps": (lambda m: S.RMSprop(_groups(m), lr=0.01, eps=0.05, centered=True), "eps", "positive"),
    "rmsprop_weight_decay": (
        lambda m: S.RMSprop(_groups(m), lr=0.01, weight_decay=0.2),
        "weight_decay",
        "positive",
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_tuned_setting_matches_finite_differences_of_real_training(name: str, mode: str) -> None:
    """One value per param group of an optimiser setting as the hyperparameter; the reference
    writes it into the groups of a plain torch.optim run (``maximize`` minimises ``-L_T``)."""
    make, setting, constraint = SETTINGS[name]
    k, data = 3, _batches(4)
    train = (lambda m, h, b: -_ce(m, h, b)) if "maximize" in name else _ce

    def outer(lam: torch.Tensor) -> float:
        m = _mlp()
        opt = make(m)
        hp = hg.hparams.OptimizerSetting(opt, setting, constraint)
        with torch.no_grad():
            hp.raw.copy_(lam)
        for b in data[:k]:
            hp.write()
            opt.zero_grad()
            train(m, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, hp, data[k]))

    model = _mlp()
    opt = make(model)
    hp = hg.hparams.OptimizerSetting(opt, setting, constraint)
    hopt = _unrolled(model, hp, opt, mode, k, train_loss=train)
    for b in data[:k]:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=data[k])
    _assert_fd(_flat(grads), _central(outer, hp.raw.detach().clone()))


# ----------------------------------------------------------------------------- 3. complex weights


class _Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, dtype=torch.complex128, generator=g))
        self.v = nn.Parameter(torch.randn(3, dtype=torch.complex128, generator=g))


def _complex_train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    target = 1j * torch.arange(4, dtype=DT)
    return (
        h.raw.exp().sum() * (m.w.abs() ** 2).sum()
        + ((m.w - target).abs() ** 4).sum()
        + ((m.v * m.w[:3] - 1).abs() ** 2).sum()
    )


def _complex_val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m.w - 0.5).abs() ** 2).sum() + (m.v.real**2).sum()


COMPLEX: dict[str, tuple[type[S.Optimizer], dict[str, Any]]] = {
    "sgd_momentum": (S.SGD, dict(lr=0.02, momentum=0.9)),
    "adam_amsgrad_wd": (S.Adam, dict(lr=0.3, amsgrad=True, weight_decay=0.1)),
    "rmsprop_centered_momentum": (S.RMSprop, dict(lr=0.02, centered=True, momentum=0.5)),
    "adagrad_wd": (S.Adagrad, dict(lr=0.3, weight_decay=0.1)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(COMPLEX))
def test_complex_weights_match_finite_differences_of_real_training(name: str, mode: str) -> None:
    """torch.optim trains complex weights (Adam, RMSprop and Adagrad on their real views, so the
    moments are per real and imaginary part). The replay raised ``"gt_cpu" not implemented for
    'ComplexDouble'`` for those three, and checkpointed mode dropped the cotangent of complex
    optimiser state (SGD momentum: -0.319 where real training gives -0.419)."""
    cls, kw = COMPLEX[name]
    k = 3

    def build() -> tuple[nn.Module, nn.Module, S.Optimizer]:
        m = _Complex()
        return m, hg.hparams.Hparam(torch.tensor([0.1], dtype=DT)), cls(m.parameters(), **kw)

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            hp.raw.copy_(lam)
        for _ in range(k):
            opt.zero_grad()
            _complex_train(m, hp, ()).backward()
            opt.step()
        with torch.no_grad():
            return float(_complex_val(m, hp, ()))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, mode, k, train_loss=_complex_train, val_loss=_complex_val)
    for _ in range(k):
        hopt.step(())
    for replayed, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert replayed.is_complex() and torch.equal(replayed, real.detach())
    grads, _ = hopt.hypergradient(val_batch=())
    _assert_fd(_flat(grads), _central(outer, hp.raw.detach().clone()))


# ----------------------------------------------------------------------------- 4. irregular hypersteps


class _LrAndDecay(nn.Module):
    def __init__(self, model: nn.Module, opt: S.Optimizer) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        self.lr = hg.hparams.LearningRate(opt)


def _decayed(m: nn.Module, h: _LrAndDecay, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.wd.penalty(m)


IRREGULAR: dict[str, tuple[int, list[int], Callable[[nn.Module], S.Optimizer]]] = {
    "adam_amsgrad_k3": (3, [2, 3, 7, 8, 13], lambda m: S.Adam(m.parameters(), lr=0.05, amsgrad=True)),
    "sgd_nesterov_k4": (
        4,
        [1, 6, 7, 12],
        lambda m: S.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    ),
}


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("name", list(IRREGULAR))
def test_hypersteps_at_irregular_intervals_match_real_training_from_the_window_start(
    name: str, checkpoint: bool
) -> None:
    """Hypersteps that move the learning rate and the decays (outer lr 0.3) after 1 or 2 steps
    (fewer than K), then twice in a row, then after a gap longer than K: each hypergradient is
    the derivative of real training over the last min(K, steps) steps, restarted from the real
    weights and optimiser state at the window's start with the current hyperparameters."""
    k, due, make = IRREGULAR[name]
    model = _mlp()
    opt = make(model)
    hp = _LrAndDecay(model, opt)
    hopt = _unrolled(
        model,
        hp,
        opt,
        "checkpoint" if checkpoint else "reverse",
        k,
        train_loss=_decayed,
        outer_optimizer=S.SGD(hp.parameters(), lr=0.3),
    )
    data, vb = _batches(max(due)), _batches(1, seed=5)[0]
    starts: list[tuple[nn.Module, dict[str, Any]]] = []
    for n, b in enumerate(data, start=1):
        starts.append((copy.deepcopy(model), copy.deepcopy(opt.state_dict())))
        hopt.step(b)
        if n not in due:
            continue
        first = max(0, n - k)

        def outer(lam: torch.Tensor, first: int = first, n: int = n) -> float:
            m = copy.deepcopy(starts[first][0])
            o = make(m)
            o.load_state_dict(copy.deepcopy(starts[first][1]))  # (load_state_dict shares tensors)
            h = _LrAndDecay(m, o)
            with torch.no_grad():
                nn.utils.vector_to_parameters(lam, h.parameters())
            for bb in data[first:n]:
                h.lr.write()
                o.zero_grad()
                _decayed(m, h, bb).backward()
                o.step()
            with torch.no_grad():
                return float(_ce(m, h, vb))

        fd = _central(outer, nn.utils.parameters_to_vector(hp.parameters()).detach().clone())
        info = hopt.hyper_step(val_batch=vb)
        assert info.unrolled_steps == min(n, k)
        _assert_fd(_flat(p.grad for p in hp.parameters()), fd, rtol=1e-6)


def _masked(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the examples ``b[2]`` keeps; a constant 0 when it keeps none (as a
    filtering script returns for an empty selection)."""
    if not bool(b[2].any()):
        return torch.zeros((), dtype=DT)
    return _ce(m, h, (b[0][b[2]], b[1][b[2]])) + h.penalty(m)


@pytest.mark.parametrize("mode", MODES)
def test_a_step_whose_loss_reaches_no_weight_matches_real_training(mode: str) -> None:
    """A training loss that is a constant on one step (no example kept): the real step takes no
    gradient and Adam skips every weight; the replay raised autograd's "element 0 of tensors does
    not require grad" in every mode."""
    k = 3
    data = [
        (x, y, torch.arange(12) % (i + 2) != 0 if i != 1 else torch.zeros(12, dtype=torch.bool))
        for i, (x, y) in enumerate(_batches(k + 1))
    ]

    def build() -> tuple[nn.Module, nn.Module, S.Optimizer]:
        m = _mlp()
        return m, hg.hparams.WeightDecay(m, per="layer", init=0.05), S.Adam(m.parameters(), lr=0.05)

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        for b in data[:k]:
            opt.zero_grad()
            loss = _masked(m, hp, b)
            if loss.requires_grad:
                loss.backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, hp, data[k][:2]))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, mode, k, train_loss=_masked, val_loss=lambda m, h, b: _ce(m, h, b[:2]))
    for i, b in enumerate(data[:k]):
        if i == 1:  # the constant loss: skipped, with a warning (a detached loss looks the same)
            with pytest.warns(hg.DisconnectedWarning, match=r"does not require grad \(value 0\)"):
                hopt.step(b)
        else:
            hopt.step(b)
    assert all(float(st["step"]) == k - 1 for st in opt.state.values())  # the empty step was skipped
    grads, _ = hopt.hypergradient(val_batch=data[k])
    _assert_fd(_flat(grads), _central(outer, nn.utils.parameters_to_vector(hp.parameters()).detach().clone()))


@pytest.mark.parametrize("mode", MODES)
def test_a_hyperparameter_cast_to_a_float_is_named_in_every_mode(mode: str) -> None:
    """A hyperparameter that reaches no loss (cast with ``float()``) gets a DisconnectedWarning
    naming it, once, in every mode. Forward mode returned its zero hypergradient silently."""
    model = _mlp()
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="global", init=0.05),
            "scale": hg.hparams.Hparam(1.0, dtype=DT),
        }
    )

    def train(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
        return float(h["scale"].value) * _ce(m, h, b) + h["wd"].penalty(m)

    hopt = _unrolled(model, hp, S.SGD(model.parameters(), lr=0.1, momentum=0.5), mode, 2, train_loss=train)
    data = _batches(3)
    for b in data[:2]:
        hopt.step(b)
    with pytest.warns(hg.DisconnectedWarning, match="'scale.raw'") as record:
        grads, _ = hopt.hypergradient(val_batch=data[2])
    assert len(record) == 1 and "wd" not in str(record[0].message)
    assert float(grads[0].abs().max()) > 0 and torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.parametrize("mode", MODES)
def test_a_detached_validation_loss_is_named_not_an_autograd_error(mode: str) -> None:
    """``val_loss`` returning a detached value: every hyperparameter is named by a
    DisconnectedWarning (reverse and checkpointed mode raised autograd's "element 0 of tensors
    does not require grad"; forward mode returned zeros without a word)."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    val = lambda m, h, b: _ce(m, h, b).detach()  # noqa: E731
    train = lambda m, h, b: _ce(m, h, b) + h.penalty(m)  # noqa: E731
    hopt = _unrolled(model, hp, S.Adam(model.parameters(), lr=0.05), mode, 2, train_loss=train, val_loss=val)
    data = _batches(2)
    hopt.step(data[0])
    with pytest.warns(hg.DisconnectedWarning, match=r"'raw\.[01]'") as record:
        grads, info = hopt.hypergradient(val_batch=data[1])
    assert len(record) == 2 and all(float(g.abs().max()) == 0 for g in grads)
    assert float(info.outer_loss) == pytest.approx(float(_ce(model, hp, data[1]).detach()), rel=1e-12)


# ----------------------------------------------------------------------------- 5. model structure


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 3, bias=False)
        self.mid = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3, bias=False)
        self.out.weight = self.mid.weight  # tied
        self.shared = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.frozen(torch.tanh(self.inp(x)))))))
        return self.out(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("mode", ["forward", "checkpoint"])
def test_tied_shared_frozen_and_unused_weights_match_finite_differences(mode: str) -> None:
    """higher's tied-weights check, in the two modes tests/test_unrolled_real.py leaves out."""
    k, data = 3, _batches(4)

    def build() -> tuple[nn.Module, nn.Module, S.Optimizer]:
        m = _Tied().double()
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.05, include=lambda n: not n.startswith("unused"))
        return m, hp, S.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True)

    def outer(lam: torch.Tensor) -> float:
        m, hp, opt = build()
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())
        for b in data[:k]:
            opt.zero_grad()
            (_ce(m, hp, b) + hp.penalty(m)).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(m, hp, data[k]))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, mode, k, train_loss=lambda m, h, b: _ce(m, h, b) + h.penalty(m))
    for b in data[:k]:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=data[k])
    lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()
    _assert_fd(_flat(grads), _central(outer, lam0), rtol=1e-5)
    assert model.out.weight is model.mid.weight and isinstance(model.out.weight, nn.Parameter)


# ----------------------------------------------------------------------------- 6. resume mid-window


@pytest.mark.parametrize("checkpoint", [False, True])
def test_resume_mid_window_under_lambda_lr_is_bit_identical(checkpoint: bool) -> None:
    """A relative learning rate per param group under LambdaLR, Adam with AMSGrad, a hyperstep
    inside the window, then a checkpoint mid-window loaded into fresh objects: the resumed run's
    weights, hypergradients and outer losses are the uninterrupted run's, bit for bit."""

    def build() -> tuple[nn.Module, S.Optimizer, Any, nn.Module, hg.Unrolled]:
        m = _mlp()
        opt = S.Adam(
            [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.03}], lr=0.05, amsgrad=True
        )
        sched = S.lr_scheduler.LambdaLR(opt, lambda i: 1 / (1 + i))
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(opt, relative=True),
                "wd": hg.hparams.WeightDecay(m, per="layer", init=0.05),
            }
        )
        hopt = _unrolled(
            m,
            hp,
            opt,
            "checkpoint" if checkpoint else "reverse",
            4,
            train_loss=lambda m, h, b: _ce(m, h, b) + h["wd"].penalty(m),
            outer_optimizer=S.Adam(hp.parameters(), lr=0.01),
        )
        return m, opt, sched, hp, hopt

    data, vb = _batches(10), _batches(1, seed=7)[0]

    def tail(hopt: hg.Unrolled, sched: Any, hp: nn.Module) -> list[torch.Tensor]:
        out = []
        for i, b in enumerate(data[5:]):
            hopt.step(b)
            sched.step()
            if i % 2 == 1:
                out.append(torch.tensor(hopt.hyper_step(val_batch=vb).outer_loss))
                out.append(_flat(p.grad for p in hp.parameters()).clone())
        return out

    model, _, sched, hp, hopt = build()
    for i, b in enumerate(data[:5]):
        hopt.step(b)
        sched.step()
        if i == 2:
            hopt.hyper_step(val_batch=vb)
    buf = io.BytesIO()
    torch.save({"hopt": hopt.state_dict(), "sched": sched.state_dict()}, buf)
    straight = tail(hopt, sched, hp)

    model2, _, sched2, hp2, hopt2 = build()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    hopt2.load_state_dict(saved["hopt"])
    sched2.load_state_dict(saved["sched"])
    resumed = tail(hopt2, sched2, hp2)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def _penalised(m: nn.Module, h: nn.Module, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


@pytest.mark.parametrize("cls", [S.Adam, S.RMSprop, S.Adagrad], ids=lambda c: c.__name__)
def test_a_pickled_run_goes_on_as_the_original(cls: type[S.Optimizer]) -> None:
    """``pickle`` mid-window (the replay's update functions included): the copy's next steps and
    hypergradient are the original's, bit for bit."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = _unrolled(model, hp, cls(model.parameters(), lr=0.01), "reverse", 3, train_loss=_penalised)
    data = _batches(5)
    for b in data[:2]:
        hopt.step(b)
    copy_ = pickle.loads(pickle.dumps(hopt))
    out = []
    for h in (hopt, copy_):
        for b in data[2:4]:
            h.step(b)
        out.append(_flat(h.hypergradient(val_batch=data[4])[0]))
    assert out[0].abs().max() > 0 and torch.equal(out[0], out[1])


# ----------------------------------------------------------------------------- 7. hg.optim


@pytest.mark.parametrize(
    "hd,base",
    [
        (
            lambda ps: hg.optim.SGDHD(ps, lr=0.1, momentum=0.8, hypergrad_lr=1e-2),
            lambda ps: S.SGD(ps, lr=0.1, momentum=0.8),
        ),
        (lambda ps: hg.optim.AdamHD(ps, lr=0.02, hypergrad_lr=1e-4), lambda ps: S.Adam(ps, lr=0.02)),
    ],
    ids=["sgdhd_momentum", "adamhd"],
)
def test_hypergradient_descent_equals_a_one_step_unrolled_learning_rate(
    hd: Callable[[Any], S.Optimizer], base: Callable[[Any], S.Optimizer]
) -> None:
    """Baydin et al.'s h_t = <grad F(w_t), d_t> is minus the derivative of the next batch's loss
    through one step in the step's learning rate: ``Unrolled(steps=1)`` with a ``LearningRate``
    per group and the next batch as validation batch gives it as dL/d log(lr) = -lr * h_t, which
    must be the lr change SGDHD / AdamHD make at the next step, divided by their beta."""
    data = _batches(2)
    model, ref = _mlp(), _mlp()
    opt = base(_groups(model))
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, "reverse", 1)
    hd_opt = hd(_groups(ref))
    hopt.step(data[0])
    hd_opt.zero_grad()
    _ce(ref, None, data[0]).backward()
    hd_opt.step()  # h_1 = 0: the base optimiser's step
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):  # (exp(log(lr)) != lr)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    grads, _ = hopt.hypergradient(val_batch=data[1])
    lrs = [g["lr"] for g in hd_opt.param_groups]
    hd_opt.zero_grad()
    _ce(ref, None, data[1]).backward()
    hd_opt.step()  # moves each group's rate by beta * h_2 before its step
    beta = hd_opt.param_groups[0]["hypergrad_lr"]
    h = torch.tensor(
        [(g["lr"] - lr) / beta for g, lr in zip(hd_opt.param_groups, lrs, strict=True)], dtype=DT
    )
    assert h.abs().min() > 1e-4
    torch.testing.assert_close(-grads[0] / hp.value, h, rtol=1e-8, atol=0)


# ----------------------------------------------------------------------------- 8. refusals, float32


@pytest.mark.parametrize(
    "make",
    [S.SparseAdam, hg.optim.SGDHD, hg.optim.AdamHD],
    ids=lambda c: c.__name__,
)
def test_optimizers_without_a_replay_are_refused_by_name(make: type[S.Optimizer]) -> None:
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    kw = {"lr": 0.1} if make is hg.optim.SGDHD else {}
    names = "ASGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, Muon, NAdam, RAdam, RMSprop, Rprop, SGD"
    with pytest.raises(TypeError, match=rf"{names}; got {make.__name__} "):
        _unrolled(model, hp, make(model.parameters(), **kw), "reverse", 2)


@pytest.mark.parametrize("mode", MODES)
def test_float32_follows_float64(mode: str) -> None:
    """The same run in float32 and float64 (Adam, a tuned learning rate and decays): the float32
    hypergradient is the float64 one to float32 accuracy."""

    def run(dtype: torch.dtype) -> torch.Tensor:
        model = _mlp(dtype)
        opt = S.Adam(_groups(model), lr=0.05)
        hp = _LrAndDecay(model, opt).to(dtype)
        hopt = _unrolled(model, hp, opt, mode, 4, train_loss=_decayed)
        data = _batches(5, dtype=dtype)
        for b in data[:4]:
            hopt.step(b)
        return _flat(hopt.hypergradient(val_batch=data[4])[0]).double()

    g32, g64 = run(torch.float32), run(DT)
    assert g64.abs().max() > 1e-3
    torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-5 * float(g64.abs().max()))
