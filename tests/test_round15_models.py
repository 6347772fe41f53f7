"""``hg.Implicit`` on the architectures researchers tune (round 15): a GPT-style block (token and
position embeddings, causal ``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``,
LayerNorm, GELU, a decoder tied to the embedding) with one decay per weight entry;
``nn.TransformerEncoder`` with a padding mask in evaluation mode (its fast-path candidate);
multi-layer bidirectional LSTMs and GRUs on packed sequences; spectral normalisation; a
MobileNetV3-style squeeze-excitation gate. Ground truth: the IFT formula assembled from central
finite differences of first-order ``autograd.grad`` of the training loss on the real model
(float64), which shares no second-order code with the library, and
``hypergrad.testing.dense_ift_hypergradient``. The tests of the fixes (marked "failed before")
failed before them:

* ``nn.utils.parametrizations.spectral_norm`` / ``nn.utils.spectral_norm`` in training mode: torch
  differentiates ``W / (u^T W v)`` with the power iteration's ``u, v`` constant, so the Hessian
  lacks the curvature of the largest singular value that the converged vectors follow: a
  hypergradient 87% off the finite differences of the training gradient (5e-10 after);
* ``nn.Hardsigmoid`` (MobileNetV3's squeeze-excitation gate) raised "derivative for
  aten::hardsigmoid_backward is not implemented".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.nn.utils.spectral_norm import SpectralNorm

import hypergrad as hg
import hypergrad.testing as ht

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


def _fd_ift(
    model: nn.Module, hp: nn.Module, train: Loss, val: Loss, tb: Any, vb: Any, eps: float = 1e-6
) -> Tensor:
    r""":math:`\partial_\lambda L_V - M^\top H^{-1} \partial_w L_V` with :math:`H` and :math:`M`
    the central differences of first-order ``autograd.grad`` of ``train`` (buffers restored
    after every evaluation)."""
    ws = [p for p in model.parameters() if p.requires_grad]
    hs = list(hp.parameters())
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]

    def grad(loss: Loss, batch: Any, wrt: list[Tensor]) -> Tensor:
        gs = torch.autograd.grad(loss(model, hp, batch), wrt, allow_unused=True)
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)
        return _flat(torch.zeros_like(t) if g is None else g for g, t in zip(gs, wrt, strict=True))

    def columns(ts: list[Tensor]) -> Tensor:
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

    h, m = columns(ws), columns(hs)
    g = grad(val, vb, ws + hs)
    n = h.shape[0]
    return g[n:] - m.T @ torch.linalg.solve(0.5 * (h + h.T), g[:n])


def _implicit(model: nn.Module, hp: nn.Module, train: Loss, val: Loss, solver: Any = None) -> hg.Implicit:
    return hg.Implicit(
        model, hp, train, val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct() if solver is None else solver,
    )  # fmt: skip


def _hypergrad(
    model: nn.Module, hp: nn.Module, train: Loss, val: Loss, tb: Any, vb: Any, solver: Any = None
) -> Tensor:
    grads, _ = _implicit(model, hp, train, val, solver).hypergradient(train_batch=tb, val_batch=vb)
    return _flat(grads)


# ----------------------------------------------------------------------------- a GPT-style block

V, D, T, HEADS = 5, 4, 4, 2


class _Block(nn.Module):
    def __init__(self, attention: str, gelu: str) -> None:
        super().__init__()
        self.attention, self.gelu = attention, gelu
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(D, HEADS, dropout=0.0, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        if self.attention == "mha":
            causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
            a = self.attn(h, h, h, attn_mask=causal)[0]
        else:
            q, k, v = (t.view(-1, T, HEADS, D // HEADS).transpose(1, 2) for t in self.qkv(h).split(D, -1))
            a = self.proj(
                F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(-1, T, D)
            )
        x = x + a
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate=self.gelu))


class _GPT(nn.Module):
    def __init__(self, attention: str, gelu: str) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.drop = nn.Dropout(0.0)
        self.block, self.ln_f = _Block(attention, gelu), nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.tok.weight  # weight tying

    def forward(self, idx: Tensor) -> Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T)))
        return self.head(self.ln_f(self.block(x)))


def _lm(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]).reshape(-1, V), b[1].reshape(-1))


def _lm_penalised(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _lm(m, h, b) + h.penalty(m)


def _tokens() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    return (
        (torch.randint(0, V, (3, T), generator=g), torch.randint(0, V, (3, T), generator=g)),
        (torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)),
    )


def _gpt(attention: str, gelu: str, decay: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    model = _GPT(attention, gelu).to(DT)
    return model, hg.hparams.WeightDecay(model, per="parameter", init=decay)


@pytest.mark.parametrize(("attention", "gelu"), [("mha", "tanh"), ("sdpa", "none")])
def test_gpt_block_with_tied_decoder_matches_finite_differences(attention: str, gelu: str) -> None:
    """One decay per weight entry of a causal transformer block with a tied decoder: Direct
    equals the IFT from finite differences of the training gradient (so every second derivative
    on the way, attention's, LayerNorm's, GELU's, cross-entropy's, is checked) and the dense
    reference."""
    model, hp = _gpt(attention, gelu, 0.05)
    assert model.head.weight is model.tok.weight
    tb, vb = _tokens()
    got = _hypergrad(model, hp, _lm_penalised, _lm, tb, vb)
    fd = _fd_ift(model, hp, _lm_penalised, _lm, tb, vb)
    assert fd.abs().max() > 1e-3
    assert _rel(got, fd) < 1e-6
    dense = _flat(ht.dense_ift_hypergradient(model, hp, _lm_penalised, _lm, tb, vb))
    assert _rel(got, dense) < 1e-10


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_gpt_block_iterative_solvers_reach_the_dense_solution(solver: str) -> None:
    """With decays large enough for a positive definite Hessian (eigenvalues in about
    [14, 83]), CG and a long Neumann series reach the dense IFT hypergradient."""
    model, hp = _gpt("mha", "tanh", 40.0)
    tb, vb = _tokens()
    dense = _flat(ht.dense_ift_hypergradient(model, hp, _lm_penalised, _lm, tb, vb))
    s = hg.CG(maxiter=100, tol=1e-13) if solver == "cg" else hg.Neumann(steps=250, alpha=0.012)
    got = _hypergrad(model, hp, _lm_penalised, _lm, tb, vb, s)
    assert _rel(got, dense) < 1e-8


# ----------------------------------------------------------------------------- sequences


class _Head(nn.Module):
    def __init__(self, body: nn.Module, kind: str, width: int) -> None:
        super().__init__()
        self.body, self.kind, self.head = body, kind, nn.Linear(width, 1)

    def forward(self, b: Any) -> Tensor:
        x, lengths = b
        if self.kind == "packed":
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.body(packed)[0], batch_first=True, total_length=x.shape[1])
        else:
            out = self.body(x, src_key_padding_mask=torch.arange(x.shape[1])[None, :] >= lengths[:, None])
        return self.head(out).squeeze(-1).mean(1)


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _mse(m, h, b) + h.penalty(m)


def _sequences(d: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    return (
        (
            (torch.randn(3, 5, d, generator=g, dtype=DT), torch.tensor([5, 3, 4])),
            torch.randn(3, generator=g, dtype=DT),
        ),
        (
            (torch.randn(2, 5, d, generator=g, dtype=DT), torch.tensor([2, 5])),
            torch.randn(2, generator=g, dtype=DT),
        ),
    )


def _check_sequence_model(body: nn.Module, kind: str, width: int, d: int, train: bool) -> None:
    torch.manual_seed(1)
    model = _Head(body, kind, width).to(DT).train(train)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    tb, vb = _sequences(d)
    got = _hypergrad(model, hp, _penalised, _mse, tb, vb)
    fd = _fd_ift(model, hp, _penalised, _mse, tb, vb)
    assert _rel(got, fd) < 1e-6


def test_transformer_encoder_with_padding_mask_in_eval_mode_matches_finite_differences() -> None:
    """A 2-layer ``nn.TransformerEncoder`` (nested tensors enabled) with a key padding mask in
    evaluation mode, where torch takes its fused fast path when no gradient is needed."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(2, 2, dim_feedforward=3, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    _check_sequence_model(encoder, "padmask", 2, 2, train=False)


