"""Round 27, exception safety: an error raised by the user's own code (a loss, a module's forward, a
custom Function's backward, an optimiser hook) inside ``step``, ``hyper_step`` and
``hypergradient``, and what a caught error leaves behind: the model's and hyperparameters' state,
torch's random generator, the torch entry points hypergrad swaps while it works, and other threads.

Each test says what went wrong before the fix, or (for tests that pass) which failure mode it pins
that no earlier round covered."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import hypergrad as hg

DT = torch.float64


class _Boom(Exception):
    """Raised by the user's code in these tests."""


class _Fuse:
    """Counts calls of one place of the user's code and raises at the ``at``-th (once)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0
        self.error: type[BaseException] = _Boom

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.at = 0
            raise self.error(f"call {self.calls}")

    def arm(self, nth: int, error: type[BaseException] = _Boom) -> None:
        self.at, self.error = self.calls + nth, error


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


# ------------------------------------------------------------ hypergradient() that raises


class _Stn(nn.Module):
    """An STN whose forward keeps a plain tensor attribute (a statistic of its last batch)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(3, 6, n), hg.nn.StnLinear(6, 2, n)
        self.last = torch.zeros(6, dtype=DT)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = torch.tanh(self.l1(x, d))
        self.last = h.detach().mean(0)
        return self.l2(hg.nn.dropout(h, d["dropout"], self.training), d)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.dropout(torch.tanh(self.l1(x)), 0.3, self.training))


def _raising_hopt(kind: str) -> tuple[Any, _Fuse]:
    """A hyperoptimiser whose validation loss raises once the model ran (its dropout masks or
    perturbations drawn from torch's generator) when the fuse is armed."""
    torch.manual_seed(0)
    fuse = _Fuse()
    hopt: Any
    if kind == "selftuning":
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        model: nn.Module = _Stn(hp.size).to(DT)

        def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0], h), b[1])

        def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            out = m(b[0], h)
            fuse()
            return F.cross_entropy(out, b[1])

        hopt = hg.SelfTuning(
            model,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
            train_steps=1,
        )
    else:
        model = _Mlp().to(DT)
        wd = hg.hparams.WeightDecay(model, per="global", init=1e-2)

        def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

        def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            out = m(b[0])  # (train mode: dropout draws from torch's generator)
            fuse()
            return F.cross_entropy(out, b[1])

        hopt = hg.Implicit(
            model,
            wd,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(wd.parameters(), lr=0.05),
            solver=hg.CG(maxiter=3),
        )
    hopt.step(_batch(0))
    return hopt, fuse


@pytest.mark.parametrize("kind", ["implicit", "selftuning"])
def test_hypergradient_that_raises_puts_the_generator_and_the_models_attributes_back(kind: str) -> None:
    """``hyper_step`` puts torch's generator and the model's plain tensor attributes back when the
    user's loss raises ("a script that catches the error and goes on differed from one that never
    made the call, bit for bit"); ``hypergradient`` did not: the dropout masks (Implicit) or the
    perturbations (SelfTuning) drawn before the error moved the generator for good, and
    SelfTuning's validation pass left the failed batch's statistic on the model. A meta-batch
    script that skips a task whose loss failed then trained on other random numbers than one
    that never met the task."""
    hopt, fuse = _raising_hopt(kind)
    vb = _batch(1)
    kwargs = {"val_batch": vb} if kind == "selftuning" else {"train_batch": _batch(0), "val_batch": vb}
    rng = torch.get_rng_state()
    last = getattr(hopt.model, "last", None)
    fuse.arm(1)
    with pytest.raises(_Boom):
        hopt.hyper_step(**kwargs)
    # (hyper_step: as before, and as documented)
    assert torch.equal(torch.get_rng_state(), rng) and getattr(hopt.model, "last", None) is last
    fuse.arm(1)
    with pytest.raises(_Boom):
        hopt.hypergradient(**kwargs)
    assert getattr(hopt.model, "last", None) is last, "the failed validation pass's attribute was left"
    assert torch.equal(torch.get_rng_state(), rng), "torch's generator moved by the failed call"


# ----------------------------------------------------- the once-differentiable guard, other threads


class _Gate(torch.autograd.Function):
    """Identity; its backward, when armed, lets another thread run while this one is inside the
    hyperstep's differentiation of the training gradient."""

    inside = threading.Event()
    done = threading.Event()
    armed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if _Gate.armed and torch.is_grad_enabled():
            _Gate.armed = False
            _Gate.inside.set()
            _Gate.done.wait(20)
        return g * 1.0


