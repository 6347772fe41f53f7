"""Round 14: the pure functions, called as a user without a HyperOptimizer loop would.

Translated from the functional-API tests of torchopt (``torchopt.diff.implicit.custom_root``,
``test_implicit.py``), jaxopt (``implicit_diff`` tests: ridge, logistic regression) and hypertorch
(``hypergrad.py``: ``fixed_point``, ``CG``, ``reverse`` on functional closures), into calls of
``hg.implicit_hypergradient``, ``hg.unrolled_hypergradient``, ``hg.log_evidence`` and
``hg.log_evidence_bound``. Every hypergradient is checked in float64 against a closed form or
central differences of the real inner procedure.

Found and fixed:

1. ``implicit_hypergradient(..., hparams=lam)`` with a bare tensor (not ``[lam]``) iterated over
   its rows, new tensors that no loss uses, and returned zeros (truth: entries of size 0.1-0.6)
   with no error; a bare tensor as ``weights`` failed with "the training gradient does not
   depend on the weights", a dict with "weights[0] ... got str".
2. ``unrolled_hypergradient`` validated nothing: a bare tensor was iterated by rows (hypergradient
   ``(1, 0)`` for ``[1, 2]``); a hyperparameter not requiring grad got 0 in reverse mode (truth
   ``[1, 2]``); a tensor listed twice got ``[2, 4]`` in reverse mode and ``[1, 2]`` in forward
   mode; a complex ``outer`` gave zeros in forward mode; a vector ``outer`` failed in forward
   mode with ``expand(torch.DoubleTensor{[2]}, size=[])``; a typo in ``mode`` said "'backward' is
   not a valid Mode".
3. ``unrolled_hypergradient(..., mode="forward")`` crashed on a non-contiguous hyperparameter
   (``nn.Parameter(w.t())``): "view size is not compatible with input tensor's size and stride".
4. ``log_evidence(model, x_list, ...)``: "'list' object has no attribute 'dim'".
5. Under ``torch.no_grad()`` (an evaluation loop) ``unrolled_hypergradient`` returned 0 in
   reverse mode (truth 0.5625) and ``implicit_hypergradient`` failed with "element 0 of tensors
   does not require grad"; under ``torch.inference_mode()`` both modes of
   ``unrolled_hypergradient`` returned 0. They now run with autograd on (as
   ``torch.autograd.functional`` does, and as the HyperOptimizer methods already did) and refuse
   inference mode by name.
6. Forward mode hands ``outer`` tensors that do not require grad; a MAML loop differentiating
   w.r.t. its initialisation failed with torch's bare "does not require grad": the error now
   says what to do.
7. Forward mode passed the caller's own storage to ``outer``: an in-place operation there
   changed the caller's hyperparameter and the start of every later pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import hypergrad as hg

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# ridge with per-feature penalties (jaxopt's test_ridge / hypertorch's fixed point, as pure calls)


def _ridge(seed: int = 0, n: int = 30, d: int = 4) -> dict[str, Tensor]:
    g = _gen(seed)
    X, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    Xv, yv = torch.randn(20, d, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    lam = (torch.rand(d, generator=g, dtype=DT) + 0.5).requires_grad_()
    A = X.T @ X
    H = A + torch.diag(lam.detach())
    w_star = torch.linalg.solve(H, X.T @ y)
    gv = Xv.T @ (Xv @ w_star - yv)
    truth = -w_star * torch.linalg.solve(H, gv)  # dL_V/dlam_j = -w_j (H^-1 g_V)_j
    return {"X": X, "y": y, "Xv": Xv, "yv": yv, "lam": lam, "H": H, "w_star": w_star, "truth": truth}


@pytest.mark.parametrize("solver", ["cg", "direct", "neumann"])
def test_ridge_per_feature_penalty_matches_the_closed_form(solver: str) -> None:
    r = _ridge()
    w = r["w_star"].clone().requires_grad_()
    lam = r["lam"]
    lmax = float(torch.linalg.eigvalsh(r["H"]).max())
    s = {
        "cg": hg.CG(maxiter=50, tol=1e-14),
        "direct": hg.Direct(),
        "neumann": hg.Neumann(steps=3000, alpha=1.0 / lmax),
    }[solver]
    g, value, sol = hg.implicit_hypergradient(
        lambda: 0.5 * ((r["X"] @ w - r["y"]) ** 2).sum() + 0.5 * (lam * w**2).sum(),
        lambda: 0.5 * ((r["Xv"] @ w - r["yv"]) ** 2).sum(),
        [w],
        [lam],
        s,
    )
    assert float(r["truth"].abs().min()) > 1e-3  # a non-trivial target
    torch.testing.assert_close(g[0], r["truth"], rtol=1e-8, atol=1e-10)
    assert value.dim() == 0 and not value.requires_grad and value.dtype == DT
    # nothing written into .grad (a pure function)
    assert w.grad is None and lam.grad is None


def test_k_scalars_and_one_vector_give_the_same_hypergradient() -> None:
    r = _ridge(1)
    w = r["w_star"].clone().requires_grad_()
    scalars = [r["lam"][i].detach().clone().requires_grad_() for i in range(4)]
    vec = r["lam"]
    val = lambda: 0.5 * ((r["Xv"] @ w - r["yv"]) ** 2).sum()  # noqa: E731
    g_vec, _, _ = hg.implicit_hypergradient(
        lambda: 0.5 * ((r["X"] @ w - r["y"]) ** 2).sum() + 0.5 * (vec * w**2).sum(),
        val,
        [w],
        [vec],
        hg.Direct(),
    )
    g_sc, _, _ = hg.implicit_hypergradient(
        lambda: 0.5 * ((r["X"] @ w - r["y"]) ** 2).sum() + 0.5 * (torch.stack(scalars) * w**2).sum(),
        val,
        [w],
        scalars,
        hg.Direct(),
    )
    assert all(t.shape == () for t in g_sc)
    torch.testing.assert_close(torch.stack(g_sc), g_vec[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_vec[0], r["truth"], rtol=1e-8, atol=1e-10)


def test_weights_as_views_of_one_flat_buffer() -> None:
    """hypertorch keeps the weights as a list of views of one flat vector."""
    r = _ridge(2)
    flat = r["w_star"].clone().requires_grad_()
    views = [flat[:1], flat[1:3], flat[3:]]
    lam = r["lam"]

    def w() -> Tensor:
        return torch.cat(views)

    g, _, sol = hg.implicit_hypergradient(
        lambda: 0.5 * ((r["X"] @ w() - r["y"]) ** 2).sum() + 0.5 * (lam * w() ** 2).sum(),
        lambda: 0.5 * ((r["Xv"] @ w() - r["yv"]) ** 2).sum(),
        views,
        [lam],
        hg.CG(maxiter=50, tol=1e-14),
    )
    torch.testing.assert_close(g[0], r["truth"], rtol=1e-8, atol=1e-10)
    assert [t.shape for t in sol.solution] == [v.shape for v in views]
    assert flat.grad is None


def test_closure_over_functional_call_and_an_unreached_head() -> None:
    """torchopt's functional style: the losses call ``functional_call(model, params, x)``; a head
    weight read only by the validation loss (the training loss does not reach it), and a
    hyperparameter read only by the validation loss (direct term only)."""
    r = _ridge(3)
    model = nn.Linear(4, 1, bias=False).double()
    params = {"weight": r["w_star"].clone().reshape(1, 4).requires_grad_()}
    head = torch.tensor([1.3], dtype=DT, requires_grad=True)  # val only
    lam, temp = r["lam"], torch.tensor(0.7, dtype=DT, requires_grad=True)  # temp: val only

    def f(x: Tensor) -> Tensor:
        return functional_call(model, params, (x,)).squeeze(-1)

    def train() -> Tensor:
        return 0.5 * ((f(r["X"]) - r["y"]) ** 2).sum() + 0.5 * (lam * params["weight"][0] ** 2).sum()

    def val() -> Tensor:
        return 0.5 * ((f(r["Xv"]) - r["yv"]) ** 2).sum() + temp**2 * (head**2).sum()

    g, value, _ = hg.implicit_hypergradient(
        train, val, [params["weight"], head], [lam, temp], hg.CG(maxiter=50)
    )
    torch.testing.assert_close(g[0], r["truth"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g[1], 2 * temp.detach() * 1.3**2, rtol=1e-12, atol=0)
    assert model.weight.grad is None and torch.isfinite(value)


def _softmax_problem() -> dict[str, Tensor]:
    g = _gen(4)
    n, d, c = 40, 3, 3
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    Xv = torch.randn(25, d, generator=g, dtype=DT)
    yv = torch.randint(0, c, (25,), generator=g)
    return {"X": X, "y": y, "Xv": Xv, "yv": yv}


def _softmax_train(W: Tensor, log_lam: Tensor, p: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(p["X"] @ W, p["y"], reduction="sum") + 0.5 * (log_lam.exp()[:, None] * W**2).sum()


def _newton(log_lam: Tensor, p: dict[str, Tensor]) -> Tensor:
    """The regularised softmax regression optimum, by Newton's method (float64, to ~1e-15)."""
    W = torch.zeros(3, 3, dtype=DT)
    for _ in range(30):
        Wg = W.clone().requires_grad_()
        (g,) = torch.autograd.grad(_softmax_train(Wg, log_lam, p), Wg)
        H = torch.autograd.functional.hessian(lambda V: _softmax_train(V, log_lam, p), W).reshape(9, 9)
        W = W - torch.linalg.solve(H, g.reshape(9)).reshape(3, 3)
    return W


