"""``hg.Unrolled`` against what real training scripts do between and around steps: gradient
clipping that clips only some steps (against central differences of real float64 training),
weights edited outside ``step()`` (an EMA written back, a clamp), optimiser step hooks, windows
longer than the history, hypersteps at every step, two ``Unrolled`` on one model, the ring's
memory between hypersteps, and ``checkpoint=True`` against plain reverse mode."""

from __future__ import annotations

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
        (torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _make(model: nn.Module, log_wd: float = -2.0, steps: int = 4, **kw: Any) -> tuple[hg.Unrolled, Any]:
    hp = _Decay(log_wd)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    return hg.Unrolled(
        model, hp, _train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=steps, **kw
    ), hp


class _Decay(nn.Module):
    def __init__(self, v: float) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.tensor(v, dtype=DT))

    def penalty(self, m: nn.Module) -> torch.Tensor:
        return self.raw.exp() * sum((p**2).sum() for p in m.parameters()) / 2


def _real(v: float, data: Any, clip: list[float | None], val: Any) -> float:
    m = _model()
    hp = _Decay(v)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5)
    norms: list[float] = []
    for b, c in zip(data, clip, strict=True):
        opt.zero_grad()
        _train(m, hp, b).backward()
        if c is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), c)))
        opt.step()
    _NORMS[:] = norms
    with torch.no_grad():
        return float(_val(m, hp, val))


_NORMS: list[float] = []


