"""Round 16, self-tuning networks and best-response hypernetworks as a new user writes them.

* Delta-STN (Bae & Grosse 2020, pomonam/Self-Tuning-Networks ``DeltaStnStepOptimizer``) on a
  convolutional net with non-square kernels, stride, dilation, reflect and ``"same"`` padding,
  a low-rank layer, BatchNorm in training mode, a forward hook and a channels_last batch: the
  step's two gradients against an independent forward-mode reference, in float64.
* STN convolutions at a fixed lambda against ``F.conv2d`` with the weights formed by hand, for
  every padding mode, non-square kernels, stride and dilation, channels_last inputs.
* Hypergradients through shared, frozen and unused STN layers and BatchNorm, and through a
  HyperNet over a BatchNorm base (local and global sampling), against central differences in
  float64; the HyperNet under ``torch.func.functional_call`` is the HyperNet.
* Resumes in the middle of warm-up, of a T_train phase and of a T_val phase (Delta-STN with
  dropout, OneCycleLR on the inner optimiser, parameter groups, gradient clipping): bit for bit.
* Fixed here: a layer fed the draw's features as a tensor (``layer(x, d.features)``, one of the
  documented inputs) was silently not linearised in Delta-STN's response step (its response
  0.04 off after one step); ``n_hparams`` given as a NumPy integer was refused by the STN layers
  (HyperNet took it), and a HyperNet given a tensor of several counts failed with torch's
  "only integer tensors of a single element can be converted to an index".
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.hparams import Draw
from hypergrad.testing import central_difference

DT = torch.float64


class _Fixed:
    """Stands in for the container: every ``draw`` is the given one."""

    def __init__(self, draw: Draw) -> None:
        self.d = draw

    def draw(self, n: int) -> Draw:
        return self.d


def _ce(m: Any, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _big_response(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in hg.nn.stn_layers(model):
            layer.hnet.normal_()


# ----------------------------------------------------------------------------- Delta-STN, tensor features


class _TwoLayer(nn.Module):
    def __init__(self, n: int, as_tensor: bool) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(4, 6, n, dtype=DT), hg.nn.StnLinear(6, 3, n, dtype=DT)
        self.scale = _StnScale(6, n)
        self.as_tensor = as_tensor

    def forward(self, x: Tensor, h: Any) -> Tensor:
        d = h.draw(len(x))
        f = d.features if self.as_tensor else d
        return self.l2(self.scale(torch.tanh(self.l1(x, f)), f), f)


class _StnScale(hg.nn.StnLayer):
    """A user's own STN layer: :math:`y = x (1 + V\\tilde\\lambda)`, through ``modulation``."""

    def __init__(self, n_out: int, n: int) -> None:
        super().__init__()
        self._init_response(n_out, n, {"dtype": DT})

    def forward(self, x: Tensor, h: Any) -> Tensor:
        return x * (1 + self.modulation(h, x.shape[0]))


def _delta_step(as_tensor: bool, linearize: bool = True) -> dict[str, Tensor]:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT, scale=2.5, scale_range=(0.1, 3.0))
    model = _TwoLayer(hp.size, as_tensor)
    _big_response(model)
    hopt = hg.SelfTuning(
        model, hp, _ce, _ce, delta=True, linearize=linearize,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    batch = (torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,)))
    torch.manual_seed(1)
    hopt.step(batch)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_a_layer_fed_the_draws_features_as_a_tensor_is_linearised_like_one_fed_the_draw() -> None:
    """``layer(x, d.features)`` is a documented way to feed an STN layer; in Delta-STN's response
    step it was used as it is, so that layer's output was not linearised (hnet 0.039 off the
    draw-fed run after one step, the linearize=False result instead)."""
    by_draw, by_tensor = _delta_step(False), _delta_step(True)
    for k in by_draw:
        torch.testing.assert_close(by_tensor[k], by_draw[k], rtol=1e-13, atol=1e-14)
    # the linearisation matters here, so the comparison can fail
    plain = _delta_step(False, linearize=False)
    assert float((plain["l1.hnet"] - by_draw["l1.hnet"]).abs().max()) > 1e-2


