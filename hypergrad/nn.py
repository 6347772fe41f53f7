r"""Layers and per-example augmentations for self-tuning networks (``hg.nn``).

STN layers (MacKay et al. 2019) approximate the best response :math:`w^*(\lambda)` inside the
network: every output unit is an ordinary unit plus a hyperparameter-modulated one,

.. math::
    y = W_e x + b_e + (V \tilde\lambda) \odot (W_h x + b_h),

with :math:`V \in \mathbb{R}^{\text{out} \times H}` (initialised :math:`N(0, 0.01^2)`) and
:math:`\tilde\lambda` the example's unconstrained hyperparameters (a row of
:attr:`hypergrad.hparams.Draw.features`). At a fixed :math:`\lambda` the layer *is* an ordinary
layer with :math:`W = W_e + \mathrm{diag}(V\lambda) W_h`, :math:`b = b_e + (V\lambda) \odot b_h`
(:meth:`StnLinear.fixed`). Cost: one matmul of twice the width (both halves at once), so about 2x
the FLOPs and 2x the weights of the ordinary layer, plus :math:`\text{out} \cdot H`. With
``rank=r`` (:class:`StnLinear`, :class:`StnConv1d`, :class:`StnConv2d`) the hyper half is
low-rank, :math:`W_h = U P`, :math:`U \in \mathbb{R}^{\text{out} \times r}`: about
:math:`1 + r(\text{in} + \text{out}) / (\text{in} \cdot \text{out})` times the ordinary layer
(1.13x for a 256-256 layer at :math:`r = 16`) — not the paper's form, but the same family (a
linear map of :math:`\lambda` to the weights), for when the 2x matters.

Every layer's ``forward(x, hparams)`` takes the hyperparameters as a
:class:`~hypergrad.hparams.SelfTuned` (it draws for the batch itself), a
:class:`~hypergrad.hparams.Draw`, or a tensor :math:`(B, H)` / :math:`(H,)`.

The augmentation helpers apply a *per-example* strength and are identity when ``training`` is
False (the validation step of :class:`~hypergrad.SelfTuning` runs in eval mode).
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ._functional import _held_slots, _uncached, registrations, substituting, tensor_slots
from ._stn_hparams import (
    Draw,
    SelfTuned,
    check_features,
    fixed_features,
    linear_perturbation,
    refuse_in_validation,
)

__all__ = [
    "StnLayer",
    "StnLinear",
    "StnConv1d",
    "StnConv2d",
    "StnLSTMCell",
    "HyperNet",
    "dropout",
    "gaussian_noise",
    "cutout",
    "random_shift",
    "stn_layers",
    "response_masks",
]

Hyper = SelfTuned | Draw | Tensor


class StnLayer(nn.Module):
    r"""Base of the STN layers: holds the response map :math:`V` (``hnet``,
    :math:`(\text{out}, H)`, initialised :math:`N(0, 0.01^2)`) and ``n_hparams`` :math:`H`.

    :func:`stn_layers` and :class:`~hypergrad.SelfTuning` find a model's STN layers by this type.
    """

    n_hparams: int
    out_units: int

    def _init_response(self, out_units: int, n_hparams: int, factory: dict[str, Any]) -> None:
        count = _count(n_hparams)  # (a NumPy integer too, as HyperNet takes)
        if count is None:
            raise ValueError(f"{type(self).__name__}: n_hparams must be an int >= 1, got {n_hparams!r}")
        self.n_hparams = n_hparams = count
        self.out_units = out_units
        self.hnet = nn.Parameter(torch.empty(out_units, n_hparams, **factory))
        nn.init.normal_(self.hnet, std=0.01)

    def response_masks(self) -> dict[str, Tensor | bool]:
        r"""Which entries of this layer's own parameters (by name, not recursing) belong to the
        best response :math:`\Phi` (``True``, or a boolean mask broadcastable to the parameter)
        rather than to the base weights :math:`w_0`; parameters absent are base weights. Used by
        Delta-STN, which trains the two on different objectives."""
        return {"hnet": True}

    def modulation(self, hparams: Hyper, batch: int) -> Tensor:
        r""":math:`V\tilde\lambda_i` for each example, shape :math:`(B, \text{out})`.

        Args:
            hparams: a :class:`~hypergrad.hparams.SelfTuned` (drawn for ``batch`` examples), a
                :class:`~hypergrad.hparams.Draw`, or features :math:`(B, H)` / :math:`(H,)`
                (broadcast to every example).
            batch: :math:`B`.

        Raises:
            ValueError: features that are not :math:`(B, H)` or :math:`(H,)` for this layer's
                :math:`H`.
            TypeError: ``hparams`` of another type.
        """
        feats = check_features(hparams, self.n_hparams, batch, type(self).__name__)
        return feats.to(self.hnet.dtype) @ _rows_major(self.hnet)

    def _vanishes(self, hparams: Hyper, batch: int) -> bool:
        """Whether the response term is exactly 0 for this call (a :class:`Draw` flagged
        ``zero``: Delta-STN's base step), so that only the ordinary half need be computed. The
        features are still validated."""
        if isinstance(hparams, SelfTuned):
            hparams = hparams.draw(batch)
        if not (isinstance(hparams, Draw) and hparams.zero):
            return False
        check_features(hparams, self.n_hparams, batch, type(self).__name__)
        return True


def _need_hparams(hparams: Hyper | None, layer: nn.Module) -> Hyper:
    """``hparams``, or a TypeError saying how an STN layer is called."""
    if hparams is None:
        raise TypeError(
            f"{type(layer).__name__} needs the hyperparameters: call it as layer(x, hparams) (a "
            "SelfTuned, its draw, or features). nn.Sequential calls its layers with one input, so "
            "an STN layer cannot sit in one directly: call it from your model's forward"
        )
    return hparams


def _rows_major(v: Tensor) -> Tensor:
    r"""``v.t()`` copied to row-major memory, for ``feats @ v.t()``: the matmul's backward then
    forms ``v``'s gradient as the wide ``feats.t() @ grad`` (:math:`H \times B` by
    :math:`B \times \text{out}`) instead of the skinny ``grad.t() @ feats`` that the transposed
    view's strides select, which took 5x longer on CPU (40 vs 8 us for 256 units, B = 128,
    H = 2); the copy is :math:`H \cdot \text{out}` numbers."""
    return v.t().contiguous()


def stn_layers(model: nn.Module) -> list[tuple[str, StnLayer]]:
    """The STN layers of ``model`` with their names, in ``named_modules()`` order (a layer reached
    under two names is listed once).

    >>> import torch, hypergrad as hg
    >>> net = torch.nn.ModuleDict({"a": hg.nn.StnLinear(2, 2, n_hparams=1), "b": torch.nn.ReLU()})
    >>> [n for n, _ in hg.nn.stn_layers(net)]
    ['a']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StnLayer)]


def _rows(n: int, first: int, ndim: int, device: torch.device) -> Tensor:
    """A boolean mask ``(n, 1, ...)``: rows from ``first`` on."""
    mask = torch.arange(n, device=device) >= first
    return mask.reshape((n,) + (1,) * (ndim - 1))


