r"""Marginal-likelihood hyperparameter learning on training data alone (Immer et al. 2021; 2023).

The linearised-Laplace log evidence of a network :math:`f(x;\theta)` at a MAP estimate
:math:`\theta^*`, with prior :math:`\mathcal N(0, P_0^{-1})`, Jacobians :math:`J` (``(NC, P)``) and
:math:`\Lambda = L L^\top` the Hessian of the negative log-likelihood w.r.t. the outputs:

.. math::
    \log q(\mathcal D \mid \lambda) = \log p(\mathcal D\mid\theta^*) - \tfrac12\theta^{*\top}P_0\theta^*
      - \tfrac12\log\det\big(I + L^\top J P_0^{-1} J^\top L\big)          \quad\text{(NTK form)}

and :math:`\log\det(I + L^\top J P_0^{-1}J^\top L) = \log\det(P_0 + J^\top\Lambda J) - \log\det P_0`
(parametric / GGN form; Sylvester's identity). Splitting the data into blocks of :math:`M` and
keeping only the diagonal blocks of the kernel gives a **lower bound** (Fischer's inequality:
:math:`\log\det\begin{pmatrix}A & B\\ B^\top & D\end{pmatrix} \le \log\det A + \log\det D`), exact
for :math:`M = N` and tighter as blocks merge. One random block of a batch of :math:`B` examples,
rescaled by :math:`N/B`, is an unbiased estimator of that bound (Immer et al. 2023):

.. math::
    \hat q = \tfrac{N}{B}\Big(\log p(\mathcal D_b\mid\theta^*)
        - \tfrac12\sum_{\text{blocks } k\subset b}\log\det(I + L_k^\top J_k P_0^{-1} J_k^\top L_k)\Big)
        - \tfrac12\theta^{*\top}P_0\theta^*.

Never rescale the batch GGN instead (:math:`\log\det(P_0 + \tfrac NM G_b)`): by concavity of
:math:`\log\det` that *over*-estimates the evidence in expectation.

The kernel of a block is built per layer: for ``nn.Linear`` layers with one precision per layer,
:math:`J_{(n,c)}J_{(m,c')}^\top = (g_{nc}\cdot g_{mc'})(a_n\cdot a_m + 1)` from the layer inputs
:math:`a` and the output gradients :math:`g` (no ``P``-sized Jacobian is formed); any other model or
per-weight precisions use dense Jacobians from ``torch.func``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import enum
import functools
import math
import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import (
    HyperOptimizer,
    HyperStepInfo,
    NonFiniteError,
    OnNonFinite,
    _hyper_call,
    _Hypergradient,
    _values_off_domain,
)
from ._functional import (
    _attributes_kept,
    _held_slots,
    check_batch,
    clone_all,
    differentiable_twice,
    grads_or_none,
    ignoring_gradient_hooks,
    materialize,
    substituting,
    tensor_slots,
)
from ._implicit import _implicit, _warm_start_for, held_at_zero
from ._ml_hparams import ObservationNoise, PriorPrecision, RandomTranslation
from ._solvers import CG, LinearSolver, Neumann
from ._types import Batch
from ._wrap import rank0_buffers, unwrap_model
from .hparams import WeightDecay


class _Choice(str, enum.Enum):
    """A string option whose bad value is refused naming the choices (``'bernoulli' is not a
    valid Likelihood`` alone left a user guessing what is)."""

    @classmethod
    def _missing_(cls, value: object) -> None:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__} (choose from {choices})")


class Likelihood(_Choice):
    """The likelihood :math:`p(y\\mid f)`: heteroscedastic or per-output noise, Bernoulli
    (one logit) and soft labels are not among them."""

    CLASSIFICATION = "classification"  #: softmax over the outputs, integer labels
    REGRESSION = "regression"  #: Gaussian with noise :class:`~hypergrad.hparams.ObservationNoise`


class Bound(_Choice):
    """How :class:`MarginalLikelihood` estimates the evidence on a batch."""

    NTK = "ntk"  #: block kernels :math:`L^\top J P_0^{-1} J^\top L` (``(MC, MC)`` per block)
    PARAMETRIC = "parametric"  #: :math:`\log\det(P_0 + G_b) - \log\det P_0` per block (``(P, P)``)
    EXACT = "exact"  #: the whole data set in one batch: the exact evidence (small problems)


class Outputs(_Choice):
    """Which output blocks of an NTK kernel are kept."""

    ALL = "all"  #: the full ``(MC, MC)`` kernel of a block
    EACH = "each"  #: one ``(M, M)`` kernel per (whitened) output: a looser bound, C times cheaper
    SAMPLED = "sampled"  #: one output drawn at random, times C: unbiased for ``"each"``


_KERNELS = ("auto", "layerwise", "dense")


# --------------------------------------------------------------------------------------- helpers


def _check_modes(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if mod.training and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"model.{name} is a BatchNorm layer in training mode: its output for one example "
                "depends on the others in the batch, so the Laplace evidence (and its bound) is not "
                "defined. Call model.eval() before hyper_step (running statistics are then used), "
                "or use a normalisation that acts per example (LayerNorm, GroupNorm)."
            )
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
            mod.running_mean is None or mod.running_var is None
        ):
            raise ValueError(
                f"model.{name} is a BatchNorm layer without running statistics "
                "(track_running_stats=False): it normalises with the statistics of the batch even in "
                "eval mode, so one example's output depends on the others and the Laplace evidence "
                "(and its bound) is not defined. Use track_running_stats=True, or a normalisation "
                "that acts per example (LayerNorm, GroupNorm)."
            )
        if mod.training and isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise ValueError(
                f"model.{name} is Dropout in training mode: the linearised network would be random. "
                "Call model.eval() before hyper_step (and model.train() before step)."
            )
        if mod.training and isinstance(mod, nn.RReLU) and mod.lower != mod.upper:
            # (a random evidence with the layerwise kernel, vmap's "rrelu_with_noise" crash with
            # the dense one)
            raise ValueError(
                f"model.{name} is RReLU in training mode: its slopes are drawn at random, so the "
                "linearised network would be random. Call model.eval() before hyper_step (and "
                "model.train() before step)."
            )


def _count(v: Any, name: str, low: int) -> int:
    """``v`` as a Python int >= ``low``: any integer (a NumPy or 0-dim integer tensor too, as
    ``len`` or ``.sum()`` of a mask give them), never a bool or a float."""
    try:
        if isinstance(v, bool):
            raise TypeError
        out = operator.index(v)
    except TypeError:
        out = None
    if out is None or out < low:
        raise ValueError(f"Invalid {name}: {v!r} (need an int >= {low})")
    return out


def _subset(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return _count(v, "subset_size", 1)
    except ValueError:
        raise ValueError(f"Invalid subset_size: {v!r} (need an int >= 1, or None)") from None


def _split_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    if not (
        isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(t, Tensor) for t in batch[:2])
    ):
        raise ValueError("MarginalLikelihood needs batches (x, y, ...) whose first two entries are tensors")
    _check_nonempty(batch[0])
    return batch[0], batch[1]


def _check_nonempty(x: Tensor, y: object = None) -> None:
    # (a list or an array failed with "'list' object has no attribute 'dim'", naming neither)
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) and (name == "x" or t is not None):
            raise TypeError(
                f"{name} must be a tensor, got {type(t).__name__} (convert it with torch.as_tensor)"
            )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"the batch holds no examples (inputs of shape {tuple(x.shape)}): the likelihood and the "
            "bound (scaled by N/B) are not defined for B = 0; skip empty batches"
        )


def _forward(
    model: nn.Module,
    x: Tensor,
    augmentation: RandomTranslation | None,
    samples: int,
    likelihood: Likelihood | None = None,
) -> Tensor:
    """Outputs ``(B, C)``, averaged over ``samples`` augmentations when there is an augmentation.
    With ``likelihood`` given, classification outputs must be logits ``(B, C)`` (regression
    outputs of any shape are flattened per example)."""
    b = x.shape[0]
    out = _output(model(x) if augmentation is None else model(augmentation(x, samples)))
    _check_logits(out, likelihood, b * (samples if augmentation is not None else 1))
    if augmentation is None:
        return out.reshape(b, -1)
    return out.reshape(b, samples, -1).mean(1)


def _check_logits(out: Tensor, likelihood: Likelihood | None, rows: int | None = None) -> None:
    """Classification outputs must be logits ``(B, C)``, one row per input row ``rows`` (in the MAP
    step and in the bound alike: the bound flattened ``(B, T, C)`` outputs into one ``T*C``-way
    class per example, and reshaped ``(B*T, C)`` ones the same way: with labels ``(B*T,)`` it
    failed naming one-hot labels, with labels ``(B,)`` it gave a silently wrong evidence)."""
    if likelihood is not Likelihood.CLASSIFICATION:
        return
    if out.dim() != 2:
        raise ValueError(
            f"likelihood='classification' needs logits of shape (B, C) from the model, got "
            f"{tuple(out.shape)}: flattening them would make one {out[0].numel()}-way class per "
            "example (per-position labels, one softmax per position, are not supported: the "
            "evidence needs one softmax of the C logits per example)"
        )
    if rows is not None and out.shape[0] != rows:
        raise ValueError(
            f"likelihood='classification' needs logits (B, C) with one row per example: the model "
            f"gave {out.shape[0]} rows of logits for {rows} inputs (reshaped per-position or "
            "per-view outputs, (B*T, C), would be taken as one "
            f"{out.numel() // max(rows, 1)}-way class per example). Return one row of C logits "
            "per example (pool or average over positions or views inside the model)"
        )


def _output(out: Any) -> Tensor:
    """The model's output, which must be one tensor (a clear error for a tuple or a dict)."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the marginal likelihood needs a model that returns one tensor of outputs (B, C), got a "
            f"{type(out).__name__}: wrap the model so that it returns the logits / means only"
        )
    return out


def _check_targets(f: Tensor, y: Tensor, likelihood: Likelihood) -> None:
    """A clear error for targets that do not fit the outputs ``f`` ``(B, C)`` (instead of a
    silent reinterpretation: float labels truncated, a transposed target reshaped)."""
    b, c = f.shape
    if likelihood is Likelihood.CLASSIFICATION:
        if c < 2:
            raise ValueError(
                "likelihood='classification' needs logits (B, C) with C >= 2 (a softmax over one "
                "output is constant); for a binary problem return two logits"
            )
        if y.dim() == 0 or y.numel() != b or y.shape[0] != b:
            raise ValueError(
                f"likelihood='classification' needs integer labels (B,) = ({b},); got targets of "
                f"shape {tuple(y.shape)} (one-hot or soft labels are not supported)"
            )
        if y.is_complex() or y.dtype == torch.bool:
            # (complex labels crashed in round(): '"round_vml_cpu" not implemented for 'ComplexFloat'')
            raise ValueError(
                f"likelihood='classification' needs integer class labels (B,), got {y.dtype} targets"
            )
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(
                f"likelihood='classification' needs integer class labels, got {y.dtype} targets "
                "that are not whole numbers (regression targets? use likelihood='regression')"
            )
        if b and not bool(((y >= 0) & (y < c)).all()):
            # cross_entropy would skip a label -100 (its ignore_index) in the likelihood while the
            # kernel still counted the example: a silently different evidence
            raise ValueError(
                f"likelihood='classification' needs labels in [0, {c}) for {c} logits; got labels "
                f"from {float(y.min())} to {float(y.max())} (padding labels such as -100 are not "
                "ignored here: drop those examples from the batch)"
            )
        return
    if y.dtype == torch.bool or y.is_complex():
        # (a bool target crashed in the subtraction; a complex one gave a complex "evidence")
        raise ValueError(
            f"likelihood='regression' needs real targets (a float or integer dtype), got {y.dtype}"
        )
    if y.dim() == 0 or y.shape[0] != b or y.numel() != f.numel():
        raise ValueError(
            f"likelihood='regression': targets of shape {tuple(y.shape)} do not match the model's "
            f"outputs, {b} examples of {c} values each (targets (B, C), or (B,) for C = 1)"
        )


def _log_lik(f: Tensor, y: Tensor, likelihood: Likelihood, sigma: Tensor | None) -> Tensor:
    """:math:`\\sum_n \\log p(y_n\\mid f_n)` (0-dim), at least in float32: a sum over the batch in
    float16 overflowed (a MAP loss of inf for a float16 model whose mean loss was about 1)."""
    _check_targets(f, y, likelihood)
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    if likelihood is Likelihood.CLASSIFICATION:
        return -F.cross_entropy(f, y.reshape(-1).long(), reduction="sum")
    assert sigma is not None
    r = (y.reshape(f.shape) - f) / sigma
    return -0.5 * r.square().sum() - f.numel() * (torch.log(sigma) + 0.5 * math.log(2 * math.pi))


