"""Self-tuning networks, as their authors' and researchers' scripts use them.

What is checked, and against what:

* the idioms of the public STN code (an LSTM language model with embedding / input / hidden /
  output dropout and a per-batch weight drop; an AlexNet-like conv net with cutout, per-layer
  dropout and continuous and integer augmentation hyperparameters, BatchNorm between STN layers,
  layers nested in Sequential / ModuleList and shared, a frozen STN layer; more than 15
  hyperparameters; fixed values next to tuned ones) run through ``hg.SelfTuning`` and
  ``hg.BestResponse``, with RMSprop / Adam outer optimisers and schedulers;
* the validation gradient through the best response (eval mode, perturbed draws) against central
  finite differences in float64, and float32 against float64;
* each STN layer at a fixed lambda against the ordinary ``nn`` layer with copied weights;
* the transforms: ranges, round trips and floors at the edges (a Rate with ``high < 1``, an
  Integer of width 1);
* checkpoints taken mid-warm-up and mid-phase against the straight run (bit-exact), and the
  history after a resume;
* best-response sampling: one lambda per batch, whatever batch size the loss draws for; the
  fixed scale of ``learn_scale=False`` is part of a checkpoint's meaning.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad._stn_hparams import _Mode
from hypergrad.testing import central_difference

DT = torch.float64


def _save_load(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------ best-response sampling


def test_best_response_gives_one_lambda_per_batch_whatever_size_the_loss_draws_for() -> None:
    """The hypernetwork draws for one example (``model(x, hparams=h)``); a penalty written as
    ``h.draw(len(x))[name]`` must read the same lambda, not a second, independent sample."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False, scale=0.5, dtype=DT
    )
    net = hg.nn.HyperNet(nn.Linear(3, 1, bias=False).to(DT), hp.size)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        out = m(b[0], hparams=h)
        d1, dn = h.draw(1), h.draw(len(b[0]))
        seen.append((d1.features[0].clone(), dn.features.clone(), dn["decay"].clone()))
        w = m.weights(h)["weight"]
        return ((out - b[1]) ** 2).mean() + dn["decay"].mean() * (w**2).sum()

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        train,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    b = (torch.randn(16, 3, dtype=DT), torch.randn(16, 1, dtype=DT))
    for _ in range(3):
        hopt.step(b)
    firsts = []
    for one, many, decay in seen:
        assert torch.equal(many, one.expand_as(many))  # the same lambda in every row, and as draw(1)
        torch.testing.assert_close(decay, one.exp().expand(16), rtol=1e-15, atol=0)
        firsts.append(float(one[0]))
    assert len(set(firsts)) == 3 and all(
        abs(f - float(hp.raw.detach()[0])) > 1e-6 for f in firsts
    )  # perturbed


def test_a_fixed_sampling_scale_is_part_of_the_checkpoints_meaning() -> None:
    def build(scale: float) -> hg.BestResponse:
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(a=hg.hparams.Rate(0.3), learn_scale=False, scale=scale, dtype=DT)
        net = hg.nn.HyperNet(nn.Linear(2, 1).to(DT), hp.size)
        val = lambda m, h, b: ((m(b[0], hparams=h) - b[1]) ** 2).mean()  # noqa: E731
        return hg.BestResponse(
            net,
            hp,
            val,
            val,
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )

    state = _save_load(build(0.2).state_dict())
    build(0.2).load_state_dict(state)  # the same configuration loads
    other = build(1.5)
    with pytest.raises(ValueError, match="scale"):
        other.load_state_dict(state)
    assert other.hparams.scale()[0] == 1.5


# ------------------------------------------------------------------ an LSTM language model

V, E, T = 11, 6, 5  # vocabulary, embedding and hidden width, sequence length


def _lm_hp(dtype: torch.dtype = DT, **kw: Any) -> hg.hparams.SelfTuned:
    """The seven hyperparameters of the authors' PTB model: five dropout kinds and the
    activation (alpha) and temporal activation (beta) regularisers."""
    return hg.hparams.SelfTuned(
        dropoute=hg.hparams.Rate(0.1, high=0.95),
        dropouti=hg.hparams.Rate(0.4, high=0.95),
        dropouth=hg.hparams.Rate(0.25, high=0.95),
        dropouto=hg.hparams.Rate(0.4, high=0.95),
        wdrop=hg.hparams.Rate(0.5, high=0.95),
        alpha=hg.hparams.Positive(2.0, transform="exp"),
        beta=hg.hparams.Positive(1.0, transform="exp"),
        dtype=dtype,
        **kw,
    )