def response_masks(model: nn.Module) -> dict[int, Tensor | bool]:
    """By ``id`` of each parameter of ``model``'s STN layers that holds best-response entries:
    ``True`` (all of it) or a boolean mask (see :meth:`StnLayer.response_masks`).

    >>> import hypergrad as hg
    >>> layer = hg.nn.StnLinear(2, 3, n_hparams=1)
    >>> masks = hg.nn.response_masks(layer)
    >>> masks[id(layer.hnet)], masks[id(layer.weight)][:, 0].tolist()   # rows [3:] are W_h
    (True, [False, False, False, True, True, True])
    """
    out: dict[int, Tensor | bool] = {}
    for _, layer in stn_layers(model):
        own = dict(layer.named_parameters(recurse=True))
        for name, mask in layer.response_masks().items():
            p = own.get(name)
            if p is not None:
                out[id(p)] = mask
    return out


class StnLinear(StnLayer):
    r"""A linear layer whose units respond to the hyperparameters (see the module docstring).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        n_hparams: :math:`H`, ``hparams.size``.
        rank: if given, a low-rank hyper half :math:`W_h = U P` with :math:`P \in
            \mathbb{R}^{r \times \text{in}}`, :math:`U \in \mathbb{R}^{\text{out} \times r}`
            (and :math:`b_h = U b_P`): the response costs :math:`r(\text{in} + \text{out})`
            instead of :math:`\text{in} \cdot \text{out}` FLOPs and weights per example
            (default: None, the paper's full :math:`W_h`).
        device, dtype: of the parameters (as ``nn.Linear``).

    Raises:
        ValueError: ``n_hparams`` or ``rank`` not an int >= 1.

    Shapes: ``x`` :math:`(B, \text{in})`, hyperparameters :math:`(B, H)`; output
    :math:`(B, \text{out})`. Parameters: ``weight`` :math:`(\text{out} + k, \text{in})` (rows
    ``[:out]`` are :math:`W_e`, ``[out:]`` :math:`W_h`, or :math:`P` when ``rank`` is given;
    :math:`k` = out or ``rank``), ``bias`` :math:`(\text{out} + k)`, ``hnet``
    :math:`(\text{out}, H)`, and with ``rank``, ``hyper_out`` :math:`U`.

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
    >>> layer = hg.nn.StnLinear(4, 3, n_hparams=hp.size)
    >>> x = torch.randn(5, 4)
    >>> layer(x, hp).shape
    torch.Size([5, 3])
    >>> plain = layer.fixed(hp.raw)                  # the ordinary nn.Linear at this lambda
    >>> torch.allclose(plain(x), layer(x, hp), atol=1e-6)
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_hparams: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank = _rank(rank, "StnLinear")
        both = nn.Linear(
            in_features, out_features + (out_features if rank is None else rank), bias=bias, **factory
        )
        self.weight = both.weight
        self.bias = both.bias
        self.hyper_out: nn.Parameter | None = None
        if rank is not None:  # W_h = U P: P is weight[out:], U is hyper_out (out x rank)
            self.hyper_out = nn.Parameter(torch.empty(out_features, rank, **factory))
            nn.init.kaiming_uniform_(self.hyper_out, a=math.sqrt(5))
        self._init_response(out_features, n_hparams, factory)

    def forward(self, x: Tensor, hparams: Hyper | None = None) -> Tensor:
        r"""``x`` :math:`(B, \text{in})` -> :math:`(B, \text{out})`; ``hparams`` as
        :meth:`~StnLayer.modulation` takes them.

        Raises:
            ValueError: ``x`` not a 2-D tensor, or hyperparameter features that do not fit this layer.
            TypeError: called without ``hparams`` (from an ``nn.Sequential``, say).
        """
        hparams = _need_hparams(hparams, self)
        if not isinstance(x, Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"StnLinear expects x of shape (B, {self.in_features}), got {got}")
        delta = linear_perturbation(hparams, x.shape[0], self.n_hparams, type(self).__name__)
        if delta is None and self._vanishes(hparams, x.shape[0]):
            o = self.out_features
            return F.linear(x, self.weight[:o], None if self.bias is None else self.bias[:o])
        x, x_tangent = fwAD.unpack_dual(x) if delta is not None else (x, None)
        both = F.linear(x, self.weight, self.bias)
        elem, hyper = both.split([self.out_features, both.shape[-1] - self.out_features], dim=-1)
        if self.hyper_out is not None:
            hyper = F.linear(hyper, self.hyper_out)
        if delta is None:
            return elem + self.modulation(hparams, x.shape[0]) * hyper
        # Delta-STN's linearisation at Delta = 0: primal W_e x + b_e; tangent (V Delta) * hyper
        # + W_e x' (the hyper half's own tangent is multiplied by V 0 = 0, so it is skipped)
        tangent = (delta.to(self.hnet.dtype) @ _rows_major(self.hnet)) * hyper
        if x_tangent is not None:
            tangent = tangent + F.linear(x_tangent, self.weight[: self.out_features])
        return fwAD.make_dual(elem, tangent)

    def response_masks(self) -> dict[str, Tensor | bool]:
        o, dev = self.out_features, self.weight.device
        masks: dict[str, Tensor | bool] = {"hnet": True, "weight": _rows(self.weight.shape[0], o, 2, dev)}
        if self.bias is not None:
            masks["bias"] = _rows(self.bias.shape[0], o, 1, dev)
        if self.hyper_out is not None:
            masks["hyper_out"] = True
        return masks

    def fixed(self, features: Hyper) -> nn.Linear:
        r"""The ordinary ``nn.Linear`` this layer equals at unconstrained hyperparameters
        ``features`` :math:`(H,)` (a copy, detached, on the layer's device and dtype).

        ``features`` is what the layer is fed: ``hparams.raw`` at the current :math:`\lambda`,
        but ``torch.zeros(H)`` for a model of ``SelfTuning(..., delta=True)``, whose layers are fed
        the centred :math:`\tilde\lambda - \lambda`. Passing the
        :class:`~hypergrad.hparams.SelfTuned` container itself gives the right one in either case
        (a shared :class:`~hypergrad.hparams.Draw`, or a :math:`(1, H)` row, also works). Draws no
        random numbers (calling it mid-run leaves the run's dropout masks as they would have been).

        Raises:
            ValueError: features not of one :math:`\lambda` (:math:`(H,)` or :math:`(1, H)`), or a
                per-example draw.
            TypeError: ``features`` of another type.
        """
        features = fixed_features(features, self.n_hparams, type(self).__name__)
        with torch.no_grad():
            s = self.hnet @ features.to(self.hnet.dtype)
            o = self.out_features
            w_h, b_h = self.weight[o:], None if self.bias is None else self.bias[o:]
            if self.hyper_out is not None:
                w_h = self.hyper_out @ w_h
                b_h = None if b_h is None else self.hyper_out @ b_h
            # built on the meta device, then given memory: no initialisation, so torch's random
            # stream is left alone (exporting a layer mid-run must not change the run's dropout)
            out = nn.Linear(
                self.in_features, o, bias=self.bias is not None, device="meta", dtype=self.weight.dtype
            ).to_empty(device=self.weight.device)
            out.weight.copy_(self.weight[:o] + s[:, None] * w_h)
            if self.bias is not None and b_h is not None:
                out.bias.copy_(self.bias[:o] + s * b_h)
        return out

    def extra_repr(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"{self.in_features}, {self.out_features}, n_hparams={self.n_hparams}{rank}"


class _StnConvNd(StnLayer):
    _dims = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        n_hparams: int,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        conv_cls: Any = nn.Conv2d if self._dims == 2 else nn.Conv1d
        g = _count(groups)  # (a NumPy integer too, as nn.Conv2d takes)
        if g is None:
            raise ValueError(f"{type(self).__name__}: groups must be an int >= 1, got {groups!r}")
        groups = g
        if groups != 1 and (in_channels % groups or out_channels % groups):
            raise ValueError(
                f"{type(self).__name__}: in_channels ({in_channels}) and out_channels "
                f"({out_channels}) must both be divisible by groups ({groups})"
            )
        if groups != 1 and rank is not None:
            raise ValueError(
                f"{type(self).__name__}: rank={rank} with groups={groups} is not supported (a "
                "low-rank hyper half mixes the groups' channels): give one of them"
            )
        self.rank = rank = _rank(rank, type(self).__name__)
        conv = conv_cls(
            in_channels,
            out_channels + (out_channels if rank is None else rank),
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,  # nn.Conv validates it ("zeros", "reflect", "replicate", "circular")
            **factory,
        )
        self.conv = conv
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hyper_out: nn.Parameter | None = None
        if rank is not None:  # W_h = U P: P is conv.weight[out:], U is hyper_out (out x rank)
            self.hyper_out = nn.Parameter(torch.empty(out_channels, rank, **factory))
            nn.init.kaiming_uniform_(self.hyper_out, a=math.sqrt(5))
        self._init_response(out_channels, n_hparams, factory)

    def _expand(self, hyper: Tensor) -> Tensor:
        """The low-rank hyper half's :math:`r` channels mapped to the :math:`C_{out}` ones by
        :math:`U` (a 1x1 convolution); the full hyper half as it is."""
        if self.hyper_out is None:
            return hyper
        u = self.hyper_out.reshape(self.hyper_out.shape + (1,) * self._dims)
        return (F.conv2d if self._dims == 2 else F.conv1d)(hyper, u)

    def forward(self, x: Tensor, hparams: Hyper | None = None) -> Tensor:
        r"""``x`` :math:`(B, C_{in}, \dots)` -> :math:`(B, C_{out}, \dots')` as the ordinary
        convolution; ``hparams`` as :meth:`~StnLayer.modulation` takes them.

        Raises:
            ValueError: ``x`` not a tensor with ``2 + dims`` dimensions, or hyperparameter features that do
                not fit this layer.
            TypeError: called without ``hparams`` (from an ``nn.Sequential``, say).
        """
        hparams = _need_hparams(hparams, self)
        if not isinstance(x, Tensor) or x.dim() != self._dims + 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects x with {self._dims + 2} dims (B, C, ...), got {got}"
            )
        c = self.conv
        if c.groups != 1 and (c._forward_pre_hooks or c._forward_hooks):
            # (the grouped halves read conv.weight directly, bypassing conv's call: a hook-based
            # weight_norm's weight stayed the one computed when it was applied, the output 1.7
            # off after g moved, and the next backward failed "modified by an inplace operation")
            name = type(self).__name__
            raise ValueError(
                f"{name}(groups={c.groups}) computes its two halves as grouped convolutions with "
                f"conv.weight directly, so the hooks registered on its .conv (the hook-based "
                f"torch.nn.utils.weight_norm / spectral_norm, torch.nn.utils.prune, forward "
                f"hooks) would not run and a stale weight would be used: reparametrize with "
                f"torch.nn.utils.parametrize (torch.nn.utils.parametrizations.weight_norm), or "
                f"use groups=1"
            )
        delta = linear_perturbation(hparams, x.shape[0], self.n_hparams, type(self).__name__)
        if delta is None and self._vanishes(hparams, x.shape[0]):
            c, o = self.conv, self.out_channels
            return c._conv_forward(x, c.weight[:o], None if c.bias is None else c.bias[:o])  # type: ignore[operator]
        x, x_tangent = fwAD.unpack_dual(x) if delta is not None else (x, None)
        c, o = self.conv, self.out_channels
        if c.groups == 1:  # both halves in one convolution
            both = c(x)
            elem, hyper = both.split([o, both.shape[1] - o], dim=1)
        else:  # (one grouped convolution over both halves would give each half only some groups)
            b = c.bias
            elem = c._conv_forward(x, c.weight[:o], None if b is None else b[:o])  # type: ignore[operator]
            hyper = c._conv_forward(x, c.weight[o:], None if b is None else b[o:])  # type: ignore[operator]
        hyper = self._expand(hyper)
        s = (
            self.modulation(hparams, x.shape[0])
            if delta is None
            else delta.to(self.hnet.dtype) @ _rows_major(self.hnet)
        )
        s = s.reshape(s.shape + (1,) * self._dims)
        if delta is None:
            return elem + s * hyper
        tangent = s * hyper  # Delta-STN's linearisation, as in StnLinear
        if x_tangent is not None:
            c = self.conv
            w = c.weight[: self.out_channels]
            tangent = tangent + c._conv_forward(x_tangent, w, None)  # type: ignore[operator]
        return fwAD.make_dual(elem, tangent)

    def response_masks(self) -> dict[str, Tensor | bool]:
        c, o = self.conv, self.out_channels
        n = c.weight.shape[0]
        masks: dict[str, Tensor | bool] = {
            "hnet": True,
            "conv.weight": _rows(n, o, c.weight.dim(), c.weight.device),
        }
        if c.bias is not None:
            masks["conv.bias"] = _rows(n, o, 1, c.bias.device)
        if self.hyper_out is not None:
            masks["hyper_out"] = True
        return masks

    def fixed(self, features: Hyper) -> nn.Module:
        """The ordinary convolution this layer equals at unconstrained hyperparameters
        ``features`` :math:`(H,)` (a copy, detached; with Delta-STN pass zeros, or the
        ``SelfTuned`` container in either case, see :meth:`StnLinear.fixed`, which raises the
        same errors; draws no random numbers)."""
        features = fixed_features(features, self.n_hparams, type(self).__name__)
        c = self.conv
        conv_cls: Any = nn.Conv2d if self._dims == 2 else nn.Conv1d
        o = self.out_channels
        out = conv_cls(
            self.in_channels,
            o,
            c.kernel_size,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            c.bias is not None,  # type: ignore[arg-type]
            c.padding_mode,
            device="meta",  # no initialisation: torch's random stream is left alone
            dtype=c.weight.dtype,
        ).to_empty(device=c.weight.device)
        with torch.no_grad():
            s = self.hnet @ features.to(self.hnet.dtype)
            shape = (o,) + (1,) * (c.weight.dim() - 1)
            w_h, b_h = c.weight[o:], None if c.bias is None else c.bias[o:]
            if self.hyper_out is not None:
                w_h = (self.hyper_out @ w_h.flatten(1)).reshape((o,) + w_h.shape[1:])
                b_h = None if b_h is None else self.hyper_out @ b_h
            out.weight.copy_(c.weight[:o] + s.reshape(shape) * w_h)
            if c.bias is not None and b_h is not None:
                out.bias.copy_(c.bias[:o] + s * b_h)  # type: ignore[union-attr]
        return out

    def extra_repr(self) -> str:
        c = self.conv
        rank = "" if self.rank is None else f", rank={self.rank}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={c.kernel_size}, "
            f"n_hparams={self.n_hparams}{rank}"
        )


class StnConv2d(_StnConvNd):
    r"""A 2-D convolution whose output channels respond to the hyperparameters.

    Arguments as ``nn.Conv2d`` (``stride``, ``padding`` including ``"same"``/``"valid"``,
    ``dilation``, ``groups``, ``bias``, ``padding_mode``) plus ``n_hparams`` (after
    ``kernel_size``). With ``groups > 1`` each half is its own grouped convolution (two calls
    instead of one; ``rank`` is then refused).
    Shapes: ``x`` :math:`(B, C_{in}, H, W)`, hyperparameters :math:`(B, H_\lambda)`; output
    :math:`(B, C_{out}, H', W')`. The modulation :math:`V\tilde\lambda_i` scales each output
    channel of the hyper half. Parameters: ``conv``, an ``nn.Conv2d`` with :math:`C_{out} + k`
    output channels (``[:out]`` the ordinary half, ``[out:]`` the hyper half, :math:`k = C_{out}`),
    and ``hnet`` :math:`(C_{out}, H_\lambda)`.

    ``rank=r`` (keyword) makes the hyper half low-rank, :math:`W_h = U P`: ``conv`` computes
    :math:`r` hyper channels (:math:`P`, :math:`k = r`) and ``hyper_out`` :math:`U \in
    \mathbb{R}^{C_{out} \times r}` maps them to :math:`C_{out}` (a 1x1 convolution). Cost:
    :math:`(C_{out} + r) C_{in} k_h k_w` multiply-adds per output position plus :math:`r C_{out}`,
    against :math:`2 C_{out} C_{in} k_h k_w` for the paper's full hyper half (default: None).

    Raises:
        ValueError: ``groups``, ``n_hparams`` or ``rank`` not an int >= 1, channels not
            divisible by ``groups``, ``rank`` with ``groups > 1``, or what ``nn.Conv2d`` refuses.

    >>> import torch, hypergrad as hg
    >>> layer = hg.nn.StnConv2d(3, 8, 3, n_hparams=2, padding=1)
    >>> layer(torch.randn(4, 3, 6, 6), torch.zeros(4, 2)).shape
    torch.Size([4, 8, 6, 6])
    >>> hg.nn.StnConv2d(3, 8, 3, n_hparams=2, padding=1, rank=2).conv.weight.shape  # 8 + 2 channels
    torch.Size([10, 3, 3, 3])
    """

    _dims = 2


class StnConv1d(_StnConvNd):
    r"""A 1-D convolution whose output channels respond to the hyperparameters (as
    :class:`StnConv2d`, for :math:`(B, C, L)` inputs; ``rank`` likewise).

    >>> import torch, hypergrad as hg
    >>> hg.nn.StnConv1d(1, 4, 5, n_hparams=2, padding=2)(torch.randn(3, 1, 40), torch.zeros(3, 2)).shape
    torch.Size([3, 4, 40])
    """

    _dims = 1


class StnLSTMCell(StnLayer):
    r"""The LSTM recipe: an ``nn.LSTMCell`` whose four gates come from one :class:`StnLinear`
    over :math:`[x_t, h_{t-1}]`, so every gate unit responds to the hyperparameters.

    .. math::
        (i, f, g, o) = \mathrm{StnLinear}([x_t, h_{t-1}], \tilde\lambda), \quad
        c_t = \sigma(f) c_{t-1} + \sigma(i) \tanh(g), \quad h_t = \sigma(o) \tanh(c_t).

    Unroll it over time yourself, drawing the hyperparameters once per sequence batch and
    applying per-example dropout to inputs / hidden states with :func:`dropout`
    (variational dropout: draw one mask per sequence and reuse it).

    Args:
        input_size, hidden_size, bias: as ``nn.LSTMCell``.
        n_hparams: :math:`H`.
        device, dtype: of the parameters.
        rank: the gates' low-rank hyper half (see :class:`StnLinear`; default: None, full).

    Parameters: ``gates``, a :class:`StnLinear` ``(input + hidden, 4 * hidden)``. Cost per time
    step: that layer's (about 2x an ``nn.LSTMCell``'s matmul FLOPs; with ``rank=r``, about
    :math:`1 + r / (4\,\text{hidden}) + r / (\text{input} + \text{hidden})` times).

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9))
    >>> cell = hg.nn.StnLSTMCell(3, 5, n_hparams=hp.size)
    >>> x = torch.randn(7, 2, 3)                      # (T, B, input)
    >>> h = c = torch.zeros(2, 5)
    >>> d = hp.draw(2)
    >>> for t in range(7):
    ...     h, c = cell(hg.nn.dropout(x[t], d["p"], training=False), (h, c), d)
    >>> h.shape
    torch.Size([2, 5])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        n_hparams: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.gates = StnLinear(
            input_size + hidden_size, 4 * hidden_size, n_hparams, bias, device, dtype, rank=rank
        )
        self.n_hparams = self.gates.n_hparams  # (validated there, as an int)
        self.out_units = 4 * hidden_size

    def response_masks(self) -> dict[str, Tensor | bool]:
        return {}  # its gates, a StnLinear, hold them

    def modulation(self, hparams: Hyper, batch: int) -> Tensor:
        r"""The gates' :math:`V\tilde\lambda_i`, :math:`(B, 4\,\text{hidden})`."""
        return self.gates.modulation(hparams, batch)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None, hparams: Hyper | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""One time step: ``x`` :math:`(B, \text{in})`, ``state`` ``(h, c)`` each
        :math:`(B, \text{hidden})`, or ``None`` for zeros (as ``nn.LSTMCell``); returns the new
        ``(h, c)``, each :math:`(B, \text{hidden})`.

        Raises:
            ValueError: ``x`` not :math:`(B, \text{in})` (a whole sequence: unroll it, feeding
                ``x[t]``, or ``x[:, t]`` when batch first), or ``state`` not a pair of
                :math:`(B, \text{hidden})` tensors.
            TypeError: called without ``hparams``.
        """
        name = type(self).__name__
        # (it said "call it as layer(x, hparams)", the one-input layers' message: what cell(x, hp)
        # had done, the hyperparameters going in as the state)
        if hparams is None:
            given = (
                f"; got {type(state).__name__} as the state: for the first step, cell(x, None, hparams)"
                if isinstance(state, (SelfTuned, Draw, Tensor))
                else ""
            )
            raise TypeError(
                f"{name} needs the hyperparameters: call it as cell(x, state, hparams) (a SelfTuned, "
                f"its draw, or features), state a pair (h, c), or None for zeros{given}"
            )
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.input_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} expects x of shape (B, {self.input_size}), one time step, got {shape}; "
                f"unroll a sequence over time (x[t], or x[:, t] when batch first)"
            )
        want = (x.shape[0], self.hidden_size)
        if state is None:
            h = c = x.new_zeros(want)
        else:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ValueError(f"{name}: state must be None or a pair (h, c), each {want}")
            h, c = state
            for what, t in (("h", h), ("c", c)):
                if not isinstance(t, Tensor) or tuple(t.shape) != want:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name}: state {what} must have shape {want}, got {shape}")
        gates = self.gates(torch.cat([x, h], dim=-1), hparams)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


# ----------------------------------------------------------------------------- per-example helpers


def _per_example(v: Tensor | float, x: Tensor, what: str) -> Tensor:
    """``v`` as a :math:`(B,)` tensor on ``x``'s device (not yet of ``x``'s dtype)."""
    if x.dim() < 1:
        raise ValueError(f"{what}: x must be batched, (B, ...); got a 0-dim tensor")
    if isinstance(v, (Draw, SelfTuned)):  # (torch's "could not determine the shape of object type 'Draw'")
        raise TypeError(
            f"{what}: got the whole {type(v).__name__}; pass one hyperparameter's values, "
            f"e.g. d['dropout'] for d = hparams.draw(len(x))"
        )
    if isinstance(v, float):  # (float64, as Python holds it: 1 - 1e-9 is a rate below 1)
        t = torch.tensor(v, dtype=torch.float64, device=x.device)
    else:
        try:
            t = torch.as_tensor(v, device=x.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{what}: need a number or one per example, shape ({x.shape[0]},); got "
                f"{type(v).__name__} ({e})"
            ) from None
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what}: need numbers, got a {t.dtype} value")
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: need one value per example, shape ({x.shape[0]},); got {tuple(t.shape)}")
    return t


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def _work_dtype(x: Tensor) -> torch.dtype:
    """The dtype random draws and probabilities are computed in: float64 for float64 ``x``,
    else float32 (float16 / bfloat16 uniforms are too coarse: in bfloat16 a keep probability of
    0.1 came out 0.104, biasing the expectation by 2%)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(out: Tensor, x: Tensor) -> Tensor:
    """``out`` in ``x``'s memory format (channels_last inputs stay channels_last)."""
    if x.is_contiguous() or not out.is_contiguous():
        return out
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == rank and x.is_contiguous(memory_format=fmt):
            return out.contiguous(memory_format=fmt)
    return out