def _whitener(f: Tensor, likelihood: Likelihood) -> Tensor | None:
    r"""``L`` ``(B, C, C)`` with :math:`L L^\top = \Lambda` (softmax: ``diag(sqrt p) - p sqrt(p)^T``);
    ``None`` for regression, whose :math:`\Lambda = I/\sigma^2` is applied as a scale."""
    if likelihood is Likelihood.REGRESSION:
        return None
    p = torch.softmax(f, dim=1)
    # sqrt(p) with a derivative of 0 where p underflowed to 0 (its limit, 0.5 sqrt(p) d log p):
    # p.sqrt() alone has an infinite derivative there (a logit gap above ~104 in float32, ~745
    # in float64), and every hypergradient that differentiates through the outputs (through_map,
    # an augmentation) was NaN although the bound was finite: each hyperstep was refused
    pos = p > 0
    sq = torch.where(pos, p, torch.ones_like(p)).sqrt() * pos
    return torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)


#: (n eps max_i K_ii), the rounding of an (n, n) kernel I + K in its own dtype relative to its
#: smallest possible eigenvalue (1), above which a log det taken in a low precision is refused (NaN:
#: formed again in float64, as where its Cholesky fails). Its first-order error is a sum over the
#: small eigenvalues of the rounding of K: with a weak prior the entries of K reach ~|J|^2 / delta,
#: and a float32 kernel whose Cholesky still succeeded was silently off (an MLP at delta = 1e-6:
#: the bound 4 nats, the precision's hypergradient 5-13%; the parametric form of a small one at
#: 1e-5, per-weight hypergradients 1.6%), where float64, taken once the Cholesky failed at a weaker
#: prior still, was exact again. Below 1 the hypergradients stay within ~3e-3 (relative)
_ROUNDING = 1.0
_rounding_limit: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "_rounding_limit", default=None
)


class _LogDetPD(torch.autograd.Function):
    """log det of a symmetric positive-definite matrix by Cholesky; the backward pass is
    :math:`A^{-1}` from the factor (``cholesky_inverse``: about half the work of autograd's two
    triangular solves through ``cholesky``). NaN when the factorisation fails, or (``limit``
    given) when ``n * eps * max diag`` exceeds it (see ``_ROUNDING``)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, limit: float | None = None) -> Tensor:
        chol, info = torch.linalg.cholesky_ex(a)
        ctx.save_for_backward(chol)
        out = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum()
        ok = (info == 0).all()
        if limit is not None:  # (no host read: the caller's isfinite check reads it)
            rounding = a.diagonal(dim1=-2, dim2=-1).amax() * (a.shape[-1] * torch.finfo(a.dtype).eps)
            ok = ok & (rounding <= limit)
        return torch.where(ok, out, torch.full_like(out, float("nan")))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (chol,) = ctx.saved_tensors
        return grad * torch.cholesky_inverse(chol), None


def _logdet_pd(a: Tensor) -> Tensor:
    """The summed log det of symmetric positive-definite matrices ``(..., n, n)`` (NaN if a
    factorisation fails, or under ``_rounding_limit`` if one is too ill-scaled for its dtype)."""
    return _LogDetPD.apply(a, _rounding_limit.get())


def _blocks(n: int, size: int | None) -> list[slice]:
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _layerwise_factors(
    model: nn.Module,
    x: Tensor,
    names: Sequence[str],
    augmentation: RandomTranslation | None,
    samples: int,
    graph: bool,
    likelihood: Likelihood | None = None,
) -> tuple[Tensor, list[tuple[str | None, str | None, Tensor, Tensor]]] | None:
    """The outputs and, per ``nn.Linear`` layer, its inputs and the output gradients
    ``(C, B, S, out)`` (unwhitened); ``None`` when the model is not made of such layers."""
    if torch.is_inference_mode_enabled():
        return None  # no output gradients under inference mode (the dense path needs none)
    if getattr(nn.modules.module, "_global_forward_hooks", None):
        # hooks on every module (nn.modules.module.register_module_forward_hook) run before a
        # layer's own: one that rewrites the outputs (2 * out) made the kernel of z = W a + b
        # for a layer that gives 2 z, silently (a log evidence -15.35 for the true -20.59)
        return None
    params = dict(model.named_parameters())
    wanted = {id(params[n]): n for n in names}
    owners: dict[int, tuple[nn.Linear, str | None, str | None]] = {}
    for mod in model.modules():
        # nn.Linear's own forward only (z = W a + b): a subclass computing otherwise (a scaled or
        # masked weight) made a silently wrong kernel; its weights are then left to the dense path
        if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
            continue
        if mod._forward_hooks or mod._forward_pre_hooks:
            continue  # a hook may change what the layer takes or gives: dense
        nw = wanted.get(id(mod.weight))
        nb = wanted.get(id(mod.bias)) if mod.bias is not None else None
        if nw is None and nb is None:
            continue
        # a layer only partly trained (a frozen bias, or a bias trained under a frozen weight)
        # keeps the layerwise kernel: the frozen part is a constant of the network, conditioned on
        # (it was sent to the dense kernel, and kernel='layerwise' refused the model after burn_in
        # with a message whose every condition the model met)
        owners[id(mod)] = (mod, nw, nb)
    owned = [n for _, nw, nb in owners.values() for n in (nw, nb) if n is not None]
    if len(owned) != len(set(owned)):
        return None  # a weight tied between two layers: its Jacobian is a sum over them (dense)
    if set(owned) != set(names):
        return None
    seen: dict[int, list[tuple[Tensor, Tensor, int]]] = {}
    by_keyword: list[int] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        if not inp:
            # a layer called with its input by keyword (self.lin(input=h)): a forward hook is given
            # the positional inputs only, and inp[0] crashed the bound ("IndexError: tuple index
            # out of range", naming nothing): the dense kernel takes it
            by_keyword.append(id(mod))
            return None
        # the layer's output goes on as a copy: an in-place operation after it (ReLU(inplace=True))
        # would otherwise rewrite the recorded tensor, and the output gradients taken w.r.t. it
        # would be those of the activation (a silently wrong kernel)
        seen.setdefault(id(mod), []).append((inp[0], out, inp[0]._version))
        return out.clone()

    handles = [m.register_forward_hook(hook) for m, _, _ in owners.values()]
    try:
        with torch.enable_grad():  # the output gradients need a graph, whatever the caller's mode
            if augmentation is None:
                f = _forward(model, x, augmentation, samples, likelihood)
            else:  # (as _forward, keeping the augmented copies for the rows' check below)
                xa = augmentation(x, samples)
                out = _output(model(xa))
                _check_logits(out, likelihood, xa.shape[0])
                f = out.reshape(x.shape[0], samples, -1).mean(1)
    finally:
        for h in handles:
            h.remove()
    if by_keyword:
        return None
    b = x.shape[0]
    s = samples if augmentation is not None else 1
    if any(len(seen.get(k, ())) != 1 or seen[k][0][0].dim() != 2 for k in owners):
        return None  # a layer used twice, or on sequences: dense
    if any(seen[k][0][0].shape[0] != b * s for k in owners):
        # rows that are not one per example (and sample): a token-wise layer on (B*T, d) inputs
        # made a product of per-row sums, not the sum over position pairs (a silently wrong kernel)
        return None
    if any(n != 1 for n in _graph_uses(f, [params[n] for n in owned]).values()):
        # a weight read outside its layer too (a tied decoder F.linear(h, enc.weight.T)): its
        # Jacobian is a sum over both uses, which the layer's factors do not see
        return None
    if any(seen[k][0][0]._version != seen[k][0][2] for k in owners):
        return None  # a layer's input changed in place after it was used: dense
    # with an augmentation too, on its copies (B * S rows): a model mixing the examples of a batch
    # (x - x.mean(0)) was refused by the dense kernel but went through the layerwise one, the
    # default for an MLP, silently (its factors are those of the batch function)
    rows = x if augmentation is None else xa.detach()
    if rows.shape[0] > 1 and not _rows_are_examples(model, rows, owners, seen):
        # a model that reorders the batch inside (sorts it, or runs it reversed, and puts the
        # outputs back in order): row n of a layer then belongs to another example than n, and
        # the layer factors paired one example's inputs with another's labels and curvature (a
        # log evidence -11.397 for the true -11.388, silently); the dense Jacobians are per example
        return None
    zs = [seen[k][0][1] for k in owners]
    c = f.shape[1]
    # the C output gradients in one vectorised backward pass: row j seeds output j of every example
    seeds = torch.eye(c, dtype=f.dtype, device=f.device).unsqueeze(1).expand(c, *f.shape)
    gs: Sequence[Tensor]
    try:
        with torch.enable_grad():
            gs = torch.autograd.grad(
                f, zs, seeds, retain_graph=True, create_graph=graph, is_grads_batched=True
            )
    except RuntimeError:  # an operation without a batching rule: one backward pass per output
        with torch.enable_grad():
            per = [
                torch.autograd.grad(f[:, j].sum(), zs, retain_graph=True, create_graph=graph)
                for j in range(c)
            ]
        gs = [torch.stack(col) for col in zip(*per, strict=True)]
    layers = []
    for (_, nw, nb), key, g in zip(owners.values(), owners, gs, strict=True):
        a = seen[key][0][0]
        a = a if graph else a.detach()
        layers.append((nw, nb, a.reshape(b, s, -1), g.reshape(c, b, s, -1)))
    return f, layers


def _rows_are_examples(
    model: nn.Module,
    x: Tensor,
    owners: Mapping[int, tuple[nn.Linear, str | None, str | None]],
    seen: Mapping[int, list[tuple[Tensor, Tensor, int]]],
) -> bool:
    """Whether the batch rolled by one example gives every layer its rows rolled by one (one
    forward pass of the batch, no graph), and the first row of each layer's input is what the
    layer takes when the first example runs alone (one forward pass of one example): the rows of
    a model that reorders the batch inside (sorts it by length, runs it reversed, and puts the
    outputs back in order) belong to other examples than their positions say. The rolled pass
    catches every reordering that does not commute with a roll; the ones that do are cyclic
    shifts, which move the first row. (Checking the first and last rows alone passed a sort that
    left both in place and reordered the ones between: -12.145 for the true -12.291, silently.)"""

    def inputs(xs: Tensor) -> dict[int, Tensor]:
        got: dict[int, Tensor] = {}

        def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            got.setdefault(id(mod), inp[0].detach().clone())

        handles = [m.register_forward_hook(hook) for m, _, _ in owners.values()]
        try:
            with torch.no_grad():
                model(xs)
        finally:
            for h in handles:
                h.remove()
        return got

    model_eps = _model_eps(model)

    def same(one: Tensor | None, row: Tensor) -> bool:
        if one is None or one.shape != row.shape:
            return False
        eps = torch.finfo(row.dtype).eps if row.is_floating_point() else 0.0
        # (loose, as _check_per_example: batched and single kernels round differently)
        tol = _rows_tolerance(eps, model_eps) * (1.0 + float(row.abs().max()))
        return float((one - row).abs().max()) <= tol

    # (the rolled batch is no batch the model was given: one that takes its batches in an order
    # of its own, as pack_padded_sequence's default enforce_sorted=True takes them sorted by
    # length, refuses it. The bound failed then with that error ("`lengths` array must be sorted
    # in decreasing order"), for a batch that was sorted; the dense kernel, which runs single
    # examples and the batch as given, needs no such pass)
    try:
        alone = inputs(x[:1])
        if not all(same(alone.get(k), seen[k][0][0][:1].detach()) for k in owners):
            return False
        rolled = inputs(x.roll(1, 0))
    except Exception:
        return False
    return all(same(rolled.get(k), seen[k][0][0].detach().roll(1, 0)) for k in owners)


def _graph_uses(f: Tensor, weights: Sequence[Tensor]) -> dict[int, int]:
    """How many times each weight (a leaf) enters the autograd graph of ``f``: the edges into its
    gradient accumulator, by ``id`` of the weight (0 for a weight not reached or not a leaf)."""
    uses = {id(w): 0 for w in weights}
    seen: set[Any] = set()
    stack = [f.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            v = getattr(nxt, "variable", None)  # an AccumulateGrad node: the leaf it feeds
            if v is not None and id(v) in uses:
                uses[id(v)] += 1
            stack.append(nxt)
    return uses


def _looped_jacobians(
    single: Any, theta: dict[str, Tensor], xa: Tensor, graph: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """``vmap(jacrev(single, has_aux=True))`` by plain autograd: ``B * C`` backward passes
    (``(B, C, *shape)`` per name), and the outputs of the examples run alone ``(B, C)``. Weights
    taken as constants become fresh leaves (the same Jacobian)."""
    leaves = {n: t if t.requires_grad else t.detach().requires_grad_(True) for n, t in theta.items()}
    rows: list[list[Tensor]] = []
    alone: list[Tensor] = []
    with torch.enable_grad():
        for i in range(xa.shape[0]):
            out, one = single(leaves, xa[i])
            alone.append(one)
            for j in range(out.shape[0]):
                gs = torch.autograd.grad(
                    out[j], list(leaves.values()), retain_graph=True, create_graph=graph, allow_unused=True
                )
                rows.append(
                    [
                        torch.zeros_like(t) if g is None else _strided(g)
                        for g, t in zip(gs, leaves.values(), strict=True)
                    ]
                )
    b = xa.shape[0]
    c = len(rows) // b
    jac = {
        n: torch.stack([r[k] for r in rows]).reshape(b, c, *t.shape)
        for k, (n, t) in enumerate(leaves.items())
    }
    return jac, torch.stack(alone)


def _strided(j: Tensor) -> Tensor:
    """A gradient as an ordinary (strided) tensor: that of a sparse ``nn.Embedding``
    (``sparse=True``, which vmap cannot batch) comes out sparse, and stacking the rows crashed
    ("reshape is not implemented for sparse tensors")."""
    return j.to_dense() if j.layout != torch.strided else j


def _every_slot(model: nn.Module) -> dict[str, list[Any]]:
    """:func:`tensor_slots`, and for each parameter the places where the model's modules hold it in
    plain attributes too (a decoder reading ``self.tied = [encoder.weight]``, an item of a tuple or
    dict attribute), as the other methods substitute it: the per-example Jacobians substituted the
    registered places only, so the model's read through the list stayed a constant of the real
    weight, and the evidence and its hypergradient were another network's (``info.outer_loss``
    5.16 for the network's 5.30, the noise's hypergradient -0.22 for -1.17 through the MAP,
    silently). One pass over the modules' attributes, per hyperstep."""
    slots = tensor_slots(model)
    params = dict(model.named_parameters())
    held = _held_slots(model, list(params.values()))
    if not held:
        return slots
    return {n: [*s, *held.get(id(params[n]), [])] if n in params else s for n, s in slots.items()}


