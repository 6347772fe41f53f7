"""Regression tests for the core hardening: parameter substitution, ``step()`` parity with plain
PyTorch, disconnected hyperparameters, reassigned buffers, guards, LR schedulers,
``hypergradient()`` and Neumann's step size.

Each test compares with an independent reference (plain ``torch.optim`` training, a closed form in
NumPy, central finite differences) or checks that nothing changed, bit for bit.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import hypergrad as hg
import hypergrad.testing as ht

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def _mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalized(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _make(
    method: str,
    model: nn.Module,
    hp: nn.Module,
    inner: torch.optim.Optimizer,
    *,
    train_loss: Callable[..., torch.Tensor] = _penalized,
    val_loss: Callable[..., torch.Tensor] = _mse,
    outer_lr: float = 0.05,
    **kw: Any,
) -> hg.HyperOptimizer:
    outer = torch.optim.Adam(hp.parameters(), lr=outer_lr)
    common = dict(inner_optimizer=inner, outer_optimizer=outer)
    if method == "implicit":
        kw.setdefault("solver", hg.CG(maxiter=5, damping=0.1))
        return hg.Implicit(model, hp, train_loss, val_loss, **common, **kw)
    if method == "unrolled":
        kw.setdefault("steps", 3)
        return hg.Unrolled(model, hp, train_loss, val_loss, **common, **kw)
    raise AssertionError(method)


def _batches(n: int, x_shape: tuple[int, ...], y_shape: tuple[int, ...], seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(*x_shape, generator=g, dtype=DT), torch.randn(*y_shape, generator=g, dtype=DT))
        for _ in range(n)
    ]


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """What ``hopt.step`` must be equivalent to (``loss`` already computed on ``model``)."""
    opt.zero_grad()
    loss.backward()
    opt.step()


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts / lists / tensors / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path  # NaN == NaN for our purposes


def _everything(hopt: hg.HyperOptimizer) -> dict[str, Any]:
    """All the state a call could change, deep-copied: the full checkpoint (model, hparams, both
    optimisers, method state, counters, RNG), the hyperparameters' and weights' ``.grad``, and the
    optimisers' current param-group settings."""
    return copy.deepcopy(
        {
            "state": hopt.state_dict(),
            "hgrads": [None if p.grad is None else p.grad for p in hopt.hparams.parameters()],
            "wgrads": [None if p.grad is None else p.grad for p in hopt.model.parameters()],
            "lrs": [g["lr"] for g in hopt.inner_optimizer.param_groups],
            "counters": (hopt.inner_steps, hopt.hyper_steps),
        }
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- 1. shared / tied


def _shared_sequential() -> nn.Module:
    proj = nn.Linear(3, 3)
    return nn.Sequential(proj, nn.Tanh(), proj)  # one Linear reached as "0" and as "2"


class _TiedPair(nn.Module):
    """``b.weight`` is ``a.weight``: one parameter stored in two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _assert_params_intact(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every place a parameter is stored still holds an ``nn.Parameter`` the optimiser trains."""
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters(remove_duplicate=False):
        assert isinstance(p, nn.Parameter), f"{name} is a {type(p).__name__}"
        assert id(p) in trained, f"{name} is no longer the tensor the optimiser trains"


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
@pytest.mark.parametrize("make_model", [_shared_sequential, _TiedPair], ids=["shared-module", "tied-weight"])
def test_shared_and_tied_weights_stay_parameters_and_train_like_pytorch(method, make_model) -> None:
    torch.manual_seed(0)
    model = make_model().to(DT)
    ref = copy.deepcopy(model)  # deepcopy keeps the sharing / tying
    if make_model is _TiedPair:
        assert model.a.weight is model.b.weight and ref.a.weight is ref.b.weight
    else:
        assert model[0] is model[2] and ref[0] is ref[2]
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    hopt = _make(method, model, hp, inner)
    batches = _batches(7, (8, 3), (8, 3))
    vb = _batches(1, (8, 3), (8, 3), seed=1)[0]
    for i, b in enumerate(batches):
        hopt.step(b)
        _plain_step(ref, ref_opt, _penalized(ref, hp, b))
        if i in (2, 4):
            hopt.hyper_step(train_batch=b, val_batch=vb)
            _assert_params_intact(model, inner)
            for g in hp.parameters():
                assert g.grad is not None and bool(torch.isfinite(g.grad).all())
    _assert_params_intact(model, inner)
    if make_model is _TiedPair:
        assert model.a.weight is model.b.weight
    else:
        assert model[0] is model[2]
    # the weights kept training, exactly like plain PyTorch with the same (moving) hparams
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n
    # and the optimiser still holds state for them (it was not orphaned by a replaced tensor)
    assert all(len(inner.state[p]) > 0 for p in model.parameters())


class _TwoViews(nn.Module):
    """``y = w . (x0 + x1)``: one Linear applied to two views, reached under two names."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.first = nn.Linear(f, 1, bias=False)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.first(x[:, 0]) + self.second(x[:, 1])).squeeze(-1)


class _TiedViews(nn.Module):
    """``y = w . (x0 + x1)``: two Linears that share their weight."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.first = nn.Linear(f, 1, bias=False)
        self.second = nn.Linear(f, 1, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.first(x[:, 0]) + self.second(x[:, 1])).squeeze(-1)


@pytest.mark.parametrize("cls", [_TwoViews, _TiedViews], ids=["shared-module", "tied-weight"])
def test_implicit_hypergradient_through_shared_weight_matches_closed_form(cls) -> None:
    """Ridge regression on ``x0 + x1`` written with a shared / tied linear layer, trained to
    convergence by ``hopt.step``: the IFT hypergradient equals the NumPy closed form and central
    finite differences of the closed-form outer objective."""
    f, n, nv = 4, 40, 30
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, f, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    xv = torch.randn(nv, 2, f, generator=g, dtype=DT)
    yv = torch.randn(nv, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = cls(f).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)
    assert [n for n, _ in model.named_parameters()] == ["first.weight"]

    def half_mse(m, h, b):
        return 0.5 * ((m(b[0]) - b[1]) ** 2).mean()

    hopt = hg.Implicit(
        model,
        hp,
        lambda m, h, b: half_mse(m, h, b) + h.penalty(m),
        half_mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.CG(maxiter=50, tol=1e-14),
    )
    xs, xvs = (x[:, 0] + x[:, 1]).numpy(), (xv[:, 0] + xv[:, 1]).numpy()
    yn, yvn = y.numpy(), yv.numpy()

    def closed_form() -> tuple[np.ndarray, np.ndarray, float]:
        d = hp.raw[0].detach().exp().reshape(-1).numpy()
        h_mat = xs.T @ xs / n + np.diag(d)
        w = np.linalg.solve(h_mat, xs.T @ yn / n)
        gv = xvs.T @ (xvs @ w - yvn) / nv
        return w, -w * np.linalg.solve(h_mat, gv) * d, float(0.5 * np.mean((xvs @ w - yvn) ** 2))

    w_star, exact, _ = closed_form()
    lr = 1.0 / float(np.linalg.eigvalsh(xs.T @ xs / n).max() + 0.1)
    hopt.inner_optimizer.param_groups[0]["lr"] = lr
    for _ in range(400):
        hopt.step((x, y))
    w = model.first.weight.detach().reshape(-1).numpy()
    assert np.abs(w - w_star).max() < 1e-10  # converged, through the shared module
    assert isinstance(model.second.weight, nn.Parameter) and model.second.weight is model.first.weight
    info = hopt.hyper_step(train_batch=(x, y), val_batch=(xv, yv))
    got = hp.raw[0].grad
    assert got is not None and info.solver_status == hg.SolveStatus.CONVERGED
    assert _rel(got.reshape(-1), torch.from_numpy(exact)) < 1e-8
    fd = ht.central_difference(lambda: closed_form()[2], hp.raw[0], eps=1e-6)
    assert _rel(got, fd) < 1e-6
    assert model.first.weight is model.second.weight and isinstance(model.first.weight, nn.Parameter)


class _SharedBatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.net = nn.Sequential(block, nn.Tanh(), block, nn.Tanh(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_batchnorm_in_a_shared_block_follows_real_steps_only(method) -> None:
    torch.manual_seed(0)
    model = _SharedBatchNormNet().to(DT)
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    hopt = _make(method, model, hp, inner)
    batches = _batches(4, (16, 3), (16, 2))
    vb = _batches(1, (16, 3), (16, 2), seed=5)[0]
    for b in batches[:3]:
        hopt.step(b)
        _plain_step(ref, ref_opt, _penalized(ref, hp, b))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    _assert_same(stats, ref.state_dict(), "after 3 steps")  # weights and running stats, bitwise
    assert int(stats["net.0.1.num_batches_tracked"]) == 6  # two forwards through the block per step
    hopt.hyper_step(train_batch=batches[3], val_batch=vb)
    _assert_same(stats, model.state_dict(), "after the hyperstep")
    assert model.training
    hopt.step(batches[3])
    _plain_step(ref, ref_opt, _penalized(ref, hp, batches[3]))
    _assert_same(ref.state_dict(), model.state_dict(), "after a 4th step")
    _assert_params_intact(model, inner)


# ----------------------------------------------------------------------------- 2. step() == PyTorch


class _WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.spare = nn.Linear(3, 1)  # never reached by the loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x).squeeze(-1)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_unreached_weight_keeps_no_grad_and_does_not_move_under_adam_weight_decay(method) -> None:
    torch.manual_seed(0)
    model = _WithSpare().to(DT)
    spare0 = [p.detach().clone() for p in model.spare.parameters()]
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2, include=lambda n: n.startswith("used"))
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    hopt = _make(method, model, hp, inner)
    sentinels = [torch.full_like(p, 7.0) for p in hp.parameters()]
    for p, s in zip(hp.parameters(), sentinels, strict=True):
        p.grad = s
    batches = _batches(4, (8, 3), (8,))
    for b in batches[:3]:
        hopt.step(b)
        assert model.spare.weight.grad is None and model.spare.bias.grad is None
        assert model.used.weight.grad is not None
        for p, s in zip(hp.parameters(), sentinels, strict=True):  # step() leaves hparams' .grad alone
            assert p.grad is s and bool((s == 7.0).all())
    for p, p0 in zip(model.spare.parameters(), spare0, strict=True):
        assert torch.equal(p, p0)  # torch.optim skips weights with .grad None, weight decay or not
        assert p not in inner.state or not inner.state[p]
    if isinstance(hopt, hg.Unrolled):  # the replay (same hparams) skips them too
        for w, r in zip(model.parameters(), hopt.replayed_weights(), strict=True):
            assert torch.allclose(w, r, rtol=1e-12, atol=1e-14)
    hopt.hyper_step(train_batch=batches[3], val_batch=batches[3])
    hopt.step(batches[3])
    for p, p0 in zip(model.spare.parameters(), spare0, strict=True):
        assert torch.equal(p, p0)


class _Optional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.extra = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h).squeeze(-1)


def _optional_mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0], b[2]) - b[1]) ** 2).mean()


