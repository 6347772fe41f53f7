"""Round 10, mixed and low precision as GPU researchers use it, tested on the CPU.

* float16 training with a ``torch.amp.GradScaler`` next to a HyperOptimizer: ``step`` ran the
  backward pass itself, so the scaler had no place to go. Scaling inside ``train_loss`` (the only
  place a user could reach) stepped with gradients 65,536 times too large, silently (a first SGD
  step moved the weights by 330.7 instead of 0.00505). ``step(batch, scaler=...)`` now follows
  torch's recipe: scaled backward, ``unscale_``, clipping, update, ``scaler.update()``; an
  overflowed step is skipped and the scale lowered, without a NonFiniteError; a non-finite loss is
  still refused, the scaler untouched.
* bfloat16 autocast hypergradients against the float64 truth (closed-form ridge, and central
  differences of the real training procedure), with tolerances stated for bfloat16 (8 bits of
  mantissa: a relative rounding of 2^-9 = 2e-3 per operation).
* The replay of a loss-scaled step, low-precision models with float32 decays, SelfTuning's and
  BestResponse's ``scaler=``, and Direct's algebra under autocast (fixed; see the docstrings).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64
F16 = torch.float16
BF16 = torch.bfloat16


def _batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(64, 8, generator=g, dtype=dtype), torch.randn(64, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def _net(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, hg.hparams.WeightDecay]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    return model, hg.hparams.WeightDecay(model, per="layer", init=1e-3)


def _fp16_losses(factor: float = 1e-3) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The model runs under float16 autocast inside the losses (float32 weights), as in torch's
    mixed precision recipe; ``factor`` scales the data term (small: gradients that underflow)."""

    def data(m: nn.Module, b: Any) -> Tensor:
        with torch.autocast("cpu", dtype=F16):
            out = m(b[0]).squeeze(-1)
        return factor * ((out.float() - b[1]) ** 2).mean()

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return data(m, b) + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return data(m, b)

    return train, val


def _make(kind: str, model: nn.Module, hp: nn.Module, tl: Any, vl: Any, **kw: Any) -> hg.HyperOptimizer:
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    if kind == "implicit":
        return hg.Implicit(model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, **kw)
    return hg.Unrolled(model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, steps=4, **kw)


# ------------------------------------------------------------------------------ GradScaler


@pytest.mark.parametrize("kind", ["implicit", "unrolled"])
def test_step_with_a_grad_scaler_follows_torchs_recipe_bit_for_bit(kind: str) -> None:
    """Twelve float16-autocast steps from a scale of 2^26, some of which overflow: the weights,
    the scale after every step and the number of steps taken equal torch's own loop
    ``scaler.scale(loss).backward(); unscale_; clip_grad_norm_; scaler.step; scaler.update``."""
    tl, vl = _fp16_losses()
    batches = _batches(12)

    def scaler() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**26, growth_interval=3)

    model, hp = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_scaler, ref_scales, taken = scaler(), [], 0
    for b in batches:
        opt.zero_grad()
        ref_scaler.scale(tl(model, hp, b)).backward()
        ref_scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = ref_scaler.get_scale()
        ref_scaler.step(opt)
        ref_scaler.update()
        taken += ref_scaler.get_scale() >= before
        ref_scales.append(ref_scaler.get_scale())
    assert 0 < taken < len(batches)  # the premise: some steps overflowed, most did not

    model2, hp2 = _net()
    hopt = _make(kind, model2, hp2, tl, vl)
    sc, scales = scaler(), []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is routine: no NonFiniteWarning
        for b in batches:
            hopt.step(b, scaler=sc, max_grad_norm=1.0)
            scales.append(sc.get_scale())
    assert scales == ref_scales
    assert hopt.inner_steps == taken
    for a, b_ in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b_)
    assert all(p.grad is None for p in hp2.parameters())  # step never touches the hparams' .grad