class LM(nn.Module):
    """Two StnLSTMCells between an embedding and a decoder whose weight is tied to it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnns = nn.ModuleList([hg.nn.StnLSTMCell(E, E, n), hg.nn.StnLSTMCell(E, E, n)])
        self.dec = nn.Linear(E, V)
        self.dec.weight = self.emb.weight  # tied

    def forward(self, tokens: torch.Tensor, hp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b, train = tokens.shape[0], self.training
        d = hp.draw(b)  # once per sequence batch
        emb = self.emb(tokens)  # (B, T, E)
        ones = emb.new_ones(b, T, 1)
        emb = emb * hg.nn.dropout(ones, d["dropoute"], train)  # whole words, per example
        x = emb * hg.nn.dropout(emb.new_ones(b, 1, E), d["dropouti"], train)  # locked: one mask per sequence
        for i, cell in enumerate(self.rnns):
            state, outs = None, []
            for t in range(T):
                state = cell(x[:, t], state, d)
                outs.append(state[0])
            x = torch.stack(outs, 1)
            rate = d["dropouth"] if i == 0 else d["dropouto"]
            x = x * hg.nn.dropout(x.new_ones(b, 1, E), rate, train)
        # weight drop, one mask for the batch at the first example's rate (the authors' non-minibatch
        # hyperparameters)
        w = hg.nn.dropout(self.dec.weight[None], d["wdrop"][:1], train)[0]
        return F.linear(x, w, self.dec.bias), x


def lm_train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    logits, out = m(b[0], h)
    d = h.draw(len(b[0]))  # the same draw the model used
    ar = (d["alpha"] * out.pow(2).mean((1, 2))).mean()
    tar = (d["beta"] * (out[:, 1:] - out[:, :-1]).pow(2).mean((1, 2))).mean()
    return F.cross_entropy(logits.reshape(-1, V), b[1].reshape(-1)) + ar + tar


def lm_val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h)[0].reshape(-1, V), b[1].reshape(-1))


def _tokens(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _lm_stn(delta: bool = False, dtype: torch.dtype = DT, **kw: Any) -> hg.SelfTuning:
    torch.manual_seed(0)
    hp = _lm_hp(dtype)
    model = LM(hp.size).to(dtype)
    with torch.no_grad():  # a visible response
        for cell in model.rnns:
            cell.gates.hnet.normal_(0, 0.3)  # type: ignore[union-attr]
    return hg.SelfTuning(
        model,
        hp,
        lm_train,
        lm_val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        delta=delta,
        **kw,
    )


def _val_objective(hopt: hg.SelfTuning, vb: Any, rng: torch.Tensor) -> float:
    """L_V(w(lambda + sigma eps)) - tau * sum log sigma in eval mode, with the eps of ``rng``."""
    torch.set_rng_state(rng)
    hopt.model.eval()
    try:
        with torch.no_grad(), hopt.hparams._drawing(_Mode.VAL):
            lv = hopt.val_loss(hopt.model, hopt.hparams, vb)
            return float(lv - hopt.entropy_weight * hopt.hparams.entropy())
    finally:
        hopt.model.train()


def _assert_central_differences(hopt: hg.SelfTuning, grads: Any, vb: Any, rng: torch.Tensor) -> None:
    """Each entry of ``grads`` against central differences (step 1e-6) of :func:`_val_objective`."""
    for p, g in zip(hopt.hparams.parameters(), grads, strict=True):
        fd = central_difference(lambda: _val_objective(hopt, vb, rng), p, eps=1e-6)
        for j, (a, b) in enumerate(zip(fd.reshape(-1).tolist(), g.reshape(-1).tolist(), strict=True)):
            assert abs(a - b) < 1e-8 + 1e-6 * abs(a), (j, a, b)


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_lstm_language_model_hypergradient_matches_central_differences(delta: bool) -> None:
    hopt = _lm_stn(delta, entropy_weight=0.01)
    for i in range(2):
        assert torch.isfinite(hopt.step(_tokens(i)))
    vb = _tokens(50, n=12)
    rng = torch.get_rng_state()
    grads, info = hopt.hypergradient(val_batch=vb)
    assert hopt.model.training  # train mode given back
    if delta:  # Delta-STN centres at a stop-gradient lambda_0: hold the centre fixed
        hopt.hparams._centre = hopt.hparams.raw.detach().clone()
    _assert_central_differences(hopt, grads, vb, rng)
    assert float(grads[0].abs().min()) > 1e-6  # every rate reaches the validation loss
    hopt.hparams._centre = None
    assert info.outer_loss == pytest.approx(
        _val_objective(hopt, vb, rng) + 0.01 * float(hopt.hparams.entropy().detach())
    )


def test_lstm_language_model_trains_its_schedule_with_rmsprop_and_a_scheduler() -> None:
    """The authors' PTB loop: T_train = 2 steps, then one hyperstep (eval mode) with RMSprop on
    the hyperparameters, its learning rate decayed by a scheduler; every dropout kind and both
    regularisers move, each within its range, and the schedule is what history() returns."""
    torch.manual_seed(0)
    hp = _lm_hp()
    model = LM(hp.size).to(DT)
    outer = torch.optim.RMSprop(hp.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(outer, step_size=3, gamma=0.5)
    hopt = hg.SelfTuning(
        model,
        hp,
        lm_train,
        lm_val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        outer_optimizer=outer,
        warmup=2,
    )
    start = hp.current()
    losses = []
    for i in range(12):
        losses.append(float(hopt.step(_tokens(i % 4))))
        if hopt.hyper_due():
            info = hopt.hyper_step(val_batch=_tokens(100 + i))
            assert not info.skipped and info.hypergrad_norm > 0
            sched.step()
    rows = hp.history()
    assert [r["inner_step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert outer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)
    now = hp.current()
    for name in ("dropoute", "dropouti", "dropouth", "dropouto", "wdrop"):
        assert 0 < now[name][0] < 0.95 and now[name][0] != start[name][0], name
        assert rows[-1][name] == now[name][0] and 0.01 < rows[-1][f"sigma.{name}"] < 3.0
    assert now["alpha"][0] > 0 and now["beta"][0] > 0 and now["alpha"][0] != start["alpha"][0]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.dec.weight is model.emb.weight  # the tie survives the steps and hypersteps


# ------------------------------------------------------------------ an AlexNet-like conv STN


def _conv_hp(dtype: torch.dtype = DT, **kw: Any) -> hg.hparams.SelfTuned:
    """16 entries, as the authors' CIFAR AlexNet: per-layer dropout, cutout length and holes, and
    colour / geometry augmentation strengths (continuous and integer)."""
    return hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.2, high=0.9, size=3),  # one per classifier layer
        indropout=hg.hparams.Rate(0.05, high=0.5),
        cutout=hg.hparams.Integer(2, 0, 6),
        holes=hg.hparams.Integer(1, 1, 2),  # a range of width 1
        hue=hg.hparams.Rate(0.1, high=0.5),
        contrast=hg.hparams.Rate(0.2, low=0.1, high=0.6),
        saturation=hg.hparams.Rate(0.1, high=0.5),
        brightness=hg.hparams.Rate(0.05, high=0.3, size=3),  # one per channel
        noise=hg.hparams.Positive(0.05),
        shift=hg.hparams.Integer(1, 0, 2),
        vshift=hg.hparams.Integer(0, 0, 2),
        flip=hg.hparams.Integer(0, 0, 1),
        dtype=dtype,
        **kw,
    )


def _augment(x: torch.Tensor, d: hg.hparams.Draw, train: bool) -> torch.Tensor:
    if not train:
        return x
    b = len(x)
    col = lambda v: v.reshape(b, 1, 1, 1).to(x.dtype)  # noqa: E731
    gray = x.mean(1, keepdim=True)
    x = torch.lerp(x, x.roll(1, dims=1), col(d["hue"]))  # hue-like: rotate the channels
    x = torch.lerp(x, gray.expand_as(x), col(d["saturation"]))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (1 - col(d["contrast"])) * (x - mean)
    x = x + d["brightness"].to(x.dtype)[:, :, None, None]
    x = torch.where(col(d["flip"]) > 0, x.flip(-1), x)
    x = hg.nn.random_shift(x, d["shift"])
    x = hg.nn.random_shift(x.transpose(-1, -2), d["vshift"]).transpose(-1, -2)
    for k in range(2):  # up to two holes
        x = hg.nn.cutout(x, torch.where(d["holes"] > k, d["cutout"], 0))
    return hg.nn.gaussian_noise(x, d["noise"])


class Features(nn.Module):
    """STN convolutions with BatchNorm between them, inside a ModuleList."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [hg.nn.StnConv2d(3, 4, 3, n, padding=1), hg.nn.StnConv2d(4, 6, 3, n, padding=1)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(4), nn.BatchNorm2d(6)])

    def forward(self, x: torch.Tensor, d: hg.hparams.Draw) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.max_pool2d(torch.relu(bn(conv(x, d))), 2)
        return x


