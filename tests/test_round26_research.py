"""Round 26 (helper "research"): research scripts as researchers write them, end to end, each
checked in float64 against an independent plain-autograd reference written out here.

* DARTS (Liu et al. 2019): a cell mixing candidate operations by softmax(alpha), the inner SGD
  with momentum and weight decay (DARTS's own settings), Adam with weight decay on alpha, one
  hyperstep after every real step for several iterations: ``Unrolled(steps=1)`` equals the
  second-order architecture gradient written by hand through the real step (the momentum buffer a
  constant), and the whole run (alpha and weights) equals the hand-written loop bit for bit
  (new: round 20 checked one hyperstep of plain SGD; here momentum, an outer trajectory).
* DARTS's linearised variants: ``Implicit`` with ``Identity(scale=xi)`` and with
  ``Neumann(steps=0, alpha=xi)`` equal ``d_alpha L_V - xi * d2_{alpha,w} L_T . d_w L_V`` at the
  current weights, whose xi -> 0 limit is first-order DARTS (new).
* SNAS / GDAS: the architecture weights drawn by ``F.gumbel_softmax`` inside ``train_loss`` (torch's
  global RNG) with a learned temperature: reverse and forward mode against central differences of
  the written-out run (new: no test drew Gumbel noise in a loss).
* Mixup with a learned Beta concentration (``Beta(a, a).rsample()`` and ``randperm`` inside
  ``train_loss``): reverse mode against central differences; forward mode names the operation it
  cannot follow (new).
* A script doing everything at once: mixup, gradient accumulation over micro-batches, label
  smoothing, dropout, Nesterov SGD with weight decay, ``hopt.step(max_grad_norm=...)`` and a
  ``val_loss`` that switches the model to eval mode itself: the trained model equals plain
  PyTorch with ``clip_grad_norm_`` bit for bit, and the hypergradient equals central differences.
* Hyper-representation: a shared backbone (with a LayerNorm) as the hyperparameters, a ridge head
  as the weights: ``Implicit`` (CG and Direct) equals the closed form through the head's solution.
* Fixed in round 26: a ``val_loss`` written under
  ``torch.no_grad()`` / ``torch.inference_mode()`` (the validation habit) gave a hypergradient of
  exactly 0 with a DisconnectedWarning that listed every cause but that one (float() casts,
  frozen weights, EMA copies, ...).
* Fixed in round 26: ``hg.testing.dense_ift_hypergradient``,
  documented to compute what ``Implicit(Direct())`` does, could not be given the inner optimiser:
  it solved over every parameter requiring grad and left out SGD's coupled ``weight_decay``
  (80% off with ``weight_decay=0.05``, 30% off with a layer left out of the optimiser).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import hypergrad as hg

DT = torch.float64


def _fd(run: Any, raws: list[Tensor], eps: float = 1e-6) -> list[Tensor]:
    """Central differences of ``run(raws)`` (a float) w.r.t. every entry of every raw tensor."""
    out = []
    for i, r in enumerate(raws):
        g = torch.zeros_like(r)
        for j in range(r.numel()):
            plus = [x.clone() for x in raws]
            minus = [x.clone() for x in raws]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            g.view(-1)[j] = (run(plus) - run(minus)) / (2 * eps)
        out.append(g)
    return out


def _close(got: Any, ref: Any, rtol: float, atol: float) -> None:
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.reshape(b.shape).to(DT), b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- 1. DARTS


class _Cell(nn.Module):
    """DARTS's mixed operation in miniature: candidate operations weighted by ``mix`` (softmax of
    alpha, or Gumbel-softmax draws), alpha passed in by the loss, not registered in the model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ops = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor, mix: Tensor) -> Tensor:
        acts = (torch.tanh, torch.relu, lambda t: t)
        if mix.dim() == 1:
            mix = mix.expand(len(x), 3)
        return self.head(
            sum(mix[:, k : k + 1] * a(op(x)) for k, (a, op) in enumerate(zip(acts, self.ops, strict=True)))
        )


def _darts_data() -> tuple[list[Any], list[Any]]:
    g = torch.Generator().manual_seed(3)
    tb = [
        (torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)) for _ in range(4)
    ]
    vb = [
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)
    ]
    return tb, vb


