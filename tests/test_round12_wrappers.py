"""Round 12: the plumbing every family shares, as real scripts use it (float64).

* ``DistributedDataParallel`` on two gloo processes (one spawned run; each scenario catches its own
  error): ``hopt.step`` inside the wrapper's ``no_sync()`` (the gradient-accumulation idiom)
  silently let every rank update its weights with its own shard's gradient (weights 0.26 apart
  after six steps): now refused, changing nothing; and every family ends with *the whole*
  checkpoint (optimiser moments, method state) identical on every rank.
* Functional views of models built from the less common parts of ``torch.nn``: buffers that the
  forward pass updates in place and then reads (an EMA normaliser: the Unrolled replay crashed
  in autograd, or with a ``.data`` update was silently 3% off; each call now runs on its own
  copies of the buffers), a forward that reads ``self.parameters()``,
  ``ParameterDict`` / ``ParameterList`` / ``ModuleDict``, forward pre-hooks and hooks that change
  the input and output, a custom parametrisation, a ``torch.jit.script``ed model: hypergradients
  against the dense IFT formula on the real model and against central differences of the real
  training procedure.
* Batches in every shape a ``DataLoader`` gives (dicts with strings, named tuples, dataclasses
  with id lists, nested tuples): the same run, bit for bit, as plain tuples.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import spawn_workers
from test_contract import BY_ID, _batches
from torch import nn
from torch.nn.utils import parametrize

import hypergrad as hg
from hypergrad.testing import central_difference, dense_ift_hypergradient

DT = torch.float64
WORLD = 2
DDP = nn.parallel.DistributedDataParallel
Batch = tuple[torch.Tensor, ...]
# a perturbation scale far below float64's resolution: the best-response methods draw the same
# (negligible) noise on one process and on each rank
TINY: dict[str, Any] = {"scale": 5e-31, "scale_range": (1e-32, 1e-30)}


# ------------------------------------------------------------------------------------- DDP problems


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _ce(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _data() -> tuple[list[Batch], Batch]:
    g = torch.Generator().manual_seed(1)

    def one() -> Batch:
        return torch.randn(8, 5, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)

    return [one() for _ in range(6)], one()


def _shard(b: Batch, rank: int, world: int) -> Batch:
    n = len(b[0]) // world
    return tuple(t[rank * n : (rank + 1) * n] for t in b)


class _Stn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(5, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.l1(x, d)), d)


def _stn_loss(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _hn_train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    w = getattr(m, "module", m).weights(h)  # (the DDP wrapper does not pass .weights on)
    decay = h.draw(1)["decay"][0]
    return F.cross_entropy(m(b[0], hparams=h), b[1]) + decay * sum((t**2).sum() for t in w.values())


def _hn_val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.cross_entropy(m(b[0], hparams=h), b[1])


FAMILIES = ("implicit", "unrolled", "selftuning", "bestresponse", "marglik")


def _family(family: str, rank: int, world: int) -> dict[str, Any]:
    """A few steps and two hypersteps of ``family`` (Adam inside and out, so that the optimisers
    hold moments), on this rank's shard; the whole checkpoint at the end."""
    torch.manual_seed(0)
    hp: Any
    if family == "selftuning":
        hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.1, transform="exp"), dtype=DT, **TINY)
        module: nn.Module = _Stn(hp.size).to(DT)
    elif family == "bestresponse":
        hp = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False, dtype=DT, **TINY
        )
        module = hg.nn.HyperNet(_net(), hp.size).to(DT)
    elif family == "marglik":
        module = _net()
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(module, per="layer", init=1.0)}).to(DT)
    else:
        module = _net()
        hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2)
    model = DDP(module) if world > 1 else module
    kw: dict[str, Any] = {
        "inner_optimizer": torch.optim.Adam(module.parameters(), lr=0.01),
        "outer_optimizer": torch.optim.Adam(hp.parameters(), lr=0.05),
    }
    hopt: hg.HyperOptimizer
    if family == "implicit":
        hopt = hg.Implicit(
            model, hp, _train, _ce, solver=hg.CG(maxiter=4, damping=0.1, warm_start=True), **kw
        )
    elif family == "unrolled":
        hopt = hg.Unrolled(model, hp, _train, _ce, steps=3, **kw)
    elif family == "selftuning":
        hopt = hg.SelfTuning(model, hp, _stn_loss, _stn_loss, warmup=1, train_steps=3, delta=True, **kw)
    elif family == "bestresponse":
        hopt = hg.BestResponse(model, hp, _hn_train, _hn_val, **kw)
    else:
        hopt = hg.MarginalLikelihood(
            model, hp, likelihood="classification", data_size=48, subset_size=8 // WORLD, **kw
        )
    batches, val = _data()
    for i, b in enumerate(batches):
        hopt.step(_shard(b, rank, world))
        if i % 3 == 2:
            info = hopt.hyper_step(train_batch=_shard(b, rank, world), val_batch=_shard(val, rank, world))
            assert not info.skipped
    state = hopt.state_dict()
    return _flat({k: v for k, v in state.items() if k not in ("rng", "rank")})


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a checkpoint by its path, tensors copied."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = tree.detach().clone() if isinstance(tree, torch.Tensor) else copy.deepcopy(tree)
    return out


