"""Round 19, numerics and execution modes across the four families (precision helper).

Bugs found (fixed in this round):

* ``Neumann`` ran its series on ``v`` as given, so each HVP saw a term of ``v``'s size: with a
  float16 model whose losses are in the hundreds (a sum-reduced loss, H and v of ~300s) the first
  HVP overflowed and the hyperstep was refused as non-finite, where ``CG`` and ``Direct`` (which
  rescale ``v`` by a power of two) returned the right, finite hypergradient; in float32 the same
  at scales of ~1e19. The fix runs the series on ``v / s`` (``s`` a power of two: exact).
* ``RandomTranslation((L,))`` (a 1-D signal) on float16 / bfloat16 inputs on the CPU crashed in
  ``F.affine_grid`` ('"tensor_cpu" not implemented for 'BFloat16''), so did
  ``MarginalLikelihood`` with a learned 1-D translation on a half-precision model.

* Unrolled (reverse mode, with or without ``checkpoint=True``) replayed a ``GradScaler`` step as
  ``grads * (1 / scale)`` on the scaled loss's gradient, so the hypergradient's cotangents
  entered the float16 backward graph divided by the scale and underflowed: with identical
  weights, the hypergradient of five float16-autocast steps was 0.05% off float64's without a
  scaler, 0.3% at a scale of 2^14 and 4.6% at 2^17, silently. The fix scales the cotangents
  through each scaled step by the scale (and back at its inputs), as the real backward pass had.

Passing tests, each on something no earlier file covers (see their docstrings): a finite loss with
a non-finite gradient in every family and both ``on_nonfinite`` modes; loss multipliers of 1e-30
and 1e30 in float64 against the closed form; bfloat16 autocast (all rows, dtypes of every state)
and ``torch.compile`` in rows of the SelfTuning / BestResponse / MarginalLikelihood families
that earlier files leave out; parameters that are views of one flat buffer, or transposed, in
every family; and a GradScaler's overflowed steps leaving no trace in the hypergradient.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from test_contract import BY_ID, METHODS, _assert_same, _batches
from torch import Tensor, nn

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64
ALL_IDS = [m.id for m in METHODS]
NON_STN_IDS = [i for i in ALL_IDS if not i.startswith(("selftuning", "best-response"))]


def _setup_with(
    mid: str, prepare: Any = None, dtype: torch.dtype | None = None, factor: float = 1.0, **kw: Any
) -> Any:
    """The contract registry's method ``mid`` on its problem, the model passed through
    ``prepare`` (and model and hyperparameters cast to ``dtype``) before the optimisers are built."""
    m = BY_ID[mid]
    torch.manual_seed(0)
    model, hp, tl, vl = m.problem()
    if dtype is not None:
        model.to(dtype)
        hp.to(dtype)
    if prepare is not None:
        prepare(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.1 / factor, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    train = tl if factor == 1.0 else (lambda m_, h_, b_: factor * tl(m_, h_, b_))
    return m.make(model, hp, train, vl, inner, outer, **kw)


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


# ------------------------------------------------------------------ bug 1: Neumann overflow


def test_neumann_solves_a_system_whose_hvp_of_v_overflows_float32() -> None:
    """H = s A, v = s b with s = 2^64 in float32: x = A^-1 b (closed form, of size 1) is finite,
    but H v (~2^129) is not. CG (which divides v by a power of two first) solves it; Neumann
    returned NaN, status 'nonfinite'. alpha = 1 / lambda_max(H): rate 1 - 1/kappa, 200 terms
    reach 1e-6 relative for this kappa (checked in float64 below), so 1e-4 leaves float32
    rounding room and still fails on any wrong scaling."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=DT)
    h = a @ a.T / 6 + torch.eye(6, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)
    want = torch.linalg.solve(h, b)
    top = float(torch.linalg.eigvalsh(h)[-1])
    s = 2.0**64
    h32, v32 = (h * s).float(), (b * s).float()

    def hvp(u: Any) -> tuple[Tensor]:
        return (h32 @ u[0],)

    # the premise: the solution is representable, the first HVP of v is not
    assert not torch.isfinite(h32 @ v32).all()
    ref = hg.Neumann(steps=200, alpha=1 / top).solve(lambda u: (h @ u[0],), (b,))
    assert float((ref.solution[0] - want).norm() / want.norm()) < 1e-6
    cg = hg.CG(maxiter=20, tol=1e-7).solve(hvp, (v32,))
    assert float((cg.solution[0].double() - want).norm() / want.norm()) < 1e-4
    r = hg.Neumann(steps=200, alpha=1 / (top * s)).solve(hvp, (v32,))
    assert r.status is hg.SolveStatus.FIXED, r.status
    assert float((r.solution[0].double() - want).norm() / want.norm()) < 1e-4


