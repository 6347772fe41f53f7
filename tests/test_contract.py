"""The HyperOptimizer contract, checked for every method in one registry.

Adding a method = adding a row to METHODS; it then gets the API, .grad, state_dict, guard, error
and memory tests below.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _implicit(solver: hg.LinearSolver) -> Callable[..., hg.HyperOptimizer]:
    def make(model, hp, tl, vl, inner, outer, **kw):
        return hg.Implicit(
            model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, solver=solver, **kw
        )

    return make


def _unrolled(steps: int, mode: str, **opts: Any) -> Callable[..., hg.HyperOptimizer]:
    def make(model, hp, tl, vl, inner, outer, **kw):
        return hg.Unrolled(
            model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, steps=steps, mode=mode,
            **opts, **kw,
        )

    return make


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def train_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ce(m, h, b) + h.penalty(m)


def weight_decay_problem() -> tuple[nn.Module, nn.Module, Any, Any]:
    """The default problem: a small BatchNorm net on 4 features / 3 classes, one decay per layer."""
    model = Net().to(DT)
    return model, hg.hparams.WeightDecay(model, per="layer", init=1e-2), train_loss, ce


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the registry.

    ``make(model, hparams, train_loss, val_loss, inner, outer, **kw)`` builds the HyperOptimizer
    (``kw``: ``on_nonfinite`` and the like); ``problem()`` builds ``(model, hparams, train_loss,
    val_loss)`` for batches ``(x: (16, 4) float64, y: (16,) in 0..2)``. ``scenarios``: whether
    the scenario models below (any model, a ``WeightDecay`` penalty) apply to the method.
    """

    id: str
    make: Callable[..., hg.HyperOptimizer]
    needs_train: bool = True  # hyper_step needs train_batch
    needs_val: bool = True  # hyper_step needs val_batch
    problem: Callable[[], tuple[nn.Module, nn.Module, Any, Any]] = weight_decay_problem
    scenarios: bool = True


class StnNet(nn.Module):
    """A self-tuning MLP: input noise and a dropout rate, both tuned (4 features, 3 classes)."""

    def __init__(self, n_hparams: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n_hparams)
        self.l2 = hg.nn.StnLinear(8, 3, n_hparams)

    def forward(self, x: torch.Tensor, hp: nn.Module) -> torch.Tensor:
        d = hp.draw(len(x))  # type: ignore[operator]
        x = hg.nn.gaussian_noise(x, d["noise"], self.training)
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training)
        return self.l2(h, d)


def stn_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0], h), b[1])


def selftuning_problem() -> tuple[nn.Module, nn.Module, Any, Any]:
    hp = hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.2, high=0.9), noise=hg.hparams.Positive(0.1), dtype=DT
    )
    return StnNet(hp.size).to(DT), hp, stn_loss, stn_loss


def best_response_problem() -> tuple[nn.Module, nn.Module, Any, Any]:
    hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False, dtype=DT)
    net = hg.nn.HyperNet(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT), hp.size, rank=2)

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0], hparams=h), b[1])

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        w = m.weights(h)  # type: ignore[operator]
        decay = h.draw(1)["decay"][0]  # type: ignore[operator]
        return val(m, h, b) + decay * sum((t**2).sum() for t in w.values())

    return net, hp, train, val


def _selftuning(**opts: Any) -> Callable[..., hg.HyperOptimizer]:
    def make(model, hp, tl, vl, inner, outer, **kw):
        return hg.SelfTuning(model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, **opts, **kw)

    return make


def _best_response(**opts: Any) -> Callable[..., hg.HyperOptimizer]:
    def make(model, hp, tl, vl, inner, outer, **kw):
        return hg.BestResponse(model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, **opts, **kw)

    return make