class AlexLike(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(Features(n))  # nested: Sequential > Features > ModuleList
        self.classifier = nn.ModuleDict(
            {
                "fc1": hg.nn.StnLinear(6 * 2 * 2, 12, n, rank=3),
                "fc2": hg.nn.StnLinear(12, 12, n),
                "out": hg.nn.StnLinear(12, 3, n),
            }
        )
        self.bn = nn.BatchNorm1d(12)
        self.frozen = hg.nn.StnLinear(12, 12, n).requires_grad_(False)  # frozen on purpose
        self.alias = self.classifier["fc2"]  # one layer reached under two names, called twice

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        train = self.training
        x = hg.nn.dropout(_augment(x, d, train), d["indropout"], train)
        h = self.trunk[0](x, d).flatten(1)
        drop = d["dropout"]
        h = hg.nn.dropout(torch.relu(self.bn(self.classifier["fc1"](h, d))), drop[:, 0], train)
        h = hg.nn.dropout(torch.relu(self.classifier["fc2"](h, d)), drop[:, 1], train)
        h = hg.nn.dropout(torch.relu(self.alias(self.frozen(h, d), d)), drop[:, 2], train)
        return self.classifier["out"](h, d)


def conv_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _images(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _conv_run(**kw: Any) -> tuple[hg.SelfTuning, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    hp = _conv_hp()
    model = AlexLike(hp.size).to(DT)
    inner = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    outer = torch.optim.RMSprop(hp.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.ExponentialLR(outer, gamma=0.9)
    hopt = hg.SelfTuning(model, hp, conv_loss, conv_loss, inner_optimizer=inner, outer_optimizer=outer, **kw)
    return hopt, sched


def _conv_loop(
    hopt: hg.SelfTuning, sched: Any, start: int, stop: int, save_at: int = -1
) -> dict[str, Any] | None:
    saved = None
    for i in range(start, stop):
        if i == save_at:
            saved = _save_load({"hopt": hopt.state_dict(), "sched": sched.state_dict()})
        hopt.step(_images(i % 5))
        if hopt.hyper_due():
            for _ in range(hopt.val_steps):
                hopt.hyper_step(val_batch=_images(10 + i % 3))
                sched.step()
    return saved


def _everything(hopt: hg.SelfTuning) -> list[torch.Tensor]:
    return [
        *hopt.model.state_dict().values(),
        *hopt.hparams.parameters(),
        *(t for s in hopt.inner_optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
        *(t for s in hopt.outer_optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
    ]


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
@pytest.mark.parametrize("save_at", [2, 7], ids=["mid-warmup", "mid-phase"])
def test_conv_stn_resumes_bit_exactly_mid_warmup_and_mid_phase(delta: bool, save_at: int) -> None:
    kw = {"delta": delta, "warmup": 4, "train_steps": 3, "val_steps": 2}
    straight, sched = _conv_run(**kw)
    frozen = copy.deepcopy(straight.model.frozen.state_dict())
    saved = _conv_loop(straight, sched, 0, 12, save_at=save_at)
    assert saved is not None
    resumed, sched2 = _conv_run(**kw)
    _conv_loop(resumed, sched2, 0, 1)  # a run that went elsewhere first: the checkpoint replaces it
    resumed.load_state_dict(saved["hopt"])
    sched2.load_state_dict(saved["sched"])
    assert resumed.inner_steps == save_at and resumed.hparams.history() == saved["hopt"]["method"]["history"]
    _conv_loop(resumed, sched2, save_at, 12)
    for a, b in zip(_everything(straight), _everything(resumed), strict=True):
        assert torch.equal(a, b)
    rows = straight.hparams.history()
    assert resumed.hparams.history() == rows and len(rows) == 2 * 3  # hypersteps after 4, 7, 10
    assert [r["inner_step"] for r in rows] == [4, 4, 7, 7, 10, 10]
    assert {k for k in rows[0] if not k.startswith("sigma")} >= {"holes", "cutout", "flip", "brightness.2"}
    for r in rows:  # integer hyperparameters are integers in their ranges, rates inside theirs
        assert r["holes"] in (1.0, 2.0) and r["flip"] in (0.0, 1.0) and r["shift"] in (0.0, 1.0, 2.0)
        assert 0.1 < r["contrast"] < 0.6 and all(0 < r[f"dropout.{i}"] < 0.9 for i in range(3))
    for k, v in straight.model.frozen.state_dict().items():  # the frozen STN layer never moved
        assert torch.equal(v, frozen[k])
    assert straight.model.alias is straight.model.classifier["fc2"]


# ------------------------------------------------------------------ layers at a fixed lambda


def test_stn_lstm_cell_at_a_fixed_lambda_is_an_lstm_cell_with_copied_weights() -> None:
    torch.manual_seed(0)
    cell = hg.nn.StnLSTMCell(3, 5, n_hparams=4).to(DT)
    with torch.no_grad():
        cell.gates.hnet.normal_()  # a large response: the equivalence is not at V = 0
    lam = torch.randn(4, dtype=DT)
    lin = cell.gates.fixed(lam)
    ref = nn.LSTMCell(3, 5).to(DT)
    with torch.no_grad():
        ref.weight_ih.copy_(lin.weight[:, :3])
        ref.weight_hh.copy_(lin.weight[:, 3:])
        ref.bias_ih.copy_(lin.bias)
        ref.bias_hh.zero_()
    x = torch.randn(6, 2, 3, dtype=DT)
    s1 = s2 = None
    for t in range(6):
        s1 = cell(x[t], s1, lam)
        s2 = ref(x[t], s2)
        torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    at_zero = cell.gates.fixed(torch.zeros(4, dtype=DT)).weight
    assert float((lin.weight - at_zero).detach().abs().max()) > 1e-2  # lambda matters


def _plain_forward(model: AlexLike, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """AlexLike in eval mode, rebuilt from ordinary layers (each STN layer's ``fixed(lam)``)."""
    f = model.trunk[0]
    for conv, bn in zip(f.convs, f.bns, strict=True):
        x = F.max_pool2d(torch.relu(bn(conv.fixed(lam)(x))), 2)  # type: ignore[operator]
    c = model.classifier
    h = torch.relu(model.bn(c["fc1"].fixed(lam)(x.flatten(1))))  # type: ignore[operator]
    h = torch.relu(c["fc2"].fixed(lam)(h))  # type: ignore[operator]
    h = torch.relu(c["fc2"].fixed(lam)(model.frozen.fixed(lam)(h)))
    return c["out"].fixed(lam)(h)  # type: ignore[operator]


def test_conv_stn_in_eval_mode_is_the_ordinary_network_at_its_lambda() -> None:
    """After some training (BatchNorm statistics, responses moved), the whole STN in eval mode
    at the current lambda equals the network of ordinary layers that ``fixed`` gives, and
    ``fixed`` leaves torch's random stream alone (a run that exports layers is the same run)."""
    hopt, sched = _conv_run()
    _conv_loop(hopt, sched, 0, 5)
    model, hp = hopt.model, hopt.hparams
    assert isinstance(model, AlexLike)
    model.eval()
    x = _images(3)[0]
    lam = hp.raw.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x, hp), _plain_forward(model, x, lam), rtol=1e-10, atol=1e-12)
    rng = torch.get_rng_state()
    model.classifier["fc1"].fixed(lam)  # type: ignore[operator]
    model.trunk[0].convs[0].fixed(lam)  # type: ignore[index, operator]
    assert torch.equal(torch.get_rng_state(), rng)


def conv_val_with_penalty(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    """A validation loss that reads the hyperparameters itself (a direct term in dL_V/dlambda)."""
    d = h.draw(len(b[0]))
    return conv_loss(m, h, b) + 0.1 * (d["noise"] * d["contrast"]).mean() + 0.05 * d["dropout"].pow(2).mean()


def test_conv_stn_hypergradient_with_a_penalised_validation_loss_matches_central_differences() -> None:
    """16 hyperparameters and their 16 scales, through conv and linear STN layers (nested, shared,
    frozen, low-rank, BatchNorm between them in eval mode) and a validation loss that reads some
    of them directly; integer ones reach it through the layers only."""
    hopt, sched = _conv_run(entropy_weight=0.02)
    hopt.val_loss = conv_val_with_penalty
    _conv_loop(hopt, sched, 0, 3)
    with torch.no_grad():  # a visible response in every layer
        for _, layer in hg.nn.stn_layers(hopt.model):
            layer.hnet.normal_(0, 0.3)
    vb = _images(20, n=8)
    rng = torch.get_rng_state()
    bn = copy.deepcopy(hopt.model.bn.state_dict())
    grads, _ = hopt.hypergradient(val_batch=vb)
    for k, v in hopt.model.bn.state_dict().items():
        assert torch.equal(v, bn[k])  # eval mode: statistics untouched
    assert [p.numel() for p in hopt.hparams.parameters()] == [16] * len(grads)
    _assert_central_differences(hopt, grads, vb, rng)
    assert all(float(g.abs().min()) > 1e-7 for g in grads)


# ------------------------------------------------------------------ transforms at their edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rate_below_one_stays_inside_its_bounds_and_round_trips(dtype: torch.dtype) -> None:
    spec = hg.hparams.Rate(0.25, low=0.2, high=0.3)
    raw = torch.tensor([-1e4, -80.0, -30.0, -5.0, 0.0, 5.0, 30.0, 80.0, 1e4], dtype=dtype)
    v = spec.value(raw)
    lo, hi = torch.tensor(0.2, dtype=dtype), torch.tensor(0.3, dtype=dtype)
    assert bool((v > lo).all() and (v < hi).all())
    assert bool((v[1:] >= v[:-1]).all())  # monotone
    inside = torch.linspace(0.2005, 0.2995, 23, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(spec.value(spec.raw(inside)), inside, rtol=0, atol=tol)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.29, high=0.3), dtype=dtype)
    assert hp.current()["p"][0] == pytest.approx(0.29, abs=tol)
    with torch.no_grad():
        hp.raw.fill_(1e4)  # at the upper edge: a dropout rate just under 0.3, usable
    p = hp.draw(4)["p"]
    assert bool((p < hi).all()) and float(p[0]) == pytest.approx(0.3)
    assert torch.isfinite(hg.nn.dropout(torch.ones(4, 8, dtype=dtype), p)).all()


def test_an_integer_of_width_one_reaches_both_values_and_floors_its_init_back() -> None:
    spec = hg.hparams.Integer(3, 3, 4)
    for init in (3.0, 4.0):
        assert float(spec.value(spec.raw(torch.tensor(init, dtype=DT)))) == init
    raw = torch.linspace(-40, 40, 401, dtype=DT)
    v = spec.value(raw)
    assert set(v.tolist()) == {3.0, 4.0} and bool((v[1:] >= v[:-1]).all())
    # the boundary between them: sigma(r) = 1/2, r = 0
    assert (
        float(spec.value(torch.tensor(-1e-9, dtype=DT))) == 3
        and float(spec.value(torch.tensor(0.0, dtype=DT))) == 4
    )
    hp = hg.hparams.SelfTuned(k=hg.hparams.Integer(4, 3, 4), scale=1.5, dtype=DT)
    torch.manual_seed(0)
    with hp._drawing(_Mode.TRAIN):
        k = hp.draw(4000)["k"]
    assert k.dtype == torch.long and set(k.tolist()) == {3, 4}
    # init 4 at continuous 4.5 of (3, 5): sigma(r) = 3/4, r = log 3; perturbed with scale 1.5,
    # k = 3 where r + 1.5 eps < 0
    expected = 0.5 * (1 + math.erf(-math.log(3) / 1.5 / math.sqrt(2)))
    assert 0.2 < expected < 0.25
    assert float((k == 3).double().mean()) == pytest.approx(expected, abs=0.02)


# ------------------------------------------------------------------ precision, call patterns


def test_float32_follows_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LSTM LM in float32 and float64 from the same weights and the same perturbations
    (drawn in float64 for both): a training step (in eval mode, so no dropout masks) and the
    hypergradient agree to float32's precision."""
    randn = torch.randn

    def randn64(*size: Any, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
        return randn(*size, dtype=torch.float64, **kw).to(dtype or torch.get_default_dtype())

    monkeypatch.setattr(torch, "randn", randn64)
    runs = []
    reference = _lm_stn().model.state_dict()
    for dtype in (DT, torch.float32):
        hopt = _lm_stn(dtype=dtype)
        hopt.model.load_state_dict(reference)  # (copied and cast: the same weights)
        hopt.model.eval()
        torch.manual_seed(1)
        loss = hopt.step(_tokens(0))
        hopt.model.train()
        grads, info = hopt.hypergradient(val_batch=_tokens(7))
        runs.append((float(loss), [p.detach().double() for p in hopt.model.parameters()], grads, info))
    (l64, w64, g64, i64), (l32, w32, g32, i32) = runs
    assert l32 == pytest.approx(l64, rel=1e-5) and i32.outer_loss == pytest.approx(i64.outer_loss, rel=1e-5)
    for a, b in zip(w64, w32, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(g64, g32, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=2e-3, atol=1e-6)
        assert float(a.abs().max()) > 1e-3


def test_several_steps_then_two_hypersteps_in_a_row() -> None:
    """The authors' loop does T_train steps, then T_val hypersteps: each hyperstep draws its
    own perturbation (two in a row differ), is recorded, and moves lambda; the weights and the
    inner optimiser are untouched by them."""
    hopt = _lm_stn()
    for i in range(5):
        hopt.step(_tokens(i))
    weights = [p.detach().clone() for p in hopt.model.parameters()]
    vb = _tokens(9)
    raws = [hopt.hparams.raw.detach().clone()]
    grads = []
    for _ in range(2):
        hopt.hyper_step(val_batch=vb)
        grads.append(hopt.hparams.raw.grad.clone())  # type: ignore[union-attr]
        raws.append(hopt.hparams.raw.detach().clone())
    assert not torch.equal(grads[0], grads[1])  # fresh eps (and a moved lambda)
    assert not torch.equal(raws[0], raws[1]) and not torch.equal(raws[1], raws[2])
    rows = hopt.hparams.history()
    assert [(r["inner_step"], r["hyper_step"]) for r in rows] == [(5, 1), (5, 2)]
    assert rows[0]["dropouto"] == pytest.approx(
        float(hg.hparams.Rate(0.4, high=0.95).value(raws[1][hopt.hparams.slices["dropouto"]]))
    )
    for a, b in zip(weights, hopt.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert hopt.inner_steps == 5 and hopt.hyper_steps == 2


def test_fixed_hyperparameters_next_to_tuned_ones_stay_put() -> None:
    """The authors' scripts tune some hyperparameters and fix the others: here a gradient hook
    masks the fixed entries (wdrop, beta) of raw and raw_scale; Adam then never moves them,
    bit for bit, while the tuned ones move."""
    hopt = _lm_stn()
    hp = hopt.hparams
    fixed = torch.zeros(hp.size, dtype=torch.bool)
    for name in ("wdrop", "beta"):
        fixed[hp.slices[name]] = True
    for p in hp.parameters():
        p.register_hook(lambda g: g.masked_fill(fixed, 0.0))
    before = [p.detach().clone() for p in hp.parameters()]
    for i in range(6):
        hopt.step(_tokens(i))
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=_tokens(20 + i))
    for b, p in zip(before, hp.parameters(), strict=True):
        assert torch.equal(p.detach()[fixed], b[fixed])
        assert bool((p.detach()[~fixed] != b[~fixed]).all())
    rows = hp.history()
    assert len(rows) == 3 and all(r["wdrop"] == pytest.approx(0.5) for r in rows)


# ------------------------------------------------------------------ Delta-STN's model outputs


class _Pair(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    extras: list[torch.Tensor]


class _OutDict(dict):  # type: ignore[type-arg]  # an output class pytree does not know
    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class _Opaque:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _OutNet(nn.Module):
    def __init__(self, n: int, kind: str) -> None:
        super().__init__()
        self.l1, self.l2, self.kind = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n), kind

    def forward(self, x: torch.Tensor, hp: Any) -> Any:
        d = hp.draw(len(x))
        h = torch.tanh(self.l1(x, d))
        y = self.l2(hg.nn.dropout(h, d["p"], self.training), d)
        return {
            "tuple": (y, h),
            "namedtuple": _Pair(y, h),
            "dataclass": _Output(y, [h]),
            "dict": _OutDict(logits=y),
            "opaque": _Opaque(y),
        }[self.kind]


def _out_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    out = m(b[0], h)
    return F.cross_entropy(out[0] if type(out) is tuple else out.logits, b[1])


def _out_run(kind: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _OutNet(hp.size, kind).to(DT)
    hopt = hg.SelfTuning(
        model,
        hp,
        _out_loss,
        _out_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
        delta=True,
    )
    g = torch.Generator().manual_seed(3)
    b = (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    hnet = model.l1.hnet.detach().clone()
    for _ in range(2):
        hopt.step(b)
    assert not torch.equal(model.l1.hnet, hnet)  # the response was trained
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "dict"])
def test_delta_stn_linearises_outputs_of_every_container_type(kind: str) -> None:
    """A model returning a named tuple (crashed), a dataclass (its tangent dropped: the response
    got no gradient) or a dict subclass trains exactly as one returning a plain tuple."""
    for a, b in zip(_out_run("tuple"), _out_run(kind), strict=True):
        assert torch.equal(a, b)


def test_delta_stn_refuses_an_output_whose_tensors_it_cannot_reach() -> None:
    with pytest.raises(TypeError, match=r"'_Opaque' object.*linearize=False"):
        _out_run("opaque")


def test_names_that_history_and_values_use_themselves_are_refused() -> None:
    """``history()`` rows hold ``inner_step`` / ``hyper_step`` and ``hg.hparams.values`` a
    ``sigma`` entry: a hyperparameter of that name was silently overwritten in them."""
    for name in ("inner_step", "hyper_step", "sigma"):
        with pytest.raises(ValueError, match=f"'{name}' is a reserved name"):
            hg.hparams.SelfTuned(**{name: hg.hparams.Rate(0.3)})


# ------------------------------------------------------------------ best-response hypernetworks


def _br_run() -> hg.BestResponse:
    """The hypertraining recipe: a hypernetwork over a small MLP with dropout and a per-layer
    penalty, sampled globally from a prior for a warm-up, then alternating one step each."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(1e-2, transform="exp", size=2),
        drop=hg.hparams.Rate(0.2, high=0.8),
        width=hg.hparams.Integer(1, 1, 2),
        learn_scale=False,
        scale=0.3,
        dtype=DT,
    )
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3)).to(DT)
    net = hg.nn.HyperNet(base, hp.size, rank=2)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        d = h.draw(len(b[0]))  # (the same lambda as the hypernetwork's draw(1))
        x = hg.nn.dropout(b[0], d["drop"], m.training) * d["width"].to(DT)[:, None]
        w = m.weights(h)
        pen = d["decay"][0, 0] * w["0.weight"].pow(2).sum() + d["decay"][0, 1] * w["3.weight"].pow(2).sum()
        return F.cross_entropy(m(x, hparams=h), b[1]) + pen

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    return hg.BestResponse(
        net,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=3e-2),
        sampling="global",
        prior_scale=0.5,
        warmup=3,
    )


def _br_loop(hopt: hg.BestResponse, start: int, stop: int) -> None:
    for i in range(start, stop):
        hopt.step(_tokens_like(i))
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=_tokens_like(50 + i % 2))


def _tokens_like(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)


@pytest.mark.parametrize("save_at", [1, 5], ids=["mid-warmup", "after-warmup"])
def test_best_response_resumes_bit_exactly_with_its_prior(save_at: int) -> None:
    straight = _br_run()
    _br_loop(straight, 0, save_at)
    state = _save_load(straight.state_dict())
    _br_loop(straight, save_at, 8)
    resumed = _br_run()
    with torch.no_grad():
        resumed.hparams.raw.add_(1.0)  # (the prior of this object differs: the checkpoint's wins)
    resumed.hparams._prior = (resumed.hparams.raw.detach().clone(), resumed.hparams._prior[1])  # type: ignore[index]
    resumed.load_state_dict(state)
    _br_loop(resumed, save_at, 8)
    for a, b in zip(
        [*straight.model.state_dict().values(), *straight.hparams.parameters()],
        [*resumed.model.state_dict().values(), *resumed.hparams.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)
    rows = straight.hparams.history()
    assert rows == resumed.hparams.history() and [r["inner_step"] for r in rows] == [3, 4, 5, 6, 7, 8]
    assert all(r["width"] in (1.0, 2.0) and r["sigma.width"] == 0.3 for r in rows)
    assert rows[-1]["decay.1"] != rows[0]["decay.1"]
