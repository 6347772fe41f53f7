"""Round 7, self-tuning networks as a new user would drive them: BestResponse with a val_loss
that reads a hyperparameter's value, resumes inside a validation phase, empty batches and other
batch sizes, StnLSTMCell's inputs, parametrized STN layers under Delta-STN, and what was probed
and found right (sequences linearised, kwargs and buffers through a HyperNet, mixed precision)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import hypergrad as hg
from hypergrad._stn_hparams import _Mode

DT = torch.float64


# ----------------------------------------------------------------------------- BestResponse


class _Base(nn.Module):
    """A base with BatchNorm, keyword arguments and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.l, self.bn, self.o = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, *, temperature: float = 1.0, mask: Any = None) -> dict[str, Any]:
        h = torch.tanh(self.bn(self.l(x)))
        if mask is not None:
            h = h * mask
        return {"logits": self.o(h) / temperature}


class _Response(nn.Module):
    """A custom hypernetwork with a buffer (a fixed centre for lambda)."""

    def __init__(self, n_weights: int) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.5, -0.2]))
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, n_weights)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(lam - self.mu)))


def _br_train(m: nn.Module, h: hg.hparams.SelfTuned, b: Any) -> torch.Tensor:
    w = m.weights(h)
    out = m(b[0], hparams=h, temperature=2.0, mask=torch.ones(6, dtype=DT))["logits"]
    decay = sum((v**2).sum() for k, v in w.items() if k.endswith("weight"))
    return F.cross_entropy(out, b[1]) + h.draw(1)["a"][0] * decay


def _br_val(m: nn.Module, h: hg.hparams.SelfTuned, b: Any) -> torch.Tensor:
    # a penalty on the value itself: a direct term dL_V/dlambda besides the best response's
    return (
        F.cross_entropy(m(b[0], hparams=h, temperature=2.0)["logits"], b[1])
        + 0.5 * h.draw(len(b[0]))["a"].mean() ** 2
    )


def _best_response(sampling: str = "local", **kw: Any) -> hg.BestResponse:
    torch.manual_seed(0)
    base = _Base().to(DT)
    n_weights = sum(p.numel() for p in base.parameters())
    hp = hg.hparams.SelfTuned(
        a=hg.hparams.Positive(0.3, transform="exp"),
        t=hg.hparams.Integer(2, 1, 5),
        learn_scale=False,
        dtype=DT,
    )
    net = hg.nn.HyperNet(base, hp.size, hypernet=_Response(n_weights).to(DT))
    return hg.BestResponse(
        net,
        hp,
        _br_train,
        _br_val,
        sampling=sampling,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        **kw,
    )


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_best_response_hypergradient_keeps_a_val_loss_term_on_the_value(sampling: str) -> None:
    """Before: the hyperstep drew the current values detached, so a val_loss reading a value
    (a penalty on it) lost its direct term: 0.0169 against the central difference 0.0269 on
    a ridge problem. Checked here through a custom hypernetwork with a buffer, a base with
    BatchNorm, keyword arguments and a dict output; the hyperstep leaves the statistics alone."""
    hopt = _best_response(sampling)
    net, hp = hopt.model, hopt.hparams
    assert isinstance(net, hg.nn.HyperNet) and isinstance(hp, hg.hparams.SelfTuned)
    for i in range(3):
        hopt.step(_batch(i))
    vb = _batch(7, n=32)
    stats = copy.deepcopy(net.base_state.state_dict())
    (g,), info = hopt.hypergradient(val_batch=vb)
    assert all(torch.equal(v, net.base_state.state_dict()[k]) for k, v in stats.items())

    def objective(raw: torch.Tensor) -> float:
        with torch.no_grad():
            hp.raw.copy_(raw)
            net.eval()
            try:
                return float(_br_val(net, hp, vb))
            finally:
                net.train()

    r0 = hp.raw.detach().clone()
    assert info.outer_loss == pytest.approx(objective(r0), rel=1e-12)
    h = 1e-6
    fd = torch.tensor([(objective(r0 + e) - objective(r0 - e)) / (2 * h) for e in torch.eye(2, dtype=DT) * h])
    hp.raw.data.copy_(r0)
    torch.testing.assert_close(g, fd.to(DT), rtol=1e-6, atol=1e-8)
    # the direct term alone is 0.5 d(a^2)/dr = a^2 = 0.09: without it the check fails
    assert abs(float(g[0]) - float(fd[0])) < 1e-3 * 0.09


