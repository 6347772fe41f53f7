"""Round 19, self-tuning networks (``hg.SelfTuning``, ``hg.BestResponse``, ``hg.nn``).

New here (the earlier rounds never built a grouped STN convolution, nor checked the entropy
term of a per-batch spec by hand):

* grouped STN convolutions (``groups > 1``, 1-D and 2-D, with stride, dilation, reflect and
  circular padding, no bias, a batch of one, non-contiguous and channels_last inputs): each
  example is the grouped convolution with its own weights formed by hand, depends on its own
  lambda only, and Delta-STN's linearisation of the layer is the forward-mode derivative;
* the hyperstep's gradient w.r.t. lambda and the learned scale, entropy term included, against a
  closed form written out by hand for an STN layer, with a per-batch spec sharing its noise;
* the T_train / T_val schedule and ``history()`` against a hand-kept log, with a hyperstep
  skipped (non-finite) inside a validation phase;
* the per-example augmentations: example i's output depends on its own strength only;
* a resume inside a T_val phase of a grouped-conv STN / Delta-STN with cutout, shift and
  per-batch specs, with schedulers on both optimisers: bit for bit;
* BestResponse with a custom hypernetwork holding its own Dropout, local and global: eval mode
  in the hyperstep (deterministic, central differences), training mode in the inner step.

Bugs found (fixed in this round):

* Delta-STN with a hook-based reparametrisation of an STN layer (the older
  ``torch.nn.utils.weight_norm``, ``torch.nn.utils.prune``, an AWD-LSTM-style weight drop that
  re-registers the weight as ``weight_raw``): the response masks name ``weight``, which is
  then no parameter, so the hyper half of the raw tensor got the base gradient only, which is
  0 there: the response never trained, silently (the ``torch.nn.utils.parametrize`` versions
  are refused). (Under the hook-based ``spectral_norm`` the hyper half does move, through the
  norm, but on the base objective only: the same cause, refused by the same fix, not tested.)
* ``hg.nn.dropout`` / ``gaussian_noise`` / ``cutout`` / ``random_shift`` called with their default
  ``training=True`` in a model's forward: the validation step of SelfTuning "runs in eval mode",
  but these ran anyway, so every hyperstep's validation loss was a random draw with dropout at
  the perturbed rates.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import hypergrad as hg
from hypergrad._stn_hparams import linearising
from hypergrad.hparams import Draw
from hypergrad.testing import central_difference

DT = torch.float64


# ----------------------------------------------------------------------------- grouped convolutions


def _conv_by_hand(layer: Any, x: torch.Tensor, lam: torch.Tensor, dims: int) -> torch.Tensor:
    """Example by example, the grouped convolution with W = W_e + diag(V lam_i) W_h formed by hand."""
    c, o = layer.conv, layer.out_channels
    w = c.weight.detach()
    b = None if c.bias is None else c.bias.detach()
    conv = F.conv2d if dims == 2 else F.conv1d
    outs = []
    for i in range(x.shape[0]):
        s = layer.hnet.detach() @ lam[i]
        wi = w[:o] + s.reshape((o,) + (1,) * (dims + 1)) * w[o:]
        bi = None if b is None else b[:o] + s * b[o:]
        xi, pad = x[i : i + 1], c.padding
        if c.padding_mode != "zeros":
            xi, pad = F.pad(xi, c._reversed_padding_repeated_twice, mode=c.padding_mode), 0
        outs.append(conv(xi, wi, bi, c.stride, pad, c.dilation, c.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(
    "kw",
    [
        {"groups": 2, "stride": 2, "padding": 1, "dilation": 2, "bias": False},
        {"groups": 4, "padding": "same", "padding_mode": "reflect", "dilation": 2},
        {"groups": 2, "padding": 2, "padding_mode": "circular", "stride": 3},
    ],
    ids=["stride-dilation-nobias", "depthwise-same-reflect", "circular-stride"],
)
def test_grouped_stn_convolutions_are_per_example_grouped_convolutions(dims: int, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    cls = hg.nn.StnConv2d if dims == 2 else hg.nn.StnConv1d
    layer = cls(4, 8, 3, 3, dtype=DT, **kw)
    with torch.no_grad():
        layer.hnet.normal_(0, 1.0)
    # a non-contiguous batch (every other example of a bigger one)
    x = torch.randn((10, 4) + (9,) * dims, dtype=DT)[::2]
    assert not x.is_contiguous()
    lam = torch.randn(5, 3, dtype=DT)
    ref = _conv_by_hand(layer, x, lam, dims)
    torch.testing.assert_close(layer(x, lam), ref, rtol=1e-12, atol=1e-12)
    if dims == 2:
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(layer(cl, lam), ref, rtol=1e-12, atol=1e-12)
    # a batch of one, and fixed() at that example's lambda (a grouped nn.Conv)
    torch.testing.assert_close(layer(x[3:4], lam[3]), ref[3:4], rtol=1e-12, atol=1e-12)
    plain = layer.fixed(lam[3])
    assert plain.groups == kw["groups"] and (plain.bias is None) == (kw.get("bias") is False)
    torch.testing.assert_close(plain(x[3:4]), ref[3:4], rtol=1e-12, atol=1e-12)
    # example i's output depends on its own lambda only
    moved = lam.clone()
    moved[2] += 5.0
    out, base = layer(x, moved), layer(x, lam)
    torch.testing.assert_close(out[[0, 1, 3, 4]], base[[0, 1, 3, 4]], rtol=0, atol=0)
    assert float((out[2] - ref[2]).detach().abs().max()) > 1e-3
    # Delta-STN's linearisation at Delta = 0 of a grouped layer: primal W_e x + b_e, tangent the
    # forward-mode derivative of layer(x + t x', t Delta) at t = 0
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # (torch warns, jit deprecation, the first time forward AD loads)
    xt, delta = torch.randn_like(x), torch.randn(5, 3, dtype=DT)
    with fwAD.dual_level():  # (plain forward-mode AD through the layer's ordinary path)
        jvp = fwAD.unpack_dual(
            layer(fwAD.make_dual(x, xt), fwAD.make_dual(torch.zeros(5, 3, dtype=DT), delta))
        ).tangent

    with fwAD.dual_level(), linearising():
        primal, tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, xt), Draw(delta, {}, linear=True)))
    torch.testing.assert_close(primal, layer(x, torch.zeros(3, dtype=DT)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, jvp, rtol=1e-12, atol=1e-12)
    # the hyper half (rows [8:] of every group's split) is the response in Delta-STN's masks
    masks = hg.nn.response_masks(layer)
    rows = masks[id(layer.conv.weight)].reshape(-1)
    assert rows.tolist() == [False] * 8 + [True] * 8


def test_grouped_stn_convolutions_refuse_what_they_cannot_build() -> None:
    with pytest.raises(ValueError, match="divisible by groups"):
        hg.nn.StnConv2d(4, 6, 3, 2, groups=4)
    with pytest.raises(ValueError, match="rank=2 with groups=2"):
        hg.nn.StnConv1d(4, 8, 3, 2, groups=2, rank=2)
    with pytest.raises(ValueError, match="groups must be an int"):
        hg.nn.StnConv2d(4, 8, 3, 2, groups=0)


# ----------------------------------------------------------------------------- sigma and entropy by hand


def test_hypergradient_of_lambda_sigma_and_entropy_is_the_closed_form_with_a_per_batch_spec() -> None:
    """One StnLinear (2 -> 1), validation loss mean(y): with lam_i = r + sigma * eps_i,
    y_i = w_e x_i + b_e + (V lam_i) h_i, h_i = w_h x_i + b_h, sigma = lo + (hi - lo) sigmoid(s):
    dL/dr_j = mean_i V_j h_i, dL/ds_j = mean_i V_j eps_ij h_i sigma'(s_j) - tau sigma'(s_j) / sigma_j.
    The second spec is per-batch: its column of eps is the first example's for every example."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, high=0.9),
        q=hg.hparams.Positive(0.7, per_batch=True),
        scale=0.4,
        scale_range=(0.05, 2.0),
        dtype=DT,
    )
    layer = hg.nn.StnLinear(2, 1, hp.size, dtype=DT)
    with torch.no_grad():
        layer.hnet.copy_(torch.tensor([[0.8, -1.3]], dtype=DT))
        hp.raw_scale.copy_(torch.tensor([0.3, -0.6], dtype=DT))
    tau = 0.07

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return m(b[0], h).mean()

    hopt = hg.SelfTuning(
        layer,
        hp,
        val,
        val,
        entropy_weight=tau,
        inner_optimizer=torch.optim.SGD(layer.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    x = torch.randn(6, 2, dtype=DT)
    torch.manual_seed(11)
    eps = torch.randn(6, 2, dtype=DT)
    torch.manual_seed(11)
    (g_raw, g_scale), info = hopt.hypergradient(val_batch=(x,))
    eps[:, 1] = eps[0, 1]  # the per-batch spec's column: the first example's noise
    w, b = layer.weight.detach(), layer.bias.detach()
    h = x @ w[1] + b[1]  # the hyper half
    v = layer.hnet.detach()[0]
    lo, hi = 0.05, 2.0
    sig = torch.sigmoid(hp.raw_scale.detach())
    sigma = lo + (hi - lo) * sig
    dsigma = (hi - lo) * sig * (1 - sig)
    want_raw = v * h.mean()
    want_scale = v * (eps * h[:, None]).mean(0) * dsigma - tau * dsigma / sigma
    torch.testing.assert_close(g_raw, want_raw, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_scale, want_scale, rtol=1e-12, atol=1e-14)
    lam = hp.raw.detach() + sigma * eps
    y = x @ w[0] + b[0] + (lam @ v) * h
    # (info.outer_loss is the validation loss itself, without the entropy term)
    assert info.outer_loss == pytest.approx(float(y.mean()), rel=1e-12, abs=1e-14)


# ----------------------------------------------------------------------------- schedule and history


class _Mlp(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(3, 6, n, dtype=DT), hg.nn.StnLinear(6, 2, n, dtype=DT)
        self.plain = nn.Linear(6, 6, dtype=DT)  # an ordinary layer between the STN ones

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(torch.tanh(self.l1(x, d)), d["drop"], self.training)
        h = hg.nn.gaussian_noise(torch.tanh(self.plain(h)), d["noise"][:, 0], self.training)
        return self.l2(h, d)


def _hp() -> hg.hparams.SelfTuned:
    return hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.3, high=0.9), noise=hg.hparams.Positive(0.1, size=2), dtype=DT
    )


def _loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _batch(i: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def test_schedule_and_history_follow_a_hand_kept_log_with_a_skipped_hyperstep() -> None:
    """warmup=3, T_train=2, T_val=2: the validation phases come after inner steps 3, 5, 7; in the
    second phase the first hyperstep is skipped (a NaN validation batch), and it still takes its
    turn; the history holds one row per accepted hyperstep, with the values and scales the
    hyperparameters held right after it, numbered by accepted hypersteps."""
    torch.manual_seed(0)
    hp = _hp()
    model = _Mlp(hp.size)
    hopt = hg.SelfTuning(
        model,
        hp,
        _loss,
        _loss,
        warmup=3,
        train_steps=2,
        val_steps=2,
        on_nonfinite="skip",
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )
    log: list[dict[str, float]] = []
    phases: list[tuple[int, int]] = []
    bad = (torch.full((8, 3), float("nan"), dtype=DT), torch.zeros(8, dtype=torch.long))
    for i in range(8):
        hopt.step(_batch(i))
        taken = 0
        while hopt.hyper_due():
            vb = bad if (hopt.inner_steps == 5 and taken == 0) else _batch(100 + i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hg.NonFiniteWarning)
                info = hopt.hyper_step(val_batch=vb)
            taken += 1
            if not info.skipped:
                cur = hp.current()
                sig = hp.scale().detach().tolist()
                log.append(
                    {
                        "inner_step": float(hopt.inner_steps),
                        "hyper_step": float(hopt.hyper_steps),
                        "drop": cur["drop"][0],
                        "noise.0": cur["noise"][0],
                        "noise.1": cur["noise"][1],
                        "sigma.drop": sig[0],
                        "sigma.noise.0": sig[1],
                        "sigma.noise.1": sig[2],
                    }
                )
        if taken:
            phases.append((hopt.inner_steps, taken))
    assert phases == [(3, 2), (5, 2), (7, 2)]
    assert hopt.hyper_steps == 5  # six turns, one skipped
    rows = hp.history()
    assert [r["inner_step"] for r in rows] == [3, 3, 5, 7, 7]
    assert [r["hyper_step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows == log


# ----------------------------------------------------------------------------- per-example augmentations


@pytest.mark.parametrize("helper", ["dropout", "gaussian_noise", "cutout", "random_shift"])
def test_each_example_of_an_augmentation_depends_on_its_own_strength_only(helper: str) -> None:
    """Under the same random stream, changing example 2's strength changes example 2 only (the
    draws do not depend on the strengths), and a strength of 0 leaves its example as it is."""
    fn = getattr(hg.nn, helper)
    x = torch.randn(5, 2, 6, 7, dtype=DT) + 3.0  # (no zeros: cutout's zeros are visible)
    if helper == "dropout":
        s, s2 = torch.tensor([0.0, 0.3, 0.5, 0.2, 0.7], dtype=DT), 0.9
    elif helper == "gaussian_noise":
        s, s2 = torch.tensor([0.0, 0.3, 0.5, 0.2, 0.7], dtype=DT), 4.0
    else:
        s, s2 = torch.tensor([0, 2, 3, 1, 4]), 6
    torch.manual_seed(3)
    a = fn(x, s)
    moved = s.clone()
    moved[2] = s2
    torch.manual_seed(3)
    b = fn(x, moved)
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=0)
    assert not torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0], x[0], rtol=0, atol=0)
    assert not torch.equal(a[1], x[1])
    # channels_last in, channels_last out (the same numbers where the draws are per example
    # only; dropout and noise draw in x's memory order)
    torch.manual_seed(3)
    c = fn(x.contiguous(memory_format=torch.channels_last), s)
    assert c.is_contiguous(memory_format=torch.channels_last)
    if helper in ("cutout", "random_shift"):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Delta-STN, hook-based reparam.


class _WeightDrop(nn.Module):
    """An AWD-LSTM-style weight drop on an StnLSTMCell's recurrent columns: the gates' weight is
    re-registered as ``weight_raw`` and the dropped tensor assigned as ``weight`` before each call
    (one mask per batch, at a per-batch rate)."""

    def __init__(self, cell: hg.nn.StnLSTMCell) -> None:
        super().__init__()
        self.cell = cell
        gates = cell.gates
        raw = gates.weight
        del gates._parameters["weight"]
        gates.register_parameter("weight_raw", raw)
        gates.weight = raw.detach().clone()  # (a plain tensor until the first call)

    def forward(self, x: torch.Tensor, state: Any, d: Any) -> Any:
        gates, n_in = self.cell.gates, self.cell.input_size
        raw = gates.weight_raw
        rec = hg.nn.dropout(raw[None, :, n_in:], d["wdrop"][:1], self.training)[0]
        gates.weight = torch.cat([raw[:, :n_in], rec], 1)
        return self.cell(x, state, d)


class _Seq(nn.Module):
    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        cell = hg.nn.StnLSTMCell(3, 4, n, dtype=DT)
        with torch.no_grad():
            cell.gates.hnet.normal_(0, 0.5)
        self.rnn: nn.Module = cell
        if how == "weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.utils.weight_norm(cell.gates, name="weight")
        elif how == "prune":
            torch.nn.utils.prune.l1_unstructured(cell.gates, "weight", amount=0.2)
        else:
            self.rnn = _WeightDrop(cell)
        self.head = nn.Linear(4, 2, dtype=DT)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(x.shape[0])
        state = None
        for t in range(x.shape[1]):
            state = self.rnn(x[:, t], state, d)
        return self.head(state[0])


def _raw_weight(model: _Seq) -> torch.Tensor:
    gates = model.rnn.gates if isinstance(model.rnn, hg.nn.StnLSTMCell) else model.rnn.cell.gates
    for name in ("weight_v", "weight_orig", "weight_raw"):
        if name in gates._parameters:
            return gates._parameters[name]
    raise AssertionError("no raw weight")


def _seq_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 5, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)