def _darts_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0], h[0].softmax(0)), b[1])


def test_darts_second_order_with_momentum_and_decay_is_the_hand_written_darts_loop() -> None:
    """DARTS's architect: grad_alpha L_V(w', alpha) with w' = w - xi (mu buf + grad_w L_T + wd w),
    the buffer a constant, Adam (with weight decay) on alpha; each iteration one real step at the
    current alpha, then the architecture step through it. ``Unrolled(steps=1)`` with a hyperstep
    after every step is that loop: its hypergradient equals the hand-written one at every
    iteration (1e-12), and alpha and the weights follow the written-out run exactly."""
    tb, vb = _darts_data()
    lr, mom, wd = 0.3, 0.9, 3e-2
    alpha0 = torch.tensor([0.2, -0.1, 0.4], dtype=DT)

    model = _Cell().to(DT)
    hp = nn.ParameterList([nn.Parameter(alpha0.clone())])
    hopt = hg.Unrolled(
        model,
        hp,
        _darts_loss,
        _darts_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, weight_decay=wd),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3),
        steps=1,
    )

    ref = _Cell().to(DT)
    alpha = nn.Parameter(alpha0.clone())
    names = [n for n, _ in ref.named_parameters()]
    inner = torch.optim.SGD(ref.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    outer = torch.optim.Adam([alpha], lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)
    for b, v in zip(tb, vb, strict=True):
        hopt.step(b)
        info = hopt.hyper_step(val_batch=v)
        assert info.unrolled_steps == 1

        # the hand-written architect, through the real step about to be taken
        w0 = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
        bufs = [inner.state[p].get("momentum_buffer") if p in inner.state else None for p in ref.parameters()]
        a = alpha.detach().clone().requires_grad_(True)

        def f(ws: list[Tensor], x: Tensor, a: Tensor = a) -> Tensor:
            return functional_call(ref, dict(zip(names, ws, strict=True)), (x, a.softmax(0)))

        grads = torch.autograd.grad(F.cross_entropy(f(w0, b[0]), b[1]), w0, create_graph=True)
        w1 = []
        for w, gw, buf in zip(w0, grads, bufs, strict=True):
            d = gw + wd * w
            w1.append(w - lr * (d if buf is None else mom * buf.detach() + d))
        g_alpha = torch.autograd.grad(F.cross_entropy(f(w1, v[0]), v[1]), a)[0]
        # the real loop: the weight step, then the architecture step
        inner.zero_grad()
        F.cross_entropy(ref(b[0], alpha.detach().softmax(0)), b[1]).backward()
        inner.step()
        alpha.grad = g_alpha
        outer.step()

        torch.testing.assert_close(hp[0].grad, g_alpha, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(hp[0].detach(), alpha.detach(), rtol=1e-12, atol=1e-15)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
    assert float((hp[0].detach() - alpha0).abs().max()) > 1e-2  # (alpha really moved)


def test_darts_linearised_second_order_is_implicit_identity_and_neumann_zero() -> None:
    """DARTS's cheap variants at the current weights w: g(xi) = d_alpha L_V(w) - xi *
    d2_{alpha,w} L_T(w) . d_w L_V(w) (first-order DARTS is xi = 0). ``Implicit`` with
    ``Identity(scale=xi)`` and with ``Neumann(steps=0, alpha=xi)`` (alpha * v) both give it,
    written out here with plain autograd, and are affine in xi with the first-order gradient as
    intercept."""
    tb, vb = _darts_data()
    model = _Cell().to(DT)
    hp = nn.ParameterList([nn.Parameter(torch.tensor([0.2, -0.1, 0.4], dtype=DT))])
    inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    warm = hg.Unrolled(
        model,
        hp,
        _darts_loss,
        _darts_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=1,
    )
    for b in tb:  # (somewhere away from the initialisation)
        warm.step(b)
    b, v = tb[-1], vb[-1]

    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    a = hp[0].detach().clone().requires_grad_(True)

    def f(x: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, w, strict=True)), (x, a.softmax(0)))

    lv = F.cross_entropy(f(v[0]), v[1])
    gv = torch.autograd.grad(lv, [*w, a])
    first_order = gv[-1]
    gt = torch.autograd.grad(F.cross_entropy(f(b[0]), b[1]), w, create_graph=True)
    mixed = torch.autograd.grad(sum((g * u).sum() for g, u in zip(gt, gv[:-1], strict=True)), a)[0]

    for xi in (0.3, 0.05):
        expected = first_order - xi * mixed
        for solver in (hg.Identity(scale=xi), hg.Neumann(steps=0, alpha=xi)):
            hopt = hg.Implicit(
                model,
                hp,
                _darts_loss,
                _darts_loss,
                inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
                solver=solver,
            )
            got, _ = hopt.hypergradient(train_batch=b, val_batch=v)
            torch.testing.assert_close(got[0], expected, rtol=1e-11, atol=1e-14)
    assert float(mixed.abs().max()) > 1e-3  # (the second-order term is not negligible here)


