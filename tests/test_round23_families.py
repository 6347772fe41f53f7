"""Round 23 (helper families): SelfTuning, BestResponse and MarginalLikelihood on less common
models, each against an independent reference written out here in float64.

Bugs found and fixed (each test failed before its fix):

* families-1: the layerwise kernel's row check (``_rows_are_examples``) runs the model on the
  batch rolled by one example. A model that takes its batches in an order of its own refuses
  that batch: ``pack_padded_sequence``'s default ``enforce_sorted=True`` on a batch sorted by
  length (last-layer Laplace over a frozen LSTM encoder). The evidence, and every hyperstep,
  failed with torch's "`lengths` array must be sorted in decreasing order" for a batch that was
  sorted, where ``kernel="dense"`` gives the evidence.
* families-2: Delta-STN's linearised model call on a channels_last GroupNorm net (torch's
  forward-mode AD of group_norm cannot take channels_last inputs) failed with torch's bare "view
  size is not compatible with input tensor's size and stride", naming neither the linearisation
  nor ``linearize=False``.
* families-3: ``kernel="layerwise"`` on a model whose trained weights are not all in plain
  ``nn.Linear`` layers (a convolution) was accepted at construction and refused at the first
  hyperstep, after the whole burn-in (the sibling of round 19's check of the prior's structure).
* families-4: the dense kernel takes each example's Jacobian from the example run alone and the
  outputs (likelihood, curvature) from the batch, and only the first and the last example were
  checked alone. A model cutting padded sequences to the batch's longest (a GRU reading the
  trailing pads) on a batch whose first and last sequences are the longest went through: an
  evidence of neither function (-9.985; the batch function's is -10.009), where a model whose
  output depends on the other examples is documented to be refused.

The other tests cover combinations no earlier test had (each says which).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


# ------------------------------------------------------------------ references written out here


def _dense_evidence(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: hg.hparams.PriorPrecision,
    likelihood: str,
    sigma: float | None = None,
    data_size: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The linearised-Laplace (GGN) evidence, or its block bound rescaled by N / B, from the
    Jacobian of the whole batch's outputs (``torch.autograd.functional.jacobian``, no per-layer
    trick) and dense ``(P, P)`` log determinants. Differentiable w.r.t. the prior's raw tensors."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad and n in prior.names]
    theta = {n: params[n].detach() for n in names}
    rest = {n: p.detach() for n, p in params.items()}

    def outputs(*ts: torch.Tensor) -> torch.Tensor:
        sub = dict(zip(names, ts, strict=True))
        out = torch.func.functional_call(model, {**rest, **sub}, (x,))
        return out.reshape(x.shape[0], -1)

    f = outputs(*theta.values()).detach()
    b, c = f.shape
    jac = torch.autograd.functional.jacobian(outputs, tuple(theta.values()))
    j = torch.cat([t.reshape(b, c, -1) for t in jac], 2)
    prec = prior.precisions()
    delta = torch.cat([prec[n].expand(theta[n].shape).reshape(-1) for n in names])
    th = torch.cat([t.reshape(-1) for t in theta.values()])
    if likelihood == "classification":
        ll = -F.cross_entropy(f, y.long(), reduction="sum")
    else:
        assert sigma is not None
        r = y.reshape(f.shape) - f
        ll = -0.5 * r.square().sum() / sigma**2 - f.numel() * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    log_det = torch.zeros((), dtype=DT)
    size = block or b
    for s in range(0, b, size):
        jb, fb = j[s : s + size], f[s : s + size]
        m = jb.shape[0]
        if likelihood == "classification":
            p = fb.softmax(1)
            lam = torch.block_diag(*[torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(m)])
        else:
            lam = torch.eye(m * c, dtype=DT) / sigma**2  # type: ignore[operator]
        jf = jb.reshape(m * c, -1)
        log_det = log_det + torch.logdet(torch.diag(delta) + jf.T @ lam @ jf) - delta.log().sum()
    n = data_size or b
    return n / b * (ll - 0.5 * log_det) - 0.5 * (delta * th.square()).sum()


# ------------------------------------------------------------------ a frozen, packed LSTM encoder


class _SortedPackedLSTM(nn.Module):
    """A sentence classifier over padded sequences: the last input channel is the 0/1 mask of the
    valid steps, the lengths are read from it, and the sequences are packed with
    ``pack_padded_sequence``'s default ``enforce_sorted=True`` (batches sorted by length, as a
    bucketing loader gives them); the last hidden state feeds a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, 3, batch_first=True, dtype=DT)
        self.head = nn.Linear(3, 3, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = x[:, :, 2].sum(1).long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x[:, :, :2], lengths, batch_first=True)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def _sorted_padded_batch(lengths: list[int], t: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(lengths), t, 3, generator=g, dtype=DT)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(DT)
    x[:, :, 2] = mask
    x[:, :, :2] *= mask[:, :, None]
    return x