def test_selftuning_hypergradient_outside_a_method_differentiates_the_values() -> None:
    """The pure function over a closure, outside any method: a loss on the values themselves gets
    its gradient (d/dr of (sigmoid-stretched r)^2 and of softplus(r)); outside it, the values of
    a draw are plain numbers (no graph, so float() is quiet), the features keep theirs."""
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, low=0.1, high=0.9), s=hg.hparams.Positive(0.2), learn_scale=False, dtype=DT
    )
    (gr,), _, reached = hg.selftuning_hypergradient(
        lambda: hp.draw(3)["p"].square().sum() + hp.draw(3)["s"].sum(), hp, 0.0
    )
    p, r = 0.3, hp.raw.detach()
    sig = torch.sigmoid(r)
    truth = torch.stack([3 * 2 * p * 0.8 * sig[0] * (1 - sig[0]), 3 * sig[1]])
    torch.testing.assert_close(gr, truth, rtol=1e-12, atol=0)
    assert bool(reached.all())
    d = hp.draw(2)
    assert not d["p"].requires_grad and d.features.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(d["p"][0]) == pytest.approx(0.3)


def test_best_response_resumed_inside_a_validation_phase_finishes_it_as_the_straight_run() -> None:
    """Before: BestResponse saved no validation phase, so a run resumed after the first of
    val_steps=3 hypersteps took 3 more (4 in all) and drifted from the straight run."""

    def run(hopt: hg.BestResponse, start: int, stop: int) -> list[int]:
        taken = []
        for i in range(start, stop):
            hopt.step(_batch(i))
            n = 0
            while hopt.hyper_due():
                hopt.hyper_step(val_batch=_batch(100 + i))
                n += 1
            taken.append(n)
        return taken

    straight = _best_response("global", val_steps=3, train_steps=2)
    assert run(straight, 0, 6) == [0, 3, 0, 3, 0, 3]
    first = _best_response("global", val_steps=3, train_steps=2)
    run(first, 0, 3)
    first.step(_batch(3))
    first.hyper_step(val_batch=_batch(103))  # one of the phase's three
    state = copy.deepcopy(first.state_dict())
    resumed = _best_response("global", val_steps=3, train_steps=2)
    resumed.load_state_dict(state)
    n = 0
    while resumed.hyper_due():
        resumed.hyper_step(val_batch=_batch(103))
        n += 1
    assert n == 2
    assert run(resumed, 4, 6) == [0, 3]
    assert resumed.hyper_steps == straight.hyper_steps == 9
    for a, b in zip(straight.hparams.parameters(), resumed.hparams.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight.hparams.history() == resumed.hparams.history()


# ----------------------------------------------------------------------------- batch sizes


def test_empty_batches_pass_through_stn_layers_like_torch_layers() -> None:
    """Before: an empty batch (a masked subset with no example, ``model(x[labelled], hp)``)
    raised "draw: batch_size must be a positive int, got 0" from a draw the user never made;
    torch's layers take it. Every mode draws (0, H); a shared draw asked first for 0 rows
    still gives the same lambda to a later call for 1 (it had kept an empty one)."""
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, high=0.9), n=hg.hparams.Integer(2, 0, 4, per_batch=True), dtype=DT
    )
    lin = hg.nn.StnLinear(3, 2, hp.size).to(DT)
    conv = hg.nn.StnConv2d(1, 2, 3, hp.size, padding=1).to(DT)
    x = torch.zeros(0, 3, dtype=DT)
    assert lin(x, hp).shape == (0, 2) == nn.Linear(3, 2).to(DT)(x).shape
    assert conv(torch.zeros(0, 1, 5, 5, dtype=DT), hp).shape == (0, 2, 5, 5)
    for mode in _Mode:
        with hp._drawing(mode):
            empty, one, three = hp.draw(0), hp.draw(1), hp.draw(3)
        assert empty.features.shape == (0, 2) and empty["p"].shape == (0,) and three.features.shape == (3, 2)
        if mode is _Mode.SHARED_TRAIN:
            assert torch.equal(one.features[0], three.features[2])
    with hp._drawing(_Mode.VAL):  # an empty validation batch: a zero gradient, not an error
        (g,) = torch.autograd.grad(lin(x, hp).sum(), [hp.raw], allow_unused=True, materialize_grads=True)
    assert float(g.abs().sum()) == 0.0


