"""Hardening of the HyperOptimizer contract as research scripts use it: copies and checkpoints of a
run (deepcopy, pickle, a fresh process), checkpoints of other hyperparameters, non-finite
hyperparameters, mixed precisions, the outer optimiser, and the containers' inputs. Each test
names the failure a user saw before the fix."""

from __future__ import annotations

import copy
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
KINDS = ["implicit", "unrolled", "selftuning", "best-response", "marglik"]


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


# module-level losses, so that a HyperOptimizer can be pickled
def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _penalised(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h["wd"].penalty(m)


class _Stn(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training), d)


def _stn_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _br_val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], hparams=h), b[1])


def _br_train(m: Any, h: Any, b: Any) -> torch.Tensor:
    w = m.weights(h)
    return _br_val(m, h, b) + h.draw(1)["decay"][0] * sum((t**2).sum() for t in w.values())


def _make(kind: str, seed: int = 0, schedulers: bool = False, **kw: Any) -> Any:
    """``(hopt, inner scheduler, outer scheduler)`` for one family (schedulers ``None`` unless
    asked for); ``hyper_step(train_batch=..., val_batch=...)`` suits them all."""
    torch.manual_seed(seed)
    opts: dict[str, Any] = {}
    if kind in ("implicit", "unrolled", "marglik"):
        model = _mlp()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "marglik":
            hp: nn.Module = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
        else:
            hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=1e-2)})
            if kind == "unrolled":  # a multiplier on the scheduled learning rate, tuned too
                hp["lr"] = hg.hparams.LearningRate(inner, relative=True)
    elif kind == "selftuning":
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        model = _Stn(hp.size).to(DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opts = {"warmup": 6}
    else:
        hp = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False, dtype=DT
        )
        model = hg.nn.HyperNet(_mlp(), hp.size, rank=2)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opts = {"sampling": "global"}
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    common: dict[str, Any] = {"inner_optimizer": inner, "outer_optimizer": outer, **opts, **kw}
    hopt: Any
    if kind == "implicit":
        hopt = hg.Implicit(model, hp, _penalised, _ce, solver=hg.Neumann(steps=3), **common)
    elif kind == "unrolled":
        hopt = hg.Unrolled(model, hp, _penalised, _ce, steps=3, **common)
    elif kind == "selftuning":
        hopt = hg.SelfTuning(model, hp, _stn_loss, _stn_loss, **common)
    elif kind == "best-response":
        hopt = hg.BestResponse(model, hp, _br_train, _br_val, **common)
    else:
        hopt = hg.MarginalLikelihood(model, hp, likelihood="classification", data_size=64, **common)
    if not schedulers:
        return hopt, None, None
    return (
        hopt,
        torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.7),
        torch.optim.lr_scheduler.ExponentialLR(outer, gamma=0.9),
    )


def _run(hopt: Any, start: int, stop: int, s_in: Any = None, s_out: Any = None) -> list[float]:
    """Steps ``start..stop-1`` of one script: a hyperstep every third step, schedulers, and the
    user's own draws from torch's RNG (data shuffling); returns every number it saw."""
    out: list[float] = []
    vb = _batch(99)
    for i in range(start, stop):
        b = _batch(i)
        out.append(float(hopt.step(b)))
        if s_in is not None:
            s_in.step()
        if (i + 1) % 3 == 0:
            out.append(hopt.hyper_step(train_batch=b, val_batch=vb).hypergrad_norm)
            if s_out is not None:
                s_out.step()
        out.append(float(torch.rand(())))
    return out


