"""Implicit (and the functional model view under every method) on the models research scripts
use: weight-normalised, attention and recurrent layers, sparse embeddings, tied weights, hooks,
BatchNorm variants, containers in another precision. Ground truth: the IFT formula assembled from
central finite differences of first-order gradients on the real model (float64), which shares no
second-order code path with the library, and closed forms where there are any."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import hypergrad as hg

DT = torch.float64
Loss = Callable[[nn.Module, nn.Module, Any], torch.Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: threads only add overhead (and stall on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(DT) for t in ts])


def _fd_ift(model: nn.Module, hp: nn.Module, train: Loss, val: Loss, tb: Any, vb: Any) -> torch.Tensor:
    r""":math:`\partial_\lambda L_V - M^\top H^{-1} \partial_w L_V` with :math:`H` and :math:`M`
    from central differences of ``autograd.grad`` of the training loss (buffers restored after
    every evaluation)."""
    weights: list[torch.Tensor] = list(model.parameters())
    hps: list[torch.Tensor] = list(hp.parameters())
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]

    def restore() -> None:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)

    def grad(loss: Loss, batch: Any, wrt: list[torch.Tensor]) -> torch.Tensor:
        restore()
        gs = torch.autograd.grad(loss(model, hp, batch), wrt, allow_unused=True)
        restore()
        return _flat(
            torch.zeros_like(t) if g is None else g.to_dense() if g.is_sparse else g
            for g, t in zip(gs, wrt, strict=True)
        )

    def columns(ts: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
        cols = []
        for t in ts:
            for j in range(t.numel()):
                idx = torch.unravel_index(torch.tensor(j), t.shape)
                with torch.no_grad():
                    t[idx] += eps
                plus = grad(train, tb, weights)
                with torch.no_grad():
                    t[idx] -= 2 * eps
                minus = grad(train, tb, weights)
                with torch.no_grad():
                    t[idx] += eps
                cols.append((plus - minus) / (2 * eps))
        return torch.stack(cols, 1)

    h, m = columns(weights), columns(hps)
    g = grad(val, vb, weights + hps)
    n = h.shape[0]
    x = torch.linalg.solve(0.5 * (h + h.T), g[:n])
    return g[n:] - m.T @ x


def _hypergrad(
    model: nn.Module, hp: nn.Module, train: Loss, val: Loss, tb: Any, vb: Any, solver: Any = None
) -> torch.Tensor:
    hopt = hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct() if solver is None else solver,
    )  # fmt: skip
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    return _flat(grads)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    err = float((got - want).norm() / want.norm())
    assert err < tol, f"relative error {err:.2e}: got {got}, want {want}"


def _mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _ce_penalised(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h.penalty(m)


def _regression(n: int = 10, d: int = 4, seed: int = 0) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n - 2, d, generator=g, dtype=DT)
    return (x, torch.randn(n, generator=g, dtype=DT)), (xv, torch.randn(n - 2, generator=g, dtype=DT))


def _mlp(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


# ----------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_weight_norm_gives_the_exact_implicit_hypergradient(style: str) -> None:
    # PyTorch's fused weight-norm kernel has a wrong double backward (it holds the norm constant):
    # HVPs through it were silently off (relative error ~0.9 here)
    model = _mlp()
    if style == "parametrization":
        parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated in favour of the above)
            torch.nn.utils.weight_norm(model[0])
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    tb, vb = _regression()
    _close(_hypergrad(model, hp, _penalised, _mse, tb, vb), _fd_ift(model, hp, _penalised, _mse, tb, vb))


def test_weight_norm_gives_the_exact_unrolled_hypergradient() -> None:
    # the functional view every method uses replaces the fused kernel too (it was 2% off here)
    tb, vb = _regression()

    def build() -> tuple[nn.Module, hg.hparams.WeightDecay]:
        model = _mlp()
        parametrizations.weight_norm(model[0])
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.05)

    model, hp = build()
    hopt = hg.Unrolled(
        model, hp, _penalised, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=2,
    )  # fmt: skip
    for _ in range(2):
        hopt.step(tb)
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)

    def val_after_two_steps(raw: list[torch.Tensor]) -> float:
        m, h = build()
        with torch.no_grad():
            for r, v in zip(h.raw, raw, strict=True):
                r.copy_(v)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            _penalised(m, h, tb).backward()
            opt.step()
        return float(_mse(m, h, vb).detach())

    base = [r.detach().clone() for r in hp.raw]
    fd = []
    for i in range(len(base)):
        shifted = [[b.clone() for b in base] for _ in range(2)]
        shifted[0][i] += 1e-6
        shifted[1][i] -= 1e-6
        fd.append((val_after_two_steps(shifted[0]) - val_after_two_steps(shifted[1])) / 2e-6)
    _close(_flat(grads), torch.tensor(fd, dtype=DT), tol=1e-6)


# ----------------------------------------------------------------------------- attention, recurrent


class _Sequence(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out).mean(dim=(1, 2))


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]  # the scaled_dot_product_attention path


def _layer(kind: str) -> nn.Module:
    if kind == "attention":
        return _SelfAttention()
    if kind == "transformer":
        return nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
    return nn.GRU(4, 4, batch_first=True) if kind == "gru" else nn.LSTM(4, 4, batch_first=True)


@pytest.mark.parametrize("kind", ["attention", "transformer", "lstm", "gru"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_attention_and_recurrent_layers_match_finite_differences(kind: str, train_mode: bool) -> None:
    # fused attention kernels have no double backward: Implicit raised "derivative for
    # aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"
    torch.manual_seed(2)
    model = _Sequence(_layer(kind)).to(DT).train(train_mode)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    g = torch.Generator().manual_seed(3)
    tb = (torch.randn(3, 5, 4, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT))
    vb = (torch.randn(2, 5, 4, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT))
    got = _hypergrad(model, hp, _penalised, _mse, tb, vb)
    _close(got, _fd_ift(model, hp, _penalised, _mse, tb, vb), tol=1e-5)


def test_unrolled_does_not_keep_its_graph_alive_in_recurrent_layers() -> None:
    # an LSTM keeps its own list of its weights; after a replay on substituted weights it held
    # those (and the whole replayed graph behind them) until its next forward
    torch.manual_seed(2)
    model = _Sequence(nn.LSTM(4, 4, batch_first=True)).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = hg.Unrolled(
        model, hp, _penalised, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=2,
    )  # fmt: skip
    batch = (torch.randn(3, 5, 4, dtype=DT), torch.randn(3, dtype=DT))
    for _ in range(2):
        hopt.step(batch)
    hopt.hyper_step(train_batch=batch, val_batch=batch)
    lstm = model.layer
    assert isinstance(lstm, nn.LSTM)
    real = [getattr(lstm, n) for n in lstm._flat_weights_names]
    assert all(a is b for a, b in zip(lstm._flat_weights, real, strict=True))


# ----------------------------------------------------------------------------- embeddings, distances


class _Embed(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.out = nn.Embedding(6, 3, sparse=sparse), nn.Linear(3, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))


def _tokens() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(4)
    return (
        (torch.randint(0, 6, (10,), generator=g), torch.randint(0, 6, (10,), generator=g)),
        (torch.randint(0, 6, (7,), generator=g), torch.randint(0, 6, (7,), generator=g)),
    )


@pytest.mark.parametrize("solver", [hg.Direct(), hg.CG(maxiter=8), hg.Neumann(steps=3, alpha=0.1)])
def test_sparse_embedding_gives_the_dense_embeddings_hypergradient(solver: Any) -> None:
    # sparse gradients reached the solvers, which failed in reshape ("not implemented for sparse")
    tb, vb = _tokens()
    out = []
    for sparse in (False, True):
        model = _Embed(sparse).to(DT)
        hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
        out.append(_hypergrad(model, hp, _ce_penalised, _ce, tb, vb, solver))
    _close(out[1], out[0], tol=1e-12)


def test_sparse_embedding_trains_and_hypersteps() -> None:
    model = _Embed(True).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = hg.Implicit(
        model, hp, _ce_penalised, _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.CG(maxiter=5),
    )  # fmt: skip
    tb, vb = _tokens()
    hopt.step(tb)
    before = [r.detach().clone() for r in hp.raw]
    info = hopt.hyper_step(train_batch=tb, val_batch=vb)
    assert info.hypergrad_norm > 0
    assert all(r.grad is not None and not r.grad.is_sparse for r in hp.raw)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, hp.raw, strict=True))


class _Prototypes(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.features, self.protos = nn.Linear(4, 3), nn.Parameter(torch.randn(3, 3))
        self.explicit = explicit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.features(x))
        if self.explicit:
            return -(z[:, None, :] - self.protos[None]).square().sum(-1).sqrt()
        return -torch.cdist(z, self.protos)  # few rows: cdist's direct kernel (no double backward)


def test_cdist_prototypes_match_the_explicit_distance() -> None:
    g = torch.Generator().manual_seed(6)
    tb = (torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
    vb = (torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g))
    out = []
    for explicit in (True, False):
        model = _Prototypes(explicit).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        out.append(_hypergrad(model, hp, _ce_penalised, _ce, tb, vb))
    _close(out[1], out[0], tol=1e-9)


def test_an_operation_without_second_derivative_is_named() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.EmbeddingBag(6, 3, mode="mean"), nn.Linear(3, 1)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.emb(idx)))

    model = Bag().to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    batch = (torch.randint(0, 6, (8, 3)), torch.randn(8, dtype=DT))
    with pytest.raises(RuntimeError, match="no second derivative for an operation.*_embedding_bag_backward"):
        _hypergrad(model, hp, _penalised, _mse, batch, batch, hg.CG(maxiter=3))


# ----------------------------------------------------------------------------- tied weights, hooks, BatchNorm


class _Tied(nn.Module):
    """A language-model-like net: the output projection is the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.mid = nn.Embedding(6, 3), nn.Linear(3, 3)
        self.out = nn.Linear(3, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


def test_tied_embedding_and_output_projection_match_finite_differences() -> None:
    model = _Tied().to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
    tb, vb = _tokens()
    got = _hypergrad(model, hp, _ce_penalised, _ce, tb, vb)
    _close(got, _fd_ift(model, hp, _ce_penalised, _ce, tb, vb))


def test_hooks_registered_before_and_after_construction_are_differentiated() -> None:
    model = _mlp()
    model[0].register_forward_pre_hook(lambda mod, inp: (2.0 * inp[0],))
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    hopt = hg.Implicit(
        model, hp, _penalised, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )  # fmt: skip
    model[1].register_forward_hook(lambda mod, inp, out: out**2 + out)  # after construction
    model[2].register_full_backward_hook(lambda mod, grad_in, grad_out: None)
    tb, vb = _regression()
    grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    _close(_flat(grads), _fd_ift(model, hp, _penalised, _mse, tb, vb))


@pytest.mark.parametrize(
    "options", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}]
)
@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_variants_match_finite_differences_and_keep_their_statistics(
    options: dict[str, Any], train_mode: bool
) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, **options), nn.Tanh(), nn.Linear(3, 1))
    model = model.to(DT).train(train_mode)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    tb, vb = _regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = _hypergrad(model, hp, _penalised, _mse, tb, vb)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _close(got, _fd_ift(model, hp, _penalised, _mse, tb, vb))


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    "solver", [hg.Direct(), hg.CG(maxiter=50, tol=1e-14), hg.Neumann(steps=600, alpha=0.5)]
)
def test_ridge_closed_form_with_a_direct_term_and_an_unused_hyperparameter(solver: Any) -> None:
    r"""Ridge at its exact optimum, :math:`L_V` reading :math:`e^{r}` directly as well: the IFT
    hypergradient equals :math:`\frac{d}{dr} L_V(w^*(r), r)` from the closed form; a
    hyperparameter no loss reads gets exactly 0 (and a warning)."""
    g = torch.Generator().manual_seed(7)
    n, d = 40, 5
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    xv = torch.randn(30, d, generator=g, dtype=DT)
    yv = xv @ torch.randn(d, generator=g, dtype=DT)

    def optimum(r: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(x.T @ x / n + r.exp() * torch.eye(d, dtype=DT), x.T @ y / n)

    r0 = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    closed = 0.5 * ((xv @ optimum(r0) - yv) ** 2).mean() + 0.1 * r0.exp()
    (want,) = torch.autograd.grad(closed, r0)

    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(optimum(r0.detach())[None])
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="global", init=float(r0.detach().exp())),
            "unused": hg.hparams.Hparam(1.0, dtype=DT),
        }
    )

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return 0.5 * ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + h["wd"].penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return 0.5 * ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean() + 0.1 * h["wd"].raw[0].exp()

    with pytest.warns(hg.DisconnectedWarning, match="unused.raw"):
        got = _hypergrad(model, hp, train, val, (x, y), (xv, yv), solver)
    assert float(got[1]) == 0.0
    assert abs(float(got[0] - want)) < 1e-9 * abs(float(want))