METHODS: dict[str, Callable[[nn.Module, nn.Module, Any, Any, Any, Any], hg.HyperOptimizer]] = {
    "implicit-cg": lambda m, h, tl, vl, i, o: hg.Implicit(
        m, h, tl, vl, inner_optimizer=i, outer_optimizer=o, solver=hg.CG(maxiter=5, damping=0.1)
    ),
    "unrolled-reverse": lambda m, h, tl, vl, i, o: hg.Unrolled(
        m, h, tl, vl, inner_optimizer=i, outer_optimizer=o, steps=3
    ),
    "unrolled-forward": lambda m, h, tl, vl, i, o: hg.Unrolled(
        m, h, tl, vl, inner_optimizer=i, outer_optimizer=o, steps=2, mode="forward"
    ),
    "marglik": lambda m, h, tl, vl, i, o: hg.MarginalLikelihood(
        m, h, likelihood="regression", data_size=64, subset_size=8, inner_optimizer=i, outer_optimizer=o
    ),
}


@pytest.mark.parametrize("mid", list(METHODS))
def test_a_power_of_two_scale_changes_nothing_in_float64(mid: str) -> None:
    """Scaling by a power of two is exact: with a scaler (whose scale grows every two steps) the
    run, hypersteps included, is bit for bit the run without one."""
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(64, 8, generator=g, dtype=DT), torch.randn(64, 1, generator=g, dtype=DT))
        for _ in range(6)
    ]
    results = []
    for use in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
        if mid == "marglik":
            hp: nn.Module = nn.ModuleDict(
                {
                    "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
                    "noise": hg.hparams.ObservationNoise(init=1.0),
                }
            ).to(DT)
            tl = vl = None
        else:
            hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)

            def tl(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
                return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)  # type: ignore[operator]

            def vl(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
                return F.mse_loss(m(b[0]), b[1])

        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        hopt = METHODS[mid](model, hp, tl, vl, inner, outer)
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if use else None
        for i, b in enumerate(batches):
            hopt.step(b, scaler=sc, max_grad_norm=0.5 if i % 2 else None)
            if i % 3 == 2:
                hopt.hyper_step(train_batch=b, val_batch=batches[0])
        if sc is not None:
            assert sc.get_scale() == 2.0**13  # it grew: every step was taken
        results.append([t.detach().clone() for t in [*model.parameters(), *hp.parameters()]])
    for a, b_ in zip(*results, strict=True):
        assert torch.equal(a, b_)


def _state(hopt: hg.HyperOptimizer) -> dict[str, Any]:
    return copy.deepcopy(hopt.state_dict())


def _same(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k != "rng":
                _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_overflow_is_skipped_quietly_and_a_real_nan_is_still_refused(on_nonfinite: str) -> None:
    """A BatchNorm model: an overflowed step leaves weights, running statistics, optimiser
    state and counters as they were and halves the scale, with no error or warning; a NaN in the
    batch (a finite scale cannot cure it) is refused as before, the scale untouched, and the
    scaler still works for the next step (no "unscale_() has already been called")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-3)
    tl, vl = _fp16_losses(factor=1.0)
    hopt = _make("implicit", model, hp, tl, vl, on_nonfinite=on_nonfinite)
    b = _batches(1)[0]
    hopt.step(b)  # (momentum buffers exist: the state to keep is not empty)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = _state(hopt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = hopt.step(b, scaler=sc)
    assert bool(torch.isfinite(loss))
    _same(before, _state(hopt))
    assert sc.get_scale() == 2.0**39 and hopt.inner_steps == 1

    nan = (b[0].clone(), b[1])
    nan[0][3, 2] = float("nan")
    if on_nonfinite == "raise":
        with pytest.raises(hg.NonFiniteError, match="training loss or its gradient is not finite"):
            hopt.step(nan, scaler=sc)
    else:
        with pytest.warns(hg.NonFiniteWarning, match="step skipped"):
            hopt.step(nan, scaler=sc)
    _same(before, _state(hopt))
    assert sc.get_scale() == 2.0**39

    sc = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    hopt.step(b, scaler=sc)
    assert hopt.inner_steps == 2 and sc.get_scale() == 2.0**8


def test_a_scaler_with_float16_weights_or_of_another_kind_is_refused_first() -> None:
    model, hp = _net()
    tl, vl = _fp16_losses()
    hopt = _make("implicit", model, hp, tl, vl)
    b = _batches(1)[0]
    before = _state(hopt)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler or None, got float"):
        hopt.step(b, scaler=2.0**16)  # type: ignore[arg-type]
    _same(before, _state(hopt))

    half, hp16 = _net(F16)
    h16 = _make(
        "implicit", half, hp16, lambda m, h, b: (m(b[0]) ** 2).mean(), lambda m, h, b: (m(b[0]) ** 2).mean()
    )
    sc = torch.amp.GradScaler("cpu")
    before = _state(h16)
    with pytest.raises(
        ValueError,
        match=r"scaler: the trained weights \['0.weight', '0.bias', '2.weight', '2.bias'\] are float16",
    ):
        h16.step(tuple(t.half() for t in b), scaler=sc)
    _same(before, _state(h16))
    assert sc.get_scale() == 2.0**16

    # a disabled scaler scales nothing, as in torch's recipe
    a, ha = _net()
    c, hc = _net()
    ra, rc = _make("implicit", a, ha, tl, vl), _make("implicit", c, hc, tl, vl)
    for x in _batches(3):
        ra.step(x)
        rc.step(x, scaler=torch.amp.GradScaler("cpu", enabled=False))
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_scaler_recovers_float16_gradients_that_underflow() -> None:
    """The reason for the scaler: under float16 autocast a loss of 1e-7 x MSE has activation
    gradients below float16's smallest subnormal (6e-8), which flush to 0. With a scale of
    2^30 the step equals the float32 step to float16's rounding; without it, entire weight
    gradients are lost (relative error 1.0)."""
    b = _batches(1)[0]
    moved = {}
    for how in ("float32", "fp16", "fp16+scaler"):
        model, hp = _net()

        def tl(m: nn.Module, h: nn.Module, b_: Any, how: str = how) -> Tensor:
            with torch.autocast("cpu", dtype=F16, enabled=how != "float32"):
                out = m(b_[0]).squeeze(-1)
            return 1e-7 * ((out.float() - b_[1]) ** 2).mean()  # (no penalty: the data term alone)

        vl = tl
        hopt = hg.Implicit(
            model,
            hp,
            tl,
            vl,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=1e6),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )
        w0 = [p.detach().clone() for p in model.parameters()]
        hopt.step(
            b, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**30) if how.endswith("scaler") else None
        )
        moved[how] = [p.detach() - q for p, q in zip(model.parameters(), w0, strict=True)]

    def worst(how: str) -> float:
        return max(
            float((a - r).norm() / r.norm()) for a, r in zip(moved[how], moved["float32"], strict=True)
        )

    assert worst("fp16") > 0.5  # (the premise: float16 alone loses gradients)
    assert worst("fp16+scaler") < 5e-3


# ------------------------------------------------------------------------------ bf16 vs float64


def test_bf16_autocast_implicit_hypergradient_against_the_closed_form() -> None:
    """Ridge regression at its exact inner optimum, losses under bfloat16 autocast, weights and
    hyperparameters float32: CG's hypergradient against the float64 closed form. Tolerance: the
    model's matmuls round inputs to 8 bits (relative 2^-9 each); with cond(H) = 6.7 that bounds
    the error near 6.7 x 2 x 2^-9 = 2.6%; we ask cosine > 0.999 and relative error < 0.03. The
    ``.grad`` written is float32 (the hyperparameter's dtype), not bfloat16."""
    p = ht.ridge(n_features=6)
    p.solve_inner()
    exact = p.exact_hypergradient()[0].reshape(-1)
    model, hp = p.model.float(), p.hparams.float()

    def autocast(fn: Any) -> Any:
        def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            with torch.autocast("cpu", dtype=BF16):
                return fn(m, h, b).float()

        return loss

    hopt = hg.Implicit(
        model,
        hp,
        autocast(p.train_loss),
        autocast(p.val_loss),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=30, tol=1e-6),
    )
    batch = tuple(t.float() for t in p.train_batch)
    val = tuple(t.float() for t in p.val_batch)
    hopt.hyper_step(train_batch=batch, val_batch=val)
    g = next(hp.parameters()).grad
    assert g is not None and g.dtype == torch.float32
    got = g.reshape(-1).double()
    assert float(F.cosine_similarity(got, exact, dim=0)) > 0.999
    assert float((got - exact).norm() / exact.norm()) < 0.03


def test_bf16_autocast_unrolled_hypergradient_against_central_differences_of_training() -> None:
    """Four SGD steps of a small tanh regression, the training loss under bfloat16 autocast
    (float32 weights, one decay per parameter tensor); the truth is central differences (float64,
    no autocast) of the validation loss after the same four steps. Measured: relative error 1.0e-2
    (float32 without autocast: 3.6e-7). Tolerance for bfloat16 (2^-9 relative rounding per
    operation, through four steps): cosine > 0.999 and relative error < 0.03."""
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(32, 3, generator=g, dtype=DT), torch.randn(32, 1, generator=g, dtype=DT))
        for _ in range(5)
    ]

    def build(dtype: torch.dtype) -> tuple[nn.Module, hg.hparams.WeightDecay]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        return m, hg.hparams.WeightDecay(m, per="parameter", init=0.1)

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        with torch.autocast("cpu", dtype=BF16, enabled=b[0].dtype == torch.float32):
            out = m(b[0])
        return F.mse_loss(out.to(b[1].dtype), b[1]) + h.penalty(m)  # type: ignore[operator]

    def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]), b[1])

    raws = [p.detach().clone() for p in build(DT)[1].parameters()]

    def outer() -> float:
        m, h = build(DT)
        with torch.no_grad():
            for p, r in zip(h.parameters(), raws, strict=True):
                p.copy_(r)
        opt = torch.optim.SGD(m.parameters(), lr=0.3)
        for b in batches[:4]:
            opt.zero_grad()
            train(m, h, b).backward()
            opt.step()
        return float(val(m, h, batches[4]).detach())

    fd = torch.cat([ht.central_difference(outer, r, eps=1e-5).reshape(-1) for r in raws])

    model, hp = build(torch.float32)
    hopt = hg.Unrolled(
        model,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=4,
    )
    f32 = [tuple(t.float() for t in b) for b in batches]
    for b in f32[:4]:
        hopt.step(b)
    grads, info = hopt.hypergradient(val_batch=f32[4])
    assert not info.skipped and all(t.dtype == torch.float32 for t in grads)
    got = torch.cat([t.reshape(-1) for t in grads]).double()
    assert float(F.cosine_similarity(got, fd, dim=0)) > 0.999
    assert float((got - fd).norm() / fd.norm()) < 0.03