def _optional_train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _optional_mse(m, h, b) + h.penalty(m)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_layer_used_on_some_steps_trains_exactly_like_pytorch_adam(method) -> None:
    torch.manual_seed(0)
    model = _Optional().to(DT)
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2, include=lambda n: not n.startswith("extra"))
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    extra_kw = {"steps": 4} if method == "unrolled" else {}
    hopt = _make(
        method, model, hp, inner, train_loss=_optional_train, val_loss=_optional_mse, outer_lr=0.0, **extra_kw
    )
    raw = _batches(10, (8, 3), (8,))
    batches = [(x, y, i % 3 == 0) for i, (x, y) in enumerate(raw)]  # extra on steps 0, 3, 6, 9
    for i, b in enumerate(batches):
        hopt.step(b)
        _plain_step(ref, ref_opt, _optional_train(ref, hp, b))
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
        if i == 7:
            hopt.hyper_step(train_batch=b, val_batch=batches[0])
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n  # bitwise
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        st, rst = inner.state[p], ref_opt.state[q]
        assert float(st["step"]) == float(rst["step"])  # extra: 4 Adam steps, not 10
    assert float(inner.state[model.extra.weight]["step"]) == 4
    if isinstance(hopt, hg.Unrolled):
        for w, r in zip(model.parameters(), hopt.replayed_weights(), strict=True):
            assert torch.allclose(w, r, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- 3. disconnected


def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))