def _whole(v: Tensor, what: str, cap: int) -> Tensor:
    """Non-negative whole-valued ``v`` as int64, capped at ``cap`` (any value above it acts alike)."""
    if v.is_floating_point():
        if not bool(((v == v.floor()) & torch.isfinite(v)).all()):
            raise ValueError(f"{what} must be integers (finite; floor them, or use hg.hparams.Integer)")
        if not bool((v >= 0).all()):
            raise ValueError(f"{what} must be >= 0, got min {float(v.min())}")
        return v.clamp(max=cap).long()
    if not bool((v >= 0).all()):
        raise ValueError(f"{what} must be >= 0, got min {int(v.min())}")
    return v.long().clamp(max=cap)


def dropout(x: Tensor, rate: Tensor | float, training: bool = True) -> Tensor:
    r"""Inverted dropout with a rate per example: entry :math:`x_{i\cdot}` is zeroed with
    probability :math:`p_i` and the survivors are scaled by :math:`1/(1 - p_i)`.

    Args:
        x: :math:`(B, \dots)`, floating point.
        rate: :math:`(B,)` (or a scalar), each in :math:`[0, 1)`; used detached (no gradient
            reaches it: :class:`~hypergrad.SelfTuning` never differentiates the training loss
            w.r.t. :math:`\lambda`).
        training: identity when False, returning ``x`` itself, not a copy (default: True).

    Returns:
        A tensor shaped like ``x``, of its dtype and memory format. The mask is drawn, and the
        rates checked, in float32 (float64 for float64 ``x``): uniforms in float16 / bfloat16
        would bias the keep probability (by 3.6% at a rate of 0.9 in bfloat16), and a rate such as
        0.9999 would round to 1. In half precision :math:`1/(1 - p_i)` is rounded once to ``x``'s
        dtype (and overflows float16 for :math:`p_i > 1 - 1/65504`).

    Raises:
        ValueError: a rate outside :math:`[0, 1)` or of the wrong shape.
        TypeError: ``x`` not floating point, boolean / complex rates, or a rate that is no
            number or tensor (the whole :class:`~hypergrad.hparams.Draw`, say: pass
            ``d["dropout"]``).

    Cost: a random mask the size of ``x``, and one host synchronisation (the range check).

    >>> import torch, hypergrad as hg
    >>> y = hg.nn.dropout(torch.ones(2, 10000), torch.tensor([0.0, 0.5]))
    >>> bool((y[0] == 1).all()), round(float(y[1].mean()), 1)
    (True, 1.0)
    """
    if not training:
        return x
    refuse_in_validation("dropout")
    if not x.is_floating_point():
        raise TypeError(f"dropout: x must be a floating-point tensor, got {x.dtype}")
    p = _per_example(rate, x, "dropout rate").detach()
    if not p.is_floating_point():
        p = p.double()
    if not bool(((p >= 0) & (p < 1)).all()):  # (checked as given, before any rounding to x's dtype)
        raise ValueError(f"dropout: rates must lie in [0, 1); got range [{float(p.min())}, {float(p.max())}]")
    work = _work_dtype(x)
    keep = (1 - p.double()).to(work)
    # torch's uniforms in ``work`` are multiples of 2^-24 (float32; 2^-53 in float64), so
    # ``u < keep`` holds with probability n / 2^24, n = ceil(keep 2^24), not keep: a small keep
    # is scaled by the inverse of that (the mask is the same). A keep probability below 2^-24 (a
    # float64 rate of 1 - 1e-12 on float32 x) was kept with 2^-24 and scaled by 1e12: the mean
    # came out 6e4 times too large, silently. (Where n >= 2^16 the difference is below 2^-16,
    # and the scale is left as it was, bit for bit.)
    lattice = 2.0 / torch.finfo(work).eps  # 2^24, 2^53
    n = torch.ceil(keep * lattice)
    keep = _bcast(torch.where(n < 2**16, n / lattice, keep), x)
    mask = torch.rand_like(x, dtype=work) < keep
    if x.dtype == work:
        return x * mask / keep
    return x * (mask / keep).to(x.dtype)  # float16 / bfloat16: 1/keep rounded once


