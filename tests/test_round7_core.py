"""Round 7, the shared core as a new user meets it: where warnings point, lazy modules, and
checkpoints of runs whose batches are the user's own classes.

* Every warning the ``HyperOptimizer`` base raises (a skipped non-finite step or hyperstep, a
  hyperparameter that does not reach the losses, a loss without a graph) names the line of the
  user's script that made the call, not a line inside hypergrad.
* ``nn.LazyLinear`` models: ``WeightDecay(per="parameter")`` before the first forward pass is
  refused with a message saying what to do; a ``HyperOptimizer`` built before the first forward
  pass gives the hypergradient of the real training procedure (central differences, float64).
* An Unrolled run whose batches are a ``NamedTuple`` / dataclass: its checkpoint loads with
  ``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals([...])`` and the
  resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64
METHODS = ["Implicit", "Unrolled"]


def _method(name: str, model: nn.Module, hp: nn.Module, train: Any, val: Any, **kw: Any) -> hg.HyperOptimizer:
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    outer = torch.optim.Adam(hp.parameters(), lr=0.01)
    if name == "Implicit":
        kw.setdefault("solver", hg.CG(maxiter=5))
        return hg.Implicit(model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, **kw)
    kw.setdefault("steps", 2)
    return hg.Unrolled(model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, **kw)


# ----------------------------------------------------------------------------- warnings' location


def _scaled_mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    x, y, scale = b
    return F.mse_loss(m(x), y) * scale + h["wd"].penalty(m)


@pytest.mark.parametrize("method", METHODS)
def test_warnings_name_the_line_of_the_users_call(method: str) -> None:
    """Before: every warning of the base class was raised with a fixed ``stacklevel`` that
    stopped inside hypergrad (``_base.py``, the line of the decorator that turns autograd on),
    so the message named no line of the user's script, and Python's default once-per-location
    filter merged warnings from different call sites into one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    hp = nn.ModuleDict(
        {"unused": hg.hparams.Hparam(1.0, dtype=DT), "wd": hg.hparams.WeightDecay(model, per="global")}
    )
    hopt = _method(method, model, hp, _scaled_mse, _scaled_mse, on_nonfinite="skip")
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    one, nan = torch.tensor(1.0, dtype=DT), torch.tensor(float("nan"), dtype=DT)
    calls = {
        "step": lambda: hopt.step((x, y, nan)),
        "hyper_step (disconnected)": lambda: hopt.hyper_step(train_batch=(x, y, one), val_batch=(x, y, one)),
        "hyper_step (non-finite)": lambda: hopt.hyper_step(train_batch=(x, y, one), val_batch=(x, y, nan)),
        "hypergradient": lambda: hopt.hypergradient(train_batch=(x, y, one), val_batch=(x, y, nan)),
    }
    hopt.step((x, y, one))
    hopt.step((x, y, one))
    for what, call in calls.items():
        category = hg.DisconnectedWarning if "disconnected" in what else hg.NonFiniteWarning
        with pytest.warns(category) as rec:
            call()
        assert [w.filename for w in rec] == [__file__] * len(rec), (what, [w.filename for w in rec])


def test_a_loss_without_a_graph_is_reported_at_the_users_line() -> None:
    model = nn.Linear(3, 1).to(DT)
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="global")})

    def detached(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0]), b[1]).detach()

    hopt = _method("Implicit", model, hp, detached, detached)
    with pytest.warns(hg.DisconnectedWarning, match="does not require grad") as rec:
        hopt.step((torch.randn(4, 3, dtype=DT), torch.randn(4, 1, dtype=DT)))
    assert rec[0].filename == __file__


# ----------------------------------------------------------------------------- lazy modules


