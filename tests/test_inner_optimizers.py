"""``hg.Unrolled`` through Adamax, NAdam, RAdam, Adadelta, ASGD and Rprop (``hypergrad/_inner.py``).

For each optimiser and its options (``maximize``, coupled and decoupled weight decay, NAdam's
``momentum_decay``, RAdam's rectified and unrectified steps, ASGD's ``lambd`` / ``alpha`` /
``t0``, Rprop's ``etas`` and clamped ``step_sizes``, param groups of their own, ``foreach`` where
its kernel rounds as the single-tensor one):

1. the replayed weights are the real ``torch.optim`` weights bit for bit (float64 and float32,
   real and complex weights; on complex ones Adam's, RMSprop's and Adagrad's too, whose coupled
   weight decay is complex arithmetic);
2. the float64 hypergradient (weight decays in the loss, and the optimiser's own settings tuned:
   lr, eps, rho, lambd, momentum_decay, weight_decay) equals central differences of real
   ``torch.optim`` training, in reverse, forward and checkpointed mode;
3. a run saved and resumed mid-way continues bit for bit;
4. what the replay cannot reproduce (NAdam's, RAdam's and ASGD's foreach kernels) is refused.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64
S = torch.optim
Batch = tuple[torch.Tensor, torch.Tensor]
MODES = ["reverse", "forward", "checkpoint"]
NEW = [S.Adamax, S.NAdam, S.RAdam, S.Adadelta, S.ASGD, S.Rprop]


@pytest.fixture
def default_float64() -> Any:
    """Float64 default dtype, so that the optimisers' 0-dim state (ASGD's eta, NAdam's mu_product)
    is float64 too: in float32 it quantises real training's dependence on lr (ASGD stores
    eta = lr / ... as a float32 tensor), which central differences would see as noise."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(before)


def _batches(n: int, seed: int = 0, dtype: torch.dtype = DT) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 5, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)
    ]


def _mlp(dtype: torch.dtype = DT) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _groups(m: nn.Sequential, first: dict[str, Any]) -> list[dict[str, Any]]:
    """Two param groups, the first with settings of its own."""
    return [{"params": m[0].parameters(), **first}, {"params": m[2].parameters()}]


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


class _Tuned(nn.Module):
    """Weight decays in the loss (one per layer), and settings of the inner optimiser."""

    def __init__(self, model: nn.Module, opt: S.Optimizer, settings: dict[str, str]) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        self.settings = nn.ModuleList(
            [hg.hparams.OptimizerSetting(opt, name, constraint) for name, constraint in settings.items()]
        )


def _train(sign: float) -> Callable[[nn.Module, _Tuned, Batch], torch.Tensor]:
    """The training loss, negated for an optimiser that maximises (so it still learns)."""

    def loss(m: nn.Module, h: _Tuned, b: Batch) -> torch.Tensor:
        return sign * (_ce(m, h, b) + h.wd.penalty(m))

    return loss


def _unrolled(
    model: nn.Module, hp: nn.Module, opt: S.Optimizer, mode: str, steps: int, **kw: Any
) -> hg.Unrolled:
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


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _assert_fd(got: torch.Tensor, fd: torch.Tensor, rtol: float = 1e-6) -> None:
    assert fd.abs().max() > 1e-4  # the check has something to check
    torch.testing.assert_close(got, fd, rtol=rtol, atol=rtol * float(fd.abs().max()))


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested state (state_dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ----------------------------------------------------------------------------- 1. bit-exact replay

#: name: (class, options of the first param group, options of the optimiser, steps)
EXACT: dict[str, tuple[type[S.Optimizer], dict[str, Any], dict[str, Any], int]] = {
    "adamax": (S.Adamax, {"betas": (0.5, 0.8)}, dict(lr=0.05), 6),
    "adamax_wd_maximize": (
        S.Adamax,
        {"weight_decay": 0.3},
        dict(lr=0.05, weight_decay=0.1, maximize=True),
        6,
    ),
    "nadam": (S.NAdam, {"momentum_decay": 0.1}, dict(lr=0.05), 6),
    "nadam_wd_maximize": (S.NAdam, {"weight_decay": 0.3}, dict(lr=0.05, weight_decay=0.1, maximize=True), 6),
    "nadam_decoupled": (
        S.NAdam,
        {"decoupled_weight_decay": False},
        dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=True, momentum_decay=0.01),
        6,
    ),
    # 7 steps: RAdam's variance is rectified from step 6 on (rho_t > 5), momentum SGD before
    "radam": (S.RAdam, {"betas": (0.8, 0.9)}, dict(lr=0.05), 7),
    "radam_wd_maximize": (S.RAdam, {"weight_decay": 0.3}, dict(lr=0.05, weight_decay=0.1, maximize=True), 7),
    "radam_decoupled": (S.RAdam, {}, dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=True), 7),
    "adadelta": (S.Adadelta, {"rho": 0.5, "eps": 1e-3}, dict(lr=1.0), 6),
    "adadelta_wd_maximize": (S.Adadelta, {}, dict(lr=0.5, weight_decay=0.1, maximize=True), 6),
    "asgd": (S.ASGD, {"lambd": 0.1, "alpha": 0.5}, dict(lr=0.05), 6),
    "asgd_t0_wd_maximize": (S.ASGD, {"t0": 0.0}, dict(lr=0.05, t0=2, weight_decay=0.1, maximize=True), 6),
    "rprop": (S.Rprop, {"etas": (0.3, 1.5)}, dict(lr=0.01), 6),
    "rprop_clamped_maximize": (S.Rprop, {}, dict(lr=0.01, step_sizes=(5e-3, 0.02), maximize=True), 6),
}
#: whose foreach kernels round as their single-tensor ones (the others are refused, see below)
FOREACH_EXACT = (S.Adamax, S.Adadelta, S.Rprop)