def _cast_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    """``drop`` enters as a Python float (``float()``): no gradient path from it."""
    out = m(b[0]).squeeze(-1)
    with warnings.catch_warnings():  # torch's own (warn-once) note about float() on a grad tensor
        warnings.filterwarnings(
            "ignore", message="Converting a tensor with requires_grad", category=UserWarning
        )
        factor = 1.0 + float(h["drop"]())
    return ((out - b[1]) ** 2).mean() * factor + h["decay"].penalty(m)


def _dropout_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    """``drop`` only reaches ``F.dropout(p=...)``, which takes a Python float (``.item()``)."""
    hidden = torch.tanh(m[0](b[0]))
    hidden = nn.functional.dropout(hidden, p=h["drop"]().item(), training=True)
    return ((m[2](hidden).squeeze(-1) - b[1]) ** 2).mean() + h["decay"].penalty(m)


def _val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


@pytest.mark.parametrize(
    "method,make_kw",
    [
        ("implicit", lambda: {"solver": hg.Neumann(steps=3)}),
        ("implicit", lambda: {"solver": hg.CG(maxiter=4, damping=0.1)}),
        ("implicit", lambda: {"solver": hg.Identity()}),
        ("unrolled", lambda: {"steps": 2, "mode": "reverse"}),
    ],
    ids=["implicit-neumann", "implicit-cg", "implicit-identity", "unrolled-reverse"],
)
@pytest.mark.parametrize("loss", [_cast_loss, _dropout_loss], ids=["float-cast", "dropout-p"])
def test_disconnected_hyperparameter_warns_once_naming_it(method, make_kw, loss) -> None:
    torch.manual_seed(0)
    model = _dropout_net().to(DT)
    hp = nn.ModuleDict(
        {
            "decay": hg.hparams.WeightDecay(model, per="global", init=1e-2),
            "drop": hg.hparams.Hparam(0.2, "unit", dtype=DT),
        }
    )
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    hopt = _make(method, model, hp, inner, train_loss=loss, val_loss=_val, **make_kw())
    batches = _batches(4, (8, 3), (8,))
    hopt.step(batches[0])
    hopt.step(batches[1])
    with pytest.warns(hg.DisconnectedWarning) as record:
        hopt.hyper_step(train_batch=batches[1], val_batch=batches[2])
    assert len(record) == 1, [str(r.message) for r in record]
    msg = str(record[0].message)
    assert "'drop.raw'" in msg and "decay" not in msg
    assert torch.equal(hp["drop"].raw.grad, torch.zeros_like(hp["drop"].raw))
    assert float(hp["decay"].raw[0].grad.abs()) > 0  # the connected one has a real hypergradient
    hopt.step(batches[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second hyperstep is silent
        hopt.hyper_step(train_batch=batches[3], val_batch=batches[2])
        hopt.hypergradient(train_batch=batches[3], val_batch=batches[2])


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_connected_hyperparameters_do_not_warn(method) -> None:
    torch.manual_seed(0)
    model = _dropout_net().to(DT)
    hp = nn.ModuleDict(
        {
            "decay": hg.hparams.WeightDecay(model, per="global", init=1e-2),
            "scale": hg.hparams.Hparam(1.0, "positive", dtype=DT),
        }
    )

    def loss(m, h, b):
        return _val(m, h, b) * h["scale"]() + h["decay"].penalty(m)

    hopt = _make(
        method, model, hp, torch.optim.SGD(model.parameters(), lr=0.05), train_loss=loss, val_loss=_val
    )
    batches = _batches(3, (8, 3), (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hopt.step(batches[0])
        hopt.hyper_step(train_batch=batches[0], val_batch=batches[1])
    assert all(float(p.grad.abs().sum()) > 0 for p in hp.parameters())


# ----------------------------------------------------------------------------- 4. reassigned buffers


class _Centering(nn.Module):
    """Reassigns (not updates in place) two registered buffers in every training forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
            self.count = self.count + 1
        return self.lin(x - self.mean).squeeze(-1)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_reassigned_buffers_follow_real_steps_like_pytorch(method) -> None:
    torch.manual_seed(0)
    model = _Centering().to(DT)
    ref = copy.deepcopy(model)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    inner = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.02, momentum=0.9)
    hopt = _make(method, model, hp, inner)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DT) + 5.0, torch.randn(8, generator=g, dtype=DT))
        for _ in range(4)
    ]
    for b in batches[:3]:
        hopt.step(b)
        _plain_step(ref, ref_opt, _penalized(ref, hp, b))
    assert int(model.count) == 3 and float(model.mean.abs().min()) > 1.0
    _assert_same(ref.state_dict(), model.state_dict(), "after 3 steps")  # buffers and weights, bitwise
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hg.NonFiniteError):  # a refused step puts the reassigned buffers back
        hopt.step(_nan(batches[3]))
    _assert_same(before, model.state_dict(), "after a refused step")
    hopt.hyper_step(train_batch=batches[3], val_batch=batches[3])
    hopt.hypergradient(train_batch=batches[3], val_batch=batches[3])
    _assert_same(before, model.state_dict(), "after a hyperstep")
    hopt.step(batches[3])
    _plain_step(ref, ref_opt, _penalized(ref, hp, batches[3]))
    _assert_same(ref.state_dict(), model.state_dict(), "after a 4th step")


# ----------------------------------------------------------------------------- 5. guards


def _nan(b: Any) -> Any:
    x = b[0].clone()
    x[0, 0] = float("nan")
    return (x, *b[1:])


def test_refused_step_does_not_write_the_tuned_learning_rate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr = hg.hparams.LearningRate(inner)
    hopt = hg.Unrolled(
        model,
        lr,
        _mse,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.5),
        steps=2,
    )
    batches = _batches(3, (8, 3), (8, 1))
    hopt.step(batches[0])
    hopt.step(batches[1])
    hopt.hyper_step(val_batch=batches[2])  # the tuned lr moves; it is written at the next good step
    written = inner.param_groups[0]["lr"]  # 0.1 (to rounding), written by the last good step
    assert written == pytest.approx(0.1, rel=1e-12) and float(lr.value) != pytest.approx(0.1, rel=1e-3)
    before = _everything(hopt)
    with pytest.raises(hg.NonFiniteError, match="untouched"):
        hopt.step(_nan(batches[2]))
    assert inner.param_groups[0]["lr"] == written
    _assert_same(before, _everything(hopt), "after a refused step")
    hopt.step(batches[2])
    assert inner.param_groups[0]["lr"] == float(lr.value)


def _two_group_sgd(model: nn.Module) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 0.01}], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("broken", ["optimizer-groups", "model-shape"])
@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_load_state_dict_is_atomic(method, broken) -> None:
    def build(seed: int, two_groups: bool = False) -> hg.HyperOptimizer:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        inner = (
            _two_group_sgd(model) if two_groups else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        )
        hopt = _make(method, model, hp, inner)
        batches = _batches(3, (8, 3), (8, 1), seed=seed)
        for b in batches:
            hopt.step(b)
        hopt.hyper_step(train_batch=batches[0], val_batch=batches[1])
        return hopt

    target = build(0)
    if broken == "optimizer-groups":  # model and hparams load fine, then the inner optimiser fails
        bad, error, match = build(1, two_groups=True).state_dict(), ValueError, "parameter groups"
    else:  # torch copies the matching tensors, then raises for the one of another shape
        bad, error, match = build(1).state_dict(), RuntimeError, "size mismatch"
        bad["model"]["3.weight"] = torch.zeros(2, 4, dtype=DT)
    before = _everything(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(bad)
    _assert_same(before, _everything(target), "after a failed load")
    # still usable (no spurious episode change for Unrolled), and a compatible state still loads
    b = _batches(1, (8, 3), (8, 1), seed=7)[0]
    target.step(b)
    target.hyper_step(train_batch=b, val_batch=b)
    good = build(2)
    target.load_state_dict(good.state_dict())
    _assert_same(_everything(good)["state"], target.state_dict(), "after a good load")


def test_float16_large_finite_gradients_are_accepted_and_inf_still_refused() -> None:
    torch.manual_seed(0)
    h16 = torch.float16
    model = nn.Linear(64, 64).to(h16)
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2)

    def loss(m, h, b):
        return 1e3 * (m(b[0]) * b[1]).mean() + h.penalty(m)

    hopt = hg.Implicit(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=1e-7),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    x, y = torch.full((32, 64), 100.0, dtype=h16), torch.ones(32, 64, dtype=h16)
    grad = torch.autograd.grad(loss(model, hp, (x, y)), model.weight)[0]
    assert bool(torch.isfinite(grad).all()) and float(grad.float().norm()) > 65504  # the premise
    w0 = model.weight.detach().clone()
    value = hopt.step((x, y))
    assert bool(torch.isfinite(value)) and hopt.inner_steps == 1
    assert not torch.equal(model.weight, w0)
    before = copy.deepcopy(model.state_dict())
    x_inf = x.clone()
    x_inf[3, 5] = float("inf")
    with pytest.raises(hg.NonFiniteError):
        hopt.step((x_inf, y))
    _assert_same(before, model.state_dict(), "after a refused fp16 step")
    assert hopt.inner_steps == 1


class _LossReached(Exception):
    """Raised by a loss, to show the batch got past hypergrad's own checks."""


def test_integer_tensors_on_another_device_pass_the_batch_check_and_floats_do_not() -> None:
    # a model on the meta device; PyTorch wants PackedSequence.batch_sizes and lengths on the CPU
    model = nn.Linear(3, 2).to(DT).to("meta")
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2)

    def reached(m, h, b):
        raise _LossReached

    hopt = hg.Implicit(
        model,
        hp,
        reached,
        reached,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    lengths = torch.tensor([3, 2], dtype=torch.int64)  # CPU
    packed = PackedSequence(torch.empty(5, 3, dtype=DT, device="meta"), torch.tensor([2, 2, 1]))
    assert packed.batch_sizes.device.type == "cpu"
    for batch in ((torch.empty(2, 3, 3, dtype=DT, device="meta"), lengths), (packed, lengths)):
        with pytest.raises(_LossReached):
            hopt.step(batch)
        with pytest.raises(_LossReached):
            hopt.hypergradient(train_batch=batch, val_batch=batch)
    # a float tensor on another device is still refused, naming the device
    with pytest.raises(ValueError, match="device cpu"):
        hopt.step((torch.zeros(2, 3, dtype=DT), lengths))
    assert hopt.inner_steps == 0


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        _, h = self.rnn(packed)
        return self.head(h[-1]).squeeze(-1)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_packed_sequence_batches_train_and_give_hypergradients(method) -> None:
    torch.manual_seed(0)
    model = _Packed().to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2)
    hopt = _make(method, model, hp, torch.optim.SGD(model.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[PackedSequence, torch.Tensor]:
        x = torch.randn(4, 5, 3, generator=g, dtype=DT)
        lengths = torch.tensor([5, 3, 4, 2])  # int64 on the CPU, as pack_padded_sequence wants
        return (
            pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),
            torch.randn(4, generator=g, dtype=DT),
        )

    batches = [batch() for _ in range(3)]
    for b in batches:
        hopt.step(b)
    info = hopt.hyper_step(train_batch=batches[0], val_batch=batches[1])
    assert math.isfinite(info.hypergrad_norm) and info.hypergrad_norm > 0


def test_lbfgs_and_boolean_steps_are_refused_at_construction() -> None:
    model = nn.Linear(3, 1).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2)
    lbfgs = torch.optim.LBFGS(model.parameters())
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    for cls in (hg.Implicit, hg.Unrolled):
        with pytest.raises(TypeError, match="inner_optimizer is LBFGS"):
            cls(model, hp, _penalized, _mse, inner_optimizer=lbfgs, outer_optimizer=outer)
    with pytest.raises(TypeError, match="outer_optimizer is LBFGS"):
        hg.Implicit(
            model,
            hp,
            _penalized,
            _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.LBFGS(hp.parameters()),
        )
    for steps in (True, False):
        with pytest.raises(ValueError, match="Invalid Unrolled steps"):
            hg.Unrolled(
                model,
                hp,
                _penalized,
                _mse,
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                outer_optimizer=outer,
                steps=steps,
            )


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_divergence_guard_refuses_an_exploding_loss_and_changes_nothing(method) -> None:
    def build(divergence: float | None) -> hg.HyperOptimizer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
        return _make(method, model, hp, torch.optim.SGD(model.parameters(), lr=0.01), divergence=divergence)

    batches = _batches(3, (8, 3), (8, 1))
    x, y = batches[2]
    exploding = (x, y * 1e3)  # the loss grows by ~1e5-1e6: far past 100x the first one
    guarded, free = build(100), build(None)
    for hopt in (guarded, free):
        hopt.step(batches[0])
        hopt.step(batches[1])
    first = float(_mse(guarded.model, guarded.hparams, batches[0]))
    assert float(_mse(guarded.model, guarded.hparams, exploding)) > 100 * first  # the premise
    before = _everything(guarded)
    with pytest.raises(hg.NonFiniteError, match="divergence"):
        guarded.step(exploding)
    _assert_same(before, _everything(guarded), "after a diverged step")
    if method == "implicit":  # a hyperstep whose training batch explodes is refused too
        with pytest.raises(hg.NonFiniteError, match="divergence"):
            guarded.hyper_step(train_batch=exploding, val_batch=batches[0])
        _assert_same(before, _everything(guarded), "after a diverged hyperstep")
    free.step(exploding)  # with the option off the same step is taken
    assert free.inner_steps == 3
    guarded.step(batches[2])  # and a normal step still goes through
    assert guarded.inner_steps == 3
    with pytest.raises(ValueError, match="divergence"):
        build(1.0)


# ----------------------------------------------------------------------------- 6. LR schedulers


def _small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_absolute_learning_rate_with_a_scheduler_raises_at_the_next_step() -> None:
    torch.manual_seed(0)
    model = _small_mlp().to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = hg.hparams.LearningRate(inner)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    hopt = hg.Unrolled(
        model, lr, _mse, _mse, inner_optimizer=inner, outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.1)
    )
    batches = _batches(2, (8, 3), (8, 1))
    hopt.step(batches[0])
    sched.step()  # lr 0.1 -> 0.05 behind hypergrad's back
    scheduled = sched.get_last_lr()[0]
    assert scheduled == pytest.approx(0.05, rel=1e-12)
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"relative=True"):
        hopt.step(batches[1])
    assert inner.param_groups[0]["lr"] == scheduled  # not silently overridden
    for p, q in zip(model.parameters(), w, strict=True):
        assert torch.equal(p, q)


def test_relative_learning_rate_multiplies_the_scheduled_rate() -> None:
    torch.manual_seed(0)
    model = _small_mlp().to(DT)
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
    mult = hg.hparams.LearningRate(inner, init=1.5, relative=True)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    hopt = hg.Unrolled(
        model,
        mult,
        _mse,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(mult.parameters(), lr=0.0),
        steps=4,
    )
    batches = _batches(5, (8, 3), (8, 1))
    m = float(mult.value[0])
    for k, b in enumerate(batches[:4]):
        scheduled = inner.param_groups[0]["lr"]
        assert scheduled == 0.2 * 0.5**k
        hopt.step(b)
        assert inner.param_groups[0]["lr"] == scheduled  # the multiplier is taken off again
        ref_opt.param_groups[0]["lr"] = scheduled * m
        _plain_step(ref, ref_opt, _mse(ref, mult, b))
        sched.step()
        assert inner.param_groups[0]["lr"] == sched.get_last_lr()[0] == 0.2 * 0.5 ** (k + 1)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)

    # Unrolled's hypergradient w.r.t. the (raw log-)multiplier vs central differences of the
    # same 4 scheduled SGD steps from the same start
    vb = batches[4]
    grads, _ = hopt.hypergradient(val_batch=vb)

    def unrolled_val_loss() -> float:
        net = copy.deepcopy(start)
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
        factor = float(mult.raw.detach().exp()[0])
        for k, b in enumerate(batches[:4]):
            opt.param_groups[0]["lr"] = 0.2 * 0.5**k * factor
            _plain_step(net, opt, _mse(net, mult, b))
        with torch.no_grad():
            return float(_mse(net, mult, vb))

    fd = ht.central_difference(unrolled_val_loss, mult.raw, eps=1e-6)
    assert float(fd.abs().max()) > 1e-4  # the premise: the loss depends on the multiplier
    assert _rel(grads[0], fd) < 1e-6


