"""Regression tests for the user-testing issue on ``hg.Unrolled``'s replay of the real steps.

Each test failed on the code before the fix (2d68091): the replay must reproduce the real inner
steps (a batch buffer refilled in place, a tensor learning rate changed by a scheduler, dropout,
weights the loss does not reach, buffers reassigned in forward), hooks it cannot replay are
reported, weights changed outside ``step()`` end the episode, the trained set may change, forward
mode takes memory independent of K, and checkpoints resume bit for bit (dataclass batches, RNG).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64
K = 5  # inner steps differentiated through
REPLAY_ATOL = 1e-12  # replayed vs real weights (all of order 1)


# ----------------------------------------------------------------------------- models and losses


def _mlp(seed: int = 0, n_in: int = 3, hidden: int = 6, n_out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(DT)


class DropNet(nn.Module):
    """An MLP with dropout on its hidden layer; ``drop=False`` skips it (for validation)."""

    def __init__(self, n_in: int = 3, hidden: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, hidden)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, drop: bool = True) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.drop(h) if drop else h)


def _drop_net(seed: int = 0) -> DropNet:
    torch.manual_seed(seed)
    return DropNet().to(DT).train()


def _mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _drop_val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0], drop=False) - b[1]) ** 2).mean()


def _batches(n: int, seed: int = 0, n_in: int = 3, n_out: int = 1, size: int = 8) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, n_in, generator=g, dtype=DT), torch.randn(size, n_out, generator=g, dtype=DT))
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- helpers


def _unrolled(
    model: nn.Module,
    inner: torch.optim.Optimizer,
    *,
    steps: int = K,
    train_loss: Callable[..., torch.Tensor] = _penalised,
    val_loss: Callable[..., torch.Tensor] = _mse,
    mode: str = "reverse",
    hp: nn.Module | None = None,
) -> hg.Unrolled:
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01) if hp is None else hp
    return hg.Unrolled(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=steps,
        mode=mode,
    )


def _make(
    method: str,
    model: nn.Module,
    hp: nn.Module,
    inner: torch.optim.Optimizer,
    *,
    train_loss: Callable[..., torch.Tensor] = _penalised,
    val_loss: Callable[..., torch.Tensor] = _mse,
    outer: torch.optim.Optimizer | None = None,
) -> Any:
    """An Unrolled (K steps) or Implicit (CG) hyperoptimiser; the outer optimiser defaults to lr=0."""
    outer = torch.optim.SGD(hp.parameters(), lr=0.0) if outer is None else outer
    kw = dict(inner_optimizer=inner, outer_optimizer=outer)
    if method == "unrolled":
        return hg.Unrolled(model, hp, train_loss, val_loss, steps=K, **kw)
    return hg.Implicit(model, hp, train_loss, val_loss, solver=hg.CG(maxiter=10, damping=0.1), **kw)


def _trained(hopt: Any) -> list[torch.Tensor]:
    """The weights the inner optimiser trains now, in ``named_parameters`` order."""
    ids = {id(p) for g in hopt.inner_optimizer.param_groups for p in g["params"]}
    return [p for p in hopt.model.parameters() if id(p) in ids and p.requires_grad]


def _assert_replay_matches(hopt: hg.Unrolled) -> None:
    replayed, real = hopt.replayed_weights(), _trained(hopt)
    assert len(replayed) == len(real)
    for i, (a, b) in enumerate(zip(replayed, real, strict=True)):
        err = float((a - b.detach()).abs().max())
        assert err <= REPLAY_ATOL, f"weight {i}: replayed differs from real by {err:.3g}"


def _hypergrad(hopt: Any, val_batch: Any, train_batch: Any = None) -> tuple[Any, list[torch.Tensor]]:
    """One hyperstep (with an outer lr of 0 nothing moves); its info and the hypergradient."""
    info = hopt.hyper_step(train_batch=train_batch, val_batch=val_batch)
    grads = [p.grad.detach().clone() for p in hopt.hparams.parameters()]
    return info, grads


def _plain_step(opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> None:
    """One step of a plain PyTorch training loop."""
    opt.zero_grad()
    loss().backward()
    opt.step()


def _central_difference(f: Callable[[], float], t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(t)
    flat = t.data.view(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out.view(-1)[i] = (fp - fm) / (2 * eps)
    return out


@contextlib.contextmanager
def _user_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record the UserWarnings issued inside (so a test can check what happened before it checks
    which warnings came)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: list[warnings.WarningMessage] = []
        yield out
    out.extend(w for w in caught if issubclass(w.category, UserWarning))


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of nested state (state_dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _snapshot(hopt: Any) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": hopt.model.state_dict(),
            "hparams": hopt.hparams.state_dict(),
            "inner": hopt.inner_optimizer.state_dict(),
            "outer": hopt.outer_optimizer.state_dict(),
        }
    )


# ----------------------------------------------------------------------------- 1. replay = real steps


def test_replay_uses_each_steps_own_batch_when_the_buffer_is_refilled_in_place() -> None:
    data, vb = _batches(K), _batches(1, seed=9)[0]
    model = _mlp()
    twin = copy.deepcopy(model)
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = torch.empty_like(data[0][0]), torch.empty_like(data[0][1])
    for bx, by in data:  # a data loader that reuses one pinned buffer
        x.copy_(bx)
        y.copy_(by)
        hopt.step((x, y))
    x.normal_(generator=torch.Generator().manual_seed(5))  # the loader prefetches the next batch
    y.normal_(generator=torch.Generator().manual_seed(6))
    _assert_replay_matches(hopt)

    ref = _unrolled(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    for b in data:  # separate tensors per step
        ref.step(b)
    _, got = _hypergrad(hopt, vb)
    _, want = _hypergrad(ref, vb)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-12, atol=0), (g, w)


@pytest.mark.parametrize(
    "cls,kw",
    [(torch.optim.Adam, dict(betas=(0.8, 0.9))), (torch.optim.SGD, dict(momentum=0.9))],
    ids=["adam", "sgd"],
)
def test_replay_follows_a_tensor_learning_rate_changed_in_place_by_a_scheduler(cls, kw) -> None:
    model = _mlp()
    inner = cls(model.parameters(), lr=torch.tensor(0.05), **kw)
    lr = inner.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    hopt = _unrolled(model, inner)
    for b in _batches(K):
        hopt.step(b)
        sched.step()
    assert inner.param_groups[0]["lr"] is lr  # the scheduler really did write in place
    assert float(lr) == pytest.approx(0.05 * 0.5**K, rel=1e-6)
    _assert_replay_matches(hopt)


def test_replay_draws_the_same_dropout_masks() -> None:
    model = _drop_net()
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), val_loss=_drop_val)
    for b in _batches(K):
        hopt.step(b)
    _assert_replay_matches(hopt)
    rng = torch.get_rng_state()
    _assert_replay_matches(hopt)  # and again: the replay neither consumes nor depends on the RNG
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_dropout_hypergradient_matches_finite_differences(mode: str) -> None:
    """The replay is right, not just self-consistent: central differences of L_V after K plain
    torch.optim steps that draw the same dropout masks (same seed)."""
    data, vb = _batches(K), _batches(1, seed=9)[0]
    model = _drop_net()
    model0 = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    kw = dict(lr=0.1, momentum=0.9)
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), **kw), val_loss=_drop_val, hp=hp, mode=mode)
    torch.manual_seed(123)
    for b in data:
        hopt.step(b)
    info, got = _hypergrad(hopt, vb)
    assert info.unrolled_steps == K

    def f() -> float:
        m = copy.deepcopy(model0)
        opt = torch.optim.SGD(m.parameters(), **kw)
        torch.manual_seed(123)
        for b in data:
            grads = torch.autograd.grad(_penalised(m, hp, b), list(m.parameters()))
            for w, g in zip(m.parameters(), grads, strict=True):
                w.grad = g
            opt.step()
        with torch.no_grad():
            return float(_drop_val(m, hp, vb))

    for raw, g in zip(hp.parameters(), got, strict=True):
        fd = _central_difference(f, raw)
        assert float(fd.abs().max()) > 1e-4  # a hypergradient worth checking
        assert torch.allclose(g, fd, rtol=1e-6, atol=1e-9), (g, fd)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 6)
        self.head = nn.Linear(6, 1)
        self.aux = nn.Linear(6, 1)  # trained only on steps whose batch says so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))


def _two_heads_loss(m: nn.Module, h: nn.Module, b: dict[str, Any]) -> torch.Tensor:
    z = m(b["x"])
    loss = ((m.head(z) - b["y"]) ** 2).mean() + h.penalty(m)
    if b["aux"]:
        loss = loss + ((m.aux(z) + b["y"]) ** 2).mean()
    return loss


def _two_heads_val(m: nn.Module, h: nn.Module, b: dict[str, Any]) -> torch.Tensor:
    return ((m.head(m(b["x"])) - b["y"]) ** 2).mean()


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.Adam, dict(lr=0.05, weight_decay=0.1)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ],
    ids=["adam_wd", "sgd_momentum_wd"],
)
def test_layer_the_loss_does_not_reach_is_skipped_like_torch_optim(cls, kw) -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01, include=lambda n: not n.startswith("aux"))
    hp_ref = copy.deepcopy(hp).requires_grad_(False)
    hopt = _unrolled(
        model, cls(model.parameters(), **kw), train_loss=_two_heads_loss, val_loss=_two_heads_val, hp=hp
    )
    ref_opt = cls(ref.parameters(), **kw)
    data = [{"x": x, "y": y, "aux": i % 2 == 0} for i, (x, y) in enumerate(_batches(K + 1))]
    aux_before = {}
    for i, b in enumerate(data):
        aux_before[i] = model.aux.weight.detach().clone()
        hopt.step(b)
        _plain_step(ref_opt, lambda b=b: _two_heads_loss(ref, hp_ref, b))
        if not b["aux"]:  # no gradient reached it: torch.optim leaves it alone, decay included
            assert torch.equal(model.aux.weight, aux_before[i]), f"aux moved at step {i}"
    for (n, a), (_, r) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, r), n
    _assert_same(hopt.inner_optimizer.state_dict(), ref_opt.state_dict(), "inner optimizer")
    _assert_replay_matches(hopt)
    info, grads = _hypergrad(hopt, data[0])
    assert info.unrolled_steps == K and all(bool(torch.isfinite(g).all()) for g in grads)


class RunningCentre(nn.Module):
    """Centres its input by a running mean that ``forward`` reassigns (not updated in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 6)
        self.lin2 = nn.Linear(6, 1)
        self.register_buffer("mean", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        return self.lin2(torch.tanh(self.lin1(x - self.mean)))


def test_buffer_reassigned_in_forward_is_replayed() -> None:
    torch.manual_seed(0)
    model = RunningCentre().to(DT)
    ref = copy.deepcopy(model)
    data = [(x + 3.0 * (i + 1), y) for i, (x, y) in enumerate(_batches(K))]  # the centre matters
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01)
    hp_ref = copy.deepcopy(hp).requires_grad_(False)
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), hp=hp)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for b in data:
        hopt.step(b)
        _plain_step(ref_opt, lambda b=b: _penalised(ref, hp_ref, b))
    assert float(ref.mean.abs().min()) > 1.0
    for (n, a), (_, r) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, r), n  # weights and the running mean, as plain PyTorch
    _assert_replay_matches(hopt)