def _dense_jacobians(
    model: nn.Module,
    x: Tensor,
    names: Sequence[str],
    augmentation: RandomTranslation | None,
    samples: int,
    graph: bool,
    through_weights: bool = False,
    likelihood: Likelihood | None = None,
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Tensor]]:
    """The outputs ``(B, C)`` and per-parameter Jacobians ``(B, C, numel)`` of the (averaged)
    outputs, and the outputs of each example (augmented copy) run alone next to its row of the
    batch's, both ``(B * S, C)`` (for :func:`_check_rows_alone`)."""
    params = dict(model.named_parameters())
    theta = {n: params[n] if through_weights else params[n].detach() for n in names}
    xa = x if augmentation is None else augmentation(x, samples)
    b = x.shape[0]
    s = samples if augmentation is not None else 1
    slots = _every_slot(model)  # every place of each weight: exact for models reusing a submodule

    def single(p: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
        with substituting((slots[n], v) for n, v in p.items()):
            out = _output(model(xi.unsqueeze(0))).reshape(-1)
        return out, out.detach()  # (the example's outputs alone, checked against its row of the batch)

    try:
        jac, alone = torch.func.vmap(torch.func.jacrev(single, has_aux=True), in_dims=(None, 0))(theta, xa)
    except RuntimeError:
        # an operation without a batching rule (RReLU's rrelu_with_noise, even in eval mode), or
        # one vmap batches wrongly (nn.GRU/LSTM write the batched step into their unbatched
        # initial state: "output with shape [1, 3] doesn't match the broadcast shape [4, 1, 3]"):
        # one backward pass per example and output instead (an error of the model itself is
        # raised again there, by the plain forward pass)
        jac, alone = _looped_jacobians(single, theta, xa, graph or through_weights)
    logits = _output(model(xa))
    _check_logits(logits, likelihood, xa.shape[0])
    f = logits.reshape(b, s, -1).mean(1)
    if not graph:
        f = f.detach()
    out = {n: j.reshape(b, s, f.shape[1], -1).mean(1) for n, j in jac.items()}
    # the Jacobians are those of each example (copy) run alone, the outputs (the likelihood, the
    # whitening) those of the batch: the caller checks that every example alone gives its row
    return f, out, (alone, logits.detach().reshape(xa.shape[0], -1))


@dataclasses.dataclass
class _Terms:
    log_lik: Tensor  # sum over the batch
    log_det: Tensor  # sum over the blocks (of log det(I + L^T K L))
    quad: Tensor  # theta^T P0 theta
    batch: int


def _terms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior: PriorPrecision,
    names: Sequence[str],
    *,
    likelihood: Likelihood,
    sigma: Tensor | None,
    subset_size: int | None,
    outputs: Outputs,
    form: Bound,
    augmentation: RandomTranslation | None,
    samples: int,
    kernel: str,
    through_weights: bool = False,
) -> _Terms:
    _check_modes(model)
    if likelihood is Likelihood.REGRESSION and sigma is None:
        raise ValueError("the regression likelihood needs the observation noise (noise=...)")
    if kernel not in _KERNELS:
        raise ValueError(f"Invalid kernel: {kernel!r} (choose from {_KERNELS})")
    subset_size = _subset(subset_size)
    params = dict(model.named_parameters())
    prec_all = prior.precisions()
    missing = [n for n in names if n not in prec_all]
    if missing:
        raise ValueError(f"weights {missing[:3]} are trained but have no prior precision (PriorPrecision)")
    # the precision of the bound's own arithmetic: the weights' (promoted over all of them), at
    # least float32 (a bfloat16 or float16 model crashed in the Cholesky: "cholesky_cpu" not
    # implemented for 'BFloat16'). The prior and the noise below in it: a float64 prior on a
    # float32 model crashed the dense kernel's matmul (and would have promoted only some terms)
    dt = functools.reduce(torch.promote_types, [params[n].dtype for n in names], torch.float32)
    prec = {n: prec_all[n].to(dt) for n in names}
    _check_prior_shapes(prior, params, names)
    theta = {n: params[n] if through_weights else params[n].detach() for n in names}
    if sigma is not None and sigma.dtype != dt:
        sigma = sigma.to(dt)  # a float32 noise must not round a float64 evidence
    quad = torch.stack([(prec[n] * theta[n].to(dt).square()).sum() for n in names]).sum()
    graph = augmentation is not None and augmentation.raw.requires_grad and torch.is_grad_enabled()
    graph = graph or through_weights  # the bound then depends on the weights through the Jacobians too
    b = x.shape[0]
    scalar_prec = all(p.dim() == 0 for p in prec.values())
    use_layers = form is Bound.NTK and kernel != "dense" and scalar_prec
    if kernel == "layerwise" and not use_layers:
        raise ValueError("kernel='layerwise' needs the NTK form and one precision per layer (or global)")
    # a model that is random in this mode gives a random evidence: nn.Dropout and RReLU are
    # refused by _check_modes, but functional dropout (F.dropout(h, p, self.training)) went
    # through silently (three calls gave -12.93, -13.62, -13.14). Without an augmentation, which
    # draws its own, the model's forward passes must leave torch's random generator as it was
    rng = _rng_states(x.device) if augmentation is None else None
    # with a learned augmentation the outputs (and the layer factors) keep their graph, for the
    # range's hypergradient: the weights must not be part of it unless asked for (through_map).
    # Fresh leaves stand in for them: (-bound).backward() wrote gradients (norm ~20, the whole
    # data set's nats) into the model's .grad, contaminating a MAP step that followed it
    detach: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if graph and not through_weights:
        slots = _every_slot(model)  # (every place of a tied or reused weight)
        fresh = [
            (slots[n], nn.Parameter(t.detach(), requires_grad=True))
            for n, t in model.named_parameters()
            if t.requires_grad
        ]
        detach = substituting(fresh)
    # gradient hooks the forward passes register (an activation's gradient scaled or clipped by
    # the model, a module's full backward hook) shape the MAP steps' gradients, not the network's
    # function: left on, they scaled its Jacobians (an activation's gradient halved: a log
    # evidence -7.00 for the network's -7.46, silently), as hooks on the weights would have
    # (and with the entry points replaced that autograd.grad and vmap cannot take as they are:
    # torch.utils.checkpoint's reentrant CheckpointFunction raised "incompatible with .grad()" in
    # the per-example Jacobians; see differentiable_twice)
    with detach, ignoring_gradient_hooks(), differentiable_twice():
        return _terms_body(
            model,
            x,
            y,
            prior,
            names,
            params,
            prec,
            quad,
            dt,
            sigma,
            rng,
            b,
            blocks_of=subset_size,
            likelihood=likelihood,
            outputs=outputs,
            form=form,
            augmentation=augmentation,
            samples=samples,
            kernel=kernel,
            through_weights=through_weights,
            graph=graph,
            use_layers=use_layers,
        )


def _terms_body(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior: PriorPrecision,
    names: Sequence[str],
    params: Mapping[str, Tensor],
    prec: dict[str, Tensor],
    quad: Tensor,
    dt: torch.dtype,
    sigma: Tensor | None,
    rng: list[Tensor] | None,
    b: int,
    *,
    blocks_of: int | None,
    likelihood: Likelihood,
    outputs: Outputs,
    form: Bound,
    augmentation: RandomTranslation | None,
    samples: int,
    kernel: str,
    through_weights: bool,
    graph: bool,
    use_layers: bool,
) -> _Terms:
    subset_size = blocks_of
    factors = (
        _layerwise_factors(model, x, names, augmentation, samples, graph, likelihood) if use_layers else None
    )
    if kernel == "layerwise" and factors is None:
        raise ValueError(
            "kernel='layerwise' needs a model whose trained weights are nn.Linear layers used once "
            "(plain nn.Linear, no hooks, not tied nor read outside the layer, inputs (B, d) with one "
            "row per example, given positionally), outside torch.inference_mode"
        )
    blocks = _blocks(b, subset_size)
    c: int
    # the kernel algebra (Gram products, Cholesky) in that precision too, whatever autocast
    # did to the model's outputs and Jacobians: under bfloat16 autocast I + J J^T / sigma^2 of a
    # sharp regression (entries ~1e4) failed to factor, the bound was NaN and every hyperstep
    # was refused (the float32 one was fine)
    if factors is None:  # (the model runs as the caller runs it: under their autocast, if any)
        f, jac, alone = _dense_jacobians(
            model, x, names, augmentation, samples, graph, through_weights, likelihood
        )
    if rng is not None and not all(map(torch.equal, rng, _rng_states(x.device))):
        raise ValueError(
            "the model drew random numbers in its forward pass (functional dropout such as "
            "F.dropout(h, p, self.training) with the model in training mode, or noise injection): "
            "the linearised network would be random, and so would the evidence (and its bound). "
            "Call model.eval() before hyper_step (and model.train() before step), with every "
            "random operation following self.training"
        )
    if factors is None:
        # every example, not only the first and the last (_check_per_example): a model whose
        # output depends on a statistic of the batch that those two share (sequences cut to the
        # batch's longest, both of them of that length) mixed the batch's outputs with the
        # Jacobians of another function, silently (-9.985 for the batch function's -10.009).
        # The outputs alone come with the Jacobians, at no extra cost
        _check_rows_alone(*alone, samples if augmentation is not None else 1, _model_eps(model))
    if augmentation is None and b > 1:
        _check_per_example(model, x, factors[0] if factors is not None else f)
    with _full_precision(x.device.type):
        if factors is not None:
            f, layers = factors
            f = (f if graph else f.detach()).to(dt)
            c = f.shape[1]
            wh = _whitener(f, likelihood)
            lay = []
            for nw, nb, a, g in layers:
                a, g = a.to(dt), g.to(dt)
                if wh is not None:
                    g = torch.einsum("bcd,cbso->dbso", wh, g)
                lay.append((nw, nb, a, g))

            def logdets(w: torch.dtype) -> list[Tensor]:
                ly = [(nw, nb, a.to(w), g.to(w)) for nw, nb, a, g in lay]
                pw, sw = {n: p.to(w) for n, p in prec.items()}, None if sigma is None else sigma.to(w)
                return [_layer_block_logdet(ly, pw, blk, outputs, c, sw) for blk in blocks]

        else:
            f = f.to(dt)
            jac = {n: j.to(dt) for n, j in jac.items()}
            c = f.shape[1]
            wh = _whitener(f, likelihood)
            if wh is not None:
                jac = {n: torch.einsum("bcd,bcp->bdp", wh, j) for n, j in jac.items()}

            def logdets(w: torch.dtype) -> list[Tensor]:
                jw = {n: j.to(w) for n, j in jac.items()}
                pw, sw = {n: p.to(w) for n, p in prec.items()}, None if sigma is None else sigma.to(w)
                if form is Bound.PARAMETRIC:
                    return [_param_block_logdet(jw, pw, names, blk, sw) for blk in blocks]
                return [_dense_block_logdet(jw, pw, blk, outputs, c, sw) for blk in blocks]

        # I + K has eigenvalues near 1 next to ones of max|K| ~ |J|^2 / (delta sigma^2), and float32's
        # rounding of the Gram products moves the small ones by ~ eps * (the rows' norms). With a
        # Gaussian likelihood every row is large once sigma is learned down to the noise level: a
        # float32 MLP fitting sin(2x) (rmse 0.0094) at sigma = 0.01 got a bound 10 nats off with a
        # noise hypergradient of -44.4 for the true +5.7 (the wrong sign), and a NaN with one
        # block; a linear regression at its MAP with sigma = 5e-3 a prior hypergradient of 0.33
        # for 2.11. So do kernels with nearly as many rows as weights or more (rank-deficient or
        # nearly so: a Gram of q = rows / weights has its smallest eigenvalue at about
        # (1 - sqrt q)^2 of the mean, Marchenko-Pastur): a float32 logistic regression at delta =
        # 1e-4 was 1.9 nats off (27 weights, 64 x 3 rows), one at delta = 1e-6 54 nats (63
        # weights, 55 rows, one sampled output). Those are formed and factored in float64, from
        # the factors or Jacobians in ``dt`` (their own rounding moves a null direction of K at
        # second order only). For the rest, rows <= 3/4 of the weights, the softmax's curvature
        # (at most 1/4, about 0 on confident examples) keeps the rows small: float32 stays within
        # 7e-4 (relative) of float64 at delta = 1e-4 on digits (1,280 rows, 26k weights), 6e-6
        # at delta = 1e-2 with 5,000 rows for 9,610 weights, and is formed again in float64 only
        # where its Cholesky fails. (MPS has no float64.)
        wide = torch.float64 if x.device.type != "mps" else dt
        rows = min(b, subset_size or b) * (c if outputs is Outputs.ALL else 1)
        weights = sum(params[n].numel() for n in names)
        square = 4 * rows > 3 * weights if form is not Bound.PARAMETRIC else 4 * weights > 3 * rows
        first = wide if likelihood is Likelihood.REGRESSION or square else dt
        draws = torch.get_rng_state() if outputs is Outputs.SAMPLED else None
        # a kernel I + K in the low precision too ill-scaled for it (a weak prior) is formed again
        # in float64 as well (its smallest eigenvalue is 1: the rounding is measured by its
        # largest diagonal entry; the parametric form's I + P0^-1/2 G P0^-1/2 too)
        token = _rounding_limit.set(_ROUNDING if first != wide else None)
        try:
            log_det = torch.stack(logdets(first)).sum()
        finally:
            _rounding_limit.reset(token)
        if first != wide and not bool(torch.isfinite(log_det)):
            if draws is not None:
                torch.set_rng_state(draws)  # (the same outputs drawn for outputs="sampled")
            log_det = torch.stack(logdets(wide)).sum()
        log_det = log_det.to(dt)
        return _Terms(_log_lik(f, y, likelihood, sigma), log_det, quad, b)