# ----------------------------------------------------------------------------- 7. hypergradient()


@pytest.mark.parametrize(
    "method,make_kw",
    [
        ("implicit", lambda: {"solver": hg.CG(maxiter=3, warm_start=True)}),
        ("implicit", lambda: {"solver": hg.Neumann(steps=3)}),
        ("unrolled", lambda: {"steps": 3}),
        ("unrolled", lambda: {"steps": 2, "mode": "forward"}),
    ],
    ids=["implicit-cg-warm", "implicit-neumann-power", "unrolled-reverse", "unrolled-forward"],
)
def test_hypergradient_equals_hyper_step_and_changes_nothing(method, make_kw) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)  # Neumann: alpha by power iteration
    hopt = _make(method, model, hp, inner, **make_kw())
    batches = _batches(6, (8, 3), (8, 1))
    vb = _batches(1, (8, 3), (8, 1), seed=9)[0]
    for b in batches[:3]:
        hopt.step(b)
    hopt.hyper_step(train_batch=batches[2], val_batch=vb)  # warm start / power estimate exist now
    for b in batches[3:]:
        hopt.step(b)
    for p in hp.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = _everything(hopt)
    grads, info = hopt.hypergradient(train_batch=batches[5], val_batch=vb)
    _assert_same(before, _everything(hopt), "after hypergradient()")
    assert isinstance(info, hg.HyperStepInfo) and not info.skipped and info.hyper_steps == 1
    assert len(grads) == len(list(hp.parameters()))
    step_info = hopt.hyper_step(train_batch=batches[5], val_batch=vb)
    for g, p in zip(grads, hp.parameters(), strict=True):
        assert p.grad is not None and torch.equal(g, p.grad)
    assert (info.outer_loss, info.hypergrad_norm) == (step_info.outer_loss, step_info.hypergrad_norm)
    assert (info.solver_iterations, info.solver_status) == (
        step_info.solver_iterations,
        step_info.solver_status,
    )
    if method == "implicit":
        assert info.solver_status in {s.value for s in hg.SolveStatus}
        assert info.solver_residual == step_info.solver_residual


