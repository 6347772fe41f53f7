"""Round 24, guards: values that are finite where the guards look and out of their domain one step
later, and non-finite values that appear only where the guards did not look.

- A huge but finite outer step takes a tuned learning rate's raw log-rate to +-1e4: the raw value
  is finite, the rate exp(1e4) = inf or exp(-1e4) = 0, and the next ``step()`` (finite loss, finite
  gradient: accepted) wrote it into the inner optimiser: every weight +-inf, silently, or (0) no
  weight ever moved again, and the rate's own hypergradient, through exp, was 0 for good.
- A training batch with an outlier overflows a BatchNorm running variance (x^2 > 3.4e38 in
  float32) while the training loss and gradient stay finite: the step was accepted with ``inf`` in
  the running statistics, and every later eval-mode (validation) loss read it: finite numbers, wrong.
- The same overflow in MarginalLikelihood (a prior precision exp(1e4) = inf at the last outer step;
  with outer_steps > 1 only the earlier ones were caught, by the next bound) and in SelfTuning /
  BestResponse (a ``Positive(transform="exp")`` value): accepted, a history row of inf, and every
  later step refused with a message that named no hyperparameter.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


def _state(hopt: hg.HyperOptimizer) -> dict[str, Any]:
    """Everything a refused call must leave as it was (deep copies)."""
    return copy.deepcopy(
        {
            "model": hopt.model.state_dict(),
            "hparams": hopt.hparams.state_dict(),
            "hgrad": [None if p.grad is None else p.grad.clone() for p in hopt.hparams.parameters()],
            "inner": hopt.inner_optimizer.state_dict(),
            "outer": hopt.outer_optimizer.state_dict(),
            "counters": (hopt.inner_steps, hopt.hyper_steps),
            "rng": torch.get_rng_state(),
        }
    )


def _same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested containers of tensors and numbers."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


# ----------------------------------------------------------------------------- bug 1: lr = exp(1e4)


def _reg_batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)) for _ in range(n)
    ]


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _lr_hopt(mode: str, **kw: Any) -> tuple[hg.Unrolled, hg.hparams.LearningRate]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    lr = hg.hparams.LearningRate(inner)
    outer = torch.optim.Adam(lr.parameters(), lr=0.01)
    hopt = hg.Unrolled(
        model, lr, _mse, _mse, inner_optimizer=inner, outer_optimizer=outer, steps=2, mode=mode, **kw
    )
    return hopt, lr


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_an_outer_step_that_overflows_a_tuned_learning_rate_is_refused_and_changes_nothing(mode: str) -> None:
    bs = _reg_batches(4)
    hopt, lr = _lr_hopt(mode)
    for b in bs[:2]:
        hopt.step(b)
    hopt.hyper_step(train_batch=bs[1], val_batch=bs[2])  # an ordinary one: Adam's state exists
    hopt.step(bs[2])
    hopt.outer_optimizer.param_groups[0]["lr"] = 1e4  # Adam's first steps move ~lr: raw ~ 1e4
    before = _state(hopt)
    with pytest.raises(hg.NonFiniteError, match=r"hyper step 1: .*'raw' \(lr = \[(inf|0\.0)\]\)"):
        hopt.hyper_step(train_batch=bs[2], val_batch=bs[3])
    assert _same(_state(hopt), before)  # hyperparameter, its .grad, Adam's moments and step count
    assert torch.isfinite(lr.value).all()
    # the next step takes the old learning rate (SGD with momentum 0.5, by hand)
    model = hopt.model
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [hopt.inner_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rate = float(lr.value[0])
    g = torch.autograd.grad(_mse(model, lr, bs[3]), list(model.parameters()))
    hopt.step(bs[3])
    for p, w0, g0, m0 in zip(model.parameters(), w, g, bufs, strict=True):
        torch.testing.assert_close(p.detach(), w0 - rate * (0.5 * m0 + g0), rtol=1e-12, atol=1e-14)


def test_a_skipped_overflowing_outer_step_leaves_the_run_as_without_it() -> None:
    """The run whose overflowing hyperstep was skipped equals, bit for bit, the run that never
    took it: weights, learning rate, Adam's state and the hypergradients after it."""
    bs = _reg_batches(6)

    def run(with_bad: bool) -> list[Any]:
        hopt, lr = _lr_hopt("reverse", on_nonfinite="skip")
        out: list[Any] = []
        for i, b in enumerate(bs[:5]):
            hopt.step(b)
            if i == 2 and with_bad:
                hopt.outer_optimizer.param_groups[0]["lr"] = 1e4
                with pytest.warns(hg.NonFiniteWarning, match="lr = "):
                    assert hopt.hyper_step(train_batch=b, val_batch=bs[5]).skipped
                hopt.outer_optimizer.param_groups[0]["lr"] = 0.01
            if i % 2 == 1:
                info = hopt.hyper_step(train_batch=b, val_batch=bs[5])
                out += [info.outer_loss, info.hypergrad_norm, lr.raw.grad.clone()]
        return [*out, *[p.detach() for p in hopt.model.parameters()], lr.raw.detach(), _state(hopt)["outer"]]

    a, b = run(True), run(False)
    assert all(torch.isfinite(t).all() for t in a[-4:-1])
    assert _same(a, b)


