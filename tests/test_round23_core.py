"""Round 23 (maintainer): fixes made beside the helpers' round."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergrad as hg


def _ridge(seed: int = 0) -> tuple[torch.nn.Module, hg.hparams.WeightDecay]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(4, 1).double()
    return m, hg.hparams.WeightDecay(m, per="layer", init=0.1).double()


def _loss(m, h, b):  # type: ignore[no-untyped-def]
    return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)


def _val(m, h, b):  # type: ignore[no-untyped-def]
    return ((m(b[0]) - b[1]) ** 2).mean()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randn(8, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("mode", ["reverse", "forward", "checkpoint"])
@pytest.mark.parametrize("fail_at", [0, 2, 3])
def test_a_step_the_inner_optimiser_refuses_is_not_replayed(mode: str, fail_at: int) -> None:
    """An update the inner optimiser refuses (out of memory in its first state allocation, Adam
    given a sparse gradient: raised inside ``inner_optimizer.step()``) is no step: a script that
    catches the error and goes on must get the hypergradient of the steps that were taken. Before,
    the failed step's record stayed in the ring, and the replay ran one step more than training
    (the replay then diverged from the real weights). Compared with a run in which the failure
    never happened, in float64, at a failure on the first step, mid-window and at an anchor."""
    data, vb = _batches(6), _batches(7)[-1]

    def run(fail: bool) -> tuple[torch.Tensor, ...]:
        m, hp = _ridge()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        kw = {"mode": "reverse", "checkpoint": True} if mode == "checkpoint" else {"mode": mode}
        hopt = hg.Unrolled(
            m,
            hp,
            _loss,
            _val,
            inner_optimizer=opt,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
            steps=3,
            **kw,
        )
        for i, b in enumerate(data):
            if fail and i == fail_at:

                def refuse(*_: object) -> None:
                    raise RuntimeError("out of memory (simulated)")

                handle = opt.register_step_pre_hook(refuse)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the hook is named: it is gone before the replay)
                    with pytest.raises(RuntimeError, match="simulated"):
                        hopt.step(b)
                handle.remove()
                opt.zero_grad(set_to_none=True)
            hopt.step(b)
            if i == 2:
                hopt.hyper_step(val_batch=vb)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.ReplayWarning)
            grads, _ = hopt.hypergradient(val_batch=vb)
        assert hopt.inner_steps == len(data)
        return tuple(g.detach().clone() for g in grads) + tuple(p.detach().clone() for p in m.parameters())

    want, got = run(False), run(True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adagrads_initial_accumulator_value_is_refused_as_a_tuned_setting() -> None:
    """torch.optim.Adagrad reads ``initial_accumulator_value`` from its defaults when it creates a
    state, never from the param group: an OptimizerSetting on it tuned a value no step used (and
    Unrolled's replay, which follows torch, gave it a hypergradient of exactly 0). Refused, naming
    why; a setting Adagrad does read from the group (lr_decay) is still accepted."""
    m = torch.nn.Linear(2, 1)
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1, initial_accumulator_value=0.5)
    with pytest.raises(ValueError, match="initial_accumulator_value.*defaults"):
        hg.hparams.OptimizerSetting(opt, "initial_accumulator_value", "positive")
    opt = torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.01)
    assert float(hg.hparams.OptimizerSetting(opt, "lr_decay", "positive").value) == pytest.approx(0.01)


def test_losses_reading_captured_weights_are_named_by_both_warnings() -> None:
    """A script that takes ``params = list(model.parameters())`` once and computes its losses from
    those tensors instead of the model it is given: Unrolled's replay substitutes the weights of
    the model it passes, so the replayed steps move nothing and no hypergradient flows (exactly
    0). Both warnings now say what to look for."""
    m, hp = _ridge()
    params = list(m.parameters())

    def lin(b):  # type: ignore[no-untyped-def]
        return b[0] @ params[0].T + params[1]

    def train(mm, h, b):  # type: ignore[no-untyped-def]
        return ((lin(b) - b[1]) ** 2).mean() + h.penalty(mm)

    def val(mm, h, b):  # type: ignore[no-untyped-def]
        return ((lin(b) - b[1]) ** 2).mean()

    hopt = hg.Unrolled(
        m, hp, train, val, steps=2,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    b = _batches(1)[0]
    hopt.step(b)
    hopt.step(b)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        info = hopt.hyper_step(val_batch=b)
    assert info.hypergrad_norm == 0.0
    texts = {type(w.message).__name__: str(w.message) for w in seen}
    assert "a small part of the real steps' move" in texts["ReplayWarning"]
    assert "list(model.parameters())" in texts["ReplayWarning"]
    assert "list(model.parameters())" in texts["DisconnectedWarning"]


def test_float_class_labels_are_named_as_labels_not_as_a_dtype_to_convert_to() -> None:
    """float32 class labels given to cross_entropy on a float64 model: the error advised
    ``.to(torch.float64)``, which fails the same way (torch wants ``long`` targets). It says
    ``.long()`` now. (float64 labels there get torch's own error, "expected target dtype to be
    Long", as in plain PyTorch.)"""
    labels = torch.float32
    import torch.nn.functional as F

    m = torch.nn.Linear(3, 4).double()
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.1).double()

    def loss(mm, h, b):  # type: ignore[no-untyped-def]
        return F.cross_entropy(mm(b[0]), b[1]) + h.penalty(mm)

    hopt = hg.Implicit(
        m, hp, loss, loss,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    b = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,)).to(labels))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises((ValueError, RuntimeError), match=r"\.long\(\)"):
        hopt.step(b)
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


