"""Round 27: hyperparameters that live inside the model, as research code keeps them.

DARTS (Liu et al. 2019) keeps its architecture weights on the network, in a plain Python list that
``nn.Module`` does not register (``self._arch_parameters = [self.alphas_normal, ...]``), and reads
them in ``forward``; the same tensors are the hyperparameters (``hparams``) and are read by the
loss too (an entropy regulariser on the mixing weights). Every hypergradient here is checked
against a hand-written float64 reference: plain autograd through K SGD steps from the real
weights the window starts from (on a fresh copy of the cell whose list holds a new leaf).

Bugs found (each test failed before its fix):

1. ``Unrolled(mode="forward")``: a hyperparameter the model reads from a plain list (tuple, dict)
   attribute got a hypergradient of exactly 0 (a DisconnectedWarning that names none of the real
   cause), or, when the loss reads it too, only the loss's part of it, with no warning at all
   (here 103% off in norm, in another direction). Forward mode substitutes dual tensors into the
   ``hparams`` module's slots only; the model went on reading the real tensor, which carries no
   tangent. Likewise through a parametrisation that holds it (a learned gain registered with
   ``torch.nn.utils.parametrize``). (fix:
   :class:`FunctionalPair` also substitutes into the places the model's modules hold the
   hyperparameters in plain list / tuple / dict attributes, found once at construction.)
2. ``Unrolled`` in reverse mode, same model: the steps *before* the window, re-run with the
   hyperparameter values they were taken with, read the current values from the model's list
   instead, so the window started from weights training never had: a hypergradient 9% off
   after hypersteps moved the hyperparameters, without a word. (fixed)
3. A hyperparameter registered as a buffer of the model (``self.register_buffer("alpha",
   hp.alpha)``: the per-layer "not a parameter, keep it out of the optimiser" habit) was
   accepted, and every method returned a hypergradient of exactly 0 (buffers are substituted and
   recorded by value, detached), with a DisconnectedWarning naming none of this; a hyperparameter
   registered as a model parameter is refused by name. (fix: refused as well, at
   construction and when registered later.)
4. DARTS's own layout ported as written: alphas as plain tensors on the model
   (``Variable(..., requires_grad=True)`` in a list) and ``hparams = nn.ParameterList(
   model.arch_parameters())``, which wraps each in a *new* Parameter on the same memory. The
   model read tensors no method substitutes or differentiates: every hypergradient exactly 0
   (Implicit, Unrolled in both modes), with a DisconnectedWarning naming none of this, while the
   outer steps moved them through the shared memory. (fix: refused at construction,
   naming the attribute and the fix.)
5. ``Unrolled``, both modes: a trained weight the model reads from a plain list (a tie kept out
   of the registered parameters, ``self.tied = [self.enc.weight]``): the replay ran every step
   on the real, final weight there. The replay check warns at the first hyperstep; the second
   hypergradient was 16% off without a word. (fix: the same places, for the weights.)
6. ``Unrolled``, both modes: a loss that reads a hyperparameter through its closure
   (``log_lam`` captured, not ``h[0]``): forward mode's hypergradient was 0 (the same misleading
   DisconnectedWarning); reverse mode, once steps before the window were re-run after a
   hyperstep, 7% off, silently. Nothing can substitute into a closure. (fix: the
   real hyperparameters are taken along in the gradient each replayed step needs anyway, where
   the step runs on other values, and forward mode's validation loss checks once per hyperstep:
   a read outside ``hparams`` is refused by name, before anything moves.)

The tied-weight reference is written out by hand: ``torch.func.functional_call`` does not
substitute into a model's plain lists either.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64
LR = 0.3
ALPHA0 = (0.2, -0.1, 0.4)
ENTROPY = 0.3  # weight of the (negative) entropy regulariser on softmax(alpha) in the validation loss


class _Cell(nn.Module):
    """DARTS's mixed operation in miniature: three candidate operations mixed by softmax(alpha),
    alpha read from the plain (unregistered) attribute ``self.arch`` as DARTS keeps it."""

    def __init__(self, arch: Any, kind: str = "list") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ops = nn.ModuleList([nn.Linear(3, 2).to(DT) for _ in range(3)])
        self.kind = kind
        if kind == "attribute":  # (held as an unregistered attribute itself: nn.Module would register it)
            object.__setattr__(self, "arch", arch)
        else:
            self.arch = arch

    def alpha(self) -> Tensor:
        a = self.arch
        return a["normal"] if self.kind == "dict" else a if self.kind == "attribute" else a[0]

    def forward(self, x: Tensor) -> Tensor:
        mix = torch.softmax(self.alpha(), 0)
        return sum(m * torch.tanh(op(x)) for m, op in zip(mix, self.ops, strict=True)).sum(1)


def _data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    xv, yv = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    return (x, y), (xv, yv)


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    x, y = b
    return ((m(x) - y) ** 2).mean()


def _neg_entropy(a: Tensor) -> Tensor:
    return (torch.softmax(a, 0) * torch.log_softmax(a, 0)).sum()


def _val_shared(m: nn.Module, h: Any, b: Any) -> Tensor:
    """The architecture loss of entropy-regularised DARTS variants: the model reads alpha from its
    list, the loss reads the same tensor from ``hparams``."""
    return _mse(m, h, b) + ENTROPY * _neg_entropy(h[0])


def _holder(p: nn.Parameter, kind: str) -> Any:
    return {"list": [p], "tuple": (p,), "dict": {"normal": p}, "attribute": p}[kind]


def _build(
    kind: str = "list",
    *,
    val_loss: Callable[..., Tensor] = _mse,
    outer_lr: float = 0.0,
    **kw: Any,
) -> tuple[_Cell, nn.ParameterList, hg.HyperOptimizer]:
    hp = nn.ParameterList([nn.Parameter(torch.tensor(ALPHA0, dtype=DT))])
    model = _Cell(_holder(hp[0], kind), kind)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=outer_lr),
        **kw,
    )
    return model, hp, hopt


def _reference(
    start: list[Tensor], alpha: Tensor, k: int, tb: Any, vb: Any, *, shared: bool = False
) -> Tensor:
    """d L_V / d alpha through ``k`` plain SGD steps from the weights ``start``, by autograd on a
    fresh copy of the cell (alpha a new leaf)."""
    a = alpha.detach().clone().requires_grad_(True)
    cell = _Cell([a])
    names = [n for n, _ in cell.named_parameters()]
    ws = [t.detach().clone().requires_grad_(True) for t in start]

    def f(w: list[Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(cell, dict(zip(names, w, strict=True)), (x,))

    for _ in range(k):
        loss = ((f(ws, tb[0]) - tb[1]) ** 2).mean()
        g = torch.autograd.grad(loss, ws, create_graph=True)
        ws = [w - LR * gi for w, gi in zip(ws, g, strict=True)]
    val = ((f(ws, vb[0]) - vb[1]) ** 2).mean()
    if shared:
        val = val + ENTROPY * _neg_entropy(a)
    return torch.autograd.grad(val, a)[0]


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------- 0. what already works (pinned for the fixes)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reverse_mode_alpha_in_a_plain_list_matches_hand_written_unrolled_darts(k: int) -> None:
    """(passes; not covered before: the hyperparameter held by the model itself, not read from the
    loss's ``hparams`` argument) Second-order DARTS unrolled through k = 1..3 real SGD steps, with
    alpha in the model's plain list and an entropy regulariser in the validation loss reading it
    from ``hparams``: reverse mode equals plain autograd through the same steps."""
    tb, vb = _data()
    model, hp, hopt = _build(val_loss=_val_shared, steps=k)
    start = _weights(model)
    for _ in range(k):
        hopt.step(tb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    ref = _reference(start, hp[0], k, tb, vb, shared=True)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(grads[0], ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("solver", ["identity", "neumann"])
def test_implicit_alpha_in_a_plain_list_equals_alpha_passed_by_the_loss(solver: str) -> None:
    """(passes; new) Implicit differentiates at the real hyperparameter tensors, so a model
    reading them from its own list gives exactly the hypergradient of the same model fed alpha by
    the loss; and Identity's closed form d_a L_V - d_a (d_w L_T . d_w L_V) (first-order DARTS's
    linearisation, scale 1) is checked by autograd."""
    tb, vb = _data()

    def build(inside: bool) -> tuple[_Cell, nn.ParameterList, hg.Implicit]:
        hp = nn.ParameterList([nn.Parameter(torch.tensor(ALPHA0, dtype=DT))])
        if inside:
            model, loss = _Cell([hp[0]]), _mse
        else:
            model = _Cell(None)

            def loss(m: nn.Module, h: Any, b: Any) -> Tensor:
                m.arch = [h[0]]
                try:
                    return _mse(m, h, b)
                finally:
                    m.arch = None

        s = hg.Identity() if solver == "identity" else hg.Neumann(steps=3, alpha=0.1)
        hopt = hg.Implicit(
            model, hp, loss, loss,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=s,
        )  # fmt: skip
        return model, hp, hopt

    out = []
    for inside in (True, False):
        model, hp, hopt = build(inside)
        for _ in range(3):
            hopt.step(tb)
        out.append(hopt.hypergradient(train_batch=tb, val_batch=vb)[0][0])
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-15)
    if solver == "identity":
        a = hp[0].detach().clone().requires_grad_(True)
        cell = _Cell([a])
        cell.load_state_dict(model.state_dict())
        w = list(cell.parameters())
        gv = torch.autograd.grad(_mse(cell, None, vb), w)
        gt = torch.autograd.grad(_mse(cell, None, tb), w, create_graph=True)
        dot = sum((x * y.detach()).sum() for x, y in zip(gt, gv, strict=True))
        ref = torch.autograd.grad(_mse(cell, None, vb), a, allow_unused=True)[0]
        ref = (torch.zeros_like(a) if ref is None else ref) - torch.autograd.grad(dot, a)[0]
        torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-14)


def test_alpha_given_to_the_inner_optimizer_by_mistake_is_refused_by_name() -> None:
    """(passes; new for a hyperparameter held in a plain list) ``SGD(list(model.parameters()) +
    model.arch)``, DARTS's alphas swept into the weights' optimiser: refused by name, and alpha
    registered as a real parameter of the model is too."""
    hp = nn.ParameterList([nn.Parameter(torch.tensor(ALPHA0, dtype=DT))])
    model = _Cell([hp[0]])
    with pytest.raises(ValueError, match=r"inner_optimizer holds hyperparameter '0'"):
        hg.Unrolled(
            model, hp, _mse, _mse,
            inner_optimizer=torch.optim.SGD([*model.parameters(), *model.arch], lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )  # fmt: skip
    model.alpha_p = hp[0]  # (an nn.Parameter assigned: registered)
    with pytest.raises(ValueError, match=r"hyperparameter '0' is also a parameter of the model \('alpha_p'"):
        hg.Implicit(
            model, hp, _mse, _mse,
            inner_optimizer=torch.optim.SGD(model.ops.parameters(), lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )  # fmt: skip


# ----------------------------------------------------------------- 1. forward mode: 0 or a part


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "attribute"])
@pytest.mark.parametrize("shared", [False, True], ids=["model-only", "model-and-loss"])
def test_forward_mode_alpha_held_by_the_model_matches_hand_written_darts(kind: str, shared: bool) -> None:
    tb, vb = _data()
    model, hp, hopt = _build(kind, val_loss=_val_shared if shared else _mse, steps=2, mode="forward")
    holder, start = model.arch, _weights(model)
    for _ in range(2):
        hopt.step(tb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    assert model.arch is holder and model.alpha() is hp[0]  # (left as it was)
    ref = _reference(start, hp[0], 2, tb, vb, shared=shared)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(grads[0], ref, rtol=1e-9, atol=1e-13)
    # (reverse mode on the same run gives the same)
    hopt.mode = "reverse"
    torch.testing.assert_close(
        hopt.hypergradient(train_batch=tb, val_batch=vb)[0][0], ref, rtol=1e-10, atol=1e-13
    )


# ------------------------------------------- 2. reverse mode: the steps before the window re-run


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_steps_before_the_window_rerun_with_the_values_they_were_taken_with(mode: str) -> None:
    """Window K=3 over a history with hypersteps that moved alpha (outer SGD at lr 30): the
    hypergradient is that of the last 3 real steps started from the real weights before them
    (recorded here), with the current alpha. Reverse mode was 9% off (and no warning)."""
    tb, vb = _data()
    kw: dict[str, Any] = {"mode": "reverse", "checkpoint": True} if mode == "checkpoint" else {"mode": mode}
    model, hp, hopt = _build(outer_lr=30.0, steps=3, **kw)
    history = []
    for c in "ssshsshss":
        if c == "s":
            history.append(_weights(model))
            hopt.step(tb)
        else:
            hopt.hyper_step(train_batch=tb, val_batch=vb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    ref = _reference(history[-3], hp[0], 3, tb, vb)
    torch.testing.assert_close(grads[0], ref, rtol=1e-9, atol=1e-13)


# --------------------------------------------------- 3. a hyperparameter registered as a buffer


class _BufferCell(_Cell):
    """Alpha registered as a buffer of the model (kept out of ``model.parameters()``, and so out
    of the inner optimiser, the way per-layer constants are)."""

    def alpha(self) -> Tensor:
        return self._buffers.get("alpha_hp", self.alpha_buf)  # (alpha_hp: registered later)


@pytest.mark.parametrize("method", ["implicit", "unrolled", "forward"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_hyperparameter_registered_as_a_model_buffer_is_refused(method: str, when: str) -> None:
    tb, vb = _data()
    hp = nn.ParameterList([nn.Parameter(torch.tensor(ALPHA0, dtype=DT))])
    model = _BufferCell(None)
    model.register_buffer("alpha_buf", hp[0].detach().clone() if when == "after" else hp[0])
    cls: Any = hg.Implicit if method == "implicit" else hg.Unrolled
    kw: dict[str, Any] = (
        {} if method == "implicit" else {"steps": 2, "mode": "forward" if method == "forward" else "reverse"}
    )
    inner = torch.optim.SGD(model.parameters(), lr=LR)

    def build() -> Any:
        return cls(
            model, hp, _mse, _mse,
            inner_optimizer=inner, outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), **kw,
        )  # fmt: skip

    if when == "before":
        with pytest.raises(
            ValueError, match=r"hyperparameter '0' is also a buffer of the model \('alpha_buf'"
        ):
            build()
        return
    hopt = build()
    hopt.step(tb)
    model.register_buffer("alpha_hp", hp[0])  # (a second phase that hands alpha to the model)
    before = [t.detach().clone() for t in [*model.parameters(), *hp.parameters()]]
    with pytest.raises(ValueError, match=r"\['alpha_hp'\].*register_buffer"):
        hopt.step(tb)
    with pytest.raises(ValueError, match=r"\['alpha_hp'\].*register_buffer"):
        hopt.hyper_step(train_batch=tb, val_batch=vb)
    after = [t.detach() for t in [*model.parameters(), *hp.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and hopt.inner_steps == 1


# ------------------------------------- 4. DARTS's plain tensors wrapped by nn.ParameterList


@pytest.mark.parametrize("method", ["implicit", "reverse", "forward"])
def test_darts_plain_tensor_alphas_wrapped_in_a_parameterlist_are_refused(method: str) -> None:
    """DARTS's own code keeps ``self.alphas_normal = Variable(1e-3 * torch.randn(...),
    requires_grad=True)`` and ``self._arch_parameters = [self.alphas_normal, ...]``; the natural
    port, ``hparams = nn.ParameterList(model.arch_parameters())``, wraps each plain tensor in a new
    ``nn.Parameter`` sharing its memory: the model goes on reading the old tensors, which no method
    substitutes or differentiates, and the outer steps move them through the shared memory.
    Every hypergradient was exactly 0, with a DisconnectedWarning naming none of this."""
    alpha = torch.tensor(ALPHA0, dtype=DT, requires_grad=True)
    model = _Cell([alpha])
    hp = nn.ParameterList(model.arch)
    assert hp[0] is not alpha and hp[0].data_ptr() == alpha.data_ptr()
    kw: dict[str, Any] = {"solver": hg.Identity()} if method == "implicit" else {"steps": 2, "mode": method}
    cls: Any = hg.Implicit if method == "implicit" else hg.Unrolled
    with pytest.raises(ValueError, match=r"attribute 'arch\[0\]' is another tensor than hyperparameter '0'"):
        cls(
            model, hp, _mse, _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), **kw,
        )  # fmt: skip


# ------------------------------------------------------------- 5. resume and copies of the run


@pytest.mark.parametrize(
    "mode",
    [
        "reverse",
        "forward",
    ],
)
def test_a_run_with_alpha_in_the_model_resumes_and_copies_bit_exactly(mode: str) -> None:
    """(reverse mode passes; pins that the places found in the model's list are those of the
    loaded / copied run) ``state_dict`` into freshly built objects, and ``copy.deepcopy`` of the
    hyperoptimiser, go on exactly as the straight run, hypersteps included; forward mode
    moves alpha (its hypergradient is not 0)."""
    import copy

    tb, vb = _data()

    def go(hopt: hg.HyperOptimizer, sched: str) -> None:
        for c in sched:
            if c == "s":
                hopt.step(tb)
            else:
                hopt.hyper_step(train_batch=tb, val_batch=vb)

    m1, h1, o1 = _build(outer_lr=5.0, steps=3, mode=mode)
    go(o1, "ssshsshsssh")
    m2, h2, o2 = _build(outer_lr=5.0, steps=3, mode=mode)
    go(o2, "ssshssh")
    m3, h3, o3 = _build(outer_lr=5.0, steps=3, mode=mode)
    o3.load_state_dict(o2.state_dict())
    o4 = copy.deepcopy(o2)
    go(o3, "sssh")
    go(o4, "sssh")
    assert not torch.equal(h1[0].detach(), torch.tensor(ALPHA0, dtype=DT))
    for hopt in (o3, o4):
        assert torch.equal(hopt.hparams[0].detach(), h1[0].detach())
        assert hopt.model.arch[0] is hopt.hparams[0]
        for a, b in zip(m1.parameters(), hopt.model.parameters(), strict=True):
            assert torch.equal(a.detach(), b.detach())


# ------------------------------------------ 6. trained weights the model reads from a plain list


class _Tied(nn.Module):
    """An autoencoder-like net whose decoder reads the encoder's weight from a plain list (a tie
    kept out of the registered parameters, so that it is not listed twice)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 4).to(DT)
        self.tied = [self.enc.weight]

    def forward(self, x: Tensor) -> Tensor:
        return (torch.tanh(self.enc(x)) @ self.tied[0]).sum(1)


