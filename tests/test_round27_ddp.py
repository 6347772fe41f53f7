"""Round 27 (ddp): this round's new behaviour under DistributedDataParallel.

Two gloo processes on the CPU, float64; ONE spawned run (a module-scoped fixture) computes every
scenario on both ranks, each catching its own error; the references (one process on the
concatenated batches, the bare model) are computed in the test process by the same functions with
``world=1``. Scenarios: Implicit and MarginalLikelihood(through_map=True) with a param group held
at lr 0 (constants of the solve); Unrolled with torch.optim.Adafactor and Muon as the inner
optimiser (their new replay); a model reading a tied weight / DARTS alphas from a plain list
attribute (the held-slot substitution); WeightDecay / SelfTuned state dicts saved around a DDP
wrapper (``module.`` prefix) loaded into the bare model and back; a custom autograd.Function with
a differentiable backward under DDP (find_unused_parameters / static_graph: the reducer's _DDPSink)
that the once-differentiable guard must not refuse.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn_workers
from torch import nn

import hypergrad as hg

DT = torch.float64
WORLD = 2
Batch = tuple[torch.Tensor, ...]


def _data(n_batches: int = 4, size: int = 8, d: int = 4, c: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def one() -> Batch:
        x = torch.randn(size, d, generator=g, dtype=DT)
        return x, torch.randint(0, c, (size,), generator=g)

    return [one() for _ in range(n_batches)], one()


def _shard(b: Batch, rank: int, world: int) -> Batch:
    if world == 1:
        return b
    c = len(b[0]) // world
    return tuple(t[:c] if rank == 0 else t[c:] for t in b)


def _wrap(module: nn.Module, world: int, **options: Any) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module, **options) if world > 1 else module


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)).to(DT)


def _info(info: Any) -> dict[str, Any]:
    d = dataclasses.asdict(info)
    d.pop("seconds")
    return d


def _result(
    hp: nn.Module, module: nn.Module, grads: list[torch.Tensor], infos: list[Any] = ()
) -> dict[str, Any]:
    return {
        "infos": [_info(i) for i in infos],
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
    }


def _flat_grad(hp: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in hp.parameters()])


# ------------------------------------------------------------------ (1) lr-0 groups, Implicit


def _implicit_held(rank: int, world: int) -> dict[str, Any]:
    """A body held at lr 0 (its own param group), a head trained with momentum; per-layer decays;
    exact Direct solver, so the held body being constants of the solve is all that can differ."""
    module = _mlp()
    model = _wrap(module, world)
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2)

    def train(m, h, b):
        return _ce(m, h, b) + h.penalty(m)

    inner = torch.optim.SGD(
        [{"params": module[0].parameters(), "lr": 0.0}, {"params": module[2].parameters()}],
        lr=0.2,
        momentum=0.5,
    )
    outer = torch.optim.SGD(hp.parameters(), lr=0.5)
    hopt = hg.Implicit(
        model, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Direct()
    )
    batches, vb = _data()
    grads, infos = [], []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 2 == 1:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            assert not info.skipped
            grads.append(_flat_grad(hp))
            infos.append(info)
    return _result(hp, module, grads, infos)


# ------------------------------------------------------- (1) lr-0 groups, MarginalLikelihood


def _marglik_held(rank: int, world: int) -> dict[str, Any]:
    module = _mlp()
    model = _wrap(module, world)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0)})
    inner = torch.optim.SGD(
        [{"params": module[0].parameters(), "lr": 0.0}, {"params": module[2].parameters()}], lr=0.1
    )
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=64, inner_optimizer=inner,
        outer_optimizer=outer, subset_size=4, burn_in=0, every=1, through_map=True,
        solver=hg.CG(maxiter=20, tol=1e-12, damping=0.1),
    )  # fmt: skip
    batches, _ = _data()
    grads, infos = [], []
    for b in batches[:3]:
        hopt.step(_shard(b, rank, world))
        info = hopt.hyper_step(train_batch=_shard(b, rank, world))
        assert not info.skipped
        grads.append(_flat_grad(hp))
        infos.append(info)
    return _result(hp, module, grads, infos)


# -------------------------------------------------------- (2) Unrolled with Adafactor / Muon


def _unrolled_opt(
    kind: str, rank: int, world: int, checkpoint: bool = False, total: int = 3, **options: Any
) -> dict[str, Any]:
    module = _mlp(bias=kind != "muon")  # (Muon takes 2-D weights only)
    model = _wrap(module, world, **options)
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2)

    def train(m, h, b):
        return _ce(m, h, b) + h.penalty(m)

    if kind == "adafactor":
        inner: torch.optim.Optimizer = torch.optim.Adafactor(module.parameters(), lr=0.05)
    else:
        inner = torch.optim.Muon(module.parameters(), lr=0.05, momentum=0.9)
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    hopt = hg.Unrolled(
        model, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, steps=3, checkpoint=checkpoint
    )
    batches, vb = _data()
    for b in batches[:total]:
        hopt.step(_shard(b, rank, world))
    info = hopt.hyper_step(val_batch=_shard(vb, rank, world))
    return _result(hp, module, [_flat_grad(hp)], [info])


# ------------------------------------------------ (3) tied weight / DARTS alphas in a list


class _ListTied(nn.Module):
    """An autoencoder-like net whose decoder reads the encoder's weight from a plain list
    attribute (``self.tied = [enc.weight]``), plus DARTS-like mixing alphas (hyperparameters) read
    from ``self._arch = [alpha]``."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(4, 6).to(DT)
        self.mid = nn.Linear(6, 6).to(DT)
        self.head = nn.Linear(4, 3).to(DT)
        self.tied = [self.enc.weight]
        self._arch = [alpha]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        mix = torch.softmax(self._arch[0], 0)
        h = mix[0] * h + mix[1] * torch.tanh(self.mid(h))
        r = nn.functional.linear(h, self.tied[0].t())  # (6 -> 4 through enc's weight)
        return self.head(torch.tanh(r))


