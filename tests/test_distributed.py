"""DistributedDataParallel: two gloo processes on the CPU give the hypergradients of one process on
the concatenated batches, and end with identical weights and hyperparameters on every rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hypergrad as hg

DT = torch.float64
WORLD = 2
METHODS = ("implicit-neumann", "implicit-cg", "unrolled", "unrolled-checkpoint")


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
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
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
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, f"file://{tmp / 'init'}", str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_hypergradients_equal_one_process_on_the_concatenated_batches(ranks, method) -> None:
    single = _run(method, _net(), 0, 1)
    for r in ranks:
        got = r[method]
        assert len(got["grads"]) == len(single["grads"]) == 2
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