def _ridge_cg_warm(outer_lr: float = 0.0) -> tuple[ht.BilevelProblem, hg.Implicit]:
    p = ht.ridge()
    p.solve_inner()
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(p.hparams.parameters(), lr=outer_lr),
        solver=hg.CG(maxiter=3, warm_start=True, tol=1e-14),
    )
    return p, hopt


def test_hypergradient_does_not_advance_the_warm_start() -> None:
    results = []
    for peek in (False, True):
        p, hopt = _ridge_cg_warm(outer_lr=0.05)
        out = []
        for k in range(3):
            if peek and k == 1:
                hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
                hopt.hypergradient(train_batch=p.val_batch, val_batch=p.train_batch)
            info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
            out.append((p.hparams.raw[0].grad.clone(), info.solver_residual, info.solver_iterations))
        results.append((out, p.hparams.raw[0].detach().clone()))
    (a, ha), (b, hb) = results
    assert torch.equal(ha, hb)
    for (ga, ra, ia), (gb, rb, ib) in zip(a, b, strict=True):
        assert torch.equal(ga, gb) and ra == rb and ia == ib


def test_warm_start_is_used_and_matches_a_manual_x0() -> None:
    p, hopt = _ridge_cg_warm()
    tb, vb = p.train_batch, p.val_batch
    first = hopt.hyper_step(train_batch=tb, val_batch=vb)
    g1 = p.hparams.raw[0].grad.clone()
    second = hopt.hyper_step(train_batch=tb, val_batch=vb)
    g2 = p.hparams.raw[0].grad.clone()
    assert first.solver_status == second.solver_status == hg.SolveStatus.MAX_ITERATIONS
    assert first.solver_residual is not None and second.solver_residual is not None
    assert second.solver_residual < 0.5 * first.solver_residual  # cold vs warm, same maxiter, same system

    weights, hps = list(p.model.parameters()), list(p.hparams.parameters())

    def lt() -> torch.Tensor:
        return p.train_loss(p.model, p.hparams, tb)

    def lv() -> torch.Tensor:
        return p.val_loss(p.model, p.hparams, vb)

    cg = hg.CG(maxiter=3, tol=1e-14)
    m1, _, s1 = hg.implicit_hypergradient(lt, lv, weights, hps, cg)
    m2, _, s2 = hg.implicit_hypergradient(lt, lv, weights, hps, cg, x0=s1.solution)
    assert torch.allclose(g1, m1[0], rtol=1e-12, atol=0) and torch.allclose(g2, m2[0], rtol=1e-12, atol=0)
    assert second.solver_residual == pytest.approx(float(s2.residual), rel=1e-9)
    assert second.solver_iterations == s2.iterations == 3
    # and the warm start brings the hypergradient closer to the exact one
    exact = p.exact_hypergradient()[0]
    assert _rel(g2, exact) < _rel(g1, exact)


