"""Round 12, self-tuning networks and best-response hypernetworks against their authors' code.

* The STN authors' hyper-training loop (asteroidhouse/self-tuning-networks, ``cnn/hypertrain.py``
  and ``stn_utils/hyperparameter.py``) rewritten by hand in float64 from its math: T_train steps
  at per-example perturbed hyperparameters (input dropout, a contrast jitter strength, a cutout
  length, hidden dropout) with SGD + momentum, then T_val steps in eval mode on
  :math:`L_V(\\lambda + \\sigma\\epsilon) - \\tau \\sum \\log \\sigma` with separate Adam learning
  rates for :math:`\\lambda` and :math:`\\sigma`; ``hg.SelfTuning`` must follow it step for step.
* Their LSTM recipe (``lstm/train.py``): the hidden state carried across batches and detached
  between them (``repackage_hidden``), a separate validation hidden state, locked dropout.
* BestResponse (Lorraine & Duvenaud 2018), local and global: through a base with a module reached
  under two names, a frozen layer and BatchNorm; through parametrized bases (weight_norm,
  spectral_norm, orthogonal); through weight drop on an LSTM (the AWD-LSTM idiom) — each against
  central differences in float64, and a resume inside a validation phase bit for bit.
* A non-finite hypergradient at a finite validation loss changes nothing, and says where.
* Fixed here: SelfTuned refuses an ``init`` its dtype cannot hold (a bfloat16 ``Integer(97, 0,
  128)`` silently started at 98, a float16 ``Positive(1e-8)`` at 0); ``selftuning_hypergradient``
  under ``torch.no_grad()`` returned zeros instead of the gradient; a HyperNet over a sparse
  ``nn.Embedding`` crashed its first step ("reshape is not implemented for sparse tensors").
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ----------------------------------------------------------------------------- the CNN script


class _AugNet(nn.Module):
    """Per-example input dropout, contrast jitter and cutout, then two STN layers with hidden
    dropout between them (the authors' SmallCNN, flattened to vectors)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(6, 7, n), hg.nn.StnLinear(7, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.dropout(x, d["indrop"], self.training)
        if self.training:  # contrast jitter: a factor uniform on [1 - c, 1 + c] per example
            u = torch.rand(len(x), dtype=x.dtype)
            m = x.mean(1, keepdim=True)
            x = m + (x - m) * (1 + d["contrast"] * (2 * u - 1))[:, None]
        x = hg.nn.cutout(x, d["cut"], self.training)
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["drop"], self.training)
        return self.l2(h, d)


