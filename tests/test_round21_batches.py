"""Round 21 (batches): how the batches of real training loops reach the methods.

Each hypergradient is checked against a plain-autograd reference written here (float64): the
unrolled SGD steps differentiated with ``torch.autograd.grad(..., create_graph=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad import ReplayWarning

DT = torch.float64
LR = 0.1


def _data(steps: int = 3, b: int = 6, d: int = 3) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple]:
    g = torch.Generator().manual_seed(0)
    train = [
        (torch.randn(b, d, generator=g, dtype=DT), torch.randn(b, 1, generator=g, dtype=DT))
        for _ in range(steps)
    ]
    val = (torch.randn(8, d, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT))
    return train, val


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _val_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _reference(
    model: nn.Module,
    hp: nn.Module,
    loss: Callable[[dict[str, torch.Tensor], torch.Tensor, Any], torch.Tensor],
    batches: list[Any],
    val: Any,
    lr: float = LR,
) -> list[torch.Tensor]:
    """d val_loss / d hp.raw through ``len(batches)`` plain SGD steps from ``model``'s current
    weights: ``loss(params, hp_value, batch)`` is the training loss on a functional call."""
    from torch.func import functional_call

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = [p for p in hp.parameters()]
    lam = hp()
    for batch in batches:
        ps = list(params.values())
        ps = [p.requires_grad_() if not p.requires_grad else p for p in ps]
        lt = loss(params, lam, batch)
        gs = torch.autograd.grad(lt, ps, create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), gs, strict=True)}
    lv = ((functional_call(model, params, (val[0],)) - val[1]) ** 2).mean()
    return list(torch.autograd.grad(lv, raw))


def _fwd(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call

    return functional_call(model, params, (x,))


# ----------------------------------------------------------------------------- 1. a loss that
# changes its batch in place


@pytest.mark.parametrize(
    "kw", [{}, {"checkpoint": True}, {"mode": "forward"}], ids=["reverse", "checkpoint", "forward"]
)
def test_unrolled_replays_the_batch_the_mutating_loss_received(kw: dict[str, Any]) -> None:
    train, val = _data()
    model = _mlp()
    hp = hg.hparams.Hparam(torch.tensor([0.05, 0.2], dtype=DT), "positive")

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x, y = b
        x.mul_(2)
        lam = h()
        return (
            ((m(x) - y) ** 2).mean()
            + lam[0] * (m[0].weight ** 2).sum() / 2
            + lam[1] * (m[2].weight ** 2).sum() / 2
        )

    def ref_loss(params: dict[str, torch.Tensor], lam: torch.Tensor, b: Any) -> torch.Tensor:
        x, y = b
        out = _fwd(model, params, 2 * x)
        return (
            ((out - y) ** 2).mean()
            + lam[0] * (params["0.weight"] ** 2).sum() / 2
            + lam[1] * (params["2.weight"] ** 2).sum() / 2
        )

    expected = _reference(model, hp, ref_loss, train, val)
    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        **kw,
    )
    for x, y in train:
        hopt.step((x.clone(), y))  # the real steps train on 2x, as the loss makes them
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplayWarning)  # the replay reproduces training
        g1, _ = hopt.hypergradient(val_batch=val)
        g2, _ = hopt.hypergradient(val_batch=val)  # a second replay of the same records
    torch.testing.assert_close(g1[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[0], expected[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"mode": "forward"}], ids=["reverse", "forward"])
def test_unrolled_replays_a_loss_that_pops_the_labels_from_a_dict_batch(kw: dict[str, Any]) -> None:
    train, val = _data()
    model = _mlp()
    hp = hg.hparams.Hparam(torch.tensor([0.05, 0.2], dtype=DT), "positive")

    def penalty(params: dict[str, torch.Tensor], lam: torch.Tensor) -> torch.Tensor:
        return lam[0] * (params["0.weight"] ** 2).sum() / 2 + lam[1] * (params["2.weight"] ** 2).sum() / 2

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        labels = b.pop("labels")
        return ((m(b["x"]) - labels) ** 2).mean() + penalty(dict(m.named_parameters()), h())

    def ref_loss(params: dict[str, torch.Tensor], lam: torch.Tensor, b: Any) -> torch.Tensor:
        return ((_fwd(model, params, b[0]) - b[1]) ** 2).mean() + penalty(params, lam)

    expected = _reference(model, hp, ref_loss, train, val)
    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        **kw,
    )
    for x, y in train:
        hopt.step({"x": x, "labels": y, "ids": list(range(len(y)))})
    for _ in range(2):  # the same records replayed twice
        g, _ = hopt.hypergradient(val_batch=val)
        torch.testing.assert_close(g[0], expected[0], rtol=1e-9, atol=1e-12)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(7, 4).to(DT)
        self.head = nn.Linear(4, 7).to(DT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _mlm_loss(
    logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    labels = ids.clone()
    labels[~masked] = -100
    ids[masked] = 0  # BERT's masking, written in place on the batch's token ids (MASK = 0)
    logits = logits_of(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)


def test_unrolled_replays_in_place_mlm_masking_of_the_token_ids() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(1, 7, (3, 5), generator=g) for _ in range(3)]
    val_ids = torch.randint(1, 7, (4, 5), generator=g)
    model = _TinyLM()
    hp = hg.hparams.Hparam(0.1, "positive", dtype=DT)

    def loss(m: nn.Module, h: Any, ids: torch.Tensor) -> torch.Tensor:
        masked = torch.rand(ids.shape, dtype=DT) < 0.4  # torch's global RNG: replayed
        return _mlm_loss(m, ids, masked) + h() * (m.head.weight**2).sum() / 2

    def val_loss(m: nn.Module, h: Any, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(ids).reshape(-1, 7), ids.reshape(-1))

    # the reference: the same masks (seeded alike), the unmasked ids, plain autograd
    from torch.func import functional_call

    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lam = hp()
    for k, ids in enumerate(batches):
        torch.manual_seed(10 + k)
        masked = torch.rand(ids.shape, dtype=DT) < 0.4
        lt = _mlm_loss(lambda i, ps=params: functional_call(model, ps, (i,)), ids.clone(), masked)
        lt = lt + lam * (params["head.weight"] ** 2).sum() / 2
        gs = torch.autograd.grad(lt, list(params.values()), create_graph=True)
        params = {n: p - LR * gr for (n, p), gr in zip(params.items(), gs, strict=True)}
    lv = nn.functional.cross_entropy(
        functional_call(model, params, (val_ids,)).reshape(-1, 7), val_ids.reshape(-1)
    )
    (expected,) = torch.autograd.grad(lv, [hp.raw])

    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    for k, ids in enumerate(batches):
        torch.manual_seed(10 + k)
        hopt.step(ids.clone())
    for p, q in zip(model.parameters(), params.values(), strict=True):  # the real steps: the reference's
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-12)
    (got,), _ = hopt.hypergradient(val_batch=val_ids)
    assert abs(float(expected)) > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 2. a batch tensor
# that requires grad (an input-gradient penalty: double backprop, Jacobian regularisation)


def test_unrolled_replays_an_input_gradient_penalty_on_a_batch_that_requires_grad() -> None:
    train, val = _data()
    model = _mlp()
    hp = hg.hparams.Hparam(0.3, "positive", dtype=DT)

    def penalised(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return ((out - y) ** 2).mean() + lam * (gx**2).mean()

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x, y = b
        return penalised(m(x), x, y, h())

    def ref_loss(params: dict[str, torch.Tensor], lam: torch.Tensor, b: Any) -> torch.Tensor:
        x, y = b
        x = x.detach().requires_grad_()
        return penalised(_fwd(model, params, x), x, y, lam)

    expected = _reference(model, hp, ref_loss, train, val)
    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    for x, y in train:
        hopt.step((x.clone().requires_grad_(), y))  # the input marked as a leaf to differentiate
    g, _ = hopt.hypergradient(val_batch=val)
    torch.testing.assert_close(g[0], expected[0], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 3. a val_loss that
# changes its batch in place, in forward mode (one val_loss call per hyperparameter entry)


def test_forward_mode_val_loss_that_changes_its_batch_in_place() -> None:
    train, val = _data()
    model = _mlp()
    hp = hg.hparams.Hparam(torch.tensor([0.05, 0.1, 0.2], dtype=DT), "positive")
    layers = ("0.weight", "0.bias", "2.weight")

    def penalty(params: dict[str, torch.Tensor], lam: torch.Tensor) -> torch.Tensor:
        return sum(lam[k] * (params[n] ** 2).sum() / 2 for k, n in enumerate(layers))  # type: ignore[return-value]

    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + penalty(dict(m.named_parameters()), h())

    def val_loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x, y = b
        x.mul_(2)  # e.g. an in-place rescaling of the inputs
        return ((m(x) - y) ** 2).mean()

    def ref_loss(params: dict[str, torch.Tensor], lam: torch.Tensor, b: Any) -> torch.Tensor:
        return ((_fwd(model, params, b[0]) - b[1]) ** 2).mean() + penalty(params, lam)

    expected = _reference(model, hp, ref_loss, train, (2 * val[0], val[1]))
    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        mode="forward",
    )
    for batch in train:
        hopt.step(batch)
    g, info = hopt.hypergradient(val_batch=(val[0].clone(), val[1]))
    torch.testing.assert_close(g[0], expected[0], rtol=1e-9, atol=1e-12)
    # and the logged outer loss is that of the batch val_loss was given (after one doubling)
    with torch.no_grad():
        assert info.outer_loss == pytest.approx(float(((model(2 * val[0]) - val[1]) ** 2).mean()), rel=1e-12)


# ----------------------------------------------------------------------------- 4. a batch Unrolled
# cannot copy (micro-batches handed over as a generator): refused before anything changes


def test_unrolled_refuses_an_uncopyable_batch_before_changing_anything() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    hp = hg.hparams.Hparam(0.1, "positive", dtype=DT)

    def loss(m: nn.Module, h: Any, micro: Any) -> torch.Tensor:  # gradient accumulation
        losses = [((m(x) - y) ** 2).mean() for x, y in micro]
        return torch.stack(losses).mean() + h() * (m[0].weight ** 2).sum()

    hopt = hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=2,
    )
    train, _ = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"(?s)copy.*list"):
        hopt.step(mb for mb in train)  # a generator of micro-batches: no replay could re-read it
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm's statistics and counter untouched
    assert all(p.grad is None for p in model.parameters())
    assert hopt.inner_steps == 0
    hopt.step(list(train))  # the same micro-batches as a list train and record
    assert hopt.inner_steps == 1


# ----------------------------------------------------------------------------- 5. a hyperparameter
# passed inside the batch (dataset distillation written as step((h.images, h.labels)))


class _Distilled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.images = nn.Parameter(torch.randn(4, 3, generator=g, dtype=DT))
        self.labels = nn.Parameter(torch.randn(4, 1, generator=g, dtype=DT))


def _distill_hopt(model: nn.Module, hp: _Distilled, via_batch: bool) -> hg.Unrolled:
    def loss(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x, y = b if via_batch else (h.images, h.labels)
        return ((m(x) - y) ** 2).mean()

    return hg.Unrolled(
        model,
        hp,
        loss,
        _val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )


def test_unrolled_warns_at_step_about_a_hyperparameter_passed_in_the_batch() -> None:
    _, val = _data()
    model, hp = _mlp(), _Distilled()
    hopt = _distill_hopt(model, hp, via_batch=True)
    with pytest.warns(ReplayWarning, match="hyperparameter"):
        hopt.step((hp.images, hp.labels))


def test_distilled_images_read_from_hparams_match_the_reference() -> None:
    """The documented way (step(()), the loss reading the hparams argument) against plain autograd:
    the reference for the warning above (passes on the current code)."""
    _, val = _data()
    model, hp = _mlp(), _Distilled()

    def ref_loss(params: dict[str, torch.Tensor], lam: Any, b: Any) -> torch.Tensor:
        return ((_fwd(model, params, hp.images) - hp.labels) ** 2).mean()

    from torch.func import functional_call

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        ps = [p if p.requires_grad else p.requires_grad_() for p in params.values()]
        gs = torch.autograd.grad(ref_loss(params, None, ()), ps, create_graph=True)
        params = {n: p - LR * g for (n, p), g in zip(params.items(), gs, strict=True)}
    lv = ((functional_call(model, params, (val[0],)) - val[1]) ** 2).mean()
    expected = torch.autograd.grad(lv, [hp.images, hp.labels])
    hopt = _distill_hopt(model, hp, via_batch=False)
    for _ in range(3):
        hopt.step(())
    g, _ = hopt.hypergradient(val_batch=val)
    assert float(expected[0].abs().max()) > 1e-3  # a hypergradient that a 0 could not pass
    for a, b in zip(g, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- 6. SelfTuning(delta=True)
# calls train_loss twice per step on the same batch (base pass, response pass)


class _StnNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = hg.nn.StnLinear(5, 6, n)
        self.b = hg.nn.StnLinear(6, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(torch.tanh(self.a(x, d)), d["dropout"], self.training)
        return self.b(h, d)


def _delta_stn_weights(loss: Callable[[nn.Module, Any, Any], torch.Tensor], as_dict: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
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
        hopt.step({"x": x.clone(), "labels": y} if as_dict else (x.clone(), y))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("how", ["mul_", "pop"])
def test_delta_stn_response_pass_sees_the_batch_the_base_pass_saw(how: str) -> None:
    def out_of_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        x, y = (b["x"], b["labels"]) if how == "pop" else b
        return nn.functional.cross_entropy(m(2 * x, h), y)

    def in_place(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
        if how == "pop":
            y = b.pop("labels")  # Hugging Face's idiom: the rest of the dict goes to the model
            return nn.functional.cross_entropy(m(2 * b["x"], h), y)
        x, y = b
        return nn.functional.cross_entropy(m(x.mul_(2), h), y)

    expected = _delta_stn_weights(out_of_place, as_dict=how == "pop")
    got = _delta_stn_weights(in_place, as_dict=how == "pop")
    # (the same float32 arithmetic in both runs: equal to the last bit)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