def test_an_outer_step_that_saturates_a_tuned_momentum_at_one_is_refused() -> None:
    """sigmoid(raw) rounds to 1.0 from raw ~ 37 (float64): momentum 1 (no decay of the buffer) is
    outside Momentum's (0, 1), and sigmoid's derivative there is exactly 0, so no later hypergradient
    could bring it back."""
    bs = _reg_batches(3)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    mom = hg.hparams.Momentum(inner)
    outer = torch.optim.SGD(mom.parameters(), lr=1.0)
    hopt = hg.Unrolled(model, mom, _mse, _mse, inner_optimizer=inner, outer_optimizer=outer, steps=2)
    for b in bs[:2]:
        hopt.step(b)
    g, _ = hopt.hypergradient(train_batch=bs[1], val_batch=bs[2])
    outer.param_groups[0]["lr"] = 100.0 / float(g[0].abs().max())  # one step moves raw by 100 (up, here)
    before = _state(hopt)
    with pytest.raises(hg.NonFiniteError, match=r"momentum = \[1\.0\]"):
        hopt.hyper_step(train_batch=bs[1], val_batch=bs[2])
    assert _same(_state(hopt), before)
    assert 0 < float(mom.value[0]) < 1


# ----------------------------------------------------------------------------- bug 2: a buffer overflows


def _bn_hopt(method: str, **kw: Any) -> hg.HyperOptimizer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))  # float32: x^2 overflows
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.01)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    def val(m: nn.Module, h: Any, b: Any) -> Tensor:
        was = m.training
        m.eval()  # the running statistics are what validation reads
        try:
            return ((m(b[0]) - b[1]) ** 2).mean()
        finally:
            m.train(was)

    if method == "implicit":
        return hg.Implicit(
            model,
            hp,
            train,
            val,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.Neumann(steps=3),
            **kw,
        )
    return hg.Unrolled(model, hp, train, val, inner_optimizer=inner, outer_optimizer=outer, steps=2, **kw)