def _check_prior_shapes(prior: PriorPrecision, params: Mapping[str, Tensor], names: Sequence[str]) -> None:
    """Per-weight precisions shaped like their weights (a ``ValueError`` naming them): in the MAP
    step's penalty ``delta * w**2`` a weight resized since the PriorPrecision was built (a head
    of 3 outputs replaced by one of 1) was broadcast against the old precisions, silently (three
    times the head's penalty), or failed with torch's bare size mismatch."""
    bad = []
    for n in names:
        r = prior.raw[prior._index[n]]
        if n in params and r.dim() > 0 and r.shape != params[n].shape:
            bad.append(f"{n} {tuple(r.shape)} vs {tuple(params[n].shape)}")
    if bad:
        raise ValueError(
            f"per-weight prior precisions do not match the weights' shapes ({', '.join(bad[:3])}): "
            "was the PriorPrecision built for another model (or a layer resized since)?"
        )


def _rows_tolerance(eps: float, model_eps: float) -> float:
    """The relative tolerance (times ``1 +`` the row's largest output) of the checks that an
    example alone gives its row of the batch, for outputs of machine epsilon ``eps`` from a model
    whose parameters and buffers have at most ``model_eps``: at least 1e-2 where anything is in
    float32 or below (batched and single kernels round differently, by more under TF32 on GPUs),
    1e-6 where all is float64, which TF32 never rounds (float32's 1e-2 let a model mixing the
    batch, ``x - x.mean(0)``, through silently at outputs of about 1e-3: an absolute 1e-2 for
    rows that small); at most 1/8 (bfloat16's 64 eps is 1/2)."""
    floor = 1e-2 if max(eps, model_eps) > 1e-10 else 1e-6
    return max(floor, min(64 * eps, 0.125))


def _model_eps(model: nn.Module) -> float:
    """The largest machine epsilon of the model's floating-point parameters and buffers (0 if
    none): a float64 head over a float32 frozen part rounds (under TF32 too) as the latter does."""
    tensors = [*model.parameters(), *model.buffers()]
    return max((torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point()), default=0.0)


def _check_per_example(model: nn.Module, x: Tensor, f: Tensor) -> None:
    """The model's outputs ``f`` ``(B, C)`` of the batch ``x``, example by example: the first
    and the last example alone must give their rows of ``f`` (two more forward passes, of one
    example each). A statistic over the batch inside the model (``x - x.mean(0)``, a
    normalisation by hand, attention across the batch) makes the evidence undefined, as BatchNorm
    in training mode does; it went through silently, the two kernels disagreeing (-16.06
    layerwise, -14.21 dense: the dense Jacobians are those of single examples, for which
    ``x - x.mean(0)`` is 0). The last example too: a model mixing each example with the ones
    before it only (causal attention or a running mean over the rows of the batch, its rows
    taken for time steps) gives the first example's row alone, and went through silently."""
    for i in (0, x.shape[0] - 1):
        with torch.no_grad():
            one = _output(model(x[i : i + 1]))
        row = f[i : i + 1].detach()
        eps = max((torch.finfo(t.dtype).eps for t in (one, row) if t.is_floating_point()), default=0.0)
        # (loose: batched and single kernels round differently, by more under TF32 on GPUs; a
        # statistic over the batch moves the outputs by far more. At most 1/8 of them: bfloat16's
        # 64 eps is 1/2, which let x - x.mean(0) through, 0.92 off on outputs of 1.16, where every
        # other dtype refused it; 1/8 is still 16 bfloat16 roundings)
        tol = _rows_tolerance(eps, _model_eps(model)) * (1.0 + float(row.abs().max()))
        diff = float((one.reshape(row.shape) - row).abs().max()) if one.numel() == row.numel() else math.inf
        if diff > tol:  # (not for NaN outputs: the non-finite guards judge those)
            which = "first" if i == 0 else "last"
            raise ValueError(
                f"the model's output for one example depends on the other examples in the batch (the "
                f"{which} example alone gives outputs {diff:.3g} away from its row in the batch): a "
                "statistic over the batch (x - x.mean(0), a normalisation by hand, attention across "
                "the batch) leaves the Laplace evidence (and its bound) undefined, as BatchNorm in "
                "training mode does. Normalise with statistics fixed in advance, or per example"
            )


def _check_rows_alone(alone: Tensor, rows: Tensor, samples: int, model_eps: float = 0.0) -> None:
    """Every row of the batch's outputs ``rows`` ``(B * S, C)`` is what its example (augmented
    copy) gives alone, ``alone`` (with the tolerance of :func:`_check_per_example`); else the
    ``ValueError`` of a model mixing the examples of a batch."""
    if alone.shape != rows.shape:
        i, diff = 0, math.inf
    else:
        eps = torch.finfo(rows.dtype).eps if rows.is_floating_point() else 0.0
        tol = _rows_tolerance(eps, model_eps) * (1.0 + rows.abs().amax(1))
        over = (alone.to(rows.dtype) - rows).abs().amax(1) > tol  # (not for NaN outputs)
        if not bool(over.any()):
            return
        i = int(over.nonzero()[0, 0])
        diff = float((alone[i].to(rows.dtype) - rows[i]).abs().max())
    raise ValueError(
        f"the model's output for one example depends on the other examples in the batch (example "
        f"{i // samples} alone gives outputs {diff:.3g} away from its row in the batch): a "
        "statistic over the batch (x - x.mean(0), a normalisation by hand, sequences cut to the "
        "batch's longest, attention across the batch) leaves the Laplace evidence (and its bound) "
        "undefined, as BatchNorm in training mode does. Normalise with statistics fixed in "
        "advance, or per example"
    )


def _rng_states(device: torch.device) -> list[Tensor]:
    """The states of torch's default random generators that a model on ``device`` draws from."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _full_precision(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off (if it is on) for the library's own arithmetic."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _pick_outputs(outputs: Outputs, c: int) -> tuple[list[int], float]:
    if outputs is Outputs.SAMPLED:
        return [int(torch.randint(c, (1,)))], float(c)
    return list(range(c)), 1.0


def _layer_block_logdet(
    layers: list[tuple[str | None, str | None, Tensor, Tensor]],
    prec: dict[str, Tensor],
    blk: slice,
    outputs: Outputs,
    c: int,
    sigma: Tensor | None,
) -> Tensor:
    scale = 1.0 if sigma is None else sigma.pow(-2)
    if outputs is Outputs.ALL:
        k: Tensor | None = None
        for nw, nb, a, g in layers:
            a, g = a[blk], g[:, blk]
            m, s = a.shape[0], a.shape[1]
            bias = 0.0 if nb is None else 1.0 / prec[nb]
            wdiv = prec[nw] if nw is not None else math.inf  # (a frozen weight: no term)
            if s == 1:
                g2 = g[:, :, 0].permute(1, 0, 2).reshape(m * c, -1)
                gg = (g2 @ g2.T).reshape(m, c, m, c)
                aa = a[:, 0] @ a[:, 0].T
                term = gg * (aa / wdiv + bias)[:, None, :, None]  # type: ignore[index]
            else:
                gg = torch.einsum("dbso,ekto->bdsket", g, g)
                aa = torch.einsum("bsi,kti->bskt", a, a)
                term = torch.einsum("bdsket,bskt->bdke", gg, aa / wdiv + bias)  # type: ignore[index]
            k = term if k is None else k + term
            del gg, term
        assert k is not None
        n = k.shape[0] * c
        k = k.reshape(n, n)
        k = k * scale if sigma is not None else k
        k.diagonal().add_(1.0)
        return _logdet_pd(k)
    outs, mult = _pick_outputs(outputs, c)
    kd: Tensor | None = None
    for nw, nb, a, g in layers:  # all the outputs' (M, M) kernels at once: (D, M, M)
        a, gd = a[blk], g[outs, blk] if len(outs) < c else g[:, blk]
        d, m, s = gd.shape[0], a.shape[0], a.shape[1]
        g2 = gd.reshape(d, m * s, -1)
        gg = torch.bmm(g2, g2.transpose(1, 2))  # (D, MS, MS)
        a2 = a.reshape(m * s, -1)
        w = (a2 @ a2.T) / prec[nw] if nw is not None else torch.zeros_like(a2[:, :1] @ a2[:, :1].T)
        if nb is not None:
            w = w + 1.0 / prec[nb]
        term = gg * w
        if s > 1:
            term = term.reshape(d, m, s, m, s).sum((2, 4))
        kd = term if kd is None else kd + term
    assert kd is not None
    kd = kd * scale
    kd.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return _logdet_pd(kd) * mult


def _dense_block_logdet(
    jac: dict[str, Tensor],
    prec: dict[str, Tensor],
    blk: slice,
    outputs: Outputs,
    c: int,
    sigma: Tensor | None,
) -> Tensor:
    scale = 1.0 if sigma is None else sigma.pow(-2)

    def gram(j: Tensor, p: Tensor) -> Tensor:  # j: (m, o, P) -> (m*o, m*o)
        j2 = j.reshape(-1, j.shape[-1])
        if p.dim() == 0:
            return (j2 @ j2.T) / p
        return (j2 / p.reshape(1, -1)) @ j2.T

    outs, mult = _pick_outputs(outputs, c)
    groups = [outs] if outputs is Outputs.ALL else [[d] for d in outs]
    dets = []
    for grp in groups:
        k = sum(gram(j[blk][:, grp], prec[n]) for n, j in jac.items())
        assert isinstance(k, Tensor)
        k = k * scale
        dets.append(_logdet_pd(torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + k))
    return torch.stack(dets).sum() * mult


def _param_block_logdet(
    jac: dict[str, Tensor], prec: dict[str, Tensor], names: Sequence[str], blk: slice, sigma: Tensor | None
) -> Tensor:
    js = torch.cat([jac[n][blk] for n in names], dim=2)  # (m, C, P)
    js = js.reshape(-1, js.shape[-1])
    if sigma is not None:
        js = js / sigma
    delta = torch.cat(
        [prec[n].expand(jac[n].shape[-1]) if prec[n].dim() == 0 else prec[n].reshape(-1) for n in names]
    )
    # log det(P0 + G) - log det P0 as log det(I + P0^-1/2 G P0^-1/2): the same number, with the
    # eigenvalue floor 1 of the NTK kernels, so that its rounding is judged as theirs (formed
    # as diag(delta) + G in float32 it was silently off in the band before its Cholesky fails:
    # the precision's hypergradient 1.2-1.6% at delta = 1e-5)
    js = js / delta.sqrt()
    a = js.T @ js
    a.diagonal().add_(1.0)
    return _logdet_pd(a)


def _as_sigma(
    noise: ObservationNoise | Tensor | float | None, likelihood: Likelihood, dtype: torch.dtype
) -> Tensor | None:
    """The noise of the pure functions as a 0-dim tensor of the bound's ``dtype`` (a Python float
    is not rounded to float32 first), checked: a scalar, finite and > 0, regression only."""
    if noise is None:
        return None
    if likelihood is Likelihood.CLASSIFICATION:
        raise ValueError(
            "likelihood='classification' has no observation noise: noise= would rescale the "
            "kernel of a softmax likelihood (remove it, or use likelihood='regression')"
        )
    if isinstance(noise, ObservationNoise):
        sigma = noise()
    elif isinstance(noise, Tensor):
        sigma = noise
    elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
        sigma = torch.tensor(float(noise), dtype=dtype)
    else:
        raise TypeError(f"noise must be an hg.hparams.ObservationNoise, a tensor or a float, got {noise!r}")
    if sigma.numel() != 1 or sigma.is_complex() or not sigma.is_floating_point():
        raise ValueError(
            f"noise must be one real standard deviation (a 0-dim float tensor), got a {sigma.dtype} "
            f"tensor of shape {tuple(sigma.shape)} (one sigma per output is not supported)"
        )
    sigma = sigma.reshape(())
    if not bool(torch.isfinite(sigma) & (sigma > 0)):
        raise ValueError(f"noise must be a finite standard deviation > 0, got {float(sigma.detach())}")
    return sigma.to(dtype)


def _check_real_weights(params: Mapping[str, Tensor], names: Sequence[str]) -> None:
    """Complex weights are refused by name: the evidence of a complex weight is that of its real
    and imaginary parts, which the kernels (and the softmax) do not form; it failed with a
    misleading error ("noise must be one real standard deviation ... got a torch.complex128
    tensor" for noise=0.5) or a bare ``"softmax_lastdim_kernel_impl" not implemented``."""
    bad = [n for n in names if params[n].is_complex()]
    if bad:
        raise ValueError(
            f"the Laplace evidence needs real weights; {bad[:3]} are complex "
            f"({params[bad[0]].dtype}): write each complex weight as two real ones (its real and "
            "imaginary parts, torch.view_as_real), or leave it out of the prior and freeze it"
        )


def _samples_without_augmentation(arg: str, samples: int) -> str:
    """``samples`` > 1 draws that many copies of each input from the RandomTranslation, and
    nothing else: without one it was ignored silently (one forward pass per example), which a
    user averaging over a random augmentation of their own, inside the model, would not know."""
    return (
        f"{arg}={samples} needs a hg.hparams.RandomTranslation (the augmentation whose copies are "
        "averaged); there is none, so it would be ignored. An augmentation inside the model is not "
        f"averaged over (and must not be random in eval mode): leave {arg}=1, or add the "
        "RandomTranslation"
    )


def _check_prior_knows(model: nn.Module, prior: PriorPrecision) -> None:
    """Every trainable weight is one the prior covers or left out on purpose (``include=``):
    weights the model gained after the PriorPrecision was built (a head appended), or that were
    frozen then and train now, were silently taken as constants, neither marginalised nor under
    the prior (an evidence of -5.64 for a network whose new head the bound never saw), where
    ``prior.penalty`` warns and MarginalLikelihood refuses them."""
    known = getattr(prior, "_known", None)
    frozen = set(getattr(prior, "_frozen_at_build", ()))
    new = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad
        and n not in prior.names
        and ((known is not None and n not in known) or n in frozen)
    ]
    if new:
        raise ValueError(
            f"weights {new[:3]} require grad but the PriorPrecision does not cover them: the model "
            "gained them after it was built (or they were frozen then): they would be taken as "
            "constants, neither marginalised nor under the prior. Build the PriorPrecision for the "
            "model as it is now, or freeze them (requires_grad_(False)) to condition on them"
        )


