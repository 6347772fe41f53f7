"""Round 19: hypergradients through architectures where second derivatives and replays meet
unusual operations. Ground truth is independent of the library's second-order code: central
differences of the validation loss at an inner fixed point solved tightly in the test
(``hg.Implicit``), or of the real unrolled training (``hg.Unrolled``), in float64.

Bugs found (fixed in this round):

* ``nn.Embedding(scale_grad_by_freq=True)``: torch's double backward of the scaled embedding
  gradient returns the Jacobian-vector product ``J u`` where autograd promises the
  vector-Jacobian product ``J^T u`` (the scaled gradient field is not a gradient, so ``J`` is not
  symmetric as soon as the embedding feeds another weight). Implicit's hypergradient came back
  15-30% off the finite differences of the validation loss at the fixed point, silently; the
  replay of Unrolled differentiates the same wrong product (36% off). No graph can fix it (any
  forward path whose backward scales also scales the second pass), so a clear error naming the
  option passes these tests (models-1.diff raises one inside ``differentiable_twice``).
* ``nn.Embedding(max_norm=...)`` under ``hg.Unrolled``: ``F.embedding`` renormalises the looked-up
  rows in place through ``weight.detach()``, so the replay reproduced the steps' values but
  differentiated them as if the rows had not been rescaled: a hypergradient 25% off the central
  differences of the real training, with no warning (models-2.diff records the renormalisation on
  replayed, non-leaf weights).
* ``nn.Hardsigmoid(inplace=True)`` (``F.hardsigmoid(inplace=True)``): ``differentiable_twice``
  replaced the out-of-place kernel only; the in-place one has no second derivative either, so
  Implicit raised with advice about EmbeddingBag and Unrolled's replay raised torch's bare
  "derivative for aten::hardsigmoid_backward is not implemented" (models-3.diff replaces it too).
* ``hg.Unrolled`` (reverse mode, with or without ``checkpoint=True``) through an operation without
  a second derivative (``nn.EmbeddingBag``, ``torch.pdist``, ``torch.cdist(p=1)``) raised torch's
  bare ``NotImplementedError: the derivative for '_embedding_bag_backward' is not implemented``;
  Implicit names the cause and what to do, Unrolled did not (models-4.diff).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DT = torch.float64
Loss = Callable[[nn.Module, nn.Module, Any], Tensor]


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


def _solve(model: nn.Module, hp: nn.Module, train: Loss, batch: Any, lr: float, steps: int) -> float:
    """Full-batch heavy-ball descent to the fixed point; returns the final gradient norm."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        train(model, hp, batch).backward()
        opt.step()
    opt.zero_grad()
    train(model, hp, batch).backward()
    return float(_flat(p.grad for p in model.parameters()).norm())


def _fd_at_optimum(
    build: Callable[[], tuple[nn.Module, nn.Module]],
    train: Loss,
    val: Loss,
    tb: Any,
    vb: Any,
    lr: float,
    steps: int,
    eps: float = 1e-5,
) -> Tensor:
    """Central differences of the validation loss at the re-solved fixed point, for every entry of
    every hyperparameter (each solve starts from the same initialisation)."""
    _, hp0 = build()
    out = []
    for k, h in enumerate(hp0.parameters()):
        for j in range(h.numel()):
            vals = []
            for s in (1, -1):
                model, hp = build()
                with torch.no_grad():
                    list(hp.parameters())[k].view(-1)[j] += s * eps
                _solve(model, hp, train, tb, lr, steps)
                with torch.no_grad():
                    vals.append(float(val(model, hp, vb)))
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=DT)


def _implicit(model: nn.Module, hp: nn.Module, train: Loss, val: Loss, lr: float) -> hg.Implicit:
    return hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )  # fmt: skip