class _AttnNet(torch.nn.Module):
    """An STN layer, causal self-attention over its output (by torch's kernel, or written out),
    and an STN head: the perturbation's tangent runs through the attention."""

    def __init__(self, n: int, how: str) -> None:
        super().__init__()
        self.inp = hg.nn.StnLinear(5 * 4, 5 * 8, n)
        self.head = hg.nn.StnLinear(8, 3, n)
        self.how = how

    def forward(self, x, hp):  # type: ignore[no-untyped-def]
        d = hp.draw(len(x))
        h = torch.tanh(self.inp(x.flatten(1), d)).view(len(x), 5, 2, 4).transpose(1, 2)
        if self.how == "sdpa":
            a = torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)
        else:
            w = (h @ h.transpose(-2, -1)) / 2.0
            w = w.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
            if self.how == "softmax":
                p = w.softmax(-1)
            elif self.how == "log_softmax":
                p = torch.log_softmax(w, -1).exp()
            else:  # by hand: exp and sums, operations the response step leaves as they are
                e = (w - w.amax(-1, keepdim=True).detach()).exp()
                p = e / e.sum(-1, keepdim=True)
            a = p @ h
        z = hg.nn.dropout((h + a).transpose(1, 2).reshape(len(x), 5, 8).mean(1), d["dropout"], self.training)
        return self.head(z, d)


@pytest.mark.parametrize("how", ["sdpa", "softmax", "log_softmax"])
def test_delta_stn_linearises_through_attention_and_softmax(how: str) -> None:
    """Delta-STN's response step linearises the network in the perturbation with forward-mode
    AD. torch's fused attention kernels have none, so any model with attention after an STN layer
    (nn.MultiheadAttention, nn.TransformerEncoderLayer, F.scaled_dot_product_attention) was
    refused; and softmax's jvp writes a tensor its backward needs, so one with a softmax there
    failed in the backward pass ("modified by an inplace operation"). The response step now runs
    them as plain operations: in float64, training and tuning give what the same attention with
    its softmax written out by hand (exp and sums) gives."""
    import torch.nn.functional as F

    def run(how: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9)).double()
        model = _AttnNet(hp.size, how).double()

        def loss(m, h, b):  # type: ignore[no-untyped-def]
            return F.cross_entropy(m(b[0], h), b[1])

        hopt = hg.SelfTuning(
            model, hp, loss, loss, delta=True,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.5),
        )  # fmt: skip
        g = torch.Generator().manual_seed(2)
        b = (torch.randn(6, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
        for _ in range(3):
            hopt.step(b)
            hopt.hyper_step(val_batch=b)
        return [p.detach().clone() for p in [*model.parameters(), *hp.parameters()]]

    want, got = run("by_hand"), run(how)
    assert not torch.equal(want[-1], torch.zeros_like(want[-1]))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_step_refused_for_an_overflowed_decay_names_it() -> None:
    """An outer step that took a per-layer log-decay to 1e4 (finite raw, value exp(1e4) = inf):
    every later step is refused as non-finite, and the message named no hyperparameter. It names
    the container now (on the failure path only), and the step changes nothing."""
    m, hp = _ridge()
    hopt = hg.Implicit(
        m, hp, _loss, _val,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )  # fmt: skip
    with torch.no_grad():
        for p in hp.parameters():
            p.fill_(1e4)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(hg.NonFiniteError, match=r"values of hyperparameter\(s\) \['value'\] are not finite"):
        hopt.step(_batches(1)[0])
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