def _exact_cases() -> list[Any]:
    out = []
    for name, (cls, _, _, _) in EXACT.items():
        for dtype in (DT, torch.float32):
            out.append(pytest.param(name, dtype, False, id=f"{name}-{dtype}"))
            if cls in FOREACH_EXACT:
                out.append(pytest.param(name, dtype, True, id=f"{name}-{dtype}-foreach"))
    return out


@pytest.mark.parametrize(("name", "dtype", "foreach"), _exact_cases())
def test_replay_is_the_real_step_bit_for_bit(name: str, dtype: torch.dtype, foreach: bool) -> None:
    cls, first, kw, steps = EXACT[name]
    model = _mlp(dtype)
    opt = cls(_groups(model, first), foreach=foreach, **kw)
    hp = _Tuned(model, opt, {}).to(dtype)
    sign = -1.0 if kw.get("maximize") else 1.0
    hopt = _unrolled(model, hp, opt, "reverse", steps, train_loss=_train(sign))
    for b in _batches(steps, dtype=dtype):
        hopt.step(b)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real), (got - real).abs().max()


# ----------------------------------------------------------------------------- 2. hypergradients

#: name: (class, options, settings tuned (name: constraint), steps)
TUNED: dict[str, tuple[type[S.Optimizer], dict[str, Any], dict[str, str], int]] = {
    "adamax": (S.Adamax, dict(lr=0.05, eps=1e-3), {"lr": "positive", "eps": "positive"}, 3),
    "adamax_wd_maximize": (
        S.Adamax,
        dict(lr=0.05, weight_decay=0.1, maximize=True),
        {"weight_decay": "positive"},
        3,
    ),
    "nadam": (
        S.NAdam,
        dict(lr=0.05, weight_decay=0.1, momentum_decay=0.5),
        {"lr": "positive", "momentum_decay": "positive"},
        3,
    ),
    "nadam_decoupled_maximize": (
        S.NAdam,
        dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=True, maximize=True),
        {"lr": "positive", "weight_decay": "positive"},
        3,
    ),
    "radam": (S.RAdam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3), {"lr": "positive", "eps": "positive"}, 7),
    "radam_decoupled_maximize": (
        S.RAdam,
        dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=True, maximize=True),
        {"weight_decay": "positive"},
        7,
    ),
    "adadelta": (S.Adadelta, dict(lr=0.5, eps=1e-3), {"lr": "positive", "rho": "unit", "eps": "positive"}, 3),
    "adadelta_wd_maximize": (
        S.Adadelta,
        dict(lr=1.0, eps=1e-2, weight_decay=0.1, maximize=True),
        {"weight_decay": "positive"},
        3,
    ),
    "asgd": (
        S.ASGD,
        dict(lr=0.1, lambd=0.1, t0=1, weight_decay=0.1),
        {"lr": "positive", "lambd": "positive"},
        3,
    ),
    "asgd_maximize": (
        S.ASGD,
        dict(lr=0.1, alpha=0.5, maximize=True),
        {"lr": "positive", "alpha": "positive"},
        3,
    ),
    "rprop": (S.Rprop, dict(lr=0.01), {"lr": "positive"}, 3),
    # the step sizes reach their clamp (0.015) at the second step: no derivative in lr past it
    "rprop_clamped_maximize": (
        S.Rprop,
        dict(lr=0.01, step_sizes=(1e-4, 0.015), maximize=True),
        {"lr": "positive"},
        3,
    ),
}


def _build_tuned(name: str) -> tuple[nn.Module, S.Optimizer, _Tuned]:
    cls, kw, settings, _ = TUNED[name]
    model = _mlp()
    opt = cls(model.parameters(), **kw)
    return model, opt, _Tuned(model, opt, settings)


