"""Round 15: Unrolled on sequence models, as language-model scripts train them.

- Truncated BPTT: a 2-layer ``nn.LSTM`` (batch_first) with tied embeddings and fixed embedding
  dropout, the hidden state carried from batch to batch and detached in between, kept in one of
  three places: passed in the batch (by value), a registered buffer the forward reassigns, or a
  plain attribute of the model the forward reassigns (``self.hidden = h.detach()``, as many
  char-RNN scripts do). Per-layer weight decays and a learning rate against central
  differences of the real K-step training (float64), with gradient clipping.
- Found: the plain-attribute hidden state was not recorded: every replayed step started from
  the hidden state left by the *last* real step, and the replay wrote the model's attribute
  (after a hyperstep it held the validation batch's hidden state). The learning rate's
  hypergradient came out -7.6e-3 against -1.75e-2 (the buffer-kept and batch-passed states'
  value), with a ReplayWarning blaming randomness. Unrolled now records the model's plain
  tensor attributes by value with each step, replays each step from them, and leaves the real
  ones as they were.
- ``nn.GRU`` on packed padded sequences of other lengths in every batch, clipped, with ASGD
  (as AWD-LSTM's NT-ASGD switches to) as the inner optimiser: against central differences.
- Forward mode through an LSTM on the CPU equals reverse mode.
- ``checkpoint=True`` on a K = 20 LSTM window: the bytes autograd saves for backward, alive at
  once, do not grow with K (the plain reverse mode's do).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import hypergrad as hg
from hypergrad.testing import central_difference

DT = torch.float64
V, E, B, T = 7, 4, 3, 5  # vocabulary, width, batch, sequence length


class _LM(nn.Module):
    """Embedding (dropout, fixed) -> 2-layer LSTM -> linear tied to the embedding. ``keep`` says
    where the hidden state lives between batches: ``"batch"`` (passed in and out by the
    caller), ``"buffer"`` or ``"attribute"`` (the forward reassigns it, detached)."""

    def __init__(self, keep: str, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, E)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(E, E, num_layers=2, batch_first=True)
        self.out = nn.Linear(E, V)
        self.out.weight = self.emb.weight  # tied
        self.keep = keep
        if keep == "buffer":
            self.register_buffer("h", torch.zeros(2, B, E))
            self.register_buffer("c", torch.zeros(2, B, E))
        self.hidden: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, hidden: Any = None, fresh: bool = False) -> tuple[Tensor, Any]:
        e = self.drop(self.emb(x))
        if fresh:
            o, hidden = self.lstm(e)
        elif self.keep == "buffer":
            o, (h, c) = self.lstm(e, (self.h, self.c))
            self.h, self.c = h.detach(), c.detach()
        elif self.keep == "attribute":
            o, hidden = self.lstm(e, self.hidden)
            self.hidden = (hidden[0].detach(), hidden[1].detach())
        else:
            o, hidden = self.lstm(e, hidden)
        return self.out(o), hidden


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def _tokens(seed: int, n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(n)
    ]


def _val(m: nn.Module, hp: nn.Module, b: Any) -> Tensor:
    return _ce(m(b[0], fresh=True)[0], b[1])


def _fd(f: Callable[[], float], hp: nn.Module) -> list[Tensor]:
    return [central_difference(f, p, eps=1e-6) for p in hp.parameters()]


def _close(got: Any, want: Any, rtol: float) -> None:
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=rtol, atol=rtol * scale), (g, w)


class _TBPTT:
    """A truncated-BPTT run of ``K + 1`` steps (the first one before the window), SGD with
    momentum, clipped; ``hopt.hypergradient`` over the last K, and the real K-step training
    from the window's start as a function of the hyperparameters (for central differences)."""

    def __init__(self, keep: str, K: int = 3, **kw: Any) -> None:
        self.keep = keep
        self.model = model = _LM(keep, dropout=0.2).to(DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
        wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        self.hp = hp = nn.ModuleDict({"wd": wd, "lr": hg.hparams.LearningRate(inner, init=0.5)}).to(DT)
        self.hopt = hg.Unrolled(
            model,
            hp,
            self.train_loss,
            _val,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=K,
            **kw,
        )
        self.carried: tuple[Tensor, Tensor] = (torch.zeros(2, B, E, dtype=DT),) * 2  # type: ignore[assignment]
        self.batches = _tokens(1, K + 1)
        self.used: list[Any] = []
        self.step(0)
        self.start = copy.deepcopy(model)
        self.start_opt = copy.deepcopy(inner.state_dict())
        for k in range(1, K + 1):
            self.used.append(self.step(k))
        self.val = _tokens(9, 1)[0]

    def train_loss(self, m: nn.Module, hp: nn.Module, b: Any) -> Tensor:
        if self.keep == "batch":
            logits, hidden = m(b[0], (b[2], b[3]))
            self.carried = (hidden[0].detach(), hidden[1].detach())  # for the next batch
        else:
            logits, _ = m(b[0])
        return _ce(logits, b[1]) + hp["wd"].penalty(m)

    def step(self, k: int) -> Any:
        x, y = self.batches[k]
        b = (x, y, *self.carried) if self.keep == "batch" else (x, y)
        torch.manual_seed(100 + k)  # the dropout masks, drawn again by the real training below
        self.hopt.step(b, max_grad_norm=0.5)
        return b

    def real(self) -> float:
        """The window's K steps of plain PyTorch from its start, with the current hyperparameters."""
        m = copy.deepcopy(self.start)
        opt = torch.optim.SGD(m.parameters(), lr=float(self.hp["lr"].value), momentum=0.5)
        opt.load_state_dict(copy.deepcopy(self.start_opt))  # (load_state_dict shares the tensors)
        opt.param_groups[0]["lr"] = float(self.hp["lr"].value)
        carried = self.carried
        for k, b in enumerate(self.used, 1):
            torch.manual_seed(100 + k)
            opt.zero_grad()
            self.train_loss(m, self.hp, b).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            opt.step()
        self.carried = carried
        with torch.no_grad():
            return float(_val(m, self.hp, self.val))


def test_tbptt_lstm_with_the_hidden_state_in_the_batch_matches_central_differences() -> None:
    """Hidden state passed in the batch (recorded by value), tied embeddings, embedding dropout,
    clipping: per-layer decays and the learning rate against the real 3 steps."""
    run = _TBPTT("batch")
    got, info = run.hopt.hypergradient(val_batch=run.val)
    assert info.unrolled_steps == 3
    fd = _fd(run.real, run.hp)
    assert float(fd[-1].abs().max()) > 1e-3 and float(fd[0].abs().min()) > 1e-4
    _close(got, fd, 1e-6)


@pytest.mark.parametrize("keep", ["buffer", "attribute"])
@pytest.mark.parametrize("how", [{}, {"checkpoint": True}, {"mode": "forward"}])
def test_hidden_state_kept_on_the_model_is_replayed_from_each_steps_value(keep: str, how: Any) -> None:
    """A hidden state the forward stores on the model (a buffer, or a plain attribute) gives the
    hypergradient of the batch-passed one (proven above against central differences). Before,
    a plain attribute was replayed from its latest value in every step: the learning rate's
    hypergradient -7.6e-3 against -1.75e-2, and a ReplayWarning (an error here)."""
    want, _ = _TBPTT("batch").hopt.hypergradient(val_batch=_tokens(9, 1)[0])
    run = _TBPTT(keep, **how)
    model = run.model
    kept = (model.h, model.c) if keep == "buffer" else model.hidden
    values = [t.clone() for t in kept]  # type: ignore[union-attr]
    got, _ = run.hopt.hypergradient(val_batch=run.val)
    _close(got, list(want), 1e-9)
    # the real hidden state is left as the last real step stored it
    now = (model.h, model.c) if keep == "buffer" else model.hidden
    assert all(a is b for a, b in zip(now, kept, strict=True))  # type: ignore[arg-type]
    assert all(torch.equal(a, v) for a, v in zip(now, values, strict=True))  # type: ignore[arg-type]


def test_an_attribute_hidden_state_survives_hypersteps_and_training_goes_on_as_without_them() -> None:
    """The hidden state a model keeps as an attribute: after hyper_step it is the object the last
    real step stored (before: the validation batch's hidden state, or the replay's); training with
    an outer learning rate of 0 goes on exactly as training without hypersteps."""
    runs = []
    for hyper in (False, True):
        model = _LM("attribute").to(DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.3)
        hp = hg.hparams.WeightDecay(model, per="global", init=0.01).to(DT)

        def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
            return _ce(m(b[0])[0], b[1]) + h.penalty(m)

        def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
            return _ce(m(b[0])[0], b[1])  # runs on the model's stored hidden state (a user's choice)

        hopt = hg.Unrolled(
            model, hp, tl, vl, inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=2,
        )  # fmt: skip
        g = torch.Generator().manual_seed(5)
        vb = (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g))
        for k, b in enumerate(_tokens(3, 6)):
            hopt.step(b)
            if hyper and k % 2 == 1:
                before = model.hidden
                hopt.hyper_step(val_batch=vb)
                assert model.hidden is before
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