def _bn_batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _outlier(b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    x = b[0].clone()
    x[0] = 1e25  # finite; its square (the batch variance) is not, in float32
    return x, b[1]


def test_the_outlier_batch_premise_finite_loss_and_gradient_infinite_running_variance() -> None:
    """(Passes today: the premise of the two tests below, in plain PyTorch.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x, y = _outlier(_bn_batches(1)[0])
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.isinf(model[1].running_var).all()


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_step_that_overflows_a_running_statistic_is_refused_and_changes_nothing(method: str) -> None:
    bs = _bn_batches(3)
    hopt = _bn_hopt(method)
    for b in bs[:2]:
        hopt.step(b)
    before = _state(hopt)
    with pytest.raises(hg.NonFiniteError, match=r"inner step 2: .*\['1.running_var'\]"):
        hopt.step(_outlier(bs[2]))
    assert _same(_state(hopt), before)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_skipped_outlier_batch_leaves_the_run_as_without_it(method: str) -> None:
    bs = _bn_batches(6)

    def run(with_bad: bool) -> list[Any]:
        hopt = _bn_hopt(method, on_nonfinite="skip")
        out: list[Any] = []
        for i, b in enumerate(bs[:5]):
            if with_bad and i == 2:
                with pytest.warns(hg.NonFiniteWarning, match="running_var"):
                    hopt.step(_outlier(b))
            with warnings.catch_warnings():
                warnings.simplefilter("error", hg.NonFiniteWarning)
                hopt.step(b)
                if i % 2 == 1:
                    info = hopt.hyper_step(train_batch=b, val_batch=bs[5])
                    out += [info.outer_loss, [p.grad.clone() for p in hopt.hparams.parameters()]]
        return [*out, _state(hopt)]

    a, b = run(True), run(False)
    assert all(torch.isfinite(t).all() for t in a[-1]["model"].values() if t.is_floating_point())
    assert _same(a[:-1], b[:-1]) and _same(
        {k: v for k, v in a[-1].items() if k != "rng"}, {k: v for k, v in b[-1].items() if k != "rng"}
    )


class _Masked(nn.Module):
    """A model holding a buffer that is non-finite by design (an additive -inf mask), which its
    forward reads but never writes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).to(DT)
        mask = torch.zeros(3, dtype=DT)
        mask[2] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.lin(x) + self.mask, dim=-1)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_buffer_that_is_minus_inf_by_design_is_no_reason_to_refuse(on_nonfinite: str) -> None:
    """(Passes today; guards against a buffer check that refuses a mask of -inf, which every step
    reads and none writes.) Each step is the plain SGD step."""
    torch.manual_seed(0)
    model = _Masked()
    hp = hg.hparams.WeightDecay(model, init=1e-2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return nn.functional.nll_loss(torch.log(m(b[0])[:, :2]), b[1]) + h.penalty(m)

    hopt = hg.Implicit(
        model, hp, loss, loss, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Identity(), on_nonfinite=on_nonfinite,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.NonFiniteWarning)
        for _ in range(3):
            b = (torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 2, (5,), generator=g))
            w = [p.detach().clone() for p in model.parameters()]
            grads = torch.autograd.grad(loss(model, hp, b), list(model.parameters()))
            hopt.step(b)
            for p, w0, g0 in zip(model.parameters(), w, grads, strict=True):
                torch.testing.assert_close(p.detach(), w0 - 0.1 * g0, rtol=1e-12, atol=1e-14)
        info = hopt.hyper_step(train_batch=b, val_batch=b)
    assert not info.skipped and math.isfinite(info.outer_loss)
    assert torch.isinf(model.mask[2])


# ----------------------------------------------------------------------------- bug 3: a precision overflows


def _marglik(outer_steps: int, **kw: Any) -> tuple[hg.MarginalLikelihood, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=24, outer_steps=outer_steps,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1), **kw,
    )  # fmt: skip
    return hopt, (x, y)