def _unrolled_fd(
    build: Callable[[], tuple[nn.Module, nn.Module]],
    train: Loss,
    val: Loss,
    batches: list[Any],
    vb: Any,
    lr: float,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """(Unrolled's hypergradient through ``len(batches)`` real SGD steps, central differences of
    the validation loss after the same steps taken by plain torch)."""
    model, hp = build()
    hopt = hg.Unrolled(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=len(batches),
    )  # fmt: skip
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=vb)[0])

    def run(k: int, j: int, s: float) -> float:
        model, hp = build()
        with torch.no_grad():
            list(hp.parameters())[k].view(-1)[j] += s * eps
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for b in batches:
            opt.zero_grad()
            train(model, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(val(model, hp, vb))

    _, hp0 = build()
    fd = [
        (run(k, j, 1) - run(k, j, -1)) / (2 * eps)
        for k, h in enumerate(hp0.parameters())
        for j in range(h.numel())
    ]
    return got, torch.tensor(fd, dtype=DT)


# ------------------------------------------------ Embedding(scale_grad_by_freq=True): J u for J^T u

_V, _D, _C = 5, 3, 3


def _emb_data() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    xt = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])
    xv = torch.tensor([0, 1, 2, 3, 4, 1])
    return (xt, torch.randint(0, _C, (8,), generator=g)), (xv, torch.randint(0, _C, (6,), generator=g))


def _emb_build(scale: bool, init: float = 0.1) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Embedding(_V, _D, scale_grad_by_freq=scale), nn.Tanh(), nn.Linear(_D, _C)
        ).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=init).to(DT)
        with torch.no_grad():
            hp.raw[0].add_(0.7)  # (different decays per layer: no flat directions at the optimum)
        return model, hp

    return build