def _ce(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _cls_batch(seed: int, n: int = 8, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def test_stn_follows_the_authors_hypertraining_loop_step_for_step() -> None:
    """Six inner steps (T_train = 2) and three validation phases (T_val = 2) of the authors'
    algorithm, written by hand from their math, against hg.SelfTuning: every weight, lambda and
    sigma equal to rounding (the same random numbers in the same order)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.2, high=0.9),  # the authors' drop_max = 0.9
        indrop=hg.hparams.Rate(0.1),
        contrast=hg.hparams.Rate(0.3),
        cut=hg.hparams.Integer(2, 0, 4),
        dtype=DT,
    )
    net = _AugNet(hp.size).to(DT)
    with torch.no_grad():
        for layer in (net.l1, net.l2):
            layer.hnet.normal_(0, 0.5)
    tau, lr_h, lr_s = 0.01, 3e-3, 1e-2
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    lam = hp.raw.detach().clone().requires_grad_(True)
    rs = hp.raw_scale.detach().clone().requires_grad_(True)
    hopt = hg.SelfTuning(
        net,
        hp,
        _ce,
        _ce,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        # their hyper_optimizer and scale_optimizer: one Adam each, as two groups here
        outer_optimizer=torch.optim.Adam(
            [{"params": [hp.raw], "lr": lr_h}, {"params": [hp.raw_scale], "lr": lr_s}]
        ),
        entropy_weight=tau,
        train_steps=2,
        val_steps=2,
    )
    rng = torch.get_rng_state()
    for i in range(6):
        hopt.step(_cls_batch(i))
        while hopt.hyper_due():
            hopt.hyper_step(val_batch=_cls_batch(100 + i))

    # the reference: their perturb / hparam_transform / optimization_step, by hand
    lo, hi = hp.scale_range
    sgd = torch.optim.SGD(list(ref.values()), lr=0.1, momentum=0.9)
    adam_h, adam_s = torch.optim.Adam([lam], lr=lr_h), torch.optim.Adam([rs], lr=lr_s)

    def sigma() -> torch.Tensor:
        return lo + (hi - lo) * torch.sigmoid(rs)

    def stn(name: str, x: torch.Tensor, lt: torch.Tensor, out: int) -> torch.Tensor:
        both = x @ ref[f"{name}.weight"].t() + ref[f"{name}.bias"]
        return both[:, :out] + (lt @ ref[f"{name}.hnet"].t()) * both[:, out:]

    def drop(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        keep = (1 - p)[:, None]
        return x * (torch.rand_like(x) < keep) / keep

    def forward(x: torch.Tensor, lt: torch.Tensor, train: bool) -> torch.Tensor:
        p_drop, p_in = 0.9 * torch.sigmoid(lt[:, 0]), torch.sigmoid(lt[:, 1])
        c, cut = torch.sigmoid(lt[:, 2]), torch.floor(5 * torch.sigmoid(lt[:, 3])).clamp(0, 4).long()
        if train:
            x = drop(x, p_in.detach())
            u = torch.rand(len(x), dtype=DT)
            m = x.mean(1, keepdim=True)
            x = m + (x - m) * (1 + c.detach() * (2 * u - 1))[:, None]
            centre = torch.randint(0, 6, (len(x),))
            start, pos = centre - cut // 2, torch.arange(6)
            x = x.masked_fill((pos >= start[:, None]) & (pos < (start + cut)[:, None]), 0)
        h = torch.tanh(stn("l1", x, lt, 7))
        return stn("l2", drop(h, p_drop.detach()) if train else h, lt, 3)

    torch.set_rng_state(rng)
    for i in range(6):
        x, y = _cls_batch(i)
        lt = (lam + sigma() * torch.randn(8, 4, dtype=DT)).detach()
        sgd.zero_grad()
        F.cross_entropy(forward(x, lt, True), y).backward()
        sgd.step()
        if i % 2 == 1:
            for _ in range(2):
                x, y = _cls_batch(100 + i)
                lt = lam + sigma() * torch.randn(8, 4, dtype=DT)
                obj = F.cross_entropy(forward(x, lt, False), y) - tau * sigma().log().sum()
                lam.grad = rs.grad = None
                obj.backward()
                adam_h.step()
                adam_s.step()

    for k, v in net.named_parameters():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-12, msg=k)
    torch.testing.assert_close(hp.raw, lam, rtol=0, atol=1e-14)
    torch.testing.assert_close(hp.raw_scale, rs, rtol=0, atol=1e-14)
    moved = (hp.raw.detach() - hp.specs["drop"].raw(torch.tensor(0.2, dtype=DT))).abs()
    assert float(moved[0]) > 1e-4  # (it did move: six hypersteps of Adam at 3e-3)
    rows = hp.history()
    assert [r["inner_step"] for r in rows] == [2, 2, 4, 4, 6, 6] and rows[-1]["hyper_step"] == 6


# ----------------------------------------------------------------------------- the LSTM script

V, E, T, B = 7, 5, 4, 3


class _LM(nn.Module):
    """Embedding, locked input dropout, an StnLSTMCell unrolled over T steps from a given state,
    locked output dropout, a decoder; keeps the last state (detached) for the next batch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.emb, self.cell, self.dec = nn.Embedding(V, E), hg.nn.StnLSTMCell(E, E, n), nn.Linear(E, V)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor, state: Any, hp: Any) -> torch.Tensor:
        b = len(tokens)
        d = hp.draw(b)
        x = self.emb(tokens)
        x = x * hg.nn.dropout(x.new_ones(b, 1, E), d["dropi"], self.training)
        outs = []
        for t in range(T):
            state = self.cell(x[:, t], state, d)
            outs.append(state[0])
        h = torch.stack(outs, 1)
        h = h * hg.nn.dropout(h.new_ones(b, 1, E), d["dropo"], self.training)
        self.last = (state[0].detach(), state[1].detach())  # repackage_hidden
        return self.dec(h)


def _lm_loss(m: nn.Module, hp: Any, b: Any) -> torch.Tensor:
    x, y, h0, c0 = b  # the state the batch starts from travels with it
    return F.cross_entropy(m(x, (h0, c0), hp).reshape(-1, V), y.reshape(-1))


def test_lstm_with_hidden_state_carried_across_batches_matches_a_hand_written_loop() -> None:
    """Truncated BPTT over one token stream (the state after batch i starts batch i + 1,
    detached), a separate validation stream with its own carried state, T_train = 2, T_val = 1:
    hg.SelfTuning against the loop written by hand (gates i, f, g, o of one StnLinear over
    [x_t, h_{t-1}])."""
    stream = torch.randint(0, V, (B, 6 * T + 1), generator=torch.Generator().manual_seed(0))
    vstream = torch.randint(0, V, (B, 6 * T + 1), generator=torch.Generator().manual_seed(1))

    def seg(s: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return s[:, i * T : (i + 1) * T], s[:, i * T + 1 : (i + 1) * T + 1]

    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        dropi=hg.hparams.Rate(0.2, high=0.9), dropo=hg.hparams.Rate(0.3, high=0.9), dtype=DT
    )
    m = _LM(hp.size).to(DT)
    with torch.no_grad():
        m.cell.gates.hnet.normal_(0, 0.3)
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    lam, rs = (p.detach().clone().requires_grad_(True) for p in (hp.raw, hp.raw_scale))
    tau = 1e-3
    hopt = hg.SelfTuning(
        m,
        hp,
        _lm_loss,
        _lm_loss,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        entropy_weight=tau,
        train_steps=2,
    )
    rng = torch.get_rng_state()
    zero = torch.zeros(B, E, dtype=DT)
    train_state = val_state = (zero, zero)
    for i in range(6):
        hopt.step((*seg(stream, i), *train_state))
        assert m.last is not None
        train_state = m.last
        while hopt.hyper_due():
            hopt.hyper_step(val_batch=(*seg(vstream, i), *val_state))
            assert m.last is not None
            val_state = m.last

    lo, hi = hp.scale_range
    sgd, adam = torch.optim.SGD(list(ref.values()), lr=0.5), torch.optim.Adam([lam, rs], lr=0.05)

    def sigma() -> torch.Tensor:
        return lo + (hi - lo) * torch.sigmoid(rs)

    def run(tokens: torch.Tensor, state: Any, lt: torch.Tensor, train: bool) -> tuple[torch.Tensor, Any]:
        w, bias, v = ref["cell.gates.weight"], ref["cell.gates.bias"], ref["cell.gates.hnet"]
        x = ref["emb.weight"][tokens]
        if train:
            keep = (1 - torch.sigmoid(lt[:, 0]) * 0.9).detach()[:, None, None]
            x = x * ((torch.rand(B, 1, E, dtype=DT) < keep) / keep)
        h, c = state
        outs = []
        for t in range(T):
            both = torch.cat([x[:, t], h], 1) @ w.t() + bias
            gates = both[:, : 4 * E] + (lt @ v.t()) * both[:, 4 * E :]
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        out = torch.stack(outs, 1)
        if train:
            keep = (1 - torch.sigmoid(lt[:, 1]) * 0.9).detach()[:, None, None]
            out = out * ((torch.rand(B, 1, E, dtype=DT) < keep) / keep)
        return out @ ref["dec.weight"].t() + ref["dec.bias"], (h.detach(), c.detach())

    torch.set_rng_state(rng)
    r_train = r_val = (zero, zero)
    for i in range(6):
        x, y = seg(stream, i)
        lt = (lam + sigma() * torch.randn(B, 2, dtype=DT)).detach()
        logits, r_train = run(x, r_train, lt, True)
        sgd.zero_grad()
        F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
        sgd.step()
        if i % 2 == 1:
            x, y = seg(vstream, i)
            lt = lam + sigma() * torch.randn(B, 2, dtype=DT)
            logits, r_val = run(x, r_val, lt, False)
            lam.grad = rs.grad = None
            (F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)) - tau * sigma().log().sum()).backward()
            adam.step()

    for k, v in m.named_parameters():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-12, msg=k)
    torch.testing.assert_close(hp.raw, lam, rtol=0, atol=1e-13)
    torch.testing.assert_close(hp.raw_scale, rs, rtol=0, atol=1e-13)
    for a, b in zip(train_state + val_state, r_train + r_val, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(hp.history()) == 3


# ----------------------------------------------------------------------------- BestResponse


class _TiedBase(nn.Module):
    """A frozen input layer, one Linear reached under two names (``shared`` and ``alias``) around
    a BatchNorm, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 6).requires_grad_(False)
        self.shared, self.bn, self.head = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.alias = self.shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(x))
        h = torch.tanh(self.bn(self.shared(h)))
        return self.head(torch.tanh(self.alias(h)))


def _br_train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    d = h.draw(1)
    x = hg.nn.dropout(b[0], d["drop"].expand(len(b[0])), m.training)
    w = m.weights(h)
    decay = sum((v**2).sum() for k, v in w.items() if k.endswith("weight") and not k.startswith("frozen"))
    return F.cross_entropy(m(x, hparams=h), b[1]) + d["decay"][0] * decay


def _br_val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], hparams=h), b[1])


def _br(sampling: str, seed: int = 0) -> hg.BestResponse:
    torch.manual_seed(seed)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.05, transform="exp"),
        drop=hg.hparams.Rate(0.3, high=0.9),
        learn_scale=False,
        scale=0.4,
        dtype=DT,
    )
    net = hg.nn.HyperNet(_TiedBase().to(DT), hp.size, init_std=0.2)
    return hg.BestResponse(
        net,
        hp,
        _br_train,
        _br_val,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        sampling=sampling,
        warmup=2,
        train_steps=2,
        val_steps=2,
    )


def _val_at(hopt: hg.HyperOptimizer, vb: Any) -> float:
    net = hopt.model
    net.eval()
    try:
        with torch.no_grad():
            return float(hopt.val_loss(net, hopt.hparams, vb))
    finally:
        net.train()


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_best_response_through_tied_frozen_and_batchnorm_weights(sampling: str) -> None:
    """The hypergradient through w_phi(lambda) against central differences of the validation loss
    (float64), after a warmup and two validation phases; the frozen layer neither generated nor
    moved, the BatchNorm statistics untouched by the hypergradient. Then a checkpoint taken inside
    a validation phase, loaded into objects built from another seed, finishes the run bit for bit
    (weights, statistics, lambda, history, the schedule)."""
    hopt = _br(sampling)
    net = hopt.model
    assert isinstance(net, hg.nn.HyperNet)
    assert not any(n.startswith("frozen") for n in net.names) and "alias.weight" not in net.names
    frozen = net.base_state.get_buffer("frozen.weight").clone()
    for i in range(5):
        hopt.step(_cls_batch(i, 16, 4))
        while hopt.hyper_due():
            hopt.hyper_step(val_batch=_cls_batch(50 + i, 16, 4))
    assert hopt.hyper_steps == 4
    vb = _cls_batch(99, 32, 4)
    stats = net.state_dict()["base_state.bn.running_mean"].clone()
    (grad,), _ = hopt.hypergradient(val_batch=vb)
    assert torch.equal(net.state_dict()["base_state.bn.running_mean"], stats)
    assert torch.equal(net.base_state.get_buffer("frozen.weight"), frozen)
    fd = central_difference(lambda: _val_at(hopt, vb), hopt.hparams.raw, eps=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-3

    def finish(h: hg.BestResponse) -> hg.BestResponse:
        while h.hyper_due():
            h.hyper_step(val_batch=_cls_batch(60, 16, 4))
        for i in range(2, 7):
            h.step(_cls_batch(i, 16, 4))
            while h.hyper_due():
                h.hyper_step(val_batch=_cls_batch(50 + i, 16, 4))
        return h

    a = _br(sampling)
    for i in range(2):  # the warmup
        a.step(_cls_batch(i, 16, 4))
    a.hyper_step(val_batch=_cls_batch(51, 16, 4))  # one of the phase's two
    assert a.hyper_due()
    buf = io.BytesIO()
    torch.save({"hopt": a.state_dict(), "rng": torch.get_rng_state()}, buf)
    finish(a)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    b = _br(sampling, seed=5)
    b.load_state_dict(saved["hopt"])
    torch.set_rng_state(saved["rng"])
    finish(b)
    assert _same(a.model.state_dict(), b.model.state_dict())
    assert _same(a.hparams.state_dict(), b.hparams.state_dict())
    assert a.hparams.history() == b.hparams.history() and len(a.hparams.history()) == 6
    assert (a.inner_steps, a.hyper_steps) == (b.inner_steps, b.hyper_steps) == (7, 6)


@pytest.mark.parametrize("parametrization", [weight_norm, spectral_norm, orthogonal])
def test_best_response_generates_the_unconstrained_tensors_of_a_parametrized_base(
    parametrization: Any,
) -> None:
    """A base whose first layer is parametrized: the hypernetwork generates the parametrization's
    originals and the hypergradient matches central differences; the template is untouched."""
    torch.manual_seed(0)
    base = nn.Sequential(parametrization(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.05, transform="exp"), learn_scale=False, scale=0.3, dtype=DT
    )
    net = hg.nn.HyperNet(base, hp.size, init_std=0.3)
    assert any(".original" in n for n in net.names)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return (
            F.cross_entropy(m(b[0], hparams=h), b[1])
            + h.draw(1)["decay"][0] * (m.weights(h)["2.weight"] ** 2).sum()
        )

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        _br_val,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    template = copy.deepcopy(base.state_dict())
    for i in range(4):
        hopt.step(_cls_batch(i, 16, 4))
        hopt.hyper_step(val_batch=_cls_batch(40 + i, 16, 4))
    vb = _cls_batch(99, 16, 4)
    (grad,), _ = hopt.hypergradient(val_batch=vb)
    fd = central_difference(lambda: _val_at(hopt, vb), hp.raw, eps=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-3
    params = {k for k, _ in base.named_parameters()}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in template.items() if k in params)


class _WeightDropLSTM(nn.Module):
    """The AWD-LSTM's weight drop: dropout on the recurrent weight matrix, one mask per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.dec = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        w = hg.nn.dropout(self.lstm.weight_hh_l0[None], rate.reshape(1), self.training)[0]
        out, _ = torch.func.functional_call(self.lstm, {"weight_hh_l0": w}, (x,), strict=False)
        return self.dec(out[:, -1])


def test_weight_drop_on_an_lstm_inside_a_hypernet_matches_central_differences() -> None:
    """The generated LSTM weights reach the recurrent weight's dropout (a functional_call inside
    the base): the hypergradient w.r.t. the weight-drop rate and a decay matches central
    differences, and the template LSTM keeps its own weights (and flat weight list)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        wdrop=hg.hparams.Rate(0.3, high=0.9),
        decay=hg.hparams.Positive(1e-2, transform="exp"),
        learn_scale=False,
        scale=0.3,
        dtype=DT,
    )
    base = _WeightDropLSTM().to(DT)
    net = hg.nn.HyperNet(base, hp.size, init_std=0.3)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        d = h.draw(1)
        penalty = sum((v**2).sum() for v in m.weights(h).values())
        return F.mse_loss(m(b[0], d["wdrop"][:1], hparams=h), b[1]) + d["decay"][0] * penalty

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.mse_loss(m(b[0], h.draw(1)["wdrop"][:1], hparams=h), b[1])

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(0)

    def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 5, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)

    template = [p.clone() for p in base.parameters()]
    for _ in range(5):
        hopt.step(batch())
        hopt.hyper_step(val_batch=batch())
    vb = batch(16)
    (grad,), _ = hopt.hypergradient(val_batch=vb)
    fd = central_difference(lambda: _val_at(hopt, vb), hp.raw, eps=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(template, base.parameters(), strict=True))
    assert all(a is b for a, b in zip(base.lstm._flat_weights, base.lstm.parameters(), strict=True))


# ----------------------------------------------------------------------------- non-finite


class _Net(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(6, 6, n), hg.nn.StnLinear(6, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["drop"], self.training), d)


@pytest.mark.parametrize("method", ["stn", "best-response"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_nonfinite_hypergradient_at_a_finite_val_loss_changes_nothing(
    method: str, on_nonfinite: str
) -> None:
    """The validation loss is finite but its gradient is NaN (a backward hook): the hyperstep is
    refused naming the hyperparameters; model, lambda, sigma, their .grad, both optimisers'
    states, the history and the counters stay as they were (with "skip" the phase's turn is
    taken, as documented; with "raise" it is not)."""
    poison = [False]

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        out = m(b[0], h) if method == "stn" else m(b[0], hparams=h)
        if poison[0]:
            out.register_hook(lambda g: g * float("nan"))
        return F.cross_entropy(out, b[1])

    torch.manual_seed(0)
    if method == "stn":
        hp = hg.hparams.SelfTuned(drop=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
        model: nn.Module = _Net(hp.size).to(DT)
        hopt: hg.HyperOptimizer = hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
            train_steps=1,
            val_steps=2,
            on_nonfinite=on_nonfinite,
        )
    else:
        hp = hg.hparams.SelfTuned(drop=hg.hparams.Rate(0.2, high=0.9), learn_scale=False, dtype=DT)
        model = hg.nn.HyperNet(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT), hp.size)
        hopt = hg.BestResponse(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
            val_steps=2,
            on_nonfinite=on_nonfinite,
        )
    hopt.step(_cls_batch(0))
    hopt.hyper_step(val_batch=_cls_batch(1))  # the outer optimiser has state now
    before = copy.deepcopy(hopt.state_dict())
    grads = [p.grad.clone() for p in hp.parameters()]  # (written by the first hyperstep)
    weight_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    poison[0] = True
    if on_nonfinite == "raise":
        with pytest.raises(hg.NonFiniteError, match="hypergradient is not finite for 'raw'") as e:
            hopt.hyper_step(val_batch=_cls_batch(2))
        assert "left untouched" in str(e.value) and "outer loss = " in str(e.value)
        assert ("'raw_scale'" in str(e.value)) is (method == "stn")
    else:
        with pytest.warns(hg.NonFiniteWarning, match="step skipped"):
            assert hopt.hyper_step(val_batch=_cls_batch(2)).skipped
    poison[0] = False
    after = hopt.state_dict()
    for key in before:
        if key in ("rng", "method"):  # (the perturbation's draw advanced torch's generator)
            continue
        assert _same(before[key], after[key]), key
    assert after["method"]["history"] == before["method"]["history"]
    assert _same(after["method"], before["method"]) is (on_nonfinite == "raise")  # (the phase)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, hp.parameters(), strict=True))
    assert all(
        (a is None and p.grad is None) or (a is not None and torch.equal(a, p.grad))
        for a, p in zip(weight_grads, model.parameters(), strict=True)
    )
    assert isinstance(hopt, (hg.SelfTuning, hg.BestResponse))
    assert hopt.hyper_due() is (on_nonfinite == "raise")  # "skip" took the phase's second turn


# ----------------------------------------------------------------------------- SelfTuned's dtype


@pytest.mark.parametrize(
    ("spec", "dtype", "value"),
    [
        (hg.hparams.Integer(97, 0, 128), torch.bfloat16, "98.0"),  # started at 98, silently
        (hg.hparams.Positive(1e-8), torch.float16, "0.0"),  # a penalty of exactly 0
        (hg.hparams.Positive(1e5, transform="exp"), torch.float16, "inf"),
        (hg.hparams.Positive(1e39), torch.float32, "inf"),  # raw = inf: every step refused later
        (hg.hparams.Rate(1 - 1e-9), torch.float32, "1.0"),  # a dropout rate on its edge
    ],
)
def test_selftuned_refuses_an_init_its_dtype_cannot_hold(spec: Any, dtype: torch.dtype, value: str) -> None:
    """An init whose raw value in ``dtype`` overflows, lands on the domain's edge, or floors to
    another integer was accepted: the run silently started from another value (or failed at its
    first step with a NonFiniteError about the hyperparameters). Refused at construction, naming
    the spec, the dtype and a wider one; the same spec in float64 is held exactly."""
    wider = "float64" if dtype == torch.float32 else "float32"
    with pytest.raises(ValueError, match=rf"c=.*cannot be held in {dtype}.*value {value}.*{wider}"):
        hg.hparams.SelfTuned(c=spec, dtype=dtype)
    hp = hg.hparams.SelfTuned(c=spec, dtype=DT)
    assert hp.current()["c"][0] == pytest.approx(spec.init, rel=1e-12)


def test_a_bfloat16_model_trains_with_float32_hyperparameters_as_the_docs_advise() -> None:
    """The advice of the new error: a bfloat16 model with float32 SelfTuned (wide integer ranges
    held exactly; the layers cast the features) steps and hypersteps, lambda moving by Adam steps
    that bfloat16 would round away."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(drop=hg.hparams.Rate(0.2, high=0.9), width=hg.hparams.Integer(97, 0, 128))
    assert hp.current()["width"] == [97.0]
    model = _Net(hp.size).to(torch.bfloat16)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h).float(), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=3e-3),
        train_steps=1,
    )
    raw0 = hp.raw.detach().clone()
    for i in range(3):
        x, y = _cls_batch(i)
        hopt.step((x.to(torch.bfloat16), y))
        info = hopt.hyper_step(val_batch=(x.to(torch.bfloat16), y))
        assert not info.skipped
    assert hp.raw.dtype == torch.float32 and hp.raw.grad is not None and hp.raw.grad.dtype == torch.float32
    step = (hp.raw - raw0).abs()
    assert bool((step > 1e-3).all())  # three Adam steps of 3e-3 each
    bf16 = (raw0.to(torch.bfloat16) - 3e-3 * torch.sign(hp.raw - raw0).to(torch.bfloat16)).float()
    assert torch.equal(bf16, raw0.to(torch.bfloat16).float())  # (bfloat16 would not move it)