def _quadratic_hyperstep(dtype: torch.dtype, solver: hg.LinearSolver, scale: float) -> tuple[Tensor, Tensor]:
    """Implicit's hypergradient on testing.quadratic (weights at the optimum) with both losses
    multiplied by ``scale``, model and hyperparameters in ``dtype``; and the float64 closed form."""
    p = ht.quadratic(dim=6)
    p.solve_inner()
    want = (
        p.exact_hypergradient()[0] * scale
    )  # (dL_V scales by s; the IFT's H^-1 and mixed term cancel theirs)
    p.model.to(dtype)
    p.hparams.to(dtype)
    tb = tuple(t.to(dtype) for t in p.train_batch)
    vb = tuple(t.to(dtype) for t in p.val_batch)
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        lambda m, h, b: scale * p.train_loss(m, h, b),
        lambda m, h, b: scale * p.val_loss(m, h, b),
        inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1 / scale),
        outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
        solver=solver,
    )
    torch.manual_seed(0)  # (the power iteration's start)
    grads, info = hopt.hypergradient(train_batch=tb, val_batch=vb)
    assert not info.skipped
    return grads[0].double(), want


def test_cg_and_direct_give_float16_hypergradients_of_losses_in_the_hundreds() -> None:
    """The contrast for the test below: CG and Direct on the same float16 problem are right.
    Tolerance: float16 rounds at 2^-11 = 4.9e-4 per operation; observed 3e-4 to 9e-4 relative,
    so 1e-2 fails on anything but rounding."""
    for solver in (hg.CG(maxiter=30, tol=1e-3), hg.Direct()):
        got, want = _quadratic_hyperstep(torch.float16, solver, 300.0)
        assert float((got - want).norm() / want.norm()) < 1e-2, solver


@pytest.mark.parametrize("alpha", [None, "power"])
def test_neumann_gives_float16_hypergradients_of_losses_in_the_hundreds(alpha: Any) -> None:
    """A float16 model whose losses are ~1000 (sum-reduced: both times 300): the hypergradient
    (~220, representable) was refused as non-finite by Neumann (both its step-size rules), while
    CG and Direct give it (above). Reference: the same 30-term series in float64 on the unscaled
    losses, times 300 (the closed form differs by the truncation, 7% for alpha = lr); observed
    9e-4 after the fix, tolerance 1e-2 as above."""
    got, _ = _quadratic_hyperstep(torch.float16, hg.Neumann(steps=30, alpha=alpha), 300.0)
    ref, _ = _quadratic_hyperstep(DT, hg.Neumann(steps=30, alpha=alpha), 1.0)
    assert float((got - 300.0 * ref).norm() / (300.0 * ref).norm()) < 1e-2


# ------------------------------------------------------- bug 2: 1-D translation in half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_one_dimensional_translation_takes_half_precision_inputs(dtype: torch.dtype) -> None:
    """The 2-D translation takes them (checked here too); the 1-D one raised NotImplementedError
    from torch's grid generator. With a range of 1e-3 px the output is the input up to the dtype's
    rounding (bfloat16: 2^-9 relative, plus the 1e-3 shift: 1e-2 absolute on entries of ~1), and the
    range gets a finite gradient."""
    torch.manual_seed(0)
    for shape in ((8, 8), (8,)):
        tr = hg.hparams.RandomTranslation(shape, init=1e-3, max=2.0)
        x = torch.randn(3, *shape).to(dtype)
        out = tr(x, samples=2)
        assert out.dtype == dtype and out.shape == (6, *shape)
        torch.testing.assert_close(
            out.float(), x.float().repeat_interleave(2, dim=0), atol=2e-2, rtol=0, msg=str(shape)
        )
        (out.float() ** 2).sum().backward()
        assert tr.raw.grad is not None and torch.isfinite(tr.raw.grad).all()