@pytest.mark.parametrize("how", ["weight_norm", "prune", "weight_drop"])
def test_delta_stn_trains_or_refuses_the_hyper_half_of_a_hook_reparametrised_stn_layer(how: str) -> None:
    """The gates' hyper half (rows [16:]) belongs to the response: Delta-STN trains it on the
    linearised response objective. Behind a hook-based reparametrisation its raw tensor
    (``weight_v``, ``weight_orig``, ``weight_raw``) matched no response mask, so it took the base
    pass's gradient, which is 0 on the hyper half (that pass skips it): after three steps it had
    not moved at all, while the base rows had (by up to 0.008). Either the response trains or the
    construction says why it cannot."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        wdrop=hg.hparams.Rate(0.3, high=0.9, per_batch=True), noise=hg.hparams.Positive(0.2), dtype=DT
    )
    model = _Seq(hp.size, how)
    raw = _raw_weight(model)
    try:
        hopt = hg.SelfTuning(
            model,
            hp,
            _loss,
            _loss,
            delta=True,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        )
    except ValueError as e:  # a refusal must name the layer's weight
        assert "weight" in str(e) and "delta" in str(e).lower()
        return
    before = raw.detach().clone()
    for i in range(3):
        hopt.step(_seq_batch(i))
    moved = (raw.detach() - before).abs()
    assert float(moved[:16].max()) > 1e-4  # the base rows train
    assert float(moved[16:].max()) > 1e-4  # and so must the response rows


def test_plain_stn_trains_the_hyper_half_behind_a_hook_based_weight_norm() -> None:
    """Control for the test above: with delta=False (one objective for all of phi) the hook-based
    weight norm is fine, both halves train (passes today)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        wdrop=hg.hparams.Rate(0.3, high=0.9, per_batch=True), noise=hg.hparams.Positive(0.2), dtype=DT
    )
    model = _Seq(hp.size, "weight_norm")
    raw = _raw_weight(model)
    hopt = hg.SelfTuning(
        model,
        hp,
        _loss,
        _loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )
    before = raw.detach().clone()
    for i in range(3):
        hopt.step(_seq_batch(i))
    moved = (raw.detach() - before).abs()
    assert float(moved[:16].max()) > 1e-4 and float(moved[16:].max()) > 1e-4