def _no_sync(rank: int, world: int, find_unused: bool) -> dict[str, Any]:
    """Steps 0, 1, then step 2 inside ``model.no_sync()`` (refused, nothing changes), then steps
    2..5 outside it and a hyperstep."""
    module = _net()
    model = DDP(module, find_unused_parameters=find_unused) if world > 1 else module
    hp = hg.hparams.WeightDecay(module, per="layer", init=1e-2)
    hopt = hg.Unrolled(
        model, hp, _train, _ce, steps=3,
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    batches, val = _data()
    out: dict[str, Any] = {"error": None}
    for i, b in enumerate(batches):
        if i == 2 and world > 1:
            before = _flat({k: v for k, v in hopt.state_dict().items() if k != "rng"})
            grads = [p.grad.clone() for p in module.parameters()]  # (the last step's, as torch leaves them)
            with model.no_sync():  # type: ignore[operator]
                try:
                    hopt.step(_shard(b, rank, world))
                except RuntimeError as e:
                    out["error"] = str(e)
            after = _flat({k: v for k, v in hopt.state_dict().items() if k != "rng"})
            out["unchanged"] = before.keys() == after.keys() and all(
                torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
                for k, v in before.items()
            )
            out["grads_kept"] = all(
                torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads, strict=True)
            )
        hopt.step(_shard(b, rank, world))
    hopt.hyper_step(val_batch=_shard(val, rank, world))
    out["weights"] = [p.detach().clone() for p in module.parameters()]
    out["hparams"] = [p.detach().clone() for p in hp.parameters()]
    out["grads"] = [p.grad.clone() for p in hp.parameters()]
    return out


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        results: dict[str, Any] = {}
        scenarios: dict[str, Any] = {f: (lambda f=f: _family(f, rank, world)) for f in FAMILIES}
        scenarios["no-sync"] = lambda: _no_sync(rank, world, find_unused=False)
        scenarios["no-sync-unused"] = lambda: _no_sync(rank, world, find_unused=True)
        for name, fn in scenarios.items():
            try:
                results[name] = fn()
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
            dist.barrier()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("round12_ddp")
    spawn_workers(_worker, WORLD, tmp)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ok(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for g in got:
        assert isinstance(g, dict), f"{name} raised: {g}"
    return got


@pytest.mark.parametrize("find_unused", [False, True])
def test_a_step_inside_no_sync_is_refused_and_changes_nothing(ranks, find_unused) -> None:
    """Without the refusal, each rank stepped on its own shard's gradient and the ranks drifted
    apart (max weight difference 0.26 after six Implicit steps, no error or warning)."""
    name = "no-sync-unused" if find_unused else "no-sync"
    single = _no_sync(0, 1, find_unused)  # the same run without the refused step
    got = _ok(ranks, name)
    for g in got:
        error = g["error"]
        assert error is not None and "no_sync()" in error and "drift apart" in error, error
        assert g["unchanged"] and g["grads_kept"]
        for key in ("weights", "hparams", "grads"):
            for x, y in zip(g[key], single[key], strict=True):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for key in ("weights", "hparams"):
        for x, y in zip(got[0][key], got[1][key], strict=True):
            assert torch.equal(x, y)


def _per_rank(path: str) -> bool:
    """Checkpoint entries that are each rank's own: Unrolled's recorded batches (the shards)."""
    return "/batch/" in path or path == "/method/rank"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rank_ends_with_the_same_checkpoint(ranks, family) -> None:
    """Weights, hyperparameters, both optimisers' moments, the method's state (warm start,
    history, recorded anchors) and the counters: equal on both ranks, bit for bit."""
    a, b = _ok(ranks, family)
    assert a.keys() == b.keys()
    compared = 0
    for path, x in a.items():
        if _per_rank(path):
            continue
        y = b[path]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), path
            compared += 1
        else:
            assert x == y, path
    assert any(p.startswith("/inner_optimizer/state/") for p in a) and compared > 10


