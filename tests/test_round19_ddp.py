"""Round 19 (ddp): data-parallel cases and exact resumes the earlier rounds left out.

DistributedDataParallel (two gloo processes on the CPU, float64; one spawned run computes every
scenario, each catching its own error), each against one process: BatchNorm (with and without
``broadcast_buffers``) against the mean of the shards' losses (per-rank batch statistics, as
documented); a learned augmentation network as the hyperparameters; a data-dependent branch with
``find_unused_parameters=True`` and ``gradient_as_bucket_view=True``; ``hopt.hypergradient()`` and
every logged number, with the Direct / Identity / warm-started CG solvers and ``hessian_subset``;
learned optimiser settings and per-example weights; the best-response families and
MarginalLikelihood under ``find_unused_parameters``; a process group of the model's own. Then
checkpoints: Unrolled saved on rank 0 (its refusal's advice; ``start_episode()`` then an exact
resume), a checkpoint loaded on rank 0 only, and a DDP communication hook under Unrolled.

One process: every family saved right after a refused step, a diverged step and a refused
hyperstep (schedulers on both optimisers, ``torch.load(weights_only=True)``) resumes bit for bit;
a float32 checkpoint loaded into a float64 build is cast, or refused by name (Unrolled).
"""

from __future__ import annotations

import copy
import datetime
import io
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


# ------------------------------------------------------------------------------------- problems


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


class _Branchy(nn.Module):
    """Rank 0's shards (first entry > 0) go through ``b``, rank 1's through ``c``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) if x[0, 0] > 0 else self.c(h)


class _Augment(nn.Module):
    """A learned augmentation network as the hyperparameters: x + tanh(W x) (W starts small)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(5, 5).to(DT)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)
            self.lin.bias.mul_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


def _heads(name: str) -> bool:
    """_Branchy's heads only: ``b`` reached on rank 0, ``c`` on rank 1."""
    return name.startswith(("b.", "c."))


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _aug_train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    h = getattr(h, "module", h)
    return nn.functional.cross_entropy(m(h(b[0])), b[1])


def _data(branchy: bool = False) -> tuple[list[Batch], Batch]:
    g = torch.Generator().manual_seed(1)

    def one() -> Batch:
        x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        if branchy:  # rank 0's half positive in its first entry, rank 1's negative
            x[:4, 0] = x[:4, 0].abs() + 0.1
            x[4:, 0] = -x[4:, 0].abs() - 0.1
        return x, y

    batches = [one() for _ in range(6)]
    return batches, one()


def _shard(b: Batch, rank: int, world: int, cut: int | None = None) -> Batch:
    """Rank ``rank``'s part of ``b``: equal parts, or ``[:cut]`` / ``[cut:]`` for two ranks."""
    if world == 1:
        return b
    if cut is not None:
        return tuple(t[:cut] if rank == 0 else t[cut:] for t in b)
    n = len(b[0]) // world
    return tuple(t[rank * n : (rank + 1) * n] for t in b)