def _tensors(hopt: Any) -> list[torch.Tensor]:
    sd = (hopt.model.state_dict(), hopt.hparams.state_dict())
    return [t.clone() for d in sd for t in d.values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- copies and resumes


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_a_copy_goes_on_exactly_like_the_original(kind: str, how: str) -> None:
    """Before: a copy's weights are new tensors (with fresh version counters), which the copy took
    for weights replaced outside step(): Unrolled dropped its recorded steps (a ReplayWarning,
    then a hyperstep through 1 step instead of 3) and Implicit its Neumann step-size estimate
    (20 extra HVPs, another hypergradient)."""
    hopt, _, _ = _make(kind)
    _run(hopt, 0, 4)  # a hyperstep at 3, then one step into the next window
    clone = copy.deepcopy(hopt) if how == "deepcopy" else pickle.loads(pickle.dumps(hopt))
    assert clone.model is not hopt.model
    rng = torch.get_rng_state()
    for h in (hopt, clone):
        torch.set_rng_state(rng)
        h.step(_batch(4))
        h.step(_batch(5))
    infos = [h.hyper_step(train_batch=_batch(5), val_batch=_batch(99)) for h in (hopt, clone)]
    assert infos[0].unrolled_steps == infos[1].unrolled_steps
    assert infos[0].solver_iterations == infos[1].solver_iterations
    assert infos[0].hypergrad_norm == infos[1].hypergrad_norm
    assert _same(_tensors(hopt), _tensors(clone))


@pytest.mark.parametrize("kind", KINDS)
def test_rolling_back_twice_to_a_checkpoint_in_memory_repeats_the_same_run(kind: str) -> None:
    """Before: load_state_dict handed the checkpoint's tensors to torch.optim, which keeps them
    as its state (momentum buffers, Adam's moments) and trains them in place: the checkpoint
    kept in memory drifted with the run, so a second rollback (after a divergence, say)
    restored another state and the run went elsewhere."""
    hopt, s_in, s_out = _make(kind, schedulers=True)
    _run(hopt, 0, 4, s_in, s_out)
    best = copy.deepcopy({"hopt": hopt.state_dict(), "in": s_in.state_dict(), "out": s_out.state_dict()})
    runs = []
    for _ in range(2):
        hopt.load_state_dict(best["hopt"])
        s_in.load_state_dict(best["in"])
        s_out.load_state_dict(best["out"])
        runs.append((_run(hopt, 4, 8, s_in, s_out), _tensors(hopt)))
    assert runs[0][0] == runs[1][0]
    assert _same(runs[0][1], runs[1][1])


_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_hardening_state as t
mode, path, kinds, S, N = sys.argv[1], sys.argv[2], t.KINDS, 5, 9
if mode == "save":
    saved = {{}}
    for kind in kinds:
        hopt, s_in, s_out = t._make(kind, schedulers=True)
        t._run(hopt, 0, S, s_in, s_out)
        saved[kind] = {{"hopt": hopt.state_dict(), "in": s_in.state_dict(), "out": s_out.state_dict()}}
    torch.save(saved, path)
else:
    saved, result = torch.load(path, weights_only=True), {{}}
    for kind in kinds:
        hopt, s_in, s_out = t._make(kind, seed=123, schedulers=True)  # other weights: all from the file
        hopt.load_state_dict(saved[kind]["hopt"])
        s_in.load_state_dict(saved[kind]["in"])
        s_out.load_state_dict(saved[kind]["out"])
        numbers = t._run(hopt, S, N, s_in, s_out)
        hopt2, s_in2, s_out2 = t._make(kind, schedulers=True)  # uninterrupted, in this process
        straight = t._run(hopt2, 0, N, s_in2, s_out2)[-len(numbers) :]
        result[kind] = {{"resumed": (numbers, t._tensors(hopt)), "straight": (straight, t._tensors(hopt2))}}
    torch.save(result, path)
"""


def test_resume_in_a_fresh_process_with_schedulers_is_bit_exact(tmp_path: Path) -> None:
    """Every family saved mid-run (Unrolled mid-window with a relative learning rate under a
    scheduler, SelfTuning mid-warmup) by one process and resumed by another, with the
    schedulers' states saved separately and ``torch.load(weights_only=True)``, repeats the
    uninterrupted run bit for bit: losses, hypergradient norms, the user's own random draws,
    final weights and hyperparameters. (The uninterrupted run is done in the resuming process:
    another thread count may round reductions differently.)"""
    path = str(tmp_path / "run.pt")
    code = _CHILD.format(tests=str(Path(__file__).parent))
    for mode in ("save", "load"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode, path], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(path, weights_only=True)
    for kind in KINDS:
        (numbers, tensors), (straight, reference) = result[kind]["resumed"], result[kind]["straight"]
        assert len(numbers) > 6 and numbers == straight, kind
        assert _same(tensors, reference), kind


def _imp(hp: nn.Module, loss: Any = _penalised) -> hg.Implicit:
    model = _mlp()
    return hg.Implicit(
        model,
        hp,
        loss,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )


def _scaled(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return _ce(m, h, b) * h["s"]()


def _lr(relative: bool) -> hg.Unrolled:
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hp = nn.ModuleDict({"lr": hg.hparams.LearningRate(inner, relative=relative)})
    return hg.Unrolled(
        model, hp, _ce, _ce, inner_optimizer=inner, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1)
    )


def _decay_of(include: str) -> hg.Implicit:
    return _imp(
        nn.ModuleDict({"wd": hg.hparams.WeightDecay(_mlp(), per="global", include=lambda n: include in n)})
    )


def test_a_state_of_other_hyperparameter_containers_is_refused_and_nothing_loads() -> None:
    """Before: a state of containers with the same parameter names and shapes but another meaning
    loaded silently: a ``positive`` value read as a ``unit`` one (0.3 became 0.23), an
    interval's raw value on another interval, a learning rate as a multiplier on the scheduled
    one, a decay of the biases as a decay of the weights."""
    pairs = [
        (
            _imp(nn.ModuleDict({"s": hg.hparams.Hparam(0.3, "positive", dtype=DT)}), _scaled),
            _imp(nn.ModuleDict({"s": hg.hparams.Hparam(0.3, "unit", dtype=DT)}), _scaled),
            "s: saved Hparam(constraint='positive'",
        ),
        (
            _imp(nn.ModuleDict({"s": hg.hparams.Hparam(0.3, low=0.0, high=1.0, dtype=DT)}), _scaled),
            _imp(nn.ModuleDict({"s": hg.hparams.Hparam(0.3, low=0.0, high=2.0, dtype=DT)}), _scaled),
            "high=2.0",
        ),
        (_lr(relative=False), _lr(relative=True), "relative=True"),
        (_decay_of("bias"), _decay_of("weight"), "names=['0.weight', '2.weight']"),
    ]
    for saved, here, words in pairs:
        saved.step(_batch(0))
        before = copy.deepcopy(here.state_dict())
        with pytest.raises(ValueError, match=r"other hyperparameter containers.*" + re.escape(words)):
            here.load_state_dict(saved.state_dict())
        after = here.state_dict()
        for key in ("model", "hparams"):
            assert _same(list(before[key].values()), list(after[key].values())), key
        assert here.inner_steps == 0
    # the same containers load, and so does a state saved before the check existed
    saved, same, other = _decay_of("bias"), _decay_of("bias"), _decay_of("weight")
    state = saved.state_dict()
    same.load_state_dict(state)
    del state["hparams_meaning"]
    other.load_state_dict(state)


# ----------------------------------------------------------------------------- non-finite hyperparameters


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_hyperparameter_is_refused_by_every_family_naming_it(kind: str) -> None:
    """A NaN written into a hyperparameter (by a checkpoint, or by hand) must be refused like a
    NaN loss, naming the hyperparameter, with everything untouched. Before: on the first
    hyperstep Implicit's Neumann raised a ValueError about its step size (not NonFiniteError,
    so ``on_nonfinite='skip'`` could not skip it), SelfTuning's step raised the dropout layer's
    ValueError, and BestResponse(sampling='global') took the step."""
    for policy in ("raise", "skip"):
        hopt, _, _ = _make(kind, on_nonfinite=policy)
        _run(hopt, 0, 3)
        name, p = next(iter(hopt.hparams.named_parameters()))
        state = copy.deepcopy(hopt.state_dict())
        with torch.no_grad():
            p.view(-1)[0] = float("nan")
        state["hparams"][name] = p.detach().clone()
        fresh, _, _ = _make(kind, seed=1, on_nonfinite=policy)
        fresh.load_state_dict(state)  # after a resume, as in the same run
        for h in (hopt, fresh):
            before = copy.deepcopy(h.state_dict())
            calls = [
                lambda h=h: h.step(_batch(3)),
                lambda h=h: h.hyper_step(train_batch=_batch(3), val_batch=_batch(99)),
                lambda h=h: h.hypergradient(train_batch=_batch(3), val_batch=_batch(99)),
            ]
            for call in calls:
                if policy == "raise":
                    with pytest.raises(hg.NonFiniteError, match=re.escape(repr(name)) + ".*NaN or infinite"):
                        call()
                else:
                    with pytest.warns(hg.NonFiniteWarning, match=re.escape(repr(name))):
                        out = call()
                    if isinstance(out, tuple):  # hypergradient(): the non-finite result, flagged
                        assert out[1].skipped and not bool(torch.isfinite(out[0][0]).all())
                    elif isinstance(out, hg.HyperStepInfo):
                        assert out.skipped
                after = h.state_dict()
                for key in ("model", "hparams"):
                    for k, v in before[key].items():
                        torch.testing.assert_close(after[key][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
                assert before["inner_optimizer"]["state"].keys() == after["inner_optimizer"]["state"].keys()
                assert (h.inner_steps, h.hyper_steps) == (
                    before["counters"]["inner_steps"],
                    before["counters"]["hyper_steps"],
                )


# ----------------------------------------------------------------------------- precision, outer optimiser


def test_hyperparameters_in_another_precision_than_the_model_get_their_own_grad_dtype() -> None:
    """Before: Implicit with float32 hyperparameters on a float64 model (or the reverse) computed
    the whole hypergradient and then failed writing ``.grad`` (a RuntimeError about grad_dtype)."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = _mlp()
        hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=1e-2)}).to(dtype)
        hopt = hg.Implicit(
            model,
            hp,
            _penalised,
            _ce,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )
        for i in range(3):
            hopt.step(_batch(i))
        returned, _ = hopt.hypergradient(train_batch=_batch(2), val_batch=_batch(99))
        hopt.hyper_step(train_batch=_batch(2), val_batch=_batch(99))
        g = [p.grad for p in hp.parameters()]
        assert all(t is not None and t.dtype == dtype for t in g)
        assert all(r.dtype == dtype for r in returned)
        grads[dtype] = torch.stack([t.double() for t in g])  # type: ignore[union-attr]
    assert float(grads[torch.float64].abs().min()) > 0
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-5, atol=0)