def test_marginal_likelihood_with_a_translation_trains_a_bfloat16_model() -> None:
    hopt = _setup_with("marglik-augmented", dtype=torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches(3)]
    for b in batches:
        hopt.step(b)
    info = hopt.hyper_step(train_batch=batches[-1])
    assert not info.skipped and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in hopt.hparams.parameters()
    )


# ------------------------------------------- a finite loss with a non-finite gradient, every family

_POISON: dict[str, Any] = {"on": False, "value": float("nan")}


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; its derivative (reverse and forward mode) multiplied by NaN or inf."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g * _POISON["value"]

    @staticmethod
    def jvp(ctx: Any, t: Tensor) -> Tensor:
        return t * _POISON["value"]


def _poison_hook(mod: nn.Module, inp: Any, out: Tensor) -> Tensor:
    return _PoisonGrad.apply(out) if _POISON["on"] else out


def _state(hopt: hg.HyperOptimizer) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "model": hopt.model.state_dict(),
            "hparams": hopt.hparams.state_dict(),
            "inner": hopt.inner_optimizer.state_dict(),
            "outer": hopt.outer_optimizer.state_dict(),
            "hgrads": [None if p.grad is None else p.grad.clone() for p in hopt.hparams.parameters()],
            "rng": torch.get_rng_state(),
            "counts": (hopt.inner_steps, hopt.hyper_steps),
        }
    )


@pytest.mark.parametrize("mid", ALL_IDS)
@pytest.mark.parametrize(("policy", "value"), [("raise", float("nan")), ("skip", float("inf"))])
def test_a_finite_loss_with_a_nonfinite_gradient_changes_nothing(mid: str, policy: str, value: float) -> None:
    """The contract test poisons the batch, so the loss itself is NaN. Here every loss stays
    finite and only the model's derivative is NaN / inf (an op whose gradient blows up, as sqrt at
    0): step() and hyper_step() must still refuse, leave model, hyperparameters, both optimisers,
    the hyperparameters' .grad, the RNG and the counters bit-identical, and say so."""
    _POISON["value"] = value
    hopt = _setup_with(mid, on_nonfinite=policy)
    hopt.model.register_forward_hook(_poison_hook)
    batches, vb = _batches(4), _batches(1, seed=5)[0]
    for i, b in enumerate(batches[:3]):
        hopt.step(b)
        if i == 1:
            hopt.hyper_step(train_batch=b, val_batch=vb)
    before = _state(hopt)
    calls = {
        "step": lambda: hopt.step(batches[3]),
        "hyper_step": lambda: hopt.hyper_step(train_batch=batches[3], val_batch=vb),
    }
    for name, call in calls.items():
        _POISON["on"] = True
        try:
            if policy == "raise":
                with pytest.raises(hg.NonFiniteError, match="untouched"):
                    call()
            else:
                with pytest.warns(hg.NonFiniteWarning, match="skipped"):
                    out = call()
                assert isinstance(out, Tensor) or out.skipped, name
        finally:
            _POISON["on"] = False
        _assert_same(before, _state(hopt), name)


# ------------------------------------------------------------- loss scales of 1e-30 and 1e30