# ----------------------------------------------------------------------------- 2. SNAS / GDAS


def _gumbel_hp() -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "alpha": hg.hparams.Hparam(torch.tensor([0.2, -0.1, 0.4], dtype=DT), "real"),
            "tau": hg.hparams.Hparam(torch.tensor(0.8, dtype=DT)),
        }
    )


def _gumbel_train(m: nn.Module, h: Any, b: Any) -> Tensor:
    mix = F.gumbel_softmax(h["alpha"]().expand(len(b[0]), 3), tau=h["tau"]())
    return F.cross_entropy(m(b[0], mix), b[1])


def _gumbel_val(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0], h["alpha"]().softmax(0)), b[1])


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_gumbel_softmax_architecture_draws_inside_train_loss_match_fd(mode: str) -> None:
    """SNAS / GDAS: each training step draws the operation weights with ``F.gumbel_softmax`` from
    torch's global RNG at a learned temperature. The replay must draw the same noise as each real
    step: central differences of three written-out ``torch.optim`` steps from the same seed."""
    tb, vb = _darts_data()
    tb, v = tb[:3], vb[0]

    def build() -> tuple[nn.Module, nn.ModuleDict, torch.optim.Optimizer]:
        m = _Cell().to(DT)
        return m, _gumbel_hp(), torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)

    model, hp, inner = build()
    hopt = hg.Unrolled(
        model,
        hp,
        _gumbel_train,
        _gumbel_val,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        mode=mode,
    )
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no ReplayWarning: the replay drew the real noise)
        for b in tb:
            hopt.step(b)
        got, _ = hopt.hypergradient(val_batch=v)

    def run(raws: list[Tensor]) -> float:
        m, h, opt = build()
        with torch.no_grad():
            for p, r in zip(h.parameters(), raws, strict=True):
                p.copy_(r)
        torch.manual_seed(5)
        for b in tb:
            opt.zero_grad()
            _gumbel_train(m, h, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_gumbel_val(m, h, v))

    ref = _fd(run, [p.detach().clone() for p in _gumbel_hp().parameters()])
    _close(got, ref, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 3. mixup


def _mixup_train(m: nn.Module, h: Any, b: Any) -> Tensor:
    x, y = b
    lam = torch.distributions.Beta(h(), h()).rsample()  # (global RNG)
    perm = torch.randperm(len(x))
    out = m(lam * x + (1 - lam) * x[perm])
    return lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])


