"""Round 22: torch.compile, torch.func, grad modes and autograd debugging modes around every family.

What was covered before: a compiled *model* in every family (test_compile.py, test_matrix.py,
test_round19_precision.py), bfloat16 autocast (test_precision.py, test_round19_precision.py,
test_matrix.py), GradScaler (test_round10_precision.py, test_round19_precision.py),
``torch.no_grad()`` / ``inference_mode`` around calls (test_contract.py, test_round14_functional.py).

New here:

* a compiled *loss* (``train_loss = torch.compile(train_loss)``) in every family, against the
  eager loss, bit for bit (aot_eager: the same kernels);
* ``torch.set_grad_enabled(False)`` switched off globally, ``torch.autograd.set_detect_anomaly(True)``
  and ``torch.use_deterministic_algorithms(True)`` (whose ``fill_uninitialized_memory`` fills
  every ``torch.empty`` with NaN) around the whole loop of every family: nothing changes.

Found:

1. ``SelfTuning(delta=True)`` with a compiled ``train_loss``, or with ``step`` called inside a
   compiled function, failed in its first ``step`` with dynamo's "Attempt to trace forbidden
   callable <function set_stance>": the response pass calls the loss with the linearised model,
   whose call switches to eager mode (compiled graphs drop forward-mode tangents) by
   ``torch.compiler.set_stance``, which dynamo cannot trace. A compiled loss is documented to
   work (``hypergrad._wrap.compiled_run_eagerly``) and works in every other family.
2. The same call used ``torch.compiler.set_stance`` unconditionally: it is new in torch 2.6 and
   setup.cfg allows torch >= 2.1, where every Delta-STN step failed with an AttributeError
   (``compiled_run_eagerly`` already falls back to nothing there).
3. ``hyper_step`` / ``hypergradient`` called inside a ``torch.compile``d function (a compiled
   training step ``@torch.compile def train_step(...)``, common in current training scripts) failed
   in every family with dynamo's "Attempt to trace forbidden callable set_stance" (dynamo traced
   into ``compiled_run_eagerly``). Keeping only the hypergradient out of the trace is not enough:
   the traced outer optimiser step was then silently lost (hyperparameters 0.1 off after two
   hypersteps). The hyperstep entry points are now never traced (``torch.compiler.disable``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from test_contract import BY_ID, METHODS, _batches
from torch import Tensor

ALL_IDS = [m.id for m in METHODS]
VAL = _batches(1, seed=99)[0]

# (dynamo's graph-break notes, and its own probe of .grad while tracing the STN layers)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)


def _build(mid: str, wrap_loss: Callable[[Any], Any] | None = None) -> Any:
    m = BY_ID[mid]
    torch.manual_seed(0)
    model, hp, tl, vl = m.problem()
    if wrap_loss is not None:
        tl, vl = wrap_loss(tl), wrap_loss(vl)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    return m.make(model, hp, tl, vl, inner, outer)


def _train(hopt: Any, around: Callable[[], Any] = contextlib.nullcontext) -> list[Tensor]:
    """Six steps, a hyperstep after every third (each call inside ``around()``): the
    hypergradients, then the hyperparameters and the weights at the end."""
    torch.manual_seed(3)
    out: list[Tensor] = []
    for i, b in enumerate(_batches(6)):
        with around():
            hopt.step(b)
            if i % 3 == 2:
                hopt.hyper_step(train_batch=b, val_batch=VAL)
        if i % 3 == 2:
            out += [p.grad.clone() for p in hopt.hparams.parameters()]
    return (
        out
        + [p.detach().clone() for p in hopt.hparams.parameters()]
        + [p.detach().clone() for p in hopt.model.parameters()]
    )


def _assert_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), float((x - y).abs().max())


# ------------------------------------------------------------------------ a compiled train_loss

_LOSS_IDS = [i for i in ALL_IDS if not i.startswith("marglik")]  # (MarginalLikelihood takes no losses)


def _compile_loss(fn: Any) -> Any:
    return torch.compile(fn, backend="aot_eager")


def _compiled_loss_case(mid: str) -> Any:
    return mid


# Compile tests are kept to two rows per family where the family has several (the losses are
# tiny; most of the time is dynamo's tracing): Implicit (Neumann), Unrolled reverse and
# forward, the three self-tuning rows.
_COMPILED_LOSS_ROWS = [
    "implicit-neumann",
    "unrolled-reverse",
    "unrolled-forward",
    "selftuning",
    "selftuning-delta",
    "best-response-global",
]


@pytest.mark.slow
@pytest.mark.parametrize("mid", [_compiled_loss_case(m) for m in _COMPILED_LOSS_ROWS])
def test_a_compiled_loss_trains_and_tunes_as_the_eager_one(mid: str) -> None:
    """``torch.compile`` applied to ``train_loss`` and ``val_loss`` themselves (not to the model):
    steps run the compiled loss, hypergradients run it eagerly (``compiled_run_eagerly``).
    aot_eager runs the same kernels, so the hypergradients, hyperparameters and weights after
    six steps and two hypersteps equal the eager run's bit for bit."""
    assert mid in _LOSS_IDS
    torch._dynamo.reset()
    eager = _train(_build(mid))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (dynamo's graph-break notes)
        compiled = _train(_build(mid, _compile_loss))
    _assert_equal(eager, compiled)
    torch._dynamo.reset()


# ---------------------------------------------- global grad mode, anomaly mode, deterministic mode


@contextlib.contextmanager
def _grad_off_globally() -> Iterator[None]:
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(prev)


@contextlib.contextmanager
def _anomaly() -> Iterator[None]:
    with torch.autograd.set_detect_anomaly(True):
        yield


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # (torch.empty's memory is filled with NaN)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("mode", ["grad-off", "anomaly", "deterministic"])
@pytest.mark.parametrize("mid", ALL_IDS)
def test_global_autograd_modes_change_nothing(mid: str, mode: str) -> None:
    """Not covered before: ``torch.set_grad_enabled(False)`` as a global switch (an evaluation
    script that never turns it back on), anomaly detection (which re-checks every backward for
    NaN and keeps forward traces) and deterministic algorithms (with ``torch.empty`` filled
    with NaN, an uninitialised buffer the library read would show) around every ``step`` and
    ``hyper_step`` of every family: the run equals the plain one bit for bit."""
    around = {"grad-off": _grad_off_globally, "anomaly": _anomaly, "deterministic": _deterministic}[mode]
    plain = _plain(mid)
    got = _train(_build(mid), around)
    _assert_equal(plain, got)
    assert torch.is_grad_enabled()


_PLAIN: dict[str, list[Tensor]] = {}


def _plain(mid: str) -> list[Tensor]:
    """The plain run of ``mid`` (computed once for the three modes)."""
    if mid not in _PLAIN:
        _PLAIN[mid] = _train(_build(mid))
    return _PLAIN[mid]


# --------------------------------------------------------- torch < 2.6: no torch.compiler.set_stance


def test_delta_stn_runs_on_a_torch_without_set_stance(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.6 has no ``torch.compiler.set_stance`` (simulated by removing it): the run
    (no compiled code in it) equals the run on this torch bit for bit."""
    plain = _train(_build("selftuning-delta"))
    monkeypatch.delattr(torch.compiler, "set_stance")
    _assert_equal(plain, _train(_build("selftuning-delta")))


# ------------------------------------------------ step / hyper_step inside a compiled function


def _compiled_calls(hopt: Any, which: str) -> tuple[Any, Any]:
    step = lambda b: hopt.step(b)  # noqa: E731
    hyper = lambda b, v: hopt.hyper_step(train_batch=b, val_batch=v)  # noqa: E731
    if which in ("step", "both"):
        step = torch.compile(step, backend="aot_eager")
    if which in ("hyper", "both"):
        hyper = torch.compile(hyper, backend="aot_eager")
    return step, hyper


def _train_calls(hopt: Any, step: Any, hyper: Any) -> list[Tensor]:
    """Three steps and a hyperstep (dynamo's tracing of the library's code is what costs)."""
    torch.manual_seed(3)
    out: list[Tensor] = []
    for i, b in enumerate(_batches(3)):
        step(b)
        if i % 3 == 2:
            hyper(b, VAL)
            out += [p.grad.clone() for p in hopt.hparams.parameters()]
    return (
        out
        + [p.detach().clone() for p in hopt.hparams.parameters()]
        + [p.detach().clone() for p in hopt.model.parameters()]
    )


def _step_case(mid: str) -> Any:
    return mid


@pytest.mark.slow
@pytest.mark.parametrize("mid", [_step_case(m) for m in ["implicit-identity", "selftuning-delta"]])
def test_step_inside_a_compiled_function_trains_as_eager(mid: str) -> None:
    """``step`` called from a ``torch.compile``d training-step function (dynamo traces into it,
    breaking its graph where it must): weights, hyperparameters and hypergradients (hypersteps
    eager) equal the eager run's bit for bit. Not covered before; passes in the other families."""
    torch._dynamo.reset()
    h0 = _build(mid)
    plain = _train_calls(h0, h0.step, lambda b, v: h0.hyper_step(train_batch=b, val_batch=v))
    hopt = _build(mid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _train_calls(hopt, *_compiled_calls(hopt, "step"))
    _assert_equal(plain, got)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("mid", ["implicit-neumann", "selftuning", "marglik-ntk"])
def test_hyper_step_inside_a_compiled_function_tunes_as_eager(mid: str) -> None:
    """``hyper_step`` called from a ``torch.compile``d function: it must run eagerly (double
    backward) and give the eager run's hypergradients and hyperparameters bit for bit (a
    hyperstep traced but for its hypergradient lost its outer optimiser step: 0.1 off)."""
    torch._dynamo.reset()
    h0 = _build(mid)
    plain = _train_calls(h0, h0.step, lambda b, v: h0.hyper_step(train_batch=b, val_batch=v))
    hopt = _build(mid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _train_calls(hopt, *_compiled_calls(hopt, "hyper"))
    _assert_equal(plain, got)
    torch._dynamo.reset()


@pytest.mark.slow
def test_hypergradient_inside_a_compiled_function_is_the_eager_one() -> None:
    torch._dynamo.reset()
    out = []
    for compiled in (False, True):
        hopt = _build("implicit-cg")
        batches = _batches(3)
        for b in batches:
            hopt.step(b)

        def fn(hopt: Any = hopt, tb: Any = batches[-1]) -> Any:
            return hopt.hypergradient(train_batch=tb, val_batch=VAL)[0]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(list((torch.compile(fn, backend="aot_eager") if compiled else fn)()))
    _assert_equal(out[0], out[1])
    assert all(float(g.abs().max()) > 0 for g in out[0])
    torch._dynamo.reset()


# ------------------------------------------- GradScaler overflows in the MarginalLikelihood family


@pytest.mark.parametrize("mid", ["marglik-ntk", "marglik-augmented"])
def test_marglik_overflowed_scaled_steps_leave_no_trace(mid: str) -> None:
    """test_round19_precision.py checks this for Implicit and Unrolled and leaves the
    MarginalLikelihood rows out (not covered before; passes). float32, inputs x100 so that a
    GradScaler at 2^127 overflows a step: the weights and the hypergradient then equal, bit for
    bit, those of a run without a scaler on the accepted batches (the generator reseeded per
    batch: the augmented row draws shifts in its steps)."""
    m = BY_ID[mid]
    batches = [(100 * x.float(), y) for x, y in _batches(8)]
    vb = (_batches(1, seed=9)[0][0].float(), _batches(1, seed=9)[0][1])

    def run(scaler: Any, idx: list[int]) -> tuple[list[int], list[Tensor]]:
        torch.manual_seed(0)
        model, hp, tl, vl = m.problem()
        model.float()
        hp.float()
        inner = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9)
        hopt = m.make(model, hp, tl, vl, inner, torch.optim.Adam(hp.parameters(), lr=0.0))
        taken = []
        for i in idx:
            n = hopt.inner_steps
            torch.manual_seed(100 + i)
            hopt.step(batches[i], scaler=scaler)
            taken += [i] if hopt.inner_steps > n else []
        torch.manual_seed(7)
        grads, _ = hopt.hypergradient(train_batch=batches[-1], val_batch=vb)
        return taken, [*grads, *(p.detach().clone() for p in model.parameters())]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=10**6)
    taken, scaled = run(scaler, list(range(8)))
    assert 0 < len(taken) < 8 and scaler.get_scale() < 2.0**127  # the premise: some overflowed
    _, plain = run(None, taken)
    _assert_equal(scaled, plain)
