"""Features that each work alone, tried together with every family (one extra feature at a time):
a ``torch.compile``d model, bfloat16 autocast around ``step`` / ``hyper_step``, channels_last
convolutions, a ``DataParallel`` wrapper, ``step(batch, max_grad_norm=...)``,
``hypergradient()`` against ``hyper_step()``, and a NaN batch skipped mid-run. The ground truth
is the same run without the feature where the feature must not change the numbers."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_contract import BY_ID, METHODS, _assert_same, _batches, _snapshot
from torch import nn

import hypergrad as hg

DT = torch.float64
VAL = _batches(1, seed=99)[0]


def _build(m: Any, wrap: Any = None, momentum: float = 0.9, float32: bool = False, **kw: Any) -> Any:
    torch.manual_seed(0)
    model, hp, tl, vl = m.problem()
    if float32:
        model.float()
        hp.float()
    if wrap is not None:
        model = wrap(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    return m.make(model, hp, tl, vl, inner, outer, **kw)


def _train(hopt: Any, n: int = 6) -> list[torch.Tensor]:
    """``n`` steps, a hyperstep after every third; the hypergradients, hyperparameters, weights."""
    torch.manual_seed(3)
    out = []
    for i, b in enumerate(_batches(n)):
        hopt.step(b)
        if i % 3 == 2:
            hopt.hyper_step(train_batch=b, val_batch=VAL)
            out += [p.grad.clone() for p in hopt.hparams.parameters()]
    return (
        out
        + [p.detach().clone() for p in hopt.hparams.parameters()]
        + [p.detach().clone() for p in hopt.model.parameters()]
    )


# ---------------------------------------------------------------------------- torch.compile


# (dynamo's own probe of .grad while tracing the STN layers warns, which filterwarnings=error raises)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("mid", ["selftuning-delta", "best-response-local"])
def test_compiled_model_tunes_like_eager(mid: str) -> None:
    """Delta-STN linearises the model's output with forward-mode AD, which compiled graphs drop:
    its steps came out silently different from eager (weights off by 1e-2 after one step).
    BestResponse refused a compiled HyperNet ("model must be a hg.nn.HyperNet, got
    OptimizedModule")."""
    torch._dynamo.reset()
    eager = _train(_build(BY_ID[mid]))
    compiled = _train(_build(BY_ID[mid], wrap=lambda mod: torch.compile(mod, backend="aot_eager")))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- autocast


def _autocast(on: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _f32(b: Any) -> Any:
    return tuple(t.float() if t.is_floating_point() else t for t in b)


@pytest.mark.parametrize("mid", ["unrolled-reverse", "unrolled-checkpoint"])
@pytest.mark.parametrize("where", ["step", "hyper_step"])
def test_unrolled_replays_each_step_in_its_autocast_state(mid: str, where: str) -> None:
    """Steps under autocast and a hyperstep outside it (or the other way round): the replay ran
    every step in the hyperstep's autocast state, so it ended 4e-4 away from the real weights
    (a ReplayWarning) and differentiated other steps than those taken."""
    hopt = _build(BY_ID[mid], float32=True)
    batches = [_f32(b) for b in _batches(4)]
    with _autocast(where == "step"):
        for b in batches:
            hopt.step(b)
    real = [w.detach().clone() for w in hopt.pair.weights]
    with _autocast(where == "hyper_step"):
        replayed = hopt.replayed_weights()
        grads, info = hopt.hypergradient(val_batch=_f32(VAL))  # (ReplayWarning is an error here)
    for r, w in zip(replayed, real, strict=True):
        assert torch.equal(r, w)
    reference = _build(BY_ID[mid], float32=True)  # all in float32
    for b in batches:
        reference.step(b)
    want, _ = reference.hypergradient(val_batch=_f32(VAL))
    g, w_ = torch.cat([t.reshape(-1) for t in grads]), torch.cat([t.reshape(-1) for t in want])
    assert float(F.cosine_similarity(g, w_, dim=0)) > 0.999
    assert float((g - w_).norm() / w_.norm()) < 0.02
    if where == "step":  # the recorded autocast state survives a weights_only checkpoint
        buf = io.BytesIO()
        torch.save(hopt.state_dict(), buf)
        buf.seek(0)
        resumed = _build(BY_ID[mid], float32=True)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        again, _ = resumed.hypergradient(val_batch=_f32(VAL))
        for a, b_ in zip(grads, again, strict=True):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("mid", ["implicit-cg", "selftuning", "marglik-ntk"])
def test_one_autocast_block_around_the_loop_trains_like_one_per_step(mid: str) -> None:
    """Autocast caches its bfloat16 copies of leaf weights until its block exits: with one block
    around several steps, every step after the first ran on the weights as they were before
    (and hypersteps on stale weights too). ``step`` and ``hyper_step`` now drop the cache after
    they update in place."""
    runs = []
    for one_block in (False, True):
        hopt = _build(BY_ID[mid], float32=True)
        torch.manual_seed(3)
        with _autocast(one_block):
            for i, b in enumerate(_batches(6)):
                with _autocast(not one_block):
                    hopt.step(_f32(b))
                    if i % 3 == 2:
                        hopt.hyper_step(train_batch=_f32(b), val_batch=_f32(VAL))
        runs.append(_snapshot(hopt))
    _assert_same(runs[0], runs[1])


def test_forward_mode_refuses_autocast_by_name() -> None:
    """Forward-mode AD does not follow autocast's casts: the replay crashed deep inside the model
    ("expected m1 and m2 to have the same dtype"). Refused up front, changing nothing."""
    hopt = _build(BY_ID["unrolled-forward"], float32=True)
    b = _f32(_batches(1)[0])
    hopt.step(b)
    before = _snapshot(hopt)
    with _autocast(True):
        with pytest.raises(ValueError, match=r"mode='forward'.*step\(\).*autocast"):
            hopt.step(b)
        with pytest.raises(ValueError, match=r"mode='forward'.*hyper_step\(\).*autocast"):
            hopt.hyper_step(val_batch=_f32(VAL))
    _assert_same(before, _snapshot(hopt))
    assert hopt.inner_steps == 1 and len(hopt._records) == 1


@pytest.mark.parametrize("mid", ["marglik-augmented", "implicit-neumann", "selftuning-delta"])
def test_hypergradient_under_autocast_is_close_to_float32(mid: str) -> None:
    """MarginalLikelihood with a RandomTranslation crashed under autocast (grid_sample has no
    bfloat16 backward on the CPU: the augmentation now runs in the inputs' precision)."""
    results = []
    for on in (False, True):
        hopt = _build(BY_ID[mid], float32=True)
        torch.manual_seed(3)
        with _autocast(on):
            for b in _batches(4):
                hopt.step(_f32(b))
            torch.manual_seed(4)
            grads, info = hopt.hypergradient(train_batch=_f32(_batches(1)[0]), val_batch=_f32(VAL))
        assert not info.skipped and all(g.dtype == torch.float32 for g in grads)
        results.append(torch.cat([g.reshape(-1) for g in grads]))
    full, half = results
    assert float(half.norm()) > 0
    assert float(F.cosine_similarity(full, half, dim=0)) > 0.999
    assert float((half - full).norm() / full.norm()) < 0.05


# ---------------------------------------------------------------------------- channels_last


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.f = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(torch.tanh(self.bn(self.c(x))).flatten(1))


class _StnConv(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.c, self.f = hg.nn.StnConv2d(2, 3, 3, n, padding=1), hg.nn.StnLinear(48, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        # (dropout on the flat features: its mask, like torch's own dropout's, follows the layout)
        return self.f(hg.nn.dropout(torch.tanh(self.c(x, d)).flatten(1), d["dropout"], self.training), d)


def _conv_problem(mid: str) -> tuple[nn.Module, nn.Module, Any, Any]:
    def ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    if mid.startswith("selftuning"):
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)

        def stn(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0], h), b[1])

        return _StnConv(hp.size).to(DT), hp, stn, stn
    model = _Conv().to(DT)
    if mid.startswith("marglik"):
        model.bn = nn.Identity()  # type: ignore[assignment]  (its bound refuses train-mode BatchNorm)
        return (
            model,
            nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT),
            None,
            None,
        )
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    return model, hp, lambda m, h, b: ce(m, h, b) + h.penalty(m), ce