# ----------------------------------------------------------------------------- validation in eval mode


class _Forgot(_Mlp):
    """The helpers called with their default training=True (``self.training`` forgotten)."""

    def __init__(self, n: int, helper: str) -> None:
        super().__init__(n)
        self.helper = helper

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = torch.tanh(self.l1(x, d))
        if self.helper == "dropout":
            h = hg.nn.dropout(h, d["drop"])
        else:
            h = hg.nn.gaussian_noise(h, d["noise"][:, 0])
        return self.l2(torch.tanh(self.plain(h)), d)


@pytest.mark.parametrize("helper", ["dropout", "gaussian_noise"])
def test_a_helper_left_in_training_mode_in_the_validation_step_is_refused(helper: str) -> None:
    """SelfTuning's hyperstep runs the model in eval mode so that lambda reaches the validation
    loss through the best response only; a helper called as ``hg.nn.dropout(h, d["drop"])``
    (``training`` defaults to True) ignored that: the hyperstep's validation loss was that of a
    randomly dropped network, with no error or warning. Here, over three draws of the same
    hyperstep, the dropout rate's hypergradient came out 1e-4, -1e-4, 3e-4 and the two others
    1e-4 to 1.4e-3, where the eval-mode ones are 1e-4 and 5e-4 to 7e-4 (the sign of the first
    flipping from draw to draw). It must be refused, naming the helper and ``training``, with
    nothing changed."""
    torch.manual_seed(0)
    hp = _hp()
    model = _Forgot(hp.size, helper)
    hopt = hg.SelfTuning(
        model,
        hp,
        _loss,
        _loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )
    hopt.step(_batch(0))  # training with the helper on is what it is for
    raw = hp.raw.detach().clone()
    with pytest.raises((ValueError, RuntimeError), match="training"):
        hopt.hyper_step(val_batch=_batch(1))
    assert torch.equal(hp.raw.detach(), raw) and hopt.hyper_steps == 0