# ----------------------------------------------------------------------------- 8. Neumann step size


@pytest.mark.parametrize("make", [ht.ridge, ht.quadratic])
def test_neumann_with_adam_uses_power_iteration_and_is_accurate(make) -> None:
    p = make()
    p.solve_inner()
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.Adam(p.model.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
        solver=hg.Neumann(steps=50),
    )
    assert hopt.current_solver().alpha is None  # not Adam's lr: to be set by power iteration
    info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    exact = p.exact_hypergradient()[0]
    got = p.hparams.raw[0].grad
    assert got is not None and _cos(got, exact) > 0.99  # alpha = Adam's lr 1e-3: 0.92 (ridge), 0.40
    assert info.solver_iterations == 20 + 50
    lam_max = float(torch.linalg.eigvalsh(p.hessian()).max())  # alpha: 1 / power-iteration estimate
    alpha = hopt.current_solver().alpha
    assert isinstance(alpha, float) and 1.0 / lam_max <= alpha < 1.2 / lam_max
    info2 = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert info2.solver_iterations == 50  # the estimate is reused


def test_neumann_refreshes_a_step_size_the_curvature_outgrew() -> None:
    """Curvature grows during training (progressive sharpening) faster than the power-iteration
    estimate is refreshed (every 10 hypersteps): a series blowing up by more than 2 per term
    re-estimates lambda_max at once and solves again (the README's digits example had Neumann
    residuals of ~2500 a few hypersteps in), giving the hypergradient a fresh estimate gives."""
    p = ht.ridge()
    p.solve_inner()
    scale = [1.0]

    def train(m, h, b):  # the data term's curvature times scale[0]
        return scale[0] * _mse_of(p, m, h, b) + h.penalty(m)

    def make() -> hg.Implicit:
        return hg.Implicit(
            p.model,
            p.hparams,
            train,
            p.val_loss,
            inner_optimizer=torch.optim.Adam(p.model.parameters(), lr=1e-3),
            outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
            solver=hg.Neumann(steps=30),
        )

    hopt = make()
    first = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert first.solver_iterations == 20 + 30 and first.solver_status == "fixed"
    scale[0] = 25.0  # the estimate is now 25x too small: alpha * lambda_max ~ 25
    info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    got = p.hparams.raw[0].grad.clone()
    assert info.solver_status == "fixed" and info.solver_residual < 1.0
    assert info.solver_iterations == 30 + 20 + 30  # the blown-up solve, the refresh, the solve
    fresh = make()  # a first estimate at the new curvature
    fresh.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    torch.testing.assert_close(got, p.hparams.raw[0].grad, rtol=0.05, atol=0.0)
    again = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert again.solver_iterations == 30  # the refreshed estimate is kept