def _mean_of_shards(loss: Callable[..., torch.Tensor], cut: int | None = None) -> Callable[..., torch.Tensor]:
    """One process's loss as the mean of the two shards' losses (per-shard BatchNorm statistics,
    per-shard branches, shards of unequal size): what two ranks average."""

    def f(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
        return 0.5 * (loss(m, h, _shard(b, 0, 2, cut)) + loss(m, h, _shard(b, 1, 2, cut)))

    return f


def _classic(
    method: str,
    rank: int,
    world: int,
    *,
    options: dict[str, Any] | None = None,
    make: Callable[[], nn.Module] = _net,
    augment: bool = False,
    per_shard: bool = False,
    branchy: bool = False,
    schedulers: bool = False,
    start: int = 0,
    stop: int = 6,
    load: str | None = None,
    save: str | None = None,
    new_episode: bool = False,
    subset: Callable[[str], bool] | None = None,
    load_on: set[int] | None = None,
) -> dict[str, Any]:
    """Implicit (Neumann) or Unrolled (K = 3, checkpoint=True) on the same script for one process
    (world = 1) and for each rank; a hyperstep after every third step."""
    module = make()
    if world > 1 and (options or {}).get("process_group") == "new":  # (the same ranks, another group)
        options = {**(options or {}), "process_group": dist.new_group(list(range(world)))}
    model = nn.parallel.DistributedDataParallel(module, **(options or {})) if world > 1 else module
    hp: nn.Module = _Augment() if augment else hg.hparams.WeightDecay(module, per="parameter", init=1e-2)
    train, val = (_aug_train, _ce) if augment else (_train, _ce)
    if per_shard and world == 1:
        train, val = _mean_of_shards(train), _mean_of_shards(val)
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(
            model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, steps=3, checkpoint=True
        )
    else:
        hopt = hg.Implicit(
            model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Neumann(steps=3),
            hessian_subset=subset,
        )  # fmt: skip
    scheds = (
        [
            torch.optim.lr_scheduler.StepLR(inner, 1, gamma=0.8),
            torch.optim.lr_scheduler.ExponentialLR(outer, gamma=0.7),
        ]
        if schedulers
        else []
    )
    if load is not None and (load_on is None or rank in load_on):
        saved = torch.load(load, weights_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (rank 1 loads rank 0's generator: no dropout here)
            hopt.load_state_dict(saved["hopt"])
        for s, st in zip(scheds, saved["scheds"], strict=True):
            s.load_state_dict(st)
    batches, vb = _data(branchy)
    grads, losses = [], []
    for i in range(start, stop):
        b = batches[i]
        losses.append(float(hopt.step(_shard(b, rank, world))))
        if scheds:
            scheds[0].step()
        if i % 3 == 2:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            assert not info.skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
            if scheds:
                scheds[1].step()
            if new_episode and i == 2:
                hopt.start_episode()
            if save is not None and i == 2 and rank == 0:
                torch.save({"hopt": hopt.state_dict(), "scheds": [s.state_dict() for s in scheds]}, save)
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
        "buffers": [t.detach().clone() for t in module.buffers()],
        "losses": losses,
        "inner_lr": inner.param_groups[0]["lr"],
        "outer_lr": outer.param_groups[0]["lr"],
    }


SOLVERS: dict[str, Callable[[], Any]] = {
    "implicit": lambda: hg.CG(maxiter=4, damping=0.1),
    "implicit-direct": lambda: hg.Direct(damping=0.1),
    "implicit-identity": lambda: hg.Identity(),
    "implicit-cg-warm": lambda: hg.CG(maxiter=2, damping=0.1, warm_start=True),
    "implicit-subset": lambda: hg.CG(maxiter=4, damping=0.1),  # (hessian_subset: the last layer)
}


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {}
for _m in ("implicit", "unrolled"):
    SCENARIOS[f"bn-{_m}"] = lambda r, w, m=_m: _classic(m, r, w, make=_bn_net, per_shard=True)
    SCENARIOS[f"augment-{_m}"] = lambda r, w, m=_m: _classic(m, r, w, augment=True)
    SCENARIOS[f"branchy-bucket-{_m}"] = lambda r, w, m=_m: _classic(
        m,
        r,
        w,
        make=_Branchy,
        branchy=True,
        per_shard=True,
        options={"find_unused_parameters": True, "gradient_as_bucket_view": True},
    )
for _m in [*SOLVERS, "unrolled"]:
    SCENARIOS[f"infos-{_m}"] = lambda r, w, m=_m: _infos(m, r, w)
SCENARIOS["branchy-subset-implicit"] = lambda r, w: _classic(
    "implicit", r, w, make=_Branchy, branchy=True, per_shard=True, subset=_heads,
    options={"find_unused_parameters": True},
)  # fmt: skip
SCENARIOS["settings-unrolled"] = lambda r, w: _tuned_optimiser_or_examples("settings", "unrolled", r, w)
for _m in ("implicit", "unrolled"):
    SCENARIOS[f"examples-{_m}"] = lambda r, w, m=_m: _tuned_optimiser_or_examples("examples", m, r, w)
for _f in ("selftuning", "selftuning-delta", "bestresponse"):
    SCENARIOS[f"unused-{_f}"] = lambda r, w, f=_f: _best_response_unused(f, r, w)
    SCENARIOS[f"unequal-{_f}"] = lambda r, w, f=_f: _best_response_unused(f, r, w, cut=6)
for _map in (False, True):
    for _o, _opts in (
        ("default", {}),
        ("unused", {"find_unused_parameters": True}),
        ("bucket", {"gradient_as_bucket_view": True}),
    ):
        SCENARIOS[f"marglik-{'map-' if _map else ''}{_o}"] = lambda r, w, o=_opts, mp_=_map: _marglik(
            r, w, o, mp_
        )
for _m in ("implicit", "unrolled"):
    SCENARIOS[f"group-{_m}"] = lambda r, w, m=_m: _classic(
        m, r, w, options={"process_group": "new", "find_unused_parameters": True}
    )
SCENARIOS["comm-hook"] = lambda r, w: _comm_hooked(r, w)
SCENARIOS["bn-nobroadcast-unrolled"] = lambda r, w: _classic(
    "unrolled", r, w, make=_bn_net, per_shard=True, options={"broadcast_buffers": False}
)


def _infos(method: str, rank: int, world: int) -> dict[str, Any]:
    """``hopt.hypergradient()`` (no step) and every logged number of the hyperstep's info."""
    module = _net()
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    hp = hg.hparams.WeightDecay(module, per="parameter", init=1e-2)
    kw: dict[str, Any] = {
        "inner_optimizer": torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        "outer_optimizer": torch.optim.Adam(hp.parameters(), lr=0.05),
    }
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(model, hp, _train, _ce, steps=3, **kw)
    else:
        if method == "implicit-subset":
            kw["hessian_subset"] = lambda n: n.startswith("2.")
        hopt = hg.Implicit(model, hp, _train, _ce, solver=SOLVERS[method](), **kw)
    batches, vb = _data()
    out: dict[str, Any] = {"infos": [], "peeked": []}
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            tb, v = _shard(b, rank, world), _shard(vb, rank, world)
            grads, peek = hopt.hypergradient(train_batch=tb, val_batch=v)
            info = hopt.hyper_step(train_batch=tb, val_batch=v)
            out["peeked"].append([g.clone() for g in grads])
            for one in (peek, info):
                out["infos"].append(
                    [
                        one.outer_loss,
                        one.hypergrad_norm,
                        one.train_loss,
                        one.solver_residual,
                        one.solver_iterations,
                    ]
                )
            out.setdefault("grads", []).append([p.grad.clone() for p in hp.parameters()])
    return out


def _tuned_optimiser_or_examples(what: str, method: str, rank: int, world: int) -> dict[str, Any]:
    """The optimiser's own settings as hyperparameters (``LearningRate(relative=True)`` under a
    StepLR schedule, ``Momentum``, and a weight decay), or one ``ExampleWeights`` entry per
    training example (the batches carry their examples' indices)."""
    module = _net()
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(inner, 1, gamma=0.9)
    hp: nn.Module
    if what == "settings":
        hp = nn.ModuleDict(
            {
                "lr": hg.hparams.LearningRate(inner, relative=True, dtype=DT),
                "mom": hg.hparams.Momentum(inner, dtype=DT),
                "wd": hg.hparams.WeightDecay(module, per="layer", init=1e-2),
            }
        )

        def train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            return _ce(m, h, b) + h["wd"].penalty(m)
    else:
        hp = hg.hparams.ExampleWeights(48, init=0.7, dtype=DT)

        def train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            per = nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
            return (h(b[2]) * per).mean()

    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(
            model, hp, train, _ce, inner_optimizer=inner, outer_optimizer=outer, steps=3, checkpoint=True
        )
    else:
        hopt = hg.Implicit(
            model,
            hp,
            train,
            _ce,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.CG(maxiter=4, damping=0.1),
        )
    batches, vb = _data()
    grads = []
    for i, (x, y) in enumerate(batches):
        b = (x, y, torch.arange(8 * i, 8 * i + 8))
        hopt.step(_shard(b, rank, world))
        sched.step()
        if i % 3 == 2:
            hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            grads.append([p.grad.clone() for p in hp.parameters()])
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
    }


class _Stn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(5, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.l1(x, d)), d)