# ----------------------------------------------------------------------------- the pure function


def test_the_pure_selftuning_hypergradient_under_no_grad_is_the_closed_form() -> None:
    """``selftuning_hypergradient`` called from a ``torch.no_grad()`` block (an evaluation loop's)
    returned zeros for every hyperparameter, and ``reached`` all False: the closure ran without a
    graph. It now runs with autograd on, as the methods' hypersteps do: for
    :math:`L_V = r^2` at the raw value :math:`r` the gradient is :math:`2r`, and sigma's is the
    entropy term's :math:`-\\tau\\,(s_{max} - s_{min})\\,s(1 - s)/\\sigma`. Inference mode is refused
    by name."""
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3), dtype=DT)
    tau = 0.1

    def val() -> torch.Tensor:
        return (hp.draw(1).features ** 2).sum()

    r = torch.logit(torch.tensor(0.3, dtype=DT))
    lo, hi = hp.scale_range
    s = torch.sigmoid(hp.raw_scale.detach()[0])
    sigma = lo + (hi - lo) * s
    expected = (2 * r, -tau * (hi - lo) * s * (1 - s) / sigma)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        with grad_mode():
            grads, lv, reached = hg.selftuning_hypergradient(val, hp, tau)
        assert reached.tolist() == [True, True]
        torch.testing.assert_close(lv, r**2, rtol=1e-14, atol=0)
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g[0], e, rtol=1e-12, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        hg.selftuning_hypergradient(val, hp, tau)


