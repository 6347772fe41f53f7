"""Round 26 (optimhd): ``hg.optim.SGDHD`` / ``AdamHD`` and tuned optimiser settings in the
idioms of a real training script, against references written here.

* SGDHD / AdamHD against Baydin et al.'s rule written out by hand around a plain ``torch.optim``
  SGD / Adam, with the update directions ``d_t`` formed here from the paper's formulas (the
  momentum buffer / Nesterov direction, Adam's bias-corrected ratio), never read from either
  optimiser. Each run combines things earlier rounds checked only apart, or not at all against
  a reference: the schedulers that set the rate outright (LambdaLR, OneCycleLR,
  CosineAnnealingWarmRestarts, SequentialLR's milestone reset) or scale it (StepLR,
  ReduceLROnPlateau on the loss), ``clip_grad_norm_`` between ``backward`` and ``step`` (in
  place, foreach), ``step(closure)``, ``zero_grad(set_to_none=False)``, ``foreach``, and a
  ``weights_only`` checkpoint of optimiser and scheduler loaded mid-run into fresh objects built
  in the order a script builds them.
* Several optimiser settings tuned at once under ``Unrolled`` (a learned multiplier on a
  per-group OneCycleLR rate with an absolute Momentum on Nesterov SGD, a multiplier on a warm-
  restart schedule with Adam's ``eps`` (AMSGrad, coupled decay), SGD's coupled ``weight_decay``
  and ``dampening`` with ``maximize=True`` under LambdaLR), each with and without
  ``max_grad_norm`` clipping: every entry of the hypergradient against central differences of
  the real training, float64.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.optim import SGDHD, AdamHD

S = torch.optim
L = torch.optim.lr_scheduler
DT = torch.float64


# ============================================================================================
# 1. SGDHD / AdamHD against the paper's rule by hand, through schedulers, clipping, closures,
#    set_to_none=False and a mid-run reload into fresh objects.

_SCHEDULERS: dict[str, Callable[[S.Optimizer], Any]] = {
    "lambda": lambda o: L.LambdaLR(o, lambda e: 1.0 / (1.0 + 0.1 * e)),
    "step": lambda o: L.StepLR(o, step_size=3, gamma=0.5),
    "onecycle": lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=30, cycle_momentum=False),
    "warm-restarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4, eta_min=0.01),
    "sequential": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.5, 1.0, total_iters=3), L.ExponentialLR(o, 0.9)], milestones=[3]
    ),
    "plateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.7),
}

_KINDS: dict[str, dict[str, Any]] = {
    # (beta chosen so that the rates move by tens of percent and stay well above lr_min)
    "sgd-nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "sgd-dampening-max": {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    "adam-amsgrad": {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1, "betas": (0.8, 0.9)},
    "adam-max": {"lr": 0.05, "maximize": True, "eps": 1e-3},
}
_BETA = {"sgd": 2e-3, "adam": 1e-3}
_LR_MIN = 1e-4


def _hd_loss(ps: list[Tensor], t: int, sign: float) -> Tensor:
    """A smooth non-quadratic loss whose minimiser moves with ``t`` (so the rates keep moving);
    ``sign=-1`` for the maximising kinds (they ascend minus it)."""
    total = torch.zeros((), dtype=DT)
    for i, p in enumerate(ps):
        c = torch.full_like(p, 0.3 * (i + 1) * math.sin(t + i))
        total = total + 0.5 * ((p - c) ** 2).sum() * (1 + 0.2 * i) + torch.log(torch.cosh(p)).sum()
    return sign * total


def _params() -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=gen, dtype=DT).requires_grad_() for shape in ((3,), (2, 2))]


def _sched_step(sched: Any, loss: Any) -> None:
    if isinstance(sched, L.ReduceLROnPlateau):
        sched.step(float(loss.detach()))
    else:
        sched.step()


class _Directions:
    """The paper's ``d_t`` from its formulas, with this file's own optimiser state."""

    def __init__(self, kind: str, kw: dict[str, Any]) -> None:
        self.kind, self.kw = kind, kw
        self.state: dict[int, dict[str, Any]] = {}

    def effective(self, p: Tensor) -> Tensor:
        assert p.grad is not None
        g = -p.grad if self.kw.get("maximize", False) else p.grad
        return g + self.kw.get("weight_decay", 0.0) * p.detach()

    def update(self, p: Tensor, g: Tensor) -> Tensor:
        """Advance the state with the effective gradient ``g`` and return ``d_t``."""
        st = self.state.setdefault(id(p), {})
        if self.kind == "sgd":
            mu, tau = self.kw.get("momentum", 0.0), self.kw.get("dampening", 0.0)
            st["buf"] = g.clone() if "buf" not in st else mu * st["buf"] + (1 - tau) * g
            return g + mu * st["buf"] if self.kw.get("nesterov", False) else st["buf"].clone()
        b1, b2 = self.kw.get("betas", (0.9, 0.999))
        k = st["k"] = st.get("k", 0) + 1
        st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
        v = st["v"]
        if self.kw.get("amsgrad", False):
            v = st["vmax"] = torch.maximum(st.get("vmax", v), v)
        denom = v.sqrt() / math.sqrt(1 - b2**k) + self.kw.get("eps", 1e-8)
        return (st["m"] / (1 - b1**k)) / denom


def _reference(kind: str, sched_name: str, steps: int) -> tuple[list[float], list[Tensor]]:
    """Plain torch SGD / Adam; before each step its rate is set by α ← clamp(α + β h) with
    h = Σ <g_eff, d_prev>, d formed by ``_Directions``."""
    kw = _KINDS[kind]
    family = kind.split("-")[0]
    ps = _params()
    opt = (S.SGD if family == "sgd" else S.Adam)(ps, **kw)
    sched = _SCHEDULERS[sched_name](opt)
    dirs = _Directions(family, kw)
    prev: dict[int, Tensor] = {}
    sign = -1.0 if kw.get("maximize", False) else 1.0
    lrs = []
    for t in range(steps):
        opt.zero_grad(set_to_none=False)
        loss = _hd_loss(ps, t, sign)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        effs = [dirs.effective(p) for p in ps]
        h = sum(float((g * prev[id(p)]).sum()) for p, g in zip(ps, effs, strict=True) if id(p) in prev)
        group = opt.param_groups[0]
        group["lr"] = max(group["lr"] + _BETA[family] * h, _LR_MIN)
        opt.step()
        for p, g in zip(ps, effs, strict=True):
            prev[id(p)] = dirs.update(p, g)
        lrs.append(group["lr"])  # the rate this step used
        _sched_step(sched, loss)
    return lrs, [p.detach().clone() for p in ps]


def _hd_run(
    kind: str, sched_name: str, steps: int, reload_at: int, foreach: bool
) -> tuple[list[float], list[Tensor]]:
    kw = _KINDS[kind]
    family = kind.split("-")[0]
    cls = SGDHD if family == "sgd" else AdamHD

    def build(ps: list[Tensor]) -> tuple[S.Optimizer, Any]:
        opt = cls(ps, hypergrad_lr=_BETA[family], lr_min=_LR_MIN, foreach=foreach, **kw)
        return opt, _SCHEDULERS[sched_name](opt)

    ps = _params()
    opt, sched = build(ps)
    sign = -1.0 if kw.get("maximize", False) else 1.0
    lrs = []
    for t in range(steps):
        if t == reload_at:  # a checkpoint on disk, loaded into objects built as a script builds them
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            ps = [p.detach().clone().requires_grad_() for p in ps]
            opt, sched = build(ps)  # (the scheduler's constructor writes the groups' lr ...)
            opt.load_state_dict(saved["opt"])  # (... which the loaded state then replaces)
            sched.load_state_dict(saved["sched"])

        def closure(t: int = t, ps: list[Tensor] = ps, opt: S.Optimizer = opt) -> Tensor:
            opt.zero_grad(set_to_none=False)
            loss = _hd_loss(ps, t, sign)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=foreach)  # scales .grad in place
            return loss

        loss = opt.step(closure)  # type: ignore[arg-type]
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step used
        _sched_step(sched, loss)
    return lrs, [p.detach().clone() for p in ps]


@pytest.mark.parametrize("sched_name", list(_SCHEDULERS))
@pytest.mark.parametrize("kind", list(_KINDS))
def test_hd_follows_the_papers_rule_through_schedulers_clipping_closures_and_a_reload(
    kind: str, sched_name: str
) -> None:
    """Passes on the current code. Not covered before in one run: the schedulers that overwrite
    the rate (their one-step correction), SequentialLR's reset at its milestone and
    ReduceLROnPlateau, with the gradient clipped in place between backward and step inside a
    closure, ``set_to_none=False`` and a mid-run ``weights_only`` reload of optimiser and
    scheduler, all against the paper's rule with directions formed by the test."""
    steps = 12
    foreach = kind in ("sgd-nesterov", "adam-max")  # (the other two on the single-tensor path)
    want_lrs, want_ps = _reference(kind, sched_name, steps)
    got_lrs, got_ps = _hd_run(kind, sched_name, steps, reload_at=7, foreach=foreach)
    plain_lrs, _ = _hd_run(kind, sched_name, steps, reload_at=-1, foreach=foreach)
    # the tuned rate really differs from the schedule alone (the hypergradient did something)
    sched_only = _SCHEDULERS[sched_name]
    opt0 = S.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    s0 = sched_only(opt0)
    untuned = []
    for t in range(steps):
        opt0.step()
        untuned.append(opt0.param_groups[0]["lr"])
        _sched_step(s0, torch.tensor(float(-t)))  # (plateau: a falling loss never reduces)
    assert max(abs(a - b) / b for a, b in zip(got_lrs, untuned, strict=True)) > 1e-2
    assert got_lrs == pytest.approx(want_lrs, rel=1e-9, abs=1e-14)
    assert plain_lrs == got_lrs  # the reload changed nothing, bit for bit
    for g, w in zip(got_ps, want_ps, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ============================================================================================
# 2. Several optimiser settings tuned at once under Unrolled, with and without clipping, against
#    central differences of the real training.

_K = 5


def _mse(model: nn.Module, hp: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _neg_mse(model: nn.Module, hp: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    return -_mse(model, hp, batch)


def _setting_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT))
        for _ in range(_K + 2)
    ]