# ----------------------------------------------------------------------------- 2. hooks


def _clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 0.01)


def test_optimizer_step_pre_hook_warns_at_construction() -> None:
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    inner.register_step_pre_hook(_clip)
    with pytest.warns(hg.ReplayWarning, match="step hooks"):
        _unrolled(model, inner)


def test_parameter_gradient_hook_warns_at_construction() -> None:
    model = _mlp()
    model[0].weight.register_hook(lambda g: 0.5 * g)
    with pytest.warns(hg.ReplayWarning, match=r"gradient hooks on '0\.weight'"):
        _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("kind", ["optimizer", "parameter"])
def test_hook_registered_after_construction_warns_at_next_step(kind: str) -> None:
    data = _batches(3)
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = _unrolled(model, inner)
    hopt.step(data[0])  # no hook yet: no warning (filterwarnings = error)
    if kind == "optimizer":
        inner.register_step_pre_hook(_clip)
    else:
        model[2].bias.register_hook(lambda g: 0.5 * g)
    with pytest.warns(hg.ReplayWarning, match="step hooks" if kind == "optimizer" else r"'2\.bias'"):
        hopt.step(data[1])
    hopt.step(data[2])  # warned once


# ----------------------------------------------------------------------------- 3. episodes


def _reinit(model: nn.Sequential, how: str) -> None:
    """Re-initialise the weights in place, as a user starting a new episode would."""
    torch.manual_seed(42)
    if how == "reset_parameters":
        for m in model:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("declared", [False, True], ids=["warned", "start_episode"])