def marglik_problem(
    per: str = "layer", augment: bool = False
) -> Callable[[], tuple[nn.Module, nn.Module, Any, Any]]:
    """An MLP without BatchNorm (its bound is undefined in train mode); MAP loss as MarginalLikelihood's."""

    def problem() -> tuple[nn.Module, nn.Module, Any, Any]:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        parts: dict[str, nn.Module] = {"prior": hg.hparams.PriorPrecision(model, per=per, init=1.0)}
        if augment:
            parts["shift"] = hg.hparams.RandomTranslation((4,), init=0.5, max=1.5)
        hp = nn.ModuleDict(parts).to(DT)

        def map_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return ce(m, h, b) + h["prior"].penalty(m) / 64  # type: ignore[index,operator]

        return model, hp, map_loss, ce

    return problem


def _marglik(**opts: Any) -> Callable[..., hg.HyperOptimizer]:
    def make(model, hp, tl, vl, inner, outer, **kw):
        return hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=64,
            inner_optimizer=inner,
            outer_optimizer=outer,
            **opts,
            **kw,
        )

    return make


METHODS: list[Method] = [
    Method("implicit-neumann", _implicit(hg.Neumann(steps=3))),
    Method("implicit-cg", _implicit(hg.CG(maxiter=5, damping=0.1))),
    Method("implicit-identity", _implicit(hg.Identity())),
    Method("implicit-direct", _implicit(hg.Direct(damping=0.1))),
    Method("unrolled-reverse", _unrolled(3, "reverse"), needs_train=False),
    Method("unrolled-forward", _unrolled(2, "forward"), needs_train=False),
    Method("unrolled-checkpoint", _unrolled(3, "reverse", checkpoint=True), needs_train=False),
    Method("selftuning", _selftuning(), needs_train=False, problem=selftuning_problem, scenarios=False),
    Method(
        "selftuning-delta",
        _selftuning(delta=True),
        needs_train=False,
        problem=selftuning_problem,
        scenarios=False,
    ),
    Method(
        "best-response-local",
        _best_response(),
        needs_train=False,
        problem=best_response_problem,
        scenarios=False,
    ),
    Method(
        "best-response-global",
        _best_response(sampling="global"),
        needs_train=False,
        problem=best_response_problem,
        scenarios=False,
    ),
    Method(
        "marglik-ntk", _marglik(subset_size=8), needs_val=False, problem=marglik_problem(), scenarios=False
    ),
    Method(
        "marglik-parametric",
        _marglik(bound="parametric", outer_steps=2),
        needs_val=False,
        problem=marglik_problem("parameter"),
        scenarios=False,
    ),
    Method(
        "marglik-through-map",
        _marglik(subset_size=8, through_map=True, solver=hg.CG(maxiter=5, damping=1e-2)),
        needs_val=False,
        problem=marglik_problem(),
        scenarios=False,
    ),
    Method(
        "marglik-augmented",
        _marglik(subset_size=8, outputs="sampled", augmentation_samples=2),
        needs_val=False,
        problem=marglik_problem("global", augment=True),
        scenarios=False,
    ),
]
IDS = [m.id for m in METHODS]
BY_ID = {m.id: m for m in METHODS}
each_method = pytest.mark.parametrize("m", METHODS, ids=IDS)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def _setup(m: Method, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model, hp, tl, vl = m.problem()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    return m.make(model, hp, tl, vl, inner, outer, **kw)


def _run(hopt: hg.HyperOptimizer, batches, start: int, stop: int, every: int = 3) -> None:
    vb = _batches(1, seed=99)[0]
    for i in range(start, stop):
        hopt.step(batches[i])
        if (i + 1) % every == 0:
            hopt.hyper_step(train_batch=batches[i], val_batch=vb)


def _snapshot(hopt: hg.HyperOptimizer) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": hopt.model.state_dict(),
            "hparams": hopt.hparams.state_dict(),
            "inner": hopt.inner_optimizer.state_dict(),
            "outer": hopt.outer_optimizer.state_dict(),
            "hgrads": [None if p.grad is None else p.grad.clone() for p in hopt.hparams.parameters()],
        }
    )


def _assert_same(a: Any, b: Any, path: str = "") -> None:
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


