"""Round 22: Unrolled's window bookkeeping against independent references (helper unr3).

Each hypergradient here is checked against a reference that shares no code with hypergrad:
plain torch autograd through the window's steps written out by hand (SGD with momentum,
Adam, AdamW, clipping by total norm), started from a snapshot of the *real* weights and
optimiser state taken before the window's first step, with the hyperparameters' current values
(the truncated problem Unrolled differentiates), and against higher and torchopt (which no earlier
round's tests import) computing the same unrolled hypergradient.

What is new here (earlier rounds checked each ingredient alone, on one schedule):
- every hyperstep of a run whose hypersteps come every step, every K, irregularly or never, with
  K changed mid-run (growing and shrinking), start_episode() mid-window, and a resume into fresh
  objects mid-window, in reverse, checkpointed and forward mode: all against the hand-written
  reference at every hyperstep (the bookkeeping under test: snapshots, copies of the
  hyperparameters, promotions of re-run window starts, the loaded ring);
- learning rate, momentum and weight decay as OptimizerSettings against higher's differentiable
  SGD (override=) and torchopt's functional SGD;
- clipped Adam / AdamW with tuned lr and weight_decay against the hand-written clipped update,
  with irregular hypersteps, in all three modes;
- K = 50: reverse, checkpointed and forward mode against the reference (1e-10 relative);
- the ring's memory with checkpoint=True under irregular hypersteps, hypergradient() calls, K
  changes and a resume: every tensor the ring holds counted (not only the snapshots' weights).
"""

from __future__ import annotations

