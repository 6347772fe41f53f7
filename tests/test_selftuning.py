"""hg.SelfTuning and hg.BestResponse: their math (finite differences, float64), schedule, errors."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad._stn_hparams import Draw, _Mode

DT = torch.float64


class Net(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n)
        self.l2 = hg.nn.StnLinear(8, 3, n)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        self.modes.append(self.training)
        d = hp.draw(len(x))
        x = hg.nn.gaussian_noise(x, d["noise"], self.training)
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training)
        return self.l2(h, d)


class LowRankConvNet(nn.Module):
    """Net's hyperparameters through a low-rank StnConv1d (the 4 inputs as a 1-channel signal)
    and a low-rank StnLinear."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnConv1d(1, 3, 3, n, padding=1, rank=2)
        self.l2 = hg.nn.StnLinear(12, 3, n, rank=2)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.gaussian_noise(x, d["noise"], self.training)
        h = hg.nn.dropout(torch.tanh(self.l1(x[:, None], d)).flatten(1), d["dropout"], self.training)
        return self.l2(h, d)


def loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _hp(**kw: Any) -> hg.hparams.SelfTuned:
    return hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.3, high=0.9), noise=hg.hparams.Positive(0.2), dtype=DT, **kw
    )


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _stn(
    delta: bool = False, net: type[nn.Module] = Net, hp: hg.hparams.SelfTuned | None = None, **kw: Any
) -> hg.SelfTuning:
    torch.manual_seed(0)
    hp = _hp() if hp is None else hp
    model = net(hp.size).to(DT)
    with torch.no_grad():  # a visible response, so the hypergradient is not tiny
        for layer in (model.l1, model.l2):
            layer.hnet.normal_(0, 0.5)
    return hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        delta=delta,
        **kw,
    )


def _objective(hopt: hg.SelfTuning, vb: Any, rng: torch.Tensor) -> torch.Tensor:
    """L_V(w(lambda + sigma eps)) - tau * entropy, eval mode, with the noise eps of ``rng``."""
    torch.set_rng_state(rng)
    hopt.model.eval()
    try:
        with torch.no_grad(), hopt.hparams._drawing(_Mode.VAL):
            lv = loss(hopt.model, hopt.hparams, vb)
            return lv - hopt.entropy_weight * hopt.hparams.entropy()
    finally:
        hopt.model.train()


@pytest.mark.parametrize(
    "net", [Net, LowRankConvNet, "per-batch"], ids=["linear", "low-rank-conv", "per-batch"]
)
@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_selftuning_hypergradient_matches_central_differences(delta: bool, net: Any) -> None:
    if net == "per-batch":  # the noise level perturbed once per batch (the authors' minibatch=False)
        hp = hg.hparams.SelfTuned(
            dropout=hg.hparams.Rate(0.3, high=0.9), noise=hg.hparams.Positive(0.2, per_batch=True), dtype=DT
        )
        hopt = _stn(delta=delta, hp=hp, entropy_weight=0.05)
    else:
        hopt = _stn(delta=delta, net=net, entropy_weight=0.05)
    for i in range(3):
        hopt.step(_batch(i))
    vb = _batch(9, n=32)
    rng = torch.get_rng_state()
    grads, info = hopt.hypergradient(val_batch=vb)
    torch.set_rng_state(rng)
    grads2, _ = hopt.hypergradient(val_batch=vb)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))  # nothing changed
    h = 1e-6
    # Delta-STN centres at a stop-gradient lambda_0: differentiate with the centre held fixed
    hopt.hparams._centre = hopt.hparams.raw.detach().clone() if delta else None
    for p, g in zip(hopt.hparams.parameters(), grads, strict=True):
        for j in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[j] += h
            up = float(_objective(hopt, vb, rng))
            with torch.no_grad():
                p.view(-1)[j] -= 2 * h
            down = float(_objective(hopt, vb, rng))
            with torch.no_grad():
                p.view(-1)[j] += h
            fd = (up - down) / (2 * h)
            assert abs(fd - float(g.view(-1)[j])) < 1e-7 + 1e-6 * abs(fd), (j, fd, float(g.view(-1)[j]))
        assert float(g.abs().max()) > 1e-4  # not a vacuous match
    with torch.no_grad():
        assert info.outer_loss == pytest.approx(
            float(_objective(hopt, vb, rng) + 0.05 * hopt.hparams.entropy())
        )


