"""Round 26 (batches): what a training batch can be, across the families.

Hypergradients are checked in float64 against plain-autograd references written here (the
unrolled SGD steps differentiated with ``torch.autograd.grad(..., create_graph=True)``).

Bugs these tests found (fixed in round 26):

* Unrolled replays handed the loss the recorded batch's NumPy arrays, objects of one's own and
  torch.Generators themselves, so a loss that changes them (``x /= 255``, drawing noise) changed
  them for every later replay: 29-52% off, silently; the same through ``x.data.div_(255)`` (no
  version counter moves). Every replay now gets a copy of the recorded batch.
* Delta-STN's response pass got the NumPy array / the tensor (through ``.data``) the base pass
  had changed.
* clone_batch copied a tensor held twice (an autoencoder's ``(x, x)``) into two.
* an empty batch was refused as "not finite" without naming it.
* inference-mode batches crashed Unrolled / Delta-STN on their version counters.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import hypergrad as hg

DT = torch.float64
LR = 0.1


def _lin() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _hp() -> nn.Module:
    return hg.hparams.Hparam(torch.tensor([0.05, 0.2], dtype=DT), "positive")


def _penalty(lam: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return lam[0] * (w0**2).sum() / 2 + lam[1] * (w2**2).sum() / 2


def _val_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _val() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT)


def _reference(
    model: nn.Module,
    hp: nn.Module,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    val: tuple[torch.Tensor, torch.Tensor],
    lr: float = LR,
) -> torch.Tensor:
    """d val_loss / d hp.raw through plain SGD steps on the mse + penalty loss at ``inputs``
    (the (x, y) each real step's loss computed with), from ``model``'s current weights."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    raw = list(hp.parameters())
    lam = hp()
    for x, y in inputs:
        out = functional_call(model, params, (x,))
        lt = ((out - y) ** 2).mean() + _penalty(lam, params["0.weight"], params["2.weight"])
        gs = torch.autograd.grad(lt, list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), gs, strict=True)}
    lv = ((functional_call(model, params, (val[0],)) - val[1]) ** 2).mean()
    return torch.autograd.grad(lv, raw)[0]


def _unrolled(model: nn.Module, hp: nn.Module, loss: Callable[..., torch.Tensor], **kw: Any) -> hg.Unrolled:
    return hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        **kw,
    )


# ----------------------------------------------------------------------------- 1. a loss that
# changes a NumPy array of its batch in place (pixels normalised with ``x /= 255``): the step's
# version counters do not see it, so each replay handed the loss the recorded array itself, which
# the replay's loss then changed again: the next replay of the step (a second hyperstep over the
# same window, checkpoint's recomputation, forward mode's next entry) trained on x / 255**2


def _numpy_data(steps: int = 3) -> list[tuple[np.ndarray, torch.Tensor]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((6, 3)) * 255.0, torch.tensor(rng.standard_normal((6, 1)), dtype=DT))
        for _ in range(steps)
    ]