# ----------------------------------------------------------------------------- resume inside a T_val phase


class _GroupedCnn(nn.Module):
    """A grouped STN convolution, per-example cutout and shift (Integer), dropout at a per-batch
    rate, an ordinary layer and an STN head: what the earlier resume tests did not combine."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv = hg.nn.StnConv2d(2, 4, 3, n, padding=1, groups=2, dtype=DT)
        self.plain = nn.Conv2d(4, 4, 1, dtype=DT)
        self.head = hg.nn.StnLinear(4 * 6 * 6, 3, n, dtype=DT)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d, train = hp.draw(len(x)), self.training
        x = hg.nn.random_shift(hg.nn.cutout(x, d["cut"], train), d["shift"], train)
        h = torch.relu(self.plain(torch.relu(self.conv(x, d))))
        h = hg.nn.dropout(h, d["drop"], train)
        return self.head(h.flatten(1), d)


def _cnn_run(delta: bool) -> tuple[hg.SelfTuning, Any, Any]:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        cut=hg.hparams.Integer(2, 0, 5),
        shift=hg.hparams.Integer(1, 0, 3, per_batch=True),
        drop=hg.hparams.Rate(0.2, high=0.9, per_batch=True),
        dtype=DT,
    )
    model = _GroupedCnn(hp.size)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.1)
    hopt = hg.SelfTuning(
        model, hp, _loss3, _loss3, delta=delta, warmup=2, train_steps=2, val_steps=2,
        inner_optimizer=inner, outer_optimizer=outer,
    )  # fmt: skip
    return (
        hopt,
        torch.optim.lr_scheduler.StepLR(inner, 2, 0.5),
        torch.optim.lr_scheduler.ExponentialLR(outer, 0.7),
    )


def _loss3(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _img(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(5, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)


def _cnn_loop(
    hopt: hg.SelfTuning, sched: Any, osched: Any, start: int, stop: int, first_taken: int = 0
) -> None:
    """Steps ``start..stop``; a run resumed inside a T_val phase finishes it first."""
    i = start
    taken = first_taken
    while i < stop:
        if taken == 0:
            hopt.step(_img(i))
            sched.step()
        while hopt.hyper_due():
            hopt.hyper_step(val_batch=_img(100 + i))
            osched.step()
            taken += 1
            if (i, taken) == (5, 1) and first_taken == 0 and getattr(hopt, "_stop_here", False):
                return
        taken = 0
        i += 1


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_resume_inside_a_validation_phase_with_schedulers_is_bit_exact(delta: bool) -> None:
    """Saved after the first of the two hypersteps that follow inner step 6 (i = 5), with the
    inner and outer schedulers' states: the resumed run ends where the straight one does, bit
    for bit (weights, momentum, hyperparameters, history, learning rates)."""
    import copy
    import io

    straight, s1, o1 = _cnn_run(delta)
    _cnn_loop(straight, s1, o1, 0, 8)
    rng_straight = torch.get_rng_state()

    first, s2, o2 = _cnn_run(delta)
    first._stop_here = True  # type: ignore[attr-defined]
    _cnn_loop(first, s2, o2, 0, 8)
    assert first.inner_steps == 6 and first.hyper_due()  # inside the phase: one hyperstep to go
    buf = io.BytesIO()
    torch.save({"hopt": first.state_dict(), "s": s2.state_dict(), "o": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    resumed, s3, o3 = _cnn_run(delta)
    resumed.load_state_dict(copy.deepcopy(saved["hopt"]))
    s3.load_state_dict(saved["s"])
    o3.load_state_dict(saved["o"])
    _cnn_loop(resumed, s3, o3, 5, 8, first_taken=1)
    assert torch.equal(torch.get_rng_state(), rng_straight)  # (the random stream too)

    for a, b in zip(
        [*straight.model.state_dict().values(), *straight.hparams.parameters()],
        [*resumed.model.state_dict().values(), *resumed.hparams.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)
    sa, sb = straight.inner_optimizer.state_dict()["state"], resumed.inner_optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert straight.hparams.history() == resumed.hparams.history()
    assert [r["inner_step"] for r in straight.hparams.history()] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert s1.get_last_lr() == s3.get_last_lr() and o1.get_last_lr() == o3.get_last_lr()


# ----------------------------------------------------------------------------- custom hypernetwork


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_a_hypernetwork_with_its_own_dropout_is_deterministic_in_the_hyperstep(sampling: str) -> None:
    """A custom hypernetwork with a Dropout of its own (a submodule of the HyperNet, not of the
    base): the hyperstep runs it in eval mode too, so two hypergradients at the same weights are
    equal and match central differences of the eval-mode validation loss; the inner steps run
    it in training mode (two steps from the same state and stream agree, two streams differ)."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.05, transform="exp"),
        width=hg.hparams.Rate(0.4),
        learn_scale=False,
        dtype=DT,
    )
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    p = sum(t.numel() for t in base.parameters())
    response = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, p)).to(DT)
    net = hg.nn.HyperNet(base, hp.size, hypernet=response)

    def train(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        w = m.weights(h)
        pen = sum((v**2).sum() for v in w.values())
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + h.draw(1)["decay"][0] * pen

    def val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + 0.1 * h.draw(1)["width"][0]

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        sampling=sampling,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, 1, generator=g, dtype=DT))
    vb = (torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, 1, generator=g, dtype=DT))
    for _ in range(3):
        hopt.step(tb)
    (ga,), _ = hopt.hypergradient(val_batch=vb)
    (gb,), _ = hopt.hypergradient(val_batch=vb)
    assert torch.equal(ga, gb) and net.training and response.training

    def objective() -> float:
        net.eval()
        try:
            with torch.no_grad():
                lam = hp.raw
                out = net(vb[0], hparams=lam)
                width = float(hp.specs["width"].value(lam[1:2])[0])
                return float(((out - vb[1]) ** 2).mean()) + 0.1 * width
        finally:
            net.train()

    fd = central_difference(objective, hp.raw, eps=1e-6)
    torch.testing.assert_close(ga, fd, rtol=1e-6, atol=1e-9)
    assert float(ga.abs().min()) > 1e-6
    # the inner step runs the hypernetwork's dropout: the same stream gives the same step,
    # another stream another one
    state = {k: v.clone() for k, v in net.state_dict().items()}
    after = []
    for seed in (5, 5, 6):
        net.load_state_dict(state)
        torch.manual_seed(seed)
        hopt.step(tb)
        after.append(net.base_weights.detach().clone())
    assert torch.equal(after[0], after[1]) and not torch.equal(after[0], after[2])