# ----------------------------------------------------------------------------- sparse embeddings


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4, sparse=sparse), nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens).mean(1))


def test_a_hypernet_over_a_sparse_embedding_trains_as_over_a_dense_one() -> None:
    """A base with ``nn.Embedding(sparse=True)`` (the usual language-model setting) crashed the
    first BestResponse step deep in autograd ("reshape is not implemented for sparse tensors": the
    sparse gradient met the one dense vector the weights are generated from). It now runs dense
    inside the call: the run is bit for bit that of the same base with sparse=False, its
    hypergradient matches central differences, and the template keeps sparse=True (its own
    gradients outside the HyperNet still sparse)."""
    tokens = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))

    def run(sparse: bool) -> hg.BestResponse:
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False, scale=0.3, dtype=DT
        )
        net = hg.nn.HyperNet(_Bag(sparse).to(DT), hp.size, init_std=0.3)

        def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            penalty = (m.weights(h)["out.weight"] ** 2).sum()
            return F.cross_entropy(m(b[0], hparams=h), b[1]) + h.draw(1)["decay"][0] * penalty

        def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0], hparams=h), b[1])

        hopt = hg.BestResponse(
            net,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        )
        for _ in range(3):
            hopt.step((tokens, labels))
            hopt.hyper_step(val_batch=(tokens, labels))
        return hopt

    dense, sparse = run(False), run(True)
    assert _same(dense.model.state_dict(), sparse.model.state_dict())
    assert torch.equal(dense.hparams.raw, sparse.hparams.raw)
    (grad,), _ = sparse.hypergradient(val_batch=(tokens, labels))
    fd = central_difference(lambda: _val_at(sparse, (tokens, labels)), sparse.hparams.raw, eps=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().min()) > 1e-3
    assert isinstance(sparse.model, hg.nn.HyperNet)
    template = sparse.model.base
    assert template.emb.sparse
    F.cross_entropy(template(tokens), labels).backward()
    assert template.emb.weight.grad is not None and template.emb.weight.grad.is_sparse


