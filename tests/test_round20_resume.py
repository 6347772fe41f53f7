"""Round 20: save / resume as research scripts do it (``torch.save(hopt.state_dict())``, then
``torch.load(path, weights_only=True)`` into a HyperOptimizer built afresh from another seed).

The standard: the resumed run equals the uninterrupted one bit for bit (every loss and
hyperstep record after the load, and the final weights, hyperparameters, optimiser states,
method state and RNG).

1. NAdam keeps ``mu_product`` (ASGD ``eta`` and ``mu``) as a 0-dim tensor of the *default*
   dtype (float32), also for float64 weights; ``torch.optim.Optimizer.load_state_dict`` casts
   every floating state tensor but ``"step"`` to its parameter's dtype, so after a resume they
   were float64 and rounded otherwise: the resumed run left the uninterrupted one (1e-12 to
   3e-12 in the loss at the second step after the load, growing), as inner optimiser (Implicit,
   Unrolled) and as outer optimiser. The straight run's own dtype is the saved one.
2. A checkpoint of a run with another optimiser class (the config's inner optimiser changed from
   Adam to SGD, or SGD to Adam): Adam into SGD loaded silently (the SGD then held Adam's param
   groups) and the next ``step`` died with a bare ``KeyError: 'momentum'``; SGD into Adam died in
   the load with a bare ``KeyError: 'step'``. Neither named the optimisers.
3. A float16 / bfloat16 hyperparameter's outer step that overflows is undone by ``hyper_step``
   with ``outer_optimizer.load_state_dict``: new param-group and state objects, so a group the
   script holds (a warm-up writing ``group["lr"]``) no longer steered the optimiser, and every
   later hyperstep was skipped at the old rate.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(12, 4, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)


def _ce(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _penalised(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3)).to(DT)


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, (
            f"{path}: {a.dtype} vs {getattr(b, 'dtype', b)}"
        )
        assert torch.equal(a, b), f"{path}: max diff {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _save(hopt: hg.HyperOptimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    return buf.getvalue()


def _load(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _actions(hopt: hg.HyperOptimizer, start: int, stop: int, every: int = 3) -> list[Any]:
    """Action t: a hyperstep after every ``every``-th inner step, else an inner step; what each
    reported (the whole hyperstep record but its wall time)."""
    out: list[Any] = []
    for t in range(start, stop):
        n = hopt.inner_steps
        if n > 0 and n % every == 0 and hopt.hyper_steps < n // every:
            info = hopt.hyper_step(train_batch=_data(t), val_batch=_data(99))
            row = {k: v for k, v in vars(info).items() if k != "seconds"}
            out.append(["hyper", row])
        else:
            out.append(["step", float(hopt.step(_data(t)))])
    return out


# ------------------------------------------------------------------------------------------
# 1. 0-dim optimiser state keeps its dtype through a resume


Opt = Callable[[Any], torch.optim.Optimizer]


def _run(seed: int, family: str, inner: Opt, outer: Opt) -> hg.HyperOptimizer:
    torch.manual_seed(seed)
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    kw: dict[str, Any] = {
        "inner_optimizer": inner(model.parameters()),
        "outer_optimizer": outer(hp.parameters()),
    }
    if family == "unrolled":
        return hg.Unrolled(model, hp, _penalised, _ce, steps=3, **kw)
    return hg.Implicit(model, hp, _penalised, _ce, solver=hg.CG(maxiter=3, damping=0.1), **kw)


def _sgd(p: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(p, lr=0.1, momentum=0.9)


def _adam(p: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=0.05)


def _nadam_inner(p: Any) -> torch.optim.Optimizer:
    return torch.optim.NAdam(p, lr=0.01)


def _nadam_outer(p: Any) -> torch.optim.Optimizer:
    return torch.optim.NAdam(p, lr=0.05)


def _asgd(p: Any) -> torch.optim.Optimizer:
    return torch.optim.ASGD(p, lr=0.05, t0=2, lambd=0.01)


SCALAR_STATE = {
    # family, inner, outer, the optimiser with 0-dim state ("inner" / "outer"), its 0-dim key
    "unrolled-nadam-inner": ("unrolled", _nadam_inner, _adam, "inner", "mu_product"),
    "implicit-nadam-inner": ("implicit", _nadam_inner, _adam, "inner", "mu_product"),
    "implicit-nadam-outer": ("implicit", _sgd, _nadam_outer, "outer", "mu_product"),
    "unrolled-asgd-inner": ("unrolled", _asgd, _adam, "inner", "eta"),
}


def _resume_case(case: tuple[Any, ...], k: int = 5, total: int = 13) -> None:
    family, inner, outer, which, key = case
    assert torch.get_default_dtype() == torch.float32  # (the 0-dim state: float32, the weights float64)
    straight = _run(0, family, inner, outer)
    log = _actions(straight, 0, total)
    end = copy.deepcopy(straight.state_dict())
    assert sum(r[0] == "hyper" for r in log) >= 3

    first = _run(0, family, inner, outer)
    assert _actions(first, 0, k) == log[:k]
    raw = _save(first)
    resumed = _run(7, family, inner, outer)
    resumed.load_state_dict(_load(raw))
    tail = _actions(resumed, k, total)
    assert tail == log[k:]  # (before: the first inner step after the load already differed)
    _assert_same(end, resumed.state_dict())
    opt = resumed.inner_optimizer if which == "inner" else resumed.outer_optimizer
    assert all(s[key].dtype == torch.float32 for s in opt.state.values())  # as in the straight run


@pytest.mark.parametrize("case", list(SCALAR_STATE))
def test_a_run_with_nadam_or_asgd_resumes_bit_exact(case: str) -> None:
    """A float64 model trained by NAdam or ASGD (or float64 hyperparameters by an outer NAdam),
    saved mid-window and resumed with ``weights_only=True`` from another seed: ``mu_product``
    (``eta``, ``mu``) keeps the float32 of the uninterrupted run, and every later loss and
    hyperstep record, and the final state, equal the uninterrupted run's."""
    _resume_case(SCALAR_STATE[case])