def _ce_penalised(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize(
    "scale",
    [
        False,  # (the control: the same model without the scaling matches)
        True  # (fixed)
    ],
)
def test_embedding_scale_grad_by_freq_implicit_matches_the_fixed_points_finite_differences(
    scale: bool,
) -> None:
    tb, vb = _emb_data()
    build = _emb_build(scale)
    model, hp = build()
    assert _solve(model, hp, _ce_penalised, tb, lr=0.5, steps=1500) < 1e-12
    try:
        got = _flat(
            _implicit(model, hp, _ce_penalised, _ce, 0.5).hypergradient(train_batch=tb, val_batch=vb)[0]
        )
    except RuntimeError as e:  # (a clear refusal naming the option is acceptable)
        assert scale and "scale_grad_by_freq" in str(e)
        return
    want = _fd_at_optimum(build, _ce_penalised, _ce, tb, vb, lr=0.5, steps=1500)
    assert _rel(got, want) < 1e-4, (got, want)


@pytest.mark.parametrize(
    "scale",
    [
        False,
        True  # (fixed)
    ],
)
def test_embedding_scale_grad_by_freq_unrolled_matches_the_real_trainings_finite_differences(
    scale: bool,
) -> None:
    tb, vb = _emb_data()
    g = torch.Generator().manual_seed(3)
    picked = [tb[0][torch.randperm(8, generator=g)[:6]] for _ in range(3)]
    batches = [(x, torch.randint(0, _C, (6,), generator=g)) for x in picked]
    try:
        got, want = _unrolled_fd(_emb_build(scale, init=0.05), _ce_penalised, _ce, batches, vb, lr=1.0)
    except RuntimeError as e:  # (a clear refusal naming the option is acceptable)
        assert scale and "scale_grad_by_freq" in str(e)
        return
    assert _rel(got, want) < 1e-6, (got, want)


# ------------------------------------------- passing: coverage of operations not exercised before


def _fd_ift(
    model: nn.Module, hp: nn.Module, train: Loss, val: Loss, tb: Any, vb: Any, eps: float = 1e-6
) -> Tensor:
    r""":math:`\partial_\lambda L_V - M^\top J^{-\top} \partial_w L_V` with :math:`J`, :math:`M` the
    central differences of first-order ``autograd.grad`` of ``train`` (no symmetrisation: what
    ``hg.Direct`` must give at any point)."""
    ws = [p for p in model.parameters() if p.requires_grad]
    hs = list(hp.parameters())

    def grad(loss: Loss, batch: Any, wrt: Sequence[Tensor]) -> Tensor:
        gs = torch.autograd.grad(loss(model, hp, batch), wrt, allow_unused=True)
        return _flat(torch.zeros_like(t) if g is None else g for g, t in zip(gs, wrt, strict=True))

    def columns(ts: Sequence[Tensor]) -> Tensor:
        cols = []
        for t in ts:
            flat = t.data.view(-1)
            for j in range(flat.numel()):
                old = float(flat[j])
                flat[j] = old + eps
                plus = grad(train, tb, ws)
                flat[j] = old - eps
                minus = grad(train, tb, ws)
                flat[j] = old
                cols.append((plus - minus) / (2 * eps))
        return torch.stack(cols, 1)

    j, m = columns(ws), columns(hs)
    g = grad(val, vb, ws + hs)
    n = j.shape[0]
    return g[n:] - m.T @ torch.linalg.solve(j.T, g[:n])


class _MoE(nn.Module):
    """Top-2 routing over 3 experts; the experts' outputs combined by ``index_add``,
    ``scatter_add`` or ``index_put(accumulate=True)``."""

    def __init__(self, combine: str) -> None:
        super().__init__()
        self.combine = combine
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        top, idx = self.gate(x).topk(2, -1)
        w = top.softmax(-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = idx == e
            rows = sel.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            ye = torch.tanh(expert(x[rows])) * (w * sel).sum(-1)[rows, None]
            if self.combine == "index_add":
                y = y.index_add(0, rows, ye)
            elif self.combine == "scatter_add":
                y = y.scatter_add(0, rows[:, None].expand(-1, 4), ye)
            else:
                y = y.index_put((rows,), ye, accumulate=True)
        return self.out(y)


class _CausalMasked(nn.Module):
    """Attention scores with ``masked_fill(-inf)`` above the diagonal; a ``torch.where`` whose
    unused branch has an infinite derivative (``sqrt`` at 0, kept finite by the safe-input trick);
    ``clamp`` whose bounds are hit."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(-1, 4, 1).expand(-1, 4, 4) * torch.linspace(0.5, 1.5, 4, dtype=x.dtype)
        mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
        a = (self.q(x) @ self.k(x).transpose(1, 2)).masked_fill(mask, float("-inf")).softmax(-1)
        h = (a @ x).mean(1)
        safe = torch.where(h > 0, h, torch.ones_like(h))
        h = torch.where(h > 0, torch.sqrt(safe) * h, h**2)
        return self.o(h.clamp(-0.3, 0.3) ** 2 + torch.tanh(h))


class _Recurrent(nn.Module):
    def __init__(self, kind: str, **kw: Any) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, batch_first=True, **kw)
        width = (kw.get("proj_size", 0) or 4) * (2 if kw.get("bidirectional") else 1)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _ops_case(name: str) -> tuple[nn.Module, Tensor]:
    g = torch.Generator().manual_seed(0)
    flat, image, seq = (torch.randn(s, generator=g, dtype=DT) for s in ((16, 4), (16, 2, 6, 6), (16, 5, 3)))
    conv = nn.Conv2d(2, 2, 3)
    torch.manual_seed(0)
    cases: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
        "moe_index_add": lambda: (_MoE("index_add"), flat),
        "moe_scatter_add": lambda: (_MoE("scatter_add"), flat),
        "moe_index_put": lambda: (_MoE("index_put"), flat),
        "masked_fill_where_clamp": lambda: (_CausalMasked(), flat),
        "softplus_threshold_gelu_tanh_silu": lambda: (
            nn.Sequential(
                nn.Linear(4, 5),
                nn.Softplus(beta=2.0, threshold=1.0),
                nn.Linear(5, 5),
                nn.GELU(approximate="tanh"),
                nn.Linear(5, 5),
                nn.SiLU(),
                nn.Linear(5, 3),
            ),  # fmt: skip
            flat,
        ),
        "groupnorm_adaptive_max_pool": lambda: (
            nn.Sequential(conv, nn.GroupNorm(1, 2), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
            image,
        ),
        "fractional_max_pool_lp_pool": lambda: (
            nn.Sequential(
                conv,
                nn.LPPool2d(2, 2, ceil_mode=True),
                nn.FractionalMaxPool2d(
                    2, output_size=1, _random_samples=torch.full((16, 2, 2), 0.3, dtype=DT)
                ),
                nn.Flatten(),
                nn.Linear(2, 3),
            ),  # fmt: skip
            image,
        ),
        "lstm_proj_size_bidirectional": lambda: (
            _Recurrent("LSTM", proj_size=2, bidirectional=True),
            seq,
        ),
    }
    model, x = cases[name]()
    return model.to(DT), x


@pytest.mark.parametrize(
    "name",
    [
        "moe_index_add", "moe_scatter_add", "moe_index_put", "masked_fill_where_clamp",
        "softplus_threshold_gelu_tanh_silu", "groupnorm_adaptive_max_pool",
        "fractional_max_pool_lp_pool", "lstm_proj_size_bidirectional",
    ],
)  # fmt: skip
def test_unusual_operations_give_the_direct_ift_of_the_training_gradients_finite_differences(
    name: str,
) -> None:
    # New coverage: mixture-of-experts routing (topk + index_add / scatter_add / index_put),
    # masked_fill(-inf) attention, torch.where with a NaN-derivative branch, clamp, Softplus near
    # its threshold, GroupNorm, adaptive/fractional max and LP pooling, LSTM(proj_size) in
    # Implicit's HVPs, against an IFT assembled from first-order autograd only.
    model, x = _ops_case(name)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.3).to(DT)
    with torch.no_grad():
        for i, p in enumerate(hp.parameters()):
            p.add_(0.1 * i)
    tb, vb = (x[:9], y[:9]), (x[8:], y[8:])
    got = _flat(_implicit(model, hp, _ce_penalised, _ce, 0.1).hypergradient(train_batch=tb, val_batch=vb)[0])
    want = _fd_ift(model, hp, _ce_penalised, _ce, tb, vb)
    assert _rel(got, want) < 1e-6, (got, want)


class _SDPADropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        q, k, v = (t.view(n, 5, 2, 2).transpose(1, 2) for t in self.qkv(x).split(4, -1))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3 if self.training else 0.0, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(n, 5, 4).mean(1))


class _EncoderDropout(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, dropout=0.2, batch_first=True, norm_first=norm_first
        )
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(x).mean(1))


def _ce_eval(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    m.eval()  # (no dropout; under no_grad, TransformerEncoderLayer's fast path)
    try:
        return F.cross_entropy(m(b[0]), b[1])
    finally:
        m.train()


@pytest.mark.parametrize("arch", ["sdpa", "encoder_norm_first", "encoder_post_norm"])
def test_unrolled_replays_attention_dropout_and_an_eval_mode_validation(arch: str) -> None:
    # New coverage: F.scaled_dot_product_attention(dropout_p=0.3) and TransformerEncoderLayer's
    # dropout (both norm placements) in train_loss, replayed by Unrolled with the steps' RNG
    # states, against central differences of the real training (the same seed); the reference's
    # validation runs in eval mode under no_grad (the encoder's fast path).
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, 4, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    batches = [(x[i::3], y[i::3]) for i in range(3)]

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = (_SDPADropout() if arch == "sdpa" else _EncoderDropout(arch == "encoder_norm_first")).to(DT)
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)

    model, hp = build()
    hopt = hg.Unrolled(
        model, hp, _ce_penalised, _ce_eval,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=3,
    )  # fmt: skip
    torch.manual_seed(5)
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=(x, y))[0])

    def run(k: int, s: float) -> float:
        model, hp = build()
        with torch.no_grad():
            list(hp.parameters())[k].add_(s * 1e-6)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        torch.manual_seed(5)
        for b in batches:
            opt.zero_grad()
            _ce_penalised(model, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce_eval(model, hp, (x, y)))

    want = torch.tensor([(run(k, 1) - run(k, -1)) / 2e-6 for k in range(len(got))], dtype=DT)
    assert _rel(got, want) < 1e-6, (got, want)


@pytest.mark.parametrize("orthogonal_map", ["householder", "matrix_exp", "cayley"])
def test_orthogonal_parametrization_at_a_solved_optimum_matches_finite_differences(
    orthogonal_map: str,
) -> None:
    # New coverage: nn.utils.parametrizations.orthogonal (householder_product, matrix_exp,
    # Cayley) in Implicit's HVPs, at a tightly solved fixed point, against central differences
    # of the validation loss at the re-solved fixed point.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    tb, vb = (x[:10], y[:10]), (x[10:], y[10:])

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        lin = nn.Linear(4, 4)
        nn.utils.parametrizations.orthogonal(lin, orthogonal_map=orthogonal_map)
        model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 3)).to(DT)
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)

    model, hp = build()
    assert _solve(model, hp, _ce_penalised, tb, lr=0.3, steps=600) < 1e-12
    got = _flat(_implicit(model, hp, _ce_penalised, _ce, 0.3).hypergradient(train_batch=tb, val_batch=vb)[0])
    want = _fd_at_optimum(build, _ce_penalised, _ce, tb, vb, lr=0.3, steps=600)
    assert _rel(got, want) < 1e-5, (got, want)


@pytest.mark.parametrize(
    "max_norm",
    [
        10.0,  # (the control: no row reaches the bound)
        0.8  # (fixed)
    ],
)
def test_embedding_max_norm_unrolled_matches_the_real_trainings_finite_differences(max_norm: float) -> None:
    tb, vb = _emb_data()
    g = torch.Generator().manual_seed(3)
    batches = [
        (tb[0][torch.randperm(8, generator=g)[:6]], torch.randint(0, _C, (6,), generator=g)) for _ in range(3)
    ]

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(_V, _D, max_norm=max_norm), nn.Tanh(), nn.Linear(_D, _C)).to(DT)
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.05).to(DT)

    got, want = _unrolled_fd(build, _ce_penalised, _ce, batches, vb, lr=1.0)
    assert _rel(got, want) < 1e-6, (got, want)


class _ParametrizedRecurrent(nn.Module):
    def __init__(self, kind: str, how: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, batch_first=True)
        wrap = (
            nn.utils.parametrizations.orthogonal
            if how == "orthogonal"
            else nn.utils.parametrizations.weight_norm
        )
        wrap(self.rnn, "weight_hh_l0")
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(
    ("kind", "how"), [("RNN", "orthogonal"), ("GRU", "weight_norm"), ("LSTM", "weight_norm")]
)
def test_unrolled_through_a_parametrized_recurrent_weight_matches_the_real_training(
    kind: str, how: str
) -> None:
    # New coverage: a recurrent layer whose hidden-to-hidden weight is parametrized (an
    # orthogonal RNN; weight-normalised GRU / LSTM), replayed with momentum SGD over 3 steps
    # (the flat-weights cache of cuDNN-style RNN modules must follow the replayed tensors).
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, 3, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    batches = [(x[i::3], y[i::3]) for i in range(3)]

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = _ParametrizedRecurrent(kind, how).to(DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.3).to(DT)
        with torch.no_grad():
            for i, p in enumerate(hp.parameters()):
                p.add_(0.1 * i)
        return model, hp

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)

    model, hp = build()
    hopt = hg.Unrolled(
        model, hp, _ce_penalised, _ce, inner_optimizer=sgd(model),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=3,
    )  # fmt: skip
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=(x, y))[0])

    def run(k: int, s: float) -> float:
        model, hp = build()
        with torch.no_grad():
            list(hp.parameters())[k].add_(s * 1e-6)
        opt = sgd(model)
        for b in batches:
            opt.zero_grad()
            _ce_penalised(model, hp, b).backward()
            opt.step()
        with torch.no_grad():
            return float(_ce(model, hp, (x, y)))

    want = torch.tensor([(run(k, 1) - run(k, -1)) / 2e-6 for k in range(len(got))], dtype=DT)
    assert _rel(got, want) < 1e-6, (got, want)


class _SqueezeExcite(nn.Module):
    """A MobileNetV3-style gate with an in-place Hardsigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.gate = nn.Linear(4, 5), nn.Sequential(nn.Linear(5, 5), nn.Hardsigmoid(inplace=True))
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.out(h * self.gate(h * 12))


def test_inplace_hardsigmoid_gate_matches_finite_differences_in_implicit_and_unrolled() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = _SqueezeExcite().to(DT)
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.3).to(DT)

    model, hp = build()
    with torch.no_grad():  # (some gate inputs outside (-3, 3): both flat pieces are exercised)
        z = model.gate[0](torch.tanh(model.body(x)) * 12).abs()  # type: ignore[index, operator]
        assert (z > 3).any() and (z < 3).any()
    tb, vb = (x[:9], y[:9]), (x[8:], y[8:])
    got = _flat(_implicit(model, hp, _ce_penalised, _ce, 0.1).hypergradient(train_batch=tb, val_batch=vb)[0])
    assert _rel(got, _fd_ift(model, hp, _ce_penalised, _ce, tb, vb)) < 1e-6
    batches = [(x[i::3], y[i::3]) for i in range(3)]
    got, want = _unrolled_fd(build, _ce_penalised, _ce, batches, (x, y), lr=0.5)
    assert _rel(got, want) < 1e-6, (got, want)


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.out = nn.EmbeddingBag(6, 3, mode="mean"), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.bag(x)))