class _Twice(torch.autograd.Function):
    """The user's own custom Function (in their own code), backward marked once-differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * 2


def test_a_hyperstep_does_not_refuse_another_threads_own_double_backward() -> None:
    """Implicit (and Unrolled) swap ``BackwardCFunction.apply`` process-wide while they
    differentiate the training gradient, to refuse a ``@once_differentiable`` Function on the path
    to the weights. Plain PyTorch code in another thread at that moment (a second trial of an
    Optuna study with ``n_jobs=2``, a data thread computing a gradient penalty) that took
    ``torch.autograd.grad(..., create_graph=True)`` through its own once-differentiable Function
    (legal in torch: only differentiating that gradient again fails) got this library's
    RuntimeError, naming "Implicit (its Hessian-vector products ...)", a call it had no part in."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _Gate.apply(torch.tanh(self.l(x)))

    torch.manual_seed(0)
    model = Net().to(DT)
    wd = hg.hparams.WeightDecay(model, per="global", init=1e-2)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)

    hopt = hg.Implicit(
        model,
        wd,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.1),
        solver=hg.CG(maxiter=2),
    )
    b = (torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT))
    hopt.step(b)
    x = torch.randn(4, dtype=DT, requires_grad=True)
    (want,) = torch.autograd.grad(_Twice.apply(x).sum(), x, create_graph=True)
    got: list[Any] = []

    def other() -> None:
        try:
            if not _Gate.inside.wait(20):
                got.append("the hyperstep never reached the gate")
                return
            (g,) = torch.autograd.grad(_Twice.apply(x).sum(), x, create_graph=True)
            got.append(g)
        except BaseException as e:  # (reported below, in the test's thread)
            got.append(e)
        finally:
            _Gate.done.set()

    _Gate.inside.clear()
    _Gate.done.clear()
    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    _Gate.armed = True
    try:
        hopt.hyper_step(train_batch=b, val_batch=b)
    finally:
        _Gate.armed = False
        _Gate.done.set()
        thread.join(20)
    assert len(got) == 1 and isinstance(got[0], torch.Tensor), f"the other thread got {got!r}"
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


# ------------------------------------------------------- Delta-STN: errors of the response pass


class _UsersError(RuntimeError):
    """An error class of the user's own (a data check in the model's forward)."""