def test_draw_takes_numpy_and_tensor_integers_and_names_what_is_no_count() -> None:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9))
    for n in (np.int64(3), torch.tensor(3), 3):
        assert len(hp.draw(n)) == 3  # type: ignore[arg-type]
    for bad in (-1, 2.0, True, torch.tensor([3, 4]), torch.tensor(3.0), "3"):
        with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
            hp.draw(bad)  # type: ignore[arg-type]


def test_stn_lstm_cell_names_a_sequence_and_a_bad_state() -> None:
    """Before: a whole (B, T, in) sequence gave "Tensors must have same number of dimensions",
    a hidden state of the wrong width a matmul shape error, a bare h "too many values to
    unpack"; now each names itself (as nn.LSTMCell does)."""
    cell = hg.nn.StnLSTMCell(3, 4, n_hparams=1).to(DT)
    f = torch.zeros(2, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"one time step, got \(2, 5, 3\); unroll"):
        cell(torch.zeros(2, 5, 3, dtype=DT), None, f)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3\)"):
        cell(torch.zeros(2, 4, dtype=DT), None, f)
    with pytest.raises(ValueError, match=r"state h must have shape \(2, 4\), got \(2, 3\)"):
        cell(torch.zeros(2, 3, dtype=DT), (torch.zeros(2, 3, dtype=DT), torch.zeros(2, 4, dtype=DT)), f)
    with pytest.raises(ValueError, match=r"state c must have shape"):
        cell(torch.zeros(2, 3, dtype=DT), (torch.zeros(2, 4, dtype=DT), torch.zeros(1, 4, dtype=DT)), f)
    with pytest.raises(ValueError, match=r"pair \(h, c\)"):
        cell(torch.zeros(2, 3, dtype=DT), torch.zeros(2, 4, dtype=DT), f)  # type: ignore[arg-type]
    h, c = cell(torch.zeros(2, 3, dtype=DT), [torch.zeros(2, 4, dtype=DT)] * 2, f)  # a list is fine
    assert h.shape == c.shape == (2, 4)


# ----------------------------------------------------------------------------- parametrized layers


class _Two(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n)
        self.plain = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.l1(torch.tanh(self.plain(x)), d)), d)


def _stn_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _selftuning(model: nn.Module, hp: hg.hparams.SelfTuned, delta: bool) -> hg.SelfTuning:
    return hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        delta=delta,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )


def test_delta_stn_refuses_a_parametrized_stn_layer_and_plain_stn_trains_it() -> None:
    """Before: weight_norm on an StnLinear under Delta-STN hid the weight's rows from the
    response masks, so the step kept only the base gradient for the whole tensor and the hyper
    half never moved (max change 0.0 after 3 steps, against 0.02 for the base rows); a
    spectral-normed ``hnet`` likewise (0.0, against 0.017 for a plain one)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _Two(hp.size).to(DT)
    with torch.no_grad():  # a visible response
        model.l1.hnet.normal_(0, 0.5)
    weight_norm(model.l1, "weight", dim=0)
    with pytest.raises(ValueError, match=r"\['l1.weight'\].*parametriz.*delta=False"):
        _selftuning(model, hp, delta=True)
    hopt = _selftuning(model, hp, delta=False)  # plain STN: ordinary autograd, both halves train
    v = model.l1.parametrizations.weight.original1
    before = v.detach().clone()
    for i in range(3):
        hopt.step(_batch(i))
    assert float((v.detach()[8:] - before[8:]).abs().max()) > 1e-3
    # a parametrized response map would be trained on the base objective only (no gradient there)
    torch.manual_seed(0)
    spectral = _Two(hp.size).to(DT)
    torch.nn.utils.parametrizations.spectral_norm(spectral.l2, "hnet")
    with pytest.raises(ValueError, match=r"\['l2.hnet'\]"):
        _selftuning(spectral, hp, delta=True)
    # a parametrized ordinary layer next to STN layers is fine under Delta-STN
    torch.manual_seed(0)
    other = _Two(hp.size).to(DT)
    weight_norm(other.plain, "weight")
    _selftuning(other, hp, delta=True).step(_batch(0))


# ----------------------------------------------------------------------------- probed and right


class _AllKinds(nn.Module):
    """Every spec kind at once: a rate with low > 0, positives of both transforms (one of size
    2), integers (size 2, perturbed once per batch) driving cutout and a random shift, and an
    ordinary layer frozen next to the STN layers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.l1, self.l2 = hg.nn.StnLinear(6, 8, n), hg.nn.StnLinear(8, 3, n, rank=2)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.gaussian_noise(x, d["noise"][:, 0] + d["noise"][:, 1], self.training)
        x = hg.nn.cutout(x, d["ints"][:, 0], self.training)
        x = hg.nn.random_shift(x, d["ints"][:, 1], self.training)
        h = torch.tanh(self.l1(torch.tanh(self.frozen(x)), d)) * d["gain"][:, None].sqrt()
        return self.l2(hg.nn.dropout(h, d["drop"], self.training), d)