@pytest.mark.parametrize("how", ["reset_parameters", "copy_"])
def test_reinitialised_weights_start_a_new_episode(how: str, declared: bool) -> None:
    data, vb = _batches(3 + K - 1), _batches(1, seed=9)[0]
    model = _mlp()
    hopt = _unrolled(model, torch.optim.Adam(model.parameters(), lr=0.05))
    for b in data[:3]:
        hopt.step(b)
    _reinit(model, how)
    hopt.inner_optimizer.state.clear()  # a fresh optimiser state for the new episode
    start = copy.deepcopy(model)
    if declared:
        hopt.start_episode()
    with _user_warnings() as caught:
        for b in data[3:]:
            hopt.step(b)
    info, got = _hypergrad(hopt, vb)
    assert info.unrolled_steps == K - 1  # only the steps since the reset
    _assert_replay_matches(hopt)

    fresh = _unrolled(start, torch.optim.Adam(start.parameters(), lr=0.05))
    for b in data[3:]:
        fresh.step(b)
    fresh_info, want = _hypergrad(fresh, vb)
    assert fresh_info.unrolled_steps == K - 1
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-12, atol=0), (g, w)
    # warned once, at the first step after the reset; not at all after start_episode()
    assert [w.category for w in caught] == ([] if declared else [hg.ReplayWarning])
    assert declared or "start_episode" in str(caught[0].message)