def gaussian_noise(x: Tensor, std: Tensor | float, training: bool = True) -> Tensor:
    r"""Add :math:`N(0, s_i^2)` noise to example :math:`i` (``std`` :math:`(B,)` or a scalar,
    :math:`\ge 0`, used detached); identity when ``training`` is False, returning ``x`` itself
    (default: True). Returns a tensor shaped like ``x`` :math:`(B, \dots)`.

    Raises:
        ValueError: a negative or non-finite ``std`` (also one that overflows ``x``'s dtype,
            e.g. above 65504 in float16), or one of the wrong shape.
        TypeError: ``x`` not floating point, or a ``std`` that is no number or tensor (the
            whole :class:`~hypergrad.hparams.Draw`, say).

    Cost: one host synchronisation (the check of ``std``).

    >>> import torch, hypergrad as hg
    >>> y = hg.nn.gaussian_noise(torch.zeros(2, 10000), torch.tensor([0.0, 2.0]))
    >>> float(y[0].abs().max()), round(float(y[1].std()), 1)
    (0.0, 2.0)
    """
    if not training:
        return x
    refuse_in_validation("gaussian_noise")
    if not x.is_floating_point():
        raise TypeError(f"gaussian_noise: x must be a floating-point tensor, got {x.dtype}")
    given = _per_example(std, x, "gaussian_noise std").detach()
    s = given.to(x.dtype)
    if not bool(((given >= 0) & torch.isfinite(given) & torch.isfinite(s)).all()):
        if bool(((given >= 0) & torch.isfinite(given)).all()):
            raise ValueError(f"gaussian_noise: std {float(given.max())} overflows x's dtype, {x.dtype}")
        low, high = float(given.min()), float(given.max())
        raise ValueError(f"gaussian_noise: std must be >= 0 and finite, got range [{low}, {high}]")
    return x + _bcast(s, x) * torch.randn_like(x)


