"""Round 26 (maintainer): hyperoptimisers in several threads of one process (an Optuna study
with ``n_jobs=2``, a thread pool of sweeps), ``Unrolled.mode`` / ``checkpoint`` set after
construction, and plain list attributes recorded incrementally."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad._functional import _THREAD, _plain_attributes, collecting_gradient_hooks
from hypergrad._stn_hparams import linearising
from hypergrad._unrolled import Mode

DT = torch.float64


class _HookedNet(nn.Module):
    """An MLP whose forward pass puts a gradient hook on its hidden activation (doubling the
    gradient there), as gradient-scaling tricks do: the hook is part of the training gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.requires_grad:
            h.register_hook(lambda g: 2 * g)
        return self.b(h)


def _train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _data(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(24, 6, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)) for _ in range(n)
    ]


def _hopt(kind: str, **kw: Any) -> hg.HyperOptimizer:
    torch.manual_seed(0)
    model = _HookedNet().to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2).to(DT)
    common = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
    )
    if kind == "implicit":
        return hg.Implicit(model, hp, _train, _val, solver=hg.Neumann(steps=4, alpha=0.1), **common)
    return hg.Unrolled(model, hp, _train, _val, steps=3, **kw, **common)


def _run(hopt: hg.HyperOptimizer, n: int = 24) -> torch.Tensor:
    data = _data()
    for i in range(n):
        hopt.step(data[i % 6])
        if i % 3 == 2:
            train = {"train_batch": data[i % 6]} if isinstance(hopt, hg.Implicit) else {}
            hopt.hyper_step(**train, val_batch=data[(i + 1) % 6])
    return torch.cat([p.detach().flatten() for p in hopt.hparams.parameters()])