def _mse_of(p, m, h, b) -> torch.Tensor:
    """The ridge problem's data term (its train loss without the penalty)."""
    return p.train_loss(m, h, b) - h.penalty(m)


def test_neumann_alpha_lr_with_adam_warns_once() -> None:
    p = ht.ridge()
    p.solve_inner()
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.Adam(p.model.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
        solver=hg.Neumann(steps=3, alpha="lr"),
    )
    with pytest.warns(UserWarning, match="alpha='lr'") as record:
        info = hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert len(record) == 1 and "Adam" in str(record[0].message)
    assert info.solver_iterations == 3  # no power iteration
    assert hopt.current_solver().alpha == 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)


def test_neumann_default_alpha_is_the_lr_only_for_plain_sgd() -> None:
    p = ht.ridge()
    p.solve_inner()

    def build(inner: torch.optim.Optimizer) -> hg.Implicit:
        return hg.Implicit(
            p.model,
            p.hparams,
            p.train_loss,
            p.val_loss,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.0),
            solver=hg.Neumann(steps=4),
        )

    plain = build(torch.optim.SGD(p.model.parameters(), lr=0.07))
    assert plain.current_solver().alpha == 0.07
    assert plain.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch).solver_iterations == 4
    heavy = build(torch.optim.SGD(p.model.parameters(), lr=0.07, momentum=0.9))
    assert heavy.current_solver().alpha is None
    assert heavy.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch).solver_iterations == 24
    for bad in ("bogus", "LR", 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="Invalid Neumann alpha"):
            hg.Neumann(alpha=bad)