def _tied_by_hand(w: Tensor, b: Tensor, x: Tensor) -> Tensor:
    return (torch.tanh(x @ w.T + b) @ w).sum(1)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_weight_the_model_reads_from_a_plain_list_is_replayed(mode: str) -> None:
    """The replay's check (first hyperstep, every 16th, and not after the hyperparameters moved)
    warns at the first hyperstep only; the second hypergradient here was silently off."""
    tb, vb = _data()
    lr = 0.1

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h[0] * (m.enc.weight**2).sum()

    hp = nn.ParameterList([nn.Parameter(torch.tensor(0.1, dtype=DT))])
    model = _Tied()
    hopt = hg.Unrolled(
        model, hp, train, _mse, steps=2, mode=mode,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0),
    )  # fmt: skip
    history = []
    for c in "sshss":
        if c == "s":
            history.append(_weights(model))
            hopt.step(tb)
        else:
            with warnings.catch_warnings(record=True):  # (a ReplayWarning before the fix)
                warnings.simplefilter("always")
                hopt.hyper_step(train_batch=tb, val_batch=vb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)  # (no warning: silently off)
    lam = hp[0].detach().clone().requires_grad_(True)
    w, b = (t.clone().requires_grad_(True) for t in history[-2])
    for _ in range(2):
        loss = ((_tied_by_hand(w, b, tb[0]) - tb[1]) ** 2).mean() + lam * (w**2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - lr * gw, b - lr * gb
    ref = torch.autograd.grad(((_tied_by_hand(w, b, vb[0]) - vb[1]) ** 2).mean(), lam)[0]
    assert ref.abs() > 1e-3
    torch.testing.assert_close(grads[0], ref, rtol=1e-9, atol=1e-13)


# ------------------------------------ 7. a hyperparameter the loss reads through its closure


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_hyperparameter_read_through_the_losses_closure_is_refused_by_name(mode: str) -> None:
    """``log_lam = nn.Parameter(...)``, ``hparams = nn.ParameterList([log_lam])``, and a training
    loss that reads ``log_lam`` itself (the habit of scripts that build the tensor first). The
    replay substitutes other values into ``hparams`` (the values earlier steps were taken with,
    forward mode's tangents), which the closure does not see: forward mode's hypergradient was 0
    (a DisconnectedWarning naming none of this); reverse mode, once steps before the window were
    re-run after a hyperstep, 7% off without a word. Now refused by name, before anything moves;
    the hyperstep before that, whose window needs no earlier step, is right."""
    tb, vb = _data()
    log_lam = nn.Parameter(torch.tensor(-2.0, dtype=DT))
    hp = nn.ParameterList([log_lam])

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + log_lam.exp() * (m.enc.weight**2).sum()  # (log_lam, not h[0])

    model = _Tied()
    model.tied = [model.enc.weight.detach().clone()]  # (a constant decoder here)
    hopt = hg.Unrolled(
        model, hp, train, _mse, steps=3, mode=mode,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=50.0),
    )  # fmt: skip
    for _ in range(3):
        hopt.step(tb)
    if mode == "reverse":
        hopt.hyper_step(train_batch=tb, val_batch=vb)
        hopt.step(tb)
        hopt.step(tb)
    before = log_lam.detach().clone()
    with pytest.raises(ValueError, match=r"train_loss reads the hyperparameter\(s\) \['0'\] from elsewhere"):
        hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert torch.equal(log_lam.detach(), before)