def test_delta_stn_calls_the_training_loss_twice_per_step_and_the_batch_carries_the_state() -> None:
    """Delta-STN's step runs ``train_loss`` twice on one batch (base, then response), as its
    docstring now says: a hidden state kept in the model by the loss is kept twice. The state a
    batch starts from, carried inside the batch, is what both passes see; the run stays finite
    and the first pass is at the current lambda (its features exactly 0)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        dropi=hg.hparams.Rate(0.2, high=0.9), dropo=hg.hparams.Rate(0.3, high=0.9), dtype=DT
    )
    m = _LM(hp.size).to(DT)
    seen: list[tuple[torch.Tensor, bool]] = []

    def loss(model: nn.Module, h: Any, b: Any) -> torch.Tensor:
        seen.append((b[2], bool((h.draw(len(b[0])).features == 0).all())))
        return _lm_loss(model, h, b)

    hopt = hg.SelfTuning(
        m,
        hp,
        loss,
        _lm_loss,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        delta=True,
        train_steps=1,
    )
    stream = torch.randint(0, V, (B, 4 * T + 1), generator=torch.Generator().manual_seed(0))
    state = (torch.zeros(B, E, dtype=DT), torch.zeros(B, E, dtype=DT))
    for i in range(4):
        x, y = stream[:, i * T : (i + 1) * T], stream[:, i * T + 1 : (i + 1) * T + 1]
        seen.clear()
        assert torch.isfinite(hopt.step((x, y, *state)))
        # (the response pass runs on a copy of the batch as the step received it: the base pass
        # may change its batch where no version counter sees it; round 26)
        assert len(seen) == 2 and seen[0][0] is state[0] and torch.equal(seen[1][0], state[0])
        assert [zero for _, zero in seen] == [True, False]  # base pass, then response pass
        assert m.last is not None
        state = m.last
        hopt.hyper_step(val_batch=(x, y, *state))
    assert all(torch.isfinite(t).all() for t in state) and len(hp.history()) == 4


class _NormedBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens).mean(1))


def test_a_hypernet_names_an_embedding_that_renormalises_its_weight_in_place() -> None:
    """``nn.Embedding(max_norm=...)`` renormalises its weight in place in the forward; a generated
    weight (a view of one vector, on lambda's graph) cannot take that, and the first step crashed
    deep in autograd ("... is a view and its base ... has been modified inplace"). Refused at
    construction, naming the module; frozen, it is a constant renormalised as torch does."""
    base = _NormedBag().to(DT)
    with pytest.raises(ValueError, match=r"base\.emb is an embedding with max_norm=0\.5.*max_norm=None"):
        hg.nn.HyperNet(base, 1)
    base.emb.requires_grad_(False)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False, scale=0.3, dtype=DT
    )
    net = hg.nn.HyperNet(base, hp.size, init_std=0.3)

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        penalty = (m.weights(h)["out.weight"] ** 2).sum()
        return F.cross_entropy(m(b[0], hparams=h), b[1]) + h.draw(1)["decay"][0] * penalty

    hopt = hg.BestResponse(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    tokens = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))
    hopt.step((tokens, labels))
    assert not hopt.hyper_step(val_batch=(tokens, labels)).skipped
    rows = net.base_state.get_buffer("emb.weight")[tokens.unique()]
    assert float(rows.norm(dim=1).max()) <= 0.5 + 1e-12  # (looked-up rows renormalised)


def _pv_setup(perturb_val: bool, learn_scale: bool = False) -> tuple[Any, ...]:
    torch.manual_seed(0)
    kw: dict[str, Any] = {} if learn_scale else {"learn_scale": False, "scale": 0.5}
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), **kw).to(torch.float64)

    class Net(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.l1, self.l2 = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n)

        def forward(self, x: Tensor, h: Any) -> Tensor:
            d = h.draw(len(x))
            return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["p"], self.training), d)

    model = Net(hp.size).to(torch.float64)

    def loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        perturb_val=perturb_val,
    )
    return hopt, hp, model, loss


def test_perturb_val_false_takes_the_validation_step_at_lambda_itself() -> None:
    """The authors' code, when it does not tune the scales, takes the validation step at the
    unperturbed lambda; ``perturb_val=False`` does that: the hypergradient is the central
    difference of the validation loss through the best response at lambda (eval mode), and the
    hyperstep draws no random numbers."""
    hopt, hp, model, loss = _pv_setup(perturb_val=False)
    b = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    hopt.step(b)
    hopt.step(b)

    def f() -> float:
        model.eval()
        with torch.no_grad():
            v = float(loss(model, hp, b))
        model.train()
        return v

    eps = 1e-6
    with torch.no_grad():
        hp.raw.add_(eps)
        fp = f()
        hp.raw.sub_(2 * eps)
        fm = f()
        hp.raw.add_(eps)
    fd = (fp - fm) / (2 * eps)
    rng = torch.get_rng_state()
    hopt.hyper_step(val_batch=b)
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn
    assert abs(fd) > 1e-5  # (a non-trivial case)
    assert float(hp.raw.grad) == pytest.approx(fd, rel=1e-5)
    # the default perturbs: another gradient, and the RNG moves
    hopt2, hp2, _, _ = _pv_setup(perturb_val=True)
    hopt2.step(b)
    hopt2.step(b)
    rng = torch.get_rng_state()
    hopt2.hyper_step(val_batch=b)
    assert not torch.equal(rng, torch.get_rng_state())
    assert float(hp2.raw.grad) != pytest.approx(fd, rel=1e-3)


def test_perturb_val_false_with_a_learned_scale_is_refused() -> None:
    with pytest.raises(ValueError, match=r"perturb_val=False.*learn_scale=False"):
        _pv_setup(perturb_val=False, learn_scale=True)
    with pytest.raises(TypeError, match="perturb_val must be a bool"):
        _pv_setup(perturb_val=1)  # type: ignore[arg-type]