class _PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, packed: Any) -> Tensor:
        _, h = self.gru(packed)
        return self.head(h[-1]).squeeze(-1)


def _packed(seed: int) -> tuple[Any, Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 4
    lengths = torch.randint(1, 7, (n,), generator=g)  # other lengths in every batch
    x = torch.randn(n, int(lengths.max()), 3, generator=g, dtype=DT)
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), torch.randn(
        n, generator=g, dtype=DT
    )


@pytest.mark.parametrize("opt", ["asgd", "sgd"])
def test_gru_on_packed_sequences_clipped_with_asgd_matches_central_differences(opt: str) -> None:
    """GRU over packed padded batches of varying lengths, gradient clipping that binds, ASGD
    (t0=0: averaging from the start, as NT-ASGD switches to it) or SGD: per-parameter-group
    decays and the learning rate against the real 4 steps. (Under float64 as the default dtype:
    ASGD keeps its step size ``eta`` in a 0-dim tensor of the default dtype, so in float32 the real
    training's loss is a staircase in the learning rate, 0.8% off central differences.)"""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        _gru_packed(opt)
    finally:
        torch.set_default_dtype(default)


def _gru_packed(opt: str) -> None:
    K = 4

    def make(m: nn.Module, lr: float) -> torch.optim.Optimizer:
        if opt == "asgd":
            return torch.optim.ASGD(m.parameters(), lr=lr, t0=0.0, lambd=1e-3)
        return torch.optim.SGD(m.parameters(), lr=lr)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h["wd"].penalty(m)

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    model = _PackedGRU().to(DT)
    inner = make(model, 0.2)
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(model, per="layer", init=0.1), "lr": hg.hparams.LearningRate(inner)}
    ).to(DT)
    hopt = hg.Unrolled(
        model, hp, tl, vl, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=K,
    )  # fmt: skip
    train, val = [_packed(20 + k) for k in range(K + 1)], _packed(40)
    hopt.step(train[0], max_grad_norm=0.3)
    start, start_opt = copy.deepcopy(model), copy.deepcopy(inner.state_dict())
    norms = []
    for b in train[1:]:
        model.zero_grad()
        tl(model, hp, b).backward()
        norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))  # type: ignore[union-attr]
        hopt.step(b, max_grad_norm=0.3)
    assert max(norms) > 0.3  # the clipping binds
    got, _ = hopt.hypergradient(val_batch=val)

    def real() -> float:
        m = copy.deepcopy(start)
        o = make(m, float(hp["lr"].value))
        o.load_state_dict(copy.deepcopy(start_opt))
        o.param_groups[0]["lr"] = float(hp["lr"].value)
        for b in train[1:]:
            o.zero_grad()
            tl(m, hp, b).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.3)
            o.step()
        with torch.no_grad():
            return float(vl(m, hp, val))

    fd = _fd(real, hp)
    assert float(fd[-1].abs().max()) > 1e-4
    _close(got, fd, 1e-6)


