"""DistributedDataParallel across the families and the wrapper's options: two gloo processes on the
CPU, each on its shard of every batch, against one process on the concatenated batches (float64).

One spawned run computes every scenario (each catches its own error, so one failure does not hide
the others); the tests below read its results. Stated semantics: with shards of unequal size the
hypergradient (like DDP's gradient) is the *mean of the per-rank means*, not the mean over the
concatenated batch; that is what one process computes with the loss written as the mean of the
shards' mean losses.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _spawn import spawn_workers
from torch import nn

import hypergrad as hg
from hypergrad._wrap import average_gradients, no_sync, replicate

DT = torch.float64
WORLD = 2
# a perturbation scale far below float64's resolution of the hyperparameters: the best-response
# methods become deterministic, so one process and two ranks (which draw different noise) agree
TINY: dict[str, Any] = {"scale": 5e-31, "scale_range": (1e-32, 1e-30)}
Batch = tuple[torch.Tensor, ...]


# ------------------------------------------------------------------------------------- problems


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


class _Branchy(nn.Module):
    """A branch that the forward never uses (``find_unused_parameters=True``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _branchy() -> nn.Module:
    return _Branchy().to(DT)


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    """Per-example weighted cross-entropy (weights b[2], when given), mean over the batch."""
    per = nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    return (per * b[2]).mean() if len(b) > 2 else per.mean()


def _train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


class _UsedDecay(nn.Module):
    """One L2 decay on the weights the forward uses (not on _Branchy.unused)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.tensor(-4.6, dtype=DT))

    def penalty(self, m: nn.Module) -> torch.Tensor:
        used = [p for n, p in getattr(m, "module", m).named_parameters() if not n.startswith("unused")]
        return 0.5 * self.log_decay.exp() * sum((p**2).sum() for p in used)


def _data(weighted: bool = False) -> tuple[list[Batch], Batch]:
    g = torch.Generator().manual_seed(1)

    def one() -> Batch:
        x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        return (x, y, torch.ones(8, dtype=DT)) if weighted else (x, y)

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


def _mean_of_shards(loss: Callable[..., torch.Tensor], cut: int) -> Callable[..., torch.Tensor]:
    """One process's loss as the mean of the two shards' mean losses (what DDP averages)."""

    def f(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
        return 0.5 * (loss(m, h, _shard(b, 0, 2, cut)) + loss(m, h, _shard(b, 1, 2, cut)))

    return f


def _wrap(module: nn.Module, ddp: bool, **options: Any) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module, **options) if ddp else module


def _result(
    hp: nn.Module, module: nn.Module, grads: list[list[torch.Tensor]], **extra: Any
) -> dict[str, Any]:
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
        **extra,
    }


# ------------------------------------------------------------------------------------- the runs


def _classic(
    method: str,
    rank: int,
    world: int,
    *,
    options: dict[str, Any] | None = None,
    make: Callable[[], nn.Module] = _net,
    train: Callable[..., torch.Tensor] = _train,
    val: Callable[..., torch.Tensor] = _ce,
    freeze: bool = False,
    scheduler: bool = False,
    cut: int | None = None,
    weighted: bool = False,
    poison: Callable[[int, Batch, Batch], tuple[Batch, Batch]] | None = None,
    hp_init: float = 1e-2,
    hp_make: Callable[[nn.Module], nn.Module] | None = None,
    hopt_kw: dict[str, Any] | None = None,
    stop: int = 6,
    resume: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """Implicit (Neumann) or Unrolled (K = 3) on the same script for one process (world = 1) and
    for each rank; a hyperstep after every third step."""
    module = make()
    if freeze:
        module[0].requires_grad_(False)  # type: ignore[index]
    model = _wrap(module, options is not None and world > 1, **(options or {}))
    hp = hp_make(module) if hp_make else hg.hparams.WeightDecay(module, per="parameter", init=hp_init)
    inner = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    kw = hopt_kw or {}
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, steps=3, **kw)
    else:
        hopt = hg.Implicit(
            model,
            hp,
            train,
            val,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.Neumann(steps=3),
            **kw,
        )
    sched = torch.optim.lr_scheduler.StepLR(inner, 1, gamma=0.7) if scheduler else None
    start = 0
    if resume is not None:
        start, path = resume
        error: Exception | None = None
        try:
            hopt.load_state_dict(torch.load(path, weights_only=False))
        except Exception as e:
            error = e
        flag = torch.tensor(float(error is not None))
        if world > 1:  # every rank stops if one refused (else the other waits in a collective)
            dist.all_reduce(flag)
        if error is not None:
            raise error
        if bool(flag):
            raise RuntimeError("another rank refused the checkpoint")
        if sched is not None:
            sched.last_epoch = start
    batches, vb = _data(weighted)
    grads, skipped, train_losses = [], [], []
    for i in range(start, stop):
        b, v = batches[i], vb
        if poison is not None:
            b, v = poison(i, b, v)
        hopt.step(_shard(b, rank, world, cut))
        if sched is not None:
            sched.step()
        if i % 3 == 2:
            info = hopt.hyper_step(
                train_batch=_shard(b, rank, world, cut), val_batch=_shard(v, rank, world, cut)
            )
            grads.append([torch.zeros(()) if p.grad is None else p.grad.clone() for p in hp.parameters()])
            skipped.append(info.skipped)
            train_losses.append(info.train_loss)
    return _result(
        hp, module, grads, skipped=skipped, train_losses=train_losses, inner_steps=hopt.inner_steps, hopt=hopt
    )


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
    w = getattr(m, "module", m).weights(h)  # (the DDP wrapper does not pass .weights on)
    decay = h.draw(1)["decay"][0]
    return nn.functional.cross_entropy(m(b[0], hparams=h), b[1]) + decay * sum(
        (t**2).sum() for t in w.values()
    )


def _hn_val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], hparams=h), b[1])


def _best_response(
    family: str, rank: int, world: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SelfTuning (``selftuning``, ``selftuning-delta``) or BestResponse with a HyperNet."""
    torch.manual_seed(0)
    decay = hg.hparams.Positive(0.1, transform="exp")
    if family.startswith("selftuning"):
        hp: Any = hg.hparams.SelfTuned(decay=decay, dtype=DT, **TINY)
        module: nn.Module = _Stn(hp.size).to(DT)
    else:
        hp = hg.hparams.SelfTuned(decay=decay, learn_scale=False, dtype=DT, **TINY)
        module = hg.nn.HyperNet(_net(), hp.size).to(DT)
    model = _wrap(module, world > 1, **(options or {}))
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if family.startswith("selftuning"):
        hopt = hg.SelfTuning(
            model, hp, _stn_loss, _stn_loss, inner_optimizer=inner, outer_optimizer=outer, warmup=1,
            train_steps=3, delta=family.endswith("delta"),
        )  # fmt: skip
    else:
        hopt = hg.BestResponse(model, hp, _hn_train, _hn_val, inner_optimizer=inner, outer_optimizer=outer)
    batches, vb = _data()
    grads = []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            assert not hopt.hyper_step(val_batch=_shard(vb, rank, world)).skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
    return _result(hp, module, grads)


def _hd(cls: type[torch.optim.Optimizer], rank: int, world: int) -> dict[str, Any]:
    """hg.optim's hypergradient-descent optimisers are torch.optim optimisers, not
    HyperOptimizers: they see DDP's averaged gradients like any optimiser."""
    module = _net()
    model = _wrap(module, world > 1)
    opt = cls(module.parameters(), lr=0.05, hypergrad_lr=1e-2)  # type: ignore[call-arg]
    for b in _data()[0]:
        opt.zero_grad()
        _ce(model, None, _shard(b, rank, world)).backward()
        opt.step()
    lrs = [torch.tensor(g["lr"], dtype=DT) for g in opt.param_groups]
    return _result(nn.ParameterList(), module, [lrs])


def _nan_in_rank0(i: int, b: Batch, v: Batch) -> tuple[Batch, Batch]:
    """A NaN in the concatenated batch's first example (rank 0's shard): an inner step (i = 1)
    and the training batch of a hyperstep (i = 5)."""
    if i in (1, 5):
        x = b[0].clone()
        x[0, 0] = float("nan")
        b = (x, *b[1:])
    return b, v


def _spike_in_rank0(at: int) -> Callable[[int, Batch, Batch], tuple[Batch, Batch]]:
    """Rank 0's examples weighted 10 at step ``at``: the mean loss over the concatenated batch is
    about 5.5 times the first one, rank 1's alone about 1 times."""

    def poison(i: int, b: Batch, v: Batch) -> tuple[Batch, Batch]:
        if i == at:
            w = b[2].clone()
            w[:4] = 10.0
            b = (*b[:2], w)
        return b, v

    return poison


# ------------------------------------------------------------------------------------- the scenarios

CLASSIC_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "bucket-view": {"gradient_as_bucket_view": True},
    "static-graph": {"static_graph": True},
    "frozen": {},
    "scheduler": {},
    "unused-branch": {"find_unused_parameters": True},
}