@pytest.mark.parametrize("kw", [{}, {"mode": "forward"}, {"checkpoint": True}])
def test_clipping_that_changes_per_step_matches_central_differences(kw: dict[str, Any]) -> None:
    data, val = _data(4), _data(1, seed=9)[0]
    # norms of the first steps are ~1: 0.3 clips, 50 does not, None is no clipping
    clip: list[float | None] = [0.3, 50.0, None, 0.2]
    model = _model()
    hopt, hp = _make(model, steps=4, **kw)
    for b, c in zip(data, clip, strict=True):
        hopt.step(b, max_grad_norm=c) if c is not None else hopt.step(b)
    hopt.hyper_step(val_batch=val)
    got = float(hp.raw.grad)
    e = 1e-6
    fd = (_real(-2 + e, data, clip, val) - _real(-2 - e, data, clip, val)) / (2 * e)
    assert _NORMS[0] > 0.3 and _NORMS[1] < 50.0 and _NORMS[2] > 0.2  # clipped, not, clipped
    assert got == pytest.approx(fd, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("edit", ["ema", "clamp"])
def test_weights_edited_outside_step_are_detected(edit: str) -> None:
    model = _model()
    hopt, _ = _make(model)
    ema = [p.detach().clone() for p in model.parameters()]
    data = _data(3)
    hopt.step(data[0])
    with torch.no_grad():
        for p, a in zip(model.parameters(), ema, strict=True):
            if edit == "ema":
                p.copy_(0.9 * a + 0.1 * p)
            else:
                p.clamp_(-0.1, 0.1)
    with pytest.warns(hg.ReplayWarning):
        hopt.step(data[1])


def test_optimizer_step_hook_is_named() -> None:
    model = _model()
    hopt, _ = _make(model)
    hopt.inner_optimizer.register_step_post_hook(lambda opt, a, k: None)
    with pytest.warns(hg.ReplayWarning, match="hook"):
        hopt.step(_data(1)[0])


def test_window_longer_than_history_and_hypersteps_every_step() -> None:
    data, val = _data(3), _data(1, seed=9)[0]
    model = _model()
    hopt, hp = _make(model, steps=10)
    hopt.step(data[0])
    hopt.step(data[1])
    info = hopt.hyper_step(val_batch=val)
    e = 1e-6
    clip: list[float | None] = [None, None]
    fd = (_real(-2 + e, data[:2], clip, val) - _real(-2 - e, data[:2], clip, val)) / (2 * e)
    assert float(hp.raw.grad) == pytest.approx(fd, rel=1e-6)
    assert info.unrolled_steps == 2 if hasattr(info, "unrolled_steps") else True


def test_checkpoint_equals_reverse() -> None:
    data, val = _data(5), _data(1, seed=9)[0]
    out = []
    for ck in (False, True):
        model = _model()
        hopt, hp = _make(model, steps=3, checkpoint=ck)
        for b in data:
            hopt.step(b, max_grad_norm=0.5)
        hopt.hyper_step(val_batch=val)
        out.append(float(hp.raw.grad))
    assert out[0] == pytest.approx(out[1], rel=1e-12, abs=1e-15)


def test_two_unrolled_on_one_model() -> None:
    data, val = _data(2), _data(1, seed=9)[0]
    model = _model()
    a, ha = _make(model, steps=2)
    hb = _Decay(-2.0)
    b = hg.Unrolled(
        model,
        hb,
        _train,
        _val,
        inner_optimizer=a.inner_optimizer,
        outer_optimizer=torch.optim.SGD(hb.parameters(), lr=0.0),
        steps=2,
    )
    a.step(data[0])
    b.step(data[1])  # b's ring was empty: nothing of its own to invalidate
    with pytest.warns(hg.ReplayWarning), pytest.raises(ValueError, match="none has been taken"):
        a.hyper_step(val_batch=val)  # a's ring does not hold b's step: emptied, said, refused


def _storage_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        if s.data_ptr() in seen:
            return 0
        seen.add(s.data_ptr())
        return s.nbytes()
    if isinstance(obj, dict):
        return sum(_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_storage_bytes(v, seen) for v in obj)
    return 0


@pytest.mark.parametrize("every", [1, 2, 3, 4, 7])
def test_ring_memory_between_hypersteps(every: int) -> None:
    """At most two weight snapshots in the ring whenever hypersteps come (was K = 4 with a
    hyperstep at every step: one full snapshot per change of the hyperparameters)."""
    data, val = _data(16), _data(1, seed=9)[0]
    model = _model()
    K = 4
    hopt, _ = _make(model, steps=K)
    hopt.outer_optimizer.param_groups[0]["lr"] = 0.1
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for i, b in enumerate(data):
        hopt.step(b)
        anchors = [r.anchor for r in hopt._records if r.anchor is not None]
        assert _storage_bytes([a.weights for a in anchors], set()) <= 2 * nbytes
        assert _storage_bytes([a.states for a in anchors], set()) <= 2 * nbytes  # momentum buffers
        if (i + 1) % every == 0:
            hopt.hyper_step(val_batch=val)


def test_steps_before_the_window_rerun_with_the_hyperparameters_they_used() -> None:
    """Hypersteps at every step move the hyperparameters between full snapshots: the steps
    re-run up to the window use the values of their time (the replay ends on the real weights)."""
    data, val = _data(9), _data(1, seed=9)[0]
    model = _model()
    hopt, hp = _make(model, steps=3)
    hopt.outer_optimizer.param_groups[0]["lr"] = 5.0
    for b in data[:6]:
        hopt.step(b)
        hopt.hyper_step(val_batch=val)
    assert float(hp.raw.detach()) != -2.0
    hopt.outer_optimizer.param_groups[0]["lr"] = 0.0
    for b in data[6:]:
        hopt.step(b)
        hopt.hyper_step(val_batch=val)
    assert any(r.anchor is None and r.hparams is not None for r in hopt._records)
    for r, p in zip(hopt.replayed_weights(), model.parameters(), strict=True):
        torch.testing.assert_close(r, p.detach(), rtol=0, atol=1e-14)
    sd = hopt.state_dict()  # the hyperparameter copies survive a resume
    model2 = _model()
    hopt2, hp2 = _make(model2, steps=3)
    model2.load_state_dict(model.state_dict())
    hp2.load_state_dict(hp.state_dict())
    hopt2.load_state_dict(sd)
    for r, p in zip(hopt2.replayed_weights(), model.parameters(), strict=True):
        torch.testing.assert_close(r, p.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("every", "mode"), [(1, "reverse"), (2, "reverse"), (1, "forward"), (3, "reverse")])
def test_overlapping_windows_equal_fresh_episodes_from_the_real_window_start(every: int, mode: str) -> None:
    """Hypersteps more often than every K steps slide the window over steps taken with older
    hyperparameters: the ring keeps two snapshots and hyperparameter copies, re-runs to the
    window's start and keeps it. Each hypergradient must equal that of a fresh Unrolled run from
    the real weights, optimiser state and RNG at the window's start, with the current
    hyperparameters (dropout, BatchNorm, Adam, per-weight decay, float64)."""
    import copy

    K = 3

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
        ).to(DT)

    def hyper(model: nn.Module) -> Any:
        return hg.hparams.WeightDecay(model, per="parameter" if mode == "reverse" else "layer", init=1e-2).to(
            DT
        )

    def make(model: nn.Module, hp: Any, inner: torch.optim.Optimizer) -> hg.Unrolled:
        outer = torch.optim.Adam(hp.parameters(), lr=0.3)
        return hg.Unrolled(
            model, hp, _train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=K, mode=mode
        )

    data, val = _data(10), _data(1, seed=9)[0]
    model = build()
    hp = hyper(model)
    hopt = make(model, hp, torch.optim.Adam(model.parameters(), lr=0.05))
    saved = []  # (model, inner optimiser, RNG) before each real step
    checked = 0
    for i, b in enumerate(data):
        saved.append(
            (
                copy.deepcopy(model.state_dict()),
                copy.deepcopy(hopt.inner_optimizer.state_dict()),
                torch.get_rng_state(),
            )
        )
        hopt.step(b)
        if (i + 1) % every:
            continue
        rng = torch.get_rng_state()  # (the validation loss draws dropout masks too)
        grads, _ = hopt.hypergradient(val_batch=val)
        if i + 1 >= K:  # a full window: compare with a fresh episode from its start
            m2 = build()
            m2.load_state_dict(saved[i + 1 - K][0])
            hp2 = hyper(m2)
            hp2.load_state_dict(hp.state_dict())
            inner2 = torch.optim.Adam(m2.parameters(), lr=0.05)
            inner2.load_state_dict(saved[i + 1 - K][1])
            fresh = make(m2, hp2, inner2)
            for j in range(i + 1 - K, i + 1):
                torch.set_rng_state(saved[j][2])
                fresh.step(data[j])
            after = torch.get_rng_state()
            torch.set_rng_state(rng)
            ref, _ = fresh.hypergradient(val_batch=val)
            torch.set_rng_state(after)
            for g, r in zip(grads, ref, strict=True):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
            checked += 1
        hopt.hyper_step(val_batch=val)
        anchors = [r for r in hopt._records if r.anchor is not None]
        assert len(anchors) <= 2 and len(hopt._records) <= 2 * K
    assert checked == sum((i + 1) % every == 0 and i + 1 >= K for i in range(10))