def test_tensor_features_still_work_outside_delta_stn_and_in_its_base_step() -> None:
    """The change touches only the linearised call: elsewhere a tensor of features is used as
    it is (the layer equals its ``fixed`` layer at those features)."""
    torch.manual_seed(0)
    layer = hg.nn.StnLinear(3, 2, 2, dtype=DT)
    _big_response(layer)
    x, f = torch.randn(4, 3, dtype=DT), torch.randn(2, dtype=DT)
    torch.testing.assert_close(layer(x, f), layer.fixed(f)(x), rtol=1e-13, atol=1e-13)
    scale = _StnScale(3, 2)
    _big_response(scale)
    torch.testing.assert_close(scale(x, f), x * (1 + scale.hnet @ f), rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- counts


def test_stn_layers_take_numpy_integer_counts_and_hypernet_names_a_bad_count() -> None:
    for layer in (
        hg.nn.StnLinear(4, 3, np.int64(2)),
        hg.nn.StnConv2d(2, 3, 3, np.int64(2)),
        hg.nn.StnConv1d(2, 3, 3, np.int32(2)),
        hg.nn.StnLSTMCell(3, 4, np.int64(2)),
    ):
        assert type(layer.n_hparams) is int and layer.n_hparams == 2
        assert layer.hnet.shape[1] == 2 if hasattr(layer, "hnet") else layer.gates.hnet.shape[1] == 2
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3), q=hg.hparams.Rate(0.5))
    model = nn.ModuleDict({"a": hg.nn.StnLinear(4, 3, np.int64(hp.size))})
    hg.SelfTuning(  # the size check compares equal counts
        model, hp, _ce, _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    for bad in (torch.tensor([1, 2]), torch.tensor(2.0), 2.0, True, 0):
        with pytest.raises(ValueError, match="n_hparams must be an int >= 1"):
            hg.nn.HyperNet(nn.Linear(2, 2), bad)
        with pytest.raises(ValueError, match="n_hparams must be an int >= 1"):
            hg.nn.StnLinear(2, 2, bad)


# ----------------------------------------------------------------------------- Delta-STN on convolutions


class _ConvNet(nn.Module):
    """Non-square kernels, stride, dilation, reflect and "same" padding, a low-rank layer,
    BatchNorm (training mode in the step), per-example dropout, and a forward hook that
    doubles the first convolution's output."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.c1 = hg.nn.StnConv2d(
            2, 4, (3, 2), n, stride=(2, 1), padding=(1, 1), padding_mode="reflect", dtype=DT
        )
        self.bn = nn.BatchNorm2d(4, dtype=DT)
        self.c2 = hg.nn.StnConv2d(4, 3, (1, 3), n, dilation=(1, 2), padding="same", dtype=DT, rank=2)
        self.fc = hg.nn.StnLinear(3, 3, n, dtype=DT)
        self.c1.register_forward_hook(lambda m, a, o: 2 * o)

    def forward(self, x: Tensor, h: Any) -> Tensor:
        d = h.draw(len(x))
        z = torch.tanh(self.bn(self.c1(x, d)))
        z = hg.nn.dropout(z, d["p"], self.training)
        z = torch.tanh(self.c2(z, d)).mean((2, 3))
        return self.fc(z, d)


def test_delta_stn_step_on_a_conv_net_with_batchnorm_hooks_and_channels_last_is_the_papers() -> None:
    """Base weights on the loss at lambda, the response on the loss of the output linearised in
    the perturbation (an independent forward-mode reference over the whole network, itself
    checked against central differences); BatchNorm's statistics move once."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), q=hg.hparams.Positive(0.5), dtype=DT)
    model = _ConvNet(hp.size)
    _big_response(model)
    lr = 0.1
    hopt = hg.SelfTuning(
        model, hp, _ce, _ce, delta=True,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    ref = copy.deepcopy(model)
    n, size = 5, hp.size
    x = torch.randn(n, 2, 7, 6, dtype=DT).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (n,))
    raw, sigma = hp.raw.detach(), hp.scale().detach()
    params = dict(ref.named_parameters())

    torch.manual_seed(7)
    base = Draw(torch.zeros(n, size, dtype=DT), hp.values_of(raw.expand(n, -1)), shared=True)
    base_loss = _ce(ref, _Fixed(base), (x, y))
    g_base = torch.autograd.grad(base_loss, list(params.values()))
    stats = {k: v.clone() for k, v in ref.named_buffers()}
    lam = raw + sigma * torch.randn(n, size, dtype=DT)  # the response step's draw
    values = hp.values_of(lam)
    rng = torch.get_rng_state()

    def out(delta: Tensor) -> Tensor:
        torch.set_rng_state(rng)  # the same dropout masks in every call
        return ref(x, _Fixed(Draw(delta, values)))

    pert = lam - raw
    with fwAD.dual_level():
        primal, tangent = (t + 0 for t in fwAD.unpack_dual(out(fwAD.make_dual(torch.zeros_like(pert), pert))))
    fd = (out(1e-6 * pert) - out(-1e-6 * pert)) / 2e-6
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    g_resp = torch.autograd.grad(F.cross_entropy(primal + tangent, y), list(params.values()))

    masks = hg.nn.response_masks(ref)
    torch.manual_seed(7)
    returned = hopt.step((x, y))
    torch.testing.assert_close(returned, base_loss.detach(), rtol=0, atol=0)
    now = dict(model.named_parameters())
    for (name, p), gb, gr in zip(params.items(), g_base, g_resp, strict=True):
        g = torch.where(torch.as_tensor(masks.get(id(p), False)), gr, gb)
        torch.testing.assert_close(now[name].detach(), p.detach() - lr * g, rtol=1e-12, atol=1e-14)
    assert masks[id(ref.c2.hyper_out)] is True and bool(masks[id(ref.c1.conv.weight)][4:].all())
    for k, v in model.named_buffers():  # the base pass's statistics, not the response pass's
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------- convolutions at a fixed lambda


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
        {"kernel_size": (3, 4), "padding": "same", "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "dilation": 2},
        {"kernel_size": (1, 3), "padding": "valid", "stride": 2, "bias": False},
        {"kernel_size": (2, 3), "padding": (1, 2), "padding_mode": "replicate", "rank": 2},
    ],
    ids=["stride-dilation", "same-reflect-even", "circular", "valid-nobias", "replicate-rank"],
)
def test_stn_conv2d_at_a_fixed_lambda_is_the_convolution_with_weights_formed_by_hand(
    kw: dict[str, Any],
) -> None:
    torch.manual_seed(0)
    rank = kw.pop("rank", None)
    layer = hg.nn.StnConv2d(3, 4, n_hparams=2, dtype=DT, rank=rank, **kw)
    _big_response(layer)
    feats = torch.randn(5, 2, dtype=DT)  # one lambda per example
    x = torch.randn(5, 3, 9, 8, dtype=DT)
    c = layer.conv
    w, b = c.weight.detach(), None if c.bias is None else c.bias.detach()
    refs = []
    for i in range(5):
        s = layer.hnet.detach() @ feats[i]
        w_h, b_h = w[4:], None if b is None else b[4:]
        if rank is not None:
            u = layer.hyper_out.detach()  # type: ignore[union-attr]
            w_h, b_h = torch.einsum("or,rikl->oikl", u, w_h), None if b_h is None else u @ b_h
        wi = w[:4] + s[:, None, None, None] * w_h
        bi = None if b is None else b[:4] + s * b_h
        xi = x[i : i + 1]
        mode = kw.get("padding_mode", "zeros")
        pad = kw.get("padding", 0)
        if mode != "zeros":  # pad by hand, as nn.Conv2d does for these modes
            xi = F.pad(xi, c._reversed_padding_repeated_twice, mode=mode)
            pad = 0
        refs.append(F.conv2d(xi, wi, bi, c.stride, pad, c.dilation))
    ref = torch.cat(refs)
    out = layer(x, feats)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(cl, feats), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.fixed(feats[2])(x[2:3]), refs[2], rtol=1e-12, atol=1e-12)
    plain = layer.fixed(feats[2])
    assert isinstance(plain, nn.Conv2d) and plain.padding_mode == c.padding_mode
    assert (plain.kernel_size, plain.stride, plain.dilation) == (c.kernel_size, c.stride, c.dilation)