@each_method
def test_hyper_step_fills_grad_steps_outer_and_leaves_the_model_alone(m) -> None:
    hopt = _setup(m)
    batches = _batches(4)
    for b in batches:
        loss = hopt.step(b)
        assert loss.dim() == 0 and not loss.requires_grad
    for p in hopt.hparams.parameters():  # garbage that must be replaced, not accumulated into
        p.grad = torch.full_like(p, 1e6)
    before = _snapshot(hopt)
    vb = _batches(1, seed=7)[0]
    rng = torch.get_rng_state()  # methods may draw noise (self-tuning perturbations)
    info = hopt.hyper_step(train_batch=batches[-1], val_batch=vb)
    assert isinstance(info, hg.HyperStepInfo) and not info.skipped and info.hyper_steps == 1
    assert math.isfinite(info.outer_loss) and info.hypergrad_norm > 0 and info.seconds > 0
    after = _snapshot(hopt)
    _assert_same(before["model"], after["model"], "model")  # weights and BatchNorm buffers
    _assert_same(before["inner"], after["inner"], "inner optimizer")
    grads = [p.grad for p in hopt.hparams.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) and float(g.abs().max()) < 1e3 for g in grads)
    params = dict(hopt.hparams.named_parameters())  # (a container may also hold constant buffers)
    moved = [not torch.equal(before["hparams"][k], after["hparams"][k]) for k in params]
    assert all(moved)  # Adam moves every hyperparameter with a nonzero gradient
    # the same hyperstep again (fresh hparams copy) gives the same hypergradient: nothing leaked
    hopt.hparams.load_state_dict(before["hparams"])
    torch.set_rng_state(rng)
    hopt.hyper_step(train_batch=batches[-1], val_batch=vb)
    for g, p in zip(grads, hopt.hparams.parameters(), strict=True):
        assert torch.equal(g, p.grad)  # type: ignore[arg-type]


@each_method
def test_state_dict_resumes_exactly(m) -> None:
    batches = _batches(12)
    straight = _setup(m)
    _run(straight, batches, 0, 12)

    first = _setup(m)
    _run(first, batches, 0, 7)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = _setup(m, seed=123)  # different initial weights: everything must come from the file
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    _run(resumed, batches, 7, 12)
    a, b = _snapshot(straight), _snapshot(resumed)
    for key in ("model", "hparams", "inner", "outer"):
        _assert_same(a[key], b[key], key)
    assert (resumed.inner_steps, resumed.hyper_steps) == (straight.inner_steps, straight.hyper_steps)


def test_load_state_dict_refuses_another_method() -> None:
    imp = _setup(BY_ID["implicit-neumann"])
    unr = _setup(BY_ID["unrolled-reverse"])
    with pytest.raises(ValueError, match="Implicit"):
        unr.load_state_dict(imp.state_dict())


def _nan_batch(b):
    x = b[0].clone()
    x[0, 0] = float("nan")
    return (x, b[1])


@each_method
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_losses_change_nothing(m, policy) -> None:
    hopt = _setup(m, on_nonfinite=policy)
    batches = _batches(4)
    _run(hopt, batches, 0, 3)
    before = _snapshot(hopt)
    steps = (hopt.inner_steps, hopt.hyper_steps)
    vb = _batches(1, seed=5)[0]
    bad_calls = [lambda: hopt.step(_nan_batch(batches[3]))]
    if m.needs_val:
        bad_calls.append(lambda: hopt.hyper_step(train_batch=batches[3], val_batch=_nan_batch(vb)))
    if m.needs_train:
        bad_calls.append(lambda: hopt.hyper_step(train_batch=_nan_batch(batches[3]), val_batch=vb))
    for call in bad_calls:
        if policy == "raise":
            with pytest.raises(hg.NonFiniteError, match="untouched"):
                call()
        else:
            with pytest.warns(hg.NonFiniteWarning, match="skipped"):
                out = call()
            if isinstance(out, hg.HyperStepInfo):
                assert out.skipped
        _assert_same(before, _snapshot(hopt), "state")
        assert (hopt.inner_steps, hopt.hyper_steps) == steps