def _moving_weights(opt: torch.optim.Optimizer, weights: Sequence[Tensor]) -> list[Tensor]:
    """``weights`` less those :func:`~hypergrad._implicit.held_at_zero` holds (all of them where
    it would hold every one)."""
    held = held_at_zero(opt)
    return [w for w in weights if id(w) not in held] or list(weights)


def _names(model: nn.Module, prior: PriorPrecision) -> list[str]:
    params = dict(model.named_parameters())
    return [n for n in prior.names if n in params and params[n].requires_grad]


# --------------------------------------------------------------------------------------- public


def log_evidence_bound(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior: PriorPrecision,
    *,
    data_size: int,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    noise: ObservationNoise | Tensor | float | None = None,
    subset_size: int | None = None,
    outputs: Outputs | str = Outputs.ALL,
    form: Bound | str = Bound.NTK,
    augmentation: RandomTranslation | None = None,
    samples: int = 1,
    kernel: str = "auto",
) -> Tensor:
    r"""The stochastic lower bound on the linearised-Laplace log evidence from one batch.

    .. math::
        \hat q = \tfrac{N}{B}\Big(\sum_{n\in b}\log p(y_n\mid f_n)
            - \tfrac12\sum_{k}\log\det(I + L_k^\top J_k P_0^{-1}J_k^\top L_k)\Big)
            - \tfrac12\theta^\top P_0\theta,

    the batch ``(x, y)`` of :math:`B` examples split into consecutive blocks :math:`k` of
    ``subset_size`` :math:`M`. Its expectation over random batches is a lower bound on the
    evidence (equal to it when :math:`B = M = N`); evaluated at the MAP weights of the current
    hyperparameters. Differentiable w.r.t. the prior precisions, the noise and the augmentation
    range (not w.r.t. the weights: the Jacobians are taken as constants).

    Args:
        model: the network; its outputs ``(B, C)`` are logits (classification) or means (regression).
            Must not hold BatchNorm, Dropout or RReLU in training mode, nor draw random numbers
            (functional dropout in training mode), nor mix examples (``x - x.mean(0)``: without
            ``augmentation``, the first and the last example are run alone to check)
            (``ValueError``). Under
            ``torch.compile`` or a (Distributed)DataParallel wrapper, the bare module is used.
        x, y: a batch: inputs ``(B, ...)``; integer labels ``(B,)`` or targets ``(B, C)``/``(B,)``.
        prior: the :class:`~hypergrad.hparams.PriorPrecision` covering every weight that requires grad.
        data_size: :math:`N`, the size of the whole training set.
        likelihood: ``"classification"`` (default) or ``"regression"``.
        noise: :math:`\sigma` (an :class:`~hypergrad.hparams.ObservationNoise`, a 0-dim tensor or a
            float; finite, > 0), regression only (required there); used in the model's dtype (at
            least float32).
        subset_size: :math:`M`; ``None`` (default) keeps the batch as one block.
        outputs: ``"all"`` (default; ``(MC, MC)`` kernels), ``"each"`` (``C`` kernels ``(M, M)``:
            looser, ``C`` times cheaper) or ``"sampled"`` (one random output, times ``C``).
            ``form="parametric"`` is the ``"all"`` bound and ``form="exact"`` keeps every output:
            another choice is a ``ValueError``.
        form: ``"ntk"`` (default; kernels), ``"parametric"`` (:math:`\log\det(P_0 + G_k) -
            \log\det P_0` with the block GGN :math:`G_k` ``(P, P)``, not rescaled; the same number
            as ``"ntk"`` with ``outputs="all"``) or ``"exact"`` (the whole data set as one block:
            ``len(x) == data_size``).
        augmentation: a :class:`~hypergrad.hparams.RandomTranslation`: the model is then the
            average of its outputs over ``samples`` augmented copies of each input.
        samples: augmentations per example :math:`S` (default: 1).
        kernel: ``"layerwise"`` (per ``nn.Linear`` layer, from inputs and output gradients: no
            ``P``-sized Jacobian), ``"dense"`` (``torch.func`` Jacobians ``(B, C, P)``) or ``"auto"``
            (default; layerwise when possible: the NTK form, trained weights all in ``nn.Linear``
            layers each used once on ``(B, d)`` inputs (one row per example and sample), one
            precision per layer or a global one; not for ``nn.Linear`` subclasses with their own
            ``forward``, layers with hooks (or any global module forward hook), layers on
            ``(B*T, d)`` rows (a token-wise layer), weights tied between two layers or also read
            outside their layer (a tied decoder ``F.linear(h, enc.weight.T)``), or under
            ``torch.inference_mode``, which take the dense kernel). In-place operations after a
            layer (``ReLU(inplace=True)``) are fine.

    Returns:
        The bound, a 0-dim tensor (nats, for the whole data set), in the weights' dtype, at least
        float32: the kernels and their Cholesky factors of a bfloat16 or float16 model are formed
        in float32 (as are all of them under ``torch.autocast``; the model itself runs as called).
        Regression kernels, and kernels with more than 3/4 as many rows as trained weights, are
        formed and factored in float64 from the model's Jacobians (in float32 a small learned
        noise, ``sigma = 0.01`` on a clean fit, gave hypergradients of the wrong sign); other
        classification kernels too where their float32 Cholesky fails (the same outputs drawn for
        ``outputs="sampled"``); the result is rounded back.

    Raises:
        ValueError: ``noise`` with ``likelihood="classification"`` (or missing with
            ``"regression"``), or not one finite value > 0; ``data_size`` smaller than the batch
            (or, with ``form="exact"``, different from it, or split by a ``subset_size`` smaller
            than it); a prior that covers none of the
            model's trainable weights, or whose per-weight precisions do not fit their shapes;
            BatchNorm, Dropout or RReLU in training mode, or BatchNorm without running statistics;
            a model whose forward pass draws random numbers (functional dropout
            ``F.dropout(h, p, self.training)`` in training mode; checked without
            ``augmentation``, which draws its own); a model whose output for one example
            depends on the others (the first or the last example alone gives other outputs than
            its row of the batch; with ``augmentation``, an augmented copy alone, its row of the
            augmented batch); an empty batch; targets that do not
            fit the outputs (classification: labels outside ``[0, C)``, e.g. a padding label
            -100, or outputs other than logits ``(B, C)``, e.g. ``(B, T, C)``; regression: bool
            or complex targets); inputs of another dtype or device; an invalid ``subset_size``,
            ``samples`` or ``kernel`` (or ``"layerwise"`` where it cannot apply); ``outputs``
            other than ``"all"`` with ``form="parametric"`` or ``"exact"``.
        TypeError: ``noise`` of another type, a ``prior`` that is not a PriorPrecision, an
            ``augmentation`` that is not a RandomTranslation, or ``x`` or ``y`` not a tensor.

    Cost (layerwise kernel): one forward pass (and, without ``augmentation``, three of one example
    each, without a graph: the first and the last for the check above, the first again for the
    layers' rows, and one of the batch rolled by one example: rows that belong to other
    examples; with ``augmentation``, the last two on the ``B * S`` augmented copies), the ``C``
    output gradients in
    one vectorised backward pass (``C`` passes where an operation has no batching rule), then per block
    ``O((MCS)^2 d)`` for the layer kernels (``d`` the layer width) and a Cholesky ``O((MC)^3)``
    (``outputs="each"``: ``C`` Choleskys ``O(M^3)``). Dense kernel: ``torch.func`` Jacobians,
    memory ``O(BSCP)``; ``form="parametric"``: a ``(P, P)`` Cholesky per block. Differentiating
    the bound costs about as much again. The kernels formed in float64 (see Returns) take about
    2-3 times their float32 time on a CPU (an MLP regression hyperstep: 26 -> 61-72 ms).

    >>> import torch, hypergrad as hg
    >>> _ = torch.manual_seed(0); model = torch.nn.Linear(3, 2).double()
    >>> prior = hg.hparams.PriorPrecision(model, init=1.0).double()
    >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    >>> exact = hg.log_evidence(model, x, y, prior)
    >>> b2 = hg.log_evidence_bound(model, x, y, prior, data_size=6, subset_size=2)
    >>> bool(b2 <= exact), torch.allclose(hg.log_evidence_bound(model, x, y, prior, data_size=6), exact)
    (True, True)
    """
    likelihood = Likelihood(likelihood)
    form = Bound(form)
    # the bare module, whose parameter names the PriorPrecision holds (it was built through the
    # same wrappers): a torch.compile'd model was refused as "a prior built for another model"
    model = unwrap_model(model)
    if not isinstance(prior, PriorPrecision):
        raise TypeError(
            f"prior must be an hg.hparams.PriorPrecision built for the model, got {type(prior).__name__} "
            "(for a fixed precision d use PriorPrecision(model, init=d))"
        )
    _check_nonempty(x, y)
    if augmentation is not None and not isinstance(augmentation, RandomTranslation):
        # (an augmentation module of one's own, or a function, failed with "'Aug' object has no
        # attribute 'raw'")
        raise TypeError(
            f"augmentation must be an hg.hparams.RandomTranslation, got {type(augmentation).__name__}: "
            "another augmentation is applied inside the model (and, if random, in training mode only)"
        )
    data_size = _count(data_size, "data_size", 1)
    if x.shape[0] > data_size:
        raise ValueError(
            f"the batch holds {x.shape[0]} examples but data_size={data_size}: "
            "data_size must be the number of training examples (the bound scales the batch by N/B)"
        )
    _check_parametric_outputs(form, Outputs(outputs), "form")
    if form is Bound.EXACT:
        if x.shape[0] != data_size:
            raise ValueError(
                f"form='exact' needs the whole data set: got {x.shape[0]} of {data_size} examples"
            )
        _check_exact_subset(_subset(subset_size), data_size, "form")
        form, subset_size = Bound.NTK, None
    samples = _count(samples, "samples", 1)
    if augmentation is None and samples > 1:
        raise ValueError(_samples_without_augmentation("samples", samples))
    names = _names(model, prior)
    if not names:
        raise ValueError(
            "the PriorPrecision covers none of the model's trainable weights (built for another "
            "model, or every covered weight frozen): there is nothing to marginalise"
        )
    _check_real_weights(dict(model.named_parameters()), names)
    _check_prior_knows(model, prior)
    first = dict(model.named_parameters())[names[0]]
    dtype = first.dtype
    check_batch(x, "x", first.device, dtype)  # (a clear error, not a matmul's dtype mismatch)
    t = _terms(
        model,
        x,
        y,
        prior,
        names,
        likelihood=likelihood,
        sigma=_as_sigma(noise, likelihood, torch.promote_types(dtype, torch.float32)),
        subset_size=subset_size,
        outputs=Outputs(outputs),
        form=form,
        augmentation=augmentation,
        samples=samples,
        kernel=kernel,
    )
    return data_size / t.batch * (t.log_lik - 0.5 * t.log_det) - 0.5 * t.quad