def _real_training(name: str, raw: list[torch.Tensor]) -> float:
    """L_V after real torch.optim training with the hyperparameters at ``raw``."""
    cls, kw, _, steps = TUNED[name]
    model, opt, hp = _build_tuned(name)
    with torch.no_grad():
        for p, r in zip(hp.parameters(), raw, strict=True):
            p.copy_(r)
    train = _train(-1.0 if kw.get("maximize") else 1.0)
    data = _batches(steps + 1)
    for b in data[:steps]:
        for s in hp.settings:
            s.write()
        opt.zero_grad()
        train(model, hp, b).backward()
        opt.step()
    with torch.no_grad():
        return float(_ce(model, hp, data[steps]))


@functools.cache
def _central(name: str) -> torch.Tensor:
    _, _, hp = _build_tuned(name)
    raw = [p.detach().clone() for p in hp.parameters()]
    return _flat(central_difference(lambda: _real_training(name, raw), r, eps=1e-6) for r in raw)


@pytest.mark.usefixtures("default_float64")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TUNED))
def test_hypergradient_matches_central_differences_of_real_training(name: str, mode: str) -> None:
    cls, kw, _, steps = TUNED[name]
    model, opt, hp = _build_tuned(name)
    train = _train(-1.0 if kw.get("maximize") else 1.0)
    hopt = _unrolled(model, hp, opt, mode, steps, train_loss=train)
    data = _batches(steps + 1)
    for b in data[:steps]:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=data[steps])
    got = _flat(grads)
    fd = _central(name)
    _assert_fd(got, fd)
    if cls is S.Rprop:  # sign(gradient) steps: no derivative in anything but the step sizes
        assert torch.equal(got[:2], torch.zeros(2, dtype=DT))


# ----------------------------------------------------------------------------- complex weights


class _Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # (64 entries: CPU kernels take their vectorised paths, whose rounding is what matters)
        self.w = nn.Parameter(torch.randn(64, dtype=torch.complex128, generator=g))
        self.v = nn.Parameter(torch.randn(64, dtype=torch.complex128, generator=g))


def _complex_train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    target = 0.0625j * torch.arange(64, dtype=DT)
    return (
        h.raw.exp().sum() * (m.w.abs() ** 2).sum()
        + ((m.w - target).abs() ** 4).sum()
        + ((m.v * m.w - 1).abs() ** 2).sum()
    )


def _complex_val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m.w - 0.5).abs() ** 2).sum() + (m.v.real**2).sum()


COMPLEX: dict[type[S.Optimizer], dict[str, Any]] = {
    S.Adamax: dict(lr=0.1, weight_decay=0.1),
    S.NAdam: dict(lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
    S.RAdam: dict(lr=0.02, betas=(0.8, 0.9), weight_decay=0.1),
    S.Adadelta: dict(lr=1.0, eps=1e-3, weight_decay=0.1),
    S.ASGD: dict(lr=0.02, lambd=0.1, t0=1),
    S.Rprop: dict(lr=0.01),
    # Adam, RMSprop and Adagrad too: like Adamax and Adadelta they add the L2 term to the complex
    # gradient before taking the real views (complex arithmetic: p * wd rounded, then the sum, not
    # the fused multiply-add of a real add(alpha=)); their replays were 1e-17 off
    S.Adam: dict(lr=0.05, weight_decay=0.1),
    S.RMSprop: dict(lr=0.01, weight_decay=0.1),
    S.Adagrad: dict(lr=0.1, weight_decay=0.1),
}


@pytest.mark.usefixtures("default_float64")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", list(COMPLEX), ids=lambda c: c.__name__)
def test_complex_weights_replay_exactly_and_match_finite_differences(
    cls: type[S.Optimizer], mode: str
) -> None:
    """torch.optim runs these on the real views of complex weights (per real and imaginary part);
    the replay too, keeping 0-dim state (NAdam's mu_product, ASGD's eta and mu) real."""
    k = 7 if cls is S.RAdam else 3

    def build() -> tuple[nn.Module, nn.Module, S.Optimizer]:
        m = _Complex()
        return m, hg.hparams.Hparam(torch.tensor([0.1], dtype=DT)), cls(m.parameters(), **COMPLEX[cls])

    def outer() -> float:
        m, h, opt = build()
        with torch.no_grad():
            h.raw.copy_(hp.raw)
        for _ in range(k):
            opt.zero_grad()
            _complex_train(m, h, ()).backward()
            opt.step()
        with torch.no_grad():
            return float(_complex_val(m, h, ()))

    model, hp, opt = build()
    hopt = _unrolled(model, hp, opt, mode, k, train_loss=_complex_train, val_loss=_complex_val)
    for _ in range(k):
        hopt.step(())
    for replayed, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert replayed.is_complex() and torch.equal(replayed, real.detach())
    grads, _ = hopt.hypergradient(val_batch=())
    fd = central_difference(outer, hp.raw, eps=1e-6)
    if cls is S.Rprop:  # the decay reaches the steps only through the gradients' signs
        assert float(grads[0].abs().max()) == 0.0 and float(fd.abs().max()) < 1e-8
    else:
        _assert_fd(_flat(grads), fd)


# ----------------------------------------------------------------------------- 3. resuming


RESUME: dict[type[S.Optimizer], dict[str, Any]] = {
    S.Adamax: dict(lr=0.05, weight_decay=0.01),
    S.NAdam: dict(lr=0.05, weight_decay=0.01, decoupled_weight_decay=True),
    S.RAdam: dict(lr=0.05),
    S.Adadelta: dict(lr=1.0),
    S.ASGD: dict(lr=0.05, t0=3, lambd=0.01),
    S.Rprop: dict(lr=0.01),
}


def _snapshot(hopt: hg.Unrolled) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": hopt.model.state_dict(),
            "hparams": hopt.hparams.state_dict(),
            "inner": hopt.inner_optimizer.state_dict(),
            "outer": hopt.outer_optimizer.state_dict(),
        }
    )


