"""Round 9: DistributedDataParallel as real multi-GPU research scripts use it, on two gloo processes
on the CPU (float64), against one process; and the base class's guards and state outside DDP.

One spawned run computes every scenario (each catches its own error, so one failure does not hide
the others); the tests below read its results. New here: a model wrapped in DDP *after* the
HyperOptimizer was built (silently trained each rank on its own: now warned), DDP's ``join()``
(aborted the process in a collective mismatch: now a clear error), a checkpoint saved on rank 0
loaded on every rank with per-rank seeds (silently not the straight run: now warned, and saving on
every rank is bit-exact), data-dependent branches that differ between the ranks under
``find_unused_parameters=True``, hyperparameters wrapped in DDP, ``torch.compile`` inside and
outside the wrapper, a non-finite batch on one rank in SelfTuning and MarginalLikelihood, and
rank-0 resumes of those two families.
"""

from __future__ import annotations

import copy
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

DT = torch.float64
WORLD = 2
Batch = tuple[torch.Tensor, ...]
DDP = nn.parallel.DistributedDataParallel


# ------------------------------------------------------------------------------------- problems


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    extra = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), *extra, nn.Linear(8, 3)).to(DT)


class _Branchy(nn.Module):
    """A data-dependent branch: a batch whose first entry is positive goes through ``b``, else
    through ``c`` (under DDP rank 0's shards take ``b``, rank 1's ``c``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) if x[0, 0] > 0 else self.c(h)


class _Stn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(5, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.l1(x, d)), d)


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _train_wrapped_hp(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.module.penalty(m)  # (hparams wrapped in DDP: its container is .module)


def _stn_loss(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], h), b[1])


def _data(branchy: bool = False) -> tuple[list[Batch], Batch]:
    g = torch.Generator().manual_seed(1)

    def one() -> Batch:
        x, y = torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        if branchy:  # rank 0's shard (the first half) through branch b, rank 1's through c
            x[0, 0], x[4, 0] = 1.0, -1.0
        return x, y

    batches = [one() for _ in range(6)]
    return batches, one()


def _shard(b: Batch, rank: int, world: int) -> Batch:
    n = len(b[0]) // world
    return tuple(t[rank * n : (rank + 1) * n] for t in b)


def _mean_of_shards(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """One process's loss as the mean of the two shards' losses (what DDP averages, and the only
    one-process equivalent when a shard's forward depends on the shard)."""

    def f(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
        return 0.5 * (loss(m, h, _shard(b, 0, 2)) + loss(m, h, _shard(b, 1, 2)))

    return f


def _poison(b: Batch) -> Batch:
    x = b[0].clone()
    x[0, 0] = float("nan")  # the concatenated batch's first example: rank 0's shard
    return (x, *b[1:])


def _params(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


# ------------------------------------------------------------------------------------- the runs


def _classic(
    method: str,
    rank: int,
    world: int,
    *,
    wrap: Callable[[nn.Module], nn.Module] | None = DDP,
    wrap_after: bool = False,
    make: Callable[[], nn.Module] = _net,
    branchy: bool = False,
    hp_ddp: bool = False,
    seed: int | None = None,
    stop: int = 6,
    load: str | None = None,
    save: str | None = None,
) -> dict[str, Any]:
    """Implicit (CG) or Unrolled (K = 3) on the same script for one process (world = 1, no
    wrapper) and for each rank; a hyperstep after every third step. ``seed``: reseed torch's
    generator (+ rank) once built, as per-rank-seeded scripts do."""
    module = make()
    model = wrap(module) if wrap is not None and world > 1 and not wrap_after else module
    hp: nn.Module = hg.hparams.WeightDecay(module, per="layer", init=1e-2)
    train, val = _train, _ce
    if hp_ddp and world > 1:
        hp, train = DDP(hp), _train_wrapped_hp
    if branchy and world == 1:
        train, val = _mean_of_shards(train), _mean_of_shards(val)
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, steps=3)
    else:
        hopt = hg.Implicit(
            model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer,
            solver=hg.CG(maxiter=5, damping=0.1),
        )  # fmt: skip
    if wrap is not None and wrap_after and world > 1:
        model = wrap(module)  # (a research script's `model = DDP(model)` a few lines too late)
    if seed is not None:
        torch.manual_seed(seed + rank)
    start = 0
    if load is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hopt.load_state_dict(torch.load(load, weights_only=True))
        load_warnings = [str(w.message) for w in caught]
        start = hopt.inner_steps
    batches, vb = _data(branchy)
    grads = []
    for i in range(start, stop):
        b = batches[i]
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            assert not info.skipped
            grads.append([p.grad.clone() for p in hp.parameters()])
    if save is not None:
        torch.save(hopt.state_dict(), save)
    out: dict[str, Any] = {"grads": grads, "state": _params(hp, module)}
    if load is not None:
        out["load_warnings"] = load_warnings
    return out


def _family(family: str, rank: int, world: int, *, poison: tuple[int, ...] = (), stop: int = 6,
            load: str | None = None, save: str | None = None) -> dict[str, Any]:  # fmt: skip
    """SelfTuning (perturbations far below float64's resolution: deterministic) or
    MarginalLikelihood; ``poison``: inner steps whose batch (and, for 2 and 5, the hyperstep's
    batches) hold a NaN on rank 0's shard."""
    torch.manual_seed(0)
    module: nn.Module
    if family == "selftuning":
        hp: nn.Module = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.1, transform="exp"), dtype=DT, scale=5e-31, scale_range=(1e-32, 1e-30)
        )
        module = _Stn(hp.size).to(DT)  # type: ignore[arg-type]
    else:
        module = _net()
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0).to(DT)})
    model = DDP(module) if world > 1 else module
    inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if family == "selftuning":
        hopt = hg.SelfTuning(
            model, hp, _stn_loss, _stn_loss, inner_optimizer=inner, outer_optimizer=outer, warmup=1,
            train_steps=3, on_nonfinite="skip",
        )  # fmt: skip
    else:
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=48, subset_size=8 // WORLD,
            inner_optimizer=inner, outer_optimizer=outer, on_nonfinite="skip",
        )  # fmt: skip
    start = 0
    if load is not None:
        hopt.load_state_dict(torch.load(load, weights_only=True))
        start = hopt.inner_steps
    batches, vb = _data()
    skipped = []
    for i in range(start, stop):
        b, v = batches[i], vb
        if i in poison:
            b = _poison(b)
            v = _poison(v) if i in (2, 5) else v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.NonFiniteWarning)
            hopt.step(_shard(b, rank, world))
            if i % 3 == 2:
                info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(v, rank, world))
                skipped.append(info.skipped)
    if save is not None:
        torch.save(hopt.state_dict(), save)
    return {"skipped": skipped, "inner_steps": hopt.inner_steps, "state": _params(hp, module)}