def test_best_response_hypergradient_matches_central_differences() -> None:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        a=hg.hparams.Positive(0.1, transform="exp"), b=hg.hparams.Rate(0.4), learn_scale=False, dtype=DT
    )
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    net = hg.nn.HyperNet(base, hp.size, hypernet=nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 51)))
    net.response.to(DT)  # type: ignore[union-attr]

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    hopt = hg.BestResponse(
        net,
        hp,
        val,
        val,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    vb = _batch(3, n=32)
    (g,), _ = hopt.hypergradient(val_batch=vb)
    for j in range(2):
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                hp.raw[j] += sign * 1e-6
            with torch.no_grad():
                vals.append(float(val(net, hp, vb)))
            with torch.no_grad():
                hp.raw[j] -= sign * 1e-6
        fd = (vals[0] - vals[1]) / 2e-6
        assert abs(fd - float(g[j])) < 1e-8 + 1e-6 * abs(fd)
        assert abs(fd) > 1e-5


def test_validation_steps_run_in_eval_mode_and_training_steps_in_train_mode() -> None:
    hopt = _stn()
    model = hopt.model
    assert isinstance(model, Net)
    model.modes.clear()
    hopt.step(_batch(0))
    hopt.hyper_step(val_batch=_batch(1))
    assert model.modes == [True, False] and model.training
    model.eval()  # a user-set eval mode survives the hyperstep too
    hopt.hyper_step(val_batch=_batch(1))
    assert not model.training


def test_training_step_does_not_touch_the_hyperparameters_or_their_grad() -> None:
    hopt = _stn()
    before = copy.deepcopy(hopt.hparams.state_dict())
    for p in hopt.hparams.parameters():
        p.grad = None
    hopt.step(_batch(0))
    assert all(p.grad is None for p in hopt.hparams.parameters())
    assert all(torch.equal(v, hopt.hparams.state_dict()[k]) for k, v in before.items())


def test_schedule_warmup_then_alternate() -> None:
    hopt = _stn(warmup=3, train_steps=2, val_steps=2)
    due = []
    for i in range(9):
        hopt.step(_batch(i))
        due.append(hopt.hyper_due())
    assert due == [False, False, True, False, True, False, True, False, True]
    assert hopt.val_steps == 2


def test_history_records_values_and_scales_and_resumes() -> None:
    hopt = _stn()
    for i in range(4):
        hopt.step(_batch(i))
        hopt.hyper_step(val_batch=_batch(10))
    rows = hopt.hparams.history()
    assert [r["hyper_step"] for r in rows] == [1, 2, 3, 4] and [r["inner_step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"inner_step", "hyper_step", "dropout", "noise", "sigma.dropout", "sigma.noise"}
    assert rows[-1]["dropout"] == pytest.approx(hopt.hparams.current()["dropout"][0])
    assert 0 < rows[-1]["dropout"] < 0.9 and rows[-1]["noise"] > 0
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    hopt.step(_batch(20))  # the straight run goes on (the RNG is global: before the resumed one)
    hopt.hyper_step(val_batch=_batch(21))
    other = _stn()
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))  # restores the RNG state too
    assert other.hparams.history() == rows
    other.step(_batch(20))
    other.hyper_step(val_batch=_batch(21))
    assert other.hparams.history() == hopt.hparams.history()  # bit-exact continuation


def test_a_validation_phase_interrupted_by_a_checkpoint_resumes_where_it_left_off() -> None:
    """``while hopt.hyper_due(): hopt.hyper_step(...)`` takes a whole T_val phase (val_steps = 3
    here), skipped hypersteps included; a checkpoint taken inside the phase resumes it: the
    resumed run takes the phase's remaining hypersteps and then goes on exactly as the straight
    run. ``hyper_due`` used to stay True for the whole phase (the loop never ended), and a
    resume could only repeat or drop the phase's hypersteps."""

    def run(hopt: hg.SelfTuning, start: int, stop_after: int | None = None) -> list[int]:
        taken: list[int] = []  # the inner step of each hyperstep
        for i in range(start, 6):
            if i > start or stop_after is None or not hopt.hyper_due():
                hopt.step(_batch(i))
            while hopt.hyper_due():
                assert len(taken) < 20, "hyper_due never ends the phase"
                hopt.hyper_step(val_batch=_batch(30 + hopt.hyper_steps))
                taken.append(hopt.inner_steps)
                if stop_after is not None and len(taken) == stop_after:
                    return taken
        return taken

    straight = _stn(train_steps=2, val_steps=3)
    assert run(straight, 0) == [2, 2, 2, 4, 4, 4, 6, 6, 6]
    first = _stn(train_steps=2, val_steps=3)
    assert run(first, 0, stop_after=5) == [2, 2, 2, 4, 4]  # stopped inside the second phase
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _stn(train_steps=2, val_steps=3)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.hyper_due()  # one hyperstep of the phase is left
    assert run(resumed, 3, stop_after=-1) == [4, 6, 6, 6]
    assert resumed.hparams.history() == straight.hparams.history()  # bit-exact
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)

    skipping = _stn(train_steps=1, val_steps=2, on_nonfinite="skip")
    skipping.step(_batch(0))
    with pytest.warns(hg.NonFiniteWarning):
        while skipping.hyper_due():  # a skipped hyperstep takes its turn: the loop ends
            skipping.hyper_step(val_batch=(torch.full((4, 4), float("nan"), dtype=DT), torch.zeros(4).long()))
    assert skipping.hyper_steps == 0