def _stn_loss(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], h), b[1])


def _hn_train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    w = getattr(m, "module", m).weights(h)
    return nn.functional.cross_entropy(m(b[0], hparams=h), b[1]) + h.draw(1)["decay"][0] * sum(
        (t**2).sum() for t in w.values()
    )


def _hn_val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], hparams=h), b[1])


#: a perturbation scale below float64's resolution of the hyperparameters: one process and two
#: ranks (which draw different noise) agree
TINY: dict[str, Any] = {"scale": 5e-31, "scale_range": (1e-32, 1e-30)}


def _best_response_unused(family: str, rank: int, world: int, cut: int | None = None) -> dict[str, Any]:
    """SelfTuning (plain, Delta) or BestResponse under ``find_unused_parameters=True``: hypergrad
    turns the reducer off and averages the gradients itself (Delta-STN's several backward passes).
    With ``cut``: DDP's default options, rank 0's shards the first ``cut`` examples, and one
    process on the mean of the two shards' losses."""
    torch.manual_seed(0)
    decay = hg.hparams.Positive(0.1, transform="exp")
    if family.startswith("selftuning"):
        hp: Any = hg.hparams.SelfTuned(decay=decay, dtype=DT, **TINY)
        module: nn.Module = _Stn(hp.size).to(DT)
    else:
        hp = hg.hparams.SelfTuned(decay=decay, learn_scale=False, dtype=DT, **TINY)
        module = hg.nn.HyperNet(_net(), hp.size).to(DT)
    unused = cut is None
    model = (
        nn.parallel.DistributedDataParallel(module, find_unused_parameters=unused) if world > 1 else module
    )
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    stn, hn_train, hn_val = _stn_loss, _hn_train, _hn_val
    if cut is not None and world == 1:
        stn, hn_train, hn_val = (
            _mean_of_shards(stn, cut),
            _mean_of_shards(hn_train, cut),
            _mean_of_shards(hn_val, cut),
        )
    hopt: hg.HyperOptimizer
    if family.startswith("selftuning"):
        hopt = hg.SelfTuning(
            model, hp, stn, stn, inner_optimizer=inner, outer_optimizer=outer, warmup=1,
            train_steps=3, delta=family.endswith("delta"),
        )  # fmt: skip
    else:
        hopt = hg.BestResponse(model, hp, hn_train, hn_val, inner_optimizer=inner, outer_optimizer=outer)
    batches, vb = _data()
    grads = []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world, cut))
        if i % 3 == 2:
            assert not hopt.hyper_step(val_batch=_shard(vb, rank, world, cut)).skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
    }


def _marglik(rank: int, world: int, options: dict[str, Any], through_map: bool) -> dict[str, Any]:
    """MarginalLikelihood (its Laplace bound, or through the MAP) under DDP options."""
    module = _net()
    model = nn.parallel.DistributedDataParallel(module, **options) if world > 1 else module
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0).to(DT)})
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=48, subset_size=4,
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), through_map=through_map,
        solver=hg.CG(maxiter=20, damping=0.1) if through_map else None,
    )  # fmt: skip
    batches, vb = _data()
    grads = []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            assert not hopt.hyper_step(
                train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world)
            ).skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
    }