# ------------------------------- 8. a learned augmentation network the model holds by reference


class _Augmented(nn.Module):
    """A head trained on inputs augmented by a learned network (the hyperparameters) in training
    mode only; the network is held in a plain list, so it is no submodule of the model."""

    def __init__(self, aug: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 1).to(DT)
        self.aug = [aug]

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            x = x + 0.5 * torch.tanh(self.aug[0](x))
        return self.head(x).squeeze(1)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_an_augmentation_network_held_by_the_model_matches_plain_autograd(mode: str) -> None:
    """(passes; new: the hyperparameter module reached through the model, not the loss, in both
    modes; its parameters' slots are the module's own, so substituted) Unrolled through 2 real
    SGD steps, the validation loss in eval mode (no augmentation): every entry of the augmentation
    network's hypergradient equals plain autograd through the same steps."""
    tb, vb = _data()
    torch.manual_seed(3)
    aug = nn.Linear(3, 3).to(DT)
    model = _Augmented(aug)

    def val(m: nn.Module, h: Any, b: Any) -> Tensor:
        m.eval()
        try:
            return _mse(m, h, b)
        finally:
            m.train()

    hopt = hg.Unrolled(
        model, aug, _mse, val, steps=2, mode=mode,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        outer_optimizer=torch.optim.SGD(aug.parameters(), lr=0.0),
    )  # fmt: skip
    start = _weights(model)
    for _ in range(2):
        hopt.step(tb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    a_w, a_b = (p.detach().clone().requires_grad_(True) for p in aug.parameters())
    w, b = (t.clone().requires_grad_(True) for t in start)
    for _ in range(2):
        x = tb[0] + 0.5 * torch.tanh(tb[0] @ a_w.T + a_b)
        loss = ((x @ w.T + b).squeeze(1) - tb[1]).pow(2).mean()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - LR * gw, b - LR * gb
    ref = torch.autograd.grad(((vb[0] @ w.T + b).squeeze(1) - vb[1]).pow(2).mean(), (a_w, a_b))
    assert min(float(r.abs().max()) for r in ref) > 1e-4
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-13)