def test_delta_centres_the_features() -> None:
    hopt = _stn(delta=True)
    hp = hopt.hparams
    assert torch.equal(hp.draw(5).features, torch.zeros(5, 2, dtype=DT))  # w(lambda) = w_0
    with hp._drawing(_Mode.VAL):
        d = hp.draw(5)
        expected = d.features.detach() + hp.raw.detach()
        torch.testing.assert_close(hp.values_of(expected)["dropout"], d["dropout"].detach())


def test_best_response_global_samples_from_a_fixed_prior() -> None:
    hp = hg.hparams.SelfTuned(a=hg.hparams.Positive(1.0, transform="exp"), learn_scale=False, dtype=DT)
    net = hg.nn.HyperNet(nn.Linear(4, 3).to(DT), hp.size)
    seen: list[float] = []

    def tl(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        seen.append(float(h.draw(1).features[0, 0]))  # type: ignore[operator]
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    hopt = hg.BestResponse(
        net,
        hp,
        tl,
        tl,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=10.0),
        sampling="global",
        prior_scale=2.0,
    )
    with torch.no_grad():
        hp.raw.fill_(5.0)  # the prior does not follow lambda
    for i in range(100):
        hopt.step(_batch(i))
    mean = sum(seen) / len(seen)
    std = (sum((s - mean) ** 2 for s in seen) / len(seen)) ** 0.5
    assert abs(mean) < 0.5 and abs(std - 2.0) < 0.4