class _PDist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x.to(DT))
        return self.out(h + torch.pdist(h).mean())


@pytest.mark.parametrize("arch", ["embedding_bag", "pdist"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_unrolled_names_an_operation_without_second_derivative(arch: str, checkpoint: bool) -> None:
    torch.manual_seed(0)
    model = (_Bag() if arch == "embedding_bag" else _PDist()).to(DT)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1).to(DT)
    hopt = hg.Unrolled(
        model, hp, _ce_penalised, _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1), steps=2, checkpoint=checkpoint,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 6, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g))
    for _ in range(2):
        hopt.step(batch)
    op = "_embedding_bag_backward" if arch == "embedding_bag" else "_pdist_backward"
    with pytest.raises(RuntimeError, match="Unrolled") as info:
        hopt.hypergradient(val_batch=batch)
    assert op in str(info.value) and "twice-differentiable" in str(info.value)


class _LearnedAugmentation(nn.Module):
    """Hyperparameters: an augmentation network with its own BatchNorm (train mode) and two
    per-layer log-decays."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
        self.raw = nn.Parameter(torch.tensor([-1.0, -0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.3 * torch.tanh(self.net(x))

    def penalty(self, m: Any) -> Tensor:
        return (
            torch.exp(self.raw[0]) * m[0].weight.square().sum()
            + torch.exp(self.raw[1]) * m[3].weight.square().sum()
        )


def _aug_train(m: Any, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(h(b[0])), b[1]) + h.penalty(m)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_learned_augmentation_with_batchnorm_into_a_groupnorm_convnet(method: str) -> None:
    # New coverage: a learned augmentation network (with BatchNorm in train mode) feeding a
    # conv + GroupNorm model: Implicit against the IFT of first-order finite differences, Unrolled
    # (3 steps) against central differences of the real training.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
    tb, vb = (x[:10], y[:10]), (x[10:], y[10:])

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(48, 3)).to(DT)
        return model, _LearnedAugmentation().to(DT)

    if method == "implicit":
        model, hp = build()
        got = _flat(_implicit(model, hp, _aug_train, _ce, 0.1).hypergradient(train_batch=tb, val_batch=vb)[0])
        want = _fd_ift(model, hp, _aug_train, _ce, tb, vb)
    else:
        got, want = _unrolled_fd(build, _aug_train, _ce, [(x[i::3], y[i::3]) for i in range(3)], vb, lr=0.3)
    assert _rel(got, want) < 1e-6, (got, want)