def _check_exact_subset(subset_size: int | None, data_size: int, arg: str) -> None:
    """The exact evidence is the whole data set as one block: a ``subset_size`` that would split it
    was ignored silently (the exact evidence returned where the bound over blocks was asked for)."""
    if subset_size is not None and subset_size < data_size:
        raise ValueError(
            f"subset_size={subset_size} splits the data set into blocks, but {arg}='exact' keeps it "
            f"as one block (the exact evidence): use {arg}='ntk' with subset_size={subset_size} for "
            f"the bound over blocks, or leave subset_size=None with {arg}='exact'"
        )


def _check_parametric_outputs(form: Bound, outputs: Outputs, arg: str) -> None:
    """The parametric form is the ``outputs="all"`` bound, and the exact evidence keeps every
    output: refuse another choice rather than returning a number other than the one asked for."""
    if form is Bound.PARAMETRIC and outputs is not Outputs.ALL:
        raise ValueError(
            f"outputs={outputs.value!r} has no parametric form: {arg}='parametric' computes the "
            f"outputs='all' bound (log det(P0 + G_b) over every output); use {arg}='ntk' for "
            f"outputs={outputs.value!r}, or outputs='all'"
        )
    if form is Bound.EXACT and outputs is not Outputs.ALL:
        # (log_evidence_bound returned the looser outputs='each' bound under the name 'exact')
        raise ValueError(
            f"outputs={outputs.value!r} is a bound, not the exact evidence: {arg}='exact' keeps "
            f"the whole (NC, NC) kernel; use outputs='all' (default) with {arg}='exact', or "
            f"{arg}='ntk' for outputs={outputs.value!r}"
        )


def log_evidence(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prior: PriorPrecision,
    *,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    noise: ObservationNoise | Tensor | float | None = None,
    form: Bound | str = Bound.NTK,
    augmentation: RandomTranslation | None = None,
    samples: int = 1,
    kernel: str = "auto",
) -> Tensor:
    r"""The exact linearised-Laplace log evidence of the data set ``(x, y)`` (all of it).

    .. math::
        \log q = \log p(\mathcal D\mid\theta) - \tfrac12\theta^\top P_0\theta
            - \tfrac12\log\det(I + L^\top J P_0^{-1} J^\top L),

    with ``form="ntk"`` (an ``(NC, NC)`` kernel) or ``form="parametric"``
    (:math:`\log\det(P_0 + J^\top\Lambda J) - \log\det P_0`, ``(P, P)``). At the MAP weights of a
    linear model with a Gaussian likelihood it is the exact log evidence. Arguments as
    :func:`log_evidence_bound` (with ``data_size = len(x)`` and one block). Small problems only:
    memory :math:`O((NC)^2)` or :math:`O(P^2)`, time their cube.

    Returns:
        A 0-dim tensor, differentiable w.r.t. ``prior``'s (and ``noise``'s, and the augmentation's)
        raw tensors; not w.r.t. the weights, which (with the Jacobians) are taken as constants,
        as in :func:`log_evidence_bound`. Raises as :func:`log_evidence_bound`.

    >>> import torch, hypergrad as hg
    >>> _ = torch.manual_seed(0); model = torch.nn.Linear(3, 1, bias=False).double()
    >>> prior = hg.hparams.PriorPrecision(model, init=2.0).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    >>> a = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=0.5)
    >>> b = hg.log_evidence(model, x, y, prior, likelihood="regression", noise=0.5, form="parametric")
    >>> torch.allclose(a, b)
    True
    """
    _check_nonempty(x, y)
    return log_evidence_bound(
        model,
        x,
        y,
        prior,
        data_size=x.shape[0],
        likelihood=likelihood,
        noise=noise,
        subset_size=None,
        form=form,
        augmentation=augmentation,
        samples=samples,
        kernel=kernel,
    )


def _copy_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _put_back(d: dict[Any, Any], saved: dict[Any, Any], skip: str = "") -> None:
    """``d`` made equal to ``saved`` in place: its tensors keep their identity (values copied
    into them), keys added since are removed."""
    for key in [k for k in d if k not in saved and k != skip]:
        del d[key]
    for key, v in saved.items():
        old = d.get(key)
        if (
            isinstance(v, Tensor)
            and isinstance(old, Tensor)
            and old.shape == v.shape
            and old.dtype == v.dtype
        ):
            with torch.no_grad():
                old.copy_(v)
        else:
            d[key] = v