def test_bad_models_and_hyperparameters_are_named() -> None:
    hp = _hp()
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    outer = torch.optim.Adam(hp.parameters())
    plain = nn.Linear(4, 3).to(DT)
    with pytest.raises(ValueError, match="model has no STN layers"):
        hg.SelfTuning(plain, hp, loss, loss, inner_optimizer=opt(plain), outer_optimizer=outer)
    wrong = Net(3).to(DT)
    with pytest.raises(ValueError, match=r"hparams.size is 2 .* l1 \(n_hparams=3\), l2 \(n_hparams=3\)"):
        hg.SelfTuning(wrong, hp, loss, loss, inner_optimizer=opt(wrong), outer_optimizer=outer)
    ok = Net(2).to(DT)
    wd = hg.hparams.WeightDecay(ok, init=1e-2)
    with pytest.raises(TypeError, match=r"needs hparams = hg.hparams.SelfTuned"):
        hg.SelfTuning(
            ok, wd, loss, loss, inner_optimizer=opt(ok), outer_optimizer=torch.optim.Adam(wd.parameters())
        )
    with pytest.raises(ValueError, match="Invalid train_steps: 0"):
        hg.SelfTuning(ok, hp, loss, loss, inner_optimizer=opt(ok), outer_optimizer=outer, train_steps=0)
    with pytest.raises(ValueError, match="Invalid entropy_weight"):
        hg.SelfTuning(ok, hp, loss, loss, inner_optimizer=opt(ok), outer_optimizer=outer, entropy_weight=-1)
    with pytest.raises(ValueError, match="must be a hg.nn.HyperNet"):
        hg.BestResponse(ok, hp, loss, loss, inner_optimizer=opt(ok), outer_optimizer=outer)
    net = hg.nn.HyperNet(plain, 2)
    with pytest.raises(ValueError, match=r"learn_scale=False"):
        hg.BestResponse(net, hp, loss, loss, inner_optimizer=opt(net), outer_optimizer=outer)
    fixed = hg.hparams.SelfTuned(a=hg.hparams.Rate(0.5), learn_scale=False, dtype=DT)
    with pytest.raises(ValueError, match=r"n_hparams=2 but hparams.size is 1"):
        hg.BestResponse(
            net,
            fixed,
            loss,
            loss,
            inner_optimizer=opt(net),
            outer_optimizer=torch.optim.Adam(fixed.parameters()),
        )
    hopt = _stn()
    hopt.step(_batch(0))
    with pytest.raises(ValueError, match="needs val_batch"):
        hopt.hyper_step(train_batch=_batch(0))


def test_nonfinite_validation_loss_is_refused_and_sigma_untouched() -> None:
    hopt = _stn(on_nonfinite="skip")
    hopt.step(_batch(0))
    x, y = _batch(1)
    x[0, 0] = float("inf")
    before = copy.deepcopy(hopt.hparams.state_dict())
    with pytest.warns(hg.NonFiniteWarning, match="skipped"):
        info = hopt.hyper_step(val_batch=(x, y))
    assert info.skipped and hopt.hparams.history() == []
    assert all(torch.equal(v, hopt.hparams.state_dict()[k]) for k, v in before.items())


class ConvNet(nn.Module):
    """The issue's example: a conv net with a tuned dropout rate and a tuned cutout length."""

    def __init__(self, n_hparams: int) -> None:
        super().__init__()
        self.conv = hg.nn.StnConv2d(1, 4, 3, n_hparams, padding=1)
        self.head = hg.nn.StnLinear(4 * 8 * 8, 3, n_hparams)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.cutout(x, d["cutout"], self.training)
        h = hg.nn.dropout(torch.relu(self.conv(x, d)), d["dropout"], self.training)
        return self.head(h.flatten(1), d)


def _conv_stn(delta: bool, **kw: Any) -> hg.SelfTuning:
    """ConvNet with a tuned dropout rate and cutout length, SGD with momentum inside."""
    hp = hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.1, high=0.9), cutout=hg.hparams.Integer(4, 0, 16), dtype=DT
    )
    model = ConvNet(n_hparams=hp.size).to(DT)
    return hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=3e-2),
        delta=delta,
        **kw,
    )


