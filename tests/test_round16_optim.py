"""Round 16: torch.optim's own test suite (``test/optim/test_optim.py``, ``OptimizerInfo`` in
``common_optimizers.py``) translated to ``hg.optim``, the inner-optimiser replay and ``hg.hparams``.

Each test states what the real ``torch.optim`` procedure does and checks ours against it: the
replay against the real step bit for bit, hypergradients in float64 against central differences
of the real training procedure.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

S = torch.optim
Batch = tuple[torch.Tensor, torch.Tensor]


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batches(n: int, dtype: torch.dtype, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 5, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _penalised(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


# ----------------------------------------------------------------------------- replay: tensor betas


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("cls", "extra"),
    [(S.Adam, {}), (S.Adam, {"amsgrad": True, "weight_decay": 0.1}), (S.AdamW, {"weight_decay": 0.1})],
    ids=["adam", "adam-amsgrad-l2", "adamw"],
)
def test_tensor_betas_of_another_dtype_replay_the_real_step_bit_for_bit(
    cls: type[S.Optimizer], extra: dict[str, Any], param_dtype: torch.dtype
) -> None:
    """torch.optim's Adam takes ``betas`` as tensors (``OptimizerInfo``'s "Tensor betas" inputs)
    and casts ``beta1`` to each weight's dtype before ``exp_avg.lerp_(grad, 1 - beta1)``: with
    float64 betas on float32 weights ``1 - beta1`` is rounded in float32 (0.19999999 for 0.8, not
    0.2). The replay took ``1 - beta1`` in float64: 1.5e-8 off the real float32 weights after 5
    steps (the differentiated trajectory was not the trained one)."""
    model = _mlp(param_dtype)
    betas = (torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64))
    opt = cls(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), betas=betas, eps=1e-3, **extra)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _ce,
        inner_optimizer=opt,
        outer_optimizer=S.SGD(hp.parameters(), lr=0.0),
        steps=5,
    )
    for b in _batches(5, param_dtype):
        hopt.step(b)
    for got, real in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        assert torch.equal(got, real), float((got - real).abs().max())


# ----------------------------------------------------------------------------- hg.optim


def _hd_run(
    cls: type[S.Optimizer], params: list[torch.Tensor], kw: dict[str, Any], steps: int
) -> S.Optimizer:
    opt = cls(params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        (params[0].square().sum() + params[1].pow(3).sum() + params[2].sin().sum()).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (hg.optim.SGDHD, {"lr": 0.01, "hypergrad_lr": 1e-2}),
        (hg.optim.SGDHD, {"lr": 0.01, "hypergrad_lr": 1e-2, "momentum": 0.9}),
        (hg.optim.AdamHD, {"lr": 0.01, "hypergrad_lr": 1e-2}),
    ],
    ids=["sgd", "sgd-momentum", "adam"],
)
@pytest.mark.parametrize("order", [(1, 0, 2), (2, 0, 1)], ids=["same-size", "other-size"])
def test_a_state_dict_saved_with_the_parameters_in_another_order_is_refused_at_load(
    cls: type[S.Optimizer], kw: dict[str, Any], order: tuple[int, int, int]
) -> None:
    """torch maps a state_dict's per-parameter state by position (``test_state_dict_deterministic``
    loads into the same order). Saved for ``[a (2x3), b (3x2), c (5)]`` and loaded into an
    optimiser over ``[b, a, c]``, SGDHD without momentum stepped silently with ``a``'s direction
    dotted with ``b``'s gradient (hypergradient 7.84; in the saved order 17.35); with other
    sizes the next step failed with "inconsistent tensor size" after the load had been
    accepted. Now the load is refused, naming the parameter, the state and both shapes, and
    changes nothing."""
    torch.manual_seed(0)
    params = [
        torch.randn(2, 3, requires_grad=True),
        torch.randn(3, 2, requires_grad=True),
        torch.randn(5, requires_grad=True),
    ]
    saved = _hd_run(cls, params, kw, 2).state_dict()
    other = _hd_run(cls, [params[i] for i in order], kw, 1)
    before = other.state_dict()
    with pytest.raises(
        ValueError, match=r"parameter 0 of param group 0: its '\w+' has shape \(2, 3\) but the parameter"
    ):
        other.load_state_dict(saved)
    after = other.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][k][key], v)
    # in the order it was saved in, the same state_dict loads and steps as the saved optimiser does
    twin = cls(params, **kw)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdhd_keeps_following_torch_sgd_after_model_double(momentum: float) -> None:
    """``model.double()`` after some steps (torch.optim keeps going: the parameters are the same
    objects): with ``hypergrad_lr=0`` SGDHD is documented to be torch's SGD bit for bit, but its
    stored float32 direction met the new float64 gradient in ``torch.dot`` and the step raised
    "dot : expected both vectors to have same dtype". Now the dot is taken in the wider dtype."""
    weights = []
    for cls, extra in ((S.SGD, {}), (hg.optim.SGDHD, {"hypergrad_lr": 0.0})):
        torch.manual_seed(0)
        m = nn.Linear(3, 2)
        x = torch.randn(4, 3)
        opt = cls(m.parameters(), lr=0.1, momentum=momentum, **extra)
        for i in range(4):
            if i == 2:
                m.double()
                x = x.double()
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
        weights.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*weights, strict=True):
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)


@pytest.mark.parametrize("cls", [hg.optim.SGDHD, hg.optim.AdamHD])
def test_named_parameters_mixed_dtypes_and_empty_tensors_follow_torch_and_round_trip_weights_only(
    cls: type[S.Optimizer],
) -> None:
    """torch.optim's ``test_mixed_device_dtype``, ``test_empty_grad`` and
    ``test_save_load_equality_with_weights_only``, and named parameters (torch 2.6+): one group
    of a float32, a float64 and an empty parameter, given as ``named_parameters``. With
    ``hypergrad_lr=0`` the weights are torch's own bit for bit; with learning, a state_dict saved
    with ``torch.save`` and loaded with ``weights_only=True`` into fresh objects continues bit
    for bit."""
    import io

    base = S.SGD if cls is hg.optim.SGDHD else S.Adam
    extra: dict[str, Any] = {"momentum": 0.9} if cls is hg.optim.SGDHD else {"amsgrad": True}

    def make() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        return {
            "a": torch.randn(3, requires_grad=True),
            "b": torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
            "e": torch.zeros(0, 4, requires_grad=True),
        }

    def run(opt: S.Optimizer, ps: dict[str, torch.Tensor], steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            (ps["a"].sin().sum() + ps["b"].pow(2).sum() + ps["e"].sum()).backward()
            opt.step()

    torch_ps, hd_ps = make(), make()
    run(base(list(torch_ps.items()), lr=0.05, **extra), torch_ps, 4)
    run(cls(list(hd_ps.items()), lr=0.05, hypergrad_lr=0.0, **extra), hd_ps, 4)
    for k in torch_ps:
        assert torch.equal(torch_ps[k], hd_ps[k]), k

    whole, first = make(), make()
    run(cls(list(whole.items()), lr=0.05, hypergrad_lr=1e-2, **extra), whole, 6)
    opt = cls(list(first.items()), lr=0.05, hypergrad_lr=1e-2, **extra)
    run(opt, first, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": {k: v.detach() for k, v in first.items()}}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["param_groups"][0]["param_names"] == ["a", "b", "e"]
    resumed = {k: v.clone().requires_grad_() for k, v in saved["w"].items()}
    again = cls(list(resumed.items()), lr=0.05, hypergrad_lr=1e-2, **extra)
    again.load_state_dict(saved["opt"])
    run(again, resumed, 3)
    assert again.param_groups[0]["lr"] != 0.05  # the rate was tuned
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


# ----------------------------------------------------------------------------- schedulers x LearningRate

L = S.lr_scheduler
SCHEDULERS: dict[str, tuple[Any, Any]] = {
    "sequential": (
        lambda m: S.SGD(m.parameters(), lr=0.3),
        lambda o: L.SequentialLR(
            o, [L.LinearLR(o, start_factor=0.2, total_iters=2), L.ExponentialLR(o, gamma=0.8)], milestones=[2]
        ),
    ),
    "chained": (
        lambda m: S.Adagrad(m.parameters(), lr=0.2),
        lambda o: L.ChainedScheduler(
            [L.ConstantLR(o, factor=0.5, total_iters=2), L.ExponentialLR(o, gamma=0.9)]
        ),
    ),
    "cyclic_momentum": (
        lambda m: S.SGD(m.parameters(), lr=0.05, momentum=0.9),
        lambda o: L.CyclicLR(o, base_lr=0.05, max_lr=0.4, step_size_up=2),
    ),
    "onecycle_betas": (
        lambda m: S.Adam(m.parameters(), lr=0.05),
        lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=20),
    ),
    "warm_restarts": (
        lambda m: S.SGD(m.parameters(), lr=0.3),
        lambda o: L.CosineAnnealingWarmRestarts(o, T_0=2),
    ),
    "plateau": (
        lambda m: S.RMSprop(m.parameters(), lr=0.01),
        lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_learned_multiplier_on_a_scheduled_rate_matches_central_differences_of_real_training(
    name: str,
) -> None:
    """torch.optim's scheduler tests (``test_lrscheduler.py``) composed with a learned learning
    rate: ``LearningRate(relative=True)`` multiplies whatever the scheduler set (SequentialLR
    and ChainedScheduler composing two, CyclicLR and OneCycleLR also cycling the momentum /
    beta1, warm restarts, ReduceLROnPlateau on the training loss). Its hypergradient over K = 5
    scheduled steps equals central differences of the real procedure, in float64."""
    k = 5
    g = torch.Generator().manual_seed(0)
    bs = [
        (torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
        for _ in range(k + 2)
    ]
    make_opt, make_sched = SCHEDULERS[name]

    def train(shift: float) -> tuple[nn.Module, hg.Unrolled]:
        model = _mlp(torch.float64)
        opt = make_opt(model)
        sched = make_sched(opt)
        hp = hg.hparams.LearningRate(opt, relative=True, dtype=torch.float64)
        with torch.no_grad():
            hp.raw.add_(shift)
        hopt = hg.Unrolled(
            model, hp, _ce, _ce, inner_optimizer=opt, outer_optimizer=S.SGD(hp.parameters(), lr=0.0), steps=k
        )
        for i in range(k):
            loss = hopt.step(bs[i])
            if isinstance(sched, L.ReduceLROnPlateau):
                sched.step(float(loss) * (1 + i))  # a rising metric: the rate is halved each step
            else:
                sched.step()
        return model, hopt

    _, hopt = train(0.0)
    (got,), _ = hopt.hypergradient(train_batch=bs[k], val_batch=bs[k + 1])
    eps = 1e-6
    up, down = (float(_ce(train(s * eps)[0], None, bs[k + 1]).detach()) for s in (1.0, -1.0))
    fd = (up - down) / (2 * eps)
    assert abs(fd) > 1e-3
    assert float(got) == pytest.approx(fd, rel=1e-6)


# ----------------------------------------------------------------------------- hg.hparams


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_weight_decay_of_a_half_precision_model_learns_in_float32(dtype: torch.dtype, method: str) -> None:
    """A bfloat16 / float16 model (torch.optim's ``OptimizerInfo`` runs every optimiser on them):
    ``WeightDecay`` gave its decays the weights' dtype. In bfloat16 the raw ``log(1e-2) = -4.6``
    has a spacing of 0.03, so an outer Adam (lr 0.01) step rounded away: after three hypersteps
    the decays had not moved at all; in float16 Adam's ``eps = 1e-8`` and squared
    hypergradients underflow, and its first step made them NaN (the next inner step refused to
    run). Now the decays are float32 (as ``LearningRate`` already was) and move by up to the
    outer learning rate each hyperstep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    assert all(r.dtype == torch.float32 for r in hp.raw)

    def train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
        return F.cross_entropy(m(b[0]).float(), b[1]) + h.penalty(m)

    def val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
        return F.cross_entropy(m(b[0]).float(), b[1])

    kw: dict[str, Any] = {
        "inner_optimizer": S.SGD(model.parameters(), lr=0.1),
        "outer_optimizer": S.Adam(hp.parameters(), lr=0.01),
    }
    if method == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(model, hp, train, val, solver=hg.CG(maxiter=3), **kw)
    else:
        hopt = hg.Unrolled(model, hp, train, val, steps=2, **kw)
    b = _batches(1, dtype)[0]
    before = torch.stack([r.detach().clone() for r in hp.raw])
    for _ in range(3):
        hopt.step(b)
        hopt.hyper_step(train_batch=b, val_batch=b)
    after = torch.stack([r.detach() for r in hp.raw])
    assert torch.isfinite(after).all()
    # Adam moves each raw entry by up to lr per step (0.016 to 0.03 here; 0 in bfloat16 before)
    assert ((after - before).abs() > 0.005).all(), after - before