@pytest.mark.parametrize("family", FAMILIES)
def test_the_optimiser_states_equal_one_process_on_the_concatenated_batches(ranks, family) -> None:
    single = _family(family, 0, 1)
    got = _ok(ranks, family)[0]
    keys = [
        k for k in single if k.split("/")[1] in ("model", "hparams", "inner_optimizer", "outer_optimizer")
    ]
    assert any("exp_avg_sq" in k for k in keys)
    for k in keys:
        x, y = got[k], single[k]
        if isinstance(y, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert x == y, k


# ------------------------------------------------------------------------------------- views


X = torch.randn(24, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
Y = torch.randn(24, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
XV = torch.randn(16, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
YV = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(3))


class _L2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.tensor(-2.0, dtype=DT))


def _reg_train(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1]) + 0.5 * h.raw.exp() * sum((p**2).sum() for p in m.parameters())


def _reg_val(m: nn.Module, h: Any, b: Batch) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


class _NonPersistent(nn.Module):
    """A ``persistent=False`` buffer that the training forward updates in place (an EMA of the
    inputs' scale, as some normalisers keep): not in ``state_dict``, but in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(1.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(0.5 * x.abs().mean())
        return self.l(x) / self.scale


class _NonPersistentThroughData(_NonPersistent):
    """The same update written through ``.data``, as older code does: no version bump, so
    autograd cannot notice that a later step overwrote what an earlier one saved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.scale.data.mul_(0.5).add_(0.5 * x.abs().mean())
        return self.l(x) / self.scale


class _SelfPenalised(nn.Module):
    """A forward that reads ``self.parameters()`` (an L2 term added to every output)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) + 0.01 * sum((p**2).sum() for p in self.parameters())


class _Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ParameterDict({"w": nn.Parameter(0.3 * torch.randn(4, 2))})
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(2))])
        self.heads = nn.ModuleDict({"out": nn.Linear(2, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["out"](torch.tanh(x @ self.d["w"] + self.b[0]))


def _hooked() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    m[0].register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    m[2].register_forward_hook(lambda mod, args, out: out + mod.weight.sum())
    return m


class _Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).T


def _parametrized() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrize.register_parametrization(m[0], "weight", _Symmetric())
    return m


def _scripted() -> nn.Module:
    return torch.jit.script(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT))


VIEWS = {
    "non-persistent-buffer": _NonPersistent,
    "buffer-updated-through-data": _NonPersistentThroughData,
    "forward-reads-parameters": _SelfPenalised,
    "parameter-containers": _Containers,
    "pre-hook-and-hook": _hooked,
    "parametrization": _parametrized,
    "jit-script": _scripted,
}


EACH_VIEW = pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n, marks=pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
        )
        for n in VIEWS
    ],
)


def _view_model(name: str) -> nn.Module:
    torch.manual_seed(1)
    return VIEWS[name]().to(DT)


@EACH_VIEW
def test_implicit_on_the_view_equals_the_dense_ift_formula_on_the_real_model(name: str) -> None:
    m, h = _view_model(name), _L2()
    hopt = hg.Implicit(
        m, h, _reg_train, _reg_val, solver=hg.Direct(),
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.1),
    )  # fmt: skip
    for i in range(3):
        hopt.step((X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8]))
    m.eval()  # (the reference's forward must not move the non-persistent buffer)
    grads, info = hopt.hypergradient(train_batch=(X, Y), val_batch=(XV, YV))
    want = dense_ift_hypergradient(m, h, _reg_train, _reg_val, (X, Y), (XV, YV))
    assert float(want[0].abs()) > 1e-4
    torch.testing.assert_close(grads[0], want[0], rtol=1e-9, atol=1e-13)


@EACH_VIEW
def test_unrolled_on_the_view_equals_central_differences_of_the_training_run(name: str) -> None:
    """A buffer that the forward updates in place and then reads: the replay threaded one copy
    through all its steps, so each step overwrote what the step before had saved for the
    backward pass: autograd raised "modified by an inplace operation" (an update under
    ``no_grad``), or, with a ``.data`` update, the hypergradient was silently -0.0138 against
    central differences' -0.014197. Each replayed step now runs on its own copies."""
    batches = [(X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8]) for i in range(3)]
    m, h = _view_model(name), _L2()
    start = copy.deepcopy(m.state_dict())  # (a deepcopy of a scripted module has non-leaf weights)
    hopt = hg.Unrolled(
        m, h, _reg_train, _reg_val, steps=3,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.1),
    )  # fmt: skip
    for b in batches:
        hopt.step(b)
    grads, _ = hopt.hypergradient(val_batch=(XV, YV))

    def outer() -> float:  # the same three steps in plain PyTorch, from the same start
        net = _view_model(name)
        net.load_state_dict(start)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
        for b in batches:
            opt.zero_grad()
            _reg_train(net, h, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_reg_val(net, h, (XV, YV)))

    want = central_difference(outer, h.raw, eps=1e-5)
    assert float(want.abs()) > 1e-4
    torch.testing.assert_close(grads[0], want, rtol=1e-6, atol=1e-10)