def _comm_hooked(rank: int, world: int) -> dict[str, Any]:
    """Unrolled on a DDP model with an fp16-compression communication hook: the real steps apply
    the compressed average, the replay the exact one."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    module = _net()
    model = nn.parallel.DistributedDataParallel(module)
    model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    hp = hg.hparams.WeightDecay(module, per="parameter", init=1e-2)
    hopt = hg.Unrolled(
        model, hp, _train, _ce, steps=3,
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    batches, vb = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches[:3]:
            hopt.step(_shard(b, rank, world))
        hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, hg.ReplayWarning)]}


def _rank0_resume(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Saved on rank 0 right after a hyperstep: what rank 1 is told; then the same after
    ``start_episode()`` on every rank, resumed on both ranks."""
    plain = f"{tmp}/unrolled-rank0-plain.pt"
    _classic("unrolled", rank, world, schedulers=True, save=plain, stop=3)
    dist.barrier()
    refusal = ""
    try:  # (no collective after the load: a rank that refused does not leave the other waiting)
        _classic("unrolled", rank, world, schedulers=True, start=3, stop=3, load=plain)
    except ValueError as e:
        refusal = str(e)
    dist.barrier()
    path = f"{tmp}/unrolled-rank0.pt"
    straight = _classic("unrolled", rank, world, schedulers=True, save=path, new_episode=True)
    dist.barrier()
    resumed = _classic("unrolled", rank, world, schedulers=True, start=3, load=path)
    return {"straight": straight, "resumed": resumed, "refusal": refusal}


def _loaded_on_rank_0_only(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The DDP habit ``if rank == 0: load(...)`` after the HyperOptimizer (and so the wrapper)
    was built: rank 1 keeps its fresh weights, optimiser state and counters."""
    path = f"{tmp}/implicit-rank0.pt"
    straight = _classic("implicit", rank, world, schedulers=True, save=path)
    dist.barrier()
    try:
        # (two steps, no hyperstep: there rank 1 would estimate Neumann's step size by power
        # iteration, which rank 0 loaded, and the ranks' collectives no longer match: gloo aborts)
        out: dict[str, Any] | str = _classic(
            "implicit", rank, world, schedulers=True, start=3, stop=5, load=path, load_on={0}
        )
    except Exception as e:
        out = f"{type(e).__name__}: {e}"
    return {"straight": straight, "resumed": out}


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
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
        for name, fn in (("rank0-resume", _rank0_resume), ("rank0-only-load", _loaded_on_rank_0_only)):
            try:
                results[name] = fn(rank, world, out)
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("round19_ddp")
    spawn_workers(_worker, WORLD, tmp)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for g in got:
        assert isinstance(g, dict), f"{name} raised: {g}"
    return got


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-9) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12)


def _same_run(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert len(got["grads"]) == len(ref["grads"]) == 2
    for g, r in zip(got["grads"], ref["grads"], strict=True):
        _close(g, r)
    _close(got["hparams"], ref["hparams"])
    _close(got["weights"], ref["weights"])


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["bn-implicit", "bn-unrolled", "bn-nobroadcast-unrolled"])
def test_batchnorm_under_ddp_gives_the_mean_of_the_per_shard_losses(ranks, name) -> None:
    """BatchNorm in training mode under DDP normalises each rank's shard by its own statistics
    (documented), so the hypergradients equal one process's on the mean of the two shards' losses
    (the earlier BatchNorm case only checked that the ranks agree). With ``broadcast_buffers``
    off, nothing trained reads the running statistics either: the weights and hyperparameters
    still agree. New: passes."""
    method = "implicit" if name.startswith("bn-implicit") else "unrolled"
    single = _classic(method, 0, 1, make=_bn_net, per_shard=True)
    a, b = _ok(ranks, name)
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])
    # (the running statistics differ between the ranks either way: DDP broadcasts rank 0's
    # before each forward, and each rank's last forward then updates them with its own shard)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_learned_augmentation_network_under_ddp_gives_the_one_process_run(ranks, method) -> None:
    """The hyperparameters are a plain network (a learned augmentation) reached only through the
    training loss; Unrolled with ``checkpoint=True`` and K = 3. New: passes."""
    single = _classic(method, 0, 1, augment=True)
    a, b = _ok(ranks, f"augment-{method}")
    for got in (a, b):
        _same_run(got, single)
    assert all(bool(g.abs().sum() > 0) for g in single["grads"][0])  # (the hypergradient is not 0)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_branches_per_rank_with_gradient_bucket_views_give_the_mean_of_the_shards(ranks, method) -> None:
    """``find_unused_parameters=True`` (gradients averaged by hypergrad, the reducer off) together
    with ``gradient_as_bucket_view=True`` (the reducer's gradients are views of its buckets): rank
    0 reaches head ``b``, rank 1 head ``c``. New: passes."""
    single = _classic(method, 0, 1, make=_Branchy, branchy=True, per_shard=True)
    a, b = _ok(ranks, f"branchy-bucket-{method}")
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


@pytest.mark.parametrize("method", [*SOLVERS, "unrolled"])
def test_hypergradient_and_every_logged_number_under_ddp_are_the_one_process_ones(ranks, method) -> None:
    """``hopt.hypergradient()`` (the no-step API) returns the ranks' average, equal to the
    hyperstep's, and the info's outer loss, hypergradient norm, training loss and solver residual
    are those of one process on the concatenated batches on every rank (only the outer loss was
    checked before); the Direct and Identity solvers and CG's warm start (untested under DDP
    before) too. New: passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (hessian_subset: layer 0's decay)
        single = _infos(method, 0, 1)
    for got in (r[f"infos-{method}"] for r in ranks):
        assert isinstance(got, dict), got
        for g, r in zip(got["peeked"], single["peeked"], strict=True):
            _close(g, r)
        for g, h in zip(got["peeked"], got["grads"], strict=True):
            _close(g, h)
        assert len(got["infos"]) == len(single["infos"]) == 4
        for gi, ri in zip(got["infos"], single["infos"], strict=True):
            assert gi[4] == ri[4]
            for a, b in zip(gi[:4], ri[:4], strict=True):
                assert (a is None) == (b is None), (gi, ri)
                if a is not None and not (a != a and b != b):  # (Identity: no residual, nan)
                    assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (gi, ri)


def test_the_advice_of_unrolleds_rank_0_refusal_is_one_that_works(ranks) -> None:
    """Rank 0's Unrolled checkpoint loaded on rank 1 is refused (its records are rank 0's shards);
    the message said "or save right after a hyper_step", but a hyperstep keeps the window's K
    records (a later hyperstep may reuse them), so a state saved right after a hyper_step was
    refused alike: the advice sent users in a circle. What works is ``start_episode()`` on every
    rank before saving (checked below)."""
    r0, r1 = ranks[0]["rank0-resume"], ranks[1]["rank0-resume"]
    assert isinstance(r1, dict), r1
    assert r0["refusal"] == ""  # (rank 0's own state)
    said = r1["refusal"]
    assert "saved on rank 0" in said, said
    assert "right after a hyper_step" not in said, said
    assert "start_episode()" in said, said


def test_unrolled_saved_on_rank_0_after_a_new_episode_resumes_both_ranks_bit_exactly(ranks) -> None:
    """Unrolled (``checkpoint=True``) with a scheduler on each optimiser, ``start_episode()`` on
    every rank right after a hyperstep, saved on rank 0, read with ``torch.load(weights_only=True)``
    on both ranks: each continues bit for bit as the uninterrupted run (the earlier DDP resume test
    accepted a refusal instead). New: passes."""
    for r in _ok(ranks, "rank0-resume"):
        s, g = r["straight"], r["resumed"]
        assert s["losses"][3:] == g["losses"]
        assert _equal(s["grads"][1], g["grads"][0])
        assert _equal(s["weights"] + s["hparams"], g["weights"] + g["hparams"])
        assert (s["inner_lr"], s["outer_lr"]) == (g["inner_lr"], g["outer_lr"])
    a, b = (r["rank0-resume"]["resumed"] for r in ranks)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


# ------------------------------------------------------------------------------------- resumes
#
# One process, every family, with ``on_nonfinite="skip"``, ``divergence`` and a scheduler on each
# optimiser; dropout (or the self-tuning perturbations, or a random translation) draws from
# torch's generator. The straight run meets a NaN batch (a refused step), a spiked batch (a step
# refused as diverged) and a NaN validation batch (a refused hyperstep); it is saved right after
# each of them (``torch.save``; read back with ``torch.load(weights_only=True)``, torch's default)
# and resumed into objects built from another seed. The resumed run must continue bit for bit.
# Earlier rounds resumed after a refused step for Unrolled only and never after a refused
# hyperstep or a divergence refusal, nor with schedulers on both optimisers in every family.


class _StnNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 6, n)
        self.l2 = hg.nn.StnLinear(6, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training), d)