import copy
import io
import random
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _batches(n: int, seed: int = 1, scale: float = 1.0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, generator=g, dtype=DT), scale * torch.randn(6, 1, generator=g, dtype=DT))
        for _ in range(n)
    ]


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(DT)


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _relerr(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- SGD with momentum + tuned decay


class _SgdHp(nn.Module):
    """A learning rate and a momentum (OptimizerSettings) and a log weight decay the loss reads."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.lr = hg.hparams.LearningRate(opt)
        self.mom = hg.hparams.Momentum(opt)
        self.logwd = nn.Parameter(torch.tensor(-2.0, dtype=DT))

    def raws(self) -> list[Tensor]:
        return [self.lr.raw, self.mom.raw, self.logwd]


def _penalised(m: nn.Module, h: Any, b: Any) -> Tensor:
    return _mse(m, h, b) + h.logwd.exp() * sum((p**2).sum() for p in m.parameters()) / 2


def _sgd_reference(
    snap: tuple[list[Tensor], list[Tensor] | None], window: list[Any], raws: list[Tensor], val: Any
) -> list[Tensor]:
    """dL_V/d(raw lr, raw momentum, log decay) through the window's SGD-momentum steps written
    out (torch.optim.SGD: the buffer starts as the first gradient), from the real snapshot."""
    lr_raw, mom_raw, wd_raw = (r.detach().clone().requires_grad_(True) for r in raws)
    lr, mom, wd = lr_raw.exp()[0], torch.sigmoid(mom_raw)[0], wd_raw.exp()
    ws = [w.clone().requires_grad_(True) for w in snap[0]]
    bufs = None if snap[1] is None else [b.clone() for b in snap[1]]
    for x, y in window:
        W, B = ws
        loss = ((x @ W.t() + B - y) ** 2).mean() + wd * (W.pow(2).sum() + B.pow(2).sum()) / 2
        gs = torch.autograd.grad(loss, ws, create_graph=True)
        bufs = list(gs) if bufs is None else [mom * b + g for b, g in zip(bufs, gs, strict=True)]
        ws = [w - lr * b for w, b in zip(ws, bufs, strict=True)]
    W, B = ws
    out = ((val[0] @ W.t() + B - val[1]) ** 2).mean()
    gs = torch.autograd.grad(out, [lr_raw, mom_raw, wd_raw], allow_unused=True)
    return [
        torch.zeros_like(r) if g is None else g for g, r in zip(gs, (lr_raw, mom_raw, wd_raw), strict=True)
    ]


def _sgd_hopt(steps: int, mode: str, checkpoint: bool) -> hg.Unrolled:
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    h = _SgdHp(opt)
    return hg.Unrolled(
        model,
        h,
        _penalised,
        _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.5),
        steps=steps,
        mode=mode,
        checkpoint=checkpoint,
    )


def _resumed(hopt: hg.Unrolled) -> hg.Unrolled:
    """hopt's state_dict through torch.save / torch.load into fresh objects (other weights)."""
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    new = _sgd_hopt(hopt.steps, hopt.mode.value, hopt.checkpoint)
    new.load_state_dict(state)
    return new


_MODES = [("reverse", False), ("reverse", True), ("forward", False)]
_PATTERNS = {
    "every": set(range(1, 13)),
    "everyK": {3, 6, 9, 12},
    "irregular": {1, 2, 5, 6, 7, 11, 12},
    "sparse": {2, 7, 8, 12},
}


def _run_against_reference(
    pattern: set[int],
    steps: int,
    mode: str,
    checkpoint: bool,
    *,
    k_changes: dict[int, int] | None = None,
    episodes: set[int] = frozenset(),  # type: ignore[assignment]
    resumes: set[int] = frozenset(),  # type: ignore[assignment]
    n: int = 12,
) -> tuple[float, list[int]]:
    """Worst relative error of every hyperstep's hypergradient against :func:`_sgd_reference`
    from the real state before the window, and the windows used."""
    hopt = _sgd_hopt(steps, mode, checkpoint)
    data, val = _batches(n), _batches(1, seed=9)[0]
    hist: list[tuple[tuple[list[Tensor], list[Tensor] | None], Any]] = []
    worst, windows = 0.0, []
    for t in range(n):
        if k_changes and t in k_changes:
            hopt.steps = k_changes[t]
        if t in episodes:
            hopt.start_episode()
            hist.clear()
        if t in resumes:
            hopt = _resumed(hopt)
        params = list(hopt.model.parameters())
        st = hopt.inner_optimizer.state
        snap = (
            [p.detach().clone() for p in params],
            None if not st else [st[p]["momentum_buffer"].detach().clone() for p in params],
        )
        hist.append((snap, data[t]))
        hopt.step(data[t])
        if t + 1 in pattern:
            raws = [r.detach().clone() for r in hopt.hparams.raws()]
            info = hopt.hyper_step(val_batch=val)
            k = info.unrolled_steps
            assert k == min(hopt.steps, len(hist)) or (k_changes and k < hopt.steps)
            windows.append(k)
            want = _sgd_reference(hist[-k][0], [b for _, b in hist[-k:]], raws, val)
            for got, ref in zip((r.grad for r in hopt.hparams.raws()), want, strict=True):
                worst = max(worst, _relerr(got, ref) if ref.abs().max() > 0 else float(got.abs().max()))
    return worst, windows


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
@pytest.mark.parametrize("pattern", list(_PATTERNS))
def test_every_hyperstep_of_a_schedule_matches_the_written_out_window(
    pattern: str, mode: str, checkpoint: bool
) -> None:
    """Hypersteps every step / every K / irregular / sparse, K = 3 and K = 20 (longer than the
    run: the whole episode), each hyperstep against the hand-written window from the real
    state before it (momentum buffer created inside or before the window)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (momentum at an episode's 1st step)
        for steps in (3, 20) if mode == "reverse" else (3,):  # (forward: 3 replays per hyperstep)
            worst, _ = _run_against_reference(
                _PATTERNS[pattern], steps, mode, checkpoint, n=12 if steps == 3 else 9
            )
            assert worst < 1e-10, (steps, worst)


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
def test_window_changed_mid_run_episode_restarts_and_resumes_match_the_written_out_window(
    mode: str, checkpoint: bool
) -> None:
    """K grown and shrunk mid-run (the steps dropped under the smaller K are gone: the window
    used is checked against the reference of exactly that many steps), start_episode() between
    hypersteps, and resumes into fresh objects at several points of a window."""
    pat = _PATTERNS["irregular"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)
        worst, windows = _run_against_reference(pat, 2, mode, checkpoint, k_changes={4: 5, 8: 1, 9: 4})
        assert worst < 1e-10
        # K = 5 from step 5: the window takes the steps the ring still holds (4, then 5); K = 1
        # at step 9 drops all but one, K = 4 at step 10 grows again as steps come (3, then 4)
        assert windows == [1, 2, 4, 5, 5, 3, 4], windows
        worst, windows = _run_against_reference(pat, 3, mode, checkpoint, episodes={2, 5, 7})
        assert worst < 1e-10
        assert windows == [1, 2, 3, 1, 2, 3, 3], windows
        for at in (1, 4, 6) if mode == "forward" else (1, 3, 4, 6, 9):
            worst, _ = _run_against_reference(pat | {4}, 3, mode, checkpoint, resumes={at})
            assert worst < 1e-10, at


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
def test_a_rollback_into_the_same_object_replays_the_restored_window(mode: str, checkpoint: bool) -> None:
    """A run rolled back mid-run to an earlier checkpoint of itself (``hopt.load_state_dict`` of a
    deep copy taken 4 steps and some hypersteps before, as after a divergence), then trained on
    over other batches: every hyperstep against the reference built from the restored history
    (earlier tests resumed into fresh objects only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)
        for pattern in _PATTERNS.values():
            hopt = _sgd_hopt(3, mode, checkpoint)
            data, val = _batches(14), _batches(1, seed=9)[0]
            hist: list[Any] = []
            saved: tuple[dict[str, Any], list[Any]] | None = None
            worst = 0.0
            for i, t in enumerate([*range(8), *range(4, 14)]):
                if i == 4:
                    saved = (copy.deepcopy(hopt.state_dict()), list(hist))
                if i == 8:
                    assert saved is not None
                    hopt.load_state_dict(saved[0])
                    hist = list(saved[1])
                params = list(hopt.model.parameters())
                st = hopt.inner_optimizer.state
                snap = (
                    [p.detach().clone() for p in params],
                    None if not st else [st[p]["momentum_buffer"].detach().clone() for p in params],
                )
                hist.append((snap, data[t]))
                hopt.step(data[t])
                if i + 1 in pattern:
                    raws = [r.detach().clone() for r in hopt.hparams.raws()]
                    k = hopt.hyper_step(val_batch=val).unrolled_steps
                    want = _sgd_reference(hist[-k][0], [b for _, b in hist[-k:]], raws, val)
                    for got, ref in zip((r.grad for r in hopt.hparams.raws()), want, strict=True):
                        if ref.abs().max() > 0:
                            worst = max(worst, _relerr(got, ref))
            assert worst < 1e-10, worst


# ---------------------------------------------------------------- peers: higher and torchopt


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


class _Settings(nn.Module):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.lr = hg.hparams.LearningRate(opt)
        self.mom = hg.hparams.Momentum(opt)
        self.wd = hg.hparams.OptimizerSetting(opt, "weight_decay", "positive")


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
def test_lr_momentum_weight_decay_settings_match_higher_and_torchopt(mode: str, checkpoint: bool) -> None:
    """The raw settings' hypergradients (lr = e^r, momentum = sigmoid(r), weight decay = e^r)
    through 6 SGD steps of a tanh MLP equal higher's (DifferentiableSGD with the three as
    override tensors) and torchopt's (functional sgd with a tensor lr) by the chain rule."""
    higher = pytest.importorskip("higher")
    torchopt = pytest.importorskip("torchopt")
    K, lr0, m0, wd0 = 6, 0.1, 0.8, 0.05
    data, val = _batches(K, scale=1.0), _batches(1, seed=9)[0]

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=m0, weight_decay=wd0)
    h = _Settings(opt)
    hopt = hg.Unrolled(
        model, h, _mse, _mse, inner_optimizer=opt, outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.0),
        steps=K, mode=mode, checkpoint=checkpoint,
    )  # fmt: skip
    for b in data:
        hopt.step(b)
    got = dict(zip([n for n, _ in h.named_parameters()], hopt.hypergradient(val_batch=val)[0], strict=True))

    model = _mlp()
    lr, mo, wd = (torch.tensor(v, dtype=DT, requires_grad=True) for v in (lr0, m0, wd0))
    inner = torch.optim.SGD(model.parameters(), lr=lr0, momentum=m0, weight_decay=wd0)
    override = {"lr": [lr], "momentum": [mo], "weight_decay": [wd]}
    with higher.innerloop_ctx(model, inner, copy_initial_weights=True, override=override) as (fm, dopt):
        for b in data:
            dopt.step(_mse(fm, None, b))
        g_lr, g_mo, g_wd = torch.autograd.grad(_mse(fm, None, val), [lr, mo, wd])
    assert _relerr(got["lr.raw"][0], g_lr * lr0) < 1e-10
    assert _relerr(got["mom.raw"][0], g_mo * m0 * (1 - m0)) < 1e-10
    assert _relerr(got["wd.raw"][0], g_wd * wd0) < 1e-10

    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    lr_t = torch.tensor(lr0, dtype=DT, requires_grad=True)

    def loss(ps: tuple[Tensor, ...], b: Any) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (b[0],))
        return ((out - b[1]) ** 2).mean()

    sgd = torchopt.sgd(lr=lr_t, momentum=m0, weight_decay=wd0)
    ps = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    state = sgd.init(ps)
    for b in data:
        gs = torch.autograd.grad(loss(ps, b), ps, create_graph=True)
        upd, state = sgd.update(gs, state, params=ps, inplace=False)
        ps = torchopt.apply_updates(ps, upd, inplace=False)
    (g_lr2,) = torch.autograd.grad(loss(ps, val), [lr_t])
    assert _relerr(got["lr.raw"][0], g_lr2 * lr0) < 1e-10


