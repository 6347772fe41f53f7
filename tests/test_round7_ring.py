"""Round 7: Unrolled's replay ring with overlapping windows (hypersteps every 1 or 2 steps,
K = 3..5): each hypergradient equals a fresh Unrolled run from the real state at the window's
start with the current hyperparameters (float64), and at most two full snapshots are held."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


class _Ctx:
    def __init__(self, inner: str = "adam", sched: bool = False, **kw: Any) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        self.hp = hg.hparams.WeightDecay(self.model, per="parameter", init=1e-2).to(DT)
        if inner == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        elif inner == "amsgrad":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=0.05, amsgrad=True, weight_decay=1e-3)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.3, momentum=0.5)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, 1, gamma=0.8) if sched else None
        self.kw = kw


def _build(ctx: _Ctx, fused: bool = False) -> hg.Unrolled:
    outer = torch.optim.Adam(ctx.hp.parameters(), lr=0.3, fused=fused or None)
    return hg.Unrolled(
        ctx.model, ctx.hp, _train, _val, inner_optimizer=ctx.opt, outer_optimizer=outer, **ctx.kw
    )


def _tensors(ctx: _Ctx, hopt: hg.Unrolled) -> list[torch.Tensor]:
    """Copies of every tensor of the weights, hyperparameters and both optimisers' states."""
    out = [t.detach().clone() for t in [*ctx.model.parameters(), *ctx.hp.parameters()]]
    for opt in (ctx.opt, hopt.outer_optimizer):
        out += [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


Event = Callable[[int, _Ctx, hg.Unrolled, bool], None]


def _run(
    ctx: _Ctx,
    K: int,
    every: int,
    n: int = 9,
    event: Event | None = None,
    fused: bool = False,
    vals: list[Any] | None = None,
    rtol: float = 1e-9,
    clip: float | None = None,
    twice: bool = False,
    due: Callable[[int], str | None] | None = None,
) -> int:
    """Train n steps with a hyperstep every ``every`` steps; compare each full window's
    hypergradient with a fresh Unrolled from deep copies taken before the window's first step."""
    data = _data(n)
    vals = vals or _data(1, seed=9) * n
    hopt = _build(ctx, fused)
    saved: list[_Ctx] = []
    checked = 0
    since_start = 0
    for i, b in enumerate(data):
        saved.append(copy.deepcopy(ctx))
        if event is not None:
            if event(i, ctx, hopt, False) == "restart":
                since_start = 0
        hopt.step(b, max_grad_norm=clip)
        since_start += 1
        assert sum(r.anchor is not None for r in hopt._records) <= 2 and len(hopt._records) <= 2 * K
        if ctx.sched is not None:
            ctx.sched.step()
        what = due(i) if due is not None else None if (i + 1) % every else "hyper"
        if what is None:
            continue
        if bool(torch.isnan(vals[i][0]).any()):  # refused: nothing may change
            before = _tensors(ctx, hopt)
            if ctx.kw.get("on_nonfinite") == "skip":
                with pytest.warns(hg.NonFiniteWarning):
                    hopt.hyper_step(val_batch=vals[i])
            else:
                with pytest.raises(hg.NonFiniteError):
                    hopt.hyper_step(val_batch=vals[i])
            after = _tensors(ctx, hopt)
            assert len(before) == len(after) and all(
                torch.equal(a, b) for a, b in zip(before, after, strict=True)
            )
            continue
        grads, _ = hopt.hypergradient(val_batch=vals[i])
        if twice:
            again, _ = hopt.hypergradient(val_batch=vals[i])
            for g, a in zip(grads, again, strict=True):
                torch.testing.assert_close(g, a, rtol=0, atol=0)
        if since_start >= K:
            f = copy.deepcopy(saved[i + 1 - K])
            f.hp.load_state_dict(ctx.hp.state_dict())
            f.kw = dict(ctx.kw)
            frozen = [q for q in f.hp.parameters() if not q.requires_grad]
            for q in frozen:  # (construction needs trainable ones; frozen after, as the real one)
                q.requires_grad_(True)
            fresh = _build(f)
            for q in frozen:
                q.requires_grad_(False)
            for j in range(i + 1 - K, i + 1):
                if event is not None:
                    event(j, f, fresh, True)
                fresh.step(data[j], max_grad_norm=clip)
                if f.sched is not None:
                    f.sched.step()
            ref, _ = fresh.hypergradient(val_batch=vals[i])
            for g, r in zip(grads, ref, strict=True):
                torch.testing.assert_close(g, r, rtol=rtol, atol=1e-12)
            checked += 1
        if what == "hyper":
            hopt.hyper_step(val_batch=vals[i])
        elif what == "manual":  # the user's own outer step on the hypergradient
            for q, gq in zip(ctx.hp.parameters(), grads, strict=True):
                q.grad = gq
            hopt.outer_optimizer.step()
        anchors = [r for r in hopt._records if r.anchor is not None]
        assert len(anchors) <= 2, len(anchors)
        assert len(hopt._records) <= 2 * K
    return checked


@pytest.mark.parametrize("K,every", [(3, 1), (4, 2), (5, 1), (5, 2), (4, 3), (5, 3), (5, 4)])
@pytest.mark.parametrize("inner", ["adam", "sgd", "amsgrad"])
def test_overlapping_windows_basic(K: int, every: int, inner: str) -> None:
    assert _run(_Ctx(inner, steps=K), K, every) > 0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
@pytest.mark.parametrize("K,every", [(3, 1), (4, 2)])
def test_overlapping_windows_with_lr_scheduler_every_step(K: int, every: int) -> None:
    assert _run(_Ctx("sgd", sched=True, steps=K), K, every) > 0


@pytest.mark.parametrize("mode,checkpoint", [("forward", False), ("reverse", True)])
def test_overlapping_windows_forward_and_checkpoint(mode: str, checkpoint: bool) -> None:
    ctx = _Ctx("adam", steps=3, mode=mode, checkpoint=checkpoint)
    if mode == "forward":
        torch.manual_seed(0)
        ctx.hp = hg.hparams.WeightDecay(ctx.model, per="layer", init=1e-2).to(DT)
    assert _run(ctx, 3, 1, n=7) > 0


def test_overlapping_windows_different_val_batch_each_time() -> None:
    assert _run(_Ctx("adam", steps=4), 4, 1, vals=_data(9, seed=5)) > 0


def test_overlapping_windows_fused_outer_adam() -> None:
    assert _run(_Ctx("adam", steps=3), 3, 1, fused=True) > 0


def test_overlapping_windows_clipping_and_hypergradient_twice() -> None:
    assert _run(_Ctx("sgd", steps=4), 4, 1, clip=0.05, twice=True) > 0


def test_overlapping_windows_replayed_weights_between_steps() -> None:
    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> None:
        if not fresh and i:
            hopt.replayed_weights()

    assert _run(_Ctx("adam", steps=3), 3, 1, event=ev) > 0


def test_overlapping_windows_hparams_changed_in_place_by_the_user() -> None:
    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> None:
        if not fresh and i in (2, 5):
            with torch.no_grad():
                for p in ctx.hp.parameters():
                    p.add_(0.1)

    assert _run(_Ctx("adam", steps=4), 4, 2, event=ev) > 0
    assert _run(_Ctx("adam", steps=3), 3, 1, event=ev) > 0


def test_overlapping_windows_start_episode_mid_window() -> None:
    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> str | None:
        if not fresh and i == 4:
            hopt.start_episode()
            return "restart"
        return None

    assert _run(_Ctx("adam", steps=3), 3, 1, n=10, event=ev) > 0  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::hypergrad.DisconnectedWarning")
def test_overlapping_windows_weight_frozen_mid_window() -> None:
    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> str | None:
        if i == 4:
            ctx.model[0].bias.requires_grad_(False)
            return "restart"  # (the set of trained weights changed: a new episode)
        return None

    assert _run(_Ctx("adam", steps=3), 3, 1, n=9, event=ev) > 0  # type: ignore[arg-type]


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("every", [1, 2])
def test_overlapping_windows_refused_hyperstep_then_training_continues(on_nonfinite: str, every: int) -> None:
    vals = _data(1, seed=9) * 11
    nan = (vals[0][0].clone(), vals[0][1])
    nan[0][0, 0] = float("nan")
    vals[3] = vals[5] = nan
    assert _run(_Ctx("adam", steps=3, on_nonfinite=on_nonfinite), 3, every, n=11, vals=vals) > 0


@pytest.mark.filterwarnings("ignore::hypergrad.DisconnectedWarning")  # (layer 2 untrained at first)
def test_overlapping_windows_param_group_added_mid_window() -> None:
    def build() -> _Ctx:
        ctx = _Ctx("adam", steps=3)
        ctx.opt = torch.optim.Adam(ctx.model[0].parameters(), lr=0.05)
        return ctx

    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> str | None:
        if i == 4:
            ctx.opt.add_param_group({"params": list(ctx.model[2].parameters()), "lr": 0.02})
            return "restart"
        return None

    assert _run(build(), 3, 1, n=9, event=ev) > 0  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::hypergrad.DisconnectedWarning")
@pytest.mark.parametrize("every", [1, 2])
def test_overlapping_windows_hyperparameter_frozen_mid_run(every: int) -> None:
    def ev(i: int, ctx: _Ctx, hopt: hg.Unrolled, fresh: bool) -> None:
        if i == 4:
            next(iter(ctx.hp.parameters())).requires_grad_(False)

    ctx = _Ctx("adam", steps=3)
    assert _run(ctx, 3, every, n=9, event=ev) > 0


class _Tuned(nn.Module):
    """Per-weight decay and the inner optimiser's (relative, scheduled) learning rate."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="parameter", init=1e-2).to(DT)
        self.lr = hg.hparams.LearningRate(opt, relative=True, dtype=DT)

    def penalty(self, m: nn.Module) -> torch.Tensor:
        return self.wd.penalty(m)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
@pytest.mark.parametrize("K,every", [(3, 1), (4, 2), (5, 3)])
def test_overlapping_windows_learned_relative_lr_under_a_scheduler(K: int, every: int) -> None:
    ctx = _Ctx("sgd", sched=True, steps=K)
    ctx.hp = _Tuned(ctx.model, ctx.opt)
    assert _run(ctx, K, every, n=10) > 0


@pytest.mark.parametrize("seed", range(6))
def test_overlapping_windows_irregular_hypersteps_and_lone_hypergradients(seed: int) -> None:
    """Hypersteps at random steps, some steps with hypergradient() alone (no outer step)."""
    g = torch.Generator().manual_seed(seed)
    plan = [[None, "hyper", "grad"][int(k)] for k in torch.randint(0, 3, (14,), generator=g)]
    K = 3 + seed % 3
    assert _run(_Ctx("adam", steps=K), K, 1, n=14, due=lambda i: plan[i]) >= 0


@pytest.mark.parametrize("seed", [2, 7])
def test_irregular_hypersteps_resume_bit_exactly(seed: int) -> None:
    """A checkpoint taken at any step of an irregular hyperstep plan (where a middle snapshot
    becomes a hyperparameter copy) continues bit-exactly in objects built from another seed."""
    import io

    g = torch.Generator().manual_seed(seed)
    plan = [[None, "hyper", "grad"][int(k)] for k in torch.randint(0, 3, (14,), generator=g)]
    K = 5
    data, val = _data(14), _data(1, seed=9)[0]

    def build(s: int) -> tuple[_Ctx, hg.Unrolled]:
        torch.manual_seed(s)
        ctx = _Ctx("adam", steps=K)
        if s:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.add_(1.0)
        return ctx, _build(ctx)

    def run(stop: int | None) -> torch.Tensor:
        ctx, h = build(0)
        out = []
        for i, b in enumerate(data):
            if i == stop:
                buf = io.BytesIO()
                torch.save(h.state_dict(), buf)
                buf.seek(0)
                ctx, h = build(3)
                h.load_state_dict(torch.load(buf, weights_only=True))
            h.step(b)
            if plan[i] is not None:
                grads, _ = h.hypergradient(val_batch=val)
                out.append(torch.cat([t.reshape(-1) for t in grads]))
            if plan[i] == "hyper":
                h.hyper_step(val_batch=val)
            assert sum(r.anchor is not None for r in h._records) <= 2
        return torch.stack(out)

    straight = run(None)
    for stop in (4, 8, 9, 12):
        assert torch.equal(straight, run(stop)), stop


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_irregular_hypersteps_batchnorm_with_eval_mode_steps(seed: int) -> None:
    """BatchNorm running statistics through the re-run to the window start, with steps taken in
    eval mode inside the windows (hypersteps are taken in train mode: in eval mode the validation
    loss reads the real running statistics, which a fresh run with other hyperparameters does
    not share); checkpointed replay for odd seeds."""
    g = torch.Generator().manual_seed(seed)
    plan = [[None, "hyper", "grad", "hyper"][int(k)] for k in torch.randint(0, 4, (12,), generator=g)]
    K = 2 + seed % 4
    ctx = _Ctx("adam", steps=K, checkpoint=bool(seed % 2))
    torch.manual_seed(0)
    ctx.model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    ctx.hp = hg.hparams.WeightDecay(ctx.model, per="parameter", init=1e-2).to(DT)
    ctx.opt = torch.optim.Adam(ctx.model.parameters(), lr=0.05)

    def ev(i: int, c: _Ctx, h: hg.Unrolled, fresh: bool) -> None:
        if i in (3, 7):
            c.model.eval()
        if i in (5, 9):
            c.model.train()

    def due(i: int) -> str | None:
        return None if (3 <= i < 5 or 7 <= i < 9) else plan[i]

    assert _run(ctx, K, 1, n=12, due=due, event=ev) > 0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seed", [0, 2, 5])
def test_irregular_plan_with_the_users_own_outer_steps(seed: int, fused: bool) -> None:
    """hypergradient() followed by the user's own (fused or not) outer step, mixed with
    hyper_step() and lone hypergradients: the steps after it are replayed with the new values."""
    g = torch.Generator().manual_seed(seed)
    plan = [[None, "hyper", "grad", "manual"][int(k)] for k in torch.randint(0, 4, (14,), generator=g)]
    K = 3 + seed % 3
    assert _run(_Ctx("adam", steps=K), K, 1, n=14, due=lambda i: plan[i], fused=fused) > 0