def _in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` at once, one thread each; their results, or the first error raised."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # (re-raised below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def test_hyperoptimisers_in_two_threads_give_the_hyperparameters_they_give_alone() -> None:
    """Two Implicit and two Unrolled runs at once, each in its thread, whose models put a gradient
    hook on an activation: each ends with the hyperparameters of the same run alone, bit for bit,
    and the hook entry points are torch's again afterwards. Before, a hyperstep collected (and
    then removed) the hooks *other threads* registered meanwhile, whose gradients then lost their
    hook: hyperparameters 0.06-4% off, varying run to run; and two overlapping hypersteps left
    ``Tensor.register_hook`` replaced for good, every later hook in the process appended to a
    finished hyperstep's list."""
    register_hook = torch.Tensor.register_hook
    apply_on_tensors = getattr(torch.utils.hooks.BackwardHook, "_apply_on_tensors", None)
    alone = {kind: _run(_hopt(kind)) for kind in ("implicit", "unrolled")}
    kinds = ["implicit", "unrolled", "implicit", "unrolled"]
    for _ in range(2):
        hopts = [_hopt(kind) for kind in kinds]  # (built here: model init draws from the global RNG)
        results = _in_threads([lambda h=h: _run(h) for h in hopts])
        for kind, got in zip(kinds, results, strict=True):
            torch.testing.assert_close(got, alone[kind], rtol=0, atol=0)
    assert torch.Tensor.register_hook is register_hook
    assert getattr(torch.utils.hooks.BackwardHook, "_apply_on_tensors", None) is apply_on_tensors


class _DropoutNet(_HookedNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, self.training))


def test_unrolled_with_dropout_in_three_threads_replays_its_own_masks(monkeypatch: Any) -> None:
    """Unrolled records torch's global RNG state at each step and replays the step's dropout
    masks from it; three runs in three threads drew from the one generator in between. Every
    replay is now compared with the real weights (``_CHECK_EVERY = 1``) and must reproduce
    them: before, they ended 0.016-0.023 off (hyperparameters 9-14% off, one warning per 16
    hypersteps at most). The calls now take turns."""
    import hypergrad._unrolled as unrolled

    monkeypatch.setattr(unrolled, "_CHECK_EVERY", 1)

    def make() -> hg.HyperOptimizer:
        model = _DropoutNet().to(DT)
        hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2).to(DT)
        return hg.Unrolled(
            model,
            hp,
            _train,
            _val,
            steps=3,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
        )

    torch.manual_seed(0)
    hopts = [make() for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", unrolled.ReplayWarning)
        for got in _in_threads([lambda h=h: _run(h, n=18) for h in hopts]):
            assert torch.isfinite(got).all()


def test_a_gradient_hook_block_collects_only_its_own_threads_hooks() -> None:
    """While one thread is inside ``collecting_gradient_hooks``, another thread's hooks are
    neither collected by it nor counted as a training gradient of its own."""
    handles: list[Any] = []
    seen: dict[str, Any] = {}

    def other() -> None:
        x = torch.ones(2, requires_grad=True)
        y = x * 2
        y.register_hook(lambda g: g)
        seen["collecting"] = _THREAD.collecting
        seen["linearising"] = _THREAD.linearising

    x = torch.ones(2, requires_grad=True)
    with collecting_gradient_hooks(handles), linearising():
        (x * 3).register_hook(lambda g: g)
        _in_threads([other])
        assert _THREAD.collecting == 1 and _THREAD.linearising == 1
    assert len(handles) == 1  # this thread's hook only
    assert seen == {"collecting": 0, "linearising": 0}


class _AttentiveStn(nn.Module):
    """STN layers, then a softmax and log_softmax (which Delta-STN's response step composes of
    plain operations)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n)
        self.l2 = hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training)
        h = h * torch.softmax(h, -1)
        return F.log_softmax(self.l2(h, d), -1)


def _stn_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.nll_loss(m(b[0], h), b[1])


def test_delta_stn_runs_in_two_threads_at_once() -> None:
    """Two Delta-STN runs in two threads: before, the second thread's response step failed
    ("Nested forward mode AD is not supported": PyTorch has one dual level per process), and two
    overlapping response steps could leave ``torch.softmax`` & co. replaced by their composites
    for good. Now response steps take turns, both runs finish with finite values, and the
    entry points are torch's afterwards."""

    def entry_points() -> tuple[Any, ...]:
        return (torch.softmax, F.softmax, F.log_softmax, torch.Tensor.softmax, F.scaled_dot_product_attention)

    originals = entry_points()

    def make() -> hg.SelfTuning:
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
        model = _AttentiveStn(hp.size).to(DT)
        return hg.SelfTuning(
            model,
            hp,
            _stn_loss,
            _stn_loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
            delta=True,
        )

    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)
    ]

    def run(hopt: hg.SelfTuning) -> torch.Tensor:
        for i in range(12):
            hopt.step(data[i % 4])
            if i % 2:
                hopt.hyper_step(val_batch=data[(i + 1) % 4])
        return torch.cat([p.detach().flatten() for p in hopt.hparams.parameters()])

    torch.manual_seed(0)
    hopts = [make(), make()]
    for got in _in_threads([lambda h=h: run(h) for h in hopts]):
        assert torch.isfinite(got).all()
    assert entry_points() == originals


def test_unrolled_mode_and_checkpoint_set_after_construction_are_checked_and_used() -> None:
    """``hopt.mode = "forward"`` was kept as the string, which no ``is Mode.FORWARD`` test
    matched: the run stayed in reverse mode, silently, and a value neither mode was accepted.
    Now the setters take what the constructor takes, check it the same way, and forward mode
    then runs (one validation call per hyperparameter entry)."""
    hopt = _hopt("unrolled")
    data = _data()
    calls = [0]
    val = hopt.val_loss

    def counted(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        calls[0] += 1
        return val(m, h, b)

    hopt.val_loss = counted
    hopt.mode = "forward"  # type: ignore[assignment]
    assert hopt.mode is Mode.FORWARD
    for b in data[:3]:
        hopt.step(b)
    g_fwd, _ = hopt.hypergradient(val_batch=data[3])
    entries = sum(p.numel() for p in hopt.hparams.parameters())
    assert calls[0] == entries
    hopt.mode = "reverse"  # type: ignore[assignment]
    calls[0] = 0
    g_rev, _ = hopt.hypergradient(val_batch=data[3])
    assert calls[0] == 1
    for a, b in zip(g_fwd, g_rev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="Invalid Unrolled mode"):
        hopt.mode = "sideways"  # type: ignore[assignment]
    hopt.checkpoint = True
    with pytest.raises(ValueError, match="reverse-mode option"):
        hopt.mode = "forward"  # type: ignore[assignment]
    assert hopt.mode == "reverse" and hopt.checkpoint is True  # (a refused value changes nothing)
    with pytest.raises(TypeError, match="checkpoint must be True or False"):
        hopt.checkpoint = "yes"  # type: ignore[assignment]


def test_a_growing_list_attribute_is_copied_incrementally() -> None:
    """A list a forward hook appends features to at every step was cloned whole at every step
    (time quadratic in the steps); the items it still shares, unwritten, with the last copy now
    share their copies. An item written in place, or replaced, is copied again."""
    m = nn.Linear(2, 2)
    m.feats = [torch.zeros(3)]  # type: ignore[assignment]
    seen: dict[Any, Any] = {}
    first = dict(((i, k), v) for i, k, v in _plain_attributes([m], seen))[(0, "feats")]
    m.feats.append(torch.ones(3))  # type: ignore[operator]
    second = dict(((i, k), v) for i, k, v in _plain_attributes([m], seen))[(0, "feats")]
    assert len(second) == 2 and second[0] is first[0]
    torch.testing.assert_close(second[1], torch.ones(3))
    assert second[1] is not m.feats[1]  # (a copy)
    m.feats[0].add_(5)  # type: ignore[index]
    m.feats.append(torch.full((3,), 2.0))  # type: ignore[operator]
    third = dict(((i, k), v) for i, k, v in _plain_attributes([m], seen))[(0, "feats")]
    assert third[0] is not second[0] and float(third[0][0]) == 5.0
    assert [float(t[0]) for t in third] == [5.0, 1.0, 2.0]


class _ScaledStn(_AttentiveStn):
    """An STN model with a parameter a second optimiser trains (outside inner_optimizer)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        return super().forward(x * self.scale, hp)


def test_delta_stn_gives_a_parameter_outside_the_inner_optimiser_the_base_passes_gradient() -> None:
    """A parameter outside ``inner_optimizer`` (a second optimiser's) gets the gradient plain
    ``loss.backward()`` gives it. Delta-STN runs ``train_loss`` twice per step (base pass at the
    current lambda, response pass at perturbed ones): the parameter gets the base pass's gradient
    (the model at the current lambda), not the sum of both, and keeps accumulating as with
    ``backward()``. Reference: autograd of the base pass on a copy of the model before the step."""
    from hypergrad._stn_hparams import _Mode

    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    torch.manual_seed(0)
    model = _ScaledStn(hp.size).to(DT)
    trained = [p for n, p in model.named_parameters() if n != "scale"]
    hopt = hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        inner_optimizer=torch.optim.SGD(trained, lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        delta=True,
    )
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)
    ]
    want = torch.zeros((), dtype=DT)
    for b in batches:
        import copy

        ref = copy.deepcopy(model)
        rng = torch.get_rng_state()
        with hp._drawing(_Mode.BASE):
            (gs,) = torch.autograd.grad(_stn_loss(ref, hp, b), [ref.scale])
        torch.set_rng_state(rng)
        want = want + gs
        hopt.step(b)
        assert model.scale.grad is not None
        torch.testing.assert_close(model.scale.grad, want, rtol=1e-10, atol=1e-12)