@pytest.mark.parametrize("declared", [False, True], ids=["warned", "start_episode"])
def test_hyper_step_right_after_a_reset_raises(declared: bool) -> None:
    data, vb = _batches(3), _batches(1, seed=9)[0]
    model = _mlp()
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for b in data:
        hopt.step(b)
    _reinit(model, "reset_parameters")
    if declared:
        hopt.start_episode()
    with _user_warnings() as caught, pytest.raises(ValueError, match="at least one inner step"):
        hopt.hyper_step(val_batch=vb)
    hopt.step(data[0])  # the episode has begun: no (second) warning, one step to differentiate
    assert hopt.hyper_step(val_batch=vb).unrolled_steps == 1
    assert [w.category for w in caught] == ([] if declared else [hg.ReplayWarning])


def test_load_state_dict_is_not_an_outside_weight_change() -> None:
    data, vb = _batches(6), _batches(1, seed=9)[0]
    model = _mlp()
    hopt = _unrolled(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for b in data[:3]:
        hopt.step(b)
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    for b in data[3:5]:
        hopt.step(b)
    buf.seek(0)
    hopt.load_state_dict(torch.load(buf, weights_only=False))
    hopt.step(data[5])  # the loaded weights are where the loaded records lead: no warning
    assert hopt.hyper_step(val_batch=vb).unrolled_steps == 4
    _assert_replay_matches(hopt)
    _reinit(model, "copy_")  # a real outside change is still caught after a load
    with _user_warnings() as caught:
        hopt.step(data[0])
    assert hopt.hyper_step(val_batch=vb).unrolled_steps == 1
    assert [w.category for w in caught] == [hg.ReplayWarning]


# ----------------------------------------------------------------------------- 4. trained set changes


@pytest.mark.parametrize("method", ["unrolled", "implicit"])
def test_param_group_added_later_trains_like_torch_optim(method: str) -> None:
    """Progressive unfreezing: the body joins the inner optimiser after 3 steps."""
    data, vb = _batches(6), _batches(1, seed=9)[0]
    model = _mlp()
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01)
    hp_ref = copy.deepcopy(hp).requires_grad_(False)
    inner = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref[2].parameters(), lr=0.1, momentum=0.9)
    hopt = _make(method, model, hp, inner)
    body0 = copy.deepcopy(model[0])
    for i, b in enumerate(data):
        if i == 3:
            inner.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})
            ref_opt.add_param_group({"params": list(ref[0].parameters()), "lr": 0.05})
        hopt.step(b)
        _plain_step(ref_opt, lambda b=b: _penalised(ref, hp_ref, b))
    assert not torch.equal(model[0].weight, body0.weight), "the added param group did not train"
    for (n, a), (_, r) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, r), n
    info, grads = _hypergrad(hopt, vb, train_batch=data[-1])
    assert all(bool(torch.isfinite(g).all()) for g in grads) and info.hypergrad_norm > 0
    if method == "unrolled":
        assert info.unrolled_steps == 3  # a new episode began with the new group
        _assert_replay_matches(hopt)


@pytest.mark.parametrize("method", ["unrolled", "implicit"])
def test_layer_frozen_later_stops_moving(method: str) -> None:
    data, vb = _batches(6), _batches(1, seed=9)[0]
    model = _mlp()
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.01)  # still reaches the head once 0 is frozen
    hp_ref = copy.deepcopy(hp).requires_grad_(False)
    hopt = _make(method, model, hp, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i, b in enumerate(data):
        if i == 3:
            model[0].requires_grad_(False)
            ref[0].requires_grad_(False)
            frozen = copy.deepcopy(model[0])
        hopt.step(b)
        _plain_step(ref_opt, lambda b=b: _penalised(ref, hp_ref, b))
    info, grads = _hypergrad(hopt, vb, train_batch=data[-1])
    assert all(bool(torch.isfinite(g).all()) for g in grads) and info.hypergrad_norm > 0
    if method == "unrolled":
        assert info.unrolled_steps == 3  # a new episode began with the freeze
    assert torch.equal(ref[0].weight, frozen.weight)  # plain PyTorch: a frozen layer stays put
    for name in ("weight", "bias"):
        moved = not torch.equal(getattr(model[0], name), getattr(frozen, name))
        assert not moved, f"the frozen layer's {name} moved after requires_grad_(False)"
    for (n, a), (_, r) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, r), n
    if method == "unrolled":
        _assert_replay_matches(hopt)


