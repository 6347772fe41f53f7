"""Hyperparameter containers and hypergradient-descent optimisers, checked the way other libraries'
suites would: torch.optim's complex-parameter and dtype rules, Baydin et al.'s written-out loop,
Lorraine et al.'s per-weight decays. Float64 references, closed forms and central differences."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
import hypergrad.testing as ht
from hypergrad.optim import SGDHD, AdamHD

CDT = torch.complex128
N, DIM = 24, 4


class _ComplexLinear(nn.Module):
    """``x @ w + b``: a complex weight vector and (optionally) a bias of ``bias`` dtype."""

    def __init__(self, bias: torch.dtype | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, dtype=CDT))
        self.b = nn.Parameter(torch.randn((), dtype=bias)) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        out = x @ self.w
        return out if self.b is None else out + self.b


def _mse(r: Tensor) -> Tensor:
    return 0.5 * (r.real.square() + r.imag.square()).mean()


def _data(seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a, y, b, z = (torch.randn(*s, dtype=CDT, generator=g) for s in ((N, DIM), (N,), (N, DIM), (N,)))
    return (a, y), (b, z)


def _train_loss(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
    x, t = batch
    return _mse(m(x) - t) + h.penalty(m)


def _val_loss(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
    x, t = batch
    return _mse(m(x) - t)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# 1. WeightDecay on complex weights: a real decay, penalty d |w|^2


@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
@pytest.mark.parametrize("max_", [None, 1.0])
def test_complex_weight_decay_is_real_and_penalises_the_squared_modulus(per: str, max_: float | None) -> None:
    model = _ComplexLinear(bias=torch.float64)  # a real bias beside the complex weight
    wd = hg.hparams.WeightDecay(model, per=per, init=0.3, max=max_)
    for r in wd.raw:  # a real decay in the weights' real precision, not a complex one
        assert r.dtype == torch.float64
    assert wd.value.dtype == torch.float64
    torch.testing.assert_close(wd.value, torch.full_like(wd.value, 0.3), rtol=1e-14, atol=0)
    pen = wd.penalty(model)
    assert pen.dtype == torch.float64 and pen.dim() == 0
    with torch.no_grad():
        closed = 0.5 * 0.3 * (model.w.abs().square().sum() + model.b.square())
    assert float(pen.detach()) == pytest.approx(float(closed), rel=1e-14)
    gw, gb = torch.autograd.grad(pen, [model.w, model.b])
    torch.testing.assert_close(gw, 0.3 * model.w.detach(), rtol=1e-14, atol=0)  # d * w, as torch's
    torch.testing.assert_close(gb, 0.3 * model.b.detach(), rtol=1e-14, atol=0)


def test_complex_penalty_step_equals_torch_sgd_weight_decay() -> None:
    """SGD on ``loss + penalty`` takes the same step as ``SGD(weight_decay=d)`` on ``loss``: what
    torch.optim does to a complex weight (through its real view)."""
    (a, y), _ = _data(0)
    m1 = _ComplexLinear()
    m2 = _ComplexLinear()
    m2.load_state_dict(m1.state_dict())
    wd = hg.hparams.WeightDecay(m1, per="global", init=0.25)
    opt1 = torch.optim.SGD(m1.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, weight_decay=0.25)
    for _ in range(3):
        opt1.zero_grad()
        opt2.zero_grad()
        (_mse(m1(a) - y) + wd.penalty(m1)).backward()
        _mse(m2(a) - y).backward()
        opt1.step()
        opt2.step()
    torch.testing.assert_close(m1.w, m2.w, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("per", ["global", "parameter"])
def test_complex_weight_decay_implicit_hypergradient_matches_closed_form(per: str) -> None:
    """Complex ridge regression at its optimum: ``w*(d) = (A^H A / n + diag d)^-1 A^H y / n``;
    the exact hypergradient by autograd through the dense solve, and by central differences."""
    train, val = _data(1)
    model = _ComplexLinear()
    wd = hg.hparams.WeightDecay(model, per=per, init=0.3)
    raw = wd.raw[0]
    (a, y), (b, z) = train, val

    def w_star(r: Tensor) -> Tensor:
        h = a.conj().T @ a / N + torch.diag(r.exp().to(CDT).expand(DIM))
        return torch.linalg.solve(h, a.conj().T @ y / N)

    def outer_at(r: Tensor) -> Tensor:
        return _mse(b @ w_star(r) - z)

    leaf = raw.detach().clone().requires_grad_(True)
    exact = torch.autograd.grad(outer_at(leaf), leaf)
    fd = ht.central_difference(lambda: float(outer_at(raw.detach())), raw, eps=1e-6)
    with torch.no_grad():
        model.w.copy_(w_star(raw))
    hopt = hg.Implicit(
        model,
        wd,
        _train_loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.0),
        solver=hg.CG(maxiter=100, tol=1e-14),
    )
    hopt.hyper_step(train_batch=train, val_batch=val)
    assert raw.grad is not None and raw.grad.dtype == torch.float64
    assert _rel(raw.grad, exact[0]) < 1e-9
    assert _rel(raw.grad, fd) < 1e-7


@pytest.mark.parametrize("per", ["global", "parameter"])
def test_complex_weight_decay_unrolled_hypergradient_matches_a_written_out_loop(per: str) -> None:
    """K SGD steps on a complex weight and bias, written out in plain torch; the
    hypergradient of the validation loss after them, by autograd and by central differences."""
    train, val = _data(2)
    model = _ComplexLinear(bias=CDT)
    w0, b0 = model.w.detach().clone(), model.b.detach().clone()  # type: ignore[union-attr]
    wd = hg.hparams.WeightDecay(model, per=per, init=0.3)
    steps, lr = 3, 0.2

    def outer_at(raws: list[Tensor]) -> Tensor:
        w, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        d_w, d_b = (raws[0].exp(), raws[0].exp()) if per == "global" else (raws[0].exp(), raws[1].exp())
        for _ in range(steps):
            x, t = train
            loss = (
                _mse(x @ w + bias - t)
                + 0.5 * (d_w * w.abs().square()).sum()
                + 0.5 * d_b * bias.abs().square()
            )
            gw, gb = torch.autograd.grad(loss, [w, bias], create_graph=True)
            w, bias = w - lr * gw, bias - lr * gb
        x, t = val
        return _mse(x @ w + bias - t)

    leaves = [r.detach().clone().requires_grad_(True) for r in wd.raw]
    reference = torch.autograd.grad(outer_at(leaves), leaves)
    fd = ht.central_difference(
        lambda: float(outer_at([r.detach() for r in wd.raw]).detach()), wd.raw[0], eps=1e-6
    )
    hopt = hg.Unrolled(
        model,
        wd,
        _train_loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.0),
        steps=steps,
    )
    for _ in range(steps):
        hopt.step(train)
    hopt.hyper_step(val_batch=val)
    for r, ref in zip(wd.raw, reference, strict=True):
        assert r.grad is not None and r.grad.dtype == torch.float64
        assert _rel(r.grad, ref) < 1e-10
    assert _rel(wd.raw[0].grad, fd) < 1e-7  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 2. Optimiser settings: the hyperparameter's dtype follows the weights' real dtype


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.complex128, torch.float64),
        (torch.float64, torch.float64),
        (torch.complex64, torch.float32),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_learning_rate_dtype_follows_the_real_dtype_of_the_weights(
    dtype: torch.dtype, expected: torch.dtype
) -> None:
    w = nn.Parameter(torch.zeros(3, dtype=dtype))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for hp in (
        hg.hparams.LearningRate(opt),
        hg.hparams.Momentum(opt),
        hg.hparams.LearningRate(opt, relative=True),
    ):
        assert hp.raw.dtype == expected
    lr = hg.hparams.LearningRate(opt)
    lr.write()
    # the first step uses the optimiser's own rate (bfloat16 log(0.1) gave 0.1006, float16 0.09998,
    # a float32 log for complex128 weights 0.1 + 1.5e-9)
    tol = 1e-15 if expected == torch.float64 else 1e-7
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1, rel=tol, abs=0)


def test_learning_rate_dtype_on_request_and_widest_of_mixed_groups() -> None:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    assert hg.hparams.LearningRate(opt).raw.dtype == torch.float64
    assert hg.hparams.LearningRate(opt, dtype=torch.float32).raw.dtype == torch.float32
    single = torch.optim.SGD([a], lr=0.1)
    lr64 = hg.hparams.LearningRate(single, dtype=torch.float64)
    assert lr64.raw.dtype == torch.float64 and float(lr64.value) == pytest.approx(0.1, rel=1e-15)
    for bad in (torch.complex64, torch.int64):
        with pytest.raises(TypeError, match="real floating-point dtype"):
            hg.hparams.LearningRate(single, dtype=bad)
    # an empty first group does not crash the dtype / device lookup
    empty_first = torch.optim.SGD([{"params": []}, {"params": [b]}], lr=0.1)
    assert hg.hparams.LearningRate(empty_first).raw.shape == (2,)


def test_complex128_learning_rate_unrolled_hypergradient_is_float64_exact() -> None:
    """d L_V / d log(lr) after K SGD steps on a complex weight: float64 end to end."""
    train, val = _data(3)
    model = _ComplexLinear()
    w0 = model.w.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.15)
    lr = hg.hparams.LearningRate(opt)
    assert lr.raw.dtype == torch.float64
    steps = 3

    def loss_fn(m: nn.Module, h: nn.Module, batch: Any) -> Tensor:
        return _val_loss(m, h, batch)

    def outer_at(log_lr: Tensor) -> Tensor:
        w = w0.clone().requires_grad_(True)
        for _ in range(steps):
            (g,) = torch.autograd.grad(_mse(train[0] @ w - train[1]), [w], create_graph=True)
            w = w - log_lr.exp() * g
        return _mse(val[0] @ w - val[1])

    leaf = lr.raw.detach().clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(outer_at(leaf), [leaf])
    fd = ht.central_difference(lambda: float(outer_at(lr.raw.detach()).detach()), lr.raw, eps=1e-6)
    hopt = hg.Unrolled(
        model,
        lr,
        loss_fn,
        loss_fn,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.0),
        steps=steps,
    )
    for _ in range(steps):
        hopt.step(train)
    hopt.hyper_step(val_batch=val)
    assert lr.raw.grad is not None and lr.raw.grad.dtype == torch.float64
    assert _rel(lr.raw.grad, reference) < 1e-12
    assert _rel(lr.raw.grad, fd) < 1e-8


# --------------------------------------------------------------------------------------------
# 3. Out-of-domain values: clear errors naming the problem


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda m: hg.hparams.LearningRate(torch.optim.SGD(m.parameters(), lr=0.0)),
            r"lr init .* must be > 0",
        ),
        (
            lambda m: hg.hparams.LearningRate(torch.optim.SGD(m.parameters(), lr=0.1), init=-0.1),
            "must be > 0",
        ),
        (lambda m: hg.hparams.LearningRate(torch.optim.SGD(m.parameters(), lr=0.1), init=math.nan), "finite"),
        (
            lambda m: hg.hparams.Momentum(torch.optim.SGD(m.parameters(), lr=0.1, momentum=1.0)),
            r"momentum init .* must lie in \(0, 1\)",
        ),
        (lambda m: hg.hparams.Momentum(torch.optim.SGD(m.parameters(), lr=0.1), init=1.0), r"\(0, 1\)"),
        (lambda m: hg.hparams.WeightDecay(m, init=-1e-3), "Invalid weight decay init: -0.001"),
        (lambda m: hg.hparams.WeightDecay(m, init=0.0), "Invalid weight decay init: 0.0"),
        (lambda m: hg.hparams.PriorPrecision(m, init=-1.0), "Invalid prior precision init: -1.0"),
        (lambda m: hg.hparams.WeightDecay(m, per="weight"), "Invalid per: 'weight'"),
    ],
)
def test_out_of_domain_values_raise_naming_the_problem(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(nn.Linear(2, 1))


def test_complex_hparam_init_is_refused_not_silently_made_real() -> None:
    """``Hparam(torch.tensor([0.5 + 0.1j]))`` kept 0.5 and dropped the imaginary part (a warning)."""
    for init in (torch.tensor([0.5 + 0.1j]), 0.5 + 0.1j):
        with pytest.raises(TypeError, match="must be real"):
            hg.hparams.Hparam(init)


# --------------------------------------------------------------------------------------------
# 4. Weights the containers meet in real models


def test_tied_weight_is_penalised_once_and_frozen_or_buffers_are_not() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3, bias=False, dtype=torch.float64)
            self.dec = nn.Linear(3, 3, bias=False, dtype=torch.float64)
            self.dec.weight = self.enc.weight
            self.bn = nn.BatchNorm1d(3, dtype=torch.float64)
            self.frozen = nn.Linear(3, 1, dtype=torch.float64).requires_grad_(False)

        def forward(self, x: Tensor) -> Tensor:
            return self.frozen(self.bn(self.dec(self.enc(x))))

    model = Tied()
    for per in ("global", "layer", "parameter"):
        wd = hg.hparams.WeightDecay(model, per=per, init=0.2)
        assert wd.names == ("enc.weight", "bn.weight", "bn.bias")  # no buffers, no frozen weights
        closed = 0.1 * sum(float(model.get_parameter(n).detach().square().sum()) for n in wd.names)
        assert float(wd.penalty(model).detach()) == pytest.approx(closed, rel=1e-14)


def test_float64_learning_rate_on_float32_model_writes_a_python_float() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lr = hg.hparams.LearningRate(opt, dtype=torch.float64)
    lr.write()
    assert type(opt.param_groups[0]["lr"]) is float
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-15)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()  # float32 weights stay float32
    assert model.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# 5. Hypergradient-descent optimisers against Baydin et al.'s loop, written out in float64


def _baydin(
    grad: Any, theta: Tensor, steps: int, lr: float, beta: float, kind: str, **kw: Any
) -> tuple[list[float], Tensor]:
    """SGD-HD / Adam-HD (Baydin et al. 2018, Algorithm 1 and its Adam variant), the paper's update
    ``α_t = α_{t-1} - β ∂f/∂α = α_{t-1} + β ∇f(θ_{t-1})·u_{t-1}``, in float64, with torch.optim's
    maximize / weight_decay / amsgrad conventions."""
    alpha, u_prev = lr, None
    m = v = vmax = torch.zeros_like(theta)
    lrs = []
    for t in range(1, steps + 1):
        g = grad(theta)
        if kw.get("maximize"):
            g = -g
        g = g + kw.get("weight_decay", 0.0) * theta
        if u_prev is not None:
            alpha = max(alpha + beta * float(g @ u_prev), 0.0)
        if kind == "sgd":
            u = g
        else:
            b1, b2 = kw.get("betas", (0.9, 0.999))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            vmax = torch.maximum(vmax, v)
            vv = vmax if kw.get("amsgrad") else v
            u = (m / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + kw.get("eps", 1e-8))
        theta = theta - alpha * u
        u_prev = u
        lrs.append(alpha)
    return lrs, theta


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("sgd", {"maximize": True, "weight_decay": 0.1}),
        ("adam", {"maximize": True, "weight_decay": 0.1, "amsgrad": True, "betas": (0.8, 0.9)}),
        ("adam", {"amsgrad": True, "eps": 1e-4}),
    ],
)
def test_matches_the_written_out_baydin_loop_with_every_mirrored_option(
    kind: str, kw: dict[str, Any]
) -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 6, dtype=torch.float64, generator=g)
    a = q @ q.T / 6 + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    sign = -1.0 if kw.get("maximize") else 1.0  # maximise -f = minimise f

    def grad(th: Tensor) -> Tensor:
        return sign * (a @ th - b)

    theta0 = torch.randn(6, dtype=torch.float64, generator=g)
    lr, beta = (0.05, 0.02) if kind == "sgd" else (0.02, 1e-3)
    lrs_ref, theta_ref = _baydin(grad, theta0, 30, lr, beta, kind, **kw)
    p = theta0.clone().requires_grad_(True)
    cls = SGDHD if kind == "sgd" else AdamHD
    opt = cls([p], lr=lr, hypergrad_lr=beta, **kw)
    lrs = []
    for _ in range(30):
        opt.zero_grad()
        (sign * (0.5 * p @ (a @ p) - b @ p)).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert abs(lrs_ref[-1] - lr) > 0.05 * lr  # the rate really moved
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(lrs_ref), rtol=1e-11, atol=0)
    torch.testing.assert_close(p.detach(), theta_ref, rtol=1e-10, atol=1e-13)


def test_group_added_mid_run_starts_its_own_hypergradient_and_resumes_bitwise() -> None:
    """A group added after some steps (a layer unfrozen mid-run) starts with h = 0 and its own lr;
    the old group's rate goes on unchanged; a state_dict saved then resumes bit-exactly."""

    def run(split: int | None, total: int = 12) -> tuple[list[float], list[Tensor]]:
        torch.manual_seed(0)
        a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
        pa, pb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        opt = SGDHD([pa], lr=0.05, momentum=0.5, hypergrad_lr=0.01)
        for k in range(total):
            if k == 4:
                opt.add_param_group({"params": [pb], "lr": 0.2, "hypergrad_lr": 0.05})
            if split is not None and k == split:
                saved = opt.state_dict()
                pa, pb = pa.detach().clone().requires_grad_(True), pb.detach().clone().requires_grad_(True)
                opt = SGDHD([pa], lr=0.05, momentum=0.5, hypergrad_lr=0.01)
                opt.add_param_group({"params": [pb], "lr": 0.2, "hypergrad_lr": 0.05})
                opt.load_state_dict(saved)
            opt.zero_grad()
            loss = 0.5 * (pa - 1).square().sum() + 0.5 * (pb + pa[:2]).square().sum()
            loss.backward()
            opt.step()
            if k == 4:
                assert opt.param_groups[1]["hypergrad"] == 0.0 and opt.param_groups[1]["lr"] == 0.2
        return [g["lr"] for g in opt.param_groups], [pa.detach(), pb.detach()]

    lrs, ps = run(None)
    assert lrs[1] != 0.2  # the new group's rate moved
    lrs2, ps2 = run(8)
    assert lrs == lrs2
    for x, y in zip(ps, ps2, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_follow_the_float64_hypergradient(dtype: torch.dtype) -> None:
    """h is accumulated in float32 for half / bfloat16 weights: the rate stays near the float64
    run's (a half-precision dot of 4096 products would lose it)."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(4096, dtype=torch.float64, generator=g)
    runs = {}
    for dt in (torch.float64, dtype):
        p = torch.zeros(4096, dtype=dt, requires_grad=True)
        opt = SGDHD([p], lr=0.05, hypergrad_lr=1e-5)
        for _ in range(10):
            opt.zero_grad()
            (0.5 * (p.double() - target).square().sum()).backward()
            opt.step()
        runs[dt] = opt.param_groups[0]["lr"]
    assert runs[torch.float64] > 0.06  # it grew
    assert runs[dtype] == pytest.approx(runs[torch.float64], rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_learns_its_rate_in_float32_through_unrolled(dtype: torch.dtype) -> None:
    """A bfloat16 model's LearningRate / Momentum used to be bfloat16 tensors: the hypergradient
    came out in bfloat16 and an outer step of 1e-3 on log(0.1) (spacing 0.016 there) was lost."""
    grads = {}
    for dt in (torch.float32, dtype):
        torch.manual_seed(0)
        model = nn.Linear(4, 1).to(dt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        hp = nn.ModuleDict({"lr": hg.hparams.LearningRate(opt), "mom": hg.hparams.Momentum(opt)})
        x, y = torch.randn(16, 4).to(dt), torch.randn(16, 1).to(dt)

        def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return (m(b[0]) - b[1]).float().square().mean()

        hopt = hg.Unrolled(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1e-3),
            steps=3,
        )
        for _ in range(3):
            hopt.step((x, y))
        before = [p.detach().clone() for p in hp.parameters()]
        hopt.hyper_step(val_batch=(x, y))
        assert model.weight.dtype == dt
        for p, b in zip(hp.parameters(), before, strict=True):
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
            assert not torch.equal(p.detach(), b)  # the small outer step was taken
        grads[dt] = torch.cat([p.grad.reshape(-1) for p in hp.parameters()])  # type: ignore[union-attr]
    assert _rel(grads[dtype], grads[torch.float32]) < 3e-2


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (SGDHD, {"momentum": 0.8, "dampening": 0.1}),
        (SGDHD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
        (SGDHD, {"maximize": True, "weight_decay": 0.2}),
        (AdamHD, {"amsgrad": True, "weight_decay": 0.1}),
        (AdamHD, {"maximize": True, "betas": (0.8, 0.9)}),
    ],
)
def test_complex_params_with_every_option_match_their_real_view(
    cls: Any, kw: dict[str, Any], foreach: bool
) -> None:
    target = torch.randn(3, dtype=CDT)
    z = torch.zeros(3, dtype=CDT, requires_grad=True)
    r = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    common = {"lr": 0.01, "hypergrad_lr": 1e-2 if cls is SGDHD else 1e-3, "foreach": foreach, **kw}
    opt_z, opt_r = cls([z], **common), cls([r], **common)
    sign = -1.0 if kw.get("maximize") else 1.0
    for _ in range(15):
        opt_z.zero_grad()
        opt_r.zero_grad()
        (sign * (z - target).abs().square().sum()).backward()
        (sign * (r - torch.view_as_real(target)).square().sum()).backward()
        opt_z.step()
        opt_r.step()
        assert opt_z.param_groups[0]["lr"] == pytest.approx(opt_r.param_groups[0]["lr"], rel=1e-12)
    assert opt_r.param_groups[0]["lr"] != 0.01
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)


def test_setting_the_dtype_cannot_hold_is_refused_not_rounded_onto_the_edge() -> None:
    """Computing log(lr) in float64 must not let a float32 raw round to lr = 0 or momentum = 1."""
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"in torch.float32, must be > 0"):
        hg.hparams.LearningRate(torch.optim.SGD([w], lr=1e-50))
    with pytest.raises(ValueError, match=r"in torch.float32, must lie in \(0, 1\)"):
        hg.hparams.Momentum(torch.optim.SGD([w], lr=0.1), init=1 - 1e-9)
    m64 = hg.hparams.Momentum(torch.optim.SGD([w], lr=0.1), init=1 - 1e-9, dtype=torch.float64)
    assert float(m64.value) == pytest.approx(1 - 1e-9, abs=1e-15)


def test_learning_rate_per_group_with_a_frozen_group_matches_central_differences() -> None:
    """Two groups with their own lr, the first frozen: its hypergradient is exactly 0, the other's
    is the derivative of the validation loss after K torch SGD steps (momentum) in log(lr)."""
    dt = torch.float64
    model = nn.Sequential(nn.Linear(3, 4, dtype=dt), nn.Tanh(), nn.Linear(4, 1, dtype=dt))
    model[0].requires_grad_(False)
    groups = [{"params": model[0].parameters(), "lr": 0.3}, {"params": model[2].parameters(), "lr": 0.1}]
    opt = torch.optim.SGD(groups, momentum=0.5)
    lr = hg.hparams.LearningRate(opt)
    train = (torch.randn(16, 3, dtype=dt), torch.randn(16, 1, dtype=dt))
    val = (torch.randn(16, 3, dtype=dt), torch.randn(16, 1, dtype=dt))
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(m: nn.Module, h: nn.Module | None, b: Any) -> Tensor:
        return (m(b[0]) - b[1]).square().mean()

    steps = 3

    def outer() -> float:
        m = nn.Sequential(nn.Linear(3, 4, dtype=dt), nn.Tanh(), nn.Linear(4, 1, dtype=dt))
        m.load_state_dict(start)
        o = torch.optim.SGD(m[2].parameters(), lr=float(lr.raw[1].detach().exp()), momentum=0.5)
        for _ in range(steps):
            o.zero_grad()
            loss(m, None, train).backward()
            o.step()
        with torch.no_grad():
            return float(loss(m, None, val))

    fd = ht.central_difference(outer, lr.raw, eps=1e-6)
    hopt = hg.Unrolled(
        model,
        lr,
        loss,
        loss,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(lr.parameters(), lr=0.0),
        steps=steps,
    )
    for _ in range(steps):
        hopt.step(train)
    hopt.hyper_step(val_batch=val)
    assert lr.raw.grad is not None and lr.raw.grad[0] == 0.0 and fd[0] == 0.0
    assert float(lr.raw.grad[1]) == pytest.approx(float(fd[1]), rel=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("hd_cls", "torch_cls", "kw"),
    [
        (SGDHD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        (AdamHD, torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ],
)
def test_half_precision_update_is_torchs_own_at_the_tuned_rate(
    hd_cls: Any, torch_cls: Any, kw: dict[str, Any], dtype: torch.dtype, foreach: bool
) -> None:
    """With the rate moving, each parameter step is still bit for bit torch's at that rate."""
    a = torch.randn(50).to(dtype).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    target = torch.randn(50).to(dtype)
    beta = 1e-5 if hd_cls is SGDHD else 1e-4
    opt, ref = hd_cls([a], hypergrad_lr=beta, foreach=foreach, **kw), torch_cls([b], foreach=foreach, **kw)
    for _ in range(10):
        for p, o in ((a, opt), (b, ref)):
            o.zero_grad()
            (p - target).float().square().sum().backward()
        opt.step()
        ref.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        ref.step()
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] != kw["lr"]