def test_last_layer_laplace_over_a_frozen_lstm_on_sorted_packed_batches_gets_the_evidence() -> None:
    """Last-layer Laplace: the LSTM encoder frozen (a pretrained body), the linear head under a
    per-layer prior, so the default kernel="auto" takes the layerwise path. The evidence and a
    MarginalLikelihood hyperstep on a batch sorted by length must be those of the dense
    reference, not torch's "`lengths` array must be sorted" for the batch rolled inside."""
    torch.manual_seed(0)
    model = _SortedPackedLSTM()
    model.rnn.requires_grad_(False)
    x = _sorted_padded_batch([4, 4, 3, 2, 1])
    y = torch.tensor([0, 2, 1, 1, 0])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.8).to(DT)
    reference = _dense_evidence(model, x, y, prior, "classification")
    got = hg.log_evidence(model, x, y, prior)  # kernel="auto"
    assert float(got.detach()) == pytest.approx(float(reference.detach()), rel=1e-10)
    (g,) = torch.autograd.grad(got, list(prior.parameters()))
    (g_ref,) = torch.autograd.grad(reference, list(prior.parameters()))
    assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)

    hp = nn.ModuleDict({"prior": prior})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=5,
        inner_optimizer=torch.optim.SGD(model.head.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    grads, info = hopt.hypergradient(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(-float(reference.detach()) / 5, rel=1e-10)
    assert torch.allclose(grads[0], -g_ref / 5, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ Delta-STN on channels_last GroupNorm nets


class _GroupNormStnNet(nn.Module):
    """A grouped, circular-padded StnConv2d, GroupNorm, per-example dropout and cutout, a
    low-rank "same" StnConv2d and an StnLinear head: a small-batch CNN in channels_last."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.c1 = hg.nn.StnConv2d(2, 4, 3, n, padding=1, padding_mode="circular", groups=2, dtype=DT)
        self.norm = nn.GroupNorm(2, 4, dtype=DT)
        self.c2 = hg.nn.StnConv2d(4, 4, 3, n, padding="same", rank=2, dtype=DT)
        self.head = hg.nn.StnLinear(4 * 25, 3, n, dtype=DT)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.cutout(x, d["cut"], self.training)
        h = hg.nn.dropout(torch.relu(self.norm(self.c1(x, d))), d["p"], self.training)
        return self.head(torch.tanh(self.c2(h, d)).flatten(1), d)


def _gn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 5, 5, generator=g, dtype=DT).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 3, (4,), generator=g)


def _gn_stn(linearize: bool) -> tuple[nn.Module, hg.hparams.SelfTuned, hg.SelfTuning]:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.2, high=0.9), cut=hg.hparams.Integer(1, 0, 3), dtype=DT)
    model = _GroupNormStnNet(hp.size).to(memory_format=torch.channels_last)

    def loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        delta=True,
        linearize=linearize,
    )
    return model, hp, hopt


def test_delta_stn_without_linearisation_trains_a_channels_last_group_norm_net() -> None:
    """(New: no test ran Delta-STN on channels_last inputs or with GroupNorm.) With
    linearize=False the step is two ordinary passes, which torch runs on channels_last
    GroupNorm nets: it trains, leaves the running buffers alone, and the hyperstep is finite."""
    model, hp, hopt = _gn_stn(linearize=False)
    batch = _gn_batch()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        hopt.step(batch)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    info = hopt.hyper_step(val_batch=batch)
    assert math.isfinite(info.outer_loss) and math.isfinite(info.hypergrad_norm)


def test_delta_stn_names_the_linearisation_when_forward_ad_fails_inside_the_model() -> None:
    """torch's forward-mode AD of group_norm fails on channels_last inputs ("view size is not
    compatible with input tensor's size and stride"), so the response step's linearised model
    call fails where the base step, on the same batch, ran. The error must say that the
    linearisation failed and that linearize=False avoids it (as for an operation without a
    jvp), and the step must change nothing."""
    model, hp, hopt = _gn_stn(linearize=True)
    batch = _gn_batch()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"(?s)forward-mode AD.*linearize=False"):
        hopt.step(batch)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert hopt.inner_steps == 0


# ------------------------------------------------------------------ kernel="layerwise" on a conv net


def _conv_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular", dtype=DT),
        nn.Flatten(),
        nn.Linear(10, 3, dtype=DT),
    )


def _marglik(model: nn.Module, **kw: object) -> hg.MarginalLikelihood:
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=0.5)})
    return hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=20,
        inner_optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        **kw,  # type: ignore[arg-type]
    )


def test_a_layerwise_kernel_for_trained_conv_weights_is_refused_at_construction() -> None:
    """The sibling of round 19's check of the prior's structure: whether every trained weight sits
    in a plain nn.Linear is known when the MarginalLikelihood is built, and a trained
    convolution can never take the layerwise kernel. It was accepted, burn_in MAP steps ran, and
    the first hyperstep raised. A frozen conv body under a linear head (last-layer Laplace)
    stays accepted, with the evidence of the dense kernel."""
    with pytest.raises(ValueError, match=r"layerwise.*0\.weight"):
        _marglik(_conv_head(), kernel="layerwise", burn_in=1000)
    model = _conv_head()
    model[0].requires_grad_(False)
    x, y = torch.randn(6, 1, 5, dtype=DT), torch.tensor([0, 1, 2, 2, 1, 0])
    grads = [
        _marglik(model, kernel=k).hypergradient(train_batch=(x, y))[0][0] for k in ("layerwise", "dense")
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ packed variable-length RNNs


class _PackedRNN(nn.Module):
    """An LSTM or GRU over padded sequences packed with ``enforce_sorted=False`` (the batch in any
    order), the lengths read from the mask channel, the last hidden state into a linear head."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(2, 3, batch_first=True, dtype=DT)
        self.head = nn.Linear(3, 3, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = x[:, :, 2].sum(1).long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x[:, :, :2], lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.head((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_packed_variable_length_rnns_get_the_dense_laplace_evidence_and_hypergradient(
    cell: type[nn.Module], likelihood: str
) -> None:
    """(New: no marginal-likelihood test ran packed sequences.) Variable lengths in an unsorted
    batch, int32 class labels, the whole network under per-layer precisions (the dense kernel,
    whose vmap has no batching rule for the packing and loops): the evidence, its gradient and a
    MarginalLikelihood hypergradient on blocks of 2 with a last block of 1 are the GGN Laplace
    written out with the Jacobian of the whole batch."""
    torch.manual_seed(0)
    model = _PackedRNN(cell)
    g = torch.Generator().manual_seed(4)
    x = _sorted_padded_batch([2, 4, 1, 3, 4])
    y = (
        torch.tensor([2, 0, 1, 1, 0], dtype=torch.int32)
        if likelihood == "classification"
        else torch.randn(5, 3, generator=g, dtype=DT)
    )
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.7).to(DT)
    with torch.no_grad():
        for r, v in zip(prior.raw, (0.3, -0.4), strict=True):
            r.add_(v)
    sigma = 0.6 if likelihood == "regression" else None
    kw = {"noise": sigma} if sigma is not None else {}
    got = hg.log_evidence(model, x, y, prior, likelihood=likelihood, **kw)
    ref = _dense_evidence(model, x, y, prior, likelihood, sigma)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(
        torch.autograd.grad(got, list(prior.parameters())),
        torch.autograd.grad(ref, list(prior.parameters())),
        rtol=1e-8,
        atol=1e-12,
    )
    hp = nn.ModuleDict({"prior": prior})
    if sigma is not None:
        hp["noise"] = hg.hparams.ObservationNoise(sigma, dtype=DT)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood=likelihood,
        data_size=12,
        subset_size=2,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    grads, info = hopt.hypergradient(train_batch=(x, y))
    bound = _dense_evidence(model, x, y, prior, likelihood, sigma, data_size=12, block=2)
    assert info.outer_loss == pytest.approx(-float(bound.detach()) / 12, rel=1e-10)
    expected = torch.autograd.grad(-bound / 12, list(prior.parameters()))
    torch.testing.assert_close(grads[: len(expected)], expected, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ SelfTuning at the edges of the ranges


class _EdgeConvNet(nn.Module):
    """Grouped StnConv1d with reflect / replicate padding, GroupNorm or LayerNorm, cutout and
    dropout from the draw, a shared StnLinear used twice (an StnLinear head on top)."""

    def __init__(self, n: int, padding_mode: str, norm: str) -> None:
        super().__init__()
        self.conv = hg.nn.StnConv1d(2, 4, 3, n, padding=1, padding_mode=padding_mode, groups=2, dtype=DT)
        self.norm = nn.GroupNorm(2, 4, dtype=DT) if norm == "group" else nn.LayerNorm([4, 6], dtype=DT)
        self.shared = hg.nn.StnLinear(24, 24, n, dtype=DT)
        self.head = hg.nn.StnLinear(24, 3, n, dtype=DT)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        x = hg.nn.cutout(x, d["cut"], self.training)
        h = torch.tanh(self.norm(self.conv(x, d))).flatten(1)
        h = hg.nn.dropout(h, d["p"], self.training)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h, d)), d))  # one layer, two uses
        return self.head(h, d)


@pytest.mark.parametrize(
    ("padding_mode", "norm", "batch", "delta"),
    [("reflect", "group", 1, False), ("replicate", "layer", 3, True), ("reflect", "layer", 3, False)],
)
def test_stn_hypergradient_at_the_edges_of_the_ranges_is_the_derivative_of_the_objective(
    padding_mode: str, norm: str, batch: int, delta: bool
) -> None:
    """(New: reflect / replicate padding, GroupNorm and LayerNorm, a layer used twice, a batch of
    one, and hyperparameters at the edges of their ranges: a rate just below its high, an
    Integer at its upper bound, a per-batch Positive far below 1.) After two self-tuning steps,
    the hypergradient w.r.t. raw and raw_scale equals central differences of the documented
    objective L_V(w(lambda + sigma eps)) - tau sum log sigma, the model in eval mode, with the
    same eps (drawn from torch's generator from the same state); Delta-STN's layers see
    lambda + sigma eps - lambda_0, lambda_0 held at the current raw."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.899, high=0.9),
        cut=hg.hparams.Integer(3, 0, 3),
        pen=hg.hparams.Positive(1e-3, transform="exp", per_batch=True),
        dtype=DT,
    )
    model = _EdgeConvNet(hp.size, padding_mode, norm)
    with torch.no_grad():
        for _, layer in hg.nn.stn_layers(model):
            layer.hnet.normal_(0, 0.3)
    tau = 0.01

    def loss(m: nn.Module, h: hg.hparams.SelfTuned, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        entropy_weight=tau,
        delta=delta,
    )
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(batch, 2, 6, generator=g, dtype=DT), torch.randint(0, 3, (batch,), generator=g)
    for _ in range(2):
        hopt.step((x, y))
    torch.manual_seed(123)
    grads, _ = hopt.hypergradient(val_batch=(x, y))
    torch.manual_seed(123)
    eps = torch.randn(batch, hp.size, dtype=DT)
    eps[:, 2] = eps[0, 2]  # (pen is perturbed once per batch)
    raw0, rs0 = hp.raw.detach().clone(), hp.raw_scale.detach().clone()
    lo, hi = hp.scale_range
    model.eval()

    def objective(raw: torch.Tensor, rs: torch.Tensor) -> float:
        sigma = lo + (hi - lo) * torch.sigmoid(rs)
        lam = raw + sigma * eps
        feats = lam - raw0 if delta else lam
        draw = hg.hparams.Draw(feats, hp.values_of(lam))
        with torch.no_grad():
            out = model.head(
                torch.tanh(
                    model.shared(
                        torch.tanh(
                            model.shared(torch.tanh(model.norm(model.conv(x, draw))).flatten(1), draw)
                        ),
                        draw,
                    )
                ),
                draw,
            )
            return float(F.cross_entropy(out, y) - tau * sigma.log().sum())

    h = 1e-6
    assert float(grads[0].abs().max()) > 1e-4  # (a hypergradient that can fail)
    for which in (0, 1):
        for i in range(hp.size):
            e = torch.zeros(hp.size, dtype=DT)
            e[i] = h
            up = objective(raw0 + e, rs0) if which == 0 else objective(raw0, rs0 + e)
            down = objective(raw0 - e, rs0) if which == 0 else objective(raw0, rs0 - e)
            fd = (up - down) / (2 * h)
            assert float(grads[which][i]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (which, i)


# ------------------------------------------------------------------ a hypernetwork around a packed GRU


class _FrozenProjGRU(nn.Module):
    """A frozen input projection (a pretrained layer), a GRU over packed variable-length
    sequences and a head returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 3, dtype=DT).requires_grad_(False)
        self.rnn = nn.GRU(3, 3, batch_first=True, dtype=DT)
        self.head = nn.Linear(3, 3, dtype=DT)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths = x[:, :, 2].sum(1).long().cpu()
        z = torch.tanh(self.proj(x[:, :, :2]))
        _, h = self.rnn(nn.utils.rnn.pack_padded_sequence(z, lengths, batch_first=True, enforce_sorted=False))
        return {"logits": self.head(h[-1])}


def test_best_response_through_a_packed_gru_with_a_frozen_layer_is_the_derivative_of_val_loss() -> None:
    """(New: no hypernetwork test ran packed sequences.) HyperNet generating a GRU's weights and
    a head around a frozen projection, a dict output, int32 labels: after two BestResponse steps
    the hypergradient is the central difference of the validation loss at the generated weights
    (eval mode, lambda itself), the frozen layer untouched by the steps."""
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        decay=hg.hparams.Positive(0.05, transform="exp"),
        k=hg.hparams.Integer(4, 0, 4),
        learn_scale=False,
        dtype=DT,
    )
    base = _FrozenProjGRU()
    frozen = base.proj.weight.detach().clone()
    net = hg.nn.HyperNet(base, hp.size, init_std=0.2)
    x = _sorted_padded_batch([3, 1, 4, 2])
    y = torch.tensor([1, 0, 2, 1], dtype=torch.int32)

    def train(m: nn.Module, h: hg.hparams.SelfTuned, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w = m.weights(h)
        ce = F.cross_entropy(m(b[0], hparams=h)["logits"], b[1].long())
        return ce + h.draw(1)["decay"][0] * sum(v.square().sum() for k, v in w.items() if k.startswith("rnn"))

    def val(m: nn.Module, h: hg.hparams.SelfTuned, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h)["logits"], b[1].long())

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
    )
    for _ in range(2):
        hopt.step((x, y))
    grads, info = hopt.hypergradient(val_batch=(x, y))
    raw0 = hp.raw.detach().clone()
    net.eval()

    def objective(raw: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(x, hparams=raw)["logits"], y.long()))

    assert info.outer_loss == pytest.approx(objective(raw0), rel=1e-12)
    for i in range(hp.size):
        e = torch.zeros(hp.size, dtype=DT)
        e[i] = 1e-6
        fd = (objective(raw0 + e) - objective(raw0 - e)) / 2e-6
        assert float(grads[0][i]) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert float(grads[0].abs().max()) > 1e-4
    assert torch.equal(base.proj.weight, frozen)


