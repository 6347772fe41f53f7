"""Round 25: Unrolled under unusual schedules and training-loop idioms (helper "unrolled").

Every hypergradient here is checked in float64 against central finite differences of the real
training (a plain ``torch.optim`` loop written in the test) or against an independent
autograd reference through the window's steps written out by hand.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _batches(n: int, seed: int = 1, rows: int = 6) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, 3, generator=g, dtype=DT), torch.randn(rows, 1, generator=g, dtype=DT))
        for _ in range(n)
    ]


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


class _LogDecay(nn.Module):
    """One log weight decay, applied by the loss itself (no WeightDecay shortcut)."""

    def __init__(self, init: float = -2.0) -> None:
        super().__init__()
        self.log = nn.Parameter(torch.tensor(init, dtype=DT))

    def penalty(self, m: nn.Module) -> Tensor:
        return 0.5 * self.log.exp() * sum((p**2).sum() for p in m.parameters())


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(DT)


# ------------------------------------------------------------- gradient accumulation, half by hand


def _backward_all_but_last(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Gradient accumulation over micro-batches written half by hand: backward on every
    micro-batch but the last, whose loss is returned with its graph (step() runs its backward)."""
    n = len(b)
    for x, y in b[:-1]:
        ((((m(x) - y) ** 2).mean() + h.penalty(m)) / n).backward()
    x, y = b[-1]
    return (((m(x) - y) ** 2).mean() + h.penalty(m)) / n


@pytest.mark.parametrize("steps", [1, 2])
def test_train_loss_mixing_its_own_backward_with_a_returned_graph_is_refused(steps: int) -> None:
    """Earlier rounds refused a train_loss that runs *every* backward itself and returns a detached
    total (test_round17_unrolled); one that returns the last micro-batch's loss with its graph was
    accepted: the real step trained on all micro-batches (its own backward accumulating into the
    weights' .grad), and the replay differentiated the last one only (and ran the others' backward
    inside the hyperstep, writing into the hyperparameter's .grad from hypergradient())."""
    model, hp = _linear(), _LogDecay()
    hopt = hg.Unrolled(
        model, hp, _backward_all_but_last, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=steps,
    )  # fmt: skip
    micro = _batches(2)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"backward\(\) itself"):
        hopt.step(micro)
    # nothing changed by the refused step
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0, strict=True))
    assert all(p.grad is None for p in model.parameters()) and hp.log.grad is None


# ------------------------------------------------------------------ randomised irregular schedules


class _Mlp(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _schedule_hopt(seed: int, mode: str, checkpoint: bool, steps: int) -> hg.Unrolled:
    torch.manual_seed(seed)
    model = _Mlp().to(DT)
    inner = torch.optim.Adam(model.parameters(), lr=0.05)
    hp = nn.ModuleDict(
        {
            "lr": hg.hparams.LearningRate(inner, relative=True, init=1.0),
            "wd": hg.hparams.WeightDecay(model, per="layer", init=0.05),
        }
    ).to(DT)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h["wd"].penalty(m)

    return hg.Unrolled(
        model, hp, train, _mse, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.3), steps=steps, mode=mode,
        checkpoint=checkpoint, on_nonfinite="skip",
    )  # fmt: skip