@pytest.mark.parametrize(
    "solver",
    [hg.CG(maxiter=30, tol=1e-13), hg.Direct(), hg.Neumann(steps=400, alpha="power")],
    ids=["cg", "direct", "neumann-power"],
)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_loss_scales_scale_the_hypergradient_exactly_in_float64(
    solver: hg.LinearSolver, scale: float
) -> None:
    """Both losses times 1e-30 or 1e30 (float64): the hypergradient is 1e-30 / 1e30 times the
    closed form, to 1e-9 relative (Neumann's 400 terms converge to ~1e-12 on this kappa), with no
    non-finite refusal, no warning and a solver that says it converged where it can. (Earlier
    files scale by powers of two, or in float32 only through CG's own rescaling.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = _quadratic_hyperstep(DT, solver, scale)
    assert float((got - want).norm() / want.norm()) < 1e-9


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_unrolled_hypergradient_is_linear_in_the_validation_loss_scale(mode: str) -> None:
    """Unrolled: a validation loss times 1e-30 / 1e30 gives the hypergradient times 1e-30 / 1e30
    (float64, 1e-12 relative), checked against central differences of the unscaled training once."""
    out = {}
    for s in (1.0, 1e-30, 1e30):
        p = ht.quadratic(dim=5)
        hopt = hg.Unrolled(
            p.model,
            p.hparams,
            p.train_loss,
            lambda m, h, b, s=s, p=p: s * p.val_loss(m, h, b),
            inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
            steps=4,
            mode=mode,
        )
        for _ in range(4):
            hopt.step(p.train_batch)
        out[s] = hopt.hypergradient(val_batch=p.val_batch)[0][0]
        if s == 1.0:
            raw = next(p.hparams.parameters())

            def outer(p: Any = p) -> float:
                with torch.no_grad():
                    w = torch.zeros(5, dtype=DT)
                    for _ in range(4):
                        w = w - 0.1 * torch.func.grad(lambda w_: _train_at(p, w_))(w)
                    return float(_val_at(p, w))

            fd = ht.central_difference(outer, raw, eps=1e-6)
            torch.testing.assert_close(out[1.0], fd, rtol=1e-6, atol=1e-9)
    for s in (1e-30, 1e30):
        torch.testing.assert_close(out[s] / s, out[1.0], rtol=1e-12, atol=0)


def _train_at(p: Any, w: Tensor) -> Tensor:
    a, b = p.train_batch
    d = next(p.hparams.parameters()).exp()
    return 0.5 * w @ a @ w - b @ w + 0.5 * (d * w**2).sum()


def _val_at(p: Any, w: Tensor) -> Tensor:
    c, cv = p.val_batch
    return 0.5 * ((c @ w - cv) ** 2).sum() + 0.1 * next(p.hparams.parameters()).exp().sum()


# -------------------------------------------- bf16 autocast, torch.compile: the other families

OTHER_FAMILIES = [i for i in ALL_IDS if i.startswith(("selftuning", "best-response", "marglik"))]


def _float32_run(mid: str, autocast: bool) -> tuple[Tensor, dict[str, torch.dtype], list[torch.dtype]]:
    hopt = _setup_with(mid, dtype=torch.float32)
    batches = [(x.float(), y) for x, y in _batches(4)]
    vb = (_batches(1, seed=9)[0][0].float(), _batches(1, seed=9)[0][1])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for b in batches[:3]:
            torch.manual_seed(1)
            hopt.step(b)
        torch.manual_seed(2)
        grads, info = hopt.hypergradient(train_batch=batches[3], val_batch=vb)
        assert not info.skipped
        torch.manual_seed(2)
        hopt.hyper_step(train_batch=batches[3], val_batch=vb)
    dtypes = {k: v.dtype for k, v in {**hopt.model.state_dict(), **hopt.hparams.state_dict()}.items()}
    opt = [
        t.dtype
        for o in (hopt.inner_optimizer, hopt.outer_optimizer)
        for s in o.state.values()
        for t in s.values()
        if isinstance(t, Tensor)
    ] + [p.grad.dtype for p in hopt.hparams.parameters()]
    return _flat(grads), dtypes, opt


@pytest.mark.parametrize("mid", OTHER_FAMILIES)
def test_bfloat16_autocast_in_the_selftuning_and_marglik_families(mid: str) -> None:
    """test_precision.py checks Implicit and Unrolled, test_matrix.py three rows' closeness. Here
    the step()s and the hyperstep of every SelfTuning, BestResponse and MarginalLikelihood row
    run inside bfloat16 autocast (the same
    draws: autocast does not touch the generator): the hypergradient is within 8% (observed
    0.03% to 5%: bfloat16 rounds at 2^-9 = 2e-3 per operation, and SelfTuning's hypergradient,
    1e-3 here, is a difference of terms ~30 times larger) and at cosine
    0.995 of the float32 run's, and no weight, buffer, hyperparameter, optimiser moment or .grad
    comes out in bfloat16."""
    full, dt_full, opt_full = _float32_run(mid, False)
    half, dt_half, opt_half = _float32_run(mid, True)
    assert dt_half == dt_full and opt_half == opt_full
    assert all(d in (torch.float32, torch.int64) for d in dt_half.values())
    assert float(torch.nn.functional.cosine_similarity(full, half, dim=0)) > 0.995
    assert float((half - full).norm() / full.norm()) < 0.08


def _compiled_run(mid: str, compiled: bool) -> list[Tensor]:
    m = BY_ID[mid]
    torch.manual_seed(0)
    eager, hp, tl, vl = m.problem()
    model = torch.compile(eager, backend="aot_eager") if compiled else eager
    hopt = m.make(
        model,
        hp,
        tl,
        vl,
        torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(hp.parameters(), lr=0.05),
    )
    batches, vb = _batches(7), _batches(1, seed=9)[0]
    for i, b in enumerate(batches[:6]):
        torch.manual_seed(i)
        hopt.step(b)
        if i % 3 == 2:
            torch.manual_seed(10 + i)
            hopt.hyper_step(train_batch=b, val_batch=vb)
    return [p.detach().clone() for p in [*eager.parameters(), *hp.parameters()]]


@pytest.mark.parametrize("mid", ["selftuning", "best-response-global", "marglik-ntk", "marglik-through-map"])
def test_a_compiled_model_in_the_selftuning_and_marglik_families_matches_eager(mid: str) -> None:
    """test_compile.py covers Implicit and Unrolled, test_matrix.py selftuning-delta and
    best-response-local; the rows here (plain SelfTuning, global BestResponse, and
    MarginalLikelihood, whose bound differentiates the model's Jacobians) with a ``torch.compile``d
    model (aot_eager: no C++ compiler needed) train and tune exactly as the eager one."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (dynamo's graph-break notes)
            compiled = _compiled_run(mid, True)
    except Exception as e:  # pragma: no cover - a platform without dynamo support
        if "dynamo" in type(e).__module__ or "Backend" in type(e).__name__:
            pytest.skip(f"torch.compile unavailable here: {e}")
        raise
    eager = _compiled_run(mid, False)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------- parameters that are views of a flat buffer, or transposed


def _flat_views(model: nn.Module) -> None:
    ps = list(model.parameters())
    buf = torch.cat([p.detach().reshape(-1) for p in ps])
    i = 0
    for p in ps:
        p.data = buf[i : i + p.numel()].view_as(p)
        i += p.numel()
    model._flat_buffer = buf  # type: ignore[assignment]


def _transposed(model: nn.Module) -> None:
    for p in model.parameters():
        if p.dim() == 2 and min(p.shape) > 1:
            p.data = p.data.t().contiguous().t()


def _layout_run(mid: str, prepare: Any) -> tuple[list[Tensor], nn.Module]:
    hopt = _setup_with(mid, prepare)
    batches, vb = _batches(7), _batches(1, seed=9)[0]
    for i, b in enumerate(batches[:6]):
        torch.manual_seed(i)
        hopt.step(b)
        if i % 3 == 2:
            torch.manual_seed(10 + i)
            hopt.hyper_step(train_batch=b, val_batch=vb)
    return [p.detach().clone() for p in [*hopt.model.parameters(), *hopt.hparams.parameters()]], hopt.model


@pytest.mark.parametrize("mid", ALL_IDS)
def test_flat_buffer_views_and_transposed_weights_train_and_tune_like_ordinary_ones(mid: str) -> None:
    """Weights that are views of one flat buffer (FSDP-style flat parameters, or code that reads
    ``parameters_to_vector``-style storage) and weights stored transposed (non-contiguous): every
    family trains and tunes them as ordinary ones (flat views bit for bit, transposed to 1e-12:
    matmuls on another layout round differently), and the views still alias the buffer at the end
    (a step that reassigned ``.data`` would silently detach them)."""
    plain, _ = _layout_run(mid, None)
    flat, model = _layout_run(mid, _flat_views)
    for a, b in zip(plain, flat, strict=True):
        assert torch.equal(a, b)
    buf = model._flat_buffer
    assert all(p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for p in model.parameters())
    assert torch.equal(buf, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    transposed, model = _layout_run(mid, _transposed)
    for a, b in zip(plain, transposed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ------------------------------------------------- a GradScaler's overflowed steps leave no trace


FACTOR = 4.0


@pytest.mark.parametrize("mid", [i for i in NON_STN_IDS if not i.startswith("marglik")])
def test_overflowed_scaled_steps_leave_no_trace_in_the_hypergradient(mid: str) -> None:
    """float32, a GradScaler starting at 2^127 and never growing: the first steps overflow (the
    scaled gradient is inf while the loss is finite) and are skipped, the scale halving each
    time. The weights and the hypergradient then equal, bit for bit, those of a run without a
    scaler on the accepted batches only (power-of-two scaling is exact), so nothing of an
    overflowed step was recorded for Unrolled's replay or anywhere else. (round10 compares
    the weights with torch's loop; not the hypergradient, nor Implicit or MarginalLikelihood.)
    The self-tuning rows are left out: an overflowed step consumes the generator as torch's
    would, so their perturbations after it differ from the run without it."""
    batches = [(x.float(), y) for x, y in _batches(8)]
    vb = (_batches(1, seed=9)[0][0].float(), _batches(1, seed=9)[0][1])

    def run(scaler: Any, idx: list[int]) -> tuple[list[int], Tensor, list[Tensor]]:
        hopt = _setup_with(mid, dtype=torch.float32, factor=FACTOR)  # (gradients of ~10: 2^127 overflows)
        hopt.outer_optimizer.param_groups[0]["lr"] = 0.0
        taken = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an overflow is routine: no warning
            for i in idx:
                n = hopt.inner_steps
                hopt.step(batches[i], scaler=scaler)
                taken += [i] if hopt.inner_steps > n else []
            grads, info = hopt.hypergradient(train_batch=batches[-1], val_batch=vb)
        return taken, _flat(grads), [p.detach().clone() for p in hopt.model.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=10**6)
    taken, g_scaled, w_scaled = run(scaler, list(range(8)))
    assert 0 < len(taken) < 8 and scaler.get_scale() < 2.0**127  # the premise: some overflowed
    _, g_plain, w_plain = run(None, taken)
    for a, b in zip(w_scaled, w_plain, strict=True):
        assert torch.equal(a, b)
    if mid in ("unrolled-reverse", "unrolled-checkpoint"):
        # (the reverse pass through a replayed scaled step carries cotangents divided by the
        # scale, ~2^-124 here: subnormal in float32, so the last digits go; a replayed overflowed
        # step would change the hypergradient by O(1))
        torch.testing.assert_close(g_scaled, g_plain, rtol=1e-4, atol=0)
    else:
        assert torch.equal(g_scaled, g_plain)


# ------------------------------------------- bug 3: the replay of a scaled float16 step, reverse mode


def _fp16_scaled_unrolled(dtype: torch.dtype, scale: float | None, **kw: Any) -> tuple[Tensor, Tensor]:
    """Five SGD steps of an MLP whose losses run under float16 autocast (float32 weights, the
    recipe GradScaler is for; ``dtype=float64``: no autocast, the reference), then Unrolled's
    hypergradient through all five: ``(hypergradient, final weights)`` in float64."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 8, generator=g), torch.randn(64, generator=g)) for _ in range(6)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-3)

    def data(m: nn.Module, b: Any) -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float32):
            out = m(b[0]).squeeze(-1)
        return ((out.float() - b[1]) ** 2).mean()

    hopt = hg.Unrolled(
        model,
        hp,
        lambda m, h, b: data(m, b) + h.penalty(m),
        lambda m, h, b: data(m, b),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=5,
        **kw,
    )
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
    for b in batches[:5]:
        hopt.step(tuple(t.to(dtype) for t in b), scaler=scaler)
    assert hopt.inner_steps == 5  # (no step overflowed)
    grads, _ = hopt.hypergradient(val_batch=tuple(t.to(dtype) for t in batches[5]))
    return _flat(grads), _flat(model.parameters())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_loss_scale_does_not_cost_the_float16_replay_its_precision(checkpoint: bool) -> None:
    """The same five float16-autocast steps with a GradScaler at 2^17 (no step overflows) and
    without one: the weights agree with float64's to 1.1e-5 either way, and without a scaler the
    hypergradient is within 0.05% of float64's. With it, the replay's ``grads * (1 / scale)``
    sent cotangents divided by 2^17 into the float16 backward graph of the scaled loss, where
    they underflow: 0.3% off at 2^14, 4.6% at 2^17, silently. Tolerance 0.5%: ten times the
    unscaled run's error (float16 rounds at 2^-11 = 4.9e-4)."""
    want, w64 = _fp16_scaled_unrolled(DT, None)
    plain, w_plain = _fp16_scaled_unrolled(torch.float32, None, checkpoint=checkpoint)
    scaled, w_scaled = _fp16_scaled_unrolled(torch.float32, 2.0**17, checkpoint=checkpoint)
    assert torch.equal(w_plain, w_scaled) or float((w_plain - w_scaled).norm() / w64.norm()) < 1e-6
    assert float((w_scaled - w64).norm() / w64.norm()) < 1e-4
    assert float((plain - want).norm() / want.norm()) < 5e-3  # (the premise: float16 itself is fine)
    assert float((scaled - want).norm() / want.norm()) < 5e-3
