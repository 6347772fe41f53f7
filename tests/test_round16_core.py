"""Round 16 (core): Implicit and a model that keeps state in plain attributes.

- A language model whose forward stores its hidden state on itself (``self.hidden =
  h.detach()``, as char-RNN and AWD-LSTM-style scripts do): inside an Implicit hyperstep the
  validation loss wrote the validation batch's hidden state onto the model, the training loss
  (Hessian and mixed term) then started from it, and the next ``step`` did too. Each loss now
  starts from copies of the attributes' values at the hyperstep's start, as it starts from
  copies of the buffers: the hypergradient equals that of the same model keeping its state in
  registered buffers (float64, to rounding), and the model's attributes are left as they were.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64
V, E, B, T = 7, 4, 3, 5  # vocabulary, width, batch, sequence length


class _LM(nn.Module):
    """Embedding -> LSTM -> linear; the hidden state carried between batches in a registered
    buffer pair or in a plain attribute, which the forward reassigns (detached)."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, E, batch_first=True)
        self.out = nn.Linear(E, V)
        self.keep = keep
        if keep == "buffer":
            self.register_buffer("h", torch.zeros(1, B, E))
            self.register_buffer("c", torch.zeros(1, B, E))
        self.hidden: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        e = self.emb(x)
        if self.keep == "buffer":
            o, (h, c) = self.lstm(e, (self.h, self.c))
            self.h, self.c = h.detach(), c.detach()
        else:
            o, hidden = self.lstm(e, self.hidden)
            self.hidden = (hidden[0].detach(), hidden[1].detach())
        return self.out(o)


def _batches(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(n)
    ]


def _loss(model: nn.Module, hp: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def _train_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: tuple[Tensor, Tensor]) -> Tensor:
    return _loss(model, hp, batch) + hp.penalty(model)


