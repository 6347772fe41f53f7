"""Round 20 (hooks): module machinery a real model uses, through Unrolled (reverse, forward,
checkpointed) and Implicit: forward (pre-)hooks, parametrisations, buffers updated in forward,
modules that switch on ``self.training``, dropout replay, ``torch.utils.checkpoint``, attention's
fused fast path, affine-free norms. Ground truth is independent of the library: central
differences of the real training (plain ``torch.optim`` steps, float64), or a plain-autograd
implicit-function-theorem reference written here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1).to(DT) for t in ts])


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _penalised_mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)


def _mse_eval(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    was = m.training
    m.eval()
    try:
        return F.mse_loss(m(b[0]), b[1])
    finally:
        m.train(was)


def _data(
    shape: tuple[int, ...], out: int, n: int = 12
) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g, dtype=DT), torch.randn(n, out, generator=g, dtype=DT)
    xv, yv = torch.randn(6, *shape, generator=g, dtype=DT), torch.randn(6, out, generator=g, dtype=DT)
    return [(x[i::3], y[i::3]) for i in range(3)], (xv, yv)


def _unrolled_vs_real_training(
    make: Callable[[], nn.Module],
    batches: list[tuple[Tensor, Tensor]],
    val: tuple[Tensor, Tensor],
    val_loss: Callable[..., Tensor] = _mse_eval,
    eps: float = 1e-6,
    **kw: Any,
) -> tuple[Tensor, Tensor]:
    """(Unrolled's hypergradient through all the steps, central differences of the real run)."""

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = make().to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)
        return model, hp, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)

    model, hp, inner = build()
    hopt = hg.Unrolled(
        model, hp, _penalised_mse, val_loss, inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=len(batches), **kw,
    )  # fmt: skip
    torch.manual_seed(7)
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=val)[0])

    def run(k: int, s: float) -> float:
        model, hp, inner = build()
        with torch.no_grad():
            list(hp.parameters())[k].add_(s)
        torch.manual_seed(7)
        for b in batches:
            inner.zero_grad()
            _penalised_mse(model, hp, b).backward()
            inner.step()
        with torch.no_grad():
            return float(val_loss(model, hp, val))

    n = len(list(hp.parameters()))
    fd = torch.tensor([(run(k, eps) - run(k, -eps)) / (2 * eps) for k in range(n)], dtype=DT)
    return got, fd


# ----------------------------------------------------------------------------- attention fast path


class _Encoder(nn.Module):
    def __init__(self, attention_only: bool) -> None:
        super().__init__()
        self.attention_only = attention_only
        self.att: nn.Module
        if attention_only:
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        else:
            self.att = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.att(x, x, x, need_weights=False)[0] if self.attention_only else self.att(x)
        return self.out(h.mean(1))


@pytest.mark.parametrize("attention_only", [True, False])
def test_forward_mode_through_attention_in_eval_mode_matches_the_real_training(attention_only: bool) -> None:
    # New: forward mode's validation loss runs on dual tensors that do not require grad, so the
    # eval-mode attention / encoder layer took torch's fused kernel (no forward AD). Reverse mode
    # is covered by test_round19_models; checked here against central differences of the real run.
    batches, val = _data((3, 4), 2)
    got, fd = _unrolled_vs_real_training(lambda: _Encoder(attention_only), batches, val, mode="forward")
    assert _rel(got, fd) < 1e-6


# ----------------------------------------------------------------------------- train/eval modes


def _bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))


