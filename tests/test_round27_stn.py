"""Round 27: self-tuning networks and best-response hypernetworks as research scripts use them.

Bugs fixed with these tests (each failed before its fix):

* Delta-STN gave a parameter outside ``inner_optimizer`` (a second optimiser's) the base pass's
  gradient only, also where it holds response entries (an ``StnLinear``'s weight, whose hyper
  half's rows the base pass multiplies by 0): those rows got exactly 0 and the hyper half never
  trained, silently (the same weight inside ``inner_optimizer`` gets the response pass's gradient).
* An STN layer given one hyperparameter's per-example values (``layer(x, d["dropout"])``) instead
  of the draw was refused with a message blaming the layer's ``n_hparams`` ("features of shape
  (8, 8); build the layer with n_hparams=hparams.size").
* A hyperstep's perturbation is drawn once and kept for every later call of ``val_loss``: a
  ``val_loss`` that first runs the model under ``torch.no_grad()`` (an accuracy for logging)
  cached a draw without a graph to lambda and sigma, so lambda's hypergradient came out exactly 0
  (SelfTuning and BestResponse), with a DisconnectedWarning that names other causes.

New coverage (passing): Delta-STN's hyperstep at unperturbed lambda (``perturb_val=False``)
against central differences of the written-out objective; Delta-STN's step on grouped, dilated,
circular and reflect-padded STN convolutions with BatchNorm and gradient clipping against an
independent ``torch.func.jvp`` reference; BestResponse through a TransformerEncoderLayer base
against central differences.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import hypergrad as hg

DT = torch.float64


class _Mlp(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(3, 4, n, dtype=DT)
        self.l2 = hg.nn.StnLinear(4, 2, n, dtype=DT)

    def forward(self, x: torch.Tensor, h: object) -> torch.Tensor:
        d = h.draw(len(x))  # type: ignore[attr-defined]
        return self.l2(torch.tanh(self.l1(x, d)), d)


def _ce(m: nn.Module, h: object, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


# ----------------------------------------------------------------------------- bugs


def test_delta_stn_trains_the_hyper_half_of_a_weight_held_by_a_second_optimiser() -> None:
    # the same step, once with l1.weight in inner_optimizer and once in a second optimiser: the
    # gradient it holds after step() must be the same (plain backward() semantics); the hyper
    # half's rows (l1.weight[4:]) got exactly 0 in the second case
    torch.manual_seed(0)
    hp0 = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    m0 = _Mlp(hp0.size)
    with torch.no_grad():
        for layer in (m0.l1, m0.l2):
            layer.hnet.normal_()  # (a response map grown by training: the rows' gradient is O(1))
    batch = _data()
    grads = []
    for split in (False, True):
        m, hp = copy.deepcopy(m0), copy.deepcopy(hp0)
        inner = [p for n, p in m.named_parameters() if not (split and n == "l1.weight")]
        hopt = hg.SelfTuning(
            m,
            hp,
            _ce,
            _ce,
            delta=True,
            inner_optimizer=torch.optim.SGD(inner, lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )
        torch.manual_seed(3)
        hopt.step(batch)
        grads.append(m.l1.weight.grad.clone())
    assert grads[0][4:].abs().max() > 1e-3  # the response pass's gradient on the hyper half
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def _metrics_first(m: nn.Module, h: object, b: tuple[torch.Tensor, torch.Tensor], call) -> torch.Tensor:
    x, y = b
    with torch.no_grad():  # an accuracy for logging, computed before the loss
        (call(m, x, h).argmax(1) == y).double().mean()
    return F.cross_entropy(call(m, x, h), y)


@pytest.mark.parametrize("method", ["selftuning", "best_response"])
def test_a_val_loss_that_logs_an_accuracy_under_no_grad_first_keeps_its_hypergradient(method: str) -> None:
    torch.manual_seed(0)
    batch = _data()
    if method == "selftuning":
        hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
        model: nn.Module = _Mlp(hp.size)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))

        def call(m, x, h):
            return m(x, h)

        cls, kw = hg.SelfTuning, {}
    else:
        hp = hg.hparams.SelfTuned(w=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False, dtype=DT)
        base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        model = hg.nn.HyperNet(base, hp.size, init_std=0.3)

        def call(m, x, h):
            return m(x, hparams=h)

        cls, kw = hg.BestResponse, {}
    plain = lambda m, h, b: F.cross_entropy(call(m, b[0], h), b[1])  # noqa: E731
    hopt = cls(
        model,
        hp,
        plain,
        plain,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        **kw,
    )
    torch.manual_seed(7)
    ref, _ = hopt.hypergradient(val_batch=batch)
    assert ref[0].abs().max() > 1e-2
    hopt.val_loss = lambda m, h, b: _metrics_first(m, h, b, call)
    torch.manual_seed(7)  # (the same perturbation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.DisconnectedWarning)
        got, _ = hopt.hypergradient(val_batch=batch)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_a_layer_given_one_hyperparameters_values_instead_of_the_draw_says_so() -> None:
    # layer(x, d["dropout"]) (a (B,) tensor of values) instead of layer(x, d): the 1-D tensor was
    # expanded to (B, B) and refused with "built for n_hparams=1 ... features of shape (8, 8); build
    # the layer with n_hparams=hparams.size", which blames the (correct) layer
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    d = hp.draw(8)
    for layer, x in (
        (hg.nn.StnLinear(3, 4, hp.size, dtype=DT), torch.randn(8, 3, dtype=DT)),
        (hg.nn.StnConv2d(1, 2, 3, hp.size, dtype=DT), torch.randn(8, 1, 5, 5, dtype=DT)),
    ):
        with pytest.raises(ValueError) as err:
            layer(x, d["dropout"])
        text = str(err.value)
        assert "build the layer" not in text and "(8, 8)" not in text, text
        assert "1-D" in text and "draw" in text, text
    # (the features of one lambda, (H,), are still broadcast to every example)
    out = hg.nn.StnLinear(3, 4, hp.size, dtype=DT)(torch.randn(8, 3, dtype=DT), hp.raw.detach())
    assert out.shape == (8, 4)


# ----------------------------------------------------------------------------- new coverage


def test_delta_stn_hyperstep_at_the_unperturbed_lambda_is_the_central_differences_of_its_objective() -> None:
    # New: delta=True with perturb_val=False (untested together). The objective is the validation
    # loss of the network fed the centred features lambda' - lambda (the centre held at the
    # current lambda), plus a term reading a value directly; LayerNorm, a low-rank layer, an
    # Integer spec among the features
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, high=0.9),
        w=hg.hparams.Positive(0.1, transform="exp"),
        c=hg.hparams.Integer(3, 0, 6),
        learn_scale=False,
        scale=0.4,
        dtype=DT,
    )

    class Net(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.l1, self.ln = hg.nn.StnLinear(3, 6, n, dtype=DT), nn.LayerNorm(6, dtype=DT)
            self.l2 = hg.nn.StnLinear(6, 2, n, rank=2, dtype=DT)

        def forward(self, x, f):
            return self.l2(torch.tanh(self.ln(self.l1(x, f))), f)

    m = Net(hp.size)

    def tl(m, h, b):
        d = h.draw(len(b[0]))
        return F.cross_entropy(m(b[0], d), b[1]) + d["w"][0] * (m.l1.weight**2).sum()

    def vl(m, h, b):
        d = h.draw(len(b[0]))
        return F.cross_entropy(m(b[0], d), b[1]) + 0.1 * d["w"][0]

    hopt = hg.SelfTuning(
        m,
        hp,
        tl,
        vl,
        delta=True,
        perturb_val=False,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    x, y = _data()
    for _ in range(2):
        hopt.step((x, y))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g, info = hopt.hypergradient(val_batch=(x, y))
    lam0 = hp.raw.detach().clone()

    def objective(lam: torch.Tensor) -> float:
        m.eval()
        try:
            with torch.no_grad():
                out = F.cross_entropy(m(x, (lam - lam0).expand(len(x), -1)), y)
                return float(out + 0.1 * hp.values_of(lam)["w"])
        finally:
            m.train()

    assert info.outer_loss == pytest.approx(objective(lam0), rel=1e-12)
    eps = 1e-6
    fd = torch.tensor(
        [(objective(lam0 + eps * e) - objective(lam0 - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=DT)],
        dtype=DT,
    )
    torch.testing.assert_close(g[0], fd, rtol=1e-6, atol=1e-9)
    assert g[0].abs().min() > 1e-4  # each of the three reaches the loss


@pytest.mark.parametrize("linearize", [True, False])
def test_delta_stn_step_on_grouped_circular_convolutions_with_batchnorm_and_clipping_is_the_reference(
    linearize: bool,
) -> None:
    # New: grouped + dilated + circular "same" and reflect-padded StnConv1d between BatchNorm,
    # a per-example weighted loss, a per-batch penalty and max_grad_norm, against the paper's step
    # written out with torch.func: base gradient at Delta = 0, response gradient on
    # f(0) + J Delta (or f(Delta) without linearisation), combined by the response masks, clipped
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, high=0.9),
        w=hg.hparams.Positive(0.1, transform="exp", per_batch=True),
        dtype=DT,
    )

    class Net(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.c1 = hg.nn.StnConv1d(2, 4, 3, n, padding=1, padding_mode="reflect", dtype=DT)
            self.bn = nn.BatchNorm1d(4, dtype=DT)
            self.c2 = hg.nn.StnConv1d(
                4, 4, 2, n, padding="same", groups=2, padding_mode="circular", dilation=2, dtype=DT
            )
            self.head = hg.nn.StnLinear(4 * 7, 2, n, dtype=DT)

        def forward(self, x, f):
            h = torch.relu(self.c2(torch.tanh(self.bn(self.c1(x, f))), f))
            return self.head(h.flatten(1), f)

    m = Net(hp.size)
    with torch.no_grad():
        for layer in (m.c1, m.c2, m.head):
            layer.hnet.normal_()
    seen = []

    def loss_of(out, values, c1_weight, y):
        per = F.cross_entropy(out, y, reduction="none")
        return (per * (1 + values["p"])).mean() + values["w"][0] * (c1_weight**2).sum()

    def tl(m, h, b):
        d = h.draw(len(b[0]))
        seen.append((d.features.clone(), {k: v.clone() for k, v in d.values.items()}))
        return loss_of(m(b[0], d), d, m.c1.conv.weight, b[1])

    m0 = copy.deepcopy(m)
    hopt = hg.SelfTuning(
        m,
        hp,
        tl,
        tl,
        delta=True,
        linearize=linearize,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 2, 7, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    hopt.step((x, y), max_grad_norm=0.5)
    (f_base, v_base), (delta, v_resp) = seen
    assert f_base.abs().max() == 0 and delta.abs().max() > 0.1

    params = {n: p.detach().clone().requires_grad_() for n, p in m0.named_parameters()}
    buffers = dict(m0.named_buffers())

    def net(features):
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        return functional_call(m0, state, (x, features))

    names = list(params)
    gb = torch.autograd.grad(
        loss_of(net(torch.zeros_like(delta)), v_base, params["c1.conv.weight"], y), list(params.values())
    )
    if linearize:
        primal, tangent = jvp(net, (torch.zeros_like(delta),), (delta,))
        out = primal + tangent
    else:
        out = net(delta)
    gr = torch.autograd.grad(loss_of(out, v_resp, params["c1.conv.weight"], y), list(params.values()))
    masks, own = hg.nn.response_masks(m0), dict(m0.named_parameters())
    grad = {}
    for n, a, b in zip(names, gb, gr, strict=True):
        mask = masks.get(id(own[n]))
        grad[n] = a if mask is None else (b if mask is True else torch.where(mask, b, a))
    total = torch.sqrt(sum((v**2).sum() for v in grad.values()))
    assert total > 0.5  # the clipping acts
    scale = 0.5 / (total + 1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), params[n].detach() - 0.1 * scale * grad[n], rtol=0, atol=1e-13)


def test_best_response_through_a_transformer_encoder_layer_is_the_central_differences() -> None:
    # New: a HyperNet generating a TransformerEncoderLayer's weights (attention in_proj, its
    # dropout switched off by the hyperstep's eval mode); a penalty on a generated weight in the
    # training loss
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        w=hg.hparams.Positive(0.1, transform="exp"),
        q=hg.hparams.Rate(0.4),
        learn_scale=False,
        scale=0.3,
        dtype=DT,
    )
    base = nn.Sequential(
        nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True, dtype=DT),
        nn.Flatten(),
        nn.Linear(12, 2, dtype=DT),
    )
    net = hg.nn.HyperNet(base, hp.size, init_std=0.1)

    def tl(m, h, b):
        return (
            F.cross_entropy(m(b[0], hparams=h), b[1])
            + h.draw(1)["w"][0] * (m.weights(h)["2.weight"] ** 2).sum()
        )

    def vl(m, h, b):
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    hopt = hg.BestResponse(
        net,
        hp,
        tl,
        vl,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 4, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    for _ in range(3):
        hopt.step((x, y))
    grads, info = hopt.hypergradient(val_batch=(x, y))
    lam0 = hp.raw.detach().clone()

    def objective(lam: torch.Tensor) -> float:
        net.eval()
        try:
            with torch.no_grad():
                return float(F.cross_entropy(net(x, hparams=lam), y))
        finally:
            net.train()

    assert info.outer_loss == pytest.approx(objective(lam0), rel=1e-12)
    eps = 1e-6
    fd = torch.tensor(
        [(objective(lam0 + eps * e) - objective(lam0 - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=DT)],
        dtype=DT,
    )
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-9)
    assert grads[0].abs().min() > 1e-3