def test_outer_optimizer_holding_a_tensor_outside_hparams_is_refused() -> None:
    """Before: accepted; hyper_step never wrote that tensor's ``.grad``, so the outer optimiser
    stepped it with a stale gradient (or never moved it), silently."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer")
    temperature = nn.Parameter(torch.ones((), dtype=DT))
    with pytest.raises(ValueError, match=r"not a parameter of hparams.*stale"):
        hg.Implicit(
            model,
            hp,
            lambda m, h, b: _ce(m, h, b) + h.penalty(m),
            _ce,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam([*hp.parameters(), temperature]),
        )


def test_clipping_the_hypergradient_with_a_step_pre_hook() -> None:
    """The documented way to clip: a pre-hook on the outer optimiser sees the hypergradient in
    ``.grad`` and clips it before the step; it equals clipping ``hypergradient()``'s output."""
    torch.manual_seed(0)
    hopt = _imp(nn.ModuleDict({"wd": hg.hparams.WeightDecay(_mlp(), per="layer", init=1e-2)}))
    hopt.outer_optimizer.param_groups[0]["lr"] = 1.0
    for i in range(2):
        hopt.step(_batch(i))
    params = list(hopt.hparams.parameters())
    grads, info = hopt.hypergradient(train_batch=_batch(1), val_batch=_batch(99))
    max_norm = 0.25 * info.hypergrad_norm
    scale = max_norm / (info.hypergrad_norm + 1e-6)  # clip_grad_norm_'s formula
    before = [p.detach().clone() for p in params]

    def clip(opt: Any, args: Any, kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    hopt.outer_optimizer.register_step_pre_hook(clip)
    hopt.hyper_step(train_batch=_batch(1), val_batch=_batch(99))
    for p, b, g in zip(params, before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - g * scale, rtol=1e-12, atol=1e-15)
    clipped = float(torch.stack([p.grad.norm() for p in params]).norm())  # type: ignore[union-attr]
    assert (
        math.isclose(clipped, info.hypergrad_norm * scale, rel_tol=1e-9)
        and clipped < 0.3 * info.hypergrad_norm
    )


# ----------------------------------------------------------------------------- the containers' inputs


def test_containers_take_numpy_and_tensor_numbers_and_name_bad_inputs() -> None:
    """Before: ``WeightDecay(init=np.float32(0.1))`` (a sweep grid's value) was refused as
    'need a finite value > 0', as were one-element tensors for PriorPrecision, ObservationNoise
    and RandomTranslation; a wrong shape or an integer dtype gave torch's internal errors, and
    tuning Adam's betas a float() error."""
    model = _mlp()
    for init in (np.float32(0.1), torch.tensor(0.1), np.float64(0.1)):
        decays = hg.hparams.WeightDecay(model, per="layer", init=init).value
        assert decays.shape == (2,) and torch.allclose(decays, torch.full((2,), 0.1, dtype=DT))
        assert math.isclose(float(hg.hparams.PriorPrecision(model, init=init).value), 0.1, rel_tol=1e-6)
        assert math.isclose(float(hg.hparams.ObservationNoise(init).value), 0.1, rel_tol=1e-6)
        assert math.isclose(float(hg.hparams.RandomTranslation((8,), init=init).value), 0.1, rel_tol=1e-6)
    with pytest.raises(TypeError, match="weight decay init must be a real number, got True"):
        hg.hparams.WeightDecay(model, init=True)
    with pytest.raises(TypeError, match="weight decay max"):
        hg.hparams.WeightDecay(model, init=0.1, max="1")
    with pytest.raises(ValueError, match=r"shape \(2,\) does not broadcast to the shape \(3,\)"):
        hg.hparams.Hparam(torch.ones(2), shape=(3,))
    with pytest.raises(ValueError, match=r"ExampleWeights init of shape \(2,\).*\(5,\)"):
        hg.hparams.ExampleWeights(5, init=torch.tensor([0.2, 0.3]))
    with pytest.raises(ValueError, match="negative size"):
        hg.hparams.Hparam(0.1, shape=(-1,))
    with pytest.raises(TypeError, match="floating-point dtype"):
        hg.hparams.Hparam(1.0, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point dtype"):
        hg.hparams.SelfTuned(p=hg.hparams.Rate(0.1), dtype=torch.int64)
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match=r"'betas'\] is \(0.9, 0.999\), not one number"):
        hg.hparams.OptimizerSetting(adam, "betas", "unit")
    with pytest.raises(ValueError, match=r"current momentum; pass init="):
        hg.hparams.Momentum(torch.optim.SGD(model.parameters(), lr=0.1))
    assert math.isclose(
        float(hg.hparams.Momentum(torch.optim.SGD(model.parameters(), lr=0.1), 0.5).value), 0.5
    )


def test_weight_decay_warns_once_about_parameters_added_after_it_was_built() -> None:
    """Before: a head added after the WeightDecay was built was silently left unpenalised."""
    model = _mlp()
    wd = hg.hparams.WeightDecay(model, per="parameter", include=lambda n: n.endswith("weight"))
    value = wd.penalty(model)  # (biases are excluded on purpose: no warning)
    model.add_module("head", nn.Linear(3, 2).to(DT))
    with pytest.warns(UserWarning, match=r"\['head.weight', 'head.bias'\].*not penalised"):
        assert torch.equal(wd.penalty(model), value)
    wd.penalty(model)  # once only (filterwarnings = error would raise on a second)