@pytest.mark.parametrize("hp_dtype", [torch.float32, torch.float64])
def test_weight_decay_kept_in_another_precision_than_the_model(hp_dtype: torch.dtype) -> None:
    # the by-hand penalty derivatives came back in the model's precision: hyper_step then failed
    # assigning a float64 .grad to a float32 hyperparameter (and vice versa)
    model_dtype = torch.float32 if hp_dtype == torch.float64 else torch.float64
    tb, vb = _regression()
    grads = {}
    for dtype in (DT, hp_dtype):
        model = _mlp().to(model_dtype)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(dtype)
        hopt = hg.Implicit(
            model, hp, _penalised, _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            solver=hg.CG(maxiter=20, damping=0.1),
        )  # fmt: skip
        cast = [tuple(t.to(model_dtype) for t in b) for b in (tb, vb)]
        hopt.hyper_step(train_batch=cast[0], val_batch=cast[1])
        assert all(r.grad is not None and r.grad.dtype == dtype for r in hp.raw)
        grads[dtype] = _flat(r.grad for r in hp.raw)
    _close(grads[hp_dtype], grads[DT], tol=1e-5)


class _Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).mT


def test_parametrization_cache_does_not_leak_into_replays() -> None:
    # under torch.nn.utils.parametrize.cached(), Unrolled's replays on substituted weights got the
    # parametrised weight computed from the real ones: a silently wrong hypergradient
    tb, vb = _regression()
    out = []
    for cached in (False, True):
        model = _mlp()
        torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _Symmetric())
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
        hopt = hg.Unrolled(
            model, hp, _penalised, _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=2,
        )  # fmt: skip
        for _ in range(2):
            hopt.step(tb)
        if cached:
            with torch.nn.utils.parametrize.cached():
                grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
        else:
            grads, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
        out.append(_flat(grads))
    _close(out[1], out[0], tol=1e-12)


def test_replaced_entry_points_are_restored_after_every_block_even_on_error() -> None:
    """differentiable_twice swaps torch.cdist, torch.embedding and both weight-norm entry points
    while a hypergradient path evaluates a loss; they are torch's own again afterwards, also when
    the loss raises, and nested blocks restore only when the outermost closes."""
    import sys

    from hypergrad._functional import differentiable_twice

    old_wn = sys.modules["torch.nn.utils.weight_norm"]
    originals = (torch.cdist, torch.embedding, torch._weight_norm, old_wn._weight_norm)
    with differentiable_twice():
        assert torch.cdist is not originals[0] and old_wn._weight_norm is not originals[3]
        with differentiable_twice():
            pass
        assert torch.cdist is not originals[0]  # the inner block did not restore early
    assert (torch.cdist, torch.embedding, torch._weight_norm, old_wn._weight_norm) == originals
    with pytest.raises(ZeroDivisionError), differentiable_twice():
        raise ZeroDivisionError
    assert (torch.cdist, torch.embedding, torch._weight_norm, old_wn._weight_norm) == originals