def _cls_batch(t: int) -> Batch:
    """Inputs, labels and per-example loss weights (ones; a spiked batch scales them)."""
    g = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    return x, y, torch.ones(12, dtype=DT)


def _weighted_ce(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    return (nn.functional.cross_entropy(logits, b[1], reduction="none") * b[2]).mean()


def _reg_batch(t: int) -> Batch:
    g = torch.Generator().manual_seed(2000 + t)
    x = torch.randn(8, 6, generator=g, dtype=DT)
    return x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(8, 1, generator=g, dtype=DT)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)).to(DT)


def _every(k: int) -> Callable[[hg.HyperOptimizer], bool]:
    return lambda h: h.inner_steps > 0 and h.inner_steps % k == 0 and h.hyper_steps < h.inner_steps // k


GUARDS: dict[str, Any] = {"on_nonfinite": "skip", "divergence": 20.0}


def _build(family: str, seed: int) -> tuple[hg.HyperOptimizer, list[Any], Callable[[Any], bool]]:
    torch.manual_seed(seed)
    hopt: hg.HyperOptimizer
    due: Callable[[Any], bool]
    if family == "bestresponse":
        bhp = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False, dtype=DT
        )
        net = hg.nn.HyperNet(
            nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT), bhp.size, rank=2
        )

        def hn_val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            return _weighted_ce(m(b[0], hparams=h), b)

        def hn_train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            w = m.weights(h)
            return hn_val(m, h, b) + h.draw(1)["decay"][0] * sum((t**2).sum() for t in w.values())

        hopt = hg.BestResponse(
            net, bhp, hn_train, hn_val,
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.Adam(bhp.parameters(), lr=0.05),
            sampling="global", warmup=2, train_steps=2, val_steps=2, **GUARDS,
        )  # fmt: skip
        due = lambda h: h.hyper_due()  # noqa: E731
    elif family == "selftuning":
        shp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        net = _StnNet(shp.size).to(DT)

        def stn(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            return _weighted_ce(m(b[0], h), b)

        inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        outer = torch.optim.Adam(shp.parameters(), lr=0.05)
        hopt = hg.SelfTuning(
            net, shp, stn, stn, inner_optimizer=inner, outer_optimizer=outer,
            delta=True, warmup=2, train_steps=2, val_steps=2, **GUARDS,
        )  # fmt: skip
        due = lambda h: h.hyper_due()  # noqa: E731
    elif family == "marglik":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
        mhp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
                "noise": hg.hparams.ObservationNoise(0.5),
                "shift": hg.hparams.RandomTranslation((6,), init=0.5, max=2.0),
            }
        ).to(DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        outer = torch.optim.Adam(mhp.parameters(), lr=0.05)
        hopt = hg.MarginalLikelihood(
            model, mhp, likelihood="regression", data_size=64, subset_size=4,
            inner_optimizer=inner, outer_optimizer=outer, augmentation_samples=2, burn_in=1, every=2,
            **GUARDS,
        )  # fmt: skip
        due = lambda h: h.hyper_step_due()  # noqa: E731
    else:
        model = _mlp()
        hp: nn.Module = hg.hparams.WeightDecay(model, per="layer", init=1e-2)

        def train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            return _weighted_ce(m(b[0]), b) + (h["wd"] if family == "unrolled-settings" else h).penalty(m)

        def val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
            return _weighted_ce(m(b[0]), b)

        if family == "sgdhd":
            inner = hg.optim.SGDHD(model.parameters(), lr=0.05, hypergrad_lr=1e-3, momentum=0.5)
        else:
            inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if family == "unrolled-settings":  # (the learned rate: a multiplier on the StepLR schedule)
            hp = nn.ModuleDict(
                {
                    "lr": hg.hparams.LearningRate(inner, relative=True, dtype=DT),
                    "mom": hg.hparams.Momentum(inner, dtype=DT),
                    "wd": hp,
                }
            )
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        kw = {"inner_optimizer": inner, "outer_optimizer": outer, **GUARDS}
        if family.startswith("unrolled"):
            hopt = hg.Unrolled(
                model, hp, train, val, steps=3, checkpoint=family == "unrolled-checkpoint", **kw
            )
        else:
            hopt = hg.Implicit(
                model, hp, train, val, solver=hg.CG(maxiter=3, damping=0.1, warm_start=True), **kw
            )
        due = _every(3)
    scheds = [
        torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, 2, gamma=0.8),
        torch.optim.lr_scheduler.ExponentialLR(hopt.outer_optimizer, gamma=0.9),
    ]
    return hopt, scheds, due