class _FailingStn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(3, 5, n), hg.nn.StnLinear(5, 2, n)
        self.fuse = _Fuse()
        self.error: type[BaseException] = _Boom

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        try:
            self.fuse()
        except _Boom:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB") from None
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.l1(x, d)), d)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, _UsersError])
def test_delta_stn_response_pass_raises_the_models_own_error_as_it_is(error: type[BaseException]) -> None:
    """Delta-STN's response pass (the second model call of each step) runs on dual numbers and
    holds the tangents as well, so it is where a step runs out of memory first. Any RuntimeError
    it raised was re-raised as a plain RuntimeError, wrapped twice ("an operation of the model
    does not support the forward-mode AD ... (the model failed in the response step ... (CUDA out
    of memory ...)) ... pass linearize=False"): an ``except torch.OutOfMemoryError`` retry with a
    smaller batch (the usual recipe) no longer caught it, and the message sent the user after
    forward-mode AD. An error of another class than RuntimeError itself is the model's: raised as
    it is (the step still changes nothing)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
    model = _FailingStn(hp.size).to(DT)
    model.error = error

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        delta=True,
    )
    b = _batch(0)
    hopt.step(b)
    before = [p.detach().clone() for p in model.parameters()]
    model.fuse.arm(2)  # the second model call of the step: the linearised response pass
    with pytest.raises(error, match="^CUDA out of memory"):
        hopt.step(b)
    assert hopt.inner_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# ------------------------------------ an error deep inside a hyperstep: nothing left behind


class _Counted(torch.autograd.Function):
    """Identity whose backward (every backward pass through the model: the training gradient, each
    Hessian-vector product, each replayed step's gradient) calls the fuse; twice differentiable,
    with a jvp for forward mode."""

    fuse = _Fuse()

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        _Counted.fuse()
        return g * 1.0

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)
        self.last = torch.zeros(5, dtype=DT)  # a plain attribute the forward updates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.l1(x)))
        self.last = h.detach().mean(0)
        return self.l2(_Counted.apply(F.dropout(h, 0.2, self.training)))


def _family(kind: str) -> Any:
    torch.manual_seed(0)
    model = _Net().to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind.startswith("marglik"):
        model.eval()
        hp: nn.Module = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
        return hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=64,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
            through_map=True,
            solver=hg.CG(maxiter=5, warm_start=True),
        )
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=1e-2)})

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + h["wd"].penalty(m)

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    common: dict[str, Any] = {"inner_optimizer": inner}
    if kind.startswith("unrolled"):
        hp["lr"] = hg.hparams.LearningRate(inner, relative=True)
        common["outer_optimizer"] = torch.optim.Adam(hp.parameters(), lr=0.05)
        mode = "forward" if kind == "unrolled-forward" else "reverse"
        return hg.Unrolled(
            model, hp, train, val, steps=2, mode=mode, checkpoint=kind == "unrolled-ckpt", **common
        )
    common["outer_optimizer"] = torch.optim.Adam(hp.parameters(), lr=0.05)
    return hg.Implicit(model, hp, train, val, solver=hg.Neumann(steps=3, alpha="power"), **common)


def _entry_points() -> list[Any]:
    from torch.autograd.function import BackwardCFunction
    from torch.utils.hooks import BackwardHook

    return [
        torch.Tensor.register_hook,
        vars(BackwardHook).get("_apply_on_tensors"),
        vars(BackwardCFunction).get("apply"),
        torch.cdist,
        torch.embedding,
        torch._weight_norm,
        torch._C._nn.mse_loss,
        torch.utils.checkpoint.CheckpointFunction,
        torch.softmax,
        F.softmax,
        torch.backends.mha.get_fastpath_enabled(),
    ]


def _state(hopt: Any) -> dict[str, Any]:
    def grads(module: nn.Module) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in module.parameters()]

    return {
        "model": {k: v.clone() for k, v in hopt.model.state_dict().items()},
        "last": hopt.model.last.clone(),
        "modes": [m.training for m in hopt.model.modules()],
        "hparams": {k: v.clone() for k, v in hopt.hparams.state_dict().items()},
        "grads": grads(hopt.model) + grads(hopt.hparams),
        "method": hopt.state_dict(),  # (both optimisers, the counters, the method's own state)
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("implicit-power", _Boom),  # mid power iteration (the first hyperstep's 20 HVPs)
        ("unrolled-reverse", KeyboardInterrupt),  # mid backward through the replay
        ("unrolled-ckpt", _Boom),  # mid checkpointed replay
        ("unrolled-forward", KeyboardInterrupt),  # inside a forward-mode dual level
        ("marglik-map", _Boom),  # mid CG solve through the MAP
    ],
)
def test_an_error_deep_inside_a_hyperstep_leaves_nothing_behind_and_the_run_goes_on_bit_exact(
    kind: str, error: type[BaseException]
) -> None:
    """Not covered before (errors were raised by a loss, or at the step's boundaries): an error
    raised in the middle of a hyperstep's backward passes (an HVP of the power iteration or of
    CG, a replayed step's gradient, forward mode's dual level; KeyboardInterrupt too) leaves the
    model (weights, BatchNorm statistics, a plain attribute, modes), the hyperparameters, their
    ``.grad``, both optimisers, the method's state, torch's generator, the torch entry points
    hypergrad swaps while it works and the forward-mode level exactly as before; and a run that
    caught it and took the hyperstep again ends bit for bit where one without the error ends."""
    import torch.autograd.forward_ad as fwAD

    batches = [_batch(i) for i in range(4)]
    hyper = {"train_batch": batches[0], "val_batch": _batch(9)}

    fuse = _Counted.fuse
    calls: list[int] = []

    def run(fail: bool) -> dict[str, Any]:
        hopt = _family(kind)
        for i in range(2):
            hopt.step(batches[i])
        if fail:
            before, entry = _state(hopt), _entry_points()
            fuse.arm(calls[0] // 2 + 1, error)  # (half-way through the hyperstep's backward passes)
            with pytest.raises(error):
                hopt.hyper_step(**hyper)
            assert fuse.at == 0, "the error was not raised where armed"
            _assert_same(before, _state(hopt), "after the error")
            assert all(a is b or a == b for a, b in zip(entry, _entry_points(), strict=True))
            with fwAD.dual_level():  # (no level left open: a nested one would raise)
                pass
        start = fuse.calls
        hopt.hyper_step(**hyper)
        calls.append(fuse.calls - start)
        hopt.step(batches[2])
        hopt.hyper_step(**hyper)
        return _state(hopt)

    _assert_same(run(False), run(True), "the run that caught the error")


class _HalfSquareOnce(torch.autograd.Function):
    """``0.5 * |d|^2`` whose backward is once-differentiable: a custom loss of the user's."""

    @staticmethod
    def forward(ctx: Any, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d)
        return 0.5 * (d**2).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return g * d


def test_the_once_differentiable_guard_of_one_thread_is_not_relaxed_by_another_threads_hyperstep() -> None:
    """The guard's settings (what to name, and whether to refuse where no gradient with a graph
    flows in) were process-wide, set by the block opened last: an ``Unrolled(mode="forward")``
    hyperstep in the main thread (which lets such a Function pass unless a graph flows in) while
    ``hg.implicit_hypergradient`` (a pure function: no lock) was inside its training gradient in
    another thread left the latter's guard relaxed: its custom loss with a once-differentiable
    backward went through unrefused, the Hessian and mixed term lost its part, and the
    hypergradient came out silently wrong (here exactly 0 instead of 2 w / 1.01)."""
    w = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    lam = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    got: list[Any] = []

    def worker() -> None:
        def train() -> torch.Tensor:  # L_T = |w - lam|^2 / 2 + 0.005 |w|^2
            return _Gate.apply(_HalfSquareOnce.apply(w - lam)) + 0.005 * (w**2).sum()

        def val() -> torch.Tensor:
            return (w**2).sum()

        try:
            got.append(hg.implicit_hypergradient(train, val, [w], [lam], hg.CG(maxiter=10))[0])
        except BaseException as e:  # (reported below, in the test's thread)
            got.append(e)
        finally:
            _Gate.inside.set()  # (never left waiting)

    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(DT)
    lr = hg.hparams.LearningRate(inner := torch.optim.SGD(model.parameters(), lr=0.1))

    def mse(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1])

    hopt = hg.Unrolled(
        model,
        lr,
        mse,
        mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.1),
        steps=1,
        mode="forward",
    )
    b = (torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT))
    hopt.step(b)
    _Gate.inside.clear()
    _Gate.done.clear()
    _Gate.armed = True
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        assert _Gate.inside.wait(20), "the worker never reached its training gradient"
        hopt.hyper_step(val_batch=b)  # (the worker waits inside its guarded backward pass)
    finally:
        _Gate.armed = False
        _Gate.done.set()
        thread.join(20)
    assert len(got) == 1
    assert isinstance(got[0], RuntimeError) and "_HalfSquareOnce" in str(got[0]), (
        f"the worker's once-differentiable loss was not refused: got {got[0]!r}"
    )
    assert "Implicit" in str(got[0])  # (its own call named, not the other thread's)


