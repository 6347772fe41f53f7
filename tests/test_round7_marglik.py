"""Round 7, marginal likelihood: models the layerwise kernel mistook, the exact form, RNNs, autocast.

Every evidence here is checked in float64 against an independent dense closed form: the
linearised-Laplace evidence log p(D|θ) − ½θᵀP0θ − ½(log det(P0 + JᵀΛJ) − log det P0) with the
Jacobian J from ``torch.func.jacrev`` of the whole batch (no per-layer factors, no vmap per
example), and its gradient w.r.t. the raw hyperparameters by autograd through that formula.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _closed_form(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: hg.hparams.PriorPrecision,
    likelihood: str,
    noise: hg.hparams.ObservationNoise | None = None,
) -> torch.Tensor:
    """The dense linearised-Laplace log evidence, differentiable w.r.t. the prior's (and the
    noise's) raw tensors; weights, Jacobians and the softmax Hessian held fixed."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**params, **ps}, (x,)).reshape(x.shape[0], -1)

    mine = {n: params[n] for n in names}
    out = f(mine).detach()
    jac = torch.func.jacrev(f)(mine)
    j = torch.cat([jac[n].reshape(out.numel(), -1).detach() for n in names], 1)
    theta = torch.cat([params[n].reshape(-1) for n in names])
    prec = prior.precisions()
    delta = torch.cat([prec[n].expand(params[n].shape).reshape(-1) for n in names])
    if likelihood == "regression":
        assert noise is not None
        sigma = noise()
        lam = torch.eye(out.numel(), dtype=DT) / sigma**2
        log_lik = torch.distributions.Normal(out, sigma).log_prob(y.reshape(out.shape)).sum()
    else:
        p = out.softmax(1)
        lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
        log_lik = -F.cross_entropy(out, y, reduction="sum")
    a = torch.diag(delta) + j.T @ lam @ j
    return log_lik - 0.5 * (delta * theta**2).sum() - 0.5 * (torch.logdet(a) - delta.log().sum())