# ---------------------------------------------------------------- clipped Adam / AdamW


class _AdamHp(nn.Module):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.lr = hg.hparams.LearningRate(opt)
        self.wd = hg.hparams.OptimizerSetting(opt, "weight_decay", "positive")


def _adam_reference(
    kind: str, snap: tuple[list[Tensor], list[dict[str, Tensor]] | None], window: list[Any],
    raws: list[Tensor], val: Any, clip: float | None,
) -> list[Tensor]:  # fmt: skip
    """torch.optim.Adam / AdamW written out, after clip_grad_norm_'s scaling (differentiated
    through the norm, as the replay differentiates the real step's clipping)."""
    lr_raw, wd_raw = (r.detach().clone().requires_grad_(True) for r in raws)
    lr, wd = lr_raw.exp()[0], wd_raw.exp()[0]
    ws = [w.clone().requires_grad_(True) for w in snap[0]]
    st = snap[1]
    m = [s["exp_avg"].clone() for s in st] if st else [torch.zeros_like(w) for w in ws]
    v = [s["exp_avg_sq"].clone() for s in st] if st else [torch.zeros_like(w) for w in ws]
    t = int(st[0]["step"]) if st else 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for x, y in window:
        W, B = ws
        gs = list(torch.autograd.grad(((x @ W.t() + B - y) ** 2).mean(), ws, create_graph=True))
        if clip is not None:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            gs = [g * coef for g in gs]
        t += 1
        new = []
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if kind == "adam":
                g = g + wd * w
            else:
                w = w * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = v[i].sqrt() / (1 - b2**t) ** 0.5 + eps
            new.append(w - (lr / (1 - b1**t)) * m[i] / denom)
        ws = new
    W, B = ws
    out = ((val[0] @ W.t() + B - val[1]) ** 2).mean()
    return list(torch.autograd.grad(out, [lr_raw, wd_raw]))


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("clip", [0.5, None])
def test_clipped_adam_settings_match_the_written_out_update(
    kind: str, clip: float | None, mode: str, checkpoint: bool
) -> None:
    """step(batch, max_grad_norm=0.5) binds at every step here (targets scaled by 3); lr and
    weight_decay tuned; hypersteps at irregular intervals, each against the written-out window.
    (1e-8: the decay's hypergradient through Adam's first step is ~1e-10, sign-like, whose
    rounding makes the relative error of the pair ~6e-10 without clipping.)"""
    model = _linear()
    opt = (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(
        model.parameters(), lr=0.05, weight_decay=0.1
    )
    h = _AdamHp(opt)
    hopt = hg.Unrolled(
        model, h, _mse, _mse, inner_optimizer=opt, outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.5),
        steps=3, mode=mode, checkpoint=checkpoint,
    )  # fmt: skip
    data, val = _batches(10, scale=3.0), _batches(1, seed=9)[0]
    hist: list[Any] = []
    for t, b in enumerate(data):
        st = opt.state
        params = list(model.parameters())
        snap = (
            [p.detach().clone() for p in params],
            None if not st else [{k: v.detach().clone() for k, v in st[p].items()} for p in params],
        )
        if clip is not None and t == 0:  # the clipping binds (else this test would not test it)
            g = torch.autograd.grad(_mse(model, None, b), params)
            assert float(torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))) > 2 * clip
        hist.append((snap, b))
        hopt.step(b, max_grad_norm=clip)
        if t + 1 in {1, 2, 4, 5, 9, 10}:
            raws = [h.lr.raw.detach().clone(), h.wd.raw.detach().clone()]
            k = hopt.hyper_step(val_batch=val).unrolled_steps
            want = _adam_reference(kind, hist[-k][0], [x for _, x in hist[-k:]], raws, val, clip)
            got = torch.cat([h.lr.raw.grad, h.wd.raw.grad])
            ref = torch.cat([w.reshape(1) for w in want])
            assert float((got - ref).abs().max()) <= 1e-8 * float(ref.abs().max()), (t, got, ref)


