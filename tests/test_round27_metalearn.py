"""Round 27 (helper "metalearn"): research scripts from the meta-learning / hypergradient
literature, written as a user would from the README, each compared in float64 with an
independent reference written out here (plain autograd through the real steps, or central
differences of the same script in plain ``torch.optim``).

New here (no earlier test combined these):

* Meta-SGD (a learned initialisation phi + delta and one learned rate per tensor), each task
  from a fresh optimiser state (``inner.state.clear()``), for every optimiser the replay
  supports: the replay creates each optimiser's state afresh with the learned rate where torch
  reads it then (Rprop's step sizes, ASGD's eta, Adagrad's accumulator and decayed rate, NAdam's
  mu product), and both the rates' and phi's hypergradients equal central differences of fresh
  ``torch.optim`` runs (earlier: cleared episodes for SGD-momentum and Adam only).
* Learning to reweight (Ren et al. 2018) with SGD momentum, the per-example weights eps reset to
  0 through ``.data`` (no version counter moves) and the re-weighted update taken through
  ``hopt.step`` as a second real step: the lookahead hypergradient equals the written-out
  derivative through that momentum step at every batch, and the trained weights equal the
  written-out run bit for bit (earlier: plain SGD, the real step outside ``step()``).
* Dataset distillation with a learned rate, re-initialised weights and a window resized between
  episodes (``hopt.steps = K``), truncated to the last 2 of 4 steps too, in reverse, checkpointed
  and forward mode: equal to the truncated unroll written out.
* Episodes that start from a *new* head module (``model.head = nn.Linear(...)``) or weights
  loaded with ``load_state_dict(..., assign=True)``, with a fresh inner optimiser assigned to
  ``hopt.inner_optimizer``: equal to the unroll from the new weights.
* Per-example soft labels (an ``(n, C)`` ``Hparam``) and per-example smoothing
  (``ExampleWeights``) read through a shuffled ``WithIndex`` loader, probability targets with
  ``label_smoothing``: equal to the unroll written out.
* Hyper-representation with the head's only regulariser the inner SGD's coupled
  ``weight_decay`` (no penalty in the loss), ``Implicit`` + CG: equal to the dense IFT written out
  here with ``H + delta I`` (earlier: a ridge head with the penalty in the loss).

Bugs fixed with these tests (each failed before its fix):

1. ``hypergradient()`` called without the batch it needs (``hopt.hypergradient(query)``, the batch
   taken as ``train_batch``) raised "Unrolled.hyper_step needs val_batch=... pass
   hyper_step(val_batch=batch)": in the README's meta-batch recipe, following that advice steps
   the outer optimiser once per task instead of once per meta-batch (fix: the
   errors name the call that was made).
2. A loss reading a hyperparameter from a closure (``images = distilled.raw`` taken once, then
   ``F.cross_entropy(m(images), labels)``) instead of from its ``hparams`` argument:
   ``Unrolled(mode="forward")`` gave it no tangent (a distillation with a prior on the images in
   ``val_loss``: only the prior's gradient, 98% off, no warning); reverse mode with hypersteps
   more often than every K steps re-ran the steps before the window with the current values
   instead of those they were taken with (0.5% off here, silently). The same root cause was found
   independently in tests/test_round27_inmodel.py; its fix (such a read
   refused by name) turns both tests here green.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch.optim keeps scalar state (ASGD's eta, Adam's step) in the default dtype: float64 for
    central differences that a float32 eta would round away."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _cls_batch(g: torch.Generator, n: int, n_in: int = 3, n_cls: int = 2) -> tuple[Tensor, Tensor]:
    return torch.randn(n, n_in, generator=g, dtype=DT), torch.randint(0, n_cls, (n,), generator=g)


# ------------------------------------------- 1. Meta-SGD with a fresh optimiser state per task


_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.6, "dampening": 0.2}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.6, "nesterov": True}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.05, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.0}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.02, "centered": True, "momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1, "initial_accumulator_value": 0.1}),
    "adamax": (torch.optim.Adamax, {"lr": 0.05}),
    "nadam": (torch.optim.NAdam, {"lr": 0.05}),
    "radam": (torch.optim.RAdam, {"lr": 0.05}),
    "adadelta": (torch.optim.Adadelta, {"lr": 0.5}),
    # (ASGD's lambd, like a weight_decay, would shrink delta, not phi + delta: README)
    "asgd": (torch.optim.ASGD, {"lr": 0.1, "t0": 1.0, "lambd": 0.0}),
    "rprop": (torch.optim.Rprop, {"lr": 0.05}),
}


def _offset_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
    params = {n: f + p for (n, p), f in zip(m.named_parameters(), h.phi, strict=True)}
    return F.cross_entropy(torch.func.functional_call(m, params, (b[0],)), b[1])


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_meta_sgd_tasks_from_a_fresh_state_match_fd_for_every_replayed_optimizer(name: str) -> None:
    """Two tasks of 3 steps, each from delta = 0, ``inner.state.clear()`` and ``start_episode()``;
    the second task's hypergradient in the per-tensor (log) rates and in phi equals central
    differences of a fresh torch.optim run from phi with those rates."""
    cls, kw = _OPTIMIZERS[name]
    n_steps = 3
    g = torch.Generator().manual_seed(0)
    tasks = [([_cls_batch(g, 5) for _ in range(n_steps)], _cls_batch(g, 7)) for _ in range(2)]
    net = _mlp()
    inner = cls([{"params": [p]} for p in net.parameters()], **kw)
    meta = nn.Module()
    meta.phi = nn.ParameterList([nn.Parameter(torch.randn_like(p) * 0.5) for p in net.parameters()])
    meta.lr = hg.hparams.LearningRate(inner)
    hopt = hg.Unrolled(
        net,
        meta,
        _offset_loss,
        _offset_loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(meta.parameters(), lr=0.0),
        steps=n_steps,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no ReplayWarning, no DisconnectedWarning)
        for support, _ in tasks:
            with torch.no_grad():
                for p in net.parameters():
                    p.zero_()
            inner.state.clear()
            hopt.start_episode()
            for b in support:
                hopt.step(b)
        grads, info = hopt.hypergradient(val_batch=tasks[1][1])
    assert info.unrolled_steps == n_steps

    others = {k: v for k, v in kw.items() if k != "lr"}

    def real(lrs: list[float], phi: list[Tensor]) -> float:
        m = copy.deepcopy(net)
        with torch.no_grad():
            for p, f in zip(m.parameters(), phi, strict=True):
                p.copy_(f)
        with _default_dtype(DT):
            o = cls([{"params": [p], "lr": lr} for p, lr in zip(m.parameters(), lrs, strict=True)], **others)
            for b in tasks[1][0]:
                o.zero_grad()
                F.cross_entropy(m(b[0]), b[1]).backward()
                o.step()
        with torch.no_grad():
            return float(F.cross_entropy(m(tasks[1][1][0]), tasks[1][1][1]))

    lrs = meta.lr.value.tolist()
    phi = [f.detach().clone() for f in meta.phi]
    h = 1e-6
    for i in range(len(lrs)):  # d / d log(lr_i): relative steps
        up, down = list(lrs), list(lrs)
        up[i] *= 1 + h
        down[i] *= 1 - h
        fd = (real(up, phi) - real(down, phi)) / (2 * h)
        assert float(grads[-1][i]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, i)
    for k, idx in ((0, (1, 2)), (3, (0,))):  # a weight entry and a bias entry of phi
        plus = [f.clone() for f in phi]
        minus = [f.clone() for f in phi]
        plus[k][idx] += h
        minus[k][idx] -= h
        fd = (real(lrs, plus) - real(lrs, minus)) / (2 * h)
        assert float(grads[k][idx]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, k)


# ------------------------------- 2. learning to reweight with momentum, eps written through .data


def test_learning_to_reweight_with_momentum_and_data_writes_is_the_written_out_lookahead() -> None:
    """Ren et al.'s loop with SGD momentum 0.9: eps = 0 written through ``.data``, a lookahead
    step through ``hopt.step`` (which moves the weights by the momentum term), the hypergradient
    of ``Unrolled(steps=1)``, then the clamped, normalised weights written through ``.data`` and
    the re-weighted step through ``hopt.step``. Each hypergradient equals the derivative written
    out through the lookahead momentum step (the buffer of the reference run), and the weights
    equal the reference run bit for bit."""
    model = _mlp(1)
    ref = copy.deepcopy(model)
    names = [n for n, _ in ref.named_parameters()]
    b_size, lr, mom = 6, 0.1, 0.9
    eps = hg.hparams.Hparam(torch.zeros(b_size, dtype=DT), "real")

    def weighted(m: nn.Module, h: Any, b: Any) -> Tensor:
        return (h() * F.cross_entropy(m(b[0]), b[1], reduction="none")).sum()

    def ce(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    hopt = hg.Unrolled(
        model,
        eps,
        weighted,
        ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=mom),
        outer_optimizer=torch.optim.SGD(eps.parameters(), lr=0.0),
        steps=1,
    )
    ropt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=mom)
    g = torch.Generator().manual_seed(2)
    val = _cls_batch(g, 10)
    for it in range(4):
        batch = _cls_batch(g, b_size)
        eps.raw.data.zero_()
        hopt.step(batch)
        grads, _ = hopt.hypergradient(val_batch=val)
        # the reference lookahead: one momentum step from the reference weights and buffers
        e = torch.zeros(b_size, dtype=DT, requires_grad=True)
        ps = list(ref.parameters())
        gs = torch.autograd.grad(
            (e * F.cross_entropy(ref(batch[0]), batch[1], reduction="none")).sum(), ps, create_graph=True
        )
        new = []
        for p, gp in zip(ps, gs, strict=True):
            buf = ropt.state.get(p, {}).get("momentum_buffer")
            new.append(p - lr * (gp if buf is None else mom * buf + gp))
        out = torch.func.functional_call(ref, dict(zip(names, new, strict=True)), (val[0],))
        want = torch.autograd.grad(F.cross_entropy(out, val[1]), e)[0]
        torch.testing.assert_close(grads[0], want, rtol=1e-10, atol=1e-14, msg=f"batch {it}")
        assert float(want.abs().max()) > 1e-3
        w = torch.clamp(-grads[0], min=0)
        w = w / w.sum() if float(w.sum()) > 0 else w
        eps.raw.data.copy_(w)
        hopt.step(batch)
        for weights in (torch.zeros(b_size, dtype=DT), w):
            ropt.zero_grad()
            (weights * F.cross_entropy(ref(batch[0]), batch[1], reduction="none")).sum().backward()
            ropt.step()
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b)


# --------------------- 3. distillation, learned rate, window resized between episodes, truncated


class _Distilled(nn.Module):
    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT))
        self.lr = hg.hparams.LearningRate(inner)


_LABELS = torch.arange(3)


def _distilled_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(h.x), _LABELS)


def _real_ce(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _truncated_unroll(
    model: nn.Module, w0: list[Tensor], x: Tensor, lr: Tensor, n_steps: int, window: int, val: Any, mom: float
) -> tuple[Tensor, Tensor]:
    """d L_V / d(x, log lr) through the last ``window`` of ``n_steps`` SGD-momentum steps from
    ``w0`` on the distilled images, the steps before the window constants."""
    names = [n for n, _ in model.named_parameters()]
    x = x.detach().clone().requires_grad_()
    lr = lr.detach().clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in w0]
    bufs: list[Tensor | None] = [None] * len(ws)
    for t in range(1, n_steps + 1):
        out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x,))
        gs = torch.autograd.grad(F.cross_entropy(out, _LABELS), ws, create_graph=True)
        bufs = [g if b is None else mom * b + g for b, g in zip(bufs, gs, strict=True)]
        ws = [w - lr * b for w, b in zip(ws, bufs, strict=True)]  # type: ignore[operator]
        if t == n_steps - window:
            ws = [w.detach().requires_grad_() for w in ws]
            bufs = [b.detach() for b in bufs]  # type: ignore[union-attr]
    out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (val[0],))
    gx, glr = torch.autograd.grad(F.cross_entropy(out, val[1]), [x, lr])
    return gx, glr * lr.detach()


@pytest.mark.parametrize("how", ["reverse", "checkpoint", "forward"])
def test_distillation_with_a_window_resized_between_episodes_matches_the_truncated_unroll(how: str) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    mom = 0.5
    inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=mom)
    hp = _Distilled(inner)
    hopt = hg.Unrolled(
        model,
        hp,
        _distilled_loss,
        _real_ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        steps=3,
        mode="forward" if how == "forward" else "reverse",
        checkpoint=how == "checkpoint",
    )
    val = _cls_batch(torch.Generator().manual_seed(5), 12, n_in=4, n_cls=3)
    # (K during the episode, steps taken, K at the hypergradient)
    episodes = [(3, 3, 3), (5, 5, 5), (2, 4, 2), (4, 4, 2)]
    for k, n_steps, window in (
        episodes[2:] if how == "forward" else episodes
    ):  # (forward: one replay per entry)
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        inner.state.clear()
        hopt.start_episode()
        hopt.steps = k
        w0 = [p.detach().clone() for p in model.parameters()]
        x0, lr0 = hp.x.detach().clone(), hp.lr().detach().clone()[0]
        for _ in range(n_steps):
            hopt.step(())
        hopt.steps = window
        info = hopt.hyper_step(val_batch=val)  # (the hypergradient left in .grad)
        assert info.unrolled_steps == window
        gx, glr = _truncated_unroll(model, w0, x0, lr0, n_steps, window, val, mom)
        msg = f"{how} {k, n_steps, window}"
        torch.testing.assert_close(hp.x.grad, gx, rtol=1e-9, atol=1e-13, msg=msg)
        lr_grad = hp.lr.raw.grad
        assert lr_grad is not None
        torch.testing.assert_close(lr_grad[0], glr, rtol=1e-9, atol=1e-13, msg=msg)


# ----------------------------------------- 4. episodes from a new head module / assigned weights


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5).to(DT)
        self.head = nn.Linear(5, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("how", ["new_head", "assign"])
def test_episodes_from_a_new_head_or_assigned_weights_with_a_new_optimizer_match_the_unroll(how: str) -> None:
    torch.manual_seed(6)
    model = _Net()
    sgd: dict[str, Any] = {"lr": 0.3, "momentum": 0.5}
    hp = hg.hparams.Hparam(torch.randn(3, 4, dtype=DT), "real")
    hopt = hg.Unrolled(
        model,
        hp,
        lambda m, h, b: F.cross_entropy(m(h()), _LABELS),
        _real_ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), **sgd),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        steps=3,
    )
    val = _cls_batch(torch.Generator().manual_seed(7), 12, n_in=4, n_cls=3)
    for ep in range(3):
        if ep:
            if how == "new_head":
                model.head = nn.Linear(5, 3).to(DT)
            else:
                model.load_state_dict(_Net().state_dict(), assign=True)
            hopt.inner_optimizer = torch.optim.SGD(model.parameters(), **sgd)
            hopt.start_episode()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        x0 = hp.raw.detach().clone()
        for _ in range(3):
            hopt.step(())
        grads, info = hopt.hypergradient(val_batch=val)
        assert info.unrolled_steps == 3
        x = x0.clone().requires_grad_()
        names = list(start)
        ws = [start[n].clone().requires_grad_() for n in names]
        bufs: list[Tensor | None] = [None] * len(ws)
        for _ in range(3):
            out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x,))
            gs = torch.autograd.grad(F.cross_entropy(out, _LABELS), ws, create_graph=True)
            bufs = [g if b is None else 0.5 * b + g for b, g in zip(bufs, gs, strict=True)]
            ws = [w - 0.3 * b for w, b in zip(ws, bufs, strict=True)]  # type: ignore[operator]
        out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (val[0],))
        want = torch.autograd.grad(F.cross_entropy(out, val[1]), x)[0]
        torch.testing.assert_close(grads[0], want, rtol=1e-9, atol=1e-13, msg=f"{how} episode {ep}")
        hopt.hyper_step(val_batch=val)


# ------------------------- 5. hyper-representation, the head regularised by SGD's weight_decay only


def test_hyper_representation_with_the_heads_coupled_weight_decay_is_the_dense_ift() -> None:
    torch.manual_seed(8)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).to(DT)
    head = nn.Linear(5, 3).to(DT)
    decay = 0.05
    inner = torch.optim.SGD(head.parameters(), lr=1.0, momentum=0.5, weight_decay=decay)

    def loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(h(b[0])), b[1])

    hopt = hg.Implicit(
        head,
        backbone,
        loss,
        loss,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(backbone.parameters(), lr=0.0),
        solver=hg.CG(maxiter=100, tol=1e-13),
    )
    g = torch.Generator().manual_seed(9)
    tr, va = _cls_batch(g, 20, n_in=4, n_cls=3), _cls_batch(g, 20, n_in=4, n_cls=3)
    for _ in range(300):
        hopt.step(tr)
    grads, info = hopt.hypergradient(train_batch=tr, val_batch=va)
    assert info.solver_status == "converged"

    hw = [p.detach().clone() for p in head.parameters()]
    bw = [p.detach().clone() for p in backbone.parameters()]
    hn = [n for n, _ in head.named_parameters()]
    bn = [n for n, _ in backbone.named_parameters()]

    def split(v: Tensor, like: list[Tensor]) -> list[Tensor]:
        out, i = [], 0
        for t in like:
            out.append(v[i : i + t.numel()].reshape(t.shape))
            i += t.numel()
        return out

    def f(batch: Any, hv: Tensor, bv: Tensor) -> Tensor:
        feats = torch.func.functional_call(backbone, dict(zip(bn, split(bv, bw), strict=True)), (batch[0],))
        out = torch.func.functional_call(head, dict(zip(hn, split(hv, hw), strict=True)), (feats,))
        return F.cross_entropy(out, batch[1])

    h0, b0 = torch.cat([t.reshape(-1) for t in hw]), torch.cat([t.reshape(-1) for t in bw])
    gt = torch.func.grad(f, argnums=1)
    assert float((gt(tr, h0, b0) + decay * h0).abs().max()) < 1e-9  # at the inner optimum
    hess = torch.func.jacfwd(gt, argnums=1)(tr, h0, b0) + decay * torch.eye(len(h0), dtype=DT)
    mixed = torch.func.jacfwd(gt, argnums=2)(tr, h0, b0)  # (P_head, P_backbone)
    want = torch.func.grad(f, argnums=2)(va, h0, b0) - mixed.T @ torch.linalg.solve(
        hess, torch.func.grad(f, argnums=1)(va, h0, b0)
    )
    got = torch.cat([t.reshape(-1) for t in grads])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


# ---------------- 5b. learned per-example soft labels and smoothing over a shuffled WithIndex loader


def test_per_example_soft_labels_and_smoothing_through_a_shuffled_loader_match_the_unroll() -> None:
    """Per-example label logits (an ``(n, C)`` ``Hparam``) and per-example smoothing
    (``ExampleWeights``) read by the batch's indices from ``DataLoader(WithIndex(...),
    shuffle=True)``, probability targets with torch's ``label_smoothing`` on top, SGD momentum
    through the 3 batches of an epoch: both hypergradients equal the written-out unroll over the
    same shuffled batches (new: soft-label targets and index-read hyperparameters of two shapes
    together)."""
    n, n_cls = 12, 3
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, n_cls, (n,), generator=g)
    loader = torch.utils.data.DataLoader(
        hg.data.WithIndex(torch.utils.data.TensorDataset(x, y)),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    val = _cls_batch(g, 10, n_in=4, n_cls=n_cls)
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, n_cls)).to(DT)
    names = [k for k, _ in model.named_parameters()]
    hp = nn.Module()
    hp.soft = hg.hparams.Hparam(torch.zeros(n, n_cls, dtype=DT), "real")
    hp.eps = hg.hparams.ExampleWeights(n, init=0.1, dtype=DT)

    def targets(yb: Tensor, soft: Tensor, eps: Tensor) -> Tensor:
        t = (F.one_hot(yb, n_cls).to(DT) + soft).softmax(-1)
        return (1 - eps[:, None]) * t + eps[:, None] / n_cls

    def train_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        xb, yb, idx = b
        return F.cross_entropy(m(xb), targets(yb, h.soft()[idx], h.eps(idx)), label_smoothing=0.05)

    hopt = hg.Unrolled(model, hp, train_loss, _real_ce,
                       inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5),
                       outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3)  # fmt: skip
    start = [p.detach().clone() for p in model.parameters()]
    batches = list(loader)
    for b in batches:
        hopt.step(b)
    grads, info = hopt.hypergradient(val_batch=val)
    assert info.unrolled_steps == 3
    soft = hp.soft.raw.detach().clone().requires_grad_()
    raw = hp.eps.raw.detach().clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in start]
    bufs: list[Tensor | None] = [None] * len(ws)
    for xb, yb, idx in batches:
        out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (xb,))
        loss = F.cross_entropy(out, targets(yb, soft[idx], torch.sigmoid(raw[idx])), label_smoothing=0.05)
        gs = torch.autograd.grad(loss, ws, create_graph=True)
        bufs = [gg if bb is None else 0.5 * bb + gg for bb, gg in zip(bufs, gs, strict=True)]
        ws = [w - 0.3 * bb for w, bb in zip(ws, bufs, strict=True)]  # type: ignore[operator]
    out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (val[0],))
    want = torch.autograd.grad(F.cross_entropy(out, val[1]), [soft, raw])
    for got, ref in zip(grads, want, strict=True):
        assert float(ref.abs().max()) > 1e-4
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


# ----------------------- 6. bug: hypergradient()'s batch errors told the user to call hyper_step


@pytest.mark.parametrize("family", ["unrolled", "implicit"])
def test_a_missing_batch_in_hypergradient_names_hypergradient_not_hyper_step(family: str) -> None:
    """The meta-batch recipe (README) sums ``hopt.hypergradient(val_batch=query)[0]`` over tasks
    and steps the outer optimiser once. Written ``hopt.hypergradient(query)`` (the batch taken as
    ``train_batch``), the error said "pass hyper_step(val_batch=batch)": following it steps the
    outer optimiser once per task instead of once per meta-batch, silently another algorithm.
    The error names the call made, and its advice is that call with ``val_batch=``."""
    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if family == "unrolled":
        hp: nn.Module = hg.hparams.LearningRate(inner)
        hopt: hg.HyperOptimizer = hg.Unrolled(
            model,
            hp,
            _real_ce,
            _real_ce,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )
    else:
        hp = hg.hparams.WeightDecay(model, per="layer")

        def penalised(m: nn.Module, h: Any, b: Any) -> Tensor:
            return _real_ce(m, h, b) + h.penalty(m)

        hopt = hg.Implicit(
            model,
            hp,
            penalised,
            _real_ce,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            solver=hg.CG(maxiter=3),
        )
    batch = _cls_batch(torch.Generator().manual_seed(0), 5)
    hopt.step(batch)
    before = [p.detach().clone() for p in hp.parameters()]
    if family == "unrolled":
        with pytest.raises(
            ValueError,
            match=r"hypergradient needs val_batch=.*pass "
            r"hypergradient\(val_batch=batch\)",
        ) as err:
            hopt.hypergradient(batch)
    else:
        with pytest.raises(ValueError, match=r"Implicit\.hypergradient needs train_batch=") as err:
            hopt.hypergradient(val_batch=batch)
    assert "hyper_step" not in str(err.value)
    assert all(torch.equal(a, p) for a, p in zip(before, hp.parameters(), strict=True))


# ------------- 7. bug: forward mode and distilled images read from a closure, not the hparams argument


def test_forward_mode_follows_or_refuses_distilled_images_read_from_a_closure() -> None:
    """Dataset distillation as scripts write it: ``images = distilled.raw`` taken once, the
    training loss ``F.cross_entropy(m(images), labels)`` reading it from its closure, and a small
    prior on the images through the ``hparams`` argument in ``val_loss``. Reverse mode follows the
    closure (its replay runs on the real tensors) and equals the unroll written out here; forward
    mode hands its tangents to the ``hparams`` argument only, so it returned the prior's
    gradient alone (98% off), with no warning (the prior's path marks the tensor as reached). It
    must follow the read or refuse it by name."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    start = [p.detach().clone() for p in model.parameters()]
    distilled = hg.hparams.Hparam(torch.randn(3, 4, dtype=DT), "real")
    images = distilled.raw  # captured once

    def train_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(images), _LABELS)

    def val_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + 1e-3 * (h() ** 2).sum()

    val = _cls_batch(torch.Generator().manual_seed(11), 12, n_in=4, n_cls=3)
    got = {}
    for mode in ("reverse", "forward"):
        with torch.no_grad():
            for p, w in zip(model.parameters(), start, strict=True):
                p.copy_(w)
        inner = torch.optim.SGD(model.parameters(), lr=0.2)
        hopt = hg.Unrolled(
            model,
            distilled,
            train_loss,
            val_loss,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(distilled.parameters(), lr=0.0),
            steps=3,
            mode=mode,
        )
        for _ in range(3):
            hopt.step(())
        if mode == "forward":
            try:
                got[mode] = hopt.hypergradient(val_batch=val)[0][0]
            except ValueError as error:  # refused: it must name the tensor and the way out
                assert "'raw'" in str(error) and "hparams argument" in str(error), str(error)
                return
        else:
            got[mode] = hopt.hypergradient(val_batch=val)[0][0]
    # the written-out unroll from the same start
    names = [n for n, _ in model.named_parameters()]
    x = distilled.raw.detach().clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in start]
    for _ in range(3):
        out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x,))
        gs = torch.autograd.grad(F.cross_entropy(out, _LABELS), ws, create_graph=True)
        ws = [w - 0.2 * g for w, g in zip(ws, gs, strict=True)]
    out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (val[0],))
    want = torch.autograd.grad(F.cross_entropy(out, val[1]) + 1e-3 * (x**2).sum(), x)[0]
    torch.testing.assert_close(got["reverse"], want, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(got["forward"], want, rtol=1e-9, atol=1e-13)


def test_hypersteps_every_step_with_images_read_from_a_closure_follow_or_refuse_it() -> None:
    """The same closure read in reverse mode, with a hyperstep after every step (K=3): a
    hyperstep re-runs the steps before its window with the values they were taken with, passed
    through the ``hparams`` argument; the closure read the current ones, so from the 5th
    hyperstep the window started from weights training never had (0.5-1% off here, growing with
    the outer step size), silently. The hypergradient must equal the written-out window from
    the real weights, or the read be refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    names = [n for n, _ in model.named_parameters()]
    distilled = hg.hparams.Hparam(torch.randn(3, 4, dtype=DT), "real")
    images = distilled.raw  # captured once

    def train_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(images), _LABELS)

    val = _cls_batch(torch.Generator().manual_seed(12), 12, n_in=4, n_cls=3)
    hopt = hg.Unrolled(
        model,
        distilled,
        train_loss,
        _real_ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        outer_optimizer=torch.optim.SGD(distilled.parameters(), lr=0.5),
        steps=3,
    )
    before = []
    for t in range(6):
        before.append([p.detach().clone() for p in model.parameters()])
        hopt.step(())
        x_now = distilled.raw.detach().clone()
        try:
            grads, _ = hopt.hypergradient(val_batch=val)
        except ValueError as error:  # refused: it must name the tensor and the way out
            assert "'raw'" in str(error) and "hparams argument" in str(error), str(error)
            return
        if t >= 2:  # the window: the last 3 real steps, from the real weights, at the current images
            x = x_now.requires_grad_()
            ws = [w.clone().requires_grad_() for w in before[t - 2]]
            for _ in range(3):
                out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (x,))
                gs = torch.autograd.grad(F.cross_entropy(out, _LABELS), ws, create_graph=True)
                ws = [w - 0.2 * g for w, g in zip(ws, gs, strict=True)]
            out = torch.func.functional_call(model, dict(zip(names, ws, strict=True)), (val[0],))
            want = torch.autograd.grad(F.cross_entropy(out, val[1]), x)[0]
            torch.testing.assert_close(grads[0], want, rtol=1e-9, atol=1e-13, msg=f"hyperstep {t}")
        hopt.hyper_step(val_batch=val)