def _check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str,
    *,
    per: str = "layer",
    kernels: tuple[str, ...] = ("auto", "dense"),
    forms: tuple[str, ...] = ("ntk", "parametric"),
) -> None:
    """Evidence and its gradient equal the closed form for every kernel and form asked."""
    torch.manual_seed(5)
    prior = hg.hparams.PriorPrecision(model, per=per, init=1.7).to(DT)
    noise = hg.hparams.ObservationNoise(0.6).to(DT) if likelihood == "regression" else None
    with torch.no_grad():
        for r in prior.parameters():
            r.add_(0.3 * torch.randn_like(r))
    raws = [*prior.parameters(), *([] if noise is None else noise.parameters())]
    closed = _closed_form(model, x, y, prior, likelihood, noise)
    g_closed = torch.autograd.grad(closed, raws)
    for kernel in kernels:
        for form in forms:
            ev = hg.log_evidence(
                model, x, y, prior, likelihood=likelihood, noise=noise, kernel=kernel, form=form
            )
            torch.testing.assert_close(ev, closed, rtol=1e-11, atol=1e-10, msg=f"{kernel} {form}")
            for a, b in zip(torch.autograd.grad(ev, raws), g_closed, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{kernel} {form}")


def _hopt(model: nn.Module, hp: nn.Module, likelihood: str, n: int, **kw) -> hg.MarginalLikelihood:
    return hg.MarginalLikelihood(
        model,
        hp,
        likelihood=likelihood,
        data_size=n,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        **kw,
    )


# ------------------------------------------------------------------ the layerwise kernel's blind spots


class _TokenWise(nn.Module):
    """A per-position MLP written on flattened rows: nn.Linear sees (B*T, d), one row per token."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T*3) -> (B, T*2), T = 4
        b = x.shape[0]
        return self.l2(torch.tanh(self.l1(x.reshape(b * 4, 3)))).reshape(b, 8)


def test_a_token_wise_linear_layer_on_flattened_rows_gets_the_true_kernel() -> None:
    """nn.Linear on (B*T, d) rows passed the layerwise kernel's "(B, d) inputs" check (it looked
    only at the number of dimensions), and the rows were reshaped per example: the kernel became
    (Σ_t g·g)(Σ_t a·a) instead of Σ_{t,t'} (g_t·g_t')(a_t·a_t'). Regression, B = 6, T = 4, σ = 0.5,
    δ = 2: log evidence −212.12 against the true −172.05. It now takes the dense kernel."""
    torch.manual_seed(0)
    model = _TokenWise().to(DT)
    x, y = torch.randn(6, 12, dtype=DT), torch.randn(6, 8, dtype=DT)
    _check(model, x, y, "regression")
    # and through the hyperstep: .grad is -(1/N) d(evidence)/d(raw)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="layer", init=2.0),
            "noise": hg.hparams.ObservationNoise(0.5),
        }
    ).to(DT)
    closed = _closed_form(model, x, y, hp["prior"], "regression", hp["noise"])
    g_closed = torch.autograd.grad(closed, list(hp.parameters()))
    info = _hopt(model, hp, "regression", 6, bound="exact").hyper_step(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(-float(closed.detach()) / 6, rel=1e-11)
    for p, g in zip(hp.parameters(), g_closed, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, -g / 6, rtol=1e-9, atol=1e-12)
    # layerwise asked for by name: a clear refusal, not the wrong number
    with pytest.raises(ValueError, match=r"kernel='layerwise' needs.*one row per example"):
        hg.log_evidence(model, x, y, hp["prior"], likelihood="regression", noise=0.5, kernel="layerwise")


class _TiedAutoencoder(nn.Module):
    """The decoder reads the encoder's weight outside any nn.Linear: F.linear(h, enc.weight.T)."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.T)


@pytest.mark.parametrize("bias", [False, True])
def test_a_weight_read_outside_its_linear_layer_counts_both_uses(bias: bool) -> None:
    """A tied decoder F.linear(h, enc.weight.T): every trained weight sat in one nn.Linear used
    once, so the layerwise kernel took it and saw only the encoder's use of the weight (7
    examples, σ = 0.5, δ = 2: log evidence −61.21 against the true −64.86). A weight entering
    the autograd graph more than once now takes the dense kernel."""
    torch.manual_seed(1)
    model = _TiedAutoencoder(bias).to(DT)
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 4, dtype=DT)
    _check(model, x, y, "regression", per="global")
    _check(model, x, y, "regression", per="layer", forms=("ntk",))


class _HalfDetached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 0.1 * self.b(x).detach()  # b trains through no path to the outputs


def test_a_linear_layer_whose_output_is_detached_has_a_zero_jacobian_not_a_crash() -> None:
    """The layerwise kernel asked autograd for the output gradients of a layer the outputs do not
    reach: "The differentiated Tensor at index 1 appears to not have been used in the graph"
    (the dense kernel gave the evidence). Its Jacobian is zero, as the dense kernel says."""
    torch.manual_seed(2)
    model = _HalfDetached().to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 4, (5,))
    _check(model, x, y, "classification")


# ------------------------------------------------------------------ the exact form