# ------------------------------------------------------------------------------------------
# 2. a checkpoint of another optimiser class is refused by name, and nothing changes


def _sgdhd(p: Any) -> torch.optim.Optimizer:
    return hg.optim.SGDHD(p, lr=0.1, momentum=0.9, hypergrad_lr=1e-3)


OTHER_CLASS = {
    # saved (inner, outer), loaded into (inner, outer), the names the error must give
    "inner-adam-into-sgd": ((_adam, _adam), (_sgd, _adam), ("Adam", "SGD")),
    "inner-sgd-into-adam": ((_sgd, _adam), (_adam, _adam), ("SGD", "Adam")),
    "outer-adam-into-sgd": ((_sgd, _adam), (_sgd, _sgd), ("Adam", "SGD")),
}


def _trained(family: str, inner: Opt, outer: Opt) -> hg.HyperOptimizer:
    hopt = _run(0, family, inner, outer)
    _actions(hopt, 0, 5)
    return hopt


@pytest.mark.parametrize("family", ["implicit", "unrolled"])
@pytest.mark.parametrize("case", list(OTHER_CLASS))
def test_a_state_of_another_optimiser_class_is_refused_by_name(case: str, family: str) -> None:
    """The config's optimiser changed between the saved run and the resuming one: the load says
    which optimiser saved the state and which is here (a ``ValueError``), changes nothing, and the
    run goes on with its own optimisers. Before: Adam's state into an SGD loaded (the SGD then held
    Adam's param groups) and the next step raised ``KeyError: 'momentum'``; SGD's into an Adam
    raised ``KeyError: 'step'`` from torch's ``Adam.__setstate__``."""
    saved_with, here_with, (was, now) = OTHER_CLASS[case]
    raw = _save(_trained(family, *saved_with))
    hopt = _run(7, family, *here_with)
    before = copy.deepcopy(hopt.state_dict())
    groups = [(opt, opt.param_groups, [dict(g) for g in opt.param_groups])
              for opt in (hopt.inner_optimizer, hopt.outer_optimizer)]  # fmt: skip
    with pytest.raises(ValueError, match=rf"saved by {was}\b.*here is {now}\b"):
        hopt.load_state_dict(_load(raw))
    after = hopt.state_dict()
    for key in ("model", "hparams", "method", "counters"):
        _assert_same(before[key], after[key], key)
    for opt, objects, values in groups:
        assert opt.param_groups is objects and [dict(g) for g in opt.param_groups] == values
    _actions(hopt, 0, 4)  # (the optimisers it was built with still step)