# ---------------------------------------------------------------- long windows


@pytest.mark.parametrize(("mode", "checkpoint"), _MODES)
def test_a_window_of_50_steps_matches_the_written_out_window(mode: str, checkpoint: bool) -> None:
    """K = 50 of 55 steps (the window starts after a momentum buffer was built up), one
    hyperstep: reverse, checkpointed and forward mode each within 1e-10 of the reference."""
    hopt = _sgd_hopt(50, mode, checkpoint)
    data, val = _batches(55), _batches(1, seed=9)[0]
    snap = None
    for t, b in enumerate(data):
        if t == 5:
            ps = list(hopt.model.parameters())
            st = hopt.inner_optimizer.state
            snap = ([p.detach().clone() for p in ps], [st[p]["momentum_buffer"].clone() for p in ps])
        hopt.step(b)
    assert snap is not None
    raws = [r.detach().clone() for r in hopt.hparams.raws()]
    got, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 50
    want = _sgd_reference(snap, data[5:], raws, val)
    by_name = dict(zip([n for n, _ in hopt.hparams.named_parameters()], got, strict=True))
    for name, ref in zip(("lr.raw", "mom.raw", "logwd"), want, strict=True):
        assert _relerr(by_name[name], ref) < 1e-10, name


# ---------------------------------------------------------------- memory of the ring