def _joined(rank: int, world: int) -> dict[str, Any]:
    """Unequal numbers of batches under DDP's join(): rank 1 has one batch fewer."""
    module = _net()
    model = DDP(module)
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2)
    hopt = hg.Implicit(
        model, hp, _train, _ce, inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters()), solver=hg.CG(maxiter=3),
    )  # fmt: skip
    before = _params(hp, module)
    batches, vb = _data()
    errors = []
    for call in ("step", "hyper_step"):
        try:
            with model.join():
                for b in batches[: 3 if rank == 0 else 2]:
                    if call == "step":
                        hopt.step(_shard(b, rank, world))
                    else:
                        hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            errors.append("no error")
        except RuntimeError as e:
            errors.append(str(e))
    # torch leaves the wrapper in join mode after the block (still refused), until it is turned off;
    # then the run goes on (no collective was left half-done)
    try:
        hopt.step(_shard(batches[0], rank, world))
        errors.append("no error")
    except RuntimeError as e:
        errors.append(str(e))
    refused = _params(hp, module)
    model.join(enable=False)
    hopt.step(_shard(batches[0], rank, world))
    return {"errors": errors, "before": before, "refused": refused, "after": _params(hp, module)}


def _wrapped_late(rank: int, world: int) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _classic("implicit", rank, world, wrap_after=True)
    out["warnings"] = [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _classic("implicit", rank, world, stop=3)  # (wrapped first: nothing to say)
    out["warnings_wrapped_first"] = [str(w.message) for w in caught]
    return out


def _compiled(inside: bool) -> Callable[[nn.Module], nn.Module]:
    def wrap(module: nn.Module) -> nn.Module:
        if inside:
            return DDP(torch.compile(module, backend="eager"))  # type: ignore[arg-type]
        return torch.compile(DDP(module), backend="eager")  # type: ignore[return-value]

    return wrap


def _resumes(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Dropout, per-rank seeds: the straight run; saved at step 4 on every rank, and on rank 0."""
    net = lambda: _net(dropout=0.3)  # noqa: E731
    straight = _classic("implicit", rank, world, make=net, seed=100)
    own, shared = f"{tmp}/own{rank}.pt", f"{tmp}/rank0.pt"
    _classic("implicit", rank, world, make=net, seed=100, stop=4, save=own)
    if rank == 0:
        torch.save(torch.load(own, weights_only=True), shared)
    dist.barrier()
    out = {"straight": straight}
    for name, path in (("own", own), ("rank0", shared)):
        out[name] = _classic("implicit", rank, world, make=net, seed=999, load=path)
    # a plain DDP run, saved on rank 0 at step 4 (for a resume in one process, without DDP)
    out["plain-straight"] = _classic("implicit", rank, world)
    _classic("implicit", rank, world, stop=4, save=f"{tmp}/plain.pt" if rank == 0 else None)
    # the same seed on every rank: rank 0's checkpoint resumes every rank exactly (both families)
    for fam in ("selftuning", "marglik"):
        out[f"{fam}-straight"] = _family(fam, rank, world)
        path = f"{tmp}/{fam}.pt"
        _family(fam, rank, world, stop=4, save=path if rank == 0 else None)
        dist.barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (the other rank's generator: alike here)
            out[f"{fam}-resumed"] = _family(fam, rank, world, load=path)
    return out


def _clipped(method: str, rank: int, world: int, **options: Any) -> dict[str, Any]:
    """Adam inner steps clipped to a norm that bites (0.05), under the wrapper's options."""
    module = _net()
    model = DDP(module, **options) if world > 1 else module
    hp = hg.hparams.WeightDecay(module, per="parameter", init=1e-2)
    inner = torch.optim.Adam(module.parameters(), lr=0.05)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt: hg.HyperOptimizer
    if method == "unrolled":
        hopt = hg.Unrolled(model, hp, _train, _ce, inner_optimizer=inner, outer_optimizer=outer, steps=3)
    else:
        hopt = hg.Implicit(
            model, hp, _train, _ce, inner_optimizer=inner, outer_optimizer=outer,
            solver=hg.CG(maxiter=4, damping=0.1),
        )  # fmt: skip
    batches, vb = _data()
    grads, norms = [], []
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world), max_grad_norm=0.05)
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).norm()))
        if i % 3 == 2:
            hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(vb, rank, world))
            grads.append([p.grad.clone() for p in hp.parameters()])
    return {"grads": grads, "state": _params(hp, module), "norms": norms}