# ----------------------------------------------------------------------------- hypergradients vs differences


class _Branches(nn.Module):
    """An STN layer shared by two branches, a frozen STN layer, an unused one, BatchNorm."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inp = hg.nn.StnLinear(3, 5, n, dtype=DT)
        self.shared = hg.nn.StnLinear(5, 5, n, dtype=DT, rank=2)
        self.frozen = hg.nn.StnLinear(5, 5, n, dtype=DT).requires_grad_(False)
        self.unused = hg.nn.StnLinear(5, 5, n, dtype=DT)
        self.bn = nn.BatchNorm1d(5, dtype=DT)
        self.out = hg.nn.StnLinear(10, 2, n, dtype=DT)

    def forward(self, x: Tensor, h: Any) -> Tensor:
        d = h.draw(len(x))
        z = torch.tanh(self.bn(self.inp(x, d)))
        z = hg.nn.dropout(z, d["p"], self.training)
        a = torch.tanh(self.shared(z, d))
        b = torch.tanh(self.shared(self.frozen(z, d), d))
        return self.out(torch.cat([a, b], 1), d)


def _mse_value_penalty(m: Any, h: Any, b: Any) -> Tensor:
    out = m(b[0], h)
    return ((out - b[1]) ** 2).mean() + 0.1 * h.draw(1)["w"][0] ** 2


def test_selftuning_hypergradient_through_shared_frozen_unused_layers_and_batchnorm() -> None:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.2, high=0.9), w=hg.hparams.Positive(0.3, transform="exp"),
        k=hg.hparams.Integer(2, 0, 4), learn_scale=False, scale=0.3, dtype=DT,
    )  # fmt: skip
    model = _Branches(hp.size)
    _big_response(model)
    frozen = copy.deepcopy(model.frozen.state_dict())
    hopt = hg.SelfTuning(
        model, hp, _mse_value_penalty, _mse_value_penalty, perturb_val=False, train_steps=1,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    train = (torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT))
    val = (torch.randn(12, 3, dtype=DT), torch.randn(12, 2, dtype=DT))
    for _ in range(3):
        hopt.step(train)
    assert model.unused.hnet.grad is None and model.frozen.hnet.grad is None

    def f() -> float:
        model.eval()
        try:
            with torch.no_grad():
                return float(_mse_value_penalty(model, hp, val))
        finally:
            model.train()

    grads, info = hopt.hypergradient(val_batch=val)
    fd = central_difference(f, hp.raw, eps=1e-6)
    assert info.outer_loss == pytest.approx(f(), rel=1e-12)
    # entries 0, 1 (rate and penalty) are continuous; the integer's value is piecewise constant,
    # but it enters the layers through its unconstrained value, which is smooth
    torch.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-9)
    assert float(grads[0].abs().min()) > 1e-4  # every entry reaches the loss
    for k, v in model.frozen.state_dict().items():
        assert torch.equal(v, frozen[k])


@pytest.mark.parametrize("sampling", ["local", "global"])
def test_best_response_hypergradient_over_a_batchnorm_base_and_its_functional_call(sampling: str) -> None:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        d=hg.hparams.Positive(0.1, transform="exp"), p=hg.hparams.Rate(0.2, high=0.8),
        learn_scale=False, scale=0.5, dtype=DT,
    )  # fmt: skip
    base = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.1), nn.Linear(6, 1))
    base = base.to(DT)
    net = hg.nn.HyperNet(base, hp.size, init_std=0.3)

    def train(m: Any, h: Any, b: Any) -> Tensor:
        w = m.weights(h)
        pen = sum((w[k] ** 2).sum() for k in ("0.weight", "4.weight"))
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + h.draw(1)["d"][0] * pen

    def val(m: Any, h: Any, b: Any) -> Tensor:
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + 0.05 * h.draw(1)["p"][0]

    hopt = hg.BestResponse(
        net, hp, train, val, sampling=sampling, prior_scale=0.5,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    tb = (torch.randn(16, 3, dtype=DT), torch.randn(16, 1, dtype=DT))
    vb = (torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT))
    for _ in range(4):
        hopt.step(tb)
    stats = {k: v.clone() for k, v in net.named_buffers()}
    assert int(stats["base_state.1.num_batches_tracked"]) == 4

    def f() -> float:
        net.eval()
        try:
            with torch.no_grad():
                return float(val(net, hp, vb))
        finally:
            net.train()

    grads, info = hopt.hypergradient(val_batch=vb)
    torch.testing.assert_close(grads[0], central_difference(f, hp.raw, eps=1e-6), rtol=1e-6, atol=1e-10)
    assert info.outer_loss == pytest.approx(f(), rel=1e-12)
    for k, v in net.named_buffers():  # the hypergradient left the running statistics alone
        assert torch.equal(v, stats[k])
    # the user's functional idiom: torch.func.functional_call over the HyperNet is the HyperNet
    net.eval()
    state = {k: v.detach() for k, v in [*net.named_parameters(), *net.named_buffers()]}
    lam = hp.raw.detach()
    direct = net(vb[0], hparams=lam)
    functional = torch.func.functional_call(net, state, (vb[0],), {"hparams": lam})
    torch.testing.assert_close(functional, direct, rtol=0, atol=0)
    moved = {k: v + 0.01 if k == "base_weights" else v for k, v in state.items()}
    shifted = torch.func.functional_call(net, moved, (vb[0],), {"hparams": lam})
    assert float((shifted - direct).detach().abs().max()) > 1e-4  # the substituted weights act
    net.train()


# ----------------------------------------------------------------------------- resumes


class _Seq(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n)
        self.l2 = hg.nn.StnLinear(8, 3, n, rank=2)

    def forward(self, x: Tensor, h: Any) -> Tensor:
        d = h.draw(len(x))
        x = hg.nn.gaussian_noise(x, d["noise"], self.training)
        z = hg.nn.dropout(torch.relu(self.l1(x, d)), d["drop"], self.training)
        return self.l2(z, d)


def _resumable() -> tuple[hg.SelfTuning, Any]:
    hp = hg.hparams.SelfTuned(
        drop=hg.hparams.Rate(0.3, high=0.9), noise=hg.hparams.Positive(0.1, per_batch=True)
    )
    model = _Seq(hp.size)
    response = [p for n, p in model.named_parameters() if n.endswith("hnet") or n.endswith("hyper_out")]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("hnet") or n.endswith("hyper_out"))]
    inner = torch.optim.SGD(
        [{"params": rest, "weight_decay": 1e-3}, {"params": response, "lr": 0.02, "momentum": 0.5}],
        lr=0.05, momentum=0.9, nesterov=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(inner, max_lr=[0.1, 0.04], total_steps=40)
    hopt = hg.SelfTuning(
        model, hp, _ce, _ce, delta=True, warmup=3, train_steps=3, val_steps=2,
        inner_optimizer=inner, outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )  # fmt: skip
    return hopt, sched


def _events(hopt: hg.SelfTuning, sched: Any, start: int, stop: int, save_at: int = -1) -> Any:
    """Run events ``start..stop-1`` (a hyperstep when one is due, else a clipped inner step and
    a scheduler step); return a checkpoint taken after event ``save_at``."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(stop)]
    saved, kinds = None, []
    for i in range(start, stop):
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=batches[i])
            kinds.append("val")
        else:
            hopt.step(batches[i], max_grad_norm=1.0)
            sched.step()
            kinds.append("train")
        if i == save_at:
            buf = io.BytesIO()
            torch.save({"hopt": hopt.state_dict(), "sched": sched.state_dict()}, buf)
            saved = buf.getvalue()
    return saved, kinds