def _snapshot_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    state = {id(p): {k: _copy_value(v) for k, v in st.items()} for p, st in opt.state.items()}
    groups = [{k: _copy_value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups


def _restore_optimizer(
    opt: torch.optim.Optimizer, snap: tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]
) -> None:
    """Undo steps of ``opt`` in place. Not ``load_state_dict``: that replaces the param-group
    dicts and their values by copies, so a tensor learning rate that the user (or a schedule)
    updates in place, or a group dict held elsewhere, would silently stop reaching the
    optimiser after a refused hyperstep."""
    state, groups = snap
    for p in list(opt.state):
        if id(p) not in state:
            del opt.state[p]  # state created by the undone steps (a first Adam step)
        else:
            _put_back(opt.state[p], state[id(p)])
    for p in (p for g in opt.param_groups for p in g["params"]):
        if id(p) in state and p not in opt.state:
            opt.state[p] = state[id(p)]
    for g, saved in zip(opt.param_groups, groups, strict=True):
        _put_back(g, saved, skip="params")


class MarginalLikelihood(HyperOptimizer):
    r"""Hyperparameters by maximising a lower bound on the marginal likelihood, on training data only.

    :meth:`step` is a MAP step on :math:`\big(N\cdot\overline{\mathrm{NLL}}_b + \tfrac12\theta^\top
    P_0\theta\big)/N` (the mean negative log-likelihood of the batch plus the prior divided by
    :math:`N`); :meth:`hyper_step` takes ``outer_steps`` steps of ``outer_optimizer`` on
    :math:`-\hat q/N`, the negative stochastic evidence bound of :func:`log_evidence_bound` on
    ``train_batch`` (per datum), the weights held at their current value (Immer et al. 2023).
    No validation set.

    Hyperparameters (found in ``hparams`` by type, nested anywhere): exactly one
    :class:`~hypergrad.hparams.PriorPrecision` covering every trained weight; one
    :class:`~hypergrad.hparams.ObservationNoise` for ``likelihood="regression"`` (none for
    classification); optionally one :class:`~hypergrad.hparams.RandomTranslation`, applied to the
    inputs ``augmentation_samples`` times, the model's outputs averaged (in training and in the bound).

    Under ``DistributedDataParallel`` each rank passes its shard; its bound is the shard's, scaled
    by :math:`N/B`, and the hypergradient is the mean over the ranks: the bound of the
    concatenated batch partitioned along the shards (with ``through_map=True``, every HVP is
    averaged as in :class:`~hypergrad.Implicit`). ``bound="exact"`` needs the whole data set on
    each rank.

    Args:
        model: the network (outputs ``(B, C)``). BatchNorm, Dropout or RReLU in training mode, and
            (without an augmentation) any forward pass that draws random numbers, such as
            functional dropout in training mode, are refused at :meth:`hyper_step`
            (``ValueError``): call ``model.eval()`` around it. So is a model whose output for
            one example depends on the others in the batch (``x - x.mean(0)``).
        hparams: the module holding the containers above.
        likelihood: ``"classification"`` (labels ``(B,)``) or ``"regression"``.
        data_size: :math:`N`, the number of training examples.
        inner_optimizer, outer_optimizer, on_nonfinite, divergence: see :class:`HyperOptimizer`
            (``inner_optimizer`` with ``weight_decay=0``: the prior is the PriorPrecision).
        bound: ``"ntk"`` (default), ``"parametric"``, or ``"exact"`` (``train_batch`` must hold the
            whole data set).
        subset_size: :math:`M`, the block size of the bound; ``None`` (default): the whole batch.
        outputs: ``"all"``, ``"each"`` or ``"sampled"`` (see :func:`log_evidence_bound`).
        outer_steps: :math:`K`, outer steps per :meth:`hyper_step` on the same batch (default: 1).
        burn_in, every: schedule for :meth:`hyper_step_due` (default: 0 and 1).
        augmentation_samples: :math:`S` (default: 1).
        kernel: ``"auto"``, ``"layerwise"`` or ``"dense"`` (see :func:`log_evidence_bound`).
        through_map: differentiate the bound *through the MAP* (default: False). By default the
            hypergradient holds the weights, their Jacobians and the likelihood's Hessian fixed
            (Immer et al.), so learning settles where that partial derivative vanishes: the
            precision best for the weights it trained, which for a network is not the maximiser
            of the evidence over MAPs. With ``through_map`` the hypergradient is the total
            derivative :math:`\mathrm{d}\hat q(\lambda, \theta^*(\lambda))/\mathrm{d}\lambda
            = \partial_\lambda \hat q - \partial^2_{\lambda\theta} L\, H^{-1}
            \partial_\theta \hat q` (the implicit function theorem on the batch's MAP
            objective :math:`L`, :math:`H = \nabla^2_\theta L`; the bound differentiated
            through the Jacobians as well): about 2 + ``solver`` HVPs more per hyperstep.
        solver: the :class:`~hypergrad.LinearSolver` for :math:`H^{-1}` with ``through_map``
            (default: ``CG(maxiter=20, tol=1e-6, damping=1e-3 / data_size)``: the damping is in
            the units of the MAP objective, a mean over the data, so that one of ``1e-3 / N``
            adds a precision of 1e-3 to the prior's in the solve; a fixed ``1e-3`` outweighed
            the prior's own curvature :math:`\delta / N` in every direction the batch leaves
            to the prior once :math:`N \delta^{-1} > 1000`); a :class:`~hypergrad.Neumann`
            needs a numeric ``alpha`` (its ``None`` / ``"power"`` / ``"lr"`` rules are
            :class:`~hypergrad.Implicit`'s, refused here with a ``ValueError``). One with
            ``warm_start=True`` starts from the previous accepted solve's solution (with
            ``outer_steps`` > 1, the previous outer step's), as in :class:`~hypergrad.Implicit`.

    Batches: ``step(batch)`` and ``hyper_step(train_batch=...)`` take ``(x, y, ...)``; a
    ``val_batch`` is ignored. ``info.outer_loss`` is :math:`-\hat q/N`.

    Cost per :meth:`hyper_step`: ``outer_steps`` times that of :func:`log_evidence_bound` on
    ``train_batch`` and its backward pass (plus the HVPs of ``through_map``); :meth:`step` is an
    ordinary training step (on ``augmentation_samples`` copies of each input).

    Raises:
        ValueError: ``hparams`` without exactly one PriorPrecision, with hyperparameters of any
            other kind, without an ObservationNoise for regression (or with one for classification),
            or with more than one RandomTranslation; trained weights the prior does not cover; an
            invalid ``data_size``, ``outer_steps``, ``burn_in``, ``every``,
            ``augmentation_samples``, ``subset_size``, ``kernel``, ``likelihood``, ``bound`` or
            ``outputs`` (or ``outputs`` other than ``"all"`` with ``bound="parametric"`` or
            ``"exact"``, or a ``subset_size`` smaller than ``data_size`` with
            ``bound="exact"``). At :meth:`hyper_step`: no ``train_batch``, one larger than
            ``data_size``
            (or not the whole data set with ``bound="exact"``), and what :func:`log_evidence_bound`
            refuses. At :meth:`step` (nothing changed): a batch larger than ``data_size``
            (``data_size`` is ``len(dataset)``, not the number of batches: only this much of a wrong
            ``N`` can be caught; a smaller wrong ``N`` rescales the prior and the bound silently),
            trained weights the prior does not cover (added to ``inner_optimizer`` or unfrozen after
            the PriorPrecision was built), and per-weight precisions whose shapes are not their
            weights' (a layer resized after the PriorPrecision was built). At construction and at
            :meth:`step`: an ``inner_optimizer`` with a weight decay of its own (``weight_decay`` !=
            0 in a param group, as AdamW's default 0.01, or ASGD's ``lambd``): the prior is the
            PriorPrecision, and a decay on top would train the weights to another MAP.
        NonFiniteError: (``on_nonfinite="raise"``) as :class:`HyperOptimizer`; with
            ``outer_steps`` > 1 the message names the outer step refused, and the ones before it
            are undone too (hyperparameters, their ``.grad`` and ``outer_optimizer``'s state
            and param groups put back in place: a tensor learning rate stays the user's tensor).
        TypeError: a ``solver`` that is not a :class:`~hypergrad.LinearSolver`, or ``through_map``
            not a bool.

    >>> import torch, hypergrad as hg
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> hp = torch.nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")})
    >>> hopt = hg.MarginalLikelihood(model, hp, likelihood="classification", data_size=100,
    ...     inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
    ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1), subset_size=10)
    >>> batch = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    >>> loss = hopt.step(batch)
    >>> info = hopt.hyper_step(train_batch=batch)
    >>> info.hyper_steps, hp["prior"].value.shape
    (1, torch.Size([2]))
    """

    # (it runs the model on the batch itself: no loss of the user's between them could cast it)
    _strict_batch_dtypes = True

    def __init__(
        self,
        model: nn.Module,
        hparams: nn.Module,
        *,
        likelihood: Likelihood | str,
        data_size: int,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        bound: Bound | str = Bound.NTK,
        subset_size: int | None = None,
        outputs: Outputs | str = Outputs.ALL,
        outer_steps: int = 1,
        burn_in: int = 0,
        every: int = 1,
        augmentation_samples: int = 1,
        kernel: str = "auto",
        through_map: bool = False,
        solver: LinearSolver | None = None,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        super().__init__(
            model,
            hparams,
            self._map_loss,
            self._map_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            on_nonfinite=on_nonfinite,
            divergence=divergence,
        )
        self.likelihood = Likelihood(likelihood)
        self.bound = Bound(bound)
        self.outputs = Outputs(outputs)
        _check_parametric_outputs(self.bound, self.outputs, "bound")
        data_size = _count(data_size, "data_size", 1)
        outer_steps = _count(outer_steps, "outer_steps", 1)
        burn_in = _count(burn_in, "burn_in", 0)
        every = _count(every, "every", 1)
        augmentation_samples = _count(augmentation_samples, "augmentation_samples", 1)
        subset_size = _subset(subset_size)
        if kernel not in _KERNELS:
            raise ValueError(f"Invalid kernel: {kernel!r} (choose from {_KERNELS})")
        if self.bound is Bound.EXACT:
            _check_exact_subset(subset_size, data_size, "bound")
        self.data_size, self.subset_size, self.outer_steps = data_size, subset_size, outer_steps
        self.burn_in, self.every, self.samples, self.kernel = burn_in, every, augmentation_samples, kernel
        if solver is not None and not isinstance(solver, LinearSolver):
            raise TypeError(
                f"solver must be an hg.LinearSolver (Neumann, CG, Identity), got {type(solver).__name__}"
            )
        if not isinstance(through_map, bool):  # (bool("false") is True: another hypergradient)
            raise TypeError(f"MarginalLikelihood: through_map must be True or False, got {through_map!r}")
        self.through_map = through_map
        if self.through_map and isinstance(solver, Neumann) and isinstance(solver.alpha, (str, type(None))):
            # (Neumann's None / 'power' / 'lr' rules are resolved by hg.Implicit only: the run
            # failed at its first hyperstep, after the burn-in, with "let Implicit resolve it")
            raise ValueError(
                f"MarginalLikelihood(through_map=True) needs a Neumann solver with a numeric step "
                f"size, got alpha={solver.alpha!r} (the None / 'power' / 'lr' rules are "
                "hg.Implicit's): give Neumann(steps=..., alpha=a) with a below 2 / the largest "
                "eigenvalue of the MAP objective's Hessian, or use hg.CG (the default)"
            )
        # the default damping in the MAP objective's units (mean NLL + theta^T P0 theta / (2N)): a
        # damping of 1e-3 there is a precision of 1e-3 N on every weight, which outweighed the
        # prior's delta / N in each direction the batch leaves to the prior (N = 1000, delta = 1:
        # a hypergradient of -0.0016 for the true +0.0021, the total derivative of a damped prior)
        default = CG(maxiter=20, tol=1e-6, damping=1e-3 / data_size)
        self.solver: LinearSolver = default if solver is None else solver
        self._hyper_at: int | None = None  # inner_steps at the last accepted hyper_step
        self._x0: tuple[Tensor, ...] | None = None  # through_map: the last accepted solution (warm start)
        priors: list[PriorPrecision] = []
        noises: list[ObservationNoise] = []
        augs: list[RandomTranslation] = []
        for mod in hparams.modules():
            if isinstance(mod, PriorPrecision):
                priors.append(mod)
            elif isinstance(mod, ObservationNoise):
                noises.append(mod)
            elif isinstance(mod, RandomTranslation):
                augs.append(mod)
        owned = {id(p) for m in priors + noises + augs for p in m.parameters()}
        other = [n for n, p in hparams.named_parameters() if id(p) not in owned]
        if len(priors) != 1:
            hint = ""
            if not priors and any(isinstance(m, WeightDecay) for m in hparams.modules()):
                hint = (
                    ": a WeightDecay is a penalty in train_loss, for Implicit or Unrolled; the "
                    "evidence's prior is hg.hparams.PriorPrecision(model, per=...), the precision "
                    "of N(0, 1/delta) on the weights (its MAP loss adds delta/2 |w|^2 itself)"
                )
            raise ValueError(
                f"hparams must hold exactly one hg.hparams.PriorPrecision (found {len(priors)}){hint}"
            )
        if other:
            raise ValueError(
                f"MarginalLikelihood tunes PriorPrecision, ObservationNoise and RandomTranslation "
                f"only; hyperparameter(s) {other[:3]} are none of them"
            )
        if self.likelihood is Likelihood.REGRESSION and len(noises) != 1:
            raise ValueError("likelihood='regression' needs one hg.hparams.ObservationNoise in hparams")
        if self.likelihood is Likelihood.CLASSIFICATION and noises:
            raise ValueError("likelihood='classification' has no observation noise: remove ObservationNoise")
        if len(augs) > 1:
            raise ValueError("hparams may hold at most one hg.hparams.RandomTranslation")
        self.prior: PriorPrecision = priors[0]
        self.noise: ObservationNoise | None = noises[0] if noises else None
        self.augmentation: RandomTranslation | None = augs[0] if augs else None
        if self.augmentation is None and self.samples > 1:
            raise ValueError(_samples_without_augmentation("augmentation_samples", self.samples))
        uncovered = [n for n in self.pair.weight_names if n not in self.prior.names]
        if uncovered:
            raise ValueError(f"trained weights {uncovered[:3]} are not covered by the PriorPrecision")
        self._covered_for: tuple[str, ...] = tuple(self.pair.weight_names)
        if self.kernel == "layerwise" and (
            self.bound is Bound.PARAMETRIC or any(r.dim() > 0 for r in self.prior.raw)
        ):
            # (known now, and refused only at the first hyperstep, after the burn-in: as the
            # Neumann step-size rules above)
            raise ValueError(
                "kernel='layerwise' needs the NTK form (bound='ntk' or 'exact') and one precision "
                f"per layer or a global one; got bound={self.bound.value!r} and a PriorPrecision with "
                f"per={self.prior.per!r}: use kernel='auto' or 'dense'"
            )
        if self.kernel == "layerwise":
            # the model's structure too: a trained weight that no plain nn.Linear owns (a
            # convolution's, a LayerNorm's, an embedding's) can never take the layerwise kernel;
            # a run with burn_in=1000 trained 1000 MAP steps before its first hyperstep said so
            linear = {
                id(t)
                for m in self.pair.model.modules()
                if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
                for t in (m.weight, m.bias)
                if t is not None
            }
            named = dict(self.pair.model.named_parameters())
            other = [n for n in self.pair.weight_names if id(named[n]) not in linear]
            if other:
                raise ValueError(
                    f"kernel='layerwise' needs every trained weight in a plain nn.Linear layer; "
                    f"{other[:3]} belong to other modules: use kernel='auto' (the dense kernel for "
                    "such a model) or kernel='dense'"
                )
        _check_real_weights(dict(self.pair.model.named_parameters()), self.pair.weight_names)
        self._check_no_decay()

    # ------------------------------------------------------------------ losses

    def _map_loss(self, model: nn.Module, hparams: nn.Module, batch: Batch) -> Tensor:
        x, y = _split_batch(batch)
        # checked at every step, not only at the first hyperstep (after burn_in MAP steps trained
        # with a prior scaled by the wrong N, or weights trained with no prior at all)
        self._check_data_size(x, "batch")
        self._check_covered()
        self._check_no_decay()
        _check_prior_shapes(self.prior, dict(unwrap_model(model).named_parameters()), self.prior.names)
        f = _forward(model, x, self.augmentation, self.samples, self.likelihood)
        sigma = None if self.noise is None else self.noise()
        nll = -_log_lik(f, y, self.likelihood, sigma) / x.shape[0]
        return nll + self.prior.penalty(model) / self.data_size

    def _map_penalty(self) -> Tensor:
        """The prior term of the MAP objective that :meth:`step` minimises, over every weight the
        PriorPrecision covers (frozen ones too: :meth:`_map_loss` adds them), for the reported
        ``train_loss``. The bound's ``quad`` covers the trained weights only, and a train_loss
        built from it dropped 1/2 delta |w|^2 / N of the others: not the loss step() returns at
        the same weights and batch."""
        with torch.no_grad():
            return self.prior.penalty(self.pair.model)

    def _check_data_size(self, x: Tensor, what: str) -> None:
        if x.shape[0] > self.data_size:
            raise ValueError(
                f"{what} holds {x.shape[0]} examples but data_size={self.data_size}: data_size "
                "must be the number of training examples, len(dataset), not the number of batches "
                "(the MAP objective divides the prior by N, and the bound scales the batch by N/B)"
            )

    def _check_covered(self) -> None:
        """Every trained weight under the prior: weights added to the inner optimiser (or
        unfrozen) after construction would otherwise train with no prior at all, refused only at
        the next hyperstep."""
        names = self.pair.weight_names
        if names != getattr(self, "_covered_for", None):
            uncovered = [n for n in names if n not in self.prior.names]
            if uncovered:
                raise ValueError(
                    f"trained weights {uncovered[:3]} are not covered by the PriorPrecision (added to "
                    "the inner optimiser or unfrozen after it was built): the MAP step would train "
                    "them with no prior and the evidence is not defined. Build the PriorPrecision "
                    "(and this MarginalLikelihood) over every weight that trains"
                )
            self._covered_for = names

    def _check_no_decay(self) -> None:
        r"""No weight decay in the inner optimiser: the prior is the PriorPrecision, whose MAP loss
        adds :math:`\tfrac12\theta^\top P_0\theta / N` itself. A decay on top (AdamW's default
        ``weight_decay=0.01``, ASGD's ``lambd=1e-4``) trained the weights to the MAP of another
        prior, silently: the evidence was then evaluated (and the precisions learned) away from
        the MAP of the one it assumes. Checked at construction and at every step (a param group
        added or changed later)."""
        for which, opt, climbs in (
            ("inner_optimizer", self.inner_optimizer, "climb the MAP objective (away from the MAP)"),
            (
                "outer_optimizer",
                self.outer_optimizer,
                "descend the evidence (hyper_step already maximises it: its loss is -bound / N)",
            ),
        ):
            for i, group in enumerate(opt.param_groups):
                if group.get("maximize", False):
                    # (accepted silently: the MAP steps ascended the MAP loss, or the hypersteps
                    # ascended -bound / N and drove the evidence down)
                    raise ValueError(
                        f"{which}'s param group {i} has maximize=True: its steps would {climbs}. "
                        "MarginalLikelihood minimises both of its losses; set maximize=False"
                    )
        for i, group in enumerate(self.inner_optimizer.param_groups):
            for key in ("weight_decay", "lambd"):
                v = group.get(key)
                if v is not None and bool(torch.as_tensor(v).ne(0).any()):
                    raise ValueError(
                        f"inner_optimizer's param group {i} has {key}={v!r}: MarginalLikelihood's "
                        "prior is the PriorPrecision (its MAP loss adds delta/2 |w|^2 / N itself); a "
                        "weight decay in the optimiser as well trains the weights to the MAP of "
                        "another prior, and the evidence is taken away from the MAP it assumes. "
                        f"Set {key}=0 (AdamW's default weight_decay is 0.01, ASGD's lambd 1e-4)"
                    )

    def hyper_step_due(self) -> bool:
        """Whether the schedule asks for a hyperstep now: after ``burn_in`` inner steps, every
        ``every`` inner steps (counted by :meth:`step`), and never before the first inner step
        (with ``burn_in=0`` a loop that asks before stepping took a hyperstep at the random
        initialisation, where the Laplace approximation has no MAP to sit at)."""
        k = self.inner_steps - self.burn_in
        # once per count: a step refused as non-finite does not count, so it must not bring a second
        # hyperstep at the same weights
        return k >= 0 and self.inner_steps > 0 and k % self.every == 0 and self._hyper_at != self.inner_steps

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        if train_batch is None:
            raise ValueError(
                f"MarginalLikelihood.{getattr(self, '_calling', 'hyper_step')} needs train_batch=... "
                "(a training batch; no validation batch)"
            )
        check_batch(train_batch, "train_batch", self.device, self.dtype)
        x, _ = _split_batch(train_batch)
        self._check_data_size(x, "train_batch")
        self._check_no_decay()  # (and no maximize=True in either optimiser, changed since)

    def _bound_terms(self, x: Tensor, y: Tensor, through_weights: bool) -> _Terms:
        if self.bound is Bound.EXACT and x.shape[0] != self.data_size:
            raise ValueError(
                f"bound='exact' needs the whole data set: got {x.shape[0]} of {self.data_size} examples"
            )
        return _terms(
            self.pair.model,  # the bare module (under DDP / compile wrappers): its names are the weights'
            x,
            y,
            self.prior,
            self.pair.weight_names,
            likelihood=self.likelihood,
            sigma=None if self.noise is None else self.noise(),
            subset_size=None if self.bound is Bound.EXACT else self.subset_size,
            outputs=Outputs.ALL if self.bound is Bound.EXACT else self.outputs,
            form=Bound.PARAMETRIC if self.bound is Bound.PARAMETRIC else Bound.NTK,
            augmentation=self.augmentation,
            samples=self.samples,
            kernel=self.kernel,
            through_weights=through_weights,
        )

    def _through_map(self, train_batch: Batch) -> _Hypergradient:
        r"""The total derivative of the bound at the MAP, :math:`\theta^*(\lambda)` moving with
        :math:`\lambda` (implicit function theorem on the MAP objective of the batch)."""
        x, y = _split_batch(train_batch)
        pair, n = self.pair, self.data_size
        seen: list[_Terms] = []

        def outer() -> Tensor:
            t = self._bound_terms(x, y, through_weights=True)
            seen.append(t)
            return -(n / t.batch * (t.log_lik - 0.5 * t.log_det) - 0.5 * t.quad) / n

        snapshot = pair.snapshot_buffers()
        average = self.ranks.mean_ if self.ranks.size > 1 else None  # data parallel, as Implicit
        # under DistributedDataParallel (broadcast_buffers=True) every MAP step's forward read
        # rank 0's buffers, broadcast at its start: so does the MAP objective here, as in
        # Implicit (each rank's own, a running input statistic updated by its own shard, gave
        # another rank's Hessian and mixed term: 10-20% off the derivative of the DDP run, silently)
        train_buffers = rank0_buffers(self.model, pair.buffers()) if average is not None else None

        def inner() -> Tensor:
            if train_buffers is None:
                return self._map_loss(pair.model, self.hparams, train_batch)
            return pair.loss(self._map_loss, train_batch, buffers=train_buffers)

        # a solver with warm_start=True starts from the previous accepted hyperstep's solution, as
        # in Implicit (it was never given one here: warm_start was silently ignored)
        # weights in param groups held at a learning rate of 0 while other groups train (a body
        # frozen through its group's rate) never move with the hyperparameters: constants of the
        # solve, as in Implicit. Solved over as well, the IFT took them for weights at their own
        # MAP (they are not: their gradient is not 0), CG stopped on "nonpositive_curvature" and
        # the held body's precision got a hypergradient of the wrong sign (-0.40 for +0.019)
        weights = _moving_weights(self.inner_optimizer, pair.weights)
        x0 = _warm_start_for(self._x0, weights) if self.solver.warm_start else None
        try:
            r = _implicit(inner, outer, weights, pair.hparam_tensors, self.solver, x0, average)
        finally:
            pair.restore_buffers(snapshot)
        t = seen[0]
        train_loss = (-t.log_lik / t.batch + self._map_penalty() / n).detach()
        if average is not None:
            # the concatenated batch's training loss, as the fixed-weights path and Implicit report
            # it: each rank's own shard's went into info.train_loss and the divergence guard, so
            # the ranks logged different numbers and could disagree on refusing the same hyperstep
            average([train_loss])

        def commit() -> None:
            if self.solver.warm_start:  # (a solution worse than 0 would be a worse start than none)
                keep = float(r.solve.residual) <= 1.0
                self._x0 = clone_all(r.solve.solution) if keep else None

        return _Hypergradient(
            r.hypergrad,
            r.val_loss,
            solver_iterations=r.solve.iterations,
            solver_residual=r.solve.residual,
            solver_status=r.solve.status.value,
            inner_loss=train_loss,
            reached=r.reached,
            commit=commit,
        )

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        # the bound's forward passes (the whole batch, per example, augmented copies) leave the
        # model's plain tensor attributes as the MAP steps left them (a carried hidden state, a
        # running input statistic kept as ``self.x = ...``), as Implicit's and Unrolled's
        # hypergradients do: the next step started from the bound batch's state, silently
        modules = list(dict.fromkeys([*self.pair.model.modules(), *self.hparams.modules()]))
        try:
            with _attributes_kept(modules):
                return self._hypergradient_or_raise(train_batch)
        except torch.linalg.LinAlgError:
            # a kernel no longer positive definite in floating point (an overflowing or vanishing
            # precision or noise): the bound is not finite there; the guard refuses the step
            nan = torch.full((), float("nan"), dtype=self.dtype, device=self.device)
            hp = self.pair.hparam_tensors
            return _Hypergradient(tuple(torch.full_like(h, float("nan")) for h in hp), nan, inner_loss=nan)

    def _hypergradient_or_raise(self, train_batch: Batch) -> _Hypergradient:
        if self.through_map:
            return self._through_map(train_batch)
        x, y = _split_batch(train_batch)
        pair = self.pair
        snapshot = pair.snapshot_buffers()
        try:
            t = self._bound_terms(x, y, through_weights=False)
        finally:
            pair.restore_buffers(snapshot)
        n = self.data_size
        bound = n / t.batch * (t.log_lik - 0.5 * t.log_det) - 0.5 * t.quad
        loss = -bound / n
        hp = pair.hparam_tensors
        gs = grads_or_none(loss, hp)
        inner = (-t.log_lik / t.batch + self._map_penalty() / n).detach()
        grads, value = tuple(g.contiguous() for g in materialize(gs, hp)), loss.detach()
        if self.ranks.size > 1:  # data parallel: each rank's bound is that of its shard scaled by N/B;
            # their mean is the bound of the concatenated batch partitioned along the shards
            self.ranks.mean_([*grads, value, inner])
        return _Hypergradient(grads, value, inner_loss=inner, reached=tuple(g is not None for g in gs))

    @_hyper_call  # inference mode refused before the backup (it made Adam's moments inference tensors)
    def hyper_step(self, train_batch: Batch = None, val_batch: Batch = None) -> HyperStepInfo:
        """``outer_steps`` outer steps on the bound of ``train_batch`` (``val_batch`` is ignored).

        All or nothing: if one of them is refused as non-finite (or raises), hyperparameters, their
        ``.grad`` and the outer optimiser are put back as they were. ``.grad`` is left holding the
        hypergradient at the hyperparameters the call began with (it does not depend on the outer
        optimiser's state); ``info`` is the last step's, with ``seconds`` for all of them;
        ``hyper_steps`` counts calls.
        """
        t0 = time.perf_counter()
        hp = list(self.hparams.parameters())
        if self.outer_steps == 1:
            # (the raw values only, as torch.optim would copy them: the check below may undo the step)
            kept = (
                [p.detach().clone() for p in hp],
                [p.grad for p in hp],
                _snapshot_optimizer(self.outer_optimizer),
            )
            rng, x0, start = self._rng_state(), self._x0, self.hyper_steps
            one = super().hyper_step(train_batch, val_batch)
            if not one.skipped:
                # a huge but finite hypergradient overflows a precision (exp(1e4) = inf): the raw
                # values are finite, so the step was accepted, and every later step was refused
                # (MAP loss inf) with a message that named no hyperparameter
                bad = self._values_off_domain()
                if bad:
                    with torch.no_grad():
                        for p, v, g in zip(hp, kept[0], kept[1], strict=True):
                            p.copy_(v)
                            p.grad = g
                    _restore_optimizer(self.outer_optimizer, kept[2])
                    self._set_rng_state(rng)
                    self._x0, self.hyper_steps = x0, start
                    self._nonfinite(f"hyper step {start}: the outer optimiser's step made {bad}")
                    return dataclasses.replace(
                        one, skipped=True, hyper_steps=start, seconds=time.perf_counter() - t0
                    )
                self._hyper_at = self.inner_steps
            return one
        backup = copy.deepcopy((self.hparams.state_dict(), [p.grad for p in hp]))
        outer_backup = _snapshot_optimizer(self.outer_optimizer)
        start = self.hyper_steps
        x0 = self._x0

        # the outer steps accepted before a refused one drew from torch's generator (outputs="sampled",
        # a RandomTranslation's shifts): a refusal puts it back too, as a single refused step does
        rng_before = self._rng_state()

        def restore() -> None:
            self._set_rng_state(rng_before)
            self._x0 = x0
            self.hparams.load_state_dict(backup[0])
            _restore_optimizer(self.outer_optimizer, outer_backup)
            for p, g in zip(hp, backup[1], strict=True):
                p.grad = g
            self.hyper_steps = start

        info = None
        first: list[Tensor | None] = []
        k = 0
        try:
            for k in range(self.outer_steps):
                self.hyper_steps = start  # messages name the hyperstep, not the outer step within it
                info = super().hyper_step(train_batch, val_batch)
                if info.skipped:
                    restore()
                    return dataclasses.replace(info, hyper_steps=start, seconds=time.perf_counter() - t0)
                if k == 0:
                    first = [p.grad for p in hp]
        except NonFiniteError as error:
            restore()
            raise NonFiniteError(
                f"{error} (at outer step {k + 1} of outer_steps={self.outer_steps}; the "
                f"{k} before it were undone too)"
            ) from None
        except BaseException:  # any other error: all or nothing
            restore()
            raise
        assert info is not None
        bad = self._values_off_domain()  # (the last outer step's: no later one computes a bound there)
        if bad:
            restore()
            self._nonfinite(
                f"hyper step {start}: the outer optimiser's step made {bad} (at outer step "
                f"{self.outer_steps} of outer_steps={self.outer_steps}; the {self.outer_steps - 1} "
                "before it were undone too)"
            )
            return dataclasses.replace(
                info, skipped=True, hyper_steps=start, seconds=time.perf_counter() - t0
            )
        for p, g in zip(hp, first, strict=True):  # the hypergradient where the hyperstep began
            p.grad = g
        self.hyper_steps = start + 1
        self._hyper_at = self.inner_steps
        return dataclasses.replace(info, hyper_steps=self.hyper_steps, seconds=time.perf_counter() - t0)

    def _values_off_domain(self) -> str:
        """'' when every precision and noise is finite and > 0 and every translation range finite,
        else a sentence naming the containers that are not (one host read)."""
        return _values_off_domain(
            [
                (n or "hparams", m.value, not isinstance(m, RandomTranslation))
                for n, m in self.hparams.named_modules()
                if isinstance(m, (PriorPrecision, ObservationNoise, RandomTranslation))
            ]
        )

    def start_episode(self) -> None:
        self._x0 = None

    def _method_state(self) -> dict[str, Any]:
        return {"hyper_at": self._hyper_at, "x0": self._x0}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        at = state.get("hyper_at")
        self._hyper_at = None if at is None else int(at)
        self._x0 = state.get("x0")