def _adam_window_reference(
    hp: nn.Module, hist: list[Any], k: int, val: Any, raws: list[Tensor]
) -> list[Tensor]:
    """dL_V/d(raw lr multiplier, raw decays) through the last k real steps written out (torch's
    Adam, clipping by total norm, the state cleared before a step where the run cleared it),
    from the real weights and Adam state before the window, with the hyperparameters ``raws``."""
    lr_raw, *wd_raws = (r.detach().clone().requires_grad_(True) for r in raws)
    mult, d = lr_raw.exp()[0], [r.exp() for r in wd_raws]
    ws = [w.clone().requires_grad_(True) for w in hist[-k][0]]
    st = [dict(s) for s in hist[-k][1]]
    for j, (_, _, b, clip, base, cleared) in enumerate(hist[-k:]):
        if cleared and j:
            st = [{} for _ in st]
        w1, b1, w2, b2 = ws
        out = torch.tanh(b[0] @ w1.t() + b1) @ w2.t() + b2
        loss = ((out - b[1]) ** 2).mean() + 0.5 * d[0] * (w1.pow(2).sum() + b1.pow(2).sum())
        loss = loss + 0.5 * d[1] * (w2.pow(2).sum() + b2.pow(2).sum())
        gs = list(torch.autograd.grad(loss, ws, create_graph=True))
        if clip is not None:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
            gs = [g * torch.clamp(clip / (total + 1e-6), max=1.0) for g in gs]
        new = []
        for w, g, s in zip(ws, gs, st, strict=True):
            t = s.get("step", 0) + 1
            m = s.get("exp_avg", torch.zeros_like(w)) * 0.9 + 0.1 * g
            v = s.get("exp_avg_sq", torch.zeros_like(w)) * 0.999 + 0.001 * g * g
            denom = v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8
            new.append(w - base * mult / (1 - 0.9**t) * m / denom)
            s.update(step=t, exp_avg=m, exp_avg_sq=v)
        ws = new
    w1, b1, w2, b2 = ws
    loss = ((torch.tanh(val[0] @ w1.t() + b1) @ w2.t() + b2 - val[1]) ** 2).mean()
    return list(torch.autograd.grad(loss, [lr_raw, *wd_raws]))


def _real_state(hopt: hg.Unrolled) -> tuple[list[Tensor], list[dict[str, Any]]]:
    ps = list(hopt.model.parameters())
    st = []
    for p in ps:
        s = hopt.inner_optimizer.state.get(p, {})
        st.append({k: int(v) if k == "step" else v.detach().clone() for k, v in s.items()})
    return [p.detach().clone() for p in ps], st


@pytest.mark.parametrize(("mode", "checkpoint", "seeds"), [
    ("reverse", False, (1, 3, 5)), ("reverse", True, (1, 3)), ("forward", False, (3,)),
])  # fmt: skip
def test_random_schedules_with_resets_refused_steps_and_reloads_match_the_written_out_window(
    mode: str, checkpoint: bool, seeds: tuple[int, ...]
) -> None:
    """Not covered before in one run (round 22 checked fixed patterns with SGD): random
    interleavings of steps (some clipped), hypersteps, hypergradient() calls, outer steps taken
    by hand on hypergradient()'s output, K changed, start_episode(), Adam's state cleared inside
    a window, NaN batches refused with on_nonfinite='skip' inside a window, a relative learning
    rate whose base lr changes every step, and in-place reloads of hopt.state_dict(). Every
    hypergradient against the window written out from the real state before it, and the real
    weights and Adam state left bit-identical by every hypergradient computation."""
    import copy
    import random

    for seed in seeds:
        rnd = random.Random(seed)
        hopt = _schedule_hopt(seed, mode, checkpoint, rnd.randint(1, 5))
        hp = hopt.hparams
        g = torch.Generator().manual_seed(seed)
        val = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
        hist: list[Any] = []
        checked = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (NonFiniteWarning, DisconnectedWarning at a 1st step)
            for _ in range(36):
                r = rnd.random()
                if r < 0.5 or not hist:
                    b = (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT))
                    clip = rnd.choice([None, None, 0.3])
                    base = rnd.choice([0.05, 0.03, 0.08])
                    hopt.inner_optimizer.param_groups[0]["lr"] = base
                    if rnd.random() < 0.1:
                        hopt.step((b[0] * float("nan"), b[1]))  # refused, skipped
                    cleared = rnd.random() < 0.06
                    if cleared:
                        hopt.inner_optimizer.state.clear()
                    w, st = _real_state(hopt)
                    hist.append((w, st, b, clip, base, cleared))
                    hopt.step(b, max_grad_norm=clip)
                    continue
                if r < 0.8:
                    kind = "hyper_step" if r < 0.65 else "hypergradient" if r < 0.72 else "by hand"
                elif r < 0.88:
                    hopt.steps = rnd.randint(1, 6)
                    continue
                elif r < 0.94:
                    hopt.load_state_dict(copy.deepcopy(hopt.state_dict()))
                    continue
                else:
                    hopt.start_episode()
                    hist.clear()
                    continue
                before = _real_state(hopt)
                raws = [p.detach().clone() for p in hp.parameters()]
                if kind == "hyper_step":
                    info = hopt.hyper_step(val_batch=val)
                    got = [p.grad.clone() for p in hp.parameters()]
                else:
                    grads, info = hopt.hypergradient(val_batch=val)
                    got = list(grads)
                want = _adam_window_reference(hp, hist, info.unrolled_steps, val, raws)
                for a, b_ in zip(got, want, strict=True):
                    # (an Adam step's derivative w.r.t. a decay at its episode's first step is
                    # ~eps / g^2: rounding-sized, so an absolute floor)
                    torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-12)
                checked += 1
                after = _real_state(hopt)
                assert all(torch.equal(x, y) for x, y in zip(before[0], after[0], strict=True))
                for sa, sb in zip(before[1], after[1], strict=True):
                    assert sa.keys() == sb.keys()
                    assert all(sa[k] == sb[k] if k == "step" else torch.equal(sa[k], sb[k]) for k in sa)
                if kind == "by hand":
                    for p, gg in zip(hp.parameters(), got, strict=True):
                        p.grad = gg.clone()
                    hopt.outer_optimizer.step()
        assert checked >= 5, (seed, checked)