def _ce(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def test_learned_mixup_concentration_through_beta_rsample_matches_the_written_out_unroll() -> None:
    """Mixup with the Beta concentration as a hyperparameter, reparametrised
    (``Beta(a, a).rsample()``), and ``randperm`` inside ``train_loss``: Unrolled's reverse mode
    follows the draw's (implicit reparametrisation) gradient in ``a`` with the real steps' noise,
    as plain autograd through the three momentum-SGD steps written out with ``functional_call``
    from the same seed does. (Not central differences: a Gamma draw at a nearby ``a`` from the
    same seed is no smooth function of ``a``, the rejection sampler's path differs.) Forward mode,
    which torch cannot push through the Gamma sampler, says so instead of returning a number."""
    g = torch.Generator().manual_seed(1)
    bs = [
        (torch.randn(8, 3, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)
    ]
    vb = (torch.randn(8, 3, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g))
    lr, mom = 0.5, 0.9

    def hp0() -> nn.Module:
        return hg.hparams.Hparam(torch.tensor(0.7, dtype=DT), "positive")

    got = {}
    for mode in ("reverse", "forward"):
        model, hp = _mlp(), hp0()
        hopt = hg.Unrolled(
            model,
            hp,
            _mixup_train,
            _ce,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=mom),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=3,
            mode=mode,
        )
        torch.manual_seed(5)
        for b in bs:
            hopt.step(b)
        if mode == "forward":
            with pytest.raises(RuntimeError, match="forward"):
                hopt.hypergradient(val_batch=vb)
        else:
            got[mode] = hopt.hypergradient(val_batch=vb)[0]

    # the reference: the same three steps in plain autograd
    ref_model, h = _mlp(), hp0()
    names = [n for n, _ in ref_model.named_parameters()]
    ws = [p.detach().clone() for p in ref_model.parameters()]
    bufs: list[Tensor] | None = None
    torch.manual_seed(5)
    for b in bs:
        ws = [w if w.requires_grad else w.requires_grad_(True) for w in ws]

        class _View(nn.Module):
            def forward(self, x: Tensor, ws: list[Tensor] = ws) -> Tensor:
                return functional_call(ref_model, dict(zip(names, ws, strict=True)), (x,))

        gs = torch.autograd.grad(_mixup_train(_View(), h, b), ws, create_graph=True)
        bufs = list(gs) if bufs is None else [mom * u + gw for u, gw in zip(bufs, gs, strict=True)]
        ws = [w - lr * u for w, u in zip(ws, bufs, strict=True)]
    out = functional_call(ref_model, dict(zip(names, ws, strict=True)), (vb[0],))
    ref = torch.autograd.grad(F.cross_entropy(out, vb[1]), h.raw)
    _close(got["reverse"], ref, rtol=1e-10, atol=1e-13)
    assert abs(float(ref[0])) > 1e-4


# ----------------------------------------------------------------------------- 4. everything at once


class _DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.norm, self.drop, self.l2 = (
            nn.Linear(4, 8),
            nn.LayerNorm(8),
            nn.Dropout(0.2),
            nn.Linear(8, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.drop(torch.relu(self.norm(self.l1(x)))))


def _kitchen_sink_train(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Mixup (global RNG), three micro-batches accumulated into one loss, label smoothing, dropout
    in the model, the learned per-layer decay as a penalty."""
    x, y = b
    lam = torch.distributions.Beta(torch.tensor(0.4, dtype=DT), torch.tensor(0.4, dtype=DT)).sample()
    perm = torch.randperm(len(x))
    total = torch.zeros((), dtype=DT)
    for xc, yc, pc in zip(x.chunk(3), y.chunk(3), perm.chunk(3), strict=True):
        out = m(lam * xc + (1 - lam) * x[pc])
        total = (
            total
            + (
                lam * F.cross_entropy(out, yc, label_smoothing=0.1)
                + (1 - lam) * F.cross_entropy(out, y[pc], label_smoothing=0.1)
            )
            / 3
        )
    return total + h.penalty(m)


def _eval_val(m: nn.Module, h: Any, b: Any) -> Tensor:
    m.eval()  # (switched here and not back: the script's habit)
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_script_with_mixup_micro_batches_smoothing_dropout_and_clipping_is_plain_pytorch(mode: str) -> None:
    """Six steps with ``max_grad_norm`` and a hyperstep every second one (outer rate 0, so the
    hyperparameters stay): the weights equal those of the plain loop with
    ``clip_grad_norm_(model.parameters(), c)`` bit for bit (the hypersteps drew nothing from the
    RNG and left the model in train mode although val_loss switched it to eval), and the last
    hypergradient equals central differences of the plain loop through its last three steps."""
    g = torch.Generator().manual_seed(1)
    bs = [
        (torch.randn(12, 4, dtype=DT, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(6)
    ]
    vb = (torch.randn(10, 4, dtype=DT, generator=g), torch.randint(0, 3, (10,), generator=g))
    clip = 0.5

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        m = _DropNet().to(DT)
        hp = hg.hparams.WeightDecay(m, per="layer", init=1e-2).to(DT)
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
        return m, hp, opt

    model, hp, inner = build()
    hopt = hg.Unrolled(
        model,
        hp,
        _kitchen_sink_train,
        _eval_val,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        mode=mode,
    )
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, b in enumerate(bs):
            hopt.step(b, max_grad_norm=clip)
            if i % 2 == 1:
                hopt.hyper_step(val_batch=vb)
    assert model.training
    got = [p.grad.clone() for p in hp.parameters()]

    def plain(raws: list[Tensor] | None = None) -> tuple[nn.Module, nn.Module]:
        m, h, opt = build()
        torch.manual_seed(5)
        for k, b in enumerate(bs):
            if k == 3 and raws is not None:  # (the window: the last three steps)
                with torch.no_grad():
                    for p, r in zip(h.parameters(), raws, strict=True):
                        p.copy_(r)
            m.train()
            opt.zero_grad()
            _kitchen_sink_train(m, h, b).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
        return m, h

    ref_model, ref_hp = plain()
    for (n, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n

    def run(raws: list[Tensor]) -> float:
        m, h = plain(raws)
        with torch.no_grad():
            return float(_eval_val(m, h, vb))

    ref = _fd(run, [p.detach().clone() for p in ref_hp.parameters()])
    _close(got, ref, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- 5. hyper-representation


def test_hyper_representation_backbone_as_hparams_matches_the_ridge_head_closed_form() -> None:
    """A shared backbone (Linear, tanh, LayerNorm) is the hyperparameter module and a linear head
    the weights, trained on ``mse + mu |W|^2``: at the head's optimum W*(phi) = Y^T P (P^T P / n
    + 2 mu I)^-1 / n (P the backbone's features) ``Implicit`` equals the gradient of L_V(W*(phi),
    phi) through the closed form, with CG and with Direct."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5)).to(DT)
    head = nn.Linear(5, 2, bias=False).to(DT)
    g = torch.Generator().manual_seed(1)
    xt, yt = torch.randn(20, 4, dtype=DT, generator=g), torch.randn(20, 2, dtype=DT, generator=g)
    xv, yv = torch.randn(12, 4, dtype=DT, generator=g), torch.randn(12, 2, dtype=DT, generator=g)
    mu = 0.1

    def train_loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(h(b[0])), b[1]) + mu * m.weight.square().sum()

    def val_loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.mse_loss(m(h(b[0])), b[1])

    def w_star() -> Tensor:  # grad of mean over n*2 entries: P^T (P W^T - Y) / n + 2 mu W^T = 0
        p = backbone(xt)
        a = p.T @ p / len(xt) + 2 * mu * torch.eye(5, dtype=DT)
        return torch.linalg.solve(a, p.T @ yt / len(xt)).T

    with torch.no_grad():
        head.weight.copy_(w_star())
    ref = torch.autograd.grad(F.mse_loss(backbone(xv) @ w_star().T, yv), list(backbone.parameters()))
    for solver in (hg.CG(maxiter=50, tol=1e-14), hg.Direct()):
        hopt = hg.Implicit(
            head,
            backbone,
            train_loss,
            val_loss,
            inner_optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1),
            solver=solver,
        )
        got, _ = hopt.hypergradient(train_batch=(xt, yt), val_batch=(xv, yv))
        _close(got, ref, rtol=1e-9, atol=1e-12)
    assert max(float(r.abs().max()) for r in ref) > 1e-2