def test_the_exact_form_refuses_a_per_output_bound_instead_of_returning_it() -> None:
    """log_evidence_bound(form='exact', outputs='each') returned the looser per-output bound
    under the name "exact" (−19.14 against the exact −18.31 on 10 examples, 3 classes), while
    MarginalLikelihood(bound='exact') silently used outputs='all'. Both now refuse the pair."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    prior = hg.hparams.PriorPrecision(model, init=1.5).to(DT)
    exact = hg.log_evidence_bound(model, x, y, prior, data_size=10, form="exact")
    torch.testing.assert_close(
        exact, _closed_form(model, x, y, prior, "classification"), rtol=1e-11, atol=1e-10
    )
    each = hg.log_evidence_bound(model, x, y, prior, data_size=10, outputs="each")
    assert float(each.detach()) < float(exact.detach()) - 0.1  # "each" is a strictly looser bound here
    for outputs in ("each", "sampled"):
        with pytest.raises(ValueError, match=rf"outputs='{outputs}' is a bound, not the exact evidence"):
            hg.log_evidence_bound(model, x, y, prior, data_size=10, form="exact", outputs=outputs)
        with pytest.raises(ValueError, match=rf"outputs='{outputs}' is a bound.*bound='exact'"):
            _hopt(
                model, nn.ModuleDict({"prior": prior}), "classification", 10, bound="exact", outputs=outputs
            )


# ------------------------------------------------------------------ models vmap cannot batch


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn, self.head = cell(2, 3, batch_first=True), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_models_get_the_evidence_one_backward_pass_at_a_time(cell: type[nn.Module]) -> None:
    """nn.GRU under vmap writes the batched step into its unbatched initial state: "output with
    shape [1, 3] doesn't match the broadcast shape [4, 1, 3]", a RuntimeError without the word
    "vmap" in it, so the fallback to per-example backward passes was not taken and every
    kernel and form crashed. Any error under vmap now falls back (an error of the model itself
    is raised again by the plain forward pass)."""
    torch.manual_seed(3)
    model = _Recurrent(cell).to(DT)
    x, y = torch.randn(4, 3, 2, dtype=DT), torch.randint(0, 2, (4,))
    _check(model, x, y, "classification")
    # the training loop: a hyperstep with and without differentiating through the MAP
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    for through_map in (False, True):
        info = _hopt(model, hp, "classification", 8, through_map=through_map).hyper_step(train_batch=(x, y))
        assert not info.skipped and all(torch.isfinite(p.grad).all() for p in hp.parameters())


def test_an_error_of_the_model_itself_still_surfaces_under_the_dense_kernel() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x) @ torch.ones(5, 2, dtype=x.dtype)  # (.., 2) @ (5, 2): a shape error

    model = Broken().to(DT)
    prior = hg.hparams.PriorPrecision(model).to(DT)
    with pytest.raises(RuntimeError, match=r"cannot be multiplied|size mismatch|shapes"):
        hg.log_evidence(model, torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,)), prior, kernel="dense")


# ------------------------------------------------------------------ models that were already right


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2))


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e, self.l = nn.Embedding(7, 3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.e(x).mean(1))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.l = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.a(x, x, x, need_weights=False)[0].mean(1))


_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor], int]] = {
    "conv": (_conv, lambda g: torch.randn(5, 1, 6, 6, generator=g, dtype=DT), 2),
    "embedding": (_Embed, lambda g: torch.randint(0, 7, (6, 2), generator=g), 4),
    "attention": (_Attention, lambda g: torch.randn(4, 3, 4, generator=g, dtype=DT), 3),
    "layernorm": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)),
        lambda g: torch.randn(5, 3, generator=g, dtype=DT),
        3,
    ),
    "weight_norm": (
        lambda: nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.utils.parametrizations.weight_norm(nn.Linear(5, 3))
        ),
        lambda g: torch.randn(5, 3, generator=g, dtype=DT),
        3,
    ),
    "one example, 20 classes": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 20)),
        lambda g: torch.randn(1, 3, generator=g, dtype=DT),
        20,
    ),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback
@pytest.mark.parametrize("name", list(_MODELS))
@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_other_architectures_match_the_dense_closed_form(name: str, per: str) -> None:
    build, inputs, c = _MODELS[name]
    torch.manual_seed(4)
    model = build().to(DT).eval()
    g = torch.Generator().manual_seed(6)
    x = inputs(g)
    _check(model, x, torch.randint(0, c, (x.shape[0],), generator=g), "classification", per=per)


def test_conv_regression_with_noise_matches_the_closed_form_for_every_prior_structure() -> None:
    torch.manual_seed(7)
    model = _conv().to(DT)
    x, y = torch.randn(5, 1, 6, 6, dtype=DT), torch.randn(5, 2, dtype=DT)
    for per in ("global", "layer", "parameter"):
        _check(model, x, y, "regression", per=per)


# ------------------------------------------------------------------ autocast


def test_a_sharp_regression_hyperstep_under_bf16_autocast_is_finite_and_close_to_float32() -> None:
    """The kernel algebra ran under the caller's autocast: Gram products in bfloat16, then the
    Cholesky of I + JJᵀ/σ² (entries ~1e4 for σ = 0.02) failed, the bound was NaN and every kind
    of hyperstep was refused as non-finite (the float32 one was fine). The model still runs under
    autocast; the kernels and their log det are now formed in the weights' precision."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1) + 0.01 * torch.randn(64, 1)
    for kernel, bound in (("layerwise", "ntk"), ("dense", "ntk"), ("dense", "parametric")):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="layer"),
                "noise": hg.hparams.ObservationNoise(0.02),
            }
        )
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="regression",
            data_size=640,
            kernel=kernel,
            bound=bound,
            inner_optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )
        for _ in range(30):
            hopt.step((x, y))
        full, info_full = hopt.hypergradient(train_batch=(x, y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, info_half = hopt.hypergradient(train_batch=(x, y))
            info = hopt.hyper_step(train_batch=(x, y))  # on_nonfinite="raise": no NonFiniteError
        assert not info.skipped and all(g.dtype == torch.float32 for g in half)
        a, b = torch.cat([g.reshape(-1) for g in full]), torch.cat([g.reshape(-1) for g in half])
        assert float((a - b).norm() / a.norm()) < 0.01, kernel
        assert info_half.outer_loss == pytest.approx(info_full.outer_loss, rel=1e-2)


# ------------------------------------------------------------------ wrappers


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_pure_functions_look_through_torch_compile_as_the_prior_does() -> None:
    """PriorPrecision(torch.compile(model)) holds the bare module's names ("0.weight"), but
    log_evidence on the compiled model looked for them among "_orig_mod.0.weight" and refused
    with "the PriorPrecision covers none of the model's trainable weights (built for another
    model ...)". The bound now runs on the bare module (nothing is compiled: no double backward)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    compiled = torch.compile(model)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    for prior in (
        hg.hparams.PriorPrecision(model, per="layer"),
        hg.hparams.PriorPrecision(compiled, per="layer"),
    ):
        prior = prior.to(DT)
        closed = _closed_form(model, x, y, prior, "classification")
        for kernel in ("auto", "dense"):
            ev = hg.log_evidence(compiled, x, y, prior, kernel=kernel)
            torch.testing.assert_close(ev, closed, rtol=1e-11, atol=1e-10)
            b = hg.log_evidence_bound(
                compiled, x[:4], y[:4], prior, data_size=6, subset_size=2, kernel=kernel
            )
            assert float(b.detach()) < float(closed.detach())


def test_a_global_module_forward_hook_that_rewrites_outputs_is_part_of_the_model() -> None:
    """A hook registered for every module (nn.modules.module.register_module_forward_hook) runs
    before a layer's own hooks: one returning 2 * out made the layerwise kernel that of z = W a + b
    for layers that give 2 z (log evidence -15.35 against the true -20.59). It now takes the
    dense kernel. A global *pre*-hook rewriting the inputs was already right (the layer's
    recorded input is the rewritten one): checked too."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))

    def doubled(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        return 2 * out if isinstance(mod, nn.Linear) else None

    def tripled(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        return (3 * inp[0],) if isinstance(mod, nn.Linear) else None

    for register, hook in (
        (nn.modules.module.register_module_forward_hook, doubled),
        (nn.modules.module.register_module_forward_pre_hook, tripled),
    ):
        handle = register(hook)  # one at a time: a failure must not leave the other registered
        try:
            _check(model, x, y, "classification", forms=("ntk",))
        finally:
            handle.remove()


# ------------------------------------------------------------------ the learned augmentation


def test_random_translation_moves_non_square_images_along_the_right_axes() -> None:
    """Existing checks use square images or 1-D signals, where swapped axes (grid_sample's grid is
    (x = width, y = height)) or a scale per the wrong side would go unseen. On a 6 x 10 image the
    centroid of the (bilinearly) shifted bump moves by exactly the drawn shift t = u * range:
    rows by t[:, 0], columns by t[:, 1]; the mass is kept (the bump stays inside)."""
    h, w = 6, 10
    aug = hg.hparams.RandomTranslation((h, w), init=1.4).to(DT)
    img = torch.zeros(h, w, dtype=DT)
    img[2:4, 4:6] = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DT)
    torch.manual_seed(0)
    out = aug(img.reshape(1, -1).repeat(3, 1), samples=2).detach().reshape(6, h, w)
    torch.manual_seed(0)
    t = ((torch.rand(6, 2, dtype=DT) * 2 - 1) * aug.value).detach()  # the same draws
    rows, cols = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")

    def centroid(a: torch.Tensor) -> torch.Tensor:
        return torch.stack([(a * rows).sum(), (a * cols).sum()]) / a.sum()

    assert float(t[:, 0].abs().max()) > 0.5 and float(t[:, 1].abs().max()) > 0.5  # both axes move
    for k in range(6):
        torch.testing.assert_close(centroid(out[k]) - centroid(img), t[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[k].sum(), img.sum(), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ half-precision models


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_a_float32_bound_instead_of_a_cholesky_crash(half: torch.dtype) -> None:
    """A bfloat16 / float16 model: the kernels were formed in its dtype and the Cholesky crashed
    ('"cholesky_cpu" not implemented for 'BFloat16''), for the pure functions and at every
    hyperstep. The bound's own arithmetic is now at least float32 (the model still runs in
    its dtype): close to the float32 model's bound, and a run learns what the float32 one does."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1) + 0.1 * torch.randn(64, 1)
    values, learned = [], []
    for dt in (torch.float32, half):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dt)
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="layer"),
                "noise": hg.hparams.ObservationNoise(0.3),
            }
        ).float()
        for kernel in ("auto", "dense"):
            ev = hg.log_evidence(
                model, x.to(dt), y.to(dt), hp["prior"], likelihood="regression", noise=0.3, kernel=kernel
            )
            assert ev.dtype == torch.float32
            values.append(float(ev.detach()))
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="regression",
            data_size=64,
            # (SGD: torch's Adam in float16 divides by an eps of 1e-8 that rounds to 0)
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        )
        for i in range(40):
            hopt.step((x.to(dt), y.to(dt)))
            if i % 10 == 9:
                assert not hopt.hyper_step(train_batch=(x.to(dt), y.to(dt))).skipped
        learned.append(torch.cat([p.detach().reshape(-1) for p in hp.parameters()]))
    assert values[2] == pytest.approx(values[0], rel=5e-3) and values[3] == pytest.approx(values[1], rel=5e-3)
    moved = learned[0] - torch.tensor([0.0, 0.0, -1.2039728])  # from log(1), log(1), log(0.3)
    assert float(moved.abs().min()) > 1e-3  # every hyperparameter moved
    torch.testing.assert_close(learned[1], learned[0], rtol=0, atol=0.02 * float(moved.abs().max()))


def test_a_float16_models_map_loss_sums_the_batch_in_float32() -> None:
    """The MAP loss summed the batch's log-likelihood in the model's dtype before dividing by B:
    for a float16 regression of 1,000 examples with residuals ~ 10 sigma, the sum passed 65,504
    and step() was refused as non-finite (loss = inf) where the mean is about 44. It is now the
    float32 model's loss, to float16's rounding of the outputs."""
    torch.manual_seed(0)
    x = torch.randn(1000, 4)
    y = x @ torch.randn(4, 1) + 3.0
    losses = []
    for dt in (torch.float32, torch.float16):
        torch.manual_seed(1)
        model = nn.Linear(4, 1).to(dt)
        hp = nn.ModuleDict(
            {"prior": hg.hparams.PriorPrecision(model), "noise": hg.hparams.ObservationNoise(0.3)}
        )
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="regression",
            data_size=1000,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        )
        losses.append(float(hopt.step((x.to(dt), y.to(dt)))))
    assert losses[0] > 10 and losses[1] == pytest.approx(losses[0], rel=1e-2)


# ------------------------------------------------------------------ targets and outputs


class _PerPosition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x).reshape(-1, 2, 3)  # (B, T=2, C=3) logits


def test_classification_outputs_other_than_b_by_c_are_refused_by_the_bound_as_by_step() -> None:
    """step() refused (B, T, C) logits, but the bound flattened them into one T*C-way class per
    example with labels (B,) in [0, C): log_evidence gave -16.22 for a problem that is not
    the one asked, and hyper_step moved the prior on it (outer loss 3.24). All now refuse with
    the message step() gives, and the hyperparameters stay put."""
    torch.manual_seed(0)
    model = _PerPosition().to(DT)
    prior = hg.hparams.PriorPrecision(model).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    message = r"needs logits of shape \(B, C\) from the model, got \(5, 2, 3\)"
    for kernel in ("auto", "dense"):
        for form in ("ntk", "parametric"):
            with pytest.raises(ValueError, match=message):
                hg.log_evidence(model, x, y, prior, kernel=kernel, form=form)
    hp = nn.ModuleDict({"prior": prior})
    hopt = _hopt(model, hp, "classification", 5)
    before = [p.detach().clone() for p in hp.parameters()]
    for call in (lambda: hopt.step((x, y)), lambda: hopt.hyper_step(train_batch=(x, y))):
        with pytest.raises(ValueError, match=message):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, hp.parameters(), strict=True))
    assert (hopt.inner_steps, hopt.hyper_steps) == (0, 0)


# ------------------------------------------------------------------ through the MAP, dense kernels


def _through_map_against_differences(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, raw0: list[float]
) -> None:
    """through_map's hypergradient = central differences of -bound/N around MAPs solved to the
    last digit (L-BFGS, then Newton with a looped autograd Hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n_data = x.shape[0]

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = v.split([s.numel() for s in shapes])
        return {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    def fit(raw: list[float]) -> nn.ModuleDict:
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer").to(DT)})
        with torch.no_grad():
            for p, r in zip(hp["prior"].parameters(), raw, strict=True):
                p.fill_(r)
        prec = {n: v.detach() for n, v in hp["prior"].precisions().items()}

        def objective(v: torch.Tensor) -> torch.Tensor:
            w = unflat(v)
            penalty = sum((prec[n] * w[n].square()).sum() for n in names)
            return F.cross_entropy(torch.func.functional_call(model, w, (x,)), y) + 0.5 * penalty / n_data

        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(v)
            value.backward()
            return value

        opt.step(closure)
        v = v.detach()
        for _ in range(4):
            g = torch.autograd.functional.jacobian(objective, v)
            h = torch.autograd.functional.hessian(objective, v)
            v = v - torch.linalg.solve(h, g)
        assert float(torch.autograd.functional.jacobian(objective, v).norm()) < 1e-11
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(unflat(v)[n])
        return hp

    def outer(raw: list[float]) -> float:
        hp = fit(raw)
        return (
            -float(hg.log_evidence_bound(model, x, y, hp["prior"], data_size=n_data, subset_size=4).detach())
            / n_data
        )

    hp = fit(raw0)
    kw = {"likelihood": "classification", "data_size": n_data, "subset_size": 4}
    opts = {
        "inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.0),
        "outer_optimizer": torch.optim.SGD(hp.parameters(), lr=0.0),
    }
    total, info = hg.MarginalLikelihood(
        model, hp, through_map=True, solver=hg.CG(maxiter=500, tol=1e-14, damping=0.0), **kw, **opts
    ).hypergradient(train_batch=(x, y))
    assert info.solver_status == "converged"
    eps = 1e-5
    for i in range(len(raw0)):
        up, down = list(raw0), list(raw0)
        up[i] += eps
        down[i] -= eps
        fd = (outer(up) - outer(down)) / (2 * eps)
        assert float(total[i]) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_through_map_with_the_dense_kernel_is_the_total_derivative_for_a_token_wise_model() -> None:
    """The token-wise model now takes the dense kernel; differentiated through the MAP (the
    Jacobians themselves differentiated w.r.t. the weights) it is still the total derivative."""
    torch.manual_seed(10)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(2, 3), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> two tokens of 2
            b = x.shape[0]
            return self.l2(torch.tanh(self.l1(x.reshape(b * 2, 2))).reshape(b, 6))

    model = Tokens().to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 2, (8,))
    _through_map_against_differences(model, x, y, [0.1, -0.2])


def test_through_map_for_a_gru_takes_the_looped_jacobians_and_is_the_total_derivative() -> None:
    """The GRU's Jacobians come from one backward pass per example and output (vmap cannot batch
    it); differentiated through the MAP they give the total derivative too."""
    torch.manual_seed(11)
    model = _Recurrent(nn.GRU).to(DT)
    x, y = torch.randn(8, 3, 2, dtype=DT), torch.randint(0, 2, (8,))
    _through_map_against_differences(model, x, y, [0.1, -0.2])


# ------------------------------------------------------------------ multi-output Bayesian linear regression


def test_multi_output_bayesian_linear_regression_is_the_sum_of_per_output_gaussians() -> None:
    """Linear(d, C) with one precision per weight entry (each output its own prior) and a shared
    noise: at the MAP the linearised evidence is exact, the sum over outputs c of
    log N(y_c; 0, sigma^2 I + X diag(1/delta_c) X^T), and so is its gradient (at the MAP the
    fixed-weights partial is the total derivative). Checked for every kernel / form / output
    choice that is exact here ("each" too: the outputs share no weight), and for hyper_step."""
    g = torch.Generator().manual_seed(12)
    n, d, c = 30, 4, 3
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = x @ torch.randn(d, c, generator=g, dtype=DT) + 0.4 * torch.randn(n, c, generator=g, dtype=DT)
    model = nn.Linear(d, c, bias=False).to(DT)
    hp = nn.ModuleDict(
        {
            "prior": hg.hparams.PriorPrecision(model, per="parameter"),
            "noise": hg.hparams.ObservationNoise(0.5),
        }
    ).to(DT)
    with torch.no_grad():
        hp["prior"].raw[0].copy_(torch.randn(c, d, generator=g, dtype=DT) * 0.5)
    raws = list(hp.parameters())

    def closed() -> torch.Tensor:
        delta, s2 = hp["prior"].precisions()["weight"], hp["noise"]().square()
        return sum(
            torch.distributions.MultivariateNormal(
                torch.zeros(n, dtype=DT), s2 * torch.eye(n, dtype=DT) + (x / delta[k]) @ x.T
            ).log_prob(y[:, k])
            for k in range(c)
        )

    with torch.no_grad():  # the MAP, per output
        delta, s2 = hp["prior"].precisions()["weight"], float(hp["noise"]().square())
        for k in range(c):
            a = torch.diag(delta[k]) + x.T @ x / s2
            model.weight[k] = torch.linalg.solve(a, x.T @ y[:, k] / s2)
    ref = closed()
    g_ref = torch.autograd.grad(ref, raws)
    for form, outputs in (("ntk", "all"), ("ntk", "each"), ("parametric", "all"), ("exact", "all")):
        ev = hg.log_evidence_bound(
            model,
            x,
            y,
            hp["prior"],
            data_size=n,
            likelihood="regression",
            noise=hp["noise"],
            form=form,
            outputs=outputs,
        )
        torch.testing.assert_close(ev, ref, rtol=1e-11, atol=1e-10)
        for a, b in zip(torch.autograd.grad(ev, raws), g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    info = _hopt(model, hp, "regression", n, bound="exact").hyper_step(train_batch=(x, y))
    assert info.outer_loss == pytest.approx(-float(ref.detach()) / n, rel=1e-11)
    for p, b in zip(raws, g_ref, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, -b / n, rtol=1e-9, atol=1e-12)


def test_random_translation_names_a_bad_samples_count_or_a_multi_channel_input() -> None:
    """samples=0 crashed in affine_grid ("Expected non-zero, positive output size"), a float
    in repeat_interleave, -1 with "Repeats must be non-negative"; three-channel images got
    "RandomTranslation(8, 8) got inputs of shape (2, 3, 8, 8)" without saying what it needs.
    Integer counts of any integer type still work."""
    aug = hg.hparams.RandomTranslation((8, 8))
    x = torch.randn(2, 64)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"Invalid samples"):
            aug(x, samples=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs \(B, \*\(8, 8\)\) or \(B, 64\): one channel"):
        aug(torch.randn(2, 3, 8, 8))
    assert aug(torch.randn(2, 1, 8, 8), samples=np.int64(2)).shape == (4, 1, 8, 8)
    assert aug(x, samples=torch.tensor(3)).shape == (6, 64)  # type: ignore[arg-type]