def _val_leaving_eval(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    m.eval()  # the usual validation idiom; the script calls model.train() before its next step
    return F.mse_loss(m(b[0]), b[1])


def _ift_reference(model: nn.Module, hp: nn.Module, train_batch: Any, val_batch: Any) -> Tensor:
    """dL_V/dλ = ∂_λ L_V − (∂²L_T/∂λ∂w) H⁻¹ ∂_w L_V by plain autograd and a dense solve, with the
    training loss in train mode (as step() runs it) and the validation loss in eval mode, both on
    copies of the current buffers."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    hname, raw = next(iter(hp.named_parameters()))
    lam = raw.detach().clone().requires_grad_(True)
    bufs = dict(model.named_buffers())

    def call(fn: Callable[..., Tensor], flat: Tensor, train: bool, batch: Any) -> Tensor:
        ws = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        state = {**ws, **{n: b.clone() for n, b in bufs.items()}}
        model.train(train)
        try:
            with torch.nn.utils.stateless._reparametrize_module(model, state), \
                    torch.nn.utils.stateless._reparametrize_module(hp, {hname: lam}):  # fmt: skip
                return fn(model, hp, batch)
        finally:
            model.train(True)

    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    w = w0.clone().requires_grad_(True)
    g = torch.autograd.grad(call(_penalised_mse, w, True, train_batch), w, create_graph=True)[0]
    hess = torch.stack([torch.autograd.grad(g[i], w, retain_graph=True)[0] for i in range(g.numel())])
    wv = w0.clone().requires_grad_(True)
    gw, gl = torch.autograd.grad(call(_mse_eval, wv, False, val_batch), [wv, lam], allow_unused=True)
    sol = torch.linalg.solve(hess, gw)
    mixed = torch.autograd.grad(g, lam, sol)[0]
    direct = torch.zeros_like(lam) if gl is None else gl
    return (direct - mixed).reshape(-1)


def test_implicit_training_loss_runs_in_the_mode_the_hyperstep_began_with() -> None:
    torch.manual_seed(0)
    model = _bn_mlp().to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT)
    hopt = hg.Implicit(
        model, hp, _penalised_mse, _val_leaving_eval,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), solver=hg.Direct(),
    )  # fmt: skip
    batches, val = _data((3,), 1)
    for b in batches:
        model.train()
        hopt.step(b)
    model.train()
    tb = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    got = _flat(hopt.hypergradient(train_batch=tb, val_batch=val)[0])
    model.train()
    want = _ift_reference(model, hp, tb, val)
    assert want.abs().min() > 1e-4
    assert _rel(got, want) < 1e-8


class _DropoutBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop, self.b = (
            nn.Linear(3, 5),
            nn.BatchNorm1d(5),
            nn.Dropout(0.3),
            nn.Linear(5, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.drop(torch.tanh(self.bn(self.a(x)))))


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_hyper_step_leaves_train_mode_and_the_next_steps_as_plain_training(method: str) -> None:
    batches, val = _data((3,), 1)

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _DropoutBN().to(DT)
        return (
            model,
            hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT),
            torch.optim.SGD(model.parameters(), lr=0.1),
        )

    model, hp, inner = build()
    kw: dict[str, Any] = {"solver": hg.CG(maxiter=5)} if method == "implicit" else {"steps": 2}
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(model, hp, _penalised_mse, _val_leaving_eval, inner_optimizer=inner,
               outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), **kw)  # fmt: skip
    ref, ref_hp, ref_inner = build()  # plain PyTorch: the same steps, no hyperstep
    torch.manual_seed(3)
    for i, b in enumerate(batches * 2):
        rng = torch.get_rng_state()
        hopt.step(b)
        if i == 1:  # (an outer learning rate of 0: the hyperparameters stay as they are)
            hopt.hyper_step(train_batch=b, val_batch=val)
        after = torch.get_rng_state()
        torch.set_rng_state(rng)  # the same dropout masks
        ref_inner.zero_grad()
        _penalised_mse(ref, ref_hp, b).backward()
        ref_inner.step()
        torch.set_rng_state(after)
    assert model.training and all(m.training for m in model.modules())
    for (n, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


# ----------------------------------------------------------------------------- buffers set in forward


class _LazyMean(nn.Module):
    """A running mean registered as ``None`` and set by the first training forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 1)
        self.mu: Tensor | None
        self.register_buffer("mu", None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.training:
            m = h.mean(0).detach()
            self.mu = m if self.mu is None else 0.5 * self.mu + 0.5 * m
        return self.b(torch.tanh(h - self.mu))


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_buffer_set_after_construction_is_left_alone_by_the_hyperstep(method: str) -> None:
    batches, val = _data((3,), 1)

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _LazyMean().to(DT)
        return (
            model,
            hg.hparams.WeightDecay(model, per="global", init=0.1).to(DT),
            torch.optim.SGD(model.parameters(), lr=0.1),
        )

    model, hp, inner = build()
    kw: dict[str, Any] = {"solver": hg.CG(maxiter=5)} if method == "implicit" else {"steps": 2}
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(model, hp, _penalised_mse, _mse_eval, inner_optimizer=inner,
               outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), **kw)  # fmt: skip
    ref, ref_hp, ref_inner = build()  # plain PyTorch, no hyperstep
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)  # (Unrolled: the replay must reproduce)
        for i, b in enumerate(batches * 2):
            hopt.step(b)
            ref_inner.zero_grad()
            _penalised_mse(ref, ref_hp, b).backward()
            ref_inner.step()
            if i >= 2:
                mu = model.get_buffer("mu").clone()
                hopt.hyper_step(train_batch=b, val_batch=val)
                assert torch.equal(model.get_buffer("mu"), mu)  # the hyperstep's forward passes ran on copies
    for (n, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


# ----------------------------------------------------------------------------- passing: new coverage


class _RecurrentDropout(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(2, 3, num_layers=2, dropout=0.5, batch_first=True)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], 2, 2)
        n = x.shape[0]
        lengths = torch.tensor([2] * (n - n // 2) + [1] * (n // 2))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.out(out.sum(1))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(
    "kw", [{}, {"mode": "forward"}, {"checkpoint": True}], ids=["reverse", "forward", "ckpt"]
)
def test_recurrent_inter_layer_dropout_on_packed_sequences_is_replayed(
    cell: type, kw: dict[str, Any]
) -> None:
    # New coverage: nn.LSTM / nn.GRU(num_layers=2, dropout=0.5) draw their inter-layer masks from
    # torch's RNG inside the fused _VF kernel; each replayed step (reverse, forward, checkpointed)
    # must draw the real step's masks. Against central differences of the real training.
    batches, val = _data((4,), 2)
    got, fd = _unrolled_vs_real_training(lambda: _RecurrentDropout(cell), batches, val, **kw)
    assert fd.abs().min() > 1e-5
    assert _rel(got, fd) < 1e-6


class _Positive(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x)

    def right_inverse(self, w: Tensor) -> Tensor:
        return torch.log(torch.expm1(w.clamp_min(1e-3)))


class _HookedNormed(nn.Module):
    """A custom parametrisation with right_inverse (the trained tensor is its preimage), a forward
    pre-hook and a forward hook that read the module's parameters, affine-free LayerNorm and
    GroupNorm, and a module that switches on ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        torch.nn.utils.parametrize.register_parametrization(self.a, "weight", _Positive())
        self.a.register_forward_pre_hook(lambda m, inp: (inp[0] * 1.5 + m.bias.sum(),))
        self.b.register_forward_hook(
            lambda m, inp, out: out + 0.3 * inp[0].mean(-1, keepdim=True) * m.weight.sum()
        )
        self.ln = nn.LayerNorm(6, elementwise_affine=False)
        self.gn = nn.GroupNorm(2, 6, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gn(self.ln(self.a(x))))
        return self.b(h * (1.3 if self.training else 1.0))


@pytest.mark.parametrize(
    "kw", [{}, {"mode": "forward"}, {"checkpoint": True}], ids=["reverse", "forward", "ckpt"]
)
def test_hooks_custom_parametrization_and_affine_free_norms_match_real_training(kw: dict[str, Any]) -> None:
    # New coverage: these together in forward mode and checkpointed reverse mode (dual tensors
    # through the hooks and the parametrisation's softplus), training in train mode and
    # validating in eval mode (the 1.3 factor), against central differences of the real training.
    batches, val = _data((4,), 2)
    got, fd = _unrolled_vs_real_training(_HookedNormed, batches, val, **kw)
    assert fd.abs().min() > 1e-5
    assert _rel(got, fd) < 1e-6


# ----------------------------------------------------------------------------- in-place weight writes


def _ce_penalised(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("kw", [{"mode": "forward"}, {"checkpoint": True}], ids=["forward", "ckpt"])
def test_embedding_max_norm_in_forward_and_checkpointed_modes_matches_real_training(
    kw: dict[str, Any],
) -> None:
    # Reverse mode is covered by test_round19_models (models-2.diff); these two replay paths were not.
    g = torch.Generator().manual_seed(3)
    tokens = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])
    batches = [
        (tokens[torch.randperm(8, generator=g)[:6]], torch.randint(0, 2, (6,), generator=g)) for _ in range(3)
    ]
    val = (torch.tensor([0, 1, 2, 3, 4, 1]), torch.randint(0, 2, (6,), generator=g))

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.8), nn.Tanh(), nn.Linear(3, 2)).to(DT)
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)

    model, hp = build()
    hopt = hg.Unrolled(
        model, hp, _ce_penalised, _ce, inner_optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0), steps=3, **kw,
    )  # fmt: skip
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=val)[0])

    def run(k: int, s: float) -> float:
        model, hp = build()
        with torch.no_grad():
            list(hp.parameters())[k].add_(s)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        for b in batches:
            opt.zero_grad()
            _ce_penalised(model, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(model, hp, val))

    fd = torch.tensor([(run(k, 1e-6) - run(k, -1e-6)) / 2e-6 for k in range(2)], dtype=DT)
    assert fd.abs().min() > 1e-4
    assert _rel(got, fd) < 1e-6


class _Orthogonal(nn.Module):
    def __init__(self, orthogonal_map: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        nn.utils.parametrizations.orthogonal(self.a, orthogonal_map=orthogonal_map)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("orthogonal_map", ["householder", "matrix_exp", "cayley"])
@pytest.mark.parametrize("kw", [{"mode": "forward"}, {"checkpoint": True}], ids=["forward", "ckpt"])
def test_orthogonal_parametrization_in_forward_and_checkpointed_modes(
    orthogonal_map: str, kw: dict[str, Any]
) -> None:
    # New coverage: round 19 checks the three orthogonal maps through Implicit and reverse-mode
    # Unrolled; forward mode (tangents through householder_product / matrix_exp / solve) and the
    # checkpointed replay (fresh leaves per step) were not. Against central differences.
    batches, val = _data((4,), 2)
    got, fd = _unrolled_vs_real_training(lambda: _Orthogonal(orthogonal_map), batches, val, **kw)
    assert fd.abs().min() > 1e-5
    assert _rel(got, fd) < 1e-6