def _numpy_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    x = b["pixels"]
    x /= 255.0  # in place, on the NumPy array the batch holds
    xt = torch.from_numpy(x)
    return ((m(xt) - b["labels"]) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


class _GraphBatch:
    """A batch object of one's own (as PyTorch Geometric's ``Data``): tensors held as attributes,
    which hypergrad copies whole (deep copy) rather than looking inside."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


def _object_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    x = b.x.div_(255.0)  # in place, on a tensor the version check does not see
    return ((m(x) - b.y) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


@pytest.mark.parametrize(
    "kw", [{}, {"checkpoint": True}, {"mode": "forward"}], ids=["reverse", "checkpoint", "forward"]
)
def test_unrolled_replays_a_numpy_batch_the_loss_normalises_in_place(kw: dict[str, Any]) -> None:
    data, val = _numpy_data(), _val()
    model, hp = _lin(), _hp()
    expected = _reference(model, hp, [(torch.from_numpy(x / 255.0), y) for x, y in data], val)
    hopt = _unrolled(model, hp, _numpy_loss, steps=3, **kw)
    for x, y in data:
        hopt.step({"pixels": x.copy(), "labels": y})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (judged by the values below)
        g1, _ = hopt.hypergradient(val_batch=val)
        g2, _ = hopt.hypergradient(val_batch=val)  # a second replay of the same records
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(g1[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 2. Delta-STN runs
# train_loss twice per step on the same batch (base pass, response pass): the response pass gets
# a pristine copy only where the base pass changed the batch's *tensors*; a NumPy array the base
# pass normalised in place reached the response pass normalised twice


class _StnNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = hg.nn.StnLinear(5, 6, n)
        self.b = hg.nn.StnLinear(6, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(torch.tanh(self.a(x, d)), d["dropout"], self.training)
        return self.b(h, d)


def _delta_stn_weights(loss: Callable[[nn.Module, Any, Any], torch.Tensor], steps: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    data = [
        (rng.standard_normal((8, 5)).astype(np.float32) * 255, torch.tensor(rng.integers(0, 3, 8)))
        for _ in range(steps)
    ]
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
    model = _StnNet(hp.size)
    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        delta=True,
    )
    for x, y in data:
        hopt.step({"pixels": x.copy(), "labels": y})
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_delta_stn_response_pass_sees_the_numpy_array_the_base_pass_saw() -> None:
    def out_of_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x = torch.from_numpy(b["pixels"] / np.float32(255.0))
        return nn.functional.cross_entropy(m(x, h), b["labels"])

    def in_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x = b["pixels"]
        x /= np.float32(255.0)
        return nn.functional.cross_entropy(m(torch.from_numpy(x), h), b["labels"])

    expected = _delta_stn_weights(out_of_place)
    got = _delta_stn_weights(in_place)
    # (the same float32 arithmetic in both runs: equal to the last bit)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, {"checkpoint": True}], ids=["reverse", "checkpoint"])
def test_unrolled_replays_a_custom_batch_object_the_loss_changes_in_place(kw: dict[str, Any]) -> None:
    data, val = _numpy_data(), _val()
    model, hp = _lin(), _hp()
    expected = _reference(model, hp, [(torch.from_numpy(x / 255.0), y) for x, y in data], val)
    hopt = _unrolled(model, hp, _object_loss, steps=3, **kw)
    for x, y in data:
        hopt.step(_GraphBatch(torch.tensor(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (judged by the values below)
        g1, _ = hopt.hypergradient(val_batch=val)
        g2, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(g1[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 3. a Hugging-Face
# style batch: a ``UserDict`` subclass (as transformers' ``BatchEncoding``) read by attribute and
# by key, whose loss pops the labels. (Passes: no test used a UserDict batch before; map_containers
# copies it with UserDict.__copy__, which keeps the subclass, its attributes and attribute access.)


class BatchEncoding(collections.UserDict):  # type: ignore[type-arg]
    def __init__(self, data: dict[str, Any], n_sequences: int = 1) -> None:
        super().__init__(data)
        self._n_sequences = n_sequences

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__") or item in ("data", "_n_sequences"):
            raise AttributeError(item)
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(item) from None

    def to(self, device: Any) -> BatchEncoding:
        self.data = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.data.items()}
        return self


def _encoding_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    assert isinstance(b, BatchEncoding) and b._n_sequences == 2
    labels = b.pop("labels")  # the rest goes to the model, as in Hugging Face's Trainer
    x = b.input_values * b.attention_mask  # (attribute access; a bool mask)
    return ((m(x) - labels) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


def _encodings(steps: int = 3) -> list[BatchEncoding]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(steps):
        b = 6 - 2 * (i == steps - 1)  # the last batch is short
        mask = torch.rand(b, 3, generator=g) > 0.2
        out.append(
            BatchEncoding(
                {
                    "input_values": torch.randn(b, 3, generator=g, dtype=DT),
                    "attention_mask": mask,
                    "labels": torch.randn(b, 1, generator=g, dtype=DT),
                    "text": ["a"] * b,
                    "ids": None,
                },
                n_sequences=2,
            )
        )
    return out


@pytest.mark.parametrize(
    "kw", [{}, {"checkpoint": True}, {"mode": "forward"}], ids=["reverse", "checkpoint", "forward"]
)
def test_unrolled_on_a_batch_encoding_whose_loss_pops_the_labels(kw: dict[str, Any]) -> None:
    data, val = _encodings(), _val()
    model, hp = _lin(), _hp()
    inputs = [(b["input_values"] * b["attention_mask"], b["labels"]) for b in data]
    expected = _reference(model, hp, inputs, val)
    hopt = _unrolled(model, hp, _encoding_loss, steps=3, **kw)
    for b in data:
        hopt.step(b)
    assert all("labels" not in b for b in data)  # (the real steps popped the caller's, as PyTorch's would)
    g1, _ = hopt.hypergradient(val_batch=val)
    g2, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(g1[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 4. one tensor twice
# in a batch (an autoencoder's (x, x)) whose model changes its input in place (an in-place clamp
# as its first layer): the real step's target changed with the input. Unrolled's record cloned
# each occurrence separately, so the replay trained on the clamped input against the unclamped
# target: other steps than the real ones (hypergradient 43% off; a ReplayWarning only while the
# hyperparameters have not moved, silent afterwards)


class _AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.clamp = nn.ReLU(inplace=True)  # (on the input itself: allowed, it needs no grad)
        self.a, self.b = nn.Linear(3, 4).to(DT), nn.Linear(4, 3).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.clamp(x))))


def _ae_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    inp, target = b
    return ((m(inp) - target) ** 2).mean() + _penalty(h(), m.a.weight, m.b.weight)


def _ae_val(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


@pytest.mark.parametrize("kw", [{}, {"checkpoint": True}], ids=["reverse", "checkpoint"])
def test_unrolled_keeps_a_tensor_that_occurs_twice_in_the_batch_one_tensor(kw: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 3, generator=g, dtype=DT) for _ in range(3)]
    val = _val()
    model, hp = _AE(), _hp()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lam = hp()
    for x in xs:  # the real steps: input and target both clamped (one tensor)
        xr = x.relu()
        lt = ((functional_call(model, params, (xr,)) - xr) ** 2).mean()
        lt = lt + _penalty(lam, params["a.weight"], params["b.weight"])
        gs = torch.autograd.grad(lt, list(params.values()), create_graph=True)
        params = {n: p - LR * d for (n, p), d in zip(params.items(), gs, strict=True)}
    vx = val[0]
    lv = ((functional_call(model, params, (vx,)) - vx.relu()) ** 2).mean()
    expected = torch.autograd.grad(lv, list(hp.parameters()))[0]
    hopt = hg.Unrolled(
        model,
        hp,
        _ae_loss,
        _ae_val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        **kw,
    )
    for x in xs:
        x = x.clone()
        hopt.step((x, x))
    vx = vx.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (judged by the values below)
        got, _ = hopt.hypergradient(val_batch=(vx, vx))
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(got[0], expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 5. an empty batch
# (the last slice of a loop that runs past the end of the data, x[i:i + 64] with i = len(x)): a
# mean loss over no examples is NaN, which the guards refused as "not finite" without a word
# about the batch (MarginalLikelihood alone named it)


def _mse_penalised(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


@pytest.mark.parametrize("family", ["implicit", "unrolled", "selftuning"])
@pytest.mark.parametrize("where", ["step", "val_batch"])
def test_an_empty_batch_is_named_in_the_refusal(family: str, where: str) -> None:
    g = torch.Generator().manual_seed(0)
    if family == "selftuning":
        x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
        model: nn.Module = _StnNet(hp.size)

        def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
            return nn.functional.cross_entropy(m(b[0], h), b[1])

        hopt: Any = hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        )
    else:
        x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)
        model, hp = _lin(), _hp()
        cls = hg.Implicit if family == "implicit" else hg.Unrolled
        hopt = cls(
            model,
            hp,
            _mse_penalised,
            _val_loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )
    empty = (x[6:], y[6:])
    if where == "step":
        with pytest.raises(hg.NonFiniteError, match="the batch holds no examples"):
            hopt.step(empty)
        return
    hopt.step((x, y))
    with pytest.raises(hg.NonFiniteError, match="val_batch holds no examples"):
        hopt.hyper_step(train_batch=(x, y), val_batch=empty)


# ----------------------------------------------------------------------------- 6. a batch that
# carries its own torch.Generator (reproducible per-batch noise): the record holds a copy of it in
# the state before the step, so the first replay draws the step's noise; each replay then drew
# from that same copy, so every later replay of the step drew other noise


def _noisy_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    x = b["x"] + 0.5 * torch.randn(b["x"].shape, generator=b["gen"], dtype=DT)
    return ((m(x) - b["y"]) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


@pytest.mark.parametrize("kw", [{}, {"checkpoint": True}], ids=["reverse", "checkpoint"])
def test_unrolled_replays_the_noise_of_a_generator_carried_in_the_batch(kw: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)) for _ in range(3)
    ]
    val = _val()
    model, hp = _lin(), _hp()
    noisy = []
    for i, (x, y) in enumerate(data):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i), dtype=DT)
        noisy.append((x + 0.5 * noise, y))
    expected = _reference(model, hp, noisy, val)
    hopt = _unrolled(model, hp, _noisy_loss, steps=3, **kw)
    for i, (x, y) in enumerate(data):
        hopt.step({"x": x, "y": y, "gen": torch.Generator().manual_seed(10 + i)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g1, _ = hopt.hypergradient(val_batch=val)
        g2, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(g1[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected, rtol=1e-9, atol=1e-12)
    assert not caught  # (the replay reproduces the real steps: no ReplayWarning)


# ----------------------------------------------------------------------------- 7. a batch made under
# torch.inference_mode() (features of a frozen backbone, a teacher's targets), which the loss
# clones before autograd sees it, as PyTorch's own error message advises: plain PyTorch trains on
# it, Implicit too; Unrolled and Delta-STN read the tensors' version counters, which inference
# tensors lack ("Inference tensors do not track version counter", naming nothing)


def _inference_data(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return [
            (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT))
            for _ in range(steps)
        ]


def _cloning_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    x, y = b
    return ((m(x.clone()) - y.clone()) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


@pytest.mark.parametrize("kw", [{}, {"checkpoint": True}], ids=["reverse", "checkpoint"])
def test_unrolled_trains_on_a_batch_of_inference_tensors_the_loss_clones(kw: dict[str, Any]) -> None:
    data, val = _inference_data(), _val()
    assert data[0][0].is_inference()
    model, hp = _lin(), _hp()
    expected = _reference(model, hp, [(x.clone(), y.clone()) for x, y in data], val)
    hopt = _unrolled(model, hp, _cloning_loss, steps=3, **kw)
    for b in data:
        hopt.step(b)
    got, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(got[0], expected, rtol=1e-9, atol=1e-12)


def test_delta_stn_trains_on_a_batch_of_inference_tensors_the_loss_clones() -> None:
    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0].clone(), h), b[1].clone())

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]

    def weights(inference: bool) -> torch.Tensor:
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
        model = _StnNet(hp.size)
        hopt = hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
            delta=True,
        )
        for x, y in data:
            if inference:
                with torch.inference_mode():
                    x, y = x.clone(), y.clone()
            hopt.step((x, y))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(weights(True), weights(False), rtol=0, atol=0)


# ----------------------------------------------------------------------------- 8. MarginalLikelihood
# takes (x, y, ...) batches: a list, a NamedTuple, an (x, y, index) triple from WithIndex, inputs
# in channels_last or transposed (non-contiguous) layouts, int32 labels, inputs that require grad.
# (Passes: the batch-form tests of earlier rounds covered the other families only.) Each gives the
# tuple batch's hypergradient and outer loss, through a conv net with a learned translation
# range, a short last block (7 examples in blocks of 4) and both hypergradient paths.


class _XY(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def _marglik_run(form: Callable[[torch.Tensor, torch.Tensor], Any], through_map: bool) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)).to(DT)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
            "shift": hg.hparams.RandomTranslation((6, 6)),
        }
    ).to(DT)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=30,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        subset_size=4,
        burn_in=0,
        every=1,
        through_map=through_map,
        augmentation_samples=2,
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    torch.manual_seed(3)
    hopt.step(form(x, y))
    torch.manual_seed(4)
    grads, info = hopt.hypergradient(train_batch=form(x, y))
    return [*torch.cat([t.flatten() for t in grads]).tolist(), float(info.outer_loss)]


@pytest.mark.parametrize("through_map", [False, True], ids=["fixed-weights", "through-map"])
def test_marginal_likelihood_gives_every_batch_form_the_tuple_result(through_map: bool) -> None:
    want = _marglik_run(lambda x, y: (x, y), through_map)
    forms: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "list": lambda x, y: [x, y],
        "namedtuple": lambda x, y: _XY(x, y),
        "with-index": lambda x, y: (x, y, torch.arange(len(y))),
        "channels-last": lambda x, y: (x.contiguous(memory_format=torch.channels_last), y),
        "transposed": lambda x, y: (x.transpose(2, 3).contiguous().transpose(2, 3), y),
        "int32-labels": lambda x, y: (x, y.int()),
        "requires-grad": lambda x, y: (x.clone().requires_grad_(), y),
    }
    assert any(abs(v) > 1e-3 for v in want[:-1])
    for name, form in forms.items():
        assert _marglik_run(form, through_map) == want, name


# ----------------------------------------------------------------------------- 9. a loss that
# changes a batch tensor in place through ``.data`` (``x.data.div_(255)``, a legacy idiom; or
# through a NumPy view, ``x.numpy()``): neither bumps the tensor's version counter, so the step
# is recorded as not changing its batch and each replay hands the loss the recorded tensor itself,
# which it divides again: the next replay of the step trains on x / 255**2


def _data_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    x, y = b
    x.data.div_(255.0)
    return ((m(x) - y) ** 2).mean() + _penalty(h(), m[0].weight, m[2].weight)


@pytest.mark.parametrize("kw", [{}, {"checkpoint": True}], ids=["reverse", "checkpoint"])
def test_unrolled_replays_a_batch_the_loss_changes_through_data(kw: dict[str, Any]) -> None:
    data, val = _numpy_data(), _val()
    model, hp = _lin(), _hp()
    expected = _reference(model, hp, [(torch.from_numpy(x / 255.0), y) for x, y in data], val)
    hopt = _unrolled(model, hp, _data_loss, steps=3, **kw)
    for x, y in data:
        hopt.step((torch.tensor(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (judged by the values below)
        g1, _ = hopt.hypergradient(val_batch=val)
        g2, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(g1[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected, rtol=1e-9, atol=1e-12)


def test_delta_stn_response_pass_sees_the_tensor_the_base_pass_changed_through_data() -> None:
    def out_of_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0] / 255.0, h), b[1])

    def in_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        b[0].data.div_(255.0)
        return nn.functional.cross_entropy(m(b[0], h), b[1])

    def weights(loss: Callable[[nn.Module, Any, Any], torch.Tensor]) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        data = [
            (torch.randn(8, 5, generator=g) * 255, torch.randint(0, 3, (8,), generator=g)) for _ in range(3)
        ]
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
        model = _StnNet(hp.size)
        hopt = hg.SelfTuning(
            model,
            hp,
            loss,
            loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
            delta=True,
        )
        for x, y in data:
            hopt.step((x.clone(), y))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    # (the same float32 arithmetic in both runs: equal to the last bit)
    torch.testing.assert_close(weights(in_place), weights(out_of_place), rtol=0, atol=0)