def _all_kinds_hp() -> hg.hparams.SelfTuned:
    return hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.3, low=0.1, high=0.8),
        noise=hg.hparams.Positive(0.2, size=2),
        gain=hg.hparams.Positive(1.5, transform="exp"),
        ints=hg.hparams.Integer(2, 0, 3, size=2, per_batch=True),
        dtype=DT,
    )


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_every_spec_kind_together_matches_central_differences(delta: bool) -> None:
    """The hypergradient w.r.t. all 6 raw entries and their 6 scales (the direct path of the
    exp-positive through the eval-mode network included) against central differences of the
    validation objective at the same noise."""
    torch.manual_seed(0)
    hp = _all_kinds_hp()
    model = _AllKinds(hp.size).to(DT)
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            layer.hnet.normal_(0, 0.5)
    hopt = hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        delta=delta,
        entropy_weight=0.05,
        inner_optimizer=torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-3
        ),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
    )
    g = torch.Generator().manual_seed(5)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)

    for _ in range(3):
        hopt.step(batch(16))
    vb = batch(24)
    rng = torch.get_rng_state()
    grads, _ = hopt.hypergradient(val_batch=vb)
    hp._centre = hp.raw.detach().clone() if delta else None  # Delta-STN's stop-gradient centre

    def objective() -> float:
        torch.set_rng_state(rng)
        model.eval()
        try:
            with torch.no_grad(), hp._drawing(_Mode.VAL):
                return float(_stn_loss(model, hp, vb) - 0.05 * hp.entropy())
        finally:
            model.train()

    h = 1e-6
    for p, gp in zip(hp.parameters(), grads, strict=True):
        assert gp.shape == (6,)
        for j in range(6):
            with torch.no_grad():
                p[j] += h
            up = objective()
            with torch.no_grad():
                p[j] -= 2 * h
            down = objective()
            with torch.no_grad():
                p[j] += h
            fd = (up - down) / (2 * h)
            assert abs(fd - float(gp[j])) < 1e-7 + 1e-6 * abs(fd), (j, fd, float(gp[j]))
    assert float(grads[0].abs().min()) > 1e-5  # every entry reached (through the layers)