def test_weight_decay_per_parameter_before_a_lazy_modules_first_forward_says_what_to_do() -> None:
    """Before: torch's own error from deep inside, "Can't access the shape of an uninitialized
    parameter or buffer. This error usually happens in `load_state_dict` ...", which names
    neither the parameter nor the fix."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'0\.weight'.*not initialised yet.*run the model on one batch"):
        hg.hparams.WeightDecay(model, per="parameter")
    model(torch.randn(2, 5))  # after the first forward pass: one decay per entry, shaped alike
    wd = hg.hparams.WeightDecay(model, per="parameter")
    assert [tuple(r.shape) for r in wd.raw] == [(3, 5), (3,), (2, 3), (2,)]


def _lazy_mlp() -> nn.Module:
    torch.manual_seed(0)  # the lazy layers draw their initial weights at the first forward pass
    return nn.Sequential(nn.LazyLinear(5, dtype=DT), nn.Tanh(), nn.LazyLinear(3, dtype=DT))


def _ce_wd(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h["wd"].penalty(m)


@pytest.mark.parametrize("per", ["global", "layer"])
def test_a_hyperoptimizer_built_before_a_lazy_models_first_forward_is_exact(per: str) -> None:
    """Unrolled over the first two steps of a model whose weights do not exist yet when it is
    built (the first step materialises them): its hypergradient equals central differences of
    those two SGD steps from the same initial weights, to 1e-7 relative."""
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    model = _lazy_mlp()
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per=per, init=0.1)})
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    hopt = hg.Unrolled(
        model,
        hp,
        _ce_wd,
        _ce_wd,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters()),
        steps=2,
    )
    hopt.step((x, y))
    hopt.step((x, y))
    grads, info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, y))
    assert info.unrolled_steps == 2

    ref_model = _lazy_mlp()
    with torch.no_grad():
        ref_model(x)  # the same initial weights, drawn the same way
    start = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref_hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(ref_model, per=per, init=0.1)})

    def outer() -> float:
        ref_model.load_state_dict(start)
        opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            _ce_wd(ref_model, ref_hp, (x, y)).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce_wd(ref_model, ref_hp, (xv, y)))

    for got, raw in zip(grads, ref_hp.parameters(), strict=True):
        fd = central_difference(outer, raw)
        assert float(fd.abs().max()) > 1e-4  # (the check has something to check)
        torch.testing.assert_close(got, fd, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- checkpoints


class _Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class _Record:
    x: torch.Tensor
    y: torch.Tensor


def _pair_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b.x), b.y) + h["wd"].penalty(m)


@pytest.mark.parametrize("kind", [_Pair, _Record], ids=["namedtuple", "dataclass"])
def test_unrolled_checkpoint_with_batches_of_the_users_class_resumes_bit_exactly(kind: type) -> None:
    """Unrolled keeps the recorded batches as they were given (their class too), so
    ``torch.load``'s default ``weights_only=True`` refuses the user's class by name; inside
    ``torch.serialization.safe_globals([cls])`` (what ``HyperOptimizer.state_dict`` documents)
    the resumed run (fresh objects, other initial weights) repeats the uninterrupted one."""
    g = torch.Generator().manual_seed(3)
    batches = [
        kind(torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
        for _ in range(8)
    ]

    def make(seed: int) -> hg.HyperOptimizer:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=0.05)})
        return _method("Unrolled", model, hp, _pair_loss, _pair_loss, steps=3)

    def run(hopt: hg.HyperOptimizer, start: int, stop: int) -> list[float]:
        out = []
        for t in range(start, stop):
            out.append(float(hopt.step(batches[t])))
            if t % 3 == 2:
                out.append(hopt.hyper_step(val_batch=batches[(t + 4) % 8]).hypergrad_norm)
        return out

    straight = make(0)
    expected = run(straight, 0, 8)
    first = make(0)
    head = run(first, 0, 4)  # mid-window: recorded batches are in the checkpoint
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match=kind.__name__):
        torch.load(buf, weights_only=True)
    buf.seek(0)
    with torch.serialization.safe_globals([kind]):
        saved = torch.load(buf, weights_only=True)
    resumed = make(7)
    resumed.load_state_dict(saved)
    assert head + run(resumed, 4, 8) == expected
    for a, b in zip(
        [*straight.model.parameters(), *straight.hparams.parameters()],
        [*resumed.model.parameters(), *resumed.hparams.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- frozen parts in another dtype


class _FrozenEmbeddingHead(nn.Module):
    """A frozen float32 embedding (listed first) under a trained float64 head, as a fine-tuning
    script freezes a pretrained low-precision encoder and trains a new head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4).requires_grad_(False)
        self.head = nn.Linear(4, 3).to(DT)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens).to(DT).mean(1))


def test_a_frozen_first_part_in_another_dtype_does_not_set_the_models_dtype() -> None:
    """Before: the model's dtype was taken from its first parameter, the frozen float32
    embedding, so building the method refused the trained float64 head ("model parameter
    'head.weight' is torch.float64, others torch.float32": the only other one is not trained).
    Now the dtype is the trained weights', and Implicit + Direct at the inner optimum equals the
    dense IFT hypergradient; converting the model after construction is still refused."""
    torch.manual_seed(0)
    model = _FrozenEmbeddingHead()
    hp = nn.ModuleDict({"wd": hg.hparams.WeightDecay(model, per="layer", init=0.05)})
    assert hp["wd"].names == ("head.weight", "head.bias")
    g = torch.Generator().manual_seed(2)
    train = (torch.randint(0, 10, (32, 5), generator=g), torch.randint(0, 3, (32,), generator=g))
    val = (torch.randint(0, 10, (32, 5), generator=g), torch.randint(0, 3, (32,), generator=g))
    inner = torch.optim.LBFGS(
        model.head.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        inner.zero_grad()
        loss = _ce_wd(model, hp, train)
        loss.backward()
        return loss

    inner.step(closure)  # the inner optimum, for the IFT
    hopt = hg.Implicit(
        model,
        hp,
        _ce_wd,
        _ce_wd,
        inner_optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    assert hopt.dtype == DT
    grads, _ = hopt.hypergradient(train_batch=train, val_batch=val)
    ref = hg.testing.dense_ift_hypergradient(model, hp, _ce_wd, _ce_wd, train, val)
    assert float(torch.cat([r.reshape(-1) for r in ref]).abs().max()) > 1e-4
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got.reshape(-1), want.reshape(-1), rtol=1e-8, atol=1e-12)
    before = [p.clone() for p in model.head.parameters()]
    hopt.step(train)
    assert not torch.equal(before[0], model.head.weight)
    assert model.emb.weight.dtype == torch.float32 and model.emb.weight.grad is None

    model.float()  # converting the model after construction is still refused, by name
    with pytest.raises(ValueError, match=r"now torch\.float32 .* but were torch\.float64"):
        hopt.step(train)