def _window_mask(length: int, size: Tensor, device: torch.device) -> Tensor:
    """(B, length) bool: a window of ``size_i`` positions centred uniformly at random (clipped)."""
    centre = torch.randint(0, length, (size.shape[0],), device=device)
    start = centre - size // 2
    pos = torch.arange(length, device=device)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < (start + size)[:, None])


def cutout(x: Tensor, size: Tensor | int, training: bool = True) -> Tensor:
    r"""Cutout (DeVries & Taylor 2017) with a length per example: zero a window of ``size_i``
    positions (1-D signals :math:`(B, L)` / :math:`(B, C, L)`) or a ``size_i`` × ``size_i``
    square (images :math:`(B, C, H, W)`), centred uniformly at random and clipped at the borders.

    Args:
        x: :math:`(B, L)`, :math:`(B, C, L)` or :math:`(B, C, H, W)`.
        size: :math:`(B,)` non-negative integers (or one int; whole-valued floats are accepted);
            0 leaves the example unchanged; any size from twice the longest side on zeroes
            everything.
        training: identity when False, returning ``x`` itself (default: True).

    Returns:
        ``x`` with the window zeroed (same shape, dtype and memory format; the same window in
        every channel).

    Raises:
        ValueError: negative or non-integer sizes, a ``size`` of the wrong shape, or ``x`` of
            another rank.
        TypeError: a ``size`` that is no number or tensor (the whole
            :class:`~hypergrad.hparams.Draw`, say).

    Cost: one or two host synchronisations (the checks of ``size``).

    >>> import torch, hypergrad as hg
    >>> y = hg.nn.cutout(torch.ones(3, 1, 20), torch.tensor([0, 4, 20]))
    >>> (y == 0).sum(dim=(1, 2)).tolist()[0], int((y[2] == 0).sum()) >= 10
    (0, True)
    """
    if not training:
        return x
    refuse_in_validation("cutout")
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"cutout: x must be (B, L), (B, C, L) or (B, C, H, W); got {tuple(x.shape)}")
    s = _per_example(size, x, "cutout size").detach()
    s = _whole(s, "cutout: sizes", 2 * max(x.shape[-2:] if x.dim() == 4 else x.shape[-1:]) + 2)
    if x.dim() in (2, 3):
        mask = _window_mask(x.shape[-1], s, x.device)
        mask = mask if x.dim() == 2 else mask[:, None, :]
    elif x.dim() == 4:
        rows = _window_mask(x.shape[-2], s, x.device)
        cols = _window_mask(x.shape[-1], s, x.device)
        mask = (rows[:, :, None] & cols[:, None, :])[:, None]
    return _like(x.masked_fill(mask, 0), x)