def _blow_up_at_call(opt: torch.optim.Optimizer, calls: set[int]) -> None:
    """Adam's step moves each raw value by ~lr: lr = 1e4 at the given calls (counted from 1)
    takes exp(raw) to inf or 0 from a finite raw value; 0.1 otherwise."""
    n = [0]

    def hook(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        n[0] += 1
        o.param_groups[0]["lr"] = 1e4 if n[0] in calls else 0.1

    opt.register_step_pre_hook(hook)


@pytest.mark.parametrize("outer_steps", [1, 2])
def test_marglik_outer_step_that_overflows_a_precision_is_refused_and_changes_nothing(
    outer_steps: int,
) -> None:
    """With outer_steps=3 an overflow at outer step 1 was caught (outer step 2's bound was not
    finite); at the last outer step (outer_steps=1: the only one) it was not."""
    hopt, b = _marglik(outer_steps)
    _blow_up_at_call(hopt.outer_optimizer, {outer_steps * 2})  # the second hyperstep's last outer step
    hopt.step(b)
    hopt.hyper_step(train_batch=b)
    hopt.step(b)
    before = _state(hopt)
    with pytest.raises(hg.NonFiniteError, match=r"hyper step 1: .*'prior'"):
        hopt.hyper_step(train_batch=b)
    assert _same(_state(hopt), before)
    assert torch.isfinite(hopt.hparams["prior"].value).all()
    assert torch.isfinite(hopt.step(b))  # the run goes on (before: refused, "loss = inf", for good)


def test_marglik_skipped_overflowing_hyperstep_leaves_the_run_as_without_it() -> None:
    def run(with_bad: bool) -> list[Any]:
        hopt, b = _marglik(1, on_nonfinite="skip")
        _blow_up_at_call(hopt.outer_optimizer, {2} if with_bad else set())
        out: list[Any] = []
        for i in range(4):
            with warnings.catch_warnings():
                warnings.simplefilter("error", hg.NonFiniteWarning)
                hopt.step(b)
            if i == 1 and with_bad:
                with pytest.warns(hg.NonFiniteWarning, match="'prior'"):
                    assert hopt.hyper_step(train_batch=b).skipped
            info = hopt.hyper_step(train_batch=b)
            out += [info.outer_loss, [p.grad.clone() for p in hopt.hparams.parameters()]]
        state = _state(hopt)
        del state["rng"]
        return [*out, state]

    a, c = run(True), run(False)
    assert _same(a, c)


# ----------------------------------------------------------------------------- bug 4: an STN value overflows


class _StnNet(nn.Module):
    """Two STN layers; the input noise's standard deviation is a ``Positive(transform="exp")``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1, self.l2 = hg.nn.StnLinear(4, 6, n), hg.nn.StnLinear(6, 3, n)

    def forward(self, x: Tensor, hp: Any) -> Tensor:
        d = hp.draw(len(x))
        if self.training:
            x = x + d["noise"][:, None] * torch.randn_like(x)
        return self.l2(torch.tanh(self.l1(x, d)), d)


def _stn_family(method: str) -> hg.HyperOptimizer:
    torch.manual_seed(0)
    specs = {"noise": hg.hparams.Positive(0.1, transform="exp"), "rate": hg.hparams.Rate(0.3)}
    fixed = {"learn_scale": False, "scale": 0.5} if method == "best_response" else {}
    hp = hg.hparams.SelfTuned(**specs, **fixed, dtype=DT)  # type: ignore[arg-type]
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    if method == "best_response":
        base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        net = hg.nn.HyperNet(base, hp.size).to(DT)

        def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            x = b[0] + h.draw(len(b[0]))["noise"][:, None] * torch.randn_like(b[0]) if m.training else b[0]
            return nn.functional.cross_entropy(m(x, hparams=h), b[1])

        inner = torch.optim.SGD(net.parameters(), lr=0.1)
        return hg.BestResponse(net, hp, loss, loss, inner_optimizer=inner, outer_optimizer=outer)
    model = _StnNet(hp.size).to(DT)

    def stn_loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(b[0], h), b[1])

    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return hg.SelfTuning(
        model, hp, stn_loss, stn_loss, inner_optimizer=inner, outer_optimizer=outer, delta=method == "delta"
    )


@pytest.mark.parametrize("method", ["selftuning", "delta", "best_response"])
def test_stn_outer_step_that_overflows_a_value_is_refused_and_changes_nothing(method: str) -> None:
    hopt = _stn_family(method)
    hp: Any = hopt.hparams
    g = torch.Generator().manual_seed(0)
    bs = [
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)
    ]
    hopt.step(bs[0])
    hopt.hyper_step(val_batch=bs[1])
    hopt.step(bs[2])
    assert hopt.hyper_due()
    hopt.outer_optimizer.param_groups[0]["lr"] = 1e4  # Adam moves each raw value by ~1e4
    before, history, phase = _state(hopt), hp.history(), hopt._phase  # type: ignore[attr-defined]
    with pytest.raises(hg.NonFiniteError, match=r"hyper step 1: .*'noise' = \[(inf|0\.0)\]"):
        hopt.hyper_step(val_batch=bs[3])
    assert _same(_state(hopt), before) and hp.history() == history
    assert hopt._phase == phase and hopt.hyper_due()  # type: ignore[attr-defined]  # (no turn taken)
    hopt.outer_optimizer.param_groups[0]["lr"] = 0.05
    assert torch.isfinite(hopt.step(bs[3]))  # (before: refused, loss = nan, for good)