class _Registered(_ListTied):
    """DARTS as some re-implementations write it: the alphas registered on the model too
    (``self.alphas = nn.Parameter``), kept out of the inner optimiser."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__(alpha)
        self.alphas = alpha


class _Arch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([0.3, -0.2], dtype=DT))
        self.log = nn.Parameter(torch.tensor(-3.0, dtype=DT))

    def penalty(self, m: nn.Module) -> torch.Tensor:
        return self.log.exp() * sum((p**2).sum() for n, p in m.named_parameters() if not n.endswith("alphas"))


def _list_tied(
    method: str, rank: int, world: int, registered: bool = False, ckpt: bool = False
) -> dict[str, Any]:
    hp = _Arch()
    module = (_Registered if registered else _ListTied)(hp.alpha)
    model = _wrap(module, world)

    def train(m, h, b):
        return _ce(m, h, b) + h.penalty(m)

    inner = torch.optim.SGD([p for p in module.parameters() if p is not hp.alpha], lr=0.2, momentum=0.5)
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    if method == "unrolled":
        hopt: hg.HyperOptimizer = hg.Unrolled(
            model,
            hp,
            train,
            _ce,
            inner_optimizer=inner,
            outer_optimizer=outer,
            steps=3 - ckpt,
            checkpoint=ckpt,
        )
    else:
        hopt = hg.Implicit(
            model, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Direct()
        )
    batches, vb = _data()
    for b in batches[:3]:
        hopt.step(_shard(b, rank, world))
    b = _shard(batches[2], rank, world)
    info = hopt.hyper_step(train_batch=b, val_batch=_shard(vb, rank, world))
    out = _result(hp, module, [_flat_grad(hp)], [info])
    out["list_is_weight"] = module.tied[0] is module.enc.weight and module._arch[0] is hp.alpha
    return out


# ------------------------------------ MarginalLikelihood(through_map) and DDP's broadcast buffers


class _RunningNorm(nn.Module):
    """Subtracts a running mean of its inputs, read and updated in training mode (an observation
    normaliser): DDP broadcasts rank 0's value before every forward."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x - self.mean
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.detach().mean(0))
        return out


def _marglik_buffers_run(rank: int, world: int, shift: float) -> tuple[torch.Tensor, float]:
    """60 MAP steps (converged: 4e-4 relative) on one fixed batch, rank 1's shard offset by +1
    (so the ranks' running means differ), then the through-map hypergradient in eval mode (as
    MarginalLikelihood asks of a model with such statistics) and the logged -bound / N."""
    torch.manual_seed(0)
    module = nn.Sequential(_RunningNorm(4), nn.Linear(4, 3)).to(DT)
    model = _wrap(module, world)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="global", init=2.0)})
    with torch.no_grad():
        for p in hp.parameters():
            p.add_(shift)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=16,
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.8),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), burn_in=0, every=1,
        through_map=True, solver=hg.Direct(),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    x[4:] += 1.0
    b = _shard((x, y), rank, world)
    for _ in range(60):
        hopt.step(b)
    module.eval()
    grads, info = hopt.hypergradient(train_batch=b)
    return torch.cat([q.reshape(-1) for q in grads]), info.outer_loss


