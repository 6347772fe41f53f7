"""Round 11: ``hg.Unrolled`` and its differentiable ``torch.optim`` replays, as meta-learning and
hypergradient-descent scripts use them (higher's and torchopt's test idioms, in our API).

1. A ``WeightDecay`` penalty in a training loss that reaches a weight more than once (gradient
   accumulation over two micro-batches, a layer applied twice) is replayed with its gradient
   ``c * d * w`` added after autograd has summed the other terms, in another order than the
   real backward pass: the replay is 3e-17 off in float64, and Adam in float32 on the bias of
   a layer before a BatchNorm (a rounding-noise gradient) amplifies that to 1.6e-3 away from
   the real weights after 16 steps, with a false ``ReplayWarning`` at the first hyperstep.
   Fixed: ``WeightDecay._valued_penalty`` passes the gradient's value through autograd and the
   replay adds only its graph (the hypergradient was right before too, checked against central
   differences).
2. A tuned NAdam ``momentum_decay`` (float64) promoted NAdam's 0-dim ``mu_product`` state
   (float32, as torch.optim keeps it) to float64 in the replay: 1.1e-10 off the real float64
   weights after 3 steps. ``_inner._valued`` now keeps the real step's dtype.
3. Proofs (float64, central differences of real ``torch.optim`` training): settings tuned
   together (lr, momentum, dampening, weight decay, eps, alpha, lr_decay, momentum_decay) of
   SGD-Nesterov, RMSprop (centred), Adagrad, Adam (AMSGrad, maximize), AdamW, NAdam and RAdam
   (decoupled decay, the rectified branch) with two param groups of their own lrs, at K = 1, 3,
   7, in reverse, forward and checkpointed modes; a learned lr multiplier under LambdaLR,
   CosineAnnealingLR and OneCycleLR (cycling momentum); forward = reverse = finite differences
   with BatchNorm in train mode, dropout, clipping and two micro-batches per step; a resume
   after 2 of K = 5 steps; a window K raised between hypersteps.
4. ``hopt.steps`` set to 0, -1, 2.5, True or "3" between steps was accepted and failed later
   inside a step or hyperstep (IndexError, TypeError; True silently K = 1); ``steps`` is now a
   property validated as the constructor's argument.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
O = torch.optim
S = torch.optim.lr_scheduler
MODES = ["reverse", "forward", "checkpoint"]


def _unrolled(
    model: nn.Module, hp: nn.Module, opt: O.Optimizer, train: Any, val: Any, steps: int, mode: str
) -> hg.Unrolled:
    return hg.Unrolled(
        model,
        hp,
        train,
        val,
        inner_optimizer=opt,
        outer_optimizer=O.SGD(hp.parameters(), lr=0.0),
        steps=steps,
        mode="forward" if mode == "forward" else "reverse",
        checkpoint=mode == "checkpoint",
    )


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _central(outer: Callable[[torch.Tensor], float], lam0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    fd = torch.zeros_like(lam0)
    for i in range(lam0.numel()):
        e = torch.zeros_like(lam0)
        e[i] = eps
        fd[i] = (outer(lam0 + e) - outer(lam0 - e)) / (2 * eps)
    return fd


def _assert_fd(got: torch.Tensor, fd: torch.Tensor, rtol: float = 1e-5) -> None:
    assert fd.abs().max() > 1e-5  # something to check
    torch.testing.assert_close(got, fd, rtol=rtol, atol=rtol * float(fd.abs().max()))


def _set(hp: nn.Module, lam: torch.Tensor | None) -> None:
    if lam is not None:
        with torch.no_grad():
            nn.utils.vector_to_parameters(lam, hp.parameters())


# --------------------------------------------------------------------------------------------
# 1. WeightDecay penalty + a weight reached twice: bit-exact replay


def _bn_mlp(dtype: torch.dtype, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


MicroBatch = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _micro_batches(n: int, dtype: torch.dtype, size: int = 16) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(0)

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 5, generator=g).to(dtype), torch.randint(0, 3, (size,), generator=g)

    return [(one(), one()) for _ in range(n)]


def _accumulated(m: nn.Module, h: Any, b: MicroBatch) -> torch.Tensor:
    """Gradient accumulation written as one loss: the mean over two micro-batches, plus the decay."""
    (x1, y1), (x2, y2) = b
    return 0.5 * (F.cross_entropy(m(x1), y1) + F.cross_entropy(m(x2), y2)) + h.penalty(m)


def _first_micro(m: nn.Module, h: Any, b: MicroBatch) -> torch.Tensor:
    return F.cross_entropy(m(b[0][0]), b[0][1])


def test_decay_with_two_micro_batches_replays_float32_adam_bitwise_without_a_false_warning() -> None:
    # before: the bias before the BatchNorm replayed 1.6e-3 away, ReplayWarning at the first hyperstep
    data = _micro_batches(17, torch.float32)
    model = _bn_mlp(torch.float32)
    opt = O.Adam(model.parameters(), lr=0.01)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-6)
    hopt = _unrolled(model, hp, opt, _accumulated, _first_micro, 16, "reverse")
    for b in data[:16]:
        hopt.step(b)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real.detach()), float((got - real).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ReplayWarning
        info = hopt.hyper_step(val_batch=data[16])
    assert math.isfinite(info.hypergrad_norm) and info.hypergrad_norm > 0


class _Twice(nn.Module):
    """One layer applied twice (a weight reached by two paths, as in a recurrent cell)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.cell = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.cell(h))
        return self.out(torch.tanh(self.cell(h)))