def _classic_case(name: str, method: str, rank: int, world: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"options": CLASSIC_OPTIONS[name]}
    if name == "frozen":
        kw["freeze"] = True
    if name == "scheduler":
        kw["scheduler"] = True
    if name == "unused-branch":
        kw.update(make=_branchy, hp_make=_UsedDecay)
    return _classic(method, rank, world, **kw)


SCENARIOS: dict[str, Callable[[int, int], Any]] = {}
for _name in CLASSIC_OPTIONS:
    for _method in ("implicit", "unrolled"):
        SCENARIOS[f"{_name}-{_method}"] = lambda r, w, n=_name, m=_method: _classic_case(n, m, r, w)
SCENARIOS.update(
    {
        "selftuning": lambda r, w: _best_response("selftuning", r, w),
        "selftuning-delta": lambda r, w: _best_response("selftuning-delta", r, w),
        "selftuning-delta-bucket-view": lambda r, w: _best_response(
            "selftuning-delta", r, w, {"gradient_as_bucket_view": True}
        ),
        "selftuning-delta-static-graph": lambda r, w: _best_response(
            "selftuning-delta", r, w, {"static_graph": True}
        ),
        "bestresponse": lambda r, w: _best_response("bestresponse", r, w),
        "sgdhd": lambda r, w: _hd(hg.optim.SGDHD, r, w),
        "adamhd": lambda r, w: _hd(hg.optim.AdamHD, r, w),
        # a penalty (outside the forward) on a branch the forward does not use
        "unused-branch-penalised": lambda r, w: _classic(
            "unrolled", r, w, options={"find_unused_parameters": True}, make=_branchy
        ),
        "batchnorm": lambda r, w: _classic("unrolled", r, w, options={}, make=_bn_net),
        "unequal-implicit": lambda r, w: _classic("implicit", r, w, options={}, cut=6),
        "unequal-unrolled": lambda r, w: _classic("unrolled", r, w, options={}, cut=6),
        "nan-implicit": lambda r, w: _classic(
            "implicit", r, w, options={}, poison=_nan_in_rank0, hopt_kw={"on_nonfinite": "skip"}
        ),
        "nan-unrolled": lambda r, w: _classic(
            "unrolled", r, w, options={}, poison=_nan_in_rank0, hopt_kw={"on_nonfinite": "skip"}
        ),
        "divergence-step": lambda r, w: _classic(
            "implicit",
            r,
            w,
            options={},
            weighted=True,
            poison=_spike_in_rank0(1),
            hopt_kw={"on_nonfinite": "skip", "divergence": 3.0},
        ),
        "divergence-hyperstep": lambda r, w: _classic(
            "implicit",
            r,
            w,
            options={},
            weighted=True,
            poison=_spike_in_rank0(5),
            hopt_kw={"on_nonfinite": "skip", "divergence": 3.0},
        ),  # fmt: skip
        "hparams-differ": lambda r, w: _classic(
            "implicit", r, w, options={}, hp_init=1e-2 if r == 0 else 1e-3
        ),
    }
)