@pytest.mark.parametrize(
    "mid", ["implicit-cg", "unrolled-reverse", "unrolled-forward", "selftuning-delta", "marglik-through-map"]
)
def test_channels_last_gives_the_contiguous_run(mid: str) -> None:
    runs = []
    for cl in (False, True):
        torch.manual_seed(0)
        model, hp, tl, vl = _conv_problem(mid)
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt)
        hopt = BY_ID[mid].make(
            model, hp, tl, vl, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(hp.parameters(), lr=0.05),
        )  # fmt: skip
        g = torch.Generator().manual_seed(1)
        data = [(torch.randn(8, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))]
        data = [(x.to(memory_format=fmt), y) for x, y in data * 7]
        torch.manual_seed(3)
        out = []
        for i, b in enumerate(data[:6]):
            hopt.step(b)
            if i % 3 == 2:
                hopt.hyper_step(train_batch=b, val_batch=data[6])
                out += [p.grad.clone() for p in hp.parameters()]
        runs.append(out + [p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- the whole registry

each_method = pytest.mark.parametrize("m", METHODS, ids=[m.id for m in METHODS])


def _some(*ids: str) -> Any:
    return pytest.mark.parametrize("m", [BY_ID[i] for i in ids], ids=ids)


# (not BestResponse: its losses call model.weights(h), which a DataParallel wrapper lacks)
@_some("implicit-direct", "unrolled-reverse", "selftuning-delta", "marglik-augmented")
def test_dataparallel_wrapper_changes_nothing(m: Any) -> None:
    plain, wrapped = _train(_build(m)), _train(_build(m, wrap=nn.DataParallel))
    for a, b in zip(plain, wrapped, strict=True):
        assert torch.equal(a, b)


# (Implicit and Unrolled: tests/test_clipping.py)
@_some("selftuning", "selftuning-delta", "best-response-global", "marglik-ntk", "marglik-through-map")
def test_max_grad_norm_clips_the_step_of_every_family(m: Any) -> None:
    """SGD without momentum: a binding clip moves the weights by exactly ``lr * max_grad_norm``."""
    hopt = _build(m, momentum=0.0)
    batches = _batches(3)
    hopt.step(batches[0])
    hopt.hyper_step(train_batch=batches[0], val_batch=VAL)
    for b in batches[1:]:
        before = [w.detach().clone() for w in hopt.pair.weights]
        hopt.step(b, max_grad_norm=1e-3)
        moved = torch.cat(
            [(w.detach() - v).reshape(-1) for w, v in zip(hopt.pair.weights, before, strict=True)]
        )
        assert math.isclose(float(moved.norm()), 0.1 * 1e-3, rel_tol=1e-4)


@each_method
def test_hypergradient_equals_what_hyper_step_writes(m: Any) -> None:
    hopt = _build(m)
    batches = _batches(4)
    for b in batches:
        hopt.step(b)
    rng = torch.get_rng_state()  # (self-tuning draws its perturbation from torch's RNG)
    grads, info = hopt.hypergradient(train_batch=batches[-1], val_batch=VAL)
    assert hopt.hyper_steps == 0
    torch.set_rng_state(rng)
    stepped = hopt.hyper_step(train_batch=batches[-1], val_batch=VAL)
    for g, p in zip(grads, hopt.hparams.parameters(), strict=True):
        assert torch.equal(g, p.grad)
    if getattr(hopt, "outer_steps", 1) == 1:  # (with several, info is the last step's)
        assert (info.outer_loss, info.hypergrad_norm) == (stepped.outer_loss, stepped.hypergrad_norm)


@_some(
    "implicit-neumann", "unrolled-checkpoint", "selftuning-delta", "best-response-local", "marglik-parametric"
)
def test_a_skipped_nan_batch_mid_run_leaves_the_run_as_without_it(m: Any) -> None:
    batches = _batches(6)
    nan = (batches[0][0].clone(), batches[0][1])
    nan[0][0, 0] = float("nan")
    runs = []
    for with_nan in (False, True):
        hopt = _build(m, on_nonfinite="skip")
        torch.manual_seed(1)
        for i, b in enumerate(batches):
            if with_nan and i == 3:
                rng = torch.get_rng_state()  # (a refused step may have drawn its noise)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", hg.NonFiniteWarning)
                    hopt.step(nan)
                    bad = (b, nan) if m.needs_val else (nan, VAL)
                    assert hopt.hyper_step(train_batch=bad[0], val_batch=bad[1]).skipped
                torch.set_rng_state(rng)
            hopt.step(b)
            if i % 2 == 1:
                hopt.hyper_step(train_batch=b, val_batch=VAL)
        runs.append(_snapshot(hopt))
    _assert_same(runs[0], runs[1])
