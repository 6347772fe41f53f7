"""DistributedDataParallel: two gloo processes on the CPU give the hypergradients of one process on
the concatenated batches, and end with identical weights and hyperparameters on every rank."""

from __future__ import annotations

import os
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
METHODS = ("implicit-neumann", "implicit-cg", "unrolled", "unrolled-checkpoint", "unrolled-every-step")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)
    ]
    val = (torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    return batches, val


def _shard(b: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(b[0]) // world
    return b[0][rank * n : (rank + 1) * n], b[1][rank * n : (rank + 1) * n]


def _run(method: str, model: nn.Module, rank: int, world: int) -> dict[str, Any]:
    """The same script for one process (world = 1) and for each DDP rank."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    hp = hg.hparams.WeightDecay(module, per="parameter", init=1e-2)
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    if method.startswith("unrolled"):
        hopt: hg.HyperOptimizer = hg.Unrolled(
            model,
            hp,
            _train,
            _ce,
            inner_optimizer=inner,
            outer_optimizer=outer,
            steps=3,
            checkpoint=method.endswith("checkpoint"),
        )
    else:
        solver = hg.Neumann(steps=3) if method == "implicit-neumann" else hg.CG(maxiter=5, damping=0.1)
        hopt = hg.Implicit(
            model, hp, _train, _ce, inner_optimizer=inner, outer_optimizer=outer, solver=solver
        )
    batches, val = _data()
    grads = []
    every = 1 if method == "unrolled-every-step" else 3  # (overlapping windows: the ring re-runs)
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % every == every - 1:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(val, rank, world))
            grads.append([p.grad.clone() for p in hp.parameters()])
            assert not info.skipped
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
        "outer_loss": info.outer_loss,
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for method in METHODS:
            model = nn.parallel.DistributedDataParallel(_net())
            results[method] = _run(method, model, rank, world)
        model = nn.parallel.DistributedDataParallel(_net())
        hp = hg.hparams.WeightDecay(model.module, per="layer")
        try:
            hg.Unrolled(
                model,
                hp,
                _train,
                _ce,
                mode="forward",
                inner_optimizer=torch.optim.SGD(model.module.parameters(), lr=0.1),
                outer_optimizer=torch.optim.Adam(hp.parameters()),
            )
            results["forward_error"] = ""
        except ValueError as e:
            results["forward_error"] = str(e)
        results["families"] = {f: _run_family(f, rank, world, ddp=True) for f in FAMILIES}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    spawn_workers(_worker, WORLD, tmp)
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_hypergradients_equal_one_process_on_the_concatenated_batches(ranks, method) -> None:
    single = _run(method, _net(), 0, 1)
    for r in ranks:
        got = r[method]
        assert len(got["grads"]) == len(single["grads"]) == (6 if method == "unrolled-every-step" else 2)
        for step_got, step_ref in zip(got["grads"], single["grads"], strict=True):
            for a, b in zip(step_got, step_ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        for key in ("hparams", "weights"):
            for a, b in zip(got[key], single[key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert abs(got["outer_loss"] - single["outer_loss"]) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_every_rank_ends_identical(ranks, method) -> None:
    a, b = ranks[0][method], ranks[1][method]
    for key in ("hparams", "weights"):
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y), key


def test_forward_mode_refuses_ddp_clearly(ranks) -> None:
    for r in ranks:
        assert "forward" in r["forward_error"] and "DistributedDataParallel" in r["forward_error"]


def test_a_one_rank_ddp_model_works_like_the_bare_one() -> None:
    # a one-rank gloo group in this process is enough to build the wrapper
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            model = nn.parallel.DistributedDataParallel(_net())
            hp = hg.hparams.WeightDecay(model.module, per="layer")
            inner = torch.optim.SGD(model.module.parameters(), lr=0.1)
            hopt = hg.Unrolled(
                model,
                hp,
                _train,
                _ce,
                inner_optimizer=inner,
                outer_optimizer=torch.optim.Adam(hp.parameters()),
                steps=2,
            )
            assert hopt.ranks.size == 1
            # one rank: a DDP model behaves exactly like the bare one
            b = _data()[0][0]
            hopt.step(b)
            hopt.hyper_step(val_batch=b)
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------- the best-response and marginal-
# likelihood families: each averages its hypergradient over the ranks itself (torch.autograd.grad
# bypasses DDP's reducer); without it every rank moved its hyperparameters on its own shard


class _Stn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(5, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training)
        return self.l2(h, d)


def _stn_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], h), b[1])


FAMILIES = ("selftuning", "marglik", "marglik-through-map")


def _run_family(family: str, rank: int, world: int, ddp: bool) -> dict[str, Any]:
    torch.manual_seed(0)  # the same weights, and the same perturbation streams, on every rank
    if family == "selftuning":
        hp: nn.Module = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        module: nn.Module = _Stn(hp.size).to(DT)
    else:
        module = _net()
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0).to(DT)})
    model = nn.parallel.DistributedDataParallel(module) if ddp else module
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    if family == "selftuning":
        hopt: hg.HyperOptimizer = hg.SelfTuning(
            model, hp, _stn_loss, _stn_loss, inner_optimizer=inner, outer_optimizer=outer, warmup=1,
            train_steps=3,
        )  # fmt: skip
    else:
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=48, subset_size=8 // WORLD,  # the shards
            inner_optimizer=inner, outer_optimizer=outer, through_map=family.endswith("map"),
            solver=hg.CG(maxiter=20, damping=0.1) if family.endswith("map") else None,
        )  # fmt: skip
    batches, val = _data()
    grads = []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(val, rank, world))
            assert not info.skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
    return {
        "grads": grads,
        "hparams": [p.detach().clone() for p in hp.parameters()],
        "weights": [p.detach().clone() for p in module.parameters()],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rank_of_the_other_families_ends_identical(ranks, family) -> None:
    a, b = ranks[0]["families"][family], ranks[1]["families"][family]
    assert len(a["grads"]) == 2
    for key in ("hparams", "weights", "grads"):
        for x, y in zip(a[key], b[key], strict=True):
            for s, t in zip(x if key == "grads" else [x], y if key == "grads" else [y], strict=True):
                assert torch.equal(s, t), key


@pytest.mark.parametrize("family", ["marglik", "marglik-through-map"])
def test_ddp_marginal_likelihood_equals_one_process_partitioned_along_the_shards(ranks, family) -> None:
    """Each rank's bound is its shard's, scaled by N/B; their mean is the one-process bound of the
    concatenated batch with the shards as its blocks: same hypergradients, same run."""
    single = _run_family(family, 0, 1, ddp=False)
    got = ranks[0]["families"][family]
    for step_got, step_ref in zip(got["grads"], single["grads"], strict=True):
        for x, y in zip(step_got, step_ref, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for key in ("hparams", "weights"):
        for x, y in zip(got[key], single[key], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