def _resume(method: str, rank: int, world: int, tmp: str, every_rank: bool) -> dict[str, Any]:
    """Four steps, save (on rank 0 only, or on every rank), resume on both from a fresh start."""
    first = _classic(method, rank, world, options={}, stop=4)
    path = f"{tmp}/{method}-{'each' if every_rank else 'rank0'}-{rank if every_rank else 0}.pt"
    if every_rank or rank == 0:
        torch.save(first["hopt"].state_dict(), path)
    dist.barrier()
    try:
        out: dict[str, Any] | str = _classic(method, rank, world, options={}, resume=(4, path))
        out.pop("hopt")  # type: ignore[union-attr]
    except Exception as e:  # an error that names the problem is an acceptable answer
        out = f"{type(e).__name__}: {e}"
    return {"resumed": out, "any_failed": isinstance(out, str)}


def _misuse_sets(rank: int) -> str:
    """Rank 1 builds its hyperparameters per layer, rank 0 per parameter."""
    module = _net()
    hp = hg.hparams.WeightDecay(module, per="parameter" if rank == 0 else "layer")
    try:
        hopt = hg.Implicit(
            nn.parallel.DistributedDataParallel(module), hp, _train, _ce,
            inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters()), solver=hg.Neumann(steps=2),
        )  # fmt: skip
        b, v = _data()[0][0], _data()[1]
        hopt.step(_shard(b, rank, WORLD))
        hopt.hyper_step(train_batch=_shard(b, rank, WORLD), val_batch=_shard(v, rank, WORLD))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _helpers(rank: int) -> dict[str, Any]:
    """The DDP helpers of hypergrad._wrap on their own."""
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.zeros(3, dtype=DT)) for _ in range(3)] + [nn.Parameter(torch.zeros(2))]
    ws[0].grad = torch.full((3,), float(rank + 1), dtype=DT)  # 1 and 2: mean 1.5
    ws[1].grad = torch.ones(3, dtype=DT) if rank == 0 else None  # on one rank only: mean 0.5
    # ws[2]: None everywhere stays None; ws[3]: float32, its own all-reduce
    ws[3].grad = torch.full((2,), float(rank), dtype=torch.float32)
    average_gradients(ws, None, WORLD)
    grads = [None if w.grad is None else w.grad.clone() for w in ws]
    module = _Branchy()
    ddp = nn.parallel.DistributedDataParallel(module)
    with no_sync(ddp):
        syncing = ddp.require_backward_grad_sync
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2 * (rank + 1))
    replicate(hp, ddp.process_group, WORLD)
    return {
        "grads": grads,
        "syncing_inside": syncing,
        "syncing_after": ddp.require_backward_grad_sync,
        "hparams": [p.detach().clone() for p in hp.parameters()],
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
                res = fn(rank, world)
                if isinstance(res, dict):
                    res.pop("hopt", None)
                results[name] = res
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()  # (a rank that failed early must not meet the other's collectives)
        for method in ("implicit", "unrolled"):
            for every in (True, False):
                results[f"resume-{method}-{'every-rank' if every else 'rank0'}"] = _resume(
                    method, rank, world, out, every
                )
        results["helpers"] = _helpers(rank)
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # (both saved before a process may abort below)
        # last, as it may bring the process down (a collective of mismatched sizes aborts gloo)
        torch.save(_misuse_sets(rank), f"{out}/misuse{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("peers_ddp")
    try:
        spawn_workers(_worker, WORLD, tmp)
    except mp.ProcessExitedException:  # the misuse case aborting a process (see its test) ...
        if not all((Path(tmp) / f"rank{r}.pt").exists() for r in range(WORLD)):
            raise  # ... not anything before it
    out = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in range(WORLD):
        f = Path(tmp) / f"misuse{r}.pt"
        out[r]["misuse"] = torch.load(f) if f.exists() else "the process died (no Python error)"
    return out


# ------------------------------------------------------------------------------------- checks


def _assert_close(
    got: dict[str, Any], ref: dict[str, Any], keys: tuple[str, ...] = ("grads", "hparams", "weights")
) -> None:
    for key in keys:
        a, b = got[key], ref[key]
        if key == "grads":
            assert len(a) == len(b) > 0
            a, b = [t for s in a for t in s], [t for s in b for t in s]
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")


def _assert_ranks_identical(ranks: list[dict[str, Any]], name: str) -> None:
    a, b = ranks[0][name], ranks[1][name]
    assert isinstance(a, dict) and isinstance(b, dict), (a, b)
    for key in ("hparams", "weights"):
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y), key


def _ok(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for g in got:
        assert isinstance(g, dict), f"{name} raised: {g}"
    return got


FAMILIES = ["selftuning", "bestresponse", "sgdhd", "adamhd"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_other_families_equal_one_process_on_the_concatenated_batches(ranks, family) -> None:
    if family in ("sgdhd", "adamhd"):
        single = _hd(hg.optim.SGDHD if family == "sgdhd" else hg.optim.AdamHD, 0, 1)
    else:
        single = _best_response(family, 0, 1)
    for got in _ok(ranks, family):
        _assert_close(got, single)
    _assert_ranks_identical(ranks, family)


@pytest.mark.parametrize("options", ["", "-bucket-view"])
def test_delta_stn_under_ddp_equals_one_process(ranks, options) -> None:
    single = _best_response("selftuning-delta", 0, 1)
    for got in _ok(ranks, "selftuning-delta" + options):
        _assert_close(got, single)
    _assert_ranks_identical(ranks, "selftuning-delta" + options)


def test_delta_stn_refuses_a_static_graph_at_construction(ranks) -> None:
    for r in ranks:
        got = r["selftuning-delta-static-graph"]
        assert isinstance(got, str) and got.startswith("ValueError") and "static_graph" in got, got


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize("options", list(CLASSIC_OPTIONS))
def test_ddp_options_give_the_one_process_run(ranks, options, method) -> None:
    """gradient_as_bucket_view, static_graph, frozen weights, an LR scheduler on the inner
    optimiser, find_unused_parameters with a branch the forward never uses."""
    name = f"{options}-{method}"
    single = _classic_case(options, method, 0, 1)
    for got in _ok(ranks, name):
        _assert_close(got, single)
        assert got["skipped"] == [False, False]
    _assert_ranks_identical(ranks, name)


def test_a_penalty_on_an_unused_branch_trains_under_find_unused_parameters(ranks) -> None:
    with warnings.catch_warnings():  # (the unused branch's own decay reaches no loss)
        warnings.simplefilter("ignore", hg.DisconnectedWarning)
        single = _classic("unrolled", 0, 1, make=_branchy)
    for got in _ok(ranks, "unused-branch-penalised"):
        _assert_close(got, single)


def test_batchnorm_with_broadcast_buffers_keeps_the_ranks_identical(ranks) -> None:
    """Batch statistics are per shard (as in DDP), so no one-process reference; the ranks agree."""
    _ok(ranks, "batchnorm")
    _assert_ranks_identical(ranks, "batchnorm")


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_unequal_shards_give_the_mean_of_the_per_rank_means(ranks, method) -> None:
    """Shards of 6 and 2: DDP's gradient and every hypergradient average the ranks' mean losses,
    i.e. one process on the loss 0.5 * (L(first 6) + L(last 2)), not on L(all 8)."""
    mean_of_means = _classic(method, 0, 1, train=_mean_of_shards(_train, 6), val=_mean_of_shards(_ce, 6))
    concatenated = _classic(method, 0, 1)
    for got in _ok(ranks, f"unequal-{method}"):
        _assert_close(got, mean_of_means)
        with pytest.raises(AssertionError):
            _assert_close(got, concatenated)
    _assert_ranks_identical(ranks, f"unequal-{method}")


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_nan_on_one_rank_skips_on_every_rank_together(ranks, method) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.NonFiniteWarning)
        single = _classic(method, 0, 1, poison=_nan_in_rank0, hopt_kw={"on_nonfinite": "skip"})
    assert single["inner_steps"] == 4  # (the two poisoned inner steps skipped)
    for got in _ok(ranks, f"nan-{method}"):
        assert got["inner_steps"] == single["inner_steps"]
        assert got["skipped"] == single["skipped"]
        _assert_close(got, single, ("hparams", "weights"))
    _assert_ranks_identical(ranks, f"nan-{method}")


@pytest.mark.parametrize("where", ["step", "hyperstep"])
def test_a_divergence_on_one_rank_is_judged_on_the_concatenated_batch(ranks, where) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.NonFiniteWarning)
        single = _classic(
            "implicit", 0, 1, weighted=True, poison=_spike_in_rank0(1 if where == "step" else 5),
            hopt_kw={"on_nonfinite": "skip", "divergence": 3.0},
        )  # fmt: skip
    assert single["inner_steps"] == 5  # (the spiked inner step skipped)
    assert single["skipped"] == [False, where == "hyperstep"]
    _assert_ranks_identical(ranks, f"divergence-{where}")
    for got in _ok(ranks, f"divergence-{where}"):
        assert (got["inner_steps"], got["skipped"]) == (single["inner_steps"], single["skipped"])
        _assert_close(got, single, ("hparams", "weights"))


def test_implicit_reports_the_training_loss_of_the_concatenated_batch(ranks) -> None:
    single = _classic_case("plain", "implicit", 0, 1)
    for got in _ok(ranks, "plain-implicit"):
        for a, b in zip(got["train_losses"], single["train_losses"], strict=True):
            assert a == pytest.approx(b, rel=1e-12)


def test_hyperparameters_start_from_rank_0s_values_on_every_rank(ranks) -> None:
    single = _classic("implicit", 0, 1)
    _assert_ranks_identical(ranks, "hparams-differ")
    for got in _ok(ranks, "hparams-differ"):
        _assert_close(got, single)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_save_on_every_rank_and_resume_repeats_the_straight_run(ranks, method) -> None:
    straight = [r[f"plain-{method}"] for r in ranks]
    for got, ref in zip(ranks, straight, strict=True):
        res = got[f"resume-{method}-every-rank"]
        assert not res["any_failed"], res
        for key in ("hparams", "weights"):
            for x, y in zip(res["resumed"][key], ref[key], strict=True):
                assert torch.equal(x, y), key


def _resumed_exactly_or_refused(ranks: list[dict[str, Any]], method: str) -> None:
    straight = [r[f"plain-{method}"] for r in ranks]
    results = [r[f"resume-{method}-rank0"] for r in ranks]
    if any(r["any_failed"] for r in results):  # a clear refusal (on the rank whose shards it lacks)
        messages = [r["resumed"] for r in results if isinstance(r["resumed"], str)]
        assert messages and all("rank" in m for m in messages), messages
        return
    for res, ref in zip(results, straight, strict=True):
        for key in ("hparams", "weights"):
            for x, y in zip(res["resumed"][key], ref[key], strict=True):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=0.0, msg=key)