# ------------------------------------------------ weights torch.optim skips in some steps, clipped


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: Tensor, head: int) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.a(h) if head == 0 else self.b(h)


def _heads_train(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0], b[2]) - b[1]) ** 2).mean() + h.penalty(m)


def _heads_val(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0], 0) - b[1]) ** 2).mean() + ((m(b[0], 1) - b[1]) ** 2).mean()


@pytest.mark.parametrize(("mode", "checkpoint"), [("reverse", False), ("reverse", True), ("forward", False)])
def test_heads_skipped_by_adam_in_clipped_and_constant_steps_match_finite_differences(
    mode: str, checkpoint: bool
) -> None:
    """A batch picks one of two heads (the other gets no .grad, so torch.optim's Adam skips it and
    its step count), every other step clipped by total norm over the weights that got a gradient,
    and one step whose loss is a constant (an empty batch: no weight moves): the window's
    hypergradient against central differences of the plain torch loop (not covered together)."""
    g = torch.Generator().manual_seed(1)
    heads = [0, 1, 1, 0, 0, 1]
    data: list[Any] = [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT), hd)
        for hd in heads
    ]
    data.insert(3, (torch.zeros(0, 3, dtype=DT), torch.zeros(0, 1, dtype=DT), 0))
    val = (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT))
    K = 5

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        if len(b[0]) == 0:
            return torch.zeros((), dtype=DT)
        return _heads_train(m, h, b)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return _TwoHeads().to(DT)

    net, hp = model(), _LogDecay()
    hopt = hg.Unrolled(
        net, hp, train, _heads_val, inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=K, mode=mode, checkpoint=checkpoint,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (the constant step)
        for i, b in enumerate(data):
            hopt.step(b, max_grad_norm=0.3 if i % 2 else None)
    (got,), info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == K

    def real(log: float) -> float:
        m = model()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        for i, b in enumerate(data):
            lg = torch.tensor(-2.0 if i < len(data) - K else log, dtype=DT)
            opt.zero_grad()
            if len(b[0]) == 0:
                continue
            loss = ((m(b[0], b[2]) - b[1]) ** 2).mean()
            loss = loss + 0.5 * lg.exp() * sum((p**2).sum() for p in m.parameters())
            loss.backward()
            if i % 2:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 0.3)
            opt.step()
        with torch.no_grad():
            return float(_heads_val(m, None, val))

    eps = 1e-6
    fd = (real(-2.0 + eps) - real(-2.0 - eps)) / (2 * eps)
    assert abs(float(got) - fd) <= 1e-7 * abs(fd) + 1e-10, (float(got), fd)


# ------------------------------------------------- forward mode: module settings between entries