SCENARIOS: dict[str, Callable[[int, int], Any]] = {
    "clip-unrolled": lambda r, w: _clipped("unrolled", r, w, find_unused_parameters=True),
    "clip-implicit": lambda r, w: _clipped("implicit", r, w, gradient_as_bucket_view=True, static_graph=True),
    "wrapped-late": _wrapped_late,
    "branchy-implicit": lambda r, w: _classic(
        "implicit", r, w, wrap=lambda m: DDP(m, find_unused_parameters=True), make=_Branchy, branchy=True
    ),
    "branchy-unrolled": lambda r, w: _classic(
        "unrolled", r, w, wrap=lambda m: DDP(m, find_unused_parameters=True), make=_Branchy, branchy=True
    ),
    "hp-ddp-implicit": lambda r, w: _classic("implicit", r, w, hp_ddp=True),
    "hp-ddp-unrolled": lambda r, w: _classic("unrolled", r, w, hp_ddp=True),
    "compile-inside": lambda r, w: _classic("implicit", r, w, wrap=_compiled(True)),
    "compile-outside": lambda r, w: _classic("unrolled", r, w, wrap=_compiled(False)),
    "nan-selftuning-step": lambda r, w: _family("selftuning", r, w, poison=(1,)),
    "nan-selftuning-hyperstep": lambda r, w: _family("selftuning", r, w, poison=(5,)),
    "nan-marglik-step": lambda r, w: _family("marglik", r, w, poison=(1,)),
    "nan-marglik-hyperstep": lambda r, w: _family("marglik", r, w, poison=(5,)),
}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # (each scenario records what it checks)
    timeout = datetime.timedelta(seconds=30)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    try:
        results: dict[str, Any] = {}
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank, world)
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()  # (a rank that failed early must not meet the other's collectives)
        try:
            results["resumes"] = _resumes(rank, world, out)
        except Exception as e:
            results["resumes"] = f"{type(e).__name__}: {e}"
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()  # (both saved before a process may abort below)
        # last, as it may bring the process down (without the refusal, a collective mismatch
        # aborted gloo: "Received data size doesn't match expected size")
        torch.save(_joined(rank, world), f"{out}/joined{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("round9_ddp")
    try:
        spawn_workers(_worker, WORLD, tmp)
    except mp.ProcessExitedException:  # the join() case aborting a process (see its test) ...
        if not all((Path(tmp) / f"rank{r}.pt").exists() for r in range(WORLD)):
            raise  # ... not anything before it
    out = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    out[0]["tmp"] = str(tmp)
    for r in range(WORLD):
        f = Path(tmp) / f"joined{r}.pt"
        out[r]["joined"] = torch.load(f, weights_only=False) if f.exists() else "the process died"
    return out


# ------------------------------------------------------------------------------------- checks


def _ok(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for g in got:
        assert isinstance(g, dict), f"{name} raised: {g}"
    return got


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _same_run(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert len(got["grads"]) == len(ref["grads"]) == 2
    for g, r in zip(got["grads"], ref["grads"], strict=True):
        _close(g, r)
    _close(got["state"], ref["state"])


def test_a_model_wrapped_in_ddp_after_the_hyperoptimizer_is_warned_about(ranks) -> None:
    """`model = DDP(model)` after the HyperOptimizer was built: step runs the bare module, so no
    gradient is averaged and each rank trains its own copy (they drift apart: checked below).
    Before the fix nothing was said."""
    for r in _ok(ranks, "wrapped-late"):
        said = [m for m in r["warnings"] if "not wrapped in DistributedDataParallel" in m]
        assert len(said) == 1 and "wrap the model first" in said[0], r["warnings"]
        assert not [m for m in r["warnings_wrapped_first"] if "DistributedDataParallel" in m]
    a, b = (r["wrapped-late"]["state"] for r in ranks)
    assert not _equal(a, b)  # (what the warning is about)


def test_ddp_join_is_refused_clearly_and_changes_nothing(ranks) -> None:
    """Under join() a rank out of batches shadows DDP's all-reduces only; hypergrad's own (the
    guard's mean loss, the averaged hypergradient) met mismatched ones: gloo aborted the process
    ("Received data size doesn't match expected size"). Now a RuntimeError on the first call."""
    for r in _ok(ranks, "joined"):
        assert len(r["errors"]) == 3
        for e in r["errors"]:
            assert "join()" in e and "same number of batches" in e and "enable=False" in e, e
        assert _equal(r["refused"], r["before"])
        assert not _equal(r["after"], r["before"])  # (the step after join(enable=False) trained)
    a, b = (r["joined"] for r in ranks)
    assert _equal(a["after"], b["after"])  # (... on both ranks alike)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_branches_that_differ_between_ranks_give_the_mean_of_the_shards(ranks, method) -> None:
    """find_unused_parameters=True with a data-dependent branch: rank 0 reaches one head, rank 1
    the other; the hypergradients equal one process's on the mean of the two shards' losses."""
    single = _classic(method, 0, 1, make=_Branchy, branchy=True)
    for got in _ok(ranks, f"branchy-{method}"):
        _same_run(got, single)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_hyperparameters_wrapped_in_ddp_too_give_the_one_process_run(ranks, method) -> None:
    single = _classic(method, 0, 1)
    for got in _ok(ranks, f"hp-ddp-{method}"):
        _same_run(got, single)


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_torch_compile_inside_or_outside_the_ddp_wrapper(ranks, where) -> None:
    single = _classic("implicit" if where == "inside" else "unrolled", 0, 1)
    for got in _ok(ranks, f"compile-{where}"):
        _same_run(got, single)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_clipped_adam_steps_under_ddp_options_give_the_one_process_run(ranks, method) -> None:
    """max_grad_norm clips DDP's averaged gradient (as clip_grad_norm_ after backward), and the
    replay and the Hessian see the clipped steps: find_unused_parameters (gradients averaged by
    hand) for Unrolled, gradient_as_bucket_view with static_graph for Implicit."""
    single = _clipped(method, 0, 1)
    for got in _ok(ranks, f"clip-{method}"):
        _same_run(got, single)
        assert all(
            0.0499 < n <= 0.05 for n in got["norms"]
        )  # (it bites every step: 0.05 / (1 + 1e-6 / norm))


@pytest.mark.parametrize("family", ["selftuning", "marglik"])
@pytest.mark.parametrize("where", ["step", "hyperstep"])
def test_a_nan_on_one_rank_is_skipped_by_every_rank_of_the_other_families(ranks, family, where) -> None:
    a, b = _ok(ranks, f"nan-{family}-{where}")
    single = _family(family, 0, 1, poison=(1,) if where == "step" else (5,))
    assert single["inner_steps"] == 5  # (the poisoned inner step skipped)
    assert single["skipped"] == [False, where == "hyperstep"]
    for got in (a, b):
        assert (got["inner_steps"], got["skipped"]) == (single["inner_steps"], single["skipped"])
    assert _equal(a["state"], b["state"])
    assert all(bool(torch.isfinite(t).all()) for t in a["state"])


def test_a_checkpoint_saved_on_every_rank_resumes_per_rank_seeded_dropout_bit_exactly(ranks) -> None:
    for r in ranks:
        res = r["resumes"]
        assert isinstance(res, dict), res
        assert _equal(res["own"]["state"], res["straight"]["state"])
        assert res["own"]["load_warnings"] == []


def test_rank_0s_checkpoint_with_per_rank_seeds_is_warned_about_on_the_other_ranks(ranks) -> None:
    """Rank 0's generator state loaded on rank 1: rank 1 draws rank 0's dropout masks, and the
    run is not the straight one (silently, before: about 0.07 off)."""
    r0, r1 = (r["resumes"] for r in ranks)
    assert isinstance(r0, dict) and isinstance(r1, dict)
    assert r0["rank0"]["load_warnings"] == []  # (its own state)
    said = r1["rank0"]["load_warnings"]
    assert len(said) == 1 and "saved on rank 0" in said[0] and "every rank" in said[0], said
    assert not _equal(r1["rank0"]["state"], r1["straight"]["state"])  # (what the warning is about)


@pytest.mark.parametrize("family", ["selftuning", "marglik"])
def test_rank_0s_checkpoint_resumes_every_rank_of_the_other_families_exactly(ranks, family) -> None:
    for r in ranks:
        res = r["resumes"]
        assert isinstance(res, dict), res
        assert _equal(res[f"{family}-resumed"]["state"], res[f"{family}-straight"]["state"])
    assert _equal(
        ranks[0]["resumes"][f"{family}-straight"]["state"], ranks[1]["resumes"][f"{family}-straight"]["state"]
    )


# ------------------------------------------------------------------------------------- no DDP


def _small(
    cls: type[hg.HyperOptimizer] = hg.Implicit, **kw: Any
) -> tuple[hg.HyperOptimizer, nn.Module, nn.Module]:
    model = _net()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    extra: dict[str, Any] = {"solver": hg.CG(maxiter=3)} if cls is hg.Implicit else {"steps": 2}
    hopt = cls(
        model, hp, _train, _ce, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), **extra, **kw,
    )  # fmt: skip
    return hopt, model, hp


@pytest.mark.parametrize("stray", ["tensor", "model-weight"])
def test_a_group_added_to_outer_optimizer_later_is_refused_at_the_hyperstep(stray) -> None:
    """Checked at construction only, before: a tensor outside hparams added with add_param_group
    was stepped with its stale .grad (1.0 -> 0.95), a model weight moved by hyper_step."""
    hopt, model, hp = _small()
    b = _data()[0][0]
    hopt.step(b)
    extra = nn.Parameter(torch.ones(3, dtype=DT)) if stray == "tensor" else model[0].bias
    extra.grad = torch.ones_like(extra)
    hopt.outer_optimizer.add_param_group({"params": [extra]})
    before = _params(hp, model) + [extra.detach().clone()]
    with pytest.raises(ValueError, match="not a parameter of hparams" if stray == "tensor" else "'0.bias'"):
        hopt.hyper_step(train_batch=b, val_batch=b)
    assert _equal(_params(hp, model) + [extra.detach().clone()], before)
    assert all(p.grad is None for p in hp.parameters())


def test_a_checkpoint_taken_right_after_a_skipped_step_resumes_bit_exactly() -> None:
    b, bad = _data()[0][0], _poison(_data()[0][1])
    hopt, _, hp = _small(hg.Unrolled, on_nonfinite="skip")
    hopt.step(b)
    with pytest.warns(hg.NonFiniteWarning):
        hopt.step(bad)
    state = copy.deepcopy(hopt.state_dict())
    assert state["rank"] == 0 and state["counters"]["inner_steps"] == 1
    hopt.step(b)
    hopt.hyper_step(train_batch=b, val_batch=b)
    again, _, hp2 = _small(hg.Unrolled, on_nonfinite="skip")
    again.load_state_dict(state)
    again.step(b)
    again.hyper_step(train_batch=b, val_batch=b)
    assert _equal([p.grad for p in hp2.parameters()], [p.grad for p in hp.parameters()])
    assert _equal(_params(hp2), _params(hp))


def test_a_ddp_checkpoint_resumes_in_one_process_without_the_wrapper(ranks) -> None:
    """The model's state is saved without the wrapper's "module." prefix: rank 0's checkpoint of
    a DDP run goes on in one process on the whole batches as the DDP run went on (before: "Missing
    key(s) in state_dict: "0.weight" ... Unexpected key(s): "module.0.weight" ...")."""
    path = Path(ranks[0]["tmp"]) / "plain.pt"
    assert all(not k.startswith("module.") for k in torch.load(path, weights_only=True)["model"])
    resumed = _classic("implicit", 0, 1, load=str(path))
    assert resumed["load_warnings"] == []
    _close(resumed["state"], ranks[0]["resumes"]["plain-straight"]["state"])
    _close(resumed["grads"][-1], ranks[0]["resumes"]["plain-straight"]["grads"][-1])


def _compiled_or_not(compiled: bool, **kw: Any) -> tuple[hg.HyperOptimizer, nn.Module]:
    model = _net()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    wrapped = torch.compile(model, backend="eager") if compiled else model
    hopt = hg.Implicit(
        wrapped, hp, _train, _ce, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), solver=hg.CG(maxiter=3), **kw,
    )  # fmt: skip
    return hopt, nn.ModuleList([hp, model])


def test_a_compiled_runs_checkpoint_resumes_without_compiling_and_back_bit_exactly() -> None:
    """Before: the state held "_orig_mod.0.weight" ... and did not load into the plain model."""
    batches, vb = _data()

    def go(hopt: hg.HyperOptimizer, idx: range) -> None:
        for i in idx:
            hopt.step(batches[i])
            if i % 3 == 2:
                hopt.hyper_step(train_batch=batches[i], val_batch=vb)

    straight, ref = _compiled_or_not(False)
    go(straight, range(6))
    for first in (True, False):
        a, _ = _compiled_or_not(first)
        go(a, range(4))
        state = copy.deepcopy(a.state_dict())
        assert list(state["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        b, got = _compiled_or_not(not first)
        b.load_state_dict(state)
        go(b, range(4, 6))
        assert _equal(_params(got), _params(ref))


def test_a_model_state_saved_with_a_wrappers_prefix_loads_and_a_submodule_named_module_is_kept() -> None:
    hopt, both = _compiled_or_not(False)
    state = copy.deepcopy(hopt.state_dict())
    with torch.no_grad():
        for p in both.parameters():
            p.add_(1.0)
    old = dict(state, model={f"module._orig_mod.{k}": v for k, v in state["model"].items()})
    hopt.load_state_dict(old)
    assert _equal(_params(both[1]), list(state["model"].values()))

    class Holder(nn.Module):  # its own keys start with "module.": nothing is taken off
        def __init__(self) -> None:
            super().__init__()
            self.module = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    model = Holder()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    h = hg.Implicit(
        model, hp, _train, _ce, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters()), solver=hg.CG(maxiter=3),
    )  # fmt: skip
    saved = copy.deepcopy(h.state_dict())
    assert list(saved["model"])[0] == "module.0.weight"
    with torch.no_grad():
        model.module[0].weight.add_(1.0)
    h.load_state_dict(saved)
    assert torch.equal(model.module[0].weight, saved["model"]["module.0.weight"])
    wrong = dict(saved, model={f"module.{k}": v for k, v in saved["model"].items()})  # two prefixes
    h.load_state_dict(wrong)  # (one "module." too many: taken off, as a DDP wrapper's)
    with pytest.raises(RuntimeError, match="Missing key"):
        h.load_state_dict(dict(saved, model={f"x.{k}": v for k, v in saved["model"].items()}))


class _TwoDecays(nn.Module):
    """An L2 decay, and an L1 one once a script registers ``l1`` (after the optimiser was built)."""

    def __init__(self) -> None:
        super().__init__()
        self.l2 = nn.Parameter(torch.tensor(-4.0, dtype=DT))

    def penalty(self, m: nn.Module) -> torch.Tensor:
        out = self.l2.exp() * sum((p**2).sum() for p in m.parameters())
        if "l1" in self._parameters:
            out = out + self._parameters["l1"].exp() * sum(p.abs().sum() for p in m.parameters())
        return out


@pytest.mark.parametrize("how", ["registered", "replaced"])
def test_a_hyperparameter_registered_or_replaced_after_construction_is_refused(how) -> None:
    """Before: an L1 decay registered later (and added to outer_optimizer) got no hypergradient and
    silently never moved (-4.0 -> -4.0), and hypergradient() returned 1 tensor for 2 parameters;
    a replaced one likewise (the hypergradient went to the old tensor)."""
    model = _net()
    hp = _TwoDecays()
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    hopt = hg.Implicit(
        model, hp, _train, _ce, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer, solver=hg.CG(maxiter=3),
    )  # fmt: skip
    b = _data()[0][0]
    hopt.step(b)
    if how == "registered":
        hp.l1 = nn.Parameter(torch.tensor(-4.0, dtype=DT))
        outer.add_param_group({"params": [hp.l1]})
        match = r"new or replaced: \['l1'\]; no longer there: \[\]"
    else:
        hp.l2 = nn.Parameter(torch.tensor(-3.0, dtype=DT))
        match = r"new or replaced: \['l2'\]; no longer there: \['l2'\]"
    before = _params(hp, model)
    for call in (hopt.hyper_step, hopt.hypergradient):
        with pytest.raises(ValueError, match=match):
            call(train_batch=b, val_batch=b)
    assert _equal(_params(hp, model), before)