def _marglik_buffers(rank: int, world: int) -> dict[str, Any]:
    eps = 1e-5  # (a forward difference: its error, ~1e-5 relative here, is far below the tolerance)
    grad, at = _marglik_buffers_run(rank, world, 0.0)
    fd = (_marglik_buffers_run(rank, world, eps)[1] - at) / eps
    return {"grad": grad, "fd": fd}


# ------------------------------------------------------------ (4) state dict layout codes


def _layouts(rank: int, world: int) -> dict[str, Any]:
    """WeightDecay (per layer / per parameter) and SelfTuned built around the DDP wrapper, their
    states saved, loaded into containers built around the bare model and back."""
    out: dict[str, Any] = {}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6)).to(DT)
            self.head = nn.Linear(6, 3).to(DT)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    for per in ("layer", "parameter"):
        bare = Net()
        wrapped = _wrap(Net(), world)
        a = hg.hparams.WeightDecay(wrapped, per=per, init=1e-2)
        with torch.no_grad():
            for i, r in enumerate(a.raw):
                r.add_(0.1 * (i + 1))
        b = hg.hparams.WeightDecay(bare, per=per, init=1e-3)
        try:
            b.load_state_dict(a.state_dict())
            fwd = all(torch.equal(x, y) for x, y in zip(a.raw, b.raw, strict=True))
            c = hg.hparams.WeightDecay(wrapped, per=per, init=1.0)
            c.load_state_dict(b.state_dict())
            back = all(torch.equal(x, y) for x, y in zip(a.raw, c.raw, strict=True))
            out[f"wd-{per}"] = (fwd, back, a.decays().keys() == b.decays().keys() or list(b.decays()))
        except Exception as e:  # noqa: BLE001
            out[f"wd-{per}"] = f"{type(e).__name__}: {e}"
    # a whole Implicit checkpoint saved around the wrapper, loaded into one around the bare model
    try:
        s = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), k=hg.hparams.Integer(3, 0, 8))
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.05)
        t = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.4, high=0.9), k=hg.hparams.Integer(2, 0, 8))
        t.load_state_dict(s.state_dict())
        out["selftuned"] = all(torch.equal(x, y) for x, y in zip(s.parameters(), t.parameters(), strict=True))
    except Exception as e:  # noqa: BLE001
        out["selftuned"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------- (5) the once-differentiable guard


class _Cube(torch.autograd.Function):
    """x ** 3 with a differentiable backward (no @once_differentiable)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class _CubeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 6).to(DT)
        self.b = nn.Linear(6, 3).to(DT)
        self.unused = nn.Linear(2, 2).to(DT)  # (find_unused_parameters has something to find)

    def forward(self, x):
        return self.b(_Cube.apply(0.5 * torch.tanh(self.a(x))))


def _once(options: dict[str, Any], method: str, rank: int, world: int) -> dict[str, Any]:
    module = _CubeNet()
    model = _wrap(module, world, **options)
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2, include=lambda n: not n.startswith("unused"))

    def train(m, h, b):
        return _ce(m, h, b) + h.penalty(m)

    ws = [p for n, p in module.named_parameters() if not n.startswith("unused")]
    inner = torch.optim.SGD(ws, lr=0.2, momentum=0.5)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    if method == "unrolled":
        hopt: hg.HyperOptimizer = hg.Unrolled(
            model, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, steps=2
        )
    else:
        hopt = hg.Implicit(
            model,
            hp,
            train,
            _ce,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.Neumann(steps=3, alpha=0.2),
        )
    batches, vb = _data()
    grads, infos = [], []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 2 == 1:
            infos.append(
                hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            )
            grads.append(_flat_grad(hp))
    return _result(hp, module, grads, infos)


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "marglik-buffers": _marglik_buffers,
    "implicit-held": _implicit_held,
    "marglik-held": _marglik_held,
    "unrolled-adafactor": lambda r, w: _unrolled_opt("adafactor", r, w),
    "unrolled-muon": lambda r, w: _unrolled_opt("muon", r, w),
    "unrolled-adafactor-window-ckpt": lambda r, w: _unrolled_opt("adafactor", r, w, True, 4),
    "unrolled-muon-window-ckpt": lambda r, w: _unrolled_opt("muon", r, w, True, 4),
    "unrolled-adafactor-unused": lambda r, w: _unrolled_opt("adafactor", r, w, find_unused_parameters=True),
    "tied-unrolled": lambda r, w: _list_tied("unrolled", r, w),
    "tied-implicit": lambda r, w: _list_tied("implicit", r, w),
    "tied-unrolled-window-ckpt": lambda r, w: _list_tied("unrolled", r, w, ckpt=True),
    "darts-registered-unrolled": lambda r, w: _list_tied("unrolled", r, w, True),
    "once-unused-implicit": lambda r, w: _once({"find_unused_parameters": True}, "implicit", r, w),
    "once-static-unrolled": lambda r, w: _once({"static_graph": True}, "unrolled", r, w),
}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    try:
        results: dict[str, Any] = {}
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank, world)
            except Exception as e:  # noqa: BLE001
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
        results["layouts"] = _layouts(rank, world)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("round27_ddp")
    spawn_workers(_worker, WORLD, tmp)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for g in got:
        assert isinstance(g, dict), f"{name} raised: {g}"
    return got


def _same_as_one_process(ranks: list[dict[str, Any]], name: str, rtol: float = 1e-9) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the held body's decay: DisconnectedWarning, rightly)
        single = SCENARIOS[name](0, 1)
    assert any(bool(g.abs().max() > 1e-6) for g in single["grads"])  # (a hypergradient to compare)
    a, b = _ok(ranks, name)
    assert a["infos"] == b["infos"], (name, "ranks log different infos")
    for x, y in zip(a["infos"], single["infos"], strict=True):
        for k, v in y.items():
            if isinstance(v, float):
                assert x[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, k, x[k], v)
            else:
                assert x[k] == v, (name, k, x[k], v)
    for k in ("grads", "hparams", "weights"):
        for x, y in zip(a[k], b[k], strict=True):
            assert torch.equal(x, y), (name, k, "ranks differ")
        for x, y in zip(a[k], single[k], strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12, msg=lambda m, k=k: f"{name} {k}: {m}")


_REFUSED = {"darts-registered-unrolled", "marglik-buffers"}


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in _REFUSED])
def test_under_ddp_equals_one_process_on_the_concatenated_batches(ranks, name) -> None:
    """Each scenario's hypergradients, logged infos (seconds aside), hyperparameters and weights
    are identical on both ranks and equal one process on the concatenated batches (relative 1e-9).
    New coverage, passes: lr-0 groups as constants of Implicit's and MarginalLikelihood's
    through-map solves under DDP (the solves' HVPs averaged over the moving weights only);
    Adafactor's and Muon's replays under DDP (also a window of 3 of 4 steps, checkpointed); a
    tied weight and DARTS alphas read from plain list attributes of a DDP-wrapped model (Unrolled
    and Implicit); a custom Function with a differentiable backward under find_unused_parameters
    (the reducer off, gradients averaged by hand) and static_graph (DDP's _DDPSink) is not
    refused by the once-differentiable guard."""
    _same_as_one_process(ranks, name)


def test_marglik_through_map_under_ddp_with_broadcast_buffers_equals_fd_of_the_ddp_run(ranks) -> None:
    """A model whose forward reads and updates a running mean (DDP broadcasts rank 0's before every
    forward, so every MAP step's objective is the ranks' losses at rank 0's statistic). The
    through-map hypergradient (the total derivative of the logged -bound / N at the MAP) against
    a finite difference of the very same DDP run (converged MAP at lambda and lambda + 1e-5,
    relative 2e-3; the FD error is ~4e-4). Before the fix: -0.0742 against -0.0821 (10% off),
    identically on both ranks, no warning: rank 1's Hessian and mixed term read rank 1's own
    running mean, as Implicit's did before round 21 (it now uses rank0_buffers)."""
    a, b = _ok(ranks, "marglik-buffers")
    assert torch.equal(a["grad"], b["grad"]) and a["fd"] == b["fd"]
    assert abs(a["fd"]) > 1e-2
    assert float(a["grad"]) == pytest.approx(a["fd"], rel=2e-3)


def test_alphas_registered_on_the_ddp_model_are_refused_on_every_rank_before_any_collective(ranks) -> None:
    """DARTS alphas registered on the model as well (``self.alphas = nn.Parameter``): DDP's reducer
    would wait for their gradient in every step. Refused at construction on both ranks alike (no
    rank left waiting in a collective), naming the DDP-wrapped name. New coverage, passes."""
    for r in ranks:
        got = r["darts-registered-unrolled"]
        assert isinstance(got, str) and got.startswith("ValueError"), got
        assert "also a parameter of the model" in got and "alphas" in got, got


def test_decay_layouts_saved_around_a_ddp_wrapper_load_into_the_bare_model_and_back(ranks) -> None:
    """WeightDecay per layer / per parameter built around ``DistributedDataParallel(Net())``
    (names under ``module.``, the model's own under a single child ``body.``) saved and loaded into
    one built around the bare ``Net()``, and back: the layout codes agree, every raw value lands
    where it was, the decays keep their names. SelfTuned's state likewise. New coverage, passes."""
    for r in ranks:
        lay = r["layouts"]
        for per in ("layer", "parameter"):
            assert lay[f"wd-{per}"] == (True, True, True), lay[f"wd-{per}"]
        assert lay["selftuned"] is True, lay["selftuned"]


# -------------------------------- MarginalLikelihood's lr-0 rule lacks Implicit's exemptions


def _marglik_at_lr(opt_kind: str, body_lr: float) -> torch.Tensor:
    """The through-map hypergradient of a MarginalLikelihood trained 6 steps with the body's
    group set to lr 0 after 3 (Rprop) / at lr 0 with hypergradient descent on it (SGDHD), taken
    with the body's rate then set to ``body_lr`` (the rate no IFT formula reads: only which
    weights the solve covers can depend on it)."""
    module = _mlp()
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0)})
    groups = [{"params": module[0].parameters()}, {"params": module[2].parameters()}]
    if opt_kind == "rprop":
        inner: torch.optim.Optimizer = torch.optim.Rprop(groups, lr=0.01)
    else:
        groups[0]["lr"] = 0.0
        inner = hg.optim.SGDHD(groups, lr=0.1, hypergrad_lr=0.05)
    hopt = hg.MarginalLikelihood(
        module, hp, likelihood="classification", data_size=64, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), burn_in=0, every=1,
        through_map=True, solver=hg.Direct(),
    )  # fmt: skip
    batches, _ = _data()
    for i in range(6):
        if i == 3 and opt_kind == "rprop":
            inner.param_groups[0]["lr"] = 0.0  # (as a LambdaLR returning 0 for the body would)
        hopt.step(batches[i % 2])
    inner.param_groups[0]["lr"] = body_lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads, _ = hopt.hypergradient(train_batch=batches[0])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("opt_kind", ["rprop", "sgdhd"])