def test_forward_mode_unrolled_differentiates_through_mse_loss() -> None:
    """``Unrolled(mode="forward")`` with ``F.mse_loss`` in the training loss crashed in every
    hyperstep ("ZeroTensors are immutable": torch's mse_loss double backward on a dual tensor);
    now its hypergradient equals reverse mode's (float64, to 1e-10)."""
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(64, 8, generator=g, dtype=DT), torch.randn(64, 1, generator=g, dtype=DT))
        for _ in range(3)
    ]
    out = []
    for mode in ("reverse", "forward"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)

        def tl(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)  # type: ignore[operator]

        def vl(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return F.mse_loss(m(b[0]), b[1], reduction="sum")

        hopt = hg.Unrolled(
            model,
            hp,
            tl,
            vl,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=3,
            mode=mode,
        )
        for b in batches:
            hopt.step(b)
        grads, _ = hopt.hypergradient(val_batch=batches[0])
        out.append(torch.cat([t.reshape(-1) for t in grads]))
    assert float(out[0].norm()) > 0
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------ fixed elsewhere


def test_unrolled_replays_a_scaled_step_with_its_scale() -> None:
    """Unrolled replays each step's gradient from the unscaled loss, so under float16 autocast
    the replay loses what the real (scaled) step kept (gradients below float16's range): the
    replayed weights ended 1.3e-4 away from the real ones (which moved 0.091), a ReplayWarning.
    With the step's scale recorded and replayed, the replay is exact and the hypergradient
    within 5% of the float32 run's. (With a loss 100 times smaller the replay's double backward
    still underflows in float16, 59% off: hypersteps themselves are not loss-scaled.)"""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 8, generator=g), torch.randn(64, generator=g)) for _ in range(6)]
    k = 1e-2
    results = []
    for fp16 in (False, True):
        model, hp = _net()
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)

        def train(m: nn.Module, h: nn.Module, b: Any, fp16: bool = fp16) -> Tensor:
            with torch.autocast("cpu", dtype=F16, enabled=fp16):
                out = m(b[0]).squeeze(-1)
            return k * (((out.float() - b[1]) ** 2).mean() + h.penalty(m))

        def val(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()

        hopt = hg.Unrolled(
            model,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3 / k),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=6,
        )
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**12) if fp16 else None
        for b in batches:
            hopt.step(b, scaler=sc)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grads, _ = hopt.hypergradient(val_batch=batches[0])
        results.append(torch.cat([t.reshape(-1) for t in grads]))
    full, half = results
    assert float((half - full).norm() / full.norm()) < 0.05


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_unrolled_replays_a_low_precision_model_with_float32_weight_decay(dtype: torch.dtype) -> None:
    """A bfloat16 / float16 model with float32 ``WeightDecay``: the replay's penalty shortcut
    ``c * (d * w)`` promoted the gradient, so the replayed weights became float32 and the next
    replayed forward crashed ("expected m1 and m2 to have the same dtype"). The real step's
    gradient is in the weight's dtype (autograd casts each term back)."""
    p = ht.ridge(n_features=5)
    model, hp = p.model.to(dtype), p.hparams.float()
    tb = tuple(t.to(dtype) for t in p.train_batch)
    hopt = hg.Unrolled(
        model,
        hp,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=3,
    )
    for _ in range(3):
        hopt.step(tb)
    replayed = hopt.replayed_weights()
    assert all(r.dtype == dtype for r in replayed)
    hopt.hyper_step(val_batch=tuple(t.to(dtype) for t in p.val_batch))
    assert next(hp.parameters()).grad.dtype == torch.float32