#: the straight run: a NaN batch at its 2nd step call, a spiked batch (loss weights x 1e3, or
#: targets + 1e3: diverged) at its 5th, NaN batches for the first hyperstep after that
NAN_STEP, SPIKE_STEP, TOTAL = 1, 4, 14


def _act(
    hopt: hg.HyperOptimizer, scheds: list[Any], due: Callable[[Any], bool], t: int, poisoned: list[bool]
) -> list[Any]:
    reg = isinstance(hopt, hg.MarginalLikelihood)
    batch = _reg_batch(t) if reg else _cls_batch(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if due(hopt):
            vb = _reg_batch(99) if reg else _cls_batch(99)
            if poisoned[1] > SPIKE_STEP and not poisoned[0]:
                poisoned[0] = True
                vb = (torch.full_like(vb[0], float("nan")), *vb[1:])
                batch = (torch.full_like(batch[0], float("nan")), *batch[1:])
            info = hopt.hyper_step(train_batch=batch, val_batch=vb)
            if not info.skipped:
                scheds[1].step()
            return ["hyper", info.skipped, info.outer_loss, info.hypergrad_norm]
        calls, poisoned[1] = poisoned[1], poisoned[1] + 1
        if calls == NAN_STEP:
            batch = (torch.full_like(batch[0], float("nan")), *batch[1:])
        if calls == SPIKE_STEP:
            batch = (batch[0], batch[1] + 1e3) if reg else (batch[0], batch[1], batch[2] * 1e3)
        before = hopt.inner_steps
        loss = float(hopt.step(batch))
        if hopt.inner_steps > before:
            scheds[0].step()
        return ["step", hopt.inner_steps > before, loss]


def _snapshot(hopt: hg.HyperOptimizer, scheds: list[Any], poisoned: list[bool]) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"hopt": hopt.state_dict(), "scheds": [s.state_dict() for s in scheds], "poisoned": list(poisoned)},
        buf,
    )
    return buf.getvalue()


def _same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


FAMILIES = [
    "implicit",
    "sgdhd",
    "unrolled",
    "unrolled-checkpoint",
    "unrolled-settings",
    "selftuning",
    "bestresponse",
    "marglik",
]
_STRAIGHT: dict[str, Any] = {}