def _run(keep: str, solver: hg.LinearSolver) -> tuple[hg.Implicit, nn.Module, list[Tensor]]:
    model = _LM(keep).to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-2).to(DT)
    hopt = hg.Implicit(
        model,
        hp,
        _train_loss,
        _loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0),
        solver=solver,
    )
    train, val = _batches(4, 1), _batches(2, 2)
    grads = []
    for k, b in enumerate(train):
        hopt.step(b)
        if k % 2 == 1:
            hopt.hyper_step(train_batch=train[k], val_batch=val[k // 2])
            grads.append(torch.cat([p.grad.reshape(-1) for p in hp.parameters()]).clone())
    return hopt, model, grads


@pytest.mark.parametrize(
    "solver",
    [hg.CG(maxiter=30, tol=1e-12, damping=0.1), hg.Neumann(steps=4, alpha=0.05)],
    ids=["cg", "neumann"],
)
def test_implicit_hypergradient_with_state_in_attributes_equals_state_in_buffers(solver):
    _, m_buf, g_buf = _run("buffer", solver)
    _, m_att, g_att = _run("attribute", solver)
    assert len(g_buf) == len(g_att) == 2
    for a, b in zip(g_att, g_buf, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the same training afterwards: the hidden state the last step left, and the same weights
    torch.testing.assert_close(m_att.hidden[0], m_buf.h)
    for p, q in zip(m_att.parameters(), m_buf.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_implicit_hyperstep_leaves_the_models_attribute_state_as_it_was():
    hopt, model, _ = _run("attribute", hg.CG(maxiter=5, tol=1e-10))
    train, val = _batches(1, 5), _batches(1, 6)
    hopt.step(train[0])
    before = model.hidden
    assert before is not None
    values = copy.deepcopy(before)
    hopt.hyper_step(train_batch=train[0], val_batch=val[0])
    assert model.hidden is before  # the very objects
    for a, b in zip(model.hidden, values, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------- grouped STN convolutions
# StnConv2d / StnConv1d refused groups != 1 (the authors' StnConv2d takes them: grouped and
# depthwise convolutions, as in MobileNet-style nets). Each half is now its own grouped
# convolution: at every example's lambda the layer equals the grouped convolution with weight
# W_e + (V lambda) * W_h, and fixed() returns that nn.Conv with the same groups.


@pytest.mark.parametrize(
    ("dims", "cin", "cout", "groups", "kw"),
    [
        (2, 4, 6, 2, {"padding": 1}),
        (2, 4, 4, 4, {"padding": 1, "stride": 2, "bias": False}),  # depthwise
        (2, 6, 3, 3, {"padding": "same", "dilation": 2, "padding_mode": "reflect"}),
        (1, 4, 8, 2, {"padding": 2}),
    ],
)
def test_grouped_stn_conv_is_a_per_example_grouped_convolution(dims, cin, cout, groups, kw):
    cls = hg.nn.StnConv2d if dims == 2 else hg.nn.StnConv1d
    ordinary = nn.Conv2d if dims == 2 else nn.Conv1d
    torch.manual_seed(0)
    layer = cls(cin, cout, 3, 2, groups=groups, **kw).to(DT)
    with torch.no_grad():
        layer.hnet.normal_()
    x = torch.randn(3, cin, *((7, 6) if dims == 2 else (9,)), dtype=DT)
    feats = torch.randn(3, 2, dtype=DT)
    out = layer(x, feats)
    for i in range(3):
        conv = layer.fixed(feats[i])
        assert isinstance(conv, ordinary) and conv.groups == groups
        ref = ordinary(cin, cout, 3, groups=groups, **kw).to(DT)  # built by hand, not by fixed()
        s = layer.hnet @ feats[i]
        w, b = layer.conv.weight, layer.conv.bias
        with torch.no_grad():
            ref.weight.copy_(w[:cout] + s.reshape(cout, *(1,) * (dims + 1)) * w[cout:])
            if b is not None:
                ref.bias.copy_(b[:cout] + s * b[cout:])
        torch.testing.assert_close(out[i : i + 1], ref(x[i : i + 1]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(conv(x[i : i + 1]), ref(x[i : i + 1]), rtol=1e-12, atol=1e-12)


def test_gradient_through_a_grouped_stn_conv_matches_central_differences_and_selftuning_runs():
    """The output's gradient w.r.t. lambda through a grouped layer against central differences
    (float64); then SelfTuning trains a net built on one (the response step moves its weights,
    the hyperstep moves lambda)."""
    torch.manual_seed(0)
    layer = hg.nn.StnConv2d(4, 4, 3, 1, groups=2, padding=1).to(DT)
    with torch.no_grad():
        layer.hnet.normal_()
    x = torch.randn(2, 4, 5, 5, dtype=DT)

    def f(lam: Tensor) -> Tensor:
        return layer(x, lam.expand(2, 1)).square().mean()

    lam = torch.tensor([0.3], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(f(lam), lam)
    h = 1e-6
    with torch.no_grad():
        fd = (f(lam + h) - f(lam - h)) / (2 * h)
    torch.testing.assert_close(g, fd.reshape(1), rtol=1e-7, atol=1e-10)

    class Net(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.conv = hg.nn.StnConv2d(4, 4, 3, n, groups=4, padding=1)
            self.head = nn.Linear(4 * 5 * 5, 3)

        def forward(self, x: Tensor, hp: Any) -> Tensor:
            d = hp.draw(len(x))
            h = hg.nn.dropout(torch.relu(self.conv(x, d)), d["dropout"], self.training)
            return self.head(h.flatten(1))

    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
    net = Net(hp.size)

    def loss(m: nn.Module, h: Any, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        train_steps=2,
    )
    batch = (torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,)))
    hnet = net.conv.hnet.detach().clone()
    raw = [p.detach().clone() for p in hp.parameters()]
    for _ in range(2):
        hopt.step(batch)
    hopt.hyper_step(val_batch=batch)
    assert not torch.equal(net.conv.hnet, hnet)
    assert any(not torch.equal(p, r) for p, r in zip(hp.parameters(), raw, strict=True))


# ------------------------------------------------------------------------ norms in float32
def test_norm_of_a_large_finite_float32_hypergradient_is_finite():
    """hyper_step checks the hypergradient's norm for finiteness: a float32 hypergradient with an
    entry of 7.8e24 (a prior precision of 1e26) had norm inf, so the hyperstep was refused as
    not finite while no entry was. float32 and half tensors are now accumulated in float64."""
    from hypergrad._functional import norm

    for dt in (torch.float32, torch.bfloat16):
        big = [torch.tensor([7.8e24, -0.12], dtype=dt), torch.tensor([3.0e24], dtype=dt)]
        got = norm(big)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        ref = float(torch.stack([t.double() for t in torch.cat(big)]).norm())
        assert float(got) == pytest.approx(ref, rel=1e-6)
    tiny = [torch.full((100,), 1e-30)]  # squares underflow in float32
    assert float(norm(tiny)) == pytest.approx(1e-29, rel=1e-6)
    assert torch.isnan(norm([torch.tensor([1.0, float("nan")])]))
    assert torch.isinf(norm([torch.tensor([1.0, float("inf")])]))


# -------------------------------------------------- an outer step that overflows in float16
def test_an_outer_step_that_overflows_a_float16_hyperparameter_is_undone_and_reported():
    """A finite hypergradient, an outer Adam step that takes a float16 hyperparameter past
    65504: the hyperparameter was left inf (caught only at the next inner step). Now the step is
    undone (value, .grad, outer state) and reported as non-finite, as the other guards do."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    h = hg.hparams.Hparam(6.0e4, "real", dtype=torch.float16)
    outer = torch.optim.Adam(h.parameters(), lr=1e4)

    def train(m: nn.Module, hp: hg.hparams.Hparam, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.mse_loss(m(b[0]), b[1]) + 1e-9 * hp().float() * m.weight.square().sum()

    def val(m: nn.Module, hp: hg.hparams.Hparam, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.mse_loss(m(b[0]), b[1]) - 1e-6 * hp().float()  # pushes h up

    hopt = hg.Implicit(
        model,
        h,
        train,
        val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer,
        solver=hg.Identity(),
        on_nonfinite="skip",
    )
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    hopt.step(batch)
    before = h.raw.detach().clone()
    state = copy.deepcopy(outer.state_dict())
    with pytest.warns(hg.NonFiniteWarning, match="outer optimiser's step made"):
        info = hopt.hyper_step(train_batch=batch, val_batch=batch)
    assert info.skipped
    assert torch.equal(h.raw, before) and torch.isfinite(h.raw).all()
    assert outer.state_dict()["state"] == state["state"] == {}  # Adam took no step
    assert hopt.hyper_steps == 0
    hopt.step(batch)  # training goes on

    # a float32 hyperparameter: no copies taken, the step as before
    h32 = hg.hparams.Hparam(6.0e4, "real")
    hopt32 = hg.Implicit(
        model,
        h32,
        train,
        val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(h32.parameters(), lr=1e4),
        solver=hg.Identity(),
    )
    hopt32.step(batch)
    assert not hopt32.hyper_step(train_batch=batch, val_batch=batch).skipped
    assert float(h32.value) == pytest.approx(6.0e4 + 1e4 * 0.99, rel=1e-4)


# ------------------------------------- the penalties' gradient value, without its dot product
@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16])
def test_gradient_value_gives_the_dot_products_gradient_bit_for_bit(dt):
    """The first-order penalties (Implicit's and Unrolled's replay) pass ``g = d * w`` to each
    weight's gradient through a custom autograd function instead of differentiating ``Σ <g, w>``
    with ``g`` detached: the same gradient bit for bit (the weights' other terms summed in the
    same order), and the same derivative in the coefficient the loss multiplies it with."""
    from hypergrad.hparams import _gradient_value, _real_dot

    g0 = torch.Generator().manual_seed(0)
    ws = [
        torch.randn(5, 3, generator=g0).to(dt).requires_grad_(),
        torch.randn(4, generator=g0).to(dt).requires_grad_(),
    ]
    ds = [torch.rand(5, 3, generator=g0) + 0.1, torch.rand((), generator=g0) + 0.1]  # float32 decays
    c = torch.tensor(0.37, requires_grad=True)
    with torch.no_grad():
        gs = [d * w for d, w in zip(ds, ws, strict=True)]
        value = 0.5 * torch.stack([_real_dot(g, w) for g, w in zip(gs, ws, strict=True)]).sum()

    def other(ws: list[Tensor]) -> Tensor:
        return (ws[0].float().sin().sum() + (ws[0][:4, 0].float() * ws[1].float()).sum()) * 2

    # (as in a loss: the model's terms first, then the penalty)
    first = other(ws)
    linear = torch.stack([_real_dot(g, w) for g, w in zip(gs, ws, strict=True)]).sum()
    old = torch.autograd.grad(first + c * ((linear - linear.detach()) + value), ws, create_graph=True)
    first = other(ws)
    new = torch.autograd.grad(first + c * (_gradient_value(gs, ws, value) + value), ws, create_graph=True)
    for a, b in zip(old, new, strict=True):
        assert a.dtype == b.dtype == dt
        assert torch.equal(a, b)
    (dc_old,) = torch.autograd.grad(sum(a.float().sum() for a in old), c)
    (dc_new,) = torch.autograd.grad(sum(b.float().sum() for b in new), c)
    assert torch.equal(dc_old, dc_new) and dc_new != 0


@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per", ["parameter", "layer"])
def test_decay_graph_differentiates_as_the_detached_term_trick_bit_for_bit(dt, per):
    """Unrolled's replay gives each decayed weight's gradient ``g`` (which holds ``c d w``'s value)
    the graph of ``c * d * w`` through a custom function instead of ``g + (t - t.detach())``: the
    same value and the same gradients to ``g``'s graph, ``d`` and ``w``, bit for bit."""
    from hypergrad.hparams import _with_decay_graph

    g0 = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=g0).to(dt).requires_grad_()
    raw = (
        torch.randn(6, 4, generator=g0) if per == "parameter" else torch.randn((), generator=g0)
    ).requires_grad_()
    c = torch.tensor(0.7)
    x = torch.randn(6, 4, generator=g0).to(dt).requires_grad_()
    up = torch.randn(6, 4, generator=g0).to(dt)

    def old() -> tuple[Tensor, ...]:
        d = raw.exp()
        g = (x * 3).sin()
        term = (c * (d * w)).to(g.dtype)
        out = g + (term - term.detach())
        return (out.detach(), *torch.autograd.grad((out * up).sum(), [x, raw, w]))

    def new() -> tuple[Tensor, ...]:
        d = raw.exp()
        g = (x * 3).sin()
        out = _with_decay_graph(g, c, d, w)
        return (out.detach(), *torch.autograd.grad((out * up).sum(), [x, raw, w]))

    for a, b in zip(old(), new(), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_constraint_names_take_any_case_and_an_unknown_one_lists_the_choices():
    assert hg.hparams.Hparam(0.3, "Unit").constraint is hg.hparams.Constraint.UNIT
    assert hg.hparams.Hparam(2.0, " Greater-Than ", low=1.0).constraint is hg.hparams.Constraint.GREATER_THAN
    with pytest.raises(ValueError, match=r"unknown constraint 'probability': use one of 'positive', 'unit'"):
        hg.hparams.Hparam(0.3, "probability")


def test_a_cli_whose_reader_left_exits_quietly():
    """`hypergrad list | head -0`: a BrokenPipeError traceback every time; now exit code 141 (as
    a shell reports SIGPIPE) and nothing on stderr."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = subprocess.run(
            [sys.executable, "-m", "hypergrad", "list"], stdout=w, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr.decode()
    assert b"Traceback" not in p.stderr and b"BrokenPipe" not in p.stderr


def test_marglik_hyper_step_is_never_due_before_the_first_inner_step():
    """With ``burn_in=0`` a loop asking before it steps took a hyperstep at the random
    initialisation (no MAP for the Laplace approximation); the schedule starts after step 1."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    prior = hg.hparams.PriorPrecision(model)
    hopt = hg.MarginalLikelihood(
        model,
        prior,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(prior.parameters(), lr=0.1),
        likelihood="classification",
        data_size=8,
        burn_in=0,
        every=2,
    )
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    assert not hopt.hyper_step_due()
    due = []
    for _ in range(4):
        hopt.step(batch)
        due.append(hopt.hyper_step_due())
    assert due == [False, True, False, True]