@each_method
def test_missing_and_mismatched_batches_are_named(m) -> None:
    hopt = _setup(m)
    b = _batches(1)[0]
    with pytest.raises(ValueError, match="batch is required"):
        hopt.step(None)
    hopt.step(b)
    if m.needs_val:
        with pytest.raises(ValueError, match="val_batch"):
            hopt.hyper_step(train_batch=b)
    if m.needs_train:
        with pytest.raises(ValueError, match="train_batch"):
            hopt.hyper_step(val_batch=b)
    with pytest.raises(ValueError, match="float32.*float64"):
        hopt.step((b[0].float(), b[1]))
    meta = (b[0].to("meta"), b[1])
    with pytest.raises(ValueError, match="device meta"):
        if m.needs_val:
            hopt.hyper_step(train_batch=b, val_batch=meta)
        else:
            hopt.hyper_step(train_batch=meta, val_batch=b)


@each_method
def test_bad_hyperparameters_and_optimizers_are_named(m) -> None:
    model, hp, tl, vl = m.problem()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    name, first = next(iter(hp.named_parameters()))
    first.requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape(name) + ".*requires_grad"):
        m.make(model, hp, tl, vl, inner, outer)
    first.requires_grad_(True)
    with pytest.raises(ValueError, match="outer_optimizer holds model parameter"):
        m.make(model, hp, tl, vl, inner, torch.optim.Adam(model.parameters()))
    if len(list(hp.parameters())) > 1:
        with pytest.raises(ValueError, match="not in outer_optimizer"):
            m.make(model, hp, tl, vl, inner, torch.optim.Adam([first]))
    with pytest.raises(ValueError, match="inner_optimizer holds hyperparameter"):
        m.make(model, hp, tl, vl, torch.optim.SGD(hp.parameters(), lr=0.1), outer)
    with pytest.raises(TypeError, match="hparams must be an nn.Module"):
        m.make(model, {"h": first}, tl, vl, inner, outer)
    with pytest.raises(ValueError, match="meta"):
        m.make(model, copy.deepcopy(hp).to("meta"), tl, vl, inner, outer)