# ----------------------------------------------------------------------------- 6. no_grad validation


def _nograd_val(m: nn.Module, h: Any, b: Any) -> Tensor:
    with torch.no_grad():  # (how validation code is written)
        return F.mse_loss(m(b[0]), b[1])


def _inference_val(m: nn.Module, h: Any, b: Any) -> Tensor:
    with torch.inference_mode():
        return F.mse_loss(m(b[0]), b[1])


@pytest.mark.parametrize(
    ("kind", "val_loss"),
    [
        ("implicit", _nograd_val),
        ("reverse", _nograd_val),
        ("reverse", _inference_val),
        ("forward", _inference_val),
    ],
)
def test_a_val_loss_computed_under_no_grad_is_named(kind: str, val_loss: Any) -> None:
    """Validation code is written under ``torch.no_grad()`` (or ``inference_mode()``) by habit;
    as ``val_loss`` it has no graph, so the hypergradient is exactly 0 (forward mode follows
    ``no_grad``, not ``inference_mode``). The warning must say that this is why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=1e-2).to(DT)
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 1, dtype=DT, generator=g))

    def train_loss(m: nn.Module, h: Any, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1]) + h.penalty(m)

    kw: dict[str, Any] = {
        "inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "outer_optimizer": torch.optim.SGD(hp.parameters(), lr=0.1),
    }
    if kind == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(model, hp, train_loss, val_loss, solver=hg.CG(maxiter=5), **kw)
    else:
        hopt = hg.Unrolled(model, hp, train_loss, val_loss, steps=2, mode=kind, **kw)
    hopt.step(b)
    hopt.step(b)
    with pytest.warns(hg.DisconnectedWarning) as record:
        info = hopt.hyper_step(train_batch=b, val_batch=b)
    assert info.hypergrad_norm == 0.0
    message = " ".join(str(w.message) for w in record)
    assert "no_grad" in message and val_loss.__name__ in message, message


# ----------------------------------------------------------------------------- 7. the public reference


@pytest.mark.parametrize("case", ["sgd_weight_decay", "layer_left_out"])
def test_dense_reference_takes_the_inner_optimizer(case: str) -> None:
    """The usual recipe (DARTS's, a ResNet's) trains with ``SGD(..., weight_decay=wd)``: the
    weights settle where grad L_T + wd w = 0, so the IFT's Hessian is H + wd I, which
    ``Implicit`` reads from the optimiser; and a fine-tuning script leaves a layer out of the
    optimiser (still requiring grad), a constant of the solve. ``hg.testing.dense_ift_hypergradient``,
    the reference a researcher checks a setup with, documents that it computes what
    ``Implicit(Direct())`` does; given the same optimiser it must, and both must equal the IFT
    written out here with plain autograd (over the trained weights, H + wd I, solved densely)."""
    import hypergrad.testing as ht

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=3e-2).to(DT)
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(16, 3, dtype=DT, generator=g), torch.randn(16, 1, dtype=DT, generator=g))
    vb = (torch.randn(16, 3, dtype=DT, generator=g), torch.randn(16, 1, dtype=DT, generator=g))
    if case == "sgd_weight_decay":
        wd, ws = 0.05, list(model.parameters())
    else:
        wd, ws = 0.0, list(model[2].parameters())

    def train_loss(m: nn.Module, h: Any, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1]) + h.penalty(m)

    def val_loss(m: nn.Module, h: Any, batch: Any) -> Tensor:
        return F.mse_loss(m(batch[0]), batch[1])

    inner = torch.optim.SGD(ws, lr=0.1, weight_decay=wd)
    hopt = hg.Implicit(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)  # (layer_left_out: its decay)
        for _ in range(20):
            hopt.step(b)
        got, _ = hopt.hypergradient(train_batch=b, val_batch=vb)

    # the IFT written out over the trained weights w, raw decays r: H + wd I
    rs = list(hp.parameters())
    gt = torch.autograd.grad(train_loss(model, hp, b), ws, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in gt])
    rows = [
        torch.autograd.grad(flat[i], ws + rs, retain_graph=True, allow_unused=True) for i in range(len(flat))
    ]
    jac = torch.stack(
        [
            torch.cat(
                [
                    (torch.zeros_like(x) if t is None else t).reshape(-1)
                    for t, x in zip(row, ws + rs, strict=True)
                ]
            )
            for row in rows
        ]
    )
    n = flat.numel()
    hess = jac[:, :n] + wd * torch.eye(n, dtype=DT)
    v = torch.cat([t.reshape(-1) for t in torch.autograd.grad(val_loss(model, hp, vb), ws)])
    ref = -(jac[:, n:].T @ torch.linalg.solve(hess, v))
    ref_list = [
        t.reshape(r.shape) for t, r in zip(torch.split(ref, [r.numel() for r in rs]), rs, strict=True)
    ]
    _close(got, ref_list, rtol=1e-9, atol=1e-13)
    assert float(ref.abs().max()) > 1e-2

    dense = ht.dense_ift_hypergradient(model, hp, train_loss, val_loss, b, vb, inner_optimizer=inner)
    _close(dense, ref_list, rtol=1e-9, atol=1e-13)