def test_forward_mode_through_an_lstm_equals_reverse_mode() -> None:
    """Forward-mode AD through a 2-layer LSTM on the CPU (SGD with Nesterov momentum, clipping)
    gives reverse mode's hypergradient. (With ASGD the two agree to 2e-8 only: its step size is
    kept in a float32 0-dim tensor, through which both differentiate.)"""
    out = {}
    for mode in ("reverse", "forward"):
        model = _LM("attribute").to(DT)
        inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5, nesterov=True)
        hp = nn.ModuleDict(
            {
                "wd": hg.hparams.WeightDecay(model, per="layer", init=0.05),
                "lr": hg.hparams.LearningRate(inner),
            }
        ).to(DT)

        def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
            return _ce(m(b[0])[0], b[1]) + h["wd"].penalty(m)

        hopt = hg.Unrolled(
            model, hp, tl, _val, inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, mode=mode,
        )  # fmt: skip
        for b in _tokens(4, 3):
            hopt.step(b, max_grad_norm=0.3)
        out[mode], _ = hopt.hypergradient(val_batch=_tokens(5, 1)[0])
    assert float(out["reverse"][-1].abs().max()) > 1e-3
    _close(out["forward"], list(out["reverse"]), 1e-10)


class _SavedBytes:
    """Bytes autograd saves for backward that are alive at once (peak), through
    ``saved_tensors_hooks``."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: Tensor) -> Any:
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        holder = _Holder(t.detach())
        weakref.finalize(holder, self._free, n)
        return holder

    def _free(self, n: int) -> None:
        self.live -= n

    @staticmethod
    def unpack(h: Any) -> Tensor:
        return h.t


class _Holder:
    def __init__(self, t: Tensor) -> None:
        self.t = t


def test_checkpointed_lstm_window_of_20_keeps_bounded_saved_tensors() -> None:
    """K = 5 and 20 on the attribute-kept LSTM: ``checkpoint=True`` equals the plain reverse mode;
    its saved-for-backward bytes alive at once do not grow with K, the plain mode's do."""
    peak = {}
    batches = _tokens(6, 20)
    for K in (5, 20):
        grads = {}
        for checkpoint in (False, True):
            model = _LM("attribute").to(DT)
            inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
            hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)

            def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
                return _ce(m(b[0])[0], b[1]) + h.penalty(m)

            hopt = hg.Unrolled(
                model, hp, tl, _val, inner_optimizer=inner,
                outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=K, checkpoint=checkpoint,
            )  # fmt: skip
            for b in batches[:K]:
                hopt.step(b, max_grad_norm=1.0)
            count = _SavedBytes()
            with torch.autograd.graph.saved_tensors_hooks(count.pack, count.unpack):
                grads[checkpoint], info = hopt.hypergradient(val_batch=_tokens(7, 1)[0])
            assert info.unrolled_steps == K
            peak[K, checkpoint] = count.peak
        _close(grads[True], list(grads[False]), 1e-10)
    assert peak[20, False] > 2.5 * peak[5, False]  # (the measure sees the graph grow)
    assert peak[20, True] < 1.2 * peak[5, True]
    assert peak[20, True] < 0.3 * peak[20, False]