def test_a_hyperparameter_named_like_an_argument_of_selftuned_is_named() -> None:
    """Before: ``SelfTuned(scale=Positive(1.0))`` (an augmentation's scale) was taken as the
    perturbation scale and failed with "float() argument must be a string or a real number,
    not 'Positive'"; ``dtype=Rate(...)`` failed later still."""
    for name in ("scale", "scale_range", "learn_scale", "dtype"):
        with pytest.raises(ValueError, match=rf"'{name}' is an argument of SelfTuned itself.*{name}_="):
            hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3), **{name: hg.hparams.Positive(1.0)})
    hp = hg.hparams.SelfTuned(scale_=hg.hparams.Positive(1.0), scale=0.3)  # what it suggests works
    assert hp.names == ("scale_",) and float(hp.scale().detach()[0]) == pytest.approx(0.3)


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_fixed_takes_the_container_and_is_right_under_delta_stn_too(delta: bool) -> None:
    """Before: ``layer.fixed(hp)`` raised "unsupported operand type(s) for @", a (1, H) row
    "mat1 and mat2 shapes cannot be multiplied", and under Delta-STN the obvious
    ``fixed(hp.raw)`` is another network (its layers are fed centred features): the container
    now gives the layer at the current lambda in both, and bad shapes are named."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), n=hg.hparams.Positive(0.5), dtype=DT)
    model = _Two(hp.size).to(DT)
    conv = hg.nn.StnConv1d(1, 2, 3, hp.size, padding=1, rank=1).to(DT)
    with torch.no_grad():
        for layer in (model.l1, model.l2, conv):
            layer.hnet.normal_(0, 0.5)
    hopt = _selftuning(model, hp, delta=delta)
    for i in range(2):
        hopt.step(_batch(i))
    x, s = torch.randn(5, 4, dtype=DT), torch.randn(5, 1, 7, dtype=DT)
    model.eval()
    with torch.no_grad():
        for layer, inp in ((model.l1, x), (conv, s)):
            out = layer(inp, hp)  # outside a step: the current lambda for every example
            for f in (hp, hp.draw(5), hp.draw(1).features):
                torch.testing.assert_close(layer.fixed(f)(inp), out, rtol=1e-12, atol=1e-12)
            if delta:
                assert float((layer.fixed(hp.raw)(inp) - out).abs().max()) > 1e-3
    with pytest.raises(ValueError, match=r"StnLinear.fixed: need the features of one lambda, shape \(2,\)"):
        model.l1.fixed(torch.zeros(3, 2, dtype=DT))
    with pytest.raises(ValueError, match=r"one lambda per example \(4 rows\)"):
        with hp._drawing(_Mode.TRAIN):
            model.l1.fixed(hp.draw(4))
    with pytest.raises(TypeError, match=r"StnConv1d.fixed: need a hg.hparams.SelfTuned"):
        conv.fixed([0.0, 0.0])  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_delta_stn_with_module_hooks_names_the_full_backward_hook() -> None:
    """Forward and forward-pre hooks that rescale are followed by the linearisation; a full
    backward hook (an autograd.Function without jvp) is refused naming it, and the step works
    with linearize=False, the hook firing on each backward pass."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _Two(hp.size).to(DT)
    model.l1.register_forward_hook(lambda mod, inp, out: out * 1.5)
    model.l2.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5, args[1]))
    _selftuning(model, hp, delta=True).step(_batch(0))
    seen: list[int] = []
    model.l1.register_full_backward_hook(lambda mod, gi, go: seen.append(1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="register_full_backward_hook.*pass linearize=False"):
        _selftuning(model, hp, delta=True).step(_batch(0))
    assert seen == [1]  # (the refused step's base pass), which changed nothing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    seen.clear()
    hopt = hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        delta=True,
        linearize=False,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    hopt.step(_batch(1))
    assert len(seen) == 2  # the base pass and the response pass
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_linearised_lstm_over_a_batch_first_sequence_and_a_layer_shared_by_two_branches() -> None:
    """Delta-STN's response step inside the model call: an StnLSTMCell unrolled over a
    batch-first sequence (per-example features), a low-rank StnLinear applied twice, and a
    reflect-padded bias-free StnConv2d give torch.func.jvp's primal and tangent exactly."""
    import torch.autograd.forward_ad as fwAD

    from hypergrad._stn_hparams import Draw, linearising
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()
    torch.manual_seed(0)
    cell = hg.nn.StnLSTMCell(3, 4, 2).to(DT)
    shared = hg.nn.StnLinear(4, 4, 2, rank=2).to(DT)
    conv = hg.nn.StnConv2d(2, 3, 3, 2, padding=1, padding_mode="reflect", bias=False).to(DT)
    for layer in (cell.gates, shared, conv):
        with torch.no_grad():
            layer.hnet.normal_(0, 0.5)
    seq, img = torch.randn(2, 5, 3, dtype=DT), torch.randn(2, 2, 5, 5, dtype=DT)  # (B, T, in)
    delta = torch.randn(2, 2, dtype=DT)

    def net(f: Any) -> torch.Tensor:
        state = None
        for t in range(seq.shape[1]):
            state = cell(seq[:, t], state, f)
        assert state is not None
        h = shared(torch.tanh(shared(state[0], f)), f)
        return h * conv(img, f).flatten(1).sum(1, keepdim=True)

    primal, tangent = torch.func.jvp(net, (torch.zeros_like(delta),), (delta,))
    with fwAD.dual_level(), linearising():
        fast_primal, fast_tangent = fwAD.unpack_dual(net(Draw(delta, {}, linear=True)))
    torch.testing.assert_close(fast_primal, primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_tangent, tangent, rtol=1e-10, atol=1e-12)
    assert float(tangent.detach().abs().max()) > 1e-3