def _build_settings(case: str) -> tuple[nn.Module, S.Optimizer, Any, nn.ModuleDict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    p = list(model.parameters())
    opt: S.Optimizer
    sched: Any
    if case == "sgd-nesterov-onecycle":
        opt = S.SGD(p[:2], lr=0.1, momentum=0.6, nesterov=True, weight_decay=0.05)
        opt.add_param_group({"params": p[2:], "lr": 0.05, "momentum": 0.8, "nesterov": True})
        sched = L.OneCycleLR(opt, max_lr=[0.2, 0.1], total_steps=20, cycle_momentum=False)
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(opt, relative=True, dtype=DT),
                "momentum": hg.hparams.Momentum(opt, dtype=DT),
            }
        )
    elif case == "adam-amsgrad-restarts":
        opt = S.Adam(p, lr=0.05, amsgrad=True, weight_decay=0.01, eps=1e-3)
        sched = L.CosineAnnealingWarmRestarts(opt, T_0=2, eta_min=0.01)
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(opt, relative=True, dtype=DT),
                "eps": hg.hparams.OptimizerSetting(opt, "eps", "positive", dtype=DT),
            }
        )
    elif case == "sgd-relative-momentum-onecycle":  # OneCycleLR cycles the momentum too
        opt = S.SGD(p, lr=0.05, momentum=0.9)
        sched = L.OneCycleLR(opt, max_lr=0.2, total_steps=20, base_momentum=0.5, max_momentum=0.8)
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(opt, relative=True, dtype=DT),
                "momentum": hg.hparams.OptimizerSetting(opt, "momentum", "unit", relative=True, dtype=DT),
            }
        )
    else:  # "sgd-maximize-lambda"
        opt = S.SGD(p, lr=0.05, momentum=0.5, dampening=0.3, maximize=True, weight_decay=0.1)
        sched = L.LambdaLR(opt, lambda e: 1.0 / (1.0 + e))
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(opt, relative=True, dtype=DT),
                "wd": hg.hparams.OptimizerSetting(opt, "weight_decay", "positive", dtype=DT),
                "dampening": hg.hparams.OptimizerSetting(opt, "dampening", "unit", dtype=DT),
            }
        )
    return model, opt, sched, hp