def _attribute_run(hopt_state: Any = None, hidden: Any = None) -> tuple[hg.Unrolled, _LM, nn.Module]:
    model = _LM("attribute").to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _ce(m(b[0])[0], b[1]) + h.penalty(m)

    hopt = hg.Unrolled(
        model, hp, tl, _val, inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01), steps=3,
    )  # fmt: skip
    return hopt, model, hp


def test_resume_mid_window_with_an_attribute_hidden_state_is_bit_exact() -> None:
    """state_dict after 2 of 3 steps (the records hold the hidden states by value), new objects,
    load, the model's hidden state put back by the script (it is in no state_dict): the next
    step and hyperstep are those of the uninterrupted run, bit for bit."""
    batches, vb = _tokens(11, 6), _tokens(12, 1)[0]
    hopt, model, hp = _attribute_run()
    for b in batches[:2]:
        hopt.step(b)
    saved: dict[str, Any] = copy.deepcopy(
        {
            "hopt": hopt.state_dict(),
            "model": model.state_dict(),
            "hp": hp.state_dict(),
            "hidden": model.hidden,
        }
    )
    for b in batches[2:4]:
        hopt.step(b)
    want = hopt.hyper_step(val_batch=vb)

    hopt2, model2, hp2 = _attribute_run()
    model2.load_state_dict(saved["model"])
    hp2.load_state_dict(saved["hp"])
    hopt2.load_state_dict(saved["hopt"])
    model2.hidden = saved["hidden"]
    for b in batches[2:4]:
        hopt2.step(b)
    got = hopt2.hyper_step(val_batch=vb)
    assert got.outer_loss == want.outer_loss and got.hypergrad_norm == want.hypergrad_norm
    assert all(torch.equal(a, b) for a, b in zip(hp2.parameters(), hp.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model.parameters(), strict=True))


