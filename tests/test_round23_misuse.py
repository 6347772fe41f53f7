"""Round 23: adversarial API misuse, as a new user would write it. Each case must give the right
answer (proved against central differences of plain ``torch.optim`` training, or a closed form) or
a clear error naming the problem, and a refused call must leave the model, the hyperparameters and
the optimisers untouched.

Bugs found (each test failed before its fix):

1. Micro-batches handed to ``step`` as an iterator (``zip(xs, ys)``, ``map``, ``iter(list)``:
   deep-copyable, unlike a generator, so Unrolled's copy did not refuse them). The first loss
   that reads the iterator uses it up, and Unrolled replays the recorded copy of it: with
   ``checkpoint=True`` the second (backward) pass of the window ran on an exhausted iterator, a
   hypergradient 26% off without any warning; in the other modes every replay after the first
   (the next ``hypergradient`` / ``hyper_step`` over the window) trained on nothing (the sign
   flipped, with a ReplayWarning that names no cause). Delta-STN's response pass likewise read
   the base pass's exhausted iterator. (misuse-1.diff: ``check_batch`` refuses an iterator as a
   batch or inside one, before anything changes.)
2. A trained submodule replaced after construction (``model.head = nn.Linear(...)``: a new head
   for fine-tuning) went on silently: the optimiser kept stepping the old head's tensors (which
   no longer get a gradient), the new head never trained, and the method silently dropped the old
   weights from its trained set; the same change made through a parameter
   (``model.head.weight = nn.Parameter(...)``) is refused by name. Likewise the hparams container
   registered inside the model after construction (``model.hp = hp``, which the constructor
   refuses by name): its hyperparameters were taken for frozen weights changed outside
   ``step()``, with warnings naming neither. (misuse-2.diff)
3. ``Implicit``: a training loss without a graph on the hyperstep's ``train_batch`` (a batch with
   nothing to learn, or a loss computed under ``no_grad``), which ``step`` accepts with a
   warning, crashed the hyperstep with autograd's bare "element 0 of tensors does not require
   grad and does not have a grad_fn". (misuse-3.diff)
4. ``Unrolled``: a trained weight tied into another module after construction
   (``model.b.weight = model.a.weight``, where ``b``'s own weight was not trained): the replay
   substituted the replayed weight into the first module only, the second kept reading the real
   (final) weight at every replayed step; after a hyperstep (when the replay is not checked
   against the real weights) the hypergradient came out 48% off without a word. (misuse-4.diff:
   the module layout that makes the method look at the model again includes the parameters
   each module holds.)
5. A ``step`` or ``hyper_step`` refused with an error (a batch whose labels do not fit; nothing
   else changed) left torch's random generator advanced by the dropout masks its forward passes
   drew (the non-finite refusals put it back): a script that catches the error and goes on ran
   differently from one that never made the call (Implicit and Unrolled alike). (misuse-5.diff)
6. ``Unrolled``: the training loss replaced between steps (``hopt.train_loss = new_loss``, a
   curriculum switching losses): the replay ran every recorded step of the window with the new
   loss, also the steps taken with the old one: a third off, without a word. (misuse-6.diff: a
   new episode with a ReplayWarning, and the replay uses the loss the recorded steps were taken
   with.)
7. ``hopt.on_nonfinite = "raise"`` set after construction (a string, as the constructor takes
   it) was silently taken for ``"skip"``: NaN steps were skipped with a warning instead of
   raising (the check compared with the enum member by identity), and an invalid value
   (``"ignore"``) was accepted. (misuse-7.diff: a validating property.)
8. ``hopt.outer_optimizer`` replaced by one over some of the hyperparameters only (a second
   phase with another optimiser, a container forgotten): the others got their hypergradient in
   ``.grad`` and silently never moved again; the constructor refuses the same optimiser by name.
   (misuse-8.diff)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64
LR = 0.2
DECAY = 1.0  # (the global decay of the micro-batch problem: a hypergradient of 0.026)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT)
    xv, yv = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT)
    return (x, y), (xv, yv)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _state(model: nn.Module, hp: nn.Module, *opts: torch.optim.Optimizer) -> list[Any]:
    """Everything a refused call must leave as it was, by value."""
    out: list[Any] = [t.detach().clone() for t in (*model.parameters(), *model.buffers(), *hp.parameters())]
    out += [None if t.grad is None else t.grad.clone() for t in (*model.parameters(), *hp.parameters())]
    for opt in opts:
        out += [
            v.clone() if isinstance(v, Tensor) else v
            for p in opt.state
            for v in opt.state[p].values()  # (insertion order: the same for the same history)
        ]
    return out


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (isinstance(x, Tensor) and isinstance(y, Tensor) and torch.equal(x, y))
        or (not isinstance(x, Tensor) and x == y)
        for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------- 1. micro-batches as
# an iterator: read once, replayed many times


def _micro_loss(m: nn.Module, h: nn.Module, micro: Any) -> Tensor:
    """Gradient accumulation as it is usually written: a running total over the micro-batches."""
    total: Any = 0
    for x, y in micro:
        total = total + ((m(x) - y) ** 2).mean() / 2
    return total + h.penalty(m)


def _micro(b: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(b[0][:8], b[1][:8]), (b[0][8:], b[1][8:])]


def _zipped(b: tuple[Tensor, Tensor]) -> Any:
    """The same micro-batches as ``zip(xs, ys)``: an iterator, read once."""
    return zip([b[0][:8], b[0][8:]], [b[1][:8], b[1][8:]], strict=True)


def _decay_hopt(model: nn.Module, **kw: Any) -> tuple[hg.Unrolled, nn.Module, torch.optim.Optimizer]:
    hp = hg.hparams.WeightDecay(model, per="global", init=DECAY)
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    hopt = hg.Unrolled(
        model, hp, _micro_loss, _mse,
        inner_optimizer=inner, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, **kw,
    )  # fmt: skip
    return hopt, hp, inner


def _central_difference_through_sgd(steps: int, tb: Any, vb: Any, eps: float = 1e-6) -> float:
    """d L_V / d raw through ``steps`` plain torch.optim SGD steps on the micro-batch loss."""

    def outer(raw: float) -> float:
        model = _mlp()
        hp = hg.hparams.WeightDecay(model, per="global", init=DECAY)
        with torch.no_grad():
            hp.raw[0].fill_(raw)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(steps):
            opt.zero_grad()
            _micro_loss(model, hp, _micro(tb)).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(model, hp, vb))

    raw0 = float(hg.hparams.WeightDecay(_mlp(), per="global", init=DECAY).raw[0].detach())
    return (outer(raw0 + eps) - outer(raw0 - eps)) / (2 * eps)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_unrolled_with_micro_batches_as_an_iterator_is_right_or_refused(checkpoint: bool) -> None:
    tb, vb = _data()
    want = _central_difference_through_sgd(3, tb, vb)
    assert abs(want) > 1e-2
    # the same micro-batches as a list: the reference the library gets right
    hopt, _, _ = _decay_hopt(_mlp(), checkpoint=checkpoint)
    for _ in range(3):
        hopt.step(_micro(tb))
    g_list = float(hopt.hypergradient(val_batch=vb)[0][0])
    assert g_list == pytest.approx(want, rel=1e-6)
    # as zip(xs, ys): either the same answer, every time, or a clear refusal that changes nothing
    model = _mlp()
    hopt, hp, inner = _decay_hopt(model, checkpoint=checkpoint)
    before = _state(model, hp, inner)
    try:
        hopt.step(_zipped(tb))
    except TypeError as error:
        assert "iterator" in str(error) and "list" in str(error)
        assert _same(before, _state(model, hp, inner)) and hopt.inner_steps == 0
        return
    for _ in range(2):
        hopt.step(_zipped(tb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (judged by the values: the ReplayWarning names no cause)
        got = [float(hopt.hypergradient(val_batch=vb)[0][0]) for _ in range(2)]
    assert got == pytest.approx([want, want], rel=1e-6)


def test_a_list_of_micro_batches_is_replayed_right_by_every_unrolled_mode() -> None:
    """(passes) What the refusal above points to: micro-batches as a list, in reverse,
    checkpointed and forward mode, twice in a row (the second replay re-reads the record), against
    central differences of plain SGD on the same loss."""
    tb, vb = _data()
    want = _central_difference_through_sgd(3, tb, vb)
    for kw in ({}, {"checkpoint": True}, {"mode": "forward"}):
        hopt, _, _ = _decay_hopt(_mlp(), **kw)
        for _ in range(3):
            hopt.step(_micro(tb))
        got = [float(hopt.hypergradient(val_batch=vb)[0][0]) for _ in range(2)]
        assert got == pytest.approx([want, want], rel=1e-6), kw


def test_delta_stn_refuses_an_iterator_batch_before_changing_anything() -> None:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
    model = hg.nn.StnLinear(3, 1, hp.size).to(DT)

    def loss(m: nn.Module, h: Any, micro: Any) -> Tensor:
        total = torch.zeros((), dtype=DT)
        for x, y in micro:
            total = total + ((m(x, h.draw(len(x))) - y) ** 2).mean()
        return total

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.SelfTuning(
        model, hp, loss, loss, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), delta=True,
    )  # fmt: skip
    tb, _ = _data()
    before = _state(model, hp, inner)
    with pytest.raises(TypeError, match=r"iterator \(zip\).*list"):
        hopt.step(_zipped(tb))
    assert _same(before, _state(model, hp, inner)) and hopt.inner_steps == 0


# ----------------------------------------------------------------------------- 2. a trained submodule
# replaced after construction


def _implicit_or_unrolled(method: str, model: nn.Module) -> tuple[hg.HyperOptimizer, nn.Module]:
    hp = hg.hparams.Hparam(0.1, "positive", dtype=DT)

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return _mse(m, h, b) + h() * sum((p**2).sum() for p in m.parameters())

    kw: dict[str, Any] = {"steps": 2} if method == "unrolled" else {}
    cls = hg.Unrolled if method == "unrolled" else hg.Implicit
    hopt = cls(
        model, hp, train, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1), **kw,
    )  # fmt: skip
    return hopt, hp


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_trained_submodule_replaced_after_construction_is_refused(method: str) -> None:
    model = _mlp()
    hopt, hp = _implicit_or_unrolled(method, model)
    tb, vb = _data()
    hopt.step(tb)
    model[2] = nn.Linear(4, 1).to(DT)  # a new head, as for fine-tuning on another task
    before = _state(model, hp, hopt.inner_optimizer, hopt.outer_optimizer)
    head = [p.detach().clone() for p in model[2].parameters()]
    for _ in range(2):  # (and the second call too: nothing is taken as seen by a refused one)
        with pytest.raises(ValueError, match=r"no longer holds the weights \['2\.weight', '2\.bias'\]"):
            hopt.step(tb)
        with pytest.raises(ValueError, match=r"no longer holds the weights"):
            hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert _same(before, _state(model, hp, hopt.inner_optimizer, hopt.outer_optimizer))
    assert hopt.inner_steps == 1 and hopt.hyper_steps == 0
    # before: the steps were taken, and the new head, which the loss uses, never moved
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), head, strict=True))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_hparams_registered_inside_the_model_after_construction_are_refused(method: str) -> None:
    torch.manual_seed(0)
    model = _Net().to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    kw: dict[str, Any] = {"steps": 2} if method == "unrolled" else {}
    cls = hg.Unrolled if method == "unrolled" else hg.Implicit
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    hopt = cls(model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, **kw)
    tb, vb = _data()
    hopt.step(tb)
    model.hp = hp  # (as the constructor's error guesses: "model.hp = ...?")
    before = _state(model, hp, inner, outer)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"hyperparameters as its own parameters \(\['hp\.raw\.0'"):
            hopt.step(tb)
        with pytest.raises(ValueError, match=r"hyperparameters as its own parameters"):
            hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert _same(before, _state(model, hp, inner, outer)) and hopt.inner_steps == 1


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_frozen_submodule_swapped_after_construction_still_trains_the_rest(method: str) -> None:
    """(passes; pins what the fix above must keep) Swapping a module the optimiser does not train
    (a frozen head, not in ``inner_optimizer``) is no misuse: steps go on, and the hypergradient
    is that of the real training (central differences over two real steps, Unrolled; Implicit:
    finite)."""
    tb, vb = _data()

    def build() -> tuple[nn.Module, hg.HyperOptimizer, nn.Module]:
        model = _mlp()
        hp = hg.hparams.Hparam(0.1, "positive", dtype=DT)

        def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
            return _mse(m, h, b) + h() * (m[0].weight ** 2).sum()

        cls: Callable[..., hg.HyperOptimizer] = hg.Unrolled if method == "unrolled" else hg.Implicit
        kw: dict[str, Any] = {"steps": 2} if method == "unrolled" else {}
        hopt = cls(
            model, hp, train, _mse,
            inner_optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), **kw,
        )  # fmt: skip
        torch.manual_seed(5)
        model[2] = nn.Linear(4, 1).to(DT).requires_grad_(False)
        if method == "unrolled":
            hopt.start_episode()
        return model, hopt, hp

    model, hopt, hp = build()
    for _ in range(2):
        hopt.step(tb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    assert bool(torch.isfinite(grads[0]).all()) and float(grads[0].abs()) > 0
    if method == "implicit":
        return

    def outer(raw: float) -> float:
        model, hopt, hp = build()
        with torch.no_grad():
            hp.raw.fill_(raw)
        for _ in range(2):
            hopt.step(tb)
        with torch.no_grad():
            return float(_mse(model, hp, vb))

    r, eps = float(hp.raw.detach()), 1e-6
    assert float(grads[0]) == pytest.approx((outer(r + eps) - outer(r - eps)) / (2 * eps), rel=1e-6)


# ----------------------------------------------------------------------------- 3. a trained weight tied
# into a second module after construction


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.c = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _tied_train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _mse(m, h, b) + h() * (m.a.weight**2).sum()


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_weight_tied_into_another_module_after_construction_is_replayed_everywhere(mode: str) -> None:
    tb, vb = _data()
    torch.manual_seed(0)
    model = _Tied().to(DT)
    hp = hg.hparams.Hparam(0.1, "positive", dtype=DT)
    trained = lambda m: [m.a.weight, *m.c.parameters()]  # noqa: E731  (b's own weight: not trained)
    hopt = hg.Unrolled(
        model, hp, _tied_train, _mse, steps=3, mode=mode,
        inner_optimizer=torch.optim.SGD(trained(model), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )  # fmt: skip
    for _ in range(3):
        hopt.step(tb)
    hopt.hyper_step(val_batch=vb)
    model.b.weight = model.a.weight  # tied now (a shared projection, decided late)
    start = copy.deepcopy(model)  # (deepcopy keeps the tie)
    for _ in range(3):
        hopt.step(tb)
    got = float(hopt.hypergradient(val_batch=vb)[0][0])

    def outer(raw: float) -> float:  # the same three steps in plain torch, from the same start
        m = copy.deepcopy(start)
        h = hg.hparams.Hparam(0.1, "positive", dtype=DT)
        with torch.no_grad():
            h.raw.fill_(raw)
        opt = torch.optim.SGD(trained(m), lr=LR)
        for _ in range(3):
            opt.zero_grad()
            _tied_train(m, h, tb).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(m, h, vb))

    r, eps = float(hp.raw.detach()), 1e-6
    want = (outer(r + eps) - outer(r - eps)) / (2 * eps)
    assert abs(want) > 1e-3
    assert got == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- 4. a refused call
# leaves torch's random generator as it was


def _dropout_run(method: str, refuse: str | None) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT))
        for _ in range(5)
    ]
    vb = (torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    kw: dict[str, Any] = (
        {"steps": 3} if method == "unrolled" else {"solver": hg.CG(maxiter=5, warm_start=True)}
    )
    cls = hg.Unrolled if method == "unrolled" else hg.Implicit
    hopt = cls(model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, **kw)
    torch.manual_seed(1)
    for i, b in enumerate(data):
        # labels that do not fit (15 of them for 16 inputs): the loss fails after the forward pass
        # (and its dropout draws); the script catches the error and goes on with the right batch
        bad = (b[0], b[1][:15])
        if refuse == "step" and i == 2:
            with pytest.raises(RuntimeError, match="must match"):
                hopt.step(bad)
        hopt.step(b)
        if refuse == "hyper_step" and i == 2:
            with pytest.raises(RuntimeError, match="must match"):
                hopt.hyper_step(train_batch=b, val_batch=(vb[0], vb[1][:15]))
        hopt.hyper_step(train_batch=b, val_batch=vb)
    return [p.detach().clone() for p in (*model.parameters(), *hp.parameters())]


@pytest.mark.parametrize("refuse", ["step", "hyper_step"])
@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_call_refused_with_an_error_leaves_the_run_bit_identical(method: str, refuse: str) -> None:
    want = _dropout_run(method, None)
    got = _dropout_run(method, refuse)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ----------------------------------------------------------------------------- 5. Unrolled: the training
# loss replaced between steps


def _l1(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return (m(b[0]) - b[1]).abs().mean() + h.penalty(m)


def test_unrolled_follows_a_training_loss_replaced_between_steps() -> None:
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT))
        for _ in range(5)
    ]
    vb = (torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT))
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.5)
    hopt = hg.Unrolled(
        model, hp, _l1, _mse, steps=3,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )  # fmt: skip
    starts, losses = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, b in enumerate(data):
            if i == 4:
                hopt.train_loss = _penalised  # the curriculum's second stage
            starts.append(copy.deepcopy(model))
            losses.append(hopt.train_loss)
            hopt.step(b)
            hopt.hyper_step(val_batch=vb)  # (outer lr 0: the decay stays where it is)
        grads, info = hopt.hypergradient(val_batch=vb)
    named = [w for w in caught if issubclass(w.category, hg.ReplayWarning) and "train_loss" in str(w.message)]
    # the right answer: the real steps of the window (the last 3, or the last 1 after a new episode
    # that a ReplayWarning naming train_loss announced), each with the loss it was taken with
    first = 4 if named else 2
    assert info.unrolled_steps == 5 - first

    def outer(raw: float) -> float:
        m = copy.deepcopy(starts[first])
        h = hg.hparams.WeightDecay(m, per="global", init=0.5)
        with torch.no_grad():
            h.raw[0].fill_(raw)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        for b, loss in zip(data[first:], losses[first:], strict=True):
            opt.zero_grad()
            loss(m, h, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(m, h, vb))

    r, eps = float(hp.raw[0].detach()), 1e-6
    want = (outer(r + eps) - outer(r - eps)) / (2 * eps)
    assert abs(want) > 1e-3
    assert float(grads[0]) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- 6. Implicit: a training
# loss without a graph on the hyperstep's batch


@pytest.mark.parametrize("how", ["masked", "no_grad"])
def test_implicit_names_a_training_loss_without_a_graph_at_the_hyperstep(how: str) -> None:
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        if how == "masked":  # a batch whose examples are all masked out: nothing to learn
            keep = b[2]
            if not bool(keep.any()):
                return torch.zeros((), dtype=DT)
            return _mse(m, h, (b[0][keep], b[1][keep])) + h.penalty(m)
        with torch.no_grad():  # by mistake
            return _mse(m, h, b) + h.penalty(m)

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.Adam(hp.parameters(), lr=0.1)
    hopt = hg.Implicit(model, hp, train, _mse, inner_optimizer=inner, outer_optimizer=outer)
    (x, y), vb = _data()
    empty = (x, y, torch.zeros(16, dtype=torch.bool))
    with pytest.warns(hg.DisconnectedWarning, match="does not require grad"):
        hopt.step(empty)  # (step: a constant loss changes nothing, with a warning)
    before = _state(model, hp, inner, outer)
    with pytest.raises(ValueError, match=r"train_loss returned a loss that does not require grad"):
        hopt.hyper_step(train_batch=empty, val_batch=vb)
    assert _same(before, _state(model, hp, inner, outer)) and hopt.hyper_steps == 0


# ----------------------------------------------------------------------------- 7. the non-finite policy
# changed after construction


def test_on_nonfinite_set_after_construction_is_followed_or_refused() -> None:
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    hopt = hg.Implicit(
        model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, on_nonfinite="skip"
    )
    tb, vb = _data()
    nan_batch = (tb[0], tb[1] * float("nan"))
    with pytest.warns(hg.NonFiniteWarning):
        hopt.step(nan_batch)  # (skip: as built)
    hopt.on_nonfinite = "raise"  # the warm-up is over: from now on a NaN is an error
    before = _state(model, hp, inner, outer)
    with pytest.raises(hg.NonFiniteError):
        hopt.step(nan_batch)
    with pytest.raises(hg.NonFiniteError):
        hopt.hyper_step(train_batch=tb, val_batch=(vb[0], vb[1] * float("nan")))
    assert _same(before, _state(model, hp, inner, outer))
    with pytest.raises(ValueError, match=r"on_nonfinite.*'ignore'"):
        hopt.on_nonfinite = "ignore"  # type: ignore[assignment]


# ----------------------------------------------------------------------------- 8. the outer optimiser
# replaced after construction


def test_a_replaced_outer_optimizer_lacking_a_hyperparameter_is_refused() -> None:
    model = _mlp()
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="layer", init=0.1),
            "s": hg.hparams.Hparam(1.0, "positive", dtype=DT),
        }
    )

    def train(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return h["s"]() * _mse(m, h, b) + h["wd"].penalty(m)

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = hg.Implicit(
        model,
        hp,
        train,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    tb, vb = _data()
    hopt.step(tb)
    hopt.hyper_step(train_batch=tb, val_batch=vb)
    with pytest.raises(ValueError, match=r"\['s\.raw'\] are not in outer_optimizer"):
        hg.Implicit(  # (what the constructor says of the same optimiser)
            model,
            hp,
            train,
            _mse,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp["wd"].parameters(), lr=0.1),
        )
    hopt.outer_optimizer = torch.optim.SGD(hp["wd"].parameters(), lr=0.1)  # phase 2, 's' forgotten
    before = _state(model, hp, inner, hopt.outer_optimizer)
    with pytest.raises(ValueError, match=r"\['s\.raw'\] are not in outer_optimizer"):
        hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert _same(before, _state(model, hp, inner, hopt.outer_optimizer)) and hopt.hyper_steps == 1
    hp["s"].raw.requires_grad_(False)  # held fixed on purpose: may be left out
    hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert hopt.hyper_steps == 2