def test_softmax_regression_optimum_by_newton_against_central_differences() -> None:
    """jaxopt's logistic-regression implicit-diff test: the hypergradient at the Newton optimum
    equals central differences of (Newton optimum as a function of lambda) -> L_V."""
    p = _softmax_problem()
    log_lam = torch.tensor([0.2, -0.5, 1.0], dtype=DT, requires_grad=True)
    W = _newton(log_lam.detach(), p).requires_grad_()

    def val_at(Wt: Tensor) -> Tensor:
        return F.cross_entropy(p["Xv"] @ Wt, p["yv"])

    g, _, sol = hg.implicit_hypergradient(
        lambda: _softmax_train(W, log_lam, p),
        lambda: val_at(W),
        [W],
        [log_lam],
        hg.CG(maxiter=100, tol=1e-13),
    )
    assert sol.status is hg.SolveStatus.CONVERGED
    eps = 1e-5
    fd = torch.empty(3, dtype=DT)
    for j in range(3):
        e = torch.zeros(3, dtype=DT)
        e[j] = eps
        hi = val_at(_newton(log_lam.detach() + e, p))
        lo = val_at(_newton(log_lam.detach() - e, p))
        fd[j] = (hi - lo) / (2 * eps)
    assert float(fd.abs().max()) > 1e-3
    torch.testing.assert_close(g[0], fd, rtol=1e-6, atol=1e-9)