def test_marglik_through_map_lr0_group_of_an_optimiser_that_still_moves_it_is_solved_over(opt_kind) -> None:
    """Round 27 made param groups at lr 0 constants of the through-map IFT (as in Implicit), and
    the review exempted ``torch.optim.Rprop`` (lr is only its initial step size: a group set to 0
    later trains on at full speed) and hg.optim's SGDHD / AdamHD (a rate at 0 is raised again by
    the next step) in ``Implicit._held_at_zero`` only. ``_marglik._moving_weights`` applies the
    bare rule, so for these optimisers MarginalLikelihood solves over the head only while the body
    keeps moving: the bound's hypergradient is that of another problem (0.17-0.22 off here),
    silently. Fixed while this file was written (both now share ``held_at_zero``): passes, kept as
    coverage of MarginalLikelihood with these optimisers. Reference: the
    same state with the body's rate at 1e-12 instead of 0 (no formula reads the value; at a
    positive rate the body is solved over)."""
    held = _marglik_at_lr(opt_kind, 0.0)
    moving = _marglik_at_lr(opt_kind, 1e-12)
    assert float(moving.abs().min()) > 1e-3  # (a hypergradient to compare; current code: off by 0.17-0.22)
    torch.testing.assert_close(held, moving, rtol=1e-9, atol=1e-12)


def test_rprop_and_sgdhd_keep_moving_a_group_at_lr_zero() -> None:
    """The premise of the test above, on plain torch / hg.optim (passes: torch's behaviour)."""
    for kind in ("rprop", "sgdhd"):
        torch.manual_seed(0)
        w = nn.Parameter(torch.ones(3, dtype=DT))
        v = nn.Parameter(torch.ones(3, dtype=DT))
        if kind == "rprop":
            opt: torch.optim.Optimizer = torch.optim.Rprop([{"params": [w]}, {"params": [v]}], lr=0.01)
        else:
            opt = hg.optim.SGDHD([{"params": [w], "lr": 0.0}, {"params": [v]}], lr=0.1, hypergrad_lr=0.05)
        for i in range(6):
            if i == 3 and kind == "rprop":
                opt.param_groups[0]["lr"] = 0.0
            before = w.detach().clone()
            opt.zero_grad()
            ((w - 3) ** 2).sum().add(((v - 3) ** 2).sum()).backward()
            opt.step()
        assert float((w.detach() - before).abs().max()) > 1e-3, kind