class _Masked(nn.Module):
    """A constant kept as a plain attribute (not a registered buffer), read by every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.mask = torch.tril(torch.ones(4, 4, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return (self.lin(x) @ self.mask).sum(-1)


def test_a_constant_plain_attribute_is_copied_once_not_once_per_step() -> None:
    model = _Masked().to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.05).to(DT)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

    hopt = hg.Unrolled(
        model, hp, tl, tl, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(5, 4, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)) for _ in range(4)
    ]
    for b in batches:
        hopt.step(b)
    copies = {id(v) for r in hopt._records for _, k, v in r.attributes if k == "mask"}
    assert len(copies) == 1 and len(hopt._records) == 4
    hopt.hyper_step(val_batch=batches[0])
    with torch.no_grad():
        model.mask.mul_(2.0)  # written in place: copied again at the next step
    hopt.step(batches[1])
    assert len({id(v) for r in hopt._records for _, k, v in r.attributes if k == "mask"}) == 2


class _WeightDropLSTM(nn.Module):
    """AWD-LSTM's weight drop: the recurrent weight's raw value is the parameter, and each forward
    sets the LSTM's ``weight_hh_l0`` (a plain attribute then) to a dropped-out copy of it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lstm, self.out = nn.Embedding(V, E), nn.LSTM(E, E, batch_first=True), nn.Linear(E, V)
        w = self.lstm.weight_hh_l0
        del self.lstm._parameters["weight_hh_l0"]
        self.lstm.register_parameter("weight_hh_l0_raw", nn.Parameter(w.detach().clone()))
        self.lstm.weight_hh_l0 = self.lstm.weight_hh_l0_raw.detach().clone()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        self.lstm.weight_hh_l0 = F.dropout(self.lstm.weight_hh_l0_raw, self.p, self.training)
        o, _ = self.lstm(self.emb(x))
        return self.out(o)


@pytest.mark.parametrize("how", [{}, {"checkpoint": True}, {"mode": "forward"}])
def test_awd_weight_drop_matches_central_differences_and_leaves_the_real_weight(how: Any) -> None:
    """Weight drop (p = 0.3, masks from torch's RNG, replayed), clipping, a validation loss in
    eval mode: per-layer decays and the learning rate against the real 3 steps. Before, the
    hyperstep left the LSTM holding the validation call's weight, computed from the replayed
    weights (the whole replay's graph behind it), as its ``weight_hh_l0`` and in its
    ``_flat_weights`` until the next forward."""

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _ce(m(b[0]), b[1]) + h["wd"].penalty(m)

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _ce(m(b[0]), b[1])

    model = _WeightDropLSTM(0.3).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(model, per="layer", init=0.05), "lr": hg.hparams.LearningRate(inner)}
    ).to(DT)
    hopt = hg.Unrolled(
        model, hp, tl, vl, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, **how,
    )  # fmt: skip
    batches, vb = _tokens(1, 4), _tokens(2, 1)[0]
    torch.manual_seed(50)
    hopt.step(batches[0])
    start, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(inner.state_dict())
    for k, b in enumerate(batches[1:]):
        torch.manual_seed(51 + k)
        hopt.step(b, max_grad_norm=0.5)
    model.eval()
    real_weight = model.lstm.weight_hh_l0
    got, _ = hopt.hypergradient(val_batch=vb)
    assert model.lstm.weight_hh_l0 is real_weight and model.lstm._flat_weights[1] is real_weight

    def real() -> float:
        m = _WeightDropLSTM(0.3).to(DT)
        m.load_state_dict(start)
        o = torch.optim.SGD(m.parameters(), lr=float(hp["lr"].value), momentum=0.5)
        o.load_state_dict(copy.deepcopy(start_opt))
        o.param_groups[0]["lr"] = float(hp["lr"].value)
        for k, b in enumerate(batches[1:]):
            torch.manual_seed(51 + k)
            o.zero_grad()
            tl(m, hp, b).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
        m.eval()
        with torch.no_grad():
            return float(vl(m, hp, vb))

    fd = _fd(real, hp)
    assert float(fd[-1].abs().max()) > 1e-3
    _close(got, fd, 1e-6)