def _straight(family: str) -> tuple[list[Any], dict[int, bytes], Any]:
    if family not in _STRAIGHT:
        hopt, scheds, due = _build(family, 0)
        poisoned, log, saved = [False, 0], [], {}
        for t in range(TOTAL):
            log.append(_act(hopt, scheds, due, t, poisoned))
            saved[t] = _snapshot(hopt, scheds, poisoned)
        final = copy.deepcopy((hopt.state_dict(), [s.state_dict() for s in scheds]))
        _STRAIGHT[family] = (log, saved, final)
    return _STRAIGHT[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("point", ["refused-step", "diverged-step", "refused-hyperstep"])
def test_a_run_saved_right_after_a_refusal_resumes_bit_for_bit(family: str, point: str) -> None:
    log, saved, final = _straight(family)
    kinds = [(a[0], a[1]) for a in log]
    steps = [t for t, k in enumerate(kinds) if k[0] == "step"]
    assert kinds[steps[NAN_STEP]] == kinds[steps[SPIKE_STEP]] == ("step", False), kinds
    assert sum(k == ("step", False) for k in kinds) == 2, kinds
    refused_hyper = [t for t, k in enumerate(kinds) if k == ("hyper", True)]
    assert len(refused_hyper) == 1, kinds
    assert sum(k == ("hyper", False) for k in kinds) >= 2, kinds  # (hypersteps before and after)
    at = {
        "refused-step": steps[NAN_STEP],
        "diverged-step": steps[SPIKE_STEP],
        "refused-hyperstep": refused_hyper[0],
    }[point]
    hopt, scheds, due = _build(family, 123)
    state = torch.load(io.BytesIO(saved[at]), weights_only=True)
    hopt.load_state_dict(state["hopt"])
    for s, st in zip(scheds, state["scheds"], strict=True):
        s.load_state_dict(st)
    poisoned = list(state["poisoned"])
    torch.manual_seed(999)  # (the generator must come from the checkpoint)
    hopt.load_state_dict(state["hopt"])
    rest = [_act(hopt, scheds, due, t, poisoned) for t in range(at + 1, TOTAL)]
    _same(rest, log[at + 1 :], "log")
    _same((hopt.state_dict(), [s.state_dict() for s in scheds]), final, "final")


def test_a_hessian_subset_reached_on_one_rank_each_gives_the_mean_of_the_shards(ranks) -> None:
    """Implicit(hessian_subset=the two heads) with a data-dependent branch under
    ``find_unused_parameters=True``: head ``b`` is reached on rank 0 only, head ``c`` on rank 1
    only, so each rank's Hessian block misses the other's head. ``hessian_subset`` was never run
    under DDP before. New: passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (layer a's decay: outside the subset)
        single = _classic("implicit", 0, 1, make=_Branchy, branchy=True, per_shard=True, subset=_heads)
    a, b = _ok(ranks, "branchy-subset-implicit")
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


@pytest.mark.parametrize("name", ["settings-unrolled", "examples-implicit", "examples-unrolled"])
def test_optimiser_settings_and_example_weights_under_ddp_give_the_one_process_run(ranks, name) -> None:
    """The learned learning rate (a multiplier on a StepLR schedule) and momentum written into the
    inner optimiser on every rank, and per-example weights whose entries each rank reaches only
    for its own shard's examples: the hypergradients equal one process's on the concatenated
    batches (neither kind of hyperparameter ran under DDP before). New: passes."""
    what, method = name.split("-")
    single = _tuned_optimiser_or_examples(what, method, 0, 1)
    a, b = _ok(ranks, name)
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])
    assert all(bool(g.abs().sum() > 0) for g in single["grads"][1])


def test_a_checkpoint_loaded_on_rank_0_only_is_refused_at_the_next_step(ranks) -> None:
    """``if rank == 0: hopt.load_state_dict(...)``: DDP broadcasts the weights only when it is
    built, so rank 1 went on from its fresh weights (inner step 0) while rank 0 went on from the
    checkpoint (inner step 3). Every later step averaged the two ranks' gradients, each applied
    to its own weights: the ranks silently trained two different models (the hyperparameters,
    averaged, stayed equal). The first step after should refuse, on every rank alike, naming
    the mismatch (a hyperstep after such a load aborted the processes, SIGABRT, when the ranks'
    solvers then ran different numbers of collectives)."""
    r0, r1 = (r["rank0-only-load"] for r in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    if isinstance(r0["resumed"], dict) and isinstance(r1["resumed"], dict):  # (the bug: how far apart)
        apart = [
            float((a - b).abs().max())
            for a, b in zip(r0["resumed"]["weights"], r1["resumed"]["weights"], strict=True)
        ]
        raise AssertionError(f"no error; the ranks' weights ended up to {max(apart):.3g} apart")
    for r in (r0, r1):
        assert isinstance(r["resumed"], str), r["resumed"]
        assert "RuntimeError" in r["resumed"] and "inner step" in r["resumed"], r["resumed"]
        assert "every rank" in r["resumed"], r["resumed"]


@pytest.mark.parametrize(
    "family",
    [
        "selftuning",
        "selftuning-delta",  # (fixed: the linearised pass ran DDP's forward, whose _DDPSink has no jvp)
        "bestresponse",
    ],
)
def test_best_response_families_under_find_unused_parameters_give_the_one_process_run(ranks, family) -> None:
    """With ``find_unused_parameters=True`` hypergrad turns DDP's reducer off in ``step`` and
    averages the gradients itself; the best-response families were run under DDP's default
    options only (and bucket views / static graphs) before. Plain SelfTuning and BestResponse
    pass. Delta-STN raised "an operation of the model does not support the forward-mode AD ...
    A custom autograd.Function without jvp, or a module hook ... pass linearize=False": the
    operation was DDP's own output wrapper (``_DDPSink``, applied under
    ``find_unused_parameters=True`` even inside ``no_sync()``), and the advice changes the method.
    The response pass needs nothing from the wrapper (the reducer is off in that step)."""
    single = _best_response_unused(family, 0, 1)
    a, b = _ok(ranks, f"unused-{family}")
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


@pytest.mark.parametrize("through_map", [False, True])
@pytest.mark.parametrize("option", ["unused", "bucket"])
def test_marginal_likelihood_under_ddp_options_equals_its_default_ddp_run(ranks, option, through_map) -> None:
    """``find_unused_parameters=True`` (gradients averaged by hypergrad) and
    ``gradient_as_bucket_view=True`` give MarginalLikelihood's run under DDP's defaults (itself
    checked against one process partitioned along the shards in test_distributed.py); neither
    option ran with this family before. New: passes."""
    key = f"marglik-{'map-' if through_map else ''}"
    for r in ranks:
        got, ref = r[key + option], r[key + "default"]
        assert isinstance(got, dict) and isinstance(ref, dict), (got, ref)
        _same_run(got, ref)
    a, b = (r[key + option] for r in ranks)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_float32_run_resumed_into_a_float64_build_is_cast_or_refused_by_name(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 checkpoint loaded into the same run built in float64 (the reverse of round 11's
    float64-into-float32 load): the model, the hyperparameters and both optimisers' states are
    cast to float64 (as ``nn.Module`` / ``torch.optim`` load them; Adam's ``step`` counts stay
    float32) and training goes on finitely, except that Unrolled, saved mid-window, refuses,
    naming both dtypes (its recorded steps were taken on float32 weights). New: passes."""
    module = __import__(__name__)
    monkeypatch.setattr(module, "DT", torch.float32)
    small, scheds, due = _build(family, 0)
    poisoned = [True, 0]  # (no poisoned batches here)
    for t in range(4):
        _act(small, scheds, due, t, poisoned)
    saved = torch.load(io.BytesIO(_snapshot(small, scheds, poisoned)), weights_only=True)
    monkeypatch.setattr(module, "DT", torch.float64)
    big, scheds, due = _build(family, 1)
    if family.startswith("unrolled"):
        with pytest.raises(ValueError, match=r"torch\.float32 \[6, 4\].*torch\.float64 \[6, 4\]"):
            big.load_state_dict(saved["hopt"])
        return
    big.load_state_dict(saved["hopt"])
    state = big.state_dict()
    for part in ("model", "hparams"):
        assert {v.dtype for v in state[part].values() if v.is_floating_point()} == {torch.float64}, part
    for part in ("inner_optimizer", "outer_optimizer"):
        kinds = {
            v.dtype
            for s in state[part]["state"].values()
            for k, v in s.items()
            if torch.is_tensor(v) and v.is_floating_point() and k != "step"
        }
        assert kinds <= {torch.float64}, (part, kinds)
    log = [_act(big, scheds, due, t, poisoned) for t in range(4, 10)]
    assert any(a[0] == "hyper" for a in log)
    assert all(x == x for a in log for x in a[2:] if isinstance(x, float))
    assert all(bool(torch.isfinite(p).all()) for p in big.hparams.parameters())


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_ddp_model_on_a_process_group_of_its_own_gives_the_one_process_run(ranks, method) -> None:
    """``DistributedDataParallel(module, process_group=dist.new_group(...))``: every collective
    hypergrad makes (the replicated hyperparameters, the averaged gradients under
    ``find_unused_parameters=True``, the HVPs, the hypergradient) goes to that group, not the
    default one. New: passes."""
    single = _classic(method, 0, 1)
    a, b = _ok(ranks, f"group-{method}")
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])