def _train_settings(
    case: str,
    clip: float | None,
    batches: list[tuple[Tensor, Tensor]],
    shift: tuple[int, int, float] | None = None,
    mode: str = "reverse",
) -> tuple[nn.Module, hg.Unrolled]:
    model, opt, sched, hp = _build_settings(case)
    if shift is not None:
        i, j, eps = shift
        with torch.no_grad():
            list(hp.parameters())[i].view(-1)[j] += eps
    train = _neg_mse if case == "sgd-maximize-lambda" else _mse  # (maximize: ascends minus the mse)
    hopt = hg.Unrolled(
        model,
        hp,
        train,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=S.SGD(hp.parameters(), lr=0.0),
        steps=_K,
        mode=mode,
    )
    for b in batches[:_K]:
        hopt.step(b, max_grad_norm=clip)
        sched.step()
    return model, hopt


@pytest.mark.parametrize(
    "clip, mode",
    [(None, "reverse"), (0.3, "reverse"), (0.3, "forward")],
    ids=["unclipped", "clipped", "clipped-forward"],
)
@pytest.mark.parametrize(
    "case",
    [
        "sgd-nesterov-onecycle",
        "sgd-relative-momentum-onecycle",
        "adam-amsgrad-restarts",
        "sgd-maximize-lambda",
    ],
)
def test_several_tuned_settings_at_once_match_central_differences(
    case: str, clip: float | None, mode: str
) -> None:
    """Passes on the current code. Earlier rounds tuned one setting at a time under a schedule
    (round 20) or a multiplier alone (round 16); here two or three settings of one optimiser are
    written before every step together, with a group added before they were built, per-group
    OneCycleLR rates, ``maximize`` and the replayed clipping."""
    batches = _setting_batches()
    model, hopt = _train_settings(case, clip, batches, mode=mode)
    grads, _ = hopt.hypergradient(train_batch=batches[_K], val_batch=batches[_K + 1])
    eps = 1e-6
    checked = 0
    for i, g in enumerate(grads):
        for j in range(g.numel()):
            up = float(
                _mse(_train_settings(case, clip, batches, (i, j, eps))[0], None, batches[_K + 1]).detach()
            )
            down = float(
                _mse(_train_settings(case, clip, batches, (i, j, -eps))[0], None, batches[_K + 1]).detach()
            )
            fd = (up - down) / (2 * eps)
            assert abs(fd) > 1e-5  # (each setting really moves the validation loss)
            assert float(g.view(-1)[j]) == pytest.approx(fd, rel=1e-5), (i, j)
            checked += 1
    assert checked == sum(g.numel() for g in grads) >= 2