@pytest.mark.parametrize("manual", [False, True])
def test_overlapping_windows_resume_bit_exactly_and_a_users_fused_outer_step_equals_hyper_step(
    manual: bool,
) -> None:
    """Hypersteps after every step (hyperparameter copies between two snapshots): a checkpoint
    taken at any step, loaded with weights_only=True into objects built from another seed,
    continues bit-exactly; ``hypergradient()`` followed by the user's own fused outer step
    (no promotion of the window start) follows the same trajectory as ``hyper_step``."""
    import io

    def build(seed: int) -> tuple[Any, hg.Unrolled]:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(
            DT
        )
        hp = hg.hparams.WeightDecay(m, per="parameter", init=1e-2).to(DT)
        inner = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
        outer = torch.optim.Adam(hp.parameters(), lr=0.1, fused=True)
        return hp, hg.Unrolled(m, hp, _train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=4)

    data, val = _data(12), _data(1, seed=9)[0]

    def run(stop: int | None, manual: bool) -> torch.Tensor:
        torch.manual_seed(5)
        hp, h = build(0)
        out = []
        for i, b in enumerate(data):
            if i == stop:
                buf = io.BytesIO()
                torch.save({"h": h.state_dict(), "rng": torch.get_rng_state()}, buf)
                buf.seek(0)
                hp, h = build(3)
                sd = torch.load(buf, weights_only=True)
                h.load_state_dict(sd["h"])
                torch.set_rng_state(sd["rng"])
            h.step(b)
            if manual:
                grads, _ = h.hypergradient(val_batch=val)
                for p, g in zip(hp.parameters(), grads, strict=True):
                    p.grad = g
                h.outer_optimizer.step()
            else:
                h.hyper_step(val_batch=val)
            assert sum(r.anchor is not None for r in h._records) <= 2 and len(h._records) <= 8
            out.append(torch.cat([p.detach().reshape(-1) for p in hp.parameters()]))
        return torch.stack(out)

    straight = run(None, manual)
    assert torch.equal(straight, run(None, not manual))
    assert float((straight[-1] - straight[0]).abs().max()) > 1e-3
    for stop in (3, 6, 9):
        assert torch.equal(straight, run(stop, manual)), stop