# ------------------------- 9. a WeightDecay container the model reads too (the penalty fast path)


class _Scaled(nn.Module):
    """An MLP whose hidden layer is scaled by 1 + sum(decays of layer 0): the WeightDecay
    container, held in a plain list, is read by the model as well as by the loss's penalty."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 4).to(DT), nn.Linear(4, 1).to(DT)
        self.wd: list[Any] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)) * (1 + self.wd[0].raw[0].exp().sum())).squeeze(1)


@pytest.mark.parametrize("method", ["identity", "reverse", "forward"])
def test_a_weight_decay_the_model_reads_too_keeps_the_penalty_fast_path_exact(method: str) -> None:
    """(passes; new) WeightDecay's penalty takes a fast path (its second derivatives added
    analytically, Implicit; its graph added by hand, Unrolled). A decay also read by the model
    must keep its other path: Implicit + Identity against its closed form
    d_l L_V - d_l (d_w L_T . d_w L_V), Unrolled through 2 steps against plain autograd."""
    tb, vb = _data()
    model = _Scaled()
    wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    model.wd = [wd]

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h.penalty(m)

    kw: dict[str, Any] = {"solver": hg.Identity()} if method == "identity" else {"steps": 2, "mode": method}
    cls: Any = hg.Implicit if method == "identity" else hg.Unrolled
    hopt = cls(
        model, wd, train, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(wd.parameters(), lr=0.0), **kw,
    )  # fmt: skip
    start = _weights(model)
    for _ in range(2):
        hopt.step(tb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    raws = [r.detach().clone().requires_grad_(True) for r in wd.parameters()]

    def f(ws: list[Tensor], x: Tensor) -> Tensor:
        h = torch.tanh(x @ ws[0].T + ws[1]) * (1 + raws[0].exp().sum())
        return (h @ ws[2].T + ws[3]).squeeze(1)

    def lt(ws: list[Tensor]) -> Tensor:
        pen = raws[0].exp() * sum((w**2).sum() for w in ws[:2]) + raws[1].exp() * sum(
            (w**2).sum() for w in ws[2:]
        )
        return ((f(ws, tb[0]) - tb[1]) ** 2).mean() + 0.5 * pen

    if method == "identity":
        ws = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        lv = ((f(ws, vb[0]) - vb[1]) ** 2).mean()
        gv = torch.autograd.grad(lv, ws, retain_graph=True)
        gt = torch.autograd.grad(lt(ws), ws, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(gt, gv, strict=True))
        direct = torch.autograd.grad(lv, raws, allow_unused=True)  # (layer 1's decay: no direct path)
        mixed = torch.autograd.grad(dot, raws)
        ref = [b.neg() if a is None else a - b for a, b in zip(direct, mixed, strict=True)]
    else:
        ws = [t.clone().requires_grad_(True) for t in start]
        for _ in range(2):
            ws = [
                w - 0.1 * g
                for w, g in zip(ws, torch.autograd.grad(lt(ws), ws, create_graph=True), strict=True)
            ]
        ref = list(torch.autograd.grad(((f(ws, vb[0]) - vb[1]) ** 2).mean(), raws))
    for g, r in zip(grads, ref, strict=True):
        assert r.abs().max() > 1e-4
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-13)


# ---------------------- 10. a hyperparameter a parametrisation of the model holds (forward mode)


class _Gain(nn.Module):
    """A learned per-row gain on a layer's weight, registered with ``torch.nn.utils.parametrize``;
    the gain (the hyperparameter) is held in a plain list, so it is no parameter of the model."""

    def __init__(self, t: Tensor) -> None:
        super().__init__()
        self.t = [t]

    def forward(self, w: Tensor) -> Tensor:
        return w * nn.functional.softplus(self.t[0])[:, None]


def test_forward_mode_through_a_parametrisation_holding_the_hyperparameter() -> None:
    """The same cause as 1., reached through ``parametrize.register_parametrization``: every
    parametrised forward reads the gain from the parametrisation's list."""
    from torch.nn.utils import parametrize

    tb, vb = _data()
    grads = []
    for mode in ("reverse", "forward"):
        hp = nn.ParameterList([nn.Parameter(torch.tensor([0.3, -0.2], dtype=DT))])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2).to(DT), nn.Tanh(), nn.Linear(2, 1).to(DT), nn.Flatten(0))
        parametrize.register_parametrization(model[0], "weight", _Gain(hp[0]))
        hopt = hg.Unrolled(
            model, hp, _mse, _mse, steps=2, mode=mode,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        )  # fmt: skip
        start = _weights(model)  # (original0 = the raw weight, then the biases and the head)
        for _ in range(2):
            hopt.step(tb)
        grads.append(hopt.hypergradient(train_batch=tb, val_batch=vb)[0][0])
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.bias", "0.parametrizations.weight.original", "2.weight", "2.bias"]
    t = hp[0].detach().clone().requires_grad_(True)
    b0, w0, w2, b2 = (x.clone().requires_grad_(True) for x in start)

    def f(ws: tuple[Tensor, ...], x: Tensor) -> Tensor:
        b0, w0, w2, b2 = ws
        return (torch.tanh(x @ (w0 * nn.functional.softplus(t)[:, None]).T + b0) @ w2.T + b2).squeeze(1)

    ws: tuple[Tensor, ...] = (b0, w0, w2, b2)
    for _ in range(2):
        gs = torch.autograd.grad(((f(ws, tb[0]) - tb[1]) ** 2).mean(), ws, create_graph=True)
        ws = tuple(w - LR * g for w, g in zip(ws, gs, strict=True))
    ref = torch.autograd.grad(((f(ws, vb[0]) - vb[1]) ** 2).mean(), t)[0]
    assert ref.abs().max() > 1e-3
    for g in grads:  # reverse mode, then forward mode
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-13)