# ------------------------------------------------------------------ sequences cut to the batch's longest


class _CutToLongest(nn.Module):
    """A GRU over padded sequences cut to the longest of the batch (as a collate padding to the
    batch's longest gives them), read at the last step: a shorter sequence reads as many trailing
    pads as the batch's longest leaves it, so its output depends on the other examples."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 3, batch_first=True, dtype=DT)
        self.head = nn.Linear(3, 3, dtype=DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        longest = int(x[:, :, 2].sum(1).max())
        out, _ = self.rnn(x[:, :longest, :2])
        return self.head(out[:, -1])


def test_a_model_cutting_sequences_to_the_batchs_longest_is_refused_when_the_ends_are_longest() -> None:
    """The first and the last sequence are the batch's longest, so each alone gives its row of
    the batch, while the three between them read other numbers of pads than alone: the model's
    output depends on the other examples, which the evidence (the dense kernel here: the GRU
    trains) must refuse, in the pure function and at a hyperstep, changing nothing. It gave
    -9.985, neither the batch function's evidence (-10.009) nor that of examples run alone."""
    torch.manual_seed(0)
    model = _CutToLongest()
    x = _sorted_padded_batch([4, 2, 3, 1, 4], t=6)
    y = torch.tensor([0, 2, 1, 1, 0])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.8).to(DT)
    for kernel in ("auto", "dense"):
        with pytest.raises(ValueError, match="depends on the other examples"):
            hg.log_evidence(model, x, y, prior, kernel=kernel)
    hp = nn.ModuleDict({"prior": prior})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=10,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )
    before = [t.detach().clone() for t in hp.parameters()]
    with pytest.raises(ValueError, match="depends on the other examples"):
        hopt.hyper_step(train_batch=(x, y))
    assert all(torch.equal(a, t) for a, t in zip(before, hp.parameters(), strict=True))


def test_the_model_cutting_to_the_longest_on_full_length_batches_gets_the_dense_evidence() -> None:
    """(The other side of the check above, new: a batch of sequences all of the longest length
    leaves the model per example, so its evidence is the GGN Laplace written out, not refused.)"""
    torch.manual_seed(0)
    model = _CutToLongest()
    x = _sorted_padded_batch([5, 5, 5, 5], t=6)
    y = torch.tensor([0, 2, 1, 1])
    prior = hg.hparams.PriorPrecision(model, per="layer", init=0.8).to(DT)
    got = hg.log_evidence(model, x, y, prior)
    assert float(got.detach()) == pytest.approx(
        float(_dense_evidence(model, x, y, prior, "classification").detach()), rel=1e-10
    )