def random_shift(x: Tensor, max_shift: Tensor | int, training: bool = True) -> Tensor:
    r"""Shift each example along its last axis by an integer drawn uniformly from
    :math:`\{-m_i, \dots, m_i\}`, filling with zeros (translation augmentation).

    Args:
        x: :math:`(B, \dots, L)`; only the last axis moves (the width of an image), by the same
            shift in every channel.
        max_shift: :math:`(B,)` non-negative integers (or one int; whole-valued floats are
            accepted; any size is fine: a shift of :math:`L` or more leaves zeros).
        training: identity when False, returning ``x`` itself (default: True).

    Returns:
        A tensor shaped like ``x``, of its dtype and memory format; the vacated positions hold
        zeros (whatever ``x`` held, inf included).

    Raises:
        ValueError: ``x`` with fewer than 2 dimensions, or negative, non-integer or wrongly
            shaped ``max_shift``.
        TypeError: a ``max_shift`` that is no number or tensor (the whole
            :class:`~hypergrad.hparams.Draw`, say).

    Cost: one gather over ``x``, and one or two host synchronisations (the checks).

    >>> import torch, hypergrad as hg
    >>> x = torch.arange(1.0, 6.0).expand(2, 5)
    >>> y = hg.nn.random_shift(x, torch.tensor([0, 2]))
    >>> torch.equal(y[0], x[0]), float(y[1].sum()) <= 15
    (True, True)
    """
    if not training:
        return x
    refuse_in_validation("random_shift")
    if x.dim() < 2:
        raise ValueError(f"random_shift: x must be (B, ..., L), got {tuple(x.shape)}")
    m = _per_example(max_shift, x, "random_shift max_shift").detach()
    m = _whole(m, "random_shift: max_shift", 2**52).double()  # (exact in float64; 2m + 1 can't overflow)
    u = torch.rand(x.shape[0], device=x.device).double()
    shift = torch.floor(u * (2 * m + 1)) - m  # uniform on {-m, ..., m}
    length = x.shape[-1]
    shift = shift.clamp(-length, length).long()  # (a shift of >= L leaves only zeros either way)
    src = torch.arange(length, device=x.device)[None, :] - shift[:, None]  # y[t] = x[t - shift]
    valid = (src >= 0) & (src < length)
    idx = src.clamp(0, length - 1)
    idx = idx.reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (length,)).expand_as(x)
    out = torch.gather(x, -1, idx)
    invalid = ~valid.reshape(idx.shape[:1] + (1,) * (x.dim() - 2) + (length,))
    return _like(out.masked_fill(invalid, 0), x)  # (a fill, not a product: inf * 0 would be nan)


# ----------------------------------------------------------------------------- hypernetworks


def _count(v: Any) -> int | None:
    """``v`` as an int >= 1 (a Python or NumPy integer, not a bool), else None."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        return None
    try:
        n = operator.index(v)
    except TypeError:  # (a tensor of several elements, or a floating one: torch's own message)
        return None
    return n if n >= 1 else None


def _rank(rank: Any, layer: str) -> int | None:
    """A low-rank layer's ``rank`` as an int >= 1 (a NumPy integer too, as ``n_hparams`` and
    HyperNet's ``rank`` take), or None (full rank); anything else is refused naming ``layer``."""
    if rank is None:
        return None
    r = _count(rank)
    if r is None:
        raise ValueError(f"{layer}: rank must be an int >= 1 or None, got {rank!r}")
    return r


def _holder(root: nn.Module, prefix: str) -> nn.Module:
    """The submodule of ``root`` at the dotted ``prefix``, made (empty) where missing."""
    holder = root
    for part in prefix.split(".") if prefix else ():
        if part not in holder._modules:
            holder.add_module(part, nn.Module())
        holder = holder._modules[part]  # type: ignore[assignment]
    return holder