# ============================================================================================
# 3. SGDHD / AdamHD as the *outer* optimiser (hypergradient descent on the hyper learning rate).
#    No earlier test used an hg.optim optimiser as outer_optimizer: its own per-group state
#    (the tuned rate, the logged hypergradient, the stored direction) must be undone with a
#    refused hyperstep and carried through hopt.state_dict() like any other optimiser state.


def _outer_run(
    outer_cls: type[S.Optimizer], hypersteps: int, refuse_at: int = -1, reload_at: int = -1
) -> tuple[list[float], list[float], Tensor]:
    batches = _setting_batches()
    kw: dict[str, Any] = (
        {"lr": 1.0, "hypergrad_lr": 10.0} if outer_cls is SGDHD else {"lr": 0.05, "hypergrad_lr": 1e-2}
    )

    def build() -> tuple[nn.Module, hg.hparams.Momentum, hg.Unrolled]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        opt = S.SGD(model.parameters(), lr=0.1, momentum=0.5)
        hp = hg.hparams.Momentum(opt, dtype=DT)
        outer = outer_cls(hp.parameters(), **kw)
        hopt = hg.Unrolled(
            model, hp, _mse, _mse, inner_optimizer=opt, outer_optimizer=outer, steps=2, on_nonfinite="skip"
        )
        return model, hp, hopt

    model, hp, hopt = build()
    lrs, hs = [], []
    for k in range(hypersteps):
        if k == reload_at:
            buf = io.BytesIO()
            torch.save(hopt.state_dict(), buf)
            buf.seek(0)
            model, hp, hopt = build()
            hopt.load_state_dict(torch.load(buf, weights_only=True))
        for i in range(2):
            hopt.step(batches[(2 * k + i) % _K])
        group = hopt.outer_optimizer.param_groups[0]
        if k == refuse_at:
            kept = group["lr"]
            group["lr"] = 1e7  # the outer step throws the momentum onto 1.0: refused, undone
            with pytest.warns(hg.NonFiniteWarning, match="leave their domain"):
                info = hopt.hyper_step(train_batch=batches[_K], val_batch=batches[_K + 1])
            assert info.skipped
            assert group["lr"] == 1e7  # put back as it was before the refused step ...
            group["lr"] = kept  # ... and the script's own setting restored by the script
        info = hopt.hyper_step(train_batch=batches[_K], val_batch=batches[_K + 1])
        assert not info.skipped
        lrs.append(group["lr"])
        hs.append(group["hypergrad"])
    return lrs, hs, hp.raw.detach().clone()


@pytest.mark.parametrize("outer_cls", [SGDHD, AdamHD], ids=lambda c: c.__name__)
def test_hd_as_the_outer_optimiser_survives_a_refused_hyperstep_and_a_reload(
    outer_cls: type[S.Optimizer],
) -> None:
    """Passes on the current code (new coverage, see the section comment)."""
    lrs, hs, raw = _outer_run(outer_cls, 6)
    assert lrs[-1] != lrs[0] and any(h != 0.0 for h in hs)  # the outer rate really tuned itself
    for kwargs in ({"refuse_at": 3}, {"reload_at": 3}):
        lrs2, hs2, raw2 = _outer_run(outer_cls, 6, **kwargs)
        assert lrs2 == lrs, kwargs
        assert hs2 == hs, kwargs
        assert torch.equal(raw2, raw), kwargs