@pytest.mark.parametrize(
    "save_at", [1, 3, 6, 8], ids=["mid-warmup", "mid-T_val", "mid-T_train", "mid-T_val-2"]
)
def test_delta_stn_resumes_bit_exactly_in_warmup_and_inside_either_phase(save_at: int) -> None:
    torch.manual_seed(0)
    straight, sched = _resumable()
    saved, kinds = _events(straight, sched, 0, 14, save_at=save_at)
    rng_straight = torch.get_rng_state()
    assert kinds == ["train"] * 3 + (["val"] * 2 + ["train"] * 3) * 2 + ["val"]
    assert kinds[save_at] == kinds[save_at + 1]  # the checkpoint falls inside a phase
    torch.manual_seed(123)  # a fresh process: other weights, another random stream
    resumed, sched2 = _resumable()
    _events(resumed, sched2, 0, 2)  # and a run that went elsewhere first
    state = torch.load(io.BytesIO(saved), weights_only=False)
    resumed.load_state_dict(state["hopt"])
    sched2.load_state_dict(state["sched"])
    _, rest = _events(resumed, sched2, save_at + 1, 14)
    assert rest == kinds[save_at + 1 :]
    assert torch.equal(torch.get_rng_state(), rng_straight)  # the same draws and masks were taken
    a, b = straight, resumed
    for x, y in zip(
        [*a.model.state_dict().values(), *a.hparams.state_dict().values()],
        [*b.model.state_dict().values(), *b.hparams.state_dict().values()],
        strict=True,
    ):
        assert torch.equal(x, y)
    assert a.hparams.history() == b.hparams.history() and len(a.hparams.history()) == 5
    ga, gb = a.inner_optimizer.param_groups, b.inner_optimizer.param_groups
    assert [g["lr"] for g in ga] == [g["lr"] for g in gb] and ga[0]["lr"] != ga[1]["lr"]
    sa, sb = a.inner_optimizer.state_dict()["state"], b.inner_optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa
    )


