r"""Hyperparameter containers of the marginal-likelihood family (re-exported by ``hypergrad.hparams``).

* :class:`PriorPrecision`: the precisions :math:`\delta` of an isotropic-per-group Gaussian prior
  :math:`p(\theta) = \mathcal N(0, P_0^{-1})`, :math:`P_0 = \operatorname{diag}(\delta)`; one global,
  one per layer or one per weight (a :class:`~hypergrad.hparams.WeightDecay` in Bayesian units:
  ``penalty(model)`` is :math:`\tfrac12\theta^\top P_0\theta`, to be divided by the data size
  :math:`N` when the likelihood term is a mean).
* :class:`ObservationNoise`: the standard deviation :math:`\sigma` of a Gaussian likelihood.
* :class:`RandomTranslation`: a differentiable data-augmentation layer whose learned range of
  translations is an invariance hyperparameter (Immer et al. 2022; 2023).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hparams import Constraint, Hparam, WeightDecay, _check_held, _real


class PriorPrecision(WeightDecay):
    r"""Prior precisions :math:`\delta > 0` of a Gaussian prior on the weights.

    :math:`\log p(\theta) = -\tfrac12\sum_k \delta_k \theta_k^2 + \tfrac12\sum_k\log\delta_k + const`,
    with one :math:`\delta` for the whole model, per layer (module owning parameters) or per weight
    entry, stored as :math:`\log\delta` (raw). The MAP objective of :class:`~hypergrad.MarginalLikelihood`
    is :math:`N\cdot\mathrm{NLL} + \tfrac12\theta^\top P_0\theta`, divided by :math:`N`: a precision
    :math:`\delta` acts like a weight decay of :math:`\delta/N`.

    Args:
        model: the model whose weights the prior covers (all that require grad, unless ``include``).
        per: ``"global"``, ``"layer"`` or ``"parameter"`` (default: ``"global"``).
        init: initial precision, > 0 (default: 1.0).
        include: which parameter names the prior covers (default: all that require grad). Every
            weight the inner optimiser trains must be covered.

    Raises:
        ValueError: ``init`` not finite and > 0, or what :class:`~hypergrad.hparams.WeightDecay`
            refuses (e.g. an unknown ``per``).

    Shapes: as :class:`~hypergrad.hparams.WeightDecay`; :meth:`precisions` gives, per parameter
    name, a scalar or a tensor shaped like the parameter, differentiable w.r.t. ``raw``.

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> prior = hg.hparams.PriorPrecision(model, per="layer", init=2.0)
    >>> prior.value.tolist(), sorted(prior.precisions())
    ([2.0, 2.0], ['0.bias', '0.weight', '2.bias', '2.weight'])
    """

    _what = "prior precision"

    def __init__(
        self,
        model: nn.Module,
        per: str = "global",
        init: float = 1.0,
        *,
        include: Callable[[str], bool] | Iterable[str] | None = None,
    ) -> None:
        init = _real(init, "prior precision init")
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"Invalid prior precision init: {init!r} (need a finite value > 0)")
        super().__init__(model, per=per, init=init, include=include)

    def precisions(self) -> dict[str, Tensor]:
        """Precision per covered parameter name (0-dim for ``global``/``layer``, else shaped like
        the parameter), differentiable w.r.t. the raw tensors."""
        return {n: self.raw[self._index[n]].exp() for n in self.names}

    def log_det(self, sizes: dict[str, int]) -> Tensor:
        r""":math:`\log\det P_0 = \sum_k \log\delta_k` over the covered weights (``sizes``: entries
        per parameter name, used for scalar precisions); 0-dim, differentiable w.r.t. the raw
        tensors. Raises ``KeyError`` for a covered name missing from ``sizes``."""
        terms = []
        for n in self.names:
            r = self.raw[self._index[n]]
            terms.append(r * sizes[n] if r.dim() == 0 else r.sum())
        return torch.stack(terms).sum()


class ObservationNoise(Hparam):
    r"""The observation-noise standard deviation :math:`\sigma > 0` of a Gaussian likelihood
    :math:`y \sim \mathcal N(f(x), \sigma^2 I)` (raw: :math:`\log\sigma`).

    Args:
        init: initial :math:`\sigma`, > 0 (default: 1.0).
        dtype: (default: torch's default dtype).

    Raises:
        ValueError: ``init`` not finite and > 0.

    >>> import hypergrad as hg
    >>> round(float(hg.hparams.ObservationNoise(init=0.5).value), 6)
    0.5
    """

    def __init__(self, init: float = 1.0, *, dtype: torch.dtype | None = None) -> None:
        init = _real(init, "observation noise init")
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"Invalid observation noise init: {init!r} (need a finite value > 0)")
        super().__init__(float(init), "positive", dtype=dtype)


class RandomTranslation(nn.Module):
    r"""Random translations with a learned range: a differentiable augmentation layer.

    Each call draws, per example and per sample, a shift :math:`t = u\odot r` with
    :math:`u\sim\mathcal U(-1, 1)^{d}` (one entry per axis) and the learned range
    :math:`r\in(0, r_{max})^{d}` (raw: :math:`\mathrm{logit}(r/r_{max})`), and moves the signal by
    :math:`t` (in pixels) with linear interpolation and zero padding (``grid_sample``), so
    :math:`\partial x_{aug}/\partial r` exists (the reparameterisation trick). A model averaged
    over such samples, :math:`\bar f(x) = \frac1S\sum_s f(T_{t_s}(x))`, is invariant to
    translations within :math:`\pm r` as :math:`S\to\infty`; the marginal likelihood chooses
    :math:`r` (Immer et al. 2022).

    Args:
        shape: the signal's shape: ``(L,)`` for 1-D signals or ``(H, W)`` for images. Inputs are
            ``(B, *shape)`` or flattened ``(B, prod(shape))``; outputs keep the input's layout.
        init: initial range per axis in pixels, in ``(0, max)`` (default: 0.5).
        max: the largest range in pixels, the same for every axis (default: a quarter of the
            shortest axis' length, ``min(shape) / 4``).

    Raises:
        ValueError: a ``shape`` not ``(L,)`` or ``(H, W)`` with each side >= 2, ``max`` not
            finite and > 0, or ``init`` outside ``(0, max)`` (or inside it but mapped onto its edge
            in torch's default dtype: ``max * (1 - 1e-9)`` in float32); at call time, inputs whose
            examples do not hold ``prod(shape)`` entries (one channel) laid out as ``shape`` or
            flattened (a channel axis of size 1 is fine), inputs that are not floating point (uint8
            images, complex signals), or ``samples`` not an int >= 1.
        TypeError: at call time, inputs that are not a tensor.

    Cost: one ``grid_sample`` over the ``B * samples`` inputs.

    >>> import torch, hypergrad as hg
    >>> aug = hg.hparams.RandomTranslation((8, 8), init=1.0)
    >>> aug(torch.randn(5, 64), samples=3).shape
    torch.Size([15, 64])
    """

    def __init__(self, shape: Sequence[int], init: float = 0.5, *, max: float | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 2) or min(shape) < 2:
            raise ValueError(f"Invalid shape: {shape!r} (need (L,) or (H, W), each >= 2)")
        self.shape = shape
        self.max = float(max) if max is not None else min(shape) / 4.0
        if not (math.isfinite(self.max) and self.max > 0):
            raise ValueError(f"Invalid max: {max!r} (need a finite value > 0)")
        init = _real(init, "translation range init")
        if not 0 < init < self.max:  # (NaN fails too)
            raise ValueError(f"Invalid translation range init: {init!r} (need 0 < init < max = {self.max})")
        frac = init / self.max
        self.raw = nn.Parameter(torch.full((len(shape),), math.log(frac) - math.log1p(-frac)))
        # (an init inside (0, max) whose raw value saturates the sigmoid in the raw's dtype, as
        # max * (1 - 1e-9) or 1e-50 in float32, gave a range of exactly max or 0 whose gradient
        # is 0: it never moved)
        wider = "torch.set_default_dtype(torch.float64) before building it"
        _check_held(self.raw.detach(), Constraint.INTERVAL, "translation range init", 0.0, self.max, wider)

    def range(self) -> Tensor:
        """The range :math:`r` per axis in pixels, differentiable: ``(len(shape),)``."""
        return self.max * torch.sigmoid(self.raw)

    @property
    def value(self) -> Tensor:
        """The range per axis in pixels, detached."""
        with torch.no_grad():
            return self.range()

    def forward(self, x: Tensor, samples: int = 1) -> Tensor:
        """``x`` ``(B, ...)`` -> ``(B * samples, ...)``, example-major (rows ``b*samples + s``):
        ``samples`` (default: 1) independent random translations of each example, differentiable
        w.r.t. ``x`` and the range."""
        try:
            ok = not isinstance(samples, bool) and operator.index(samples) >= 1
        except TypeError:
            ok = False
        if not ok:  # (0 crashed in affine_grid, a float in repeat_interleave)
            raise ValueError(f"Invalid samples: {samples!r} (need an int >= 1)")
        samples = operator.index(samples)
        if not isinstance(x, Tensor):
            raise TypeError(f"RandomTranslation needs a tensor of inputs, got {type(x).__name__}")
        if not x.is_floating_point():
            # (uint8 images failed in torch.rand: '"check_uniform_bounds" not implemented for
            # 'Byte''; complex ones in affine_grid), naming neither the layer nor the fix
            raise ValueError(
                f"RandomTranslation needs real floating-point inputs (it interpolates between "
                f"pixels), got {x.dtype}: convert them first (uint8 images: x.float() / 255)"
            )
        b = x.shape[0]
        n = math.prod(self.shape)
        tail = tuple(x.shape[1:])
        while len(tail) > 1 and tail[0] == 1:  # (a channel axis of one)
            tail = tail[1:]
        if x.dim() == 0 or tail not in (self.shape, (n,)):
            # (only the number of entries was checked: (B, 4, 16) inputs were moved as 8 x 8
            # images, and (B, 8, 8) images as 64-long signals, their rows running into each other)
            raise ValueError(
                f"RandomTranslation{self.shape} got inputs of shape {tuple(x.shape)}: it needs "
                f"(B, *{self.shape}) or (B, {n}): one channel of {n} entries per example "
                "(images with several channels are not supported; a signal of another layout "
                "would be moved along the wrong axes)"
            )
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            # in the inputs' precision: under autocast, affine_grid gave a low-precision grid whose
            # grid_sample has no CPU backward (the bound's hypergradient crashed)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x, samples)
        img = x.reshape(b, 1, *self.shape).repeat_interleave(samples, dim=0)
        m = b * samples
        u = torch.rand(m, len(self.shape), dtype=x.dtype, device=x.device) * 2 - 1
        t = u * self.range().to(x.dtype)  # pixels
        if len(self.shape) == 1:
            img = img.unsqueeze(2)  # (m, 1, 1, L)
            sizes: tuple[int, ...] = (1, self.shape[0])
            shift = torch.stack([t[:, 0], torch.zeros_like(t[:, 0])], dim=1)
        else:
            sizes = self.shape
            shift = t.flip(1)  # grid_sample's grid is (x = width, y = height)
        # normalised coordinates (align_corners=False): one pixel is 2 / size
        scale = torch.tensor([2.0 / sizes[1], 2.0 / sizes[0]], dtype=x.dtype)
        theta = torch.zeros(m, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = 1
        theta[:, 1, 1] = 1
        theta = theta + F.pad((-shift * scale.to(x.device)).unsqueeze(2), (2, 0))
        # (a half-precision theta for a 1-D signal, sizes (1, L), failed on the CPU inside
        # affine_grid: '"tensor_cpu" not implemented for 'BFloat16'': the grid in float32 there)
        low = theta.dtype in (torch.float16, torch.bfloat16)
        grid = F.affine_grid(theta.float() if low else theta, [m, 1, *sizes], align_corners=False)
        grid = grid.to(x.dtype)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(m, *x.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, max={self.max}"