def _net_bytes(fn: Callable[[], None]) -> int:
    """Bytes allocated and not freed by torch's CPU allocator while ``fn`` runs (profiler).
    Blocks allocated before the window and freed inside it are not counted, so compare windows."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # earlier tests' garbage freed inside the window would read as negative bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw allocator events (key_averages() gives the same sum, but ~100x slower)
    assert prof.profiler is not None
    events = prof.profiler.kineto_results.events()
    return int(sum(e.nbytes() for e in events if e.name() == "[memory]"))


@each_method
def test_graphs_are_released_and_memory_does_not_grow(m) -> None:
    hopt = _setup(m)
    tl = m.problem()[2]
    batches = _batches(8)
    vb = _batches(1, seed=3)[0]

    def rounds(n: int, leak: list | None = None) -> Callable[[], None]:
        def fn() -> None:
            for i in range(n):
                b = batches[i % len(batches)]
                hopt.step(b)
                hopt.hyper_step(train_batch=b, val_batch=vb)
                if leak is not None:  # what a method that kept its graph would look like
                    leak.append(tl(hopt.model, hopt.hparams, b))

        return fn

    rounds(4)()  # warm-up: fills the Unrolled replay ring and the optimiser states
    # one profiled warm-up window too: blocks allocated outside any profiled window are freed
    # unseen, so the first window would count the ring's new records but not the old ones' release
    _net_bytes(rounds(3))
    short, long = _net_bytes(rounds(3)), _net_bytes(rounds(6))
    kept: list = []
    leaky = _net_bytes(rounds(3, kept))
    graph_bytes = (leaky - short) / 3
    assert graph_bytes > 1000, "the profiler saw no graph memory: the test would prove nothing"
    # 3 more rounds cost nothing more: each hyperstep releases its graphs
    assert long - short < 0.25 * graph_bytes, (short, long, graph_bytes)
    if isinstance(hopt, hg.Unrolled):
        # the replay history does not grow with training: at most 2K batches and two full
        # snapshots, also with a hyperstep after every step (the others copy the hyperparameters)
        assert len(hopt._records) <= 2 * hopt.steps
        assert sum(r.anchor is not None for r in hopt._records) <= 2


def test_eval_mode_is_respected_and_running_stats_follow_real_steps_only() -> None:
    hopt = _setup(BY_ID["implicit-neumann"])
    hopt.model.eval()
    stats = copy.deepcopy(hopt.model.state_dict())
    b = _batches(2)
    hopt.step(b[0])
    hopt.hyper_step(train_batch=b[0], val_batch=b[1])
    assert not hopt.model.training
    for k in ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"):
        assert torch.equal(stats[k], hopt.model.state_dict()[k])
    hopt.model.train()
    hopt.step(b[0])
    assert int(hopt.model.state_dict()["net.1.num_batches_tracked"]) == 1
    hopt.hyper_step(train_batch=b[0], val_batch=b[1])
    assert int(hopt.model.state_dict()["net.1.num_batches_tracked"]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@each_method
def test_cuda_matches_cpu(m) -> None:
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model, hp, tl, vl = m.problem()
        model.to(device)
        hp.to(device)
        hopt = m.make(
            model,
            hp,
            tl,
            vl,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(hp.parameters(), lr=0.05),
        )
        batches = [tuple(t.to(device) for t in b) for b in _batches(6)]
        _run(hopt, batches, 0, 6)
        results.append([p.detach().cpu() for p in hp.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Scenario models: what users' scripts do that a hypergradient library must survive. Every method
# runs every scenario; the real steps must equal plain PyTorch, the model must come out with its
# parameters intact, hypergradients must be finite, and Unrolled's replay must reproduce the real
# steps.


class SharedNet(nn.Module):
    """One block (Linear + BatchNorm) reached under two names (``body.0`` and ``body.2``)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.body = nn.Sequential(block, nn.Tanh(), block)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PartlyUsedNet(nn.Module):
    """A parameter no loss reaches and a head used on every other batch only (batch[2] odd)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.extra = nn.Linear(8, 3)
        self.never = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + self.extra(h) if use_extra else self.head(h)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _scenario_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    if isinstance(m, PartlyUsedNet):
        out = m(b[0], use_extra=bool(b[2]))
    else:
        out = m(b[0])
    return nn.functional.cross_entropy(out, b[1])


def _scenario_train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _scenario_loss(m, h, b) + h.penalty(m)


#: name -> (model factory, inner optimiser factory, extra behaviour)
SCENARIOS = {
    "shared-module": (SharedNet, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ""),
    "unused-parameters": (PartlyUsedNet, lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1), ""),
    "mutated-batch": (Net, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "refill"),
    "scheduler": (Net, lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.02, dtype=DT)), "schedule"),
    "episode": (Net, lambda ps: torch.optim.SGD(ps, lr=0.1), "episode"),
    "dropout": (DropoutNet, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ""),
}


def _scenario_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [(x, y, i % 2) for i, (x, y) in enumerate(_batches(n, seed=11))]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("m", [m for m in METHODS if m.scenarios], ids=[m.id for m in METHODS if m.scenarios])
def test_scenarios_train_like_pytorch_and_replay_the_real_steps(m, scenario) -> None:
    build, opt, extra = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = build().to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2, include=lambda n: n != "never")
    ref_model = copy.deepcopy(model)
    inner, ref_inner = opt(model.parameters()), opt(ref_model.parameters())
    hopt = m.make(
        model, hp, _scenario_train, _scenario_loss, inner, torch.optim.Adam(hp.parameters(), lr=0.05)
    )
    params = {n: p for n, p in model.named_parameters()}
    sched = ref_sched = None
    if extra == "schedule":
        sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.7)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_inner, step_size=1, gamma=0.7)
    data = _scenario_batches(12)
    buffer = (data[0][0].clone(), data[0][1].clone(), 0)  # one batch buffer, refilled in place
    vb = _batches(1, seed=5)[0] + (0,)
    for i, b in enumerate(data):
        if extra == "refill":
            buffer[0].copy_(b[0])
            buffer[1].copy_(b[1])
            b = buffer
        if extra == "episode" and i == 6:  # a new episode: fresh weights in both runs
            with torch.no_grad():
                for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                    p.normal_(0, 0.3)
                    q.copy_(p)
            hopt.start_episode()
        # the plain PyTorch step, with the hyperparameters as they are now (same RNG state)
        rng = torch.get_rng_state()
        ref_inner.zero_grad()
        ref_loss = _scenario_train(ref_model, hp.requires_grad_(False), b)
        hp.requires_grad_(True)
        ref_loss.backward()
        ref_inner.step()
        torch.set_rng_state(rng)
        hopt.step(b)
        if sched is not None:
            sched.step()
            ref_sched.step()  # type: ignore[union-attr]
        if isinstance(hopt, hg.Unrolled) and i % 3 == 2:  # hparams unchanged over the ring: exact
            for w, r in zip(hopt.replayed_weights(), hopt.pair.weights, strict=True):
                torch.testing.assert_close(w, r.detach(), rtol=1e-10, atol=1e-12)
        if i % 3 == 2:
            info = hopt.hyper_step(train_batch=b, val_batch=vb)
            assert math.isfinite(info.hypergrad_norm) and info.hypergrad_norm > 0
            if isinstance(hopt, hg.Unrolled):
                expected = min(i + 1 - (6 if extra == "episode" and i >= 6 else 0), hopt.steps)
                assert info.unrolled_steps == expected
    for n, p in model.named_parameters():  # still the same Parameter objects, trained like PyTorch
        assert p is params[n] and isinstance(p, nn.Parameter), n
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13, msg=n)
    for (n, b1), b2 in zip(model.named_buffers(), ref_model.buffers(), strict=True):
        torch.testing.assert_close(b1, b2, rtol=1e-12, atol=1e-13, msg=n)
    if scenario == "unused-parameters":
        assert model.never.grad is None and torch.equal(model.never, torch.ones(3, dtype=DT))


@each_method
def test_state_dict_loads_with_weights_only(m) -> None:
    """``torch.load``'s default since torch 2.6 is ``weights_only=True``: a saved run must load
    under it and resume exactly."""
    batches = _batches(9)
    straight = _setup(m)
    _run(straight, batches, 0, 9)
    first = _setup(m)
    _run(first, batches, 0, 4)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _setup(m, seed=123)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _run(resumed, batches, 4, 9)
    a, b = _snapshot(straight), _snapshot(resumed)
    for key in ("model", "hparams", "inner", "outer"):
        _assert_same(a[key], b[key], key)


@each_method
def test_grad_mode_of_the_caller_does_not_matter(m) -> None:
    """Under ``torch.no_grad()`` (a validation block, say) ``step`` trains and ``hyper_step`` /
    ``hypergradient`` compute the same as outside it; ``torch.inference_mode()`` is refused by
    name, changing nothing."""
    batches = _batches(4)
    vb = _batches(1, seed=7)[0]
    outside, inside = _setup(m), _setup(m)
    rng = torch.get_rng_state()
    for b in batches:
        outside.step(b)
    info_out = outside.hyper_step(train_batch=batches[-1], val_batch=vb)
    torch.set_rng_state(rng)
    with torch.no_grad():
        for b in batches:
            inside.step(b)
        info_in = inside.hyper_step(train_batch=batches[-1], val_batch=vb)
        grads, _ = inside.hypergradient(train_batch=batches[-1], val_batch=vb)
    assert info_in.hypergrad_norm == info_out.hypergrad_norm > 0
    assert all(g.grad_fn is None for g in grads)
    a, b = _snapshot(outside), _snapshot(inside)
    for key in ("model", "hparams", "inner", "outer", "hgrads"):
        _assert_same(a[key], b[key], key)
    before = _snapshot(inside)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"inference_mode"):
            inside.step(batches[0])
        with pytest.raises(RuntimeError, match=r"inference_mode"):
            inside.hyper_step(train_batch=batches[-1], val_batch=vb)
    after = _snapshot(inside)
    for key in ("model", "hparams", "inner", "outer", "hgrads"):
        _assert_same(before[key], after[key], key)