def test_a_torch_sgd_state_loads_into_sgdhd() -> None:
    """Passes before and after the check above (not covered before inside a HyperOptimizer): a
    class's state into its subclass loads, as ``hg.optim.SGDHD`` documents for a plain SGD's, and
    its first step is exactly SGD's:
    the momentum buffers carried over, the group taking the constructor's ``hypergrad_lr`` and
    the learning-rate hypergradient starting from no stored direction (the SGD kept none)."""
    src = _trained("implicit", _sgd, _adam)
    raw = _save(src)
    hopt = _run(7, "implicit", _sgdhd, _adam)
    hopt.load_state_dict(_load(raw))
    assert isinstance(hopt.inner_optimizer, hg.optim.SGDHD)
    for p, q in zip(src.inner_optimizer.state.values(), hopt.inner_optimizer.state.values(), strict=True):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"]) and "hd_direction" not in q
    group = hopt.inner_optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["hypergrad_lr"] == 1e-3  # (the constructor's: none saved)
    rng = torch.get_rng_state()  # (the saved one: the same dropout masks for both steps)
    hopt.step(_data(50))
    torch.set_rng_state(rng)
    src.step(_data(50))  # no stored direction yet: SGDHD's first step is SGD's
    assert all("hd_direction" in s for s in hopt.inner_optimizer.state.values())
    for a, b in zip(src.model.parameters(), hopt.model.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# 3. an outer step undone in low precision puts the outer optimiser's own objects back


def _float16_run() -> tuple[hg.HyperOptimizer, hg.hparams.Hparam, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    h = hg.hparams.Hparam(6.0e4, "real", dtype=torch.float16)
    outer = torch.optim.SGD(h.parameters(), lr=100.0, momentum=0.5)

    def train(m: Any, hp: Any, b: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1]) + 1e-9 * hp().float() * m.weight.square().sum()

    def val(m: nn.Module, hp: Any, b: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1]) - hp().float()  # pushes h up

    hopt = hg.Implicit(
        model, h, train, val, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer, solver=hg.Identity(), on_nonfinite="skip",
    )  # fmt: skip
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    return hopt, h, batch


def test_an_undone_float16_outer_step_keeps_the_optimisers_own_groups_and_state() -> None:
    """A float16 hyperparameter whose outer step (SGD with momentum) overflows (a learning-rate
    warm-up gone too high, written into a param group the script holds) is undone:
    ``hyper_step`` put the outer optimiser back with ``load_state_dict``, which replaces
    ``param_groups`` and the state by new objects. The script then lowers the rate in the group
    it holds, which no longer belonged to the optimiser: every later hyperstep overflowed at the
    old rate and was skipped, silently but for a warning each time. (``load_state_dict``'s own
    refused path and MarginalLikelihood's undone outer steps put the very objects back; this one
    did not.)"""
    hopt, h, batch = _float16_run()
    outer = hopt.outer_optimizer
    group = outer.param_groups[0]  # held, as a warm-up loop may
    hopt.step(batch)
    assert not hopt.hyper_step(train_batch=batch, val_batch=batch).skipped  # a momentum buffer now
    moments = dict(outer.state[h.raw])
    group["lr"] = 1e4  # too high: 6e4 + 1e4 overflows float16
    before = float(h.value)
    with pytest.warns(hg.NonFiniteWarning, match="outer optimiser's step made"):
        assert hopt.hyper_step(train_batch=batch, val_batch=batch).skipped
    assert float(h.value) == before  # (undone, as before)
    group["lr"] = 100.0  # the script backs off, in the group it holds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.NonFiniteWarning)  # (before: skipped again, warned)
        info = hopt.hyper_step(train_batch=batch, val_batch=batch)
    assert not info.skipped and float(h.value) > before  # (before: skipped again, at lr 1e4)
    assert outer.param_groups[0] is group
    assert outer.state[h.raw]["momentum_buffer"] is moments["momentum_buffer"]