@pytest.mark.usefixtures("default_float64")
@pytest.mark.parametrize("cls", list(RESUME), ids=lambda c: c.__name__)
def test_resume_continues_bit_for_bit(cls: type[S.Optimizer]) -> None:
    """12 steps with a hyperstep every 3 (learning rate and decays moving), straight vs 7 steps,
    state_dict through torch.save, loaded into a fresh run (other initial weights) and continued.
    (Float64 default dtype: torch.optim's load_state_dict casts 0-dim state but ``step`` to the
    weights' dtype, so NAdam's float32 mu_product comes back float64, and plain torch.optim
    training then no longer resumes bit for bit either.)"""
    tuned = {} if cls is S.Rprop else {"lr": "positive"}  # Rprop's lr sets only its first step size
    batches, vb = _batches(12), _batches(1, seed=9)[0]

    def make(seed: int) -> hg.Unrolled:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        opt = cls(model.parameters(), **RESUME[cls])
        hp = _Tuned(model, opt, tuned)
        return _unrolled(
            model,
            hp,
            opt,
            "reverse",
            3,
            train_loss=_train(1.0),
            outer_optimizer=S.Adam(hp.parameters(), lr=0.05),
        )

    def run(hopt: hg.Unrolled, start: int, stop: int) -> None:
        for i in range(start, stop):
            hopt.step(batches[i])
            if (i + 1) % 3 == 0:
                hopt.hyper_step(val_batch=vb)

    straight = make(0)
    run(straight, 0, 12)
    first = make(0)
    run(first, 0, 7)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = make(123)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    run(resumed, 7, 12)
    _assert_same(_snapshot(straight), _snapshot(resumed), "state")
    assert (resumed.inner_steps, resumed.hyper_steps) == (12, 4)
    if tuned:
        lr = _snapshot(straight)["hparams"]["settings.0.raw"]
        assert not torch.equal(lr, make(0).hparams.settings[0].raw.detach())  # the hypersteps moved it


# ----------------------------------------------------------------------------- 4. refusals


@pytest.mark.parametrize("cls", [S.NAdam, S.RAdam, S.ASGD], ids=lambda c: c.__name__)
def test_foreach_kernels_that_round_otherwise_are_refused(cls: type[S.Optimizer]) -> None:
    model = _mlp()
    opt = cls(_groups(model, {"foreach": True}), foreach=False)
    hp = _Tuned(model, opt, {})
    with pytest.raises(
        ValueError, match=rf"{cls.__name__}\(foreach=True\) \(param group 0\): its multi-tensor"
    ):
        _unrolled(model, hp, opt, "reverse", 2, train_loss=_train(1.0))
    _unrolled(model, hp, cls(model.parameters(), foreach=False), "reverse", 2, train_loss=_train(1.0))


@pytest.mark.parametrize("cls", NEW, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_flags_the_replay_does_not_follow_are_refused(cls: type[S.Optimizer], flag: str) -> None:
    model = _mlp()
    opt = cls(model.parameters(), **{flag: True})
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({flag}=True\)"):
        _unrolled(model, _Tuned(model, opt, {}), opt, "reverse", 2, train_loss=_train(1.0))


def test_optimizers_without_a_replay_are_refused_with_the_supported_list() -> None:
    model = _mlp()
    hp = _Tuned(model, S.SGD(model.parameters(), lr=0.1), {})
    supported = (
        "ASGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, Muon, NAdam, RAdam, RMSprop, Rprop, SGD"
    )
    with pytest.raises(TypeError, match=rf"supports torch.optim {supported}; got SparseAdam "):
        _unrolled(model, hp, S.SparseAdam(model.parameters()), "reverse", 2, train_loss=_train(1.0))
