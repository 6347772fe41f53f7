"""Round 17 (core): a HyperOptimizer dropped into an existing training script.

- ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` (torch's default when the
  argument is not given, and that of many model zoos) inside the model: ``step`` ran
  ``backward(inputs=weights)``, which in torch 2.13 silently skips a reentrant checkpoint's
  recomputation, so the checkpointed layer never trained; and every hypergradient path
  (``torch.autograd.grad``) gave its weight decay a hypergradient of exactly 0. ``step`` now runs
  a plain ``backward()`` for such a loss (other ``.grad`` put back), and inside
  ``differentiable_twice`` the reentrant checkpoint keeps its activations.
- A parametrisation registered (``weight_norm``), or a new ``nn.Parameter`` assigned, after the
  HyperOptimizer was built: the optimiser kept stepping the old tensor the model no longer used,
  silently (the layer never trained). Refused now, naming the weight.
- ``on_nonfinite="skip"``: a skipped step had drawn its dropout masks, so a run skipping every
  third batch ended unlike one that never saw them. A refused step or hyperstep now puts torch's
  random generator back: bit-exact.
- A loss returning an integer tensor crashed in a norm ("linalg.vector_norm: Expected a floating
  point or complex tensor"); it is named now.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64


def _data(seed: int, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


TB, VB = _data(1), _data(2)


class _Net(nn.Module):
    """Linear -> [Linear -> tanh], checkpointed or not -> Linear, optionally with dropout."""

    def __init__(self, reentrant: bool | None, p: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.drop = nn.Dropout(p)
        self.reentrant = reentrant
        self.to(DT)

    def block(self, h: Tensor) -> Tensor:
        return torch.tanh(self.drop(self.b(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.c(h).squeeze(-1)


class _Decay(nn.Module):
    """One log weight decay per linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.tensor([-2.0, -1.5, -2.5], dtype=DT))

    def penalty(self, m: nn.Module) -> Tensor:
        ws = [m.a.weight, m.b.weight, m.c.weight]
        return sum(self.raw[i].exp() * (w**2).sum() for i, w in enumerate(ws))  # type: ignore[return-value]


def _train(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)