# ------------------------------------------------- an optimiser step that raises, under a GradScaler


def test_a_step_whose_optimizer_raised_under_a_grad_scaler_does_not_break_every_later_step() -> None:
    """``step(batch, scaler=...)`` unscales the gradients (``scaler.unscale_(inner_optimizer)``)
    before the optimiser's step, and calls ``scaler.update()`` after it. When the optimiser's step
    raised (out of memory in its state's first allocation, a step pre-hook: the case ``step``
    undoes, recording no step), the scaler was left marked as unscaled for that optimiser until an
    ``update()`` that never came: every later ``step`` failed with torch's "unscale_() has already
    been called on this optimizer since the last update()", so a run that caught the error (a
    retry after freeing memory) could not go on at all. It must go on exactly as a run without
    the failed call."""

    def run(fail: bool) -> tuple[list[torch.Tensor], float, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        wd = hg.hparams.WeightDecay(model, per="global", init=1e-2)

        def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        hopt = hg.Implicit(
            model,
            wd,
            loss,
            loss,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.1),
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        fuse = _Fuse()
        inner.register_step_pre_hook(lambda *_: fuse())
        batches = [(x.float(), y) for x, y in (_batch(i) for i in range(3))]
        if fail:
            fuse.arm(1)
            with pytest.raises(_Boom):
                hopt.step(batches[0], scaler=scaler)
            inner.zero_grad(set_to_none=True)
        for b in batches:
            hopt.step(b, scaler=scaler)
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale(), hopt.inner_steps

    want, got = run(False), run(True)
    assert got[1:] == want[1:]
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