def test_a_non_persistent_buffer_is_replayed_from_its_value_before_each_step() -> None:
    """Not in ``state_dict`` (torch's meaning of ``persistent=False``), but every forward reads
    and moves it: the replay starts each step from the value the real step saw, so the replayed
    weights are the real ones exactly."""
    m, h = _view_model("non-persistent-buffer"), _L2()
    hopt = hg.Unrolled(
        m, h, _reg_train, _reg_val, steps=3,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.1),
    )  # fmt: skip
    scales = []
    for i in range(3):
        hopt.step((X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8]))
        scales.append(float(m.scale))  # type: ignore[arg-type]
    assert len(set(scales)) == 3 and "scale" not in m.state_dict()
    for r, w in zip(hopt.replayed_weights(), hopt.pair.weights, strict=True):
        assert torch.equal(r, w)
    assert float(m.scale) == scales[-1]  # type: ignore[arg-type]  (the replay put it back)


# ------------------------------------------------------------------------------------- batches


_Pair = collections.namedtuple("_Pair", "x y")


@dataclasses.dataclass
class _Record:
    x: torch.Tensor
    y: torch.Tensor
    ids: list[int]


FORMS: dict[str, tuple[Any, Any]] = {
    "dict-with-strings": (
        lambda b: {"x": b[0], "y": b[1], "names": [f"ex{i}" for i in range(len(b[1]))]},
        lambda b: (b["x"], b["y"]),
    ),
    "namedtuple": (lambda b: _Pair(b[0], b[1]), lambda b: (b.x, b.y)),
    "dataclass-with-ids": (lambda b: _Record(b[0], b[1], list(range(len(b[1])))), lambda b: (b.x, b.y)),
    "nested": (lambda b: ((b[0],), (b[1], "label")), lambda b: (b[0][0], b[1][0])),
}