def _ring_bytes(hopt: hg.Unrolled) -> int:
    """Bytes of every distinct tensor storage the ring holds (batches, snapshots, copies)."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, Tensor):
            key = obj.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return obj.untyped_storage().nbytes()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        if hasattr(obj, "__dataclass_fields__"):
            return sum(walk(getattr(obj, f)) for f in obj.__dataclass_fields__)
        return 0

    return sum(walk(r) for r in hopt._records)


def test_checkpointed_ring_memory_stays_bounded_under_irregular_hypersteps_and_resumes() -> None:
    """checkpoint=True with hypersteps at random intervals, hypergradient() calls that commit
    nothing, K changed, and a resume: between hypersteps the ring never holds more than two
    full snapshots (weights and momentum: 2 x 2 weight-sizes), the batches and RNG states of
    2K - 1 steps, and 2K copies of the (few) hyperparameters, counted over every tensor it
    holds. (Earlier rounds bounded the snapshots' weights and states in plain reverse mode.)"""
    rng = random.Random(0)
    K = 5
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    h = _SgdHp(opt)
    hopt = hg.Unrolled(
        model, h, _penalised, _mse, inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.01), steps=K, checkpoint=True,
    )  # fmt: skip
    data, val = _batches(60), _batches(1, seed=9)[0]
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bbytes = sum(t.numel() * t.element_size() for t in data[0])
    hbytes = sum(p.numel() * p.element_size() for p in h.parameters())
    rbytes = torch.get_rng_state().numel()  # (each step's RNG state, to replay dropout)
    for t, b in enumerate(data):
        if t == 30:
            hopt.steps = K = 3
        if t == 40:
            state = copy.deepcopy(hopt.state_dict())
            hopt.load_state_dict(state)
        hopt.step(b)
        anchors = [r.anchor for r in hopt._records if r.anchor is not None]
        assert len(anchors) <= 2
        bound = (
            2 * (2 * wbytes + hbytes)
            + (2 * K - 1) * (bbytes + rbytes)
            + (2 * K) * hbytes
            + 64 * len(hopt._records)
        )
        assert _ring_bytes(hopt) <= bound, (t, _ring_bytes(hopt), bound)
        if rng.random() < 0.4:
            hopt.hyper_step(val_batch=val)
        elif rng.random() < 0.3:
            hopt.hypergradient(val_batch=val)