def test_implicit_saved_on_rank_0_resumes_on_both_ranks_exactly(ranks) -> None:
    _resumed_exactly_or_refused(ranks, "implicit")


def test_unrolled_saved_on_rank_0_resumes_exactly_or_refuses(ranks) -> None:
    _resumed_exactly_or_refused(ranks, "unrolled")


def test_ranks_with_different_hyperparameters_are_refused_clearly(ranks) -> None:
    for r in ranks:
        got = r["misuse"]
        assert got.startswith("ValueError") and "different hyperparameters" in got, got


def test_the_ddp_helpers(ranks) -> None:
    a, b = (r["helpers"] for r in ranks)
    for got in (a, b):
        g = got["grads"]
        assert torch.equal(g[0], torch.full((3,), 1.5, dtype=DT))
        assert torch.equal(g[1], torch.full((3,), 0.5, dtype=DT))  # a gradient on one rank only
        assert g[2] is None  # on no rank: still None
        assert g[3].dtype == torch.float32 and torch.equal(g[3], torch.full((2,), 0.5))
        assert got["syncing_inside"] is False and got["syncing_after"] is True
    rank0 = hg.hparams.WeightDecay(_Branchy(), per="layer", init=1e-2)
    for x, y, z in zip(a["hparams"], b["hparams"], rank0.parameters(), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z.detach())  # rank 0's values on both


def test_no_sync_and_average_gradients_do_nothing_without_ddp() -> None:
    w = nn.Parameter(torch.ones(2))
    w.grad = torch.full((2,), 3.0)
    average_gradients([w], None, 1)
    with no_sync(nn.Linear(2, 2)):
        pass
    replicate(nn.Linear(2, 2), None, 1)
    assert torch.equal(w.grad, torch.full((2,), 3.0))