def _val(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _build(method: str, model: nn.Module, hp: nn.Module | None = None, **kw: Any) -> hg.HyperOptimizer:
    hp = _Decay() if hp is None else hp
    opts = dict(
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
    )
    if method == "implicit":
        return hg.Implicit(model, hp, _train, _val, solver=hg.Direct(), **opts, **kw)
    return hg.Unrolled(model, hp, _train, _val, steps=3, **opts, **kw)


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_layer_trains_as_without_checkpointing(reentrant: bool) -> None:
    """Before: with use_reentrant=True the checkpointed layer's weight never moved (step's
    ``backward(inputs=...)`` skipped the recomputation), weights 0.17 apart after 3 steps."""
    plain, ck = _Net(None, p=0.3), _Net(reentrant, p=0.3)
    hp_plain, hp_ck = _Decay(), _Decay()
    hp_plain.raw.grad = torch.ones(3, dtype=DT)  # a step leaves the hyperparameters' .grad alone
    hp_ck.raw.grad = torch.ones(3, dtype=DT)
    runs = [_build("unrolled", plain, hp_plain), _build("unrolled", ck, hp_ck)]
    b_before = ck.b.weight.detach().clone()
    for hopt in runs:
        torch.manual_seed(5)  # (the same dropout masks: checkpoint preserves the RNG state)
        for _ in range(3):
            hopt.step(TB)
    assert not torch.equal(ck.b.weight, b_before)
    torch.testing.assert_close(_flat(ck.parameters()), _flat(plain.parameters()), rtol=1e-13, atol=0)
    assert torch.equal(hp_ck.raw.grad, torch.ones(3, dtype=DT))
    # the swap is undone: torch's own checkpoint machinery is in place again
    assert torch.utils.checkpoint.CheckpointFunction.__name__ == "CheckpointFunction"


@pytest.mark.parametrize("reentrant", [True, False])
def test_implicit_through_a_checkpointed_layer_is_the_dense_ift_hypergradient(reentrant: bool) -> None:
    """Before (use_reentrant=True): the checkpointed layer's decay had hypergradient exactly 0
    (with a DisconnectedWarning) where the dense IFT formula gives -8e-4."""
    ref_model, model = _Net(None), _Net(reentrant)
    hopt = _build("implicit", model)
    for _ in range(5):
        hopt.step(TB)
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    hp_ref = _Decay()
    want = ht.dense_ift_hypergradient(ref_model, hp_ref, _train, _val, TB, VB)[0]
    assert float(want[1].abs()) > 1e-5  # (the checkpointed layer's decay matters)
    grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    torch.testing.assert_close(grads[0], want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("reentrant", [True, False])
def test_unrolled_through_a_checkpointed_layer_matches_central_differences(reentrant: bool) -> None:
    """d L_V(w_3(lambda)) / d lambda through three real SGD steps, against central differences of
    those very steps (before, use_reentrant=True: entry 1 was 0, the truth -3e-4)."""
    start = _Net(reentrant).state_dict()

    def outer() -> float:
        model = _Net(reentrant)
        model.load_state_dict(start)
        run = _build("unrolled", model, hp)
        for _ in range(3):
            run.step(TB)
        return float(_val(model, hp, VB).detach())  # (not under no_grad: checkpoint would warn)

    hp = _Decay()
    fd = ht.central_difference(outer, hp.raw, eps=1e-6)
    model = _Net(reentrant)
    model.load_state_dict(start)
    hopt = _build("unrolled", model, hp)
    for _ in range(3):
        hopt.step(TB)
    grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    assert float(fd[1].abs()) > 1e-5
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------- model changed later


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize("change", ["weight_norm", "new_parameter", "assign"])
def test_a_weight_replaced_after_construction_is_refused_and_nothing_changes(
    method: str, change: str
) -> None:
    """Before: both went on silently, the optimiser stepping the old tensor the model no longer
    used (the weight-normalised layer never trained)."""
    model = _Net(None)
    hopt = _build(method, model)
    hopt.step(TB)
    if change == "weight_norm":
        weight_norm(model.b)
    elif change == "new_parameter":
        model.b.weight = nn.Parameter(model.b.weight.detach().clone())
    else:  # (replaces every parameter; the first trained one, 'a.weight', is named)
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    before = [t.detach().clone() for t in (*model.parameters(), *hopt.hparams.parameters())]
    first = "'a.weight', 'a.bias'" if change == "assign" else "'b.weight'\\]"
    with pytest.raises(ValueError, match=rf"no longer holds the weights \[{first}.*parametri"):
        hopt.step(TB)
    with pytest.raises(ValueError, match=rf"no longer holds the weights \[{first}"):
        hopt.hyper_step(train_batch=TB, val_batch=VB)
    after = [*model.parameters(), *hopt.hparams.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


# ----------------------------------------------------------------------------- skipped batches


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_skipping_every_third_batch_ends_as_a_run_that_never_saw_them(method: str) -> None:
    """A model with dropout; every third training batch is NaN and one validation batch too.
    Before: the skipped steps had drawn dropout masks, and every later step differed."""
    nan_tb = (TB[0], TB[1] * float("nan"))
    nan_vb = (VB[0], VB[1] * float("nan"))

    def run(skipping: bool) -> tuple[hg.HyperOptimizer, Tensor]:
        model = _Net(None, p=0.3)
        hopt = _build(method, model, on_nonfinite="skip")
        torch.manual_seed(7)
        for i in range(9):
            if i % 3 == 2:
                if skipping:
                    with pytest.warns(hg.NonFiniteWarning, match="inner step"):
                        hopt.step(nan_tb)
                continue
            hopt.step((TB[0] + 0.01 * i, TB[1]))
            if i % 3 == 1:
                hopt.hyper_step(train_batch=TB, val_batch=VB)
                if skipping and i == 4:
                    with pytest.warns(hg.NonFiniteWarning, match="hyper step"):
                        assert hopt.hyper_step(train_batch=TB, val_batch=nan_vb).skipped
        return hopt, torch.rand(4)

    skipped, r1 = run(True)
    straight, r2 = run(False)
    assert torch.equal(r1, r2)  # the generator too
    for get in (lambda h: h.model.parameters(), lambda h: h.hparams.parameters()):
        assert torch.equal(_flat(get(skipped)), _flat(get(straight)))
    for key in ("inner_optimizer", "outer_optimizer"):
        a, b = skipped.state_dict()[key]["state"], straight.state_dict()[key]["state"]
        assert a.keys() == b.keys()
        for k in a:
            assert all(torch.equal(torch.as_tensor(a[k][s]), torch.as_tensor(b[k][s])) for s in a[k])
    counts = (skipped.inner_steps, skipped.hyper_steps)
    assert counts == (straight.inner_steps, straight.hyper_steps) == (6, 3)


def test_a_refused_step_under_raise_leaves_the_generator_as_it_was() -> None:
    model = _Net(None, p=0.5)
    hopt = _build("implicit", model)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    with pytest.raises(hg.NonFiniteError):
        hopt.step((TB[0], TB[1] * float("inf")))
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- bad losses


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_an_integer_loss_is_named(dtype: torch.dtype) -> None:
    """Before: RuntimeError "linalg.vector_norm: Expected a floating point or complex tensor as
    input. Got Long", after a misleading DisconnectedWarning."""
    model = _Net(None)
    hopt = _build("implicit", model)
    hopt.train_loss = lambda m, h, b: torch.zeros((), dtype=dtype)
    before = _flat(model.parameters())
    with pytest.raises(ValueError, match=rf"floating-point scalar Tensor; .* returned {dtype}"):
        hopt.step(TB)
    assert torch.equal(_flat(model.parameters()), before)
    hopt.train_loss = _train
    hopt.val_loss = lambda m, h, b: (m(b[0]) > 0).sum()
    with pytest.raises(ValueError, match=r"floating-point scalar Tensor; .* returned torch.int64"):
        hopt.hyper_step(train_batch=TB, val_batch=VB)


def test_a_deepcopied_hyperoptimizer_keeps_checking_its_own_model() -> None:
    """The replaced-weight check follows a copy's own model (the slots are copied with it)."""
    model = _Net(None)
    hopt = _build("implicit", model)
    hopt.step(TB)
    twin = copy.deepcopy(hopt)
    weight_norm(model.b)  # the original's model only
    twin.step(TB)
    with pytest.raises(ValueError, match="no longer holds"):
        hopt.step(TB)


# ----------------------------------------------------------------------------- hypergrad.testing


def test_central_difference_of_a_transposed_tensor_is_the_derivative() -> None:
    """Before: a transposed (non-contiguous) hyperparameter crashed in ``.view(-1)``."""
    t = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=DT).t()
    assert not t.is_contiguous()
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    fd = ht.central_difference(lambda: float((w * t**3).sum()), t)
    torch.testing.assert_close(fd, 3 * w * t**2, rtol=1e-8, atol=1e-10)
    # a 0-dim tensor, and f returning a one-element tensor or a NumPy scalar
    s = torch.tensor(2.0, dtype=DT)
    torch.testing.assert_close(ht.central_difference(lambda: s**3, s), torch.tensor(12.0, dtype=DT))
    fd = ht.central_difference(lambda: (s**3).numpy().astype("float32").item() * 0 + float(s**2), s)
    torch.testing.assert_close(fd, torch.tensor(4.0, dtype=DT))


def test_central_difference_names_bad_input() -> None:
    """Before: an integer tensor gave garbage silently ([49999, 350000] for 3 t^2 at t = 1, 2),
    eps=0 a ZeroDivisionError, a vector-valued f an error about ``expand``."""
    t = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        ht.central_difference(lambda: 0.0, torch.tensor([1, 2]))
    for eps in (0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Invalid eps"):
            ht.central_difference(lambda: float((t**3).sum()), t, eps=eps)
    with pytest.raises(TypeError, match=r"f must return one number .* got shape \(2,\)"):
        ht.central_difference(lambda: t**3, t)
    with pytest.raises(TypeError, match="f must return one number .* got str"):
        ht.central_difference(lambda: "1", t)  # type: ignore[arg-type,return-value]
    assert torch.equal(t, torch.tensor([1.0, 2.0], dtype=DT))


def test_the_problem_factories_refuse_arguments_they_cannot_build() -> None:
    """Before: ridge(decay=2) built a NaN design and returned a NaN 'exact' hypergradient (with a
    NumPy RuntimeWarning only); ridge(n_train=5, n_features=10) failed inside a NumPy matmul."""
    with pytest.raises(ValueError, match="n_train >= n_features"):
        ht.ridge(n_train=5, n_features=10)
    for kw in ({"decay": 2.0}, {"decay": 0.0}, {"cond": 0.5}, {"decay": float("nan")}):
        with pytest.raises(ValueError, match="need 0 < decay < 1 and cond >= 1"):
            ht.ridge(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid dim: 0"):
        ht.quadratic(dim=0)
    with pytest.raises(ValueError, match="Invalid n_val: 0"):
        ht.logistic(n_val=0)
    p = ht.ridge(n_features=3, decay=0.9, cond=1.0)  # the edges that are valid
    p.solve_inner()
    assert torch.isfinite(p.exact_hypergradient()[0]).all()


def test_dense_ift_hypergradient_names_bad_input() -> None:
    p = ht.ridge(n_features=3)
    p.solve_inner()
    args = (p.model, p.hparams, p.train_loss, p.val_loss, p.train_batch, p.val_batch)
    with pytest.raises(ValueError, match=r"train_loss must return a scalar tensor, got shape \(100,\)"):
        ht.dense_ift_hypergradient(*args[:2], lambda m, h, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, *args[3:])
    flat = lambda m, h, b: h.raw[0].sum() * m.weight.sum() ** 2  # noqa: E731 - rank-one Hessian
    with pytest.raises(ValueError, match="Hessian of train_loss w.r.t. the weights is singular"):
        ht.dense_ift_hypergradient(*args[:2], flat, *args[3:])
    # a one-element loss of shape (1,) is a scalar here, as for torch's backward
    got = ht.dense_ift_hypergradient(*args[:2], lambda m, h, b: p.train_loss(m, h, b).reshape(1), *args[3:])
    torch.testing.assert_close(got[0], p.exact_hypergradient()[0], rtol=1e-9, atol=0)
    p.model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of model requires grad"):
        ht.dense_ift_hypergradient(*args)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_closure_passed_as_the_batch_is_named(method: str) -> None:
    """torch.optim's ``opt.step(closure)`` habit. Before: the user's loss failed with "cannot
    unpack non-iterable function object", naming neither the call nor the fix."""
    model = _Net(None)
    hopt = _build(method, model)
    before = _flat(model.parameters())

    def closure() -> Tensor:
        return _train(model, hopt.hparams, TB)

    with pytest.raises(TypeError, match=r"batch is a function \(closure\); hypergrad takes the batch"):
        hopt.step(closure)  # type: ignore[arg-type]
    hopt.step(TB)
    with pytest.raises(TypeError, match=r"val_batch is a function \(<lambda>\)"):
        hopt.hyper_step(train_batch=TB, val_batch=lambda: VB)  # type: ignore[arg-type]
    assert hopt.inner_steps == 1 and not torch.equal(_flat(model.parameters()), before)


# ----------------------------------------------------------------------------- data parallel


def _ddp_checkpointed(rank: int, world: int, init: str, out: str) -> None:
    """Two gloo ranks, DDP(static_graph=True, gradient_as_bucket_view=True) (torch's advice for
    reentrant checkpointing under DDP), each on its half of every batch."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        module = _Net(True)
        model = nn.parallel.DistributedDataParallel(module, static_graph=True, gradient_as_bucket_view=True)
        hp = _Decay()
        ddp_train = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m.module if m is model else m)  # noqa: E731
        opts = dict(
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        )
        hopt = hg.Implicit(model, hp, ddp_train, _val, solver=hg.Direct(), **opts)  # type: ignore[arg-type]
        half = slice(rank * 8, (rank + 1) * 8)
        for _ in range(3):
            hopt.step((TB[0][half], TB[1][half]))
        grads, _ = hopt.hypergradient(
            train_batch=(TB[0][half], TB[1][half]), val_batch=(VB[0][half], VB[1][half])
        )
        torch.save({"weights": _flat(module.parameters()), "grads": grads[0]}, f"{out}/ck{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_reentrant_checkpointing_under_ddp_equals_one_process(tmp_path: Any) -> None:
    """Before: step raised torch's "When use_reentrant=True, torch.utils.checkpoint is
    incompatible with .grad() or passing an `inputs` parameter to .backward()" (without DDP the
    same script went on silently, the checkpointed layer untrained)."""
    from _spawn import spawn_ranks

    spawn_ranks(
        _ddp_checkpointed, (2, f"file://{tmp_path / 'init'}", str(tmp_path)), 2,
        [tmp_path / f"ck{r}.pt" for r in range(2)],
    )  # fmt: skip
    model = _Net(None)
    hopt = _build("implicit", model)
    for _ in range(3):
        hopt.step(TB)
    want = ht.dense_ift_hypergradient(model, hopt.hparams, _train, _val, TB, VB)[0]
    for r in range(2):
        got = torch.load(tmp_path / f"ck{r}.pt")
        torch.testing.assert_close(got["weights"], _flat(model.parameters()), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got["grads"], want, rtol=1e-9, atol=1e-14)