def test_unrolleds_replay_warning_names_a_ddp_communication_hook(ranks) -> None:
    """``model.register_comm_hook(None, fp16_compress_hook)``: the real steps apply the
    fp16-rounded average of the gradients, Unrolled's replay the exact mean, so the replay ends
    away from the real weights and Unrolled warns (good: the hypergradient was 1.5e-4 off with
    this hook, 104% with a hook that sums instead of averaging). But the warning listed only
    randomness, state, gradient/optimizer hooks and nondeterministic kernels as causes. Implicit
    and the other families need no replay and are unaffected."""
    for r in _ok(ranks, "comm-hook"):
        said = r["warnings"]
        assert said and "replayed inner steps end" in said[0], said
        assert "register_comm_hook" in said[0], said[0]


@pytest.mark.parametrize("family", ["selftuning", "selftuning-delta", "bestresponse"])
def test_best_response_families_on_unequal_shards_give_the_mean_of_the_per_rank_means(ranks, family) -> None:
    """Shards of 6 and 2 examples: as documented for every family (and checked for Implicit and
    Unrolled before), the hypergradient is that of the mean of the ranks' mean losses, i.e. one
    process on 0.5 * (L(first 6) + L(last 2)). New: passes."""
    single = _best_response_unused(family, 0, 1, cut=6)
    a, b = _ok(ranks, f"unequal-{family}")
    for got in (a, b):
        _same_run(got, single)
    assert _equal(a["weights"] + a["hparams"], b["weights"] + b["hparams"])