# ----------------------------------------------------------------------------- 5. forward-mode memory


def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of torch's CPU allocator above its level at the start of ``fn`` (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    assert prof.profiler is not None
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def test_forward_mode_memory_does_not_grow_with_steps() -> None:
    data, vb = _batches(12, n_in=40, n_out=80, size=16), _batches(1, seed=9, n_in=40, n_out=80)[0]
    peaks, grads = {}, {}
    for mode in ("forward", "reverse"):
        for k in (2, 12):
            model = _mlp(n_in=40, hidden=400, n_out=80)  # 48,480 weights
            inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            hp = hg.hparams.LearningRate(inner)
            hopt = _unrolled(model, inner, steps=k, train_loss=_mse, hp=hp, mode=mode)
            for b in data[:k]:
                hopt.step(b)
            peaks[mode, k] = _peak_bytes(lambda hopt=hopt: hopt.hyper_step(val_batch=vb))
            grads[mode, k] = hp.raw.grad.detach().clone()
    weight_bytes = 48_480 * 8
    assert peaks["reverse", 2] > weight_bytes  # the measure sees the replay's tensors
    assert peaks["reverse", 12] > 2.5 * peaks["reverse", 2], peaks  # reverse mode keeps K graphs
    assert peaks["forward", 12] < 1.5 * peaks["forward", 2], peaks
    for k in (2, 12):
        assert torch.allclose(grads["forward", k], grads["reverse", k], rtol=1e-10, atol=0), k


# ----------------------------------------------------------------------------- 6-7. resuming


@dataclasses.dataclass
class XY:
    x: torch.Tensor
    y: torch.Tensor


def _xy_train(m: nn.Module, h: nn.Module, b: XY) -> torch.Tensor:
    return ((m(b.x) - b.y) ** 2).mean() + h.penalty(m)


def _xy_val(m: nn.Module, h: nn.Module, b: XY) -> torch.Tensor:
    return ((m(b.x) - b.y) ** 2).mean()


def _resume_setup(method: str, seed: int, net: Callable[[int], nn.Module], **kw) -> Any:
    model = net(seed)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.01)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return _make(method, model, hp, inner, outer=torch.optim.Adam(hp.parameters(), lr=0.05), **kw)


def _run(hopt: Any, batches: list[Any], vb: Any, start: int, stop: int) -> None:
    for i in range(start, stop):
        hopt.step(batches[i])
        if (i + 1) % 3 == 0:
            hopt.hyper_step(train_batch=batches[i], val_batch=vb)


def _save_and_resume(make: Callable[[int], Any], batches: list[Any], vb: Any) -> None:
    """Straight run of 12 steps vs 7 steps, saved, loaded into a fresh hopt (other initial
    weights, scrambled RNG) and continued: bit for bit the same."""
    straight = make(0)
    _run(straight, batches, vb, 0, 12)
    first = make(0)
    _run(first, batches, vb, 0, 7)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = make(123)
    torch.manual_seed(999)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    _run(resumed, batches, vb, 7, 12)
    _assert_same(_snapshot(straight), _snapshot(resumed), "state")
    assert (resumed.inner_steps, resumed.hyper_steps) == (12, 4)


def test_resume_with_dataclass_batches_is_bit_identical() -> None:
    batches = [XY(x, y) for x, y in _batches(12)]
    vb = XY(*_batches(1, seed=9)[0])

    def make(seed: int) -> Any:
        return _resume_setup("unrolled", seed, _mlp, train_loss=_xy_train, val_loss=_xy_val)

    _save_and_resume(make, batches, vb)


@pytest.mark.parametrize("method", ["unrolled", "implicit"])
def test_resume_with_dropout_restores_the_rng(method: str) -> None:
    def make(seed: int) -> Any:
        return _resume_setup(method, seed, _drop_net, val_loss=_drop_val)

    _save_and_resume(make, _batches(12), _batches(1, seed=9)[0])