# ----------------------------------------------------------------------------- bad input


def test_augmentations_given_the_whole_draw_or_no_number_say_which_value_to_pass() -> None:
    """``hg.nn.dropout(x, d)`` (the draw instead of ``d["dropout"]``) failed with torch's "could
    not determine the shape of object type 'Draw'"; the container, with "Could not infer dtype
    of SelfTuned"; None, with a RuntimeError."""
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.3, high=0.9), k=hg.hparams.Integer(2, 0, 4))
    d = hp.draw(4)
    x = torch.randn(4, 3, 6, 6)
    for f in (hg.nn.dropout, hg.nn.gaussian_noise, hg.nn.cutout, hg.nn.random_shift):
        for whole in (d, hp):
            with pytest.raises(
                TypeError, match=rf"got the whole {type(whole).__name__}; pass one .*d\['dropout'\]"
            ):
                f(x, whole)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"need a number or one per example, shape \(4,\); got NoneType"):
            f(x, None)  # type: ignore[arg-type]
    # what they take is unchanged, and in eval mode nothing is checked (x itself comes back)
    assert hg.nn.cutout(x, d["k"]).shape == x.shape and hg.nn.dropout(x, d, training=False) is x  # type: ignore[arg-type]
    torch.manual_seed(0)
    a = hg.nn.dropout(x, d["dropout"])
    torch.manual_seed(0)
    assert torch.equal(a, hg.nn.dropout(x, [0.3] * 4))
    for layer, bad in ((hg.nn.StnLinear(3, 2, 2), None), (hg.nn.StnConv2d(3, 2, 3, 2), [1.0])):
        with pytest.raises(ValueError, match=rf"expects x .* got {type(bad).__name__}"):
            layer(bad, d)  # type: ignore[arg-type]