# ----------------------------------------------------------------------------- known library bugs


def test_step_refused_by_a_scheduled_absolute_learning_rate_is_not_replayed() -> None:
    torch.manual_seed(0)
    model = _small_mlp().to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = hg.hparams.LearningRate(inner)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    hopt = hg.Unrolled(
        model,
        lr,
        _mse,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.1),
        steps=5,
    )
    b = _batches(1, (8, 3), (8, 1))[0]
    hopt.step(b)
    sched.step()
    with pytest.raises(ValueError, match="relative=True"):
        hopt.step(b)
    assert hopt.inner_steps == 1
    for w, r in zip(model.parameters(), hopt.replayed_weights(), strict=True):
        assert torch.allclose(w, r, rtol=1e-12, atol=1e-14)
    assert hopt.hyper_step(val_batch=b).unrolled_steps == 1


def test_absolute_learning_rate_survives_rolling_back_to_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = _small_mlp().to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = hg.hparams.LearningRate(inner)
    hopt = hg.Unrolled(
        model,
        lr,
        _mse,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.5),
        steps=2,
    )
    b = _batches(1, (8, 3), (8, 1))[0]
    hopt.step(b)
    checkpoint = copy.deepcopy(hopt.state_dict())
    hopt.hyper_step(val_batch=b)
    hopt.step(b)  # writes the moved learning rate
    hopt.load_state_dict(checkpoint)  # roll back (early stopping, a refused outer step, ...)
    hopt.step(b)
    assert inner.param_groups[0]["lr"] == float(lr.value)


def test_unrolled_replays_a_model_with_reassigned_buffers_exactly() -> None:
    torch.manual_seed(0)
    model = _Centering().to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    hopt = _make("unrolled", model, hp, torch.optim.SGD(model.parameters(), lr=0.02), outer_lr=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DT) + 5.0, torch.randn(8, generator=g, dtype=DT))
        for _ in range(3)
    ]
    for b in batches:
        hopt.step(b)
    for w, r in zip(model.parameters(), hopt.replayed_weights(), strict=True):
        assert torch.allclose(w, r, rtol=1e-12, atol=1e-14)


def test_a_training_loss_detached_by_mistake_is_named_not_silently_skipped() -> None:
    """``train_loss`` computed under ``torch.no_grad()`` (or detached): plain PyTorch's
    ``backward()`` raises; hypergrad's step skipped the update without a word, every step. It
    now warns (a constant loss on a batch with nothing to learn is legitimate), and the weights
    and the optimiser's state are untouched."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def detached(m: torch.nn.Module, h: torch.nn.Module, b: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m(b[0]), b[1]) + h.penalty(m)

    hopt = hg.Implicit(
        model,
        hp,
        detached,
        detached,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    with pytest.warns(
        hg.DisconnectedWarning, match=r"Implicit.step: train_loss returned a loss that does not require grad"
    ):
        hopt.step(batch)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state  # Adam never stepped


def test_a_solver_that_blew_up_is_named_in_the_nonfinite_error():
    from hypergrad import testing

    p = testing.quadratic(dim=6)
    p.solve_inner()
    before = [t.detach().clone() for t in p.hparams.parameters()]
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=torch.optim.SGD(p.model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(p.hparams.parameters(), lr=0.1),
        solver=hg.Neumann(steps=2000, alpha=50.0),  # |1 - alpha lambda| >> 1: the series overflows
    )
    with pytest.raises(hg.NonFiniteError, match="the linear solver said 'nonfinite'"):
        hopt.hyper_step(train_batch=p.train_batch, val_batch=p.val_batch)
    assert all(torch.equal(a, b) for a, b in zip(before, p.hparams.parameters(), strict=True))


def test_a_frozen_part_of_a_hyperparameter_module_is_named_with_what_to_do():
    model = nn.Linear(3, 1)
    augment = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    augment[0].requires_grad_(False)  # a "pretrained encoder" inside the hyperparameter network

    def loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return m(h(b[0])).pow(2).mean()

    with pytest.raises(ValueError, match=r"'0.weight' must be a leaf tensor .*keep it outside hparams"):
        hg.Implicit(
            model,
            augment,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(augment[1].parameters(), lr=0.1),
        )