def test_quadratic_program_with_a_hyperparameter_in_both_losses() -> None:
    """L_T = 1/2 w^T A w - (B lam)^T w, L_V = 1/2 |w - c|^2 + lam^T lam: w* = A^-1 B lam, so
    dL_V/dlam = B^T A^-1 (w* - c) + 2 lam exactly."""
    g = _gen(5)
    M = torch.randn(5, 5, generator=g, dtype=DT)
    A = M @ M.T + 5 * torch.eye(5, dtype=DT)
    B = torch.randn(5, 2, generator=g, dtype=DT)
    c = torch.randn(5, generator=g, dtype=DT)
    lam = torch.randn(2, generator=g, dtype=DT).requires_grad_()
    w_star = torch.linalg.solve(A, B @ lam.detach())
    w = w_star.clone().requires_grad_()
    truth = B.T @ torch.linalg.solve(A, w_star - c) + 2 * lam.detach()
    for solver in (hg.CG(maxiter=20, tol=1e-14), hg.Direct()):
        got, _, _ = hg.implicit_hypergradient(
            lambda: 0.5 * w @ A @ w - (B @ lam) @ w,
            lambda: 0.5 * ((w - c) ** 2).sum() + lam @ lam,
            [w],
            [lam],
            solver,
        )
        torch.testing.assert_close(got[0], truth, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 1. bad collections for implicit_hypergradient


def test_implicit_refuses_a_bare_tensor_as_hparams_or_weights() -> None:
    r = _ridge()
    w = r["w_star"].clone().requires_grad_()
    lam = r["lam"]
    tl = lambda: 0.5 * ((r["X"] @ w - r["y"]) ** 2).sum() + 0.5 * (lam * w**2).sum()  # noqa: E731
    vl = lambda: 0.5 * ((r["Xv"] @ w - r["yv"]) ** 2).sum()  # noqa: E731
    with pytest.raises(
        TypeError, match=r"hparams must be a list of tensors, got a bare tensor of shape \(4,\)"
    ):
        hg.implicit_hypergradient(tl, vl, [w], lam, hg.CG(maxiter=50))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"weights must be a list of tensors, got a bare tensor"):
        hg.implicit_hypergradient(tl, vl, w, [lam], hg.CG(maxiter=50))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"weights .* got a dict: pass list\(weights.values\(\)\)"):
        hg.implicit_hypergradient(tl, vl, {"w": w}, [lam], hg.CG(maxiter=50))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"hparams .* the module Linear: pass list\(hparams.parameters\(\)\)"):
        hg.implicit_hypergradient(tl, vl, [w], nn.Linear(2, 2), hg.CG(maxiter=50))  # type: ignore[arg-type]
    # a generator of tensors is still a collection
    ws, hs = (t for t in [w]), iter([lam])
    g, _, _ = hg.implicit_hypergradient(tl, vl, ws, hs, hg.CG(maxiter=50, tol=1e-14))  # type: ignore[arg-type]
    torch.testing.assert_close(g[0], r["truth"], rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# unrolled_hypergradient: MAML-style inner loops (higher / torchopt functional style)


def _maml_problem() -> dict[str, Tensor]:
    g = _gen(6)
    return {
        "x": torch.randn(12, 3, generator=g, dtype=DT),
        "y": torch.randn(12, generator=g, dtype=DT),
        "xv": torch.randn(10, 3, generator=g, dtype=DT),
        "yv": torch.randn(10, generator=g, dtype=DT),
    }


def _maml_outer(h: Sequence[Tensor], p: dict[str, Tensor]) -> Tensor:
    """Three SGD steps from the meta-initialisation h[0] (3,) with learning rate exp(h[1]) on a
    tanh regression, written by hand with ``create_graph=True``, then the query loss."""
    # (forward mode hands over tensors that do not require grad: the loop differentiates w.r.t. w)
    w = h[0] if h[0].requires_grad else h[0].requires_grad_()
    lr = h[1].exp()
    for _ in range(3):
        loss = ((torch.tanh(p["x"] @ w) - p["y"]) ** 2).mean()
        (gw,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - lr * gw
    return ((torch.tanh(p["xv"] @ w) - p["yv"]) ** 2).mean()


def test_maml_inner_loop_reverse_forward_and_central_differences_agree() -> None:
    p = _maml_problem()
    init = torch.tensor([0.3, -0.2, 0.5], dtype=DT, requires_grad=True)
    log_lr = torch.tensor(-0.4, dtype=DT, requires_grad=True)
    rev, v_rev = hg.unrolled_hypergradient(lambda h: _maml_outer(h, p), [init, log_lr])
    fwd, v_fwd = hg.unrolled_hypergradient(lambda h: _maml_outer(h, p), [init, log_lr], mode="forward")
    torch.testing.assert_close(v_fwd, v_rev, rtol=1e-14, atol=0)
    for a, b in zip(rev, fwd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    eps = 1e-6
    base = [init.detach(), log_lr.detach()]
    for i, t in enumerate(base):
        fd = torch.empty(t.numel(), dtype=DT)
        for j in range(t.numel()):
            e = torch.zeros(t.numel(), dtype=DT)
            e[j] = eps
            e = e.reshape(t.shape)
            hi = [b + e if k == i else b for k, b in enumerate(base)]
            lo = [b - e if k == i else b for k, b in enumerate(base)]
            # the hand-written loop needs w to require grad: give it leaves
            hi = [b.clone().requires_grad_() for b in hi]
            lo = [b.clone().requires_grad_() for b in lo]
            fd[j] = (_maml_outer(hi, p) - _maml_outer(lo, p)).detach() / (2 * eps)
        assert float(fd.abs().max()) > 1e-4
        torch.testing.assert_close(rev[i].reshape(-1), fd, rtol=1e-6, atol=1e-10)
    assert init.grad is None and log_lr.grad is None


def test_forward_mode_names_the_fix_for_a_loop_differentiating_the_hyperparameter() -> None:
    """The natural MAML loop (``w = h[0]``, then ``autograd.grad(loss, w)``) in forward mode
    failed with torch's bare "element 0 of tensors does not require grad"."""
    p = _maml_problem()
    init = torch.tensor([0.3, -0.2, 0.5], dtype=DT, requires_grad=True)

    def outer(h: Sequence[Tensor]) -> Tensor:
        w = h[0]
        (gw,) = torch.autograd.grad(((p["x"] @ w - p["y"]) ** 2).mean(), w, create_graph=True)
        return (((p["xv"] @ (w - 0.1 * gw)) - p["yv"]) ** 2).mean()

    hg.unrolled_hypergradient(outer, [init])  # reverse mode: fine
    with pytest.raises(
        RuntimeError, match=r"does not require grad.*mode='forward'.*h\[0\].requires_grad_\(\)"
    ):
        hg.unrolled_hypergradient(outer, [init], mode="forward")


def test_unrolled_docstring_example_against_the_closed_form() -> None:
    """w_2 = lam (1 - 0.5^2) from w_0 = 0: L_V = w_2^2, dL_V/dlam = 2 lam (3/4)^2."""
    for lam0 in (0.5, -1.3):
        lam = torch.tensor([lam0], dtype=DT, requires_grad=True)

        def outer(h: Sequence[Tensor]) -> Tensor:
            w = torch.zeros(1, dtype=DT)
            for _ in range(2):
                w = w - 0.5 * (w - h[0])
            return (w**2).sum()

        for mode in ("reverse", "forward"):
            g, value = hg.unrolled_hypergradient(outer, [lam], mode=mode)
            torch.testing.assert_close(g[0], torch.tensor([2 * lam0 * 0.75**2], dtype=DT), rtol=1e-14, atol=0)
            torch.testing.assert_close(value, torch.tensor((lam0 * 0.75) ** 2, dtype=DT), rtol=1e-14, atol=0)


# 2. validation of unrolled_hypergradient


def _sq(h: Sequence[Tensor]) -> Tensor:
    return (h[0] ** 2).sum() / 2


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_unrolled_refuses_a_bare_tensor_and_duplicates(mode: str) -> None:
    lam = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    with pytest.raises(
        TypeError, match=r"hparams must be a list of tensors, got a bare tensor of shape \(2,\)"
    ):
        hg.unrolled_hypergradient(_sq, lam, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hparams\[1\] is the same tensor as hparams\[0\]"):
        hg.unrolled_hypergradient(lambda h: _sq(h) + (h[1] ** 2).sum(), [lam, lam], mode=mode)
    with pytest.raises(ValueError, match=r"hparams\[0\] is torch.int64"):
        hg.unrolled_hypergradient(_sq, [torch.tensor([1, 2])], mode=mode)
    with pytest.raises(TypeError, match=r"hparams\[0\] must be a tensor, got float"):
        hg.unrolled_hypergradient(_sq, [1.0], mode=mode)  # type: ignore[list-item]


def test_unrolled_reverse_refuses_a_hyperparameter_without_grad_forward_takes_it() -> None:
    lam = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(ValueError, match=r"hparams\[0\] does not require grad.*mode='forward'"):
        hg.unrolled_hypergradient(_sq, [lam])
    g, _ = hg.unrolled_hypergradient(_sq, [lam], mode="forward")
    torch.testing.assert_close(g[0], lam, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_unrolled_names_a_bad_outer_value(mode: str) -> None:
    lam = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match=r"outer must return a scalar tensor .* got shape \(2,\)"):
        hg.unrolled_hypergradient(lambda h: h[0] * 2, [lam], mode=mode)
    with pytest.raises(TypeError, match=r"outer must return a scalar tensor .* got float"):
        hg.unrolled_hypergradient(lambda h: 3.0, [lam], mode=mode)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"outer must return a real scalar tensor, got torch.complex128"):
        hg.unrolled_hypergradient(lambda h: _sq(h) * 1j, [lam], mode=mode)
    with pytest.raises(ValueError, match=r"mode must be 'reverse' or 'forward', got 'backward'"):
        hg.unrolled_hypergradient(_sq, [lam], mode="backward")
    # a one-element value of shape (1,) is a scalar loss
    g, _ = hg.unrolled_hypergradient(lambda h: _sq(h).reshape(1), [lam], mode=mode)
    torch.testing.assert_close(g[0], lam.detach(), rtol=0, atol=0)


def test_unrolled_forward_mode_on_a_non_contiguous_hyperparameter() -> None:
    """3. a transposed parameter: forward mode crashed in ``.view(-1)``."""
    W = nn.Parameter(torch.randn(3, 2, generator=_gen(7), dtype=DT).t())
    assert not W.is_contiguous()
    target = torch.randn(2, 3, generator=_gen(8), dtype=DT)

    def outer(h: Sequence[Tensor]) -> Tensor:
        w = torch.zeros(2, 3, dtype=DT)
        for _ in range(2):
            w = w - 0.5 * (w - h[0] * target)
        return (w**3).sum()

    rev, _ = hg.unrolled_hypergradient(outer, [W])
    fwd, _ = hg.unrolled_hypergradient(outer, [W], mode="forward")
    w2 = 0.75 * W.detach() * target
    truth = 3 * w2**2 * 0.75 * target
    torch.testing.assert_close(rev[0], truth, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fwd[0], truth, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# log_evidence / log_evidence_bound on plain models


def _full_state(model: nn.Module, prior: nn.Module) -> dict[str, object]:
    return {
        "sd": {k: v.clone() for k, v in model.state_dict().items()},
        "versions": [t._version for t in [*model.parameters(), *model.buffers()]],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in [*model.parameters(), *prior.parameters()]],
        "modes": [m.training for m in model.modules()],
        "prior": {k: v.clone() for k, v in prior.state_dict().items()},
        "rng": torch.get_rng_state(),
    }


def _same_state(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("sd", "prior"):
        da, db = a[key], b[key]
        assert isinstance(da, dict) and isinstance(db, dict)
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), (key, k)
    for key in ("versions", "flags", "grads", "modes"):
        assert a[key] == b[key], key
    assert isinstance(a["rng"], Tensor) and isinstance(b["rng"], Tensor)
    assert torch.equal(a["rng"], b["rng"])


def _marglik_model() -> tuple[nn.Module, hg.hparams.PriorPrecision]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model(torch.randn(8, 3, dtype=DT))  # running statistics
    model.eval()
    model[0].bias.requires_grad_(False)  # a frozen weight
    prior = hg.hparams.PriorPrecision(model, init=1.0).double()
    return model, prior


@pytest.mark.parametrize("which", ["evidence", "bound"])
def test_evidence_leaves_model_prior_and_rng_untouched(which: str) -> None:
    model, prior = _marglik_model()
    x = torch.randn(6, 3, generator=_gen(9), dtype=DT)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    before = _full_state(model, prior)
    if which == "evidence":
        out = hg.log_evidence(model, x, y, prior)
    else:
        out = hg.log_evidence_bound(model, x, y, prior, data_size=60, subset_size=3)
    _same_state(before, _full_state(model, prior))
    assert out.dim() == 0 and out.dtype == DT and torch.isfinite(out)
    assert out.requires_grad  # differentiable w.r.t. the prior's raw tensors
    (g,) = torch.autograd.grad(out, list(prior.parameters()))
    assert torch.isfinite(g).all()
    _same_state(before, _full_state(model, prior))


def test_evidence_of_a_linear_gaussian_model_is_the_closed_form() -> None:
    """At the MAP of Bayesian linear regression the linearised evidence is exact:
    log N(y; 0, sigma^2 I + X X^T / alpha)."""
    g = _gen(10)
    X = torch.randn(7, 3, generator=g, dtype=DT)
    y = torch.randn(7, generator=g, dtype=DT)
    alpha, sigma = 2.0, 0.6
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(
            torch.linalg.solve(X.T @ X / sigma**2 + alpha * torch.eye(3, dtype=DT), X.T @ y / sigma**2)
        )
    prior = hg.hparams.PriorPrecision(model, init=alpha).double()
    cov = sigma**2 * torch.eye(7, dtype=DT) + X @ X.T / alpha
    truth = torch.distributions.MultivariateNormal(torch.zeros(7, dtype=DT), cov).log_prob(y)
    for form in ("ntk", "parametric"):
        got = hg.log_evidence(model, X, y, prior, likelihood="regression", noise=sigma, form=form)
        torch.testing.assert_close(got.detach(), truth, rtol=1e-10, atol=1e-10)
        # d/d log(alpha) at the MAP (envelope theorem: the MAP's own move does not count)
        (d_raw,) = torch.autograd.grad(got, list(prior.parameters()))
        eps = 1e-6
        closed = [
            torch.distributions.MultivariateNormal(
                torch.zeros(7, dtype=DT), sigma**2 * torch.eye(7, dtype=DT) + X @ X.T / (alpha * math.exp(s))
            ).log_prob(y)
            for s in (eps, -eps)
        ]
        fd = (closed[0] - closed[1]) / (2 * eps)
        assert abs(float(fd)) > 1e-3
        torch.testing.assert_close(d_raw.sum(), fd, rtol=1e-7, atol=1e-9)
    model32, prior32 = copy.deepcopy(model).float(), hg.hparams.PriorPrecision(model.float(), init=alpha)
    out32 = hg.log_evidence(model32, X.float(), y.float(), prior32, likelihood="regression", noise=sigma)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double().detach(), truth, rtol=1e-4, atol=1e-4)


def test_evidence_names_inputs_that_are_not_tensors() -> None:
    """4. a list batch failed with "'list' object has no attribute 'dim'"."""
    model, prior = _marglik_model()
    x = torch.randn(6, 3, generator=_gen(11), dtype=DT)
    y = [0, 1, 0, 1, 1, 0]
    with pytest.raises(TypeError, match=r"x must be a tensor, got list"):
        hg.log_evidence(model, x.tolist(), torch.tensor(y), prior)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"y must be a tensor, got list"):
        hg.log_evidence(model, x, y, prior)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"y must be a tensor, got list"):
        hg.log_evidence_bound(model, x, y, prior, data_size=6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid data_size: 6.0"):
        hg.log_evidence_bound(model, x, torch.tensor(y), prior, data_size=6.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 5. grad modes: the pure functions under torch.no_grad() / torch.inference_mode()


def test_pure_functions_under_no_grad_compute_the_true_hypergradient() -> None:
    """Called from an evaluation loop under ``torch.no_grad()``: ``unrolled_hypergradient``
    returned 0 in reverse mode (truth 2 lam (3/4)^2 = 0.5625), ``implicit_hypergradient`` failed
    with "element 0 of tensors does not require grad"."""
    r = _ridge(12)
    w = r["w_star"].clone().requires_grad_()
    lam = r["lam"]
    with torch.no_grad():
        g, _, _ = hg.implicit_hypergradient(
            lambda: 0.5 * ((r["X"] @ w - r["y"]) ** 2).sum() + 0.5 * (lam * w**2).sum(),
            lambda: 0.5 * ((r["Xv"] @ w - r["yv"]) ** 2).sum(),
            [w],
            [lam],
            hg.Direct(),
        )
    torch.testing.assert_close(g[0], r["truth"], rtol=1e-8, atol=1e-10)
    h = torch.tensor([0.5], dtype=DT, requires_grad=True)

    def outer(hs: Sequence[Tensor]) -> Tensor:
        v = torch.zeros(1, dtype=DT)
        for _ in range(2):
            v = v - 0.5 * (v - hs[0])
        return (v**2).sum()

    for mode in ("reverse", "forward"):
        with torch.no_grad():
            gu, _ = hg.unrolled_hypergradient(outer, [h], mode=mode)
        torch.testing.assert_close(gu[0], torch.tensor([0.5625], dtype=DT), rtol=1e-14, atol=0)
    with torch.no_grad():
        hg.unrolled_hypergradient(outer, [h])
        assert not torch.is_grad_enabled()


def test_pure_functions_refuse_inference_mode_by_name() -> None:
    """Under ``torch.inference_mode()`` both modes of ``unrolled_hypergradient`` returned 0."""
    w = torch.tensor([1.0], dtype=DT, requires_grad=True)
    lam = torch.tensor([0.5], dtype=DT, requires_grad=True)
    with torch.inference_mode():
        for mode in ("reverse", "forward"):
            with pytest.raises(
                RuntimeError, match=r"unrolled_hypergradient was called under torch.inference_mode"
            ):
                hg.unrolled_hypergradient(_sq, [lam], mode=mode)
        with pytest.raises(
            RuntimeError, match=r"implicit_hypergradient was called under torch.inference_mode"
        ):
            hg.implicit_hypergradient(
                lambda: 0.5 * ((w - lam) ** 2).sum(), lambda: (w**2).sum(), [w], [lam], hg.CG(maxiter=5)
            )


def test_forward_mode_leaves_the_callers_hyperparameters_alone() -> None:
    """7. forward mode handed ``outer`` the caller's own storage: ``h[0].mul_(2)`` inside doubled
    the caller's hyperparameter once per pass (by 2^3 over 3 entries) and every later pass
    started from the doubled value (hypergradient [8, 16, 32] lam_j for the truth 8 lam_j;
    value 114.56 for 4 |lam|^2 = 7.16)."""
    lam = torch.tensor([0.3, -0.7, 1.1], dtype=DT, requires_grad=True)
    before = lam.detach().clone()

    def outer(h: Sequence[Tensor]) -> Tensor:
        x = h[0]
        x.mul_(2)
        return (x**2).sum()

    g, value = hg.unrolled_hypergradient(outer, [lam], mode="forward")
    assert torch.equal(lam.detach(), before)
    torch.testing.assert_close(g[0], 8 * before, rtol=1e-14, atol=0)
    torch.testing.assert_close(value, (4 * before**2).sum(), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# 8. the same non-contiguous hyperparameter in hg.Unrolled(mode="forward")


class _TransposedPenalty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.rand(3, 2, generator=_gen(13), dtype=DT).t())  # (2, 3), not contiguous


def _pen_train(model: nn.Module, hp: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
    weight, P = model.weight, hp.P
    assert isinstance(weight, Tensor) and isinstance(P, Tensor)
    return ((model(b[0]) - b[1]) ** 2).mean() + (P * weight**2).sum()


def _pen_val(model: nn.Module, hp: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
    return ((model(b[0]) - b[1]) ** 2).mean()


def test_unrolled_forward_mode_on_a_non_contiguous_hyperparameter_matches_central_differences() -> None:
    """``hg.Unrolled(mode="forward")`` crashed in ``.view(-1)`` on a transposed parameter."""
    g = _gen(14)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)) for _ in range(4)
    ]

    def train(P: Tensor | None = None) -> tuple[nn.Module, _TransposedPenalty]:
        torch.manual_seed(1)
        model = nn.Linear(3, 2).double()
        hp = _TransposedPenalty()
        if P is not None:
            with torch.no_grad():
                hp.P.copy_(P)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for b in batches[:3]:
            opt.zero_grad()
            _pen_train(model, hp, b).backward()
            opt.step()
        return model, hp

    grads = {}
    for mode in ("reverse", "forward"):
        torch.manual_seed(1)
        model = nn.Linear(3, 2).double()
        hp = _TransposedPenalty()
        assert not hp.P.is_contiguous()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hopt = hg.Unrolled(
            model, hp, _pen_train, _pen_val, inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, mode=mode,
        )  # fmt: skip
        for b in batches[:3]:
            hopt.step(b)
        hopt.hyper_step(val_batch=batches[3])
        assert hp.P.grad is not None
        grads[mode] = hp.P.grad.clone()
    P0 = _TransposedPenalty().P.detach()
    eps = 1e-6
    fd = torch.empty(2, 3, dtype=DT)
    for idx in [(a, c) for a in range(2) for c in range(3)]:
        e = torch.zeros(2, 3, dtype=DT)
        e[idx] = eps
        hi = _pen_val(train(P0 + e)[0], _TransposedPenalty(), batches[3])
        lo = _pen_val(train(P0 - e)[0], _TransposedPenalty(), batches[3])
        fd[idx] = float((hi - lo).detach()) / (2 * eps)
    assert float(fd.abs().max()) > 1e-3
    torch.testing.assert_close(grads["reverse"], fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads["forward"], fd, rtol=1e-6, atol=1e-9)


def test_unrolled_to_convergence_equals_the_implicit_hypergradient() -> None:
    """torchopt's test_implicit compares implicit differentiation with unrolling the inner
    solver to convergence: 100 gradient steps on the ridge problem from w = 0 (step
    2 / (l_min + l_max), contraction 0.61 per step), reverse and forward mode, against the
    closed form that ``implicit_hypergradient`` also matches."""
    r = _ridge(15)
    eig = torch.linalg.eigvalsh(r["H"])
    step = 2.0 / float(eig[0] + eig[-1])

    def outer(h: Sequence[Tensor]) -> Tensor:
        w = torch.zeros(4, dtype=DT)
        for _ in range(100):
            w = w - step * (r["X"].T @ (r["X"] @ w - r["y"]) + h[0] * w)
        return 0.5 * ((r["Xv"] @ w - r["yv"]) ** 2).sum()

    for mode in ("reverse", "forward"):
        g, _ = hg.unrolled_hypergradient(outer, [r["lam"]], mode=mode)
        torch.testing.assert_close(g[0], r["truth"], rtol=1e-7, atol=1e-9)