# ---------------------------------------------------------------- unrolled_hypergradient, complex


def test_forward_mode_gives_a_complex_hyperparameter_the_gradient_reverse_mode_gives() -> None:
    """unrolled_hypergradient accepts complex hyperparameters (reverse mode returns torch's
    dL/dRe + i dL/dIm); forward mode must return the same, checked here against central
    differences along the real and the imaginary axis of each entry (3 unrolled steps of a
    complex linear recursion, float64)."""
    lam = torch.tensor([0.5 + 0.3j, 0.1 - 0.2j], dtype=torch.complex128, requires_grad=True)

    def outer(h: Any) -> Tensor:
        w = torch.zeros(2, dtype=torch.complex128)
        for _ in range(3):
            w = w - 0.5 * (w - h[0]) * h[0].conj()
        return (w.abs() ** 2).sum() + (3 * w.real).sum() - (w.imag**3).sum()

    eps = 1e-6
    fd = torch.zeros(2, dtype=torch.complex128)
    with torch.no_grad():
        for j in range(2):
            for unit in (1, 1j):
                e = torch.zeros(2, dtype=torch.complex128)
                e[j] = eps * unit
                d = (outer([lam + e]) - outer([lam - e])) / (2 * eps)
                fd[j] += d if unit == 1 else 1j * d
    (g_rev,), _ = hg.unrolled_hypergradient(outer, [lam])
    assert float((g_rev - fd).abs().max()) < 1e-8  # (reverse mode: right)
    assert float(fd.imag.abs().min()) > 0.5  # (the imaginary parts are far from 0)
    (g_fwd,), _ = hg.unrolled_hypergradient(outer, [lam], mode="forward")
    assert float((g_fwd - g_rev).abs().max()) < 1e-10 * float(g_rev.abs().max())


# ---------------------------------------------------------------- K from a sweep


def test_a_numpy_integer_window_is_taken_as_an_int() -> None:
    """A NumPy integer K, in the constructor and the ``steps`` setter, is the same K: same
    window, same hypergradient as the Python int, and ``hopt.steps`` an ``int``."""
    np = pytest.importorskip("numpy")
    got = []
    for k in (3, np.int64(3)):
        hopt = _sgd_hopt(2, "reverse", False)
        hopt.steps = k
        hopt2 = hg.Unrolled(
            hopt.model, hopt.hparams, _penalised, _mse, inner_optimizer=hopt.inner_optimizer,
            outer_optimizer=hopt.outer_optimizer, steps=k,
        )  # fmt: skip
        assert type(hopt.steps) is int and type(hopt2.steps) is int
        for b in _batches(5):
            hopt2.step(b)
        g, info = hopt2.hypergradient(val_batch=_batches(1, seed=9)[0])
        assert info.unrolled_steps == 3
        got.append(torch.cat([x.reshape(-1) for x in g]))
    assert torch.equal(got[0], got[1])
    with pytest.raises(ValueError, match="need an int >= 1"):
        _sgd_hopt(np.int64(0), "reverse", False)  # type: ignore[arg-type]