class _WarmUp(nn.Module):
    """A warm-up scale driven by a call counter (``self.calls += 1``, as in round 23's tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * min(1.0, self.calls / 10)


class _TwoDecays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log = nn.Parameter(torch.tensor([-2.0, -1.0], dtype=DT))


def _two_decays_loss(m: nn.Module, log: Tensor, b: Any) -> Tensor:
    return (
        _mse(m, None, b)
        + 0.5 * log[0].exp() * (m[0].weight ** 2).sum()
        + 0.5 * log[1].exp() * (m[2].weight ** 2).sum()
    )


def test_forward_mode_entries_see_the_settings_the_hyperstep_began_with() -> None:
    """Round 23 put back a call counter after the whole hyperstep and replays each step with its
    recorded settings, but forward mode's validation losses (one per entry) each advanced it for
    the next: the second entry's hypergradient -1.4e-3 against -1.05e-3 (reverse mode and central
    differences of the real training agree on the latter)."""
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)) for _ in range(3)
    ]
    val = (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT))

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), _WarmUp(), nn.Linear(4, 1)).to(DT)

    got = {}
    for mode in ("reverse", "forward"):
        m, hp = model(), _TwoDecays()
        hopt = hg.Unrolled(
            m, hp, lambda m, h, b: _two_decays_loss(m, h.log, b), _mse,
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=3, mode=mode,
        )  # fmt: skip
        for b in data:
            hopt.step(b)
        (grad,), info = hopt.hypergradient(val_batch=val)
        assert m[1].calls == 3  # (the hyperstep's forward passes put back)
        got[mode] = (grad, info.outer_loss)

    def real(log: Tensor) -> float:
        m = model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for b in data:
            opt.zero_grad()
            _two_decays_loss(m, log, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(m, None, val))

    base, eps = torch.tensor([-2.0, -1.0], dtype=DT), 1e-6
    fd = torch.tensor(
        [(real(base + eps * e) - real(base - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=DT)], dtype=DT
    )
    torch.testing.assert_close(got["reverse"][0], fd, rtol=1e-6, atol=1e-12)  # (reverse mode was right)
    assert got["forward"][1] == pytest.approx(got["reverse"][1], rel=1e-12)
    torch.testing.assert_close(got["forward"][0], fd, rtol=1e-6, atol=1e-12)


class _NormalisingDecays(nn.Module):
    """Two log decays and an input normaliser that updates its running scale and reads it (an
    EMA buffer of the hyperparameter module, as round 23's learned normalisers)."""

    def __init__(self) -> None:
        super().__init__()
        self.log = nn.Parameter(torch.tensor([-2.0, -1.0], dtype=DT))
        self.register_buffer("scale", torch.ones((), dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.scale.mul_(0.5).add_(0.5 * x.std())
        return x / self.scale


def test_forward_mode_entries_read_the_hparam_buffers_the_hyperstep_began_with() -> None:
    """Reverse mode's one validation call reads the hyperparameter module's buffers as the
    hyperstep began (copies, updated and thrown away); forward mode's second entry read them as
    its first entry's call had left them: -1.08e-2 against -1.23e-2."""
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)) for _ in range(3)
    ]
    val = (3 * torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT))

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _two_decays_loss(m, h.log, (h(b[0]), b[1]))

    def valid(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, None, (h(b[0]), b[1]))

    got = {}
    for mode in ("reverse", "forward"):
        m, hp = model(), _NormalisingDecays()
        hopt = hg.Unrolled(
            m, hp, train, valid, inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=3, mode=mode,
        )  # fmt: skip
        for b in data:
            hopt.step(b)
        kept = hp.scale.clone()
        (grad,), info = hopt.hypergradient(val_batch=val)
        assert torch.equal(hp.scale, kept)  # (the hyperstep's updates are thrown away)
        got[mode] = (grad, info.outer_loss)

    def real(log: Tensor) -> float:
        m, h = model(), _NormalisingDecays()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for b in data:
            opt.zero_grad()
            _two_decays_loss(m, log, (h(b[0]), b[1])).backward()
            opt.step()
        with torch.no_grad():
            return float(valid(m, h, val))

    base, eps = torch.tensor([-2.0, -1.0], dtype=DT), 1e-6
    fd = torch.tensor(
        [(real(base + eps * e) - real(base - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=DT)], dtype=DT
    )
    torch.testing.assert_close(got["reverse"][0], fd, rtol=1e-6, atol=1e-12)  # (reverse mode was right)
    assert got["forward"][1] == pytest.approx(got["reverse"][1], rel=1e-12)
    torch.testing.assert_close(got["forward"][0], fd, rtol=1e-6, atol=1e-12)