def _images(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_conv_net_with_dropout_and_cutout_end_to_end(delta: bool) -> None:
    hopt = _conv_stn(delta)
    hp = hopt.hparams
    data = _images(6)
    for i, b in enumerate(data * 2):
        hopt.step(b)
        if hopt.hyper_due():
            info = hopt.hyper_step(val_batch=data[(i + 1) % 6])
            assert not info.skipped and info.hypergrad_norm > 0
    rows = hp.history()
    assert len(rows) == 6 and all(float(r["cutout"]).is_integer() and 0 <= r["cutout"] <= 16 for r in rows)
    assert rows[0]["cutout"] == 4 and 0 < rows[-1]["dropout"] < 0.9
    assert rows[-1]["sigma.cutout"] != rows[0]["sigma.cutout"]  # the scale is learned too


class _Fixed:
    """Hands the model one given draw (an independent route around SelfTuned's modes)."""

    def __init__(self, draw: Draw) -> None:
        self._draw = draw

    def draw(self, n: int) -> Draw:
        assert n == len(self._draw)
        return self._draw


class HeadNet(Net):
    """Net plus an ordinary head: base weights outside the STN layers."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.head = nn.Linear(3, 3).to(DT)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        return self.head(torch.tanh(super().forward(x, hp)))


@pytest.mark.parametrize("linearize", [True, False], ids=["linearised", "centred"])
def test_delta_step_trains_base_weights_and_response_on_their_own_objectives(linearize: bool) -> None:
    """Delta-STN: w0 (the layers' first halves, the head) moves on the loss at the current
    lambda, the response (hnet, hyper halves) on the loss of the output linearised in the
    perturbation; checked against torch.func.jvp, with the same random draws."""
    hopt = _stn(delta=True, net=HeadNet, linearize=linearize)  # SGD, lr 0.1
    model, hp = hopt.model, hopt.hparams
    reference = copy.deepcopy(model)
    x, y = _batch(3)
    n, size = len(x), hp.size
    raw, sigma = hp.raw.detach(), hp.scale().detach()
    params = dict(reference.named_parameters())

    torch.manual_seed(7)
    base = Draw(torch.zeros(n, size, dtype=DT), hp.values_of(raw.expand(n, -1)), shared=True)
    base_loss = loss(reference, _Fixed(base), (x, y))
    g_base = torch.autograd.grad(base_loss, list(params.values()))
    eps = torch.randn(n, size, dtype=DT)  # what the response step's draw takes next
    lam = raw + sigma * eps
    values = hp.values_of(lam)
    rng = torch.get_rng_state()

    def out(delta: torch.Tensor) -> torch.Tensor:
        torch.set_rng_state(rng)  # the same noise and dropout masks in every call
        return reference(x, _Fixed(Draw(delta, values)))

    zero, pert = torch.zeros(n, size, dtype=DT), lam - raw
    if linearize:
        primal, tangent = torch.func.jvp(out, (zero,), (pert,))
        f = primal + tangent
        eps_fd = 1e-6  # the JVP itself against central differences
        fd = (out(eps_fd * pert) - out(-eps_fd * pert)) / (2 * eps_fd)
        torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    else:
        f = out(pert)
    g_resp = torch.autograd.grad(F.cross_entropy(f, y), list(params.values()))

    torch.manual_seed(7)
    returned = hopt.step((x, y))
    masks = {n: m.response_masks() for n, m in (("l1", reference.l1), ("l2", reference.l2))}
    for (name, p), gb, gr in zip(params.items(), g_base, g_resp, strict=True):
        layer, _, pname = name.partition(".")
        mask = masks.get(layer, {}).get(pname, False)
        g = torch.where(torch.as_tensor(mask), gr, gb)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), p.detach() - 0.1 * g)
    torch.testing.assert_close(returned, base_loss.detach())  # the loss at the current lambda
    # the split: the response got gradient from the perturbed loss only, w0 from the base loss only
    assert (
        masks["l1"]["hnet"] is True
        and bool(masks["l1"]["weight"][8:].all())
        and not bool(masks["l1"]["weight"][:8].any())
    )


def test_delta_step_refuses_a_nonfinite_response_loss() -> None:
    hopt = _stn(delta=True)
    before = copy.deepcopy(hopt.model.state_dict())

    def bad(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        value = loss(m, h, b)
        return value * float("nan") if h.draw(len(b[0])).linear else value

    hopt.train_loss = bad
    with pytest.raises(hg.NonFiniteError):
        hopt.step(_batch(1))
    for k, v in hopt.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert hopt.inner_steps == 0


def test_response_masks_cover_the_response_maps_and_hyper_halves() -> None:
    lin = hg.nn.StnLinear(4, 3, n_hparams=2)
    low = hg.nn.StnLinear(4, 3, n_hparams=2, rank=2)
    conv = hg.nn.StnConv2d(2, 5, 3, n_hparams=2)
    low_conv = hg.nn.StnConv1d(2, 5, 3, n_hparams=2, rank=2)
    cell = hg.nn.StnLSTMCell(3, 4, n_hparams=2)
    model = nn.ModuleList([lin, low, conv, cell, low_conv])
    masks = hg.nn.response_masks(model)
    assert masks[id(lin.hnet)] is True and masks[id(low.hyper_out)] is True and masks[id(conv.hnet)] is True
    assert masks[id(low_conv.hyper_out)] is True and low_conv.conv.weight.shape[0] == 7
    for p, first in (
        (lin.weight, 3),
        (lin.bias, 3),
        (low.weight, 3),
        (conv.conv.weight, 5),
        (conv.conv.bias, 5),
        (low_conv.conv.weight, 5),
        (low_conv.conv.bias, 5),
    ):
        m = masks[id(p)].expand_as(p)  # type: ignore[union-attr]
        assert not m[:first].any() and m[first:].all()
    gates = cell.gates  # the LSTM cell's response lives in its StnLinear
    assert masks[id(gates.hnet)] is True and masks[id(gates.weight)].expand_as(gates.weight)[16:].all()
    assert len(masks) == len(list(model.parameters())) == 17  # every STN parameter has response entries


def test_delta_warns_when_a_layer_is_called_outside_the_linearised_model_call() -> None:
    hopt = _stn(delta=True)

    def by_layers(m: nn.Module, h: Any, b: Any) -> torch.Tensor:  # bypasses model(...)
        d = h.draw(len(b[0]))
        return F.cross_entropy(m.l2(torch.tanh(m.l1(b[0], d)), d), b[1])

    hopt.train_loss = by_layers
    with pytest.warns(RuntimeWarning, match="not linearised"):
        hopt.step(_batch(1))
    hopt.linearize = False  # the centred form only: nothing to warn about
    hopt.step(_batch(2))


def test_delta_base_step_skips_the_vanishing_hyper_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delta-STN's step on w0 runs at Delta = 0, where every layer's response term is 0 * (W_h x):
    the layers compute only their ordinary half there. Same training as computing both halves
    (conv and linear layers, float64), at fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(skip: bool) -> tuple[list[torch.Tensor], int]:
        with monkeypatch.context() as mp:
            if not skip:
                mp.setattr(hg.nn.StnLayer, "_vanishes", lambda self, h, b: False)
            torch.manual_seed(0)
            hopt = _conv_stn(True, warmup=1)
            model, hp = hopt.model, hopt.hparams
            data = _images(4)
            with FlopCounterMode(display=False) as counter:
                hopt.step(data[0])
            flops = counter.get_total_flops()
            for i, b in enumerate(data):
                hopt.step(b)
                if hopt.hyper_due():
                    hopt.hyper_step(val_batch=data[(i + 1) % 4])
            return [t.detach().clone() for t in (*model.parameters(), *hp.parameters())], flops

    skipped, f_skip = run(True)
    full, f_full = run(False)
    for a, b in zip(skipped, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the conv's hyper half alone: 4 channels x 8 x 8 x 9 MACs x 8 examples, forward and backward
    assert f_full - f_skip >= 3 * 2 * (4 * 64 * 9 * 8)


def test_a_fixed_scale_is_not_bounded_by_the_range_of_a_learned_one():
    hp = hg.hparams.SelfTuned(lam=hg.hparams.Positive(1.0), learn_scale=False, scale=5.0)
    assert torch.equal(hp.scale(), torch.full((1,), 5.0, dtype=hp.raw.dtype))
    assert [n for n, _ in hp.named_parameters()] == ["raw"]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="a fixed scale must be finite and > 0"):
            hg.hparams.SelfTuned(lam=hg.hparams.Positive(1.0), learn_scale=False, scale=bad)
    with pytest.raises(ValueError, match="out of range"):
        hg.hparams.SelfTuned(lam=hg.hparams.Positive(1.0), scale=5.0)