def _batch_run(mid: str, form: str | None) -> list[torch.Tensor]:
    m = BY_ID[mid]
    enc, dec = FORMS[form] if form else (lambda b: b, lambda b: b)
    torch.manual_seed(0)
    model, hp, tl, vl = m.problem()
    hopt = m.make(
        model, hp,
        lambda mm, h, b: tl(mm, h, dec(b)),
        lambda mm, h, b: vl(mm, h, dec(b)),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    batches = _batches(7)
    torch.manual_seed(3)
    out = []
    for i, b in enumerate(batches[:6]):
        hopt.step(enc(b))
        if i % 3 == 2:
            hopt.hyper_step(train_batch=enc(b), val_batch=enc(batches[6]))
            out += [p.grad.clone() for p in hp.parameters()]
    return (
        out + [p.detach().clone() for p in model.parameters()] + [p.detach().clone() for p in hp.parameters()]
    )


@pytest.mark.parametrize(
    "mid", ["implicit-cg", "unrolled-reverse", "selftuning-delta", "best-response-local"]
)
def test_every_batch_shape_gives_the_tuple_run(mid: str) -> None:
    want = _batch_run(mid, None)
    for form in FORMS:
        got = _batch_run(mid, form)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), form


# ------------------------------------------------------------------------------------- compiled loss


def _compiled_run(method: str, what: str) -> list[torch.Tensor]:
    """Three steps and a hyperstep on the model whose forward reads ``self.parameters()``, with
    ``what`` compiled (``"nothing"``, ``"loss"``, ``"submodule"``); the hypergradient, then the
    weights and hyperparameters."""
    torch._dynamo.reset()
    m, h = _view_model("forward-reads-parameters"), _L2()
    loss = _reg_train
    if what == "loss":
        loss = torch.compile(_reg_train, backend="aot_eager")
    elif what == "submodule":
        m.l1 = torch.compile(m.l1, backend="aot_eager")  # type: ignore[assignment]
    opts: dict[str, Any] = {"solver": hg.CG(maxiter=3)} if method == "implicit" else {"steps": 2}
    hopt = (hg.Implicit if method == "implicit" else hg.Unrolled)(
        m, h, loss, _reg_val,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.1), **opts,
    )  # fmt: skip
    for i in range(3):
        hopt.step((X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8]))
    hopt.hyper_step(train_batch=(X, Y), val_batch=(XV, YV))
    out = [h.raw.grad.clone(), *[t.detach().clone() for t in [*m.parameters(), *h.parameters()]]]
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize("what", ["loss", "submodule"])
def test_a_compiled_loss_or_submodule_gives_the_eager_hypergradient(method: str, what: str) -> None:
    """``train_loss = torch.compile(train_loss)`` (a compiled training step, as modern scripts
    write it) or a compiled submodule (which the look through a compiled wrapper of the whole
    model cannot reach): inner steps worked, but the hypersteps raised torch's "This backward
    function was compiled with non-empty donated buffers which requires create_graph=False"
    (Implicit) or "torch.compile with aot_autograd does not currently support double backward",
    or (Unrolled, the compiled loss) silently gave a hypergradient of exactly 0. Hypergradients
    now run with compile directives ignored: the eager run's numbers."""
    want = _compiled_run(method, "nothing")
    got = _compiled_run(method, what)
    assert float(want[0].abs()) > 1e-5
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