@pytest.mark.parametrize("mid", ["selftuning-delta", "best-response-local"])
def test_selftuning_and_best_response_steps_take_a_scaler(mid: str) -> None:
    """``SelfTuning`` / ``BestResponse`` override ``step`` without ``scaler=`` (TypeError); with it
    passed on, a power-of-two scale changes nothing, Delta-STN's two backward passes included."""
    from test_contract import BY_ID, _setup
    from test_contract import _batches as contract_batches

    val = contract_batches(1, seed=99)[0]
    runs = []
    for use in (False, True):
        hopt = _setup(BY_ID[mid])
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) if use else None
        torch.manual_seed(3)
        for i, b in enumerate(contract_batches(6)):
            hopt.step(b, scaler=sc)  # type: ignore[call-arg]
            if i % 3 == 2:
                hopt.hyper_step(val_batch=val)
        runs.append([t.detach().clone() for t in [*hopt.model.parameters(), *hopt.hparams.parameters()]])
    for a, b_ in zip(*runs, strict=True):
        assert torch.equal(a, b_)


def test_direct_solver_reports_its_true_residual_under_autocast() -> None:
    """``Direct`` under bfloat16 autocast (an ``Implicit`` hyperstep inside the block): its
    Hessian-vector products are float32, but ``h @ x`` for the residual ran in bfloat16 (reported
    1e-2 where it is 5e-6), and the singular fallback ``pinv(h) @ b`` gave a bfloat16 solution."""
    torch.manual_seed(0)
    a = torch.randn(12, 12)
    h = a @ a.T / 12 + 0.5 * torch.eye(12)
    singular = h.clone()
    singular[:, 0] = singular[0, :] = 0  # (a weight the loss does not reach: LU fails, pinv)
    v = torch.randn(12)

    def hvp_of(m: Tensor) -> Callable[[Any], tuple[Tensor]]:
        def hvp(u: Any) -> tuple[Tensor]:
            with torch.autocast("cpu", enabled=False):  # (float32 products, as autograd's HVP gives)
                return (m @ u[0],)

        return hvp

    with torch.autocast("cpu", dtype=BF16):
        r = hg.Direct().solve(hvp_of(h), (v,))
        s = hg.Direct().solve(hvp_of(singular), (v,))
    assert r.status is hg.SolveStatus.CONVERGED and float(r.residual) < 1e-5
    assert s.solution[0].dtype == torch.float32
    want = torch.linalg.pinv(singular.double(), hermitian=True) @ v.double()
    torch.testing.assert_close(s.solution[0].double(), want, rtol=1e-4, atol=1e-5)


def test_a_hypergradient_under_float16_autocast_is_warned_about_once() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2)

    def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(b[0]).float(), b[1]) + h.penalty(m)

    hopt = hg.Implicit(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.CG(maxiter=3),
    )
    batch = (torch.randn(8, 4), torch.randn(8, 1))
    hopt.step(batch)
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.warns(UserWarning, match="under torch.autocast\\(dtype=float16\\)"):
            hopt.hypergradient(train_batch=batch, val_batch=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hopt.hypergradient(train_batch=batch, val_batch=batch)  # once only
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.Implicit(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            solver=hg.CG(maxiter=3),
        ).hypergradient(train_batch=batch, val_batch=batch)  # bfloat16: no warning