def _ce_decay(m: nn.Module, h: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _ce(m: nn.Module, h: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 5, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
def test_decay_on_a_layer_applied_twice_replays_float64_bitwise_and_matches_fd(mode: str) -> None:
    # before: 2.8e-17 off the real float64 weights (the replay's hypergradient was still right)
    data = _batches(5)

    def train(lam: torch.Tensor | None = None) -> tuple[hg.Unrolled, nn.Module, nn.Module]:
        model = _Twice().to(DT)
        opt = O.SGD(model.parameters(), lr=0.3, momentum=0.9)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        _set(hp, lam)
        hopt = _unrolled(model, hp, opt, _ce_decay, _ce, 4, mode)
        for b in data[:4]:
            hopt.step(b)
        return hopt, model, hp

    hopt, model, hp = train()
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real.detach()), float((got - real).abs().max())
    grads, _ = hopt.hypergradient(val_batch=data[4])
    lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()

    def outer(lam: torch.Tensor) -> float:
        _, m, _ = train(lam)
        with torch.no_grad():
            return float(_ce(m, None, data[4]))

    _assert_fd(_flat(grads), _central(outer, lam0))


def test_decay_scaled_by_a_hyperparameter_keeps_its_derivative_once() -> None:
    """``s * penalty`` with a learned scale ``s``: the gradient's derivative through ``s`` comes
    from autograd, the one through ``d`` and ``w`` from the replay; neither twice."""

    class _Hp(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.wd = hg.hparams.WeightDecay(model, per="global", init=0.05)
            self.scale = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def loss(m: nn.Module, h: Any, b: MicroBatch) -> torch.Tensor:
        (x1, y1), (x2, y2) = b
        return 0.5 * (F.cross_entropy(m(x1), y1) + F.cross_entropy(m(x2), y2)) + h.scale * h.wd.penalty(m)

    data = _micro_batches(4, DT, size=8)

    def train(lam: torch.Tensor | None = None) -> tuple[hg.Unrolled, nn.Module, nn.Module]:
        model = _bn_mlp(DT, width=6)
        opt = O.SGD(model.parameters(), lr=0.2, momentum=0.5)
        hp = _Hp(model)
        _set(hp, lam)
        hopt = _unrolled(model, hp, opt, loss, _first_micro, 3, "reverse")
        for b in data[:3]:
            hopt.step(b)
        return hopt, model, hp

    hopt, model, hp = train()
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real.detach())
    grads, _ = hopt.hypergradient(val_batch=data[3])
    lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()

    def outer(lam: torch.Tensor) -> float:
        _, m, _ = train(lam)
        with torch.no_grad():
            return float(_first_micro(m, None, data[3]))

    _assert_fd(_flat(grads), _central(outer, lam0))


# --------------------------------------------------------------------------------------------
# 2. tuned optimiser settings, param groups of their own lrs, K = 1, 3, 7 (MAML-style inner loops)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _groups(m: nn.Sequential, lr: float) -> list[dict[str, Any]]:
    return [{"params": m[0].parameters(), "lr": lr}, {"params": m[2].parameters()}]


Settings = list[tuple[str, str]]
#: name: (inner optimiser, tuned settings and their constraints, K, maximize)
INNER: dict[str, tuple[Callable[[nn.Sequential], O.Optimizer], Settings, int, bool]] = {
    "sgd_nesterov_K1": (
        lambda m: O.SGD(_groups(m, 0.2), lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        [("lr", "positive"), ("momentum", "unit"), ("weight_decay", "positive")],
        1,
        False,
    ),
    "sgd_nesterov_K7": (
        lambda m: O.SGD(_groups(m, 0.2), lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        [("lr", "positive"), ("momentum", "unit"), ("weight_decay", "positive")],
        7,
        False,
    ),
    "sgd_dampening_max": (
        lambda m: O.SGD(_groups(m, 0.2), lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
        [("lr", "positive"), ("dampening", "unit")],
        3,
        True,
    ),
    "rmsprop_centered": (
        lambda m: O.RMSprop(_groups(m, 0.02), lr=0.01, centered=True, momentum=0.5, weight_decay=0.01),
        [("lr", "positive"), ("alpha", "unit"), ("momentum", "unit"), ("eps", "positive")],
        3,
        False,
    ),
    "adagrad": (
        lambda m: O.Adagrad(_groups(m, 0.2), lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
        [("lr", "positive"), ("lr_decay", "positive"), ("eps", "positive")],
        3,
        False,
    ),
    "adam_amsgrad_max": (
        lambda m: O.Adam(_groups(m, 0.02), lr=0.01, amsgrad=True, weight_decay=0.01, maximize=True),
        [("lr", "positive"), ("weight_decay", "positive"), ("eps", "positive")],
        3,
        True,
    ),
    "adamw_K7": (
        lambda m: O.AdamW(_groups(m, 0.02), lr=0.01, weight_decay=0.1),
        [("lr", "positive"), ("weight_decay", "positive")],
        7,
        False,
    ),
    "nadam_decoupled": (
        lambda m: O.NAdam(_groups(m, 0.02), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        [("lr", "positive"), ("weight_decay", "positive"), ("momentum_decay", "positive")],
        3,
        False,
    ),
    "radam_rectified_K7": (  # rho_t > 5 from step 6 on (beta2 = 0.9): both branches
        lambda m: O.RAdam(_groups(m, 0.02), lr=0.01, betas=(0.9, 0.9), weight_decay=0.1),
        [("lr", "positive"), ("weight_decay", "positive")],
        7,
        False,
    ),
}


def _inner_run(
    name: str, mode: str, lam: torch.Tensor | None = None
) -> tuple[hg.Unrolled, nn.Module, nn.ModuleList]:
    make, settings, k, maximize = INNER[name]
    model = _mlp()
    opt = make(model)
    hp = nn.ModuleList([hg.hparams.OptimizerSetting(opt, s, c) for s, c in settings])
    _set(hp, lam)
    sign = -1.0 if maximize else 1.0
    hopt = _unrolled(model, hp, opt, lambda m, h, b: sign * _ce(m, h, b), _ce, k, mode)
    for b in _batches(k + 1)[:k]:
        hopt.step(b)
    return hopt, model, hp


def _plain_training(name: str, lam: torch.Tensor) -> float:
    """The same inner loop in plain torch.optim (no hypergrad in the loop)."""
    make, settings, k, maximize = INNER[name]
    model = _mlp()
    opt = make(model)
    hp = nn.ModuleList([hg.hparams.OptimizerSetting(opt, s, c) for s, c in settings])
    _set(hp, lam)
    for s in hp:
        s.write()
    data = _batches(k + 1)
    for b in data[:k]:
        opt.zero_grad()
        ((-1.0 if maximize else 1.0) * _ce(model, None, b)).backward()
        opt.step()
    with torch.no_grad():
        return float(_ce(model, None, data[k]))


@pytest.fixture
def float64_default() -> Any:
    """Float64 default dtype, so that 0-dim optimiser state (NAdam's ``mu_product``) is float64:
    in float32 it quantises real training's dependence on ``momentum_decay`` (finite-difference
    noise)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def inner_fd() -> dict[str, torch.Tensor]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # (as float64_default)
    try:
        out = {}
        for name in INNER:
            _, _, hp = _inner_run(name, "reverse")
            lam0 = nn.utils.parameters_to_vector(hp.parameters()).detach().clone()
            out[name] = _central(lambda lam, name=name: _plain_training(name, lam), lam0)
        return out
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(INNER))
def test_tuned_settings_of_param_groups_match_plain_torch_optim_fd(
    name: str, mode: str, inner_fd: dict[str, torch.Tensor], float64_default: Any
) -> None:
    hopt, model, hp = _inner_run(name, mode)
    k = INNER[name][2]
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real.detach())
    grads, _ = hopt.hypergradient(val_batch=_batches(k + 1)[k])
    _assert_fd(_flat(grads), inner_fd[name])


def test_tuned_nadam_momentum_decay_replays_float32_mu_product_bitwise() -> None:
    # before: the replay kept NAdam's float32 mu_product in the float64 of the tuned
    # momentum_decay, and ended 1.1e-10 from the real float64 weights after 3 steps
    assert torch.get_default_dtype() == torch.float32  # (mu_product float32, weights float64)
    for decoupled in (False, True):
        model = _mlp()
        opt = O.NAdam(_groups(model, 0.02), lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
        hp = hg.hparams.OptimizerSetting(opt, "momentum_decay", "positive")
        hopt = _unrolled(model, hp, opt, _ce, _ce, 3, "reverse")
        for b in _batches(3):
            hopt.step(b)
        for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
            assert torch.equal(got, real.detach()), float((got - real).abs().max())
        assert opt.state[model[0].weight]["mu_product"].dtype == torch.float32
        (g,), _ = hopt.hypergradient(val_batch=_batches(4)[3])
        assert g.abs().max() > 0 and torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------
# 3. a learned lr multiplier under schedulers (hypergradient-descent-on-top idiom)

SCHEDULERS: dict[str, Callable[[O.Optimizer], Any]] = {
    "lambda": lambda o: S.LambdaLR(o, lambda k: 1.0 / (1 + k)),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=5),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=[0.3, 0.1], total_steps=10),  # cycles momentum too
}


def _scheduled(sched: str, mode: str, lam: torch.Tensor | None = None) -> tuple[hg.Unrolled, nn.Module]:
    model = _mlp()
    opt = O.SGD(_groups(model, 0.2), lr=0.1, momentum=0.9, nesterov=True)
    hp = hg.hparams.LearningRate(opt, relative=True)
    scheduler = SCHEDULERS[sched](opt)
    _set(hp, lam)
    hopt = _unrolled(model, hp, opt, _ce, _ce, 4, mode)
    for b in _batches(5)[:4]:
        hopt.step(b)
        scheduler.step()
    return hopt, model


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_multiplier_under_a_scheduler_is_the_derivative_of_scheduled_training(
    sched: str, mode: str
) -> None:
    hopt, model = _scheduled(sched, mode)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real.detach())  # the replay uses the scheduled lr of each step
    val = _batches(5)[4]
    grads, _ = hopt.hypergradient(val_batch=val)

    def outer(lam: torch.Tensor) -> float:
        _, m = _scheduled(sched, "reverse", lam)
        with torch.no_grad():
            return float(_ce(m, None, val))

    _assert_fd(_flat(grads), _central(outer, torch.zeros(2, dtype=DT)))


# --------------------------------------------------------------------------------------------
# 4. forward = reverse = finite differences: BatchNorm in train mode, dropout, clipping, 2 micro-batches


class _DecayAndLr(nn.Module):
    def __init__(self, model: nn.Module, opt: O.Optimizer) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        self.lr = hg.hparams.LearningRate(opt)

    def penalty(self, m: nn.Module) -> torch.Tensor:
        return self.wd.penalty(m)


def _bn_dropout() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(
        DT
    )


def _bn_run(
    opt_name: str, mode: str, clip: float | None, lam: torch.Tensor | None = None
) -> tuple[hg.Unrolled, nn.Module]:
    model = _bn_dropout()
    opt = (
        O.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if opt_name == "sgd"
        else O.Adam(model.parameters(), lr=0.01)
    )
    hp = _DecayAndLr(model, opt)
    _set(hp, lam)
    hopt = _unrolled(model, hp, opt, _accumulated, _first_micro, 4, mode)
    torch.manual_seed(5)  # dropout masks
    for b in _micro_batches(4, DT, size=6):
        hopt.step(b, max_grad_norm=clip)
    return hopt, model  # (left in train mode: val_loss uses batch statistics and dropout too)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_forward_reverse_and_fd_agree_with_batchnorm_dropout_clipping_and_accumulation(
    opt_name: str, clip: float | None
) -> None:
    val = _micro_batches(5, DT, size=10)[4]
    got = {}
    for mode in MODES:
        hopt, model = _bn_run(opt_name, mode, clip)
        for w, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
            # (bit for bit once WeightDecay's replayed gradient keeps autograd's order: see above)
            torch.testing.assert_close(w, real.detach(), rtol=1e-14, atol=1e-15)
        grads, _ = hopt.hypergradient(val_batch=val)
        got[mode] = _flat(grads)

    def outer(lam: torch.Tensor) -> float:
        _, m = _bn_run(opt_name, "reverse", clip, lam)
        with torch.no_grad():
            return float(_first_micro(m, None, val))

    hopt, _ = _bn_run(opt_name, "reverse", clip)
    fd = _central(outer, nn.utils.parameters_to_vector(hopt.hparams.parameters()).detach().clone())
    for mode in MODES:
        _assert_fd(got[mode], fd)
    torch.testing.assert_close(got["forward"], got["reverse"], rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------
# 5. resume mid-window; a window raised between hypersteps


def _lr_setup(steps: int) -> tuple[nn.Module, nn.Module, hg.Unrolled]:
    model = _mlp()
    opt = O.Adam(_groups(model, 0.02), lr=0.01, amsgrad=True)
    hp = nn.ModuleList(
        [hg.hparams.LearningRate(opt, relative=True), hg.hparams.OptimizerSetting(opt, "eps", "positive")]
    )
    return model, hp, _unrolled(model, hp, opt, _ce, _ce, steps, "reverse")


def test_resume_after_2_of_5_steps_in_new_objects_is_bitwise() -> None:
    data = _batches(6)
    model, hp, hopt = _lr_setup(5)
    for b in data[:2]:
        hopt.step(b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "hopt": hopt.state_dict()}, buf)
    for b in data[2:5]:
        hopt.step(b)
    hopt.hyper_step(val_batch=data[5])
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2, hp2, hopt2 = _lr_setup(5)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # (other weights: the load must bring the right ones)
    model2.load_state_dict(ck["model"])
    hopt2.load_state_dict(ck["hopt"])
    for b in data[2:5]:
        hopt2.step(b)
    hopt2.hyper_step(val_batch=data[5])
    for a, b in zip(
        [*model.parameters(), *hp.parameters()], [*model2.parameters(), *hp2.parameters()], strict=True
    ):
        assert torch.equal(a, b)
    for a, b in zip(hp.parameters(), hp2.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)


def _cycled(mode: str, steps: int) -> tuple[nn.Module, nn.ModuleList, Any, hg.Unrolled]:
    model = _mlp()
    opt = O.Adam(_groups(model, 0.02), lr=0.01, amsgrad=True)
    hp = nn.ModuleList(
        [
            hg.hparams.LearningRate(opt, relative=True),
            hg.hparams.OptimizerSetting(opt, "eps", "positive"),
            hg.hparams.WeightDecay(model, per="layer", init=0.01),
        ]
    )
    sched = S.OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=30)  # (cycles beta1 too)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return _ce(m, h, b) + h[2].penalty(m)

    hopt = hg.Unrolled(
        model,
        hp,
        train,
        _ce,
        inner_optimizer=opt,
        outer_optimizer=O.Adam(hp.parameters(), lr=0.05),
        steps=steps,
        mode="forward" if mode == "forward" else "reverse",
        checkpoint=mode == "checkpoint",
    )
    return model, hp, sched, hopt


@pytest.mark.parametrize(
    ("mode", "every", "cut", "k_at", "k"),
    [
        *[(m, *c) for m in ("reverse", "checkpoint") for c in [(2, 5, None, 5), (3, 4, 8, 2), (2, 9, 6, 7)]],
        ("forward", 3, 4, 8, 2),  # (forward mode: 6 passes per hyperstep; one case)
    ],
)
def test_resume_under_a_scheduler_with_hypersteps_and_a_changed_window_is_bitwise(
    mode: str, every: int, cut: int, k_at: int | None, k: int
) -> None:
    """Hypersteps every ``every`` steps (overlapping windows, re-run starts), a OneCycleLR, K
    changed to ``k`` before step ``k_at``; saved after ``cut`` steps, loaded into new objects
    (built with the K in force then): the two runs end bit for bit alike."""
    data = _batches(17)

    def go(objs: tuple[nn.Module, nn.ModuleList, Any, hg.Unrolled], lo: int, hi: int) -> None:
        _, _, sched, hopt = objs
        for i in range(lo, hi):
            if i == k_at:
                hopt.steps = k
            hopt.step(data[i])
            sched.step()
            if (i + 1) % every == 0:
                hopt.hyper_step(val_batch=data[16])

    a = _cycled(mode, 5)
    go(a, 0, cut)
    buf = io.BytesIO()
    torch.save({"model": a[0].state_dict(), "hopt": a[3].state_dict(), "sched": a[2].state_dict()}, buf)
    go(a, cut, 14)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    b = _cycled(mode, k if k_at is not None and k_at < cut else 5)
    b[0].load_state_dict(ck["model"])
    b[3].load_state_dict(ck["hopt"])
    b[2].load_state_dict(ck["sched"])
    go(b, cut, 14)
    for x, y in zip(
        [*a[0].parameters(), *a[1].parameters()], [*b[0].parameters(), *b[1].parameters()], strict=True
    ):
        assert torch.equal(x, y)


def test_window_raised_between_hypersteps_is_reported_and_exact_for_the_steps_it_holds() -> None:
    """``hopt.steps`` raised from 2 to 5 after 4 steps: the ring holds the steps since its last
    snapshot (3 after one more step); the hyperstep says so and is exact for those."""
    data = _batches(6)
    model = _mlp()
    opt = O.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, _ce, _ce, 2, "reverse")
    for b in data[:4]:
        hopt.step(b)
    hopt.steps = 5
    hopt.step(data[4])
    (g,), _ = hopt.hypergradient(val_batch=data[5])
    info = hopt.hyper_step(val_batch=data[5])
    window = info.unrolled_steps
    assert 2 <= window <= 5

    def outer(log_lr: float) -> float:  # the same 5 steps, the last `window` of them with lr e^log_lr
        m = _mlp()
        o = O.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for i, b in enumerate(data[:5]):
            if i == 5 - window:
                o.param_groups[0]["lr"] = math.exp(log_lr)
            o.zero_grad()
            _ce(m, None, b).backward()
            o.step()
        with torch.no_grad():
            return float(_ce(m, None, data[5]))

    x = math.log(0.1)
    fd = torch.tensor([(outer(x + 1e-6) - outer(x - 1e-6)) / 2e-6], dtype=DT)
    _assert_fd(g.reshape(1), fd)


# --------------------------------------------------------------------------------------------
# 6. bad input: clear errors


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_steps_set_between_steps_is_validated_like_the_constructor_argument(bad: Any) -> None:
    # before: accepted, then IndexError / TypeError from inside the next step or hyperstep (True: K = 1)
    model = _mlp()
    opt = O.SGD(model.parameters(), lr=0.1)
    hp = hg.hparams.LearningRate(opt)
    hopt = _unrolled(model, hp, opt, _ce, _ce, 2, "reverse")
    hopt.step(_batches(1)[0])
    with pytest.raises(ValueError, match="Invalid Unrolled steps"):
        hopt.steps = bad
    assert hopt.steps == 2
    hopt.step(_batches(1)[0])
    assert hopt.hyper_step(val_batch=_batches(1)[0]).unrolled_steps == 2


def test_closure_optimizer_and_foreign_parameters_are_refused_by_name() -> None:
    model = _mlp()
    wd = hg.hparams.WeightDecay(model, init=0.01)
    with pytest.raises(TypeError, match="LBFGS.*closure"):
        _unrolled(model, wd, O.LBFGS(model.parameters()), _ce, _ce, 2, "reverse")
    with pytest.raises(ValueError, match="not a parameter of model"):
        _unrolled(model, wd, O.SGD(_mlp().parameters(), lr=0.1), _ce, _ce, 2, "reverse")
    with pytest.raises(ValueError, match="holds hyperparameter"):
        _unrolled(model, wd, O.SGD([*model.parameters(), *wd.parameters()], lr=0.1), _ce, _ce, 2, "reverse")
    with pytest.raises(TypeError, match="init must be a real number"):
        hg.hparams.OptimizerSetting(
            O.SGD(model.parameters(), lr=0.1), "weight_decay", "positive", init=[0.1, 0.2]
        )


@pytest.mark.parametrize("name", ["lr", "weight_decay", "momentum"])
def test_a_real_constraint_on_a_setting_torch_requires_non_negative_is_refused(name: str) -> None:
    """Failed before: ``OptimizerSetting(opt, "lr", "real")`` was accepted and, once the outer
    step pushed its raw value below 0, wrote a negative lr: silent gradient ascent, which
    torch.optim's own constructors refuse ("Invalid learning rate")."""
    opt = O.SGD(nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.5, weight_decay=1e-3)
    with pytest.raises(ValueError, match=rf"'{name}' must be >= 0 .*constraint 'real'"):
        hg.hparams.OptimizerSetting(opt, name, "real")
    ok = hg.hparams.OptimizerSetting(opt, name, "positive")  # the domain that fits it
    assert float(ok.value[0]) == pytest.approx(opt.param_groups[0][name])