@pytest.mark.parametrize(("cell", "layers"), [(nn.LSTM, 2), (nn.GRU, 1)])
def test_bidirectional_rnn_on_packed_sequences_matches_finite_differences(cell: type, layers: int) -> None:
    torch.manual_seed(1)
    _check_sequence_model(
        cell(2, 2, num_layers=layers, bidirectional=True, batch_first=True), "packed", 4, 2, True
    )


def test_an_operation_without_second_derivative_is_named() -> None:
    """``F.ctc_loss`` has no double backward in torch 2.13: Implicit says which operation and
    what to do, instead of torch's bare "derivative for ... is not implemented"."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(DT)
    hp = hg.hparams.WeightDecay(model, per="global", init=0.05)
    targets, in_lengths, target_lengths = (
        torch.tensor([[1, 2], [3, 1]]),
        torch.tensor([6, 5]),
        torch.tensor([2, 2]),
    )

    def ctc(m: nn.Module, h: nn.Module, b: Tensor) -> Tensor:
        return F.ctc_loss(m(b).log_softmax(-1), targets, in_lengths, target_lengths) + h.penalty(m)

    x = torch.randn(6, 2, 3, dtype=DT)
    with pytest.raises(
        RuntimeError, match=r"Implicit differentiates the training loss twice.*_ctc_loss_backward"
    ):
        _implicit(model, hp, ctc, ctc).hypergradient(train_batch=x, val_batch=x)


# ----------------------------------------------------------------------------- spectral norm


def _spectral_mlp(api: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    if api == "parametrization":
        nn.utils.parametrizations.spectral_norm(model[0])
        sn: Any = model[0].parametrizations.weight[0]
    else:
        nn.utils.spectral_norm(model[0])
        sn = next(h for h in model[0]._forward_pre_hooks.values() if isinstance(h, SpectralNorm))
    return model, sn


def _regression() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    return (
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)),
        (torch.randn(6, 4, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)),
    )


def _mse2(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def _penalised2(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _mse2(m, h, b) + h.penalty(m)


@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_spectral_norm_in_training_mode_has_the_curvature_of_the_top_singular_value(api: str) -> None:
    """Failed before (87% off). In training mode the power iteration follows the weights, so at a
    rest point of training the layer computes ``W / sigma_max(W)``: the truth is the finite
    differences of the training gradient with the power iteration converged at every evaluation
    (100 iterations from the converged vectors). In evaluation mode (``u, v`` frozen) the layer
    computes ``W / (u^T W v)`` with constant ``u, v``, as torch differentiates it."""
    model, sn = _spectral_mlp(api)
    tb, vb = _regression()
    with torch.no_grad():
        for _ in range(200):  # the power iteration converged, as at the end of training
            model(tb[0])
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    got = _hypergrad(model, hp, _penalised2, _mse2, tb, vb)
    sn.n_power_iterations = 100
    fd = _fd_ift(model, hp, _penalised2, _mse2, tb, vb)
    sn.n_power_iterations = 1
    assert _rel(got, fd) < 1e-6
    frozen = _hypergrad(model.eval(), hp, _penalised2, _mse2, tb, vb)
    fd_frozen = _fd_ift(model, hp, _penalised2, _mse2, tb, vb)
    assert _rel(frozen, fd_frozen) < 1e-6
    assert _rel(fd_frozen, fd) > 0.1  # (the two modes differ: the test can tell them apart)


def test_spectral_norm_correction_keeps_the_value_and_gradient() -> None:
    """The added term changes neither the loss nor its gradient, only the second derivative; and
    outside the Implicit solve (an ordinary forward) nothing is replaced."""
    from hypergrad._functional import differentiable_twice

    model, _ = _spectral_mlp("parametrization")
    tb, _ = _regression()
    with torch.no_grad():
        for _ in range(50):
            model(tb[0])
    forward = nn.utils.parametrizations._SpectralNorm.forward
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _mse2(model, None, tb)  # type: ignore[arg-type]
    g_plain = torch.autograd.grad(plain, list(model.parameters()))
    model.load_state_dict(state)
    with differentiable_twice(at_fixed_point=True):
        assert nn.utils.parametrizations._SpectralNorm.forward is not forward
        fixed = _mse2(model, None, tb)  # type: ignore[arg-type]
        g_fixed = torch.autograd.grad(fixed, list(model.parameters()))
    assert nn.utils.parametrizations._SpectralNorm.forward is forward
    assert fixed.item() == plain.item()
    for a, b in zip(g_fixed, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- hard sigmoid


class _SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excitation block (torchvision's ``SqueezeExcitation`` defaults)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 3, 1)
        self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.hardswish(self.conv(x))
        s = self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head((h * s).mean((2, 3))).squeeze(-1)


def test_hardsigmoid_gate_matches_finite_differences() -> None:
    """Failed before: "derivative for aten::hardsigmoid_backward is not implemented"."""
    torch.manual_seed(0)
    model = _SqueezeExcite().to(DT)
    with torch.no_grad():
        model.fc2.bias.mul_(8.0)  # gates on both flat parts and the slope
    g = torch.Generator().manual_seed(1)
    tb = (torch.randn(4, 2, 4, 4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT))
    vb = (torch.randn(3, 2, 4, 4, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT))
    pre = model.fc2(model.act(model.fc1(F.adaptive_avg_pool2d(F.hardswish(model.conv(tb[0])), 1))))
    assert (pre.abs() < 3).any() and (pre.abs() > 3).any()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)
    got = _hypergrad(model, hp, _penalised2, _mse2, tb, vb)
    assert _rel(got, _fd_ift(model, hp, _penalised2, _mse2, tb, vb)) < 1e-6