class HyperNet(nn.Module):
    r"""A best-response hypernetwork around a model (Lorraine & Duvenaud 2018).

    Generates all of ``base``'s parameters from the hyperparameters,
    :math:`w(\lambda) = w_0 + R(\lambda)`, and runs ``base`` with them substituted for the call
    (everywhere a weight acts: a submodule reused under two names is fine, and ``base`` comes
    out untouched). :math:`R` is, by default, linear:
    :math:`R(\lambda) = A\lambda` with :math:`A \in \mathbb{R}^{P \times H}`; with ``rank=r``,
    low-rank :math:`A = U Q` (:math:`U \in \mathbb{R}^{P \times r}`, :math:`Q \in \mathbb{R}^{r \times H}`);
    or any ``hypernet`` module mapping :math:`(H,)` to :math:`(P,)`.

    The trained weights (for the inner optimiser) are this module's parameters: :math:`w_0`
    (``base_weights``, initialised from ``base``) and the hypernetwork's. ``base`` itself is kept
    as a template (not a submodule: its parameters are never trained). Its buffers (BatchNorm
    statistics) are this module's, under ``base_state`` (the same tensors at construction): they
    are saved by ``state_dict()``, moved by ``.to()``, and kept out of the validation passes like
    any model buffer; a buffer that ``base`` *reassigns* in its forward (``self.mean = ...``)
    is kept too. ``train()`` / ``eval()`` switch ``base`` too (Dropout, BatchNorm).

    Frozen parameters of ``base`` (``requires_grad=False`` at construction, e.g. a pretrained
    backbone) are not generated: they act as they are, are neither trained nor moved by
    :math:`\lambda`, and are kept (saved, moved by ``.to()``) as buffers under ``base_state``.
    Each generated weight has its parameter's dtype (a base mixing float32 and float64 keeps
    both; :math:`w_0` and the linear response hold the promoted dtype) until the module is cast
    (``.double()``, ``.to(dtype)``); a ``hypernet`` is fed :math:`\lambda` in its own dtype.
    A sparse embedding (``nn.Embedding(..., sparse=True)``) of ``base`` runs dense during the call:
    the generated weights are one dense vector, which its gradient reaches either way. An
    embedding's ``padding_idx`` row stays the fixed pad it is in ``base``: the response does not
    move it (it is :math:`w_0`'s row at every :math:`\lambda`).

    Args:
        base: the model whose weights are generated.
        n_hparams: :math:`H`.
        rank: low-rank response (default: None, full linear).
        hypernet: a module :math:`(H,) \to (P,)` replacing the linear response (not with
            ``rank``).
        init_std: std of the linear response's initial entries, finite and :math:`\ge 0`
            (default: 1e-2).

    Call: ``hypernet_model(*args, hparams=...)`` with a shared draw
    (:class:`~hypergrad.BestResponse` arranges that) or a :math:`(H,)` tensor;
    :meth:`weights` gives the generated tensors by name (for penalties in the loss).

    Cost per call: the response, :math:`P H` multiply-adds (:math:`r(P + H)` with ``rank``), then
    one forward pass of ``base``; the full linear :math:`A` holds :math:`P H` numbers (use ``rank``
    for large models).

    Raises:
        ValueError: ``n_hparams`` or ``rank`` not an int >= 1, both ``rank`` and ``hypernet``, a
            negative or non-finite ``init_std``, ``base`` without parameters (or all frozen), or
            with a trained embedding built with ``max_norm`` (it renormalises its weight in place);
            at call time, hyperparameters not of shape :math:`(H,)`, a per-example (not shared)
            :class:`~hypergrad.hparams.Draw`, or a ``hypernet`` output not of shape :math:`(P,)`.

    >>> import torch, hypergrad as hg
    >>> net = hg.nn.HyperNet(torch.nn.Linear(3, 1), n_hparams=1)
    >>> net(torch.randn(4, 3), hparams=torch.zeros(1)).shape
    torch.Size([4, 1])
    """

    base: nn.Module
    _pinned: Tensor | None

    def __init__(
        self,
        base: nn.Module,
        n_hparams: int,
        *,
        rank: int | None = None,
        hypernet: nn.Module | None = None,
        init_std: float = 1e-2,
    ) -> None:
        super().__init__()
        count = _count(n_hparams)
        if count is None:
            raise ValueError(f"HyperNet: n_hparams must be an int >= 1, got {n_hparams!r}")
        if rank is not None:
            if hypernet is not None:
                raise ValueError("HyperNet: give rank (a low-rank linear response) or hypernet, not both")
            r = _count(rank)
            if r is None:
                raise ValueError(f"HyperNet: rank must be an int >= 1, got {rank!r}")
            rank = r
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"HyperNet: init_std must be a finite number >= 0, got {init_std!r}")
        n_hparams = count
        everything = list(base.named_parameters())
        named = [(n, p) for n, p in everything if p.requires_grad]
        frozen = [(n, p) for n, p in everything if not p.requires_grad]
        if not named:
            why = " (all of its parameters are frozen, requires_grad=False)" if frozen else ""
            raise ValueError(f"HyperNet: base has no parameters to generate{why}")
        renorm = [
            (n or "(root)", m.max_norm)
            for n, m in base.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            and m.max_norm is not None
            and m.weight.requires_grad
        ]
        if renorm:  # (the first call crashed deep in autograd: "a view ... has been modified inplace")
            raise ValueError(
                f"HyperNet: base.{renorm[0][0]} is an embedding with max_norm={renorm[0][1]!r}, whose "
                f"forward renormalises its weight in place (torch.embedding_renorm_); a generated "
                f"weight is a view of one vector, differentiable w.r.t. lambda, and cannot be "
                f"changed in place. Build it with max_norm=None (renormalise the looked-up rows "
                f"out of place in the forward if needed), or freeze it (requires_grad_(False))"
            )
        self.__dict__["base"] = base  # a template, not a submodule (its parameters are not trained)
        self.base_state = nn.Module()  # base's buffers, mirrored at their paths: this module's state

        seen: set[int] = set()
        for prefix, mod in base.named_modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            for key, buf in mod._buffers.items():
                if buf is not None:
                    _holder(self.base_state, prefix).register_buffer(
                        key, buf, persistent=key not in mod._non_persistent_buffers_set
                    )
        self._buffer_names = tuple(n for n, _ in base.named_buffers())
        # frozen parameters are not generated (nor trained): constants, kept (saved, moved) as buffers
        for n, p in frozen:
            prefix, _, key = n.rpartition(".")
            _holder(self.base_state, prefix).register_buffer(key, p.detach())
        self._frozen_names = tuple(n for n, _ in frozen)
        self.n_hparams = n_hparams
        self.names = tuple(n for n, _ in named)
        self.shapes = tuple(p.shape for _, p in named)
        self.numels = tuple(p.numel() for _, p in named)
        self.dtypes = tuple(p.dtype for _, p in named)
        total = sum(self.numels)
        self.base_weights = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in named]).clone())
        # (the response in the vector's dtype, the promotion of base's: not its first parameter's,
        # whose float32 against a later float64 failed at the first call, "addmv ... same dtype")
        ref = self.base_weights
        # an embedding's padding_idx row is a fixed pad (its gradient is masked, so it is never
        # trained): the response must not move it with lambda either (it did: a padded sequence's
        # output changed with lambda, and padded and unpadded inputs differed)
        pinned = torch.zeros(total, dtype=torch.bool, device=self.base_weights.device)
        starts = dict(zip((id(p) for _, p in named), itertools.accumulate((0,) + self.numels), strict=False))
        for m in base.modules():
            pad = getattr(m, "padding_idx", None)
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and pad is not None and id(m.weight) in starts:
                row = starts[id(m.weight)] + (pad % m.weight.shape[0]) * m.weight.shape[1]
                pinned[row : row + m.weight.shape[1]] = True
        self.register_buffer("_pinned", pinned if bool(pinned.any()) else None, persistent=False)
        self.response: nn.Module | None = hypernet
        self.u: nn.Parameter | None = None
        self.q: nn.Parameter | None = None
        if hypernet is None:
            if rank is None:
                self.q = nn.Parameter(
                    torch.randn(total, n_hparams, dtype=ref.dtype, device=ref.device) * init_std
                )
            else:
                self.u = nn.Parameter(
                    torch.randn(total, rank, dtype=ref.dtype, device=ref.device) / math.sqrt(rank) * init_std
                )
                self.q = nn.Parameter(torch.randn(rank, n_hparams, dtype=ref.dtype, device=ref.device))

    def flat(self, hparams: Hyper) -> Tensor:
        r"""All generated weights :math:`w_0 + R(\lambda)` as one vector :math:`(P,)` (``base``'s
        trainable parameters flattened, in ``named_parameters()`` order, in one dtype).
        ``hparams``: a :math:`(H,)` tensor, a shared :class:`~hypergrad.hparams.Draw`, or a
        :class:`~hypergrad.hparams.SelfTuned` (drawn for one example)."""
        lam = self._lambda(hparams)
        if self.response is not None:
            dtypes = [t.dtype for t in self.response.parameters() if t.is_floating_point()]
            delta = self.response(lam.to(dtypes[0]) if dtypes else lam)  # (the response's own dtype)
        else:
            assert self.q is not None
            delta = self.q @ lam
            if self.u is not None:
                delta = self.u @ delta
        if delta.shape != self.base_weights.shape:
            raise ValueError(
                f"HyperNet: the hypernetwork returned shape {tuple(delta.shape)}, need "
                f"{tuple(self.base_weights.shape)}"
            )
        if self._pinned is not None:  # (embeddings' padding rows: w_0 at every lambda)
            delta = delta.masked_fill(self._pinned, 0)
        return self.base_weights + delta.to(self.base_weights.dtype)

    def weights(self, hparams: Hyper) -> dict[str, Tensor]:
        """The generated weights by ``base``'s parameter names, each shaped like that parameter
        (views of :meth:`flat`, differentiable w.r.t. the hypernetwork and the hyperparameters),
        and the frozen parameters as they are."""
        parts = self.flat(hparams).split(self.numels)
        out = {  # (each in base's own dtype, where base mixes them)
            n: p.view(s).to(dt)
            for n, p, s, dt in zip(self.names, parts, self.shapes, self.dtypes, strict=True)
        }
        out.update((n, self.base_state.get_buffer(n)) for n in self._frozen_names)
        return out

    def _layout(self) -> Tensor:
        """One code per generated weight (a CRC-32 of its name and shape), in the order
        ``base_weights`` and the response's rows hold them: ``base``'s ``named_parameters``
        order. A tensor, as other state is (code reading a ``state_dict()`` expects tensors)."""
        codes = [zlib.crc32(f"{n}:{tuple(s)}".encode()) for n, s in zip(self.names, self.shapes, strict=True)]
        return torch.tensor(codes, dtype=torch.int64)

    def get_extra_state(self) -> Tensor:
        """The layout of ``base_weights`` and of the response's output (the rows of ``u`` or
        ``q``), checked on load: a state saved around a base that registers its modules in
        another order (a refactored ``__init__``) has the same keys and sizes, and loaded by
        position it cut the vector at other places, silently another network (outputs 2.6 off
        for a 3-4-3 MLP)."""
        return self._layout()

    def set_extra_state(self, state: Any) -> None:
        pass  # (checked by _load_from_state_dict before anything is loaded)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "_extra_state"
        saved = state_dict.get(key)
        if isinstance(saved, Tensor):
            was, now = saved.reshape(-1).tolist(), self._layout().tolist()
            if was != now:
                how = "in another order" if sorted(was) == sorted(now) else "other ones"
                raise ValueError(
                    f"this HyperNet state was saved around a base whose generated weights were "
                    f"{how} than here ({list(self.names)[:6]}{'...' if len(self.names) > 6 else ''}): "
                    f"base_weights and the response's rows hold them in the saved order, so each "
                    f"would load into another weight. Build base with its modules registered (and "
                    f"shaped) as when it was saved"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if saved is None and key in missing_keys:  # (saved before the layout was: not checked)
            missing_keys.remove(key)

    def _lambda(self, hparams: Hyper) -> Tensor:
        if isinstance(hparams, SelfTuned):
            hparams = hparams.draw(1)
        if isinstance(hparams, Draw):
            if not hparams.shared:
                raise ValueError("HyperNet needs one hyperparameter draw per batch (a shared Draw)")
            hparams = hparams.features[0]
        if not isinstance(hparams, Tensor) or hparams.shape != (self.n_hparams,):
            shape = tuple(hparams.shape) if isinstance(hparams, Tensor) else type(hparams).__name__
            raise ValueError(
                f"HyperNet was built for n_hparams={self.n_hparams}; got hyperparameters {shape}"
            )
        return hparams.to(self.base_weights.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> HyperNet:
        super()._apply(fn, recurse)
        # .double(), .float(), .half(), .to(dtype) cast every floating parameter: so do the generated
        # weights (where base mixed dtypes, they kept each its own)
        single, double = (fn(torch.empty(0, dtype=d)).dtype for d in (torch.float32, torch.float64))
        if (single, double) != (torch.float32, torch.float64) and single == double:
            self.dtypes = tuple(single if d.is_floating_point else d for d in self.dtypes)
        return self

    def train(self, mode: bool = True) -> HyperNet:
        super().train(mode)
        self.base.train(mode)
        return self

    def _warn_flags_changed(self) -> None:
        """Warn once when ``base``'s parameters were frozen or unfrozen after construction: that
        has no effect here (a generated weight keeps training and moving with lambda, a frozen one
        stays a constant), where a fine-tuning schedule (``base[0].requires_grad_(False)`` after N
        steps) expected it to (the generated weight moved on, silently)."""
        if getattr(self, "_warned_flags", False):
            return
        params = dict(self.base.named_parameters())
        frozen = [n for n in self.names if n in params and not params[n].requires_grad]
        thawed = [n for n in getattr(self, "_frozen_names", ()) if n in params and params[n].requires_grad]
        if not (frozen or thawed):
            return
        self._warned_flags = True
        said = []
        if frozen:
            said.append(
                f"{frozen[:4]} were trainable when it was built and are frozen now: they are still "
                "generated (trained, and moved by the hyperparameters)"
            )
        if thawed:
            said.append(
                f"{thawed[:4]} were frozen when it was built and require grad now: they stay constants"
            )
        warnings.warn(
            f"HyperNet: base's parameter(s) {'; and '.join(said)}. base is a template: requires_grad "
            "on it is read once, when the HyperNet is built. Build a new HyperNet (and optimiser) "
            "with the parameters frozen as wanted. (warned once)",
            UserWarning,
            stacklevel=3,
        )

    def forward(self, *args: Any, hparams: Hyper, **kwargs: Any) -> Any:
        """``base(*args, **kwargs)`` with the generated weights (and this module's buffers)
        substituted for the call; returns what ``base`` returns. Warns (once) when ``base``'s
        parameters were frozen or unfrozen since construction, which has no effect here."""
        self._warn_flags_changed()
        values = self.weights(hparams)
        values.update((n, self.base_state.get_buffer(n)) for n in self._buffer_names)
        slots: dict[str, list[Any]] = dict(tensor_slots(self.base))
        # (and where base's modules hold a weight in a plain attribute, ``self.tied = [enc.weight]``:
        # the call read the template's weight there, not the generated one, silently; found once
        # per layout of base, as the methods find them)
        layout = registrations()
        cached = self.__dict__.get("_held_cache")
        if cached is None or cached[0] != layout:
            params = dict(self.base.named_parameters())
            held = _held_slots(self.base, list(params.values()))
            cached = (layout, {n: held[id(p)] for n, p in params.items() if id(p) in held})
            self.__dict__["_held_cache"] = cached
        if cached[1]:
            slots = {n: [*s, *cached[1].get(n, [])] for n, s in slots.items()}
        # a sparse embedding's gradient (sparse=True) cannot flow back into the one dense vector
        # the weights are generated from ("reshape is not implemented for sparse tensors"): the
        # call runs it dense, the same values
        sparse = [
            m for m in self.base.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        ]
        for emb in sparse:
            emb.sparse = False
        try:
            with substituting((slots[n], v) for n, v in values.items()), _uncached(True):
                out = self.base(*args, **kwargs)
                after = [(n, d[k]) for n in self._buffer_names for d, k in slots[n][:1]]
            for n, buf in after:  # a buffer the module reassigned (self.mean = 0.9 * self.mean + ...)
                if buf is not values[n]:
                    prefix, _, key = n.rpartition(".")
                    self.base_state.get_submodule(prefix)._buffers[key] = buf
            return out
        finally:  # recurrent layers' own weight lists would hold the generated tensors (and graph)
            for m in self.base.modules():
                if isinstance(m, nn.RNNBase):
                    m._update_flat_weights()
            for emb in sparse:
                emb.sparse = True
