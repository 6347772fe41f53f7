r"""Hyperparameters for self-tuning networks and best-response hypernetworks.

A :class:`SelfTuned` container holds every hyperparameter of a model as one unconstrained vector
:math:`\lambda \in \mathbb{R}^H` (``raw``) with a perturbation scale :math:`\sigma \in \mathbb{R}^H_{>0}`
(``raw_scale``). Each named entry is described by a *spec* that fixes its transform:

==============  =========================================================  =======================
spec            value from the unconstrained :math:`r`                      domain
==============  =========================================================  =======================
:class:`Rate`   stretched sigmoid :math:`a + (b - a)\,\sigma(r)`            :math:`(a, b)`, default
                (its inverse is the stretched logit)                        :math:`(0, 1)`
:class:`Positive`  :math:`\log(1 + e^{r})` (``"softplus"``) or              :math:`(0, \infty)`
                :math:`e^{r}` (``"exp"``)
:class:`Integer`   :math:`\lfloor l + (h + 1 - l)\,\sigma(r) \rfloor`       :math:`\{l, \dots, h\}`
==============  =========================================================  =======================

The losses do not read ``raw`` directly: they call :meth:`SelfTuned.draw` (or pass the container
to the ``hg.nn`` layers, which draw for them). Outside a :class:`~hypergrad.SelfTuning` step a
draw is the current value for every example; inside one it is the per-example perturbation
:math:`\tilde\lambda_i = \lambda + \sigma \odot \epsilon_i`, :math:`\epsilon_i \sim N(0, I)`, drawn
once per loss call and shared by every layer and augmentation that asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import operator
import warnings
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ._functional import _THREAD

# ----------------------------------------------------------------------------- transforms


def stretched_sigmoid(raw: Tensor, low: float, high: float) -> Tensor:
    r""":math:`a + (b - a)\,\sigma(r)`, onto :math:`(a, b)` (elementwise, differentiable).

    >>> import torch
    >>> stretched_sigmoid(torch.tensor([0.0]), 0.0, 0.9)
    tensor([0.4500])
    """
    return low + (high - low) * torch.sigmoid(raw)


def stretched_logit(value: Tensor, low: float, high: float) -> Tensor:
    r"""Inverse of :func:`stretched_sigmoid`: :math:`\log(v - a) - \log(b - v)`.

    >>> import torch
    >>> stretched_logit(torch.tensor([0.45]), 0.0, 0.9)
    tensor([0.])
    """
    return torch.log(value - low) - torch.log(high - value)


def _softplus_inverse(value: Tensor) -> Tensor:
    # log(e^v - 1) = v + log(1 - e^{-v}), accurate for large v
    return value + torch.log(-torch.expm1(-value))


class PositiveTransform(str, enum.Enum):
    """How :class:`Positive` maps its unconstrained value onto :math:`(0, \\infty)`."""

    SOFTPLUS = "softplus"
    EXP = "exp"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A named hyperparameter's transform and initial value (``size`` entries)."""

    init: float
    size: int
    per_batch: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 1):
            raise ValueError(f"{type(self).__name__}: size must be an int >= 1, got {self.size!r}")
        if not isinstance(self.per_batch, bool):
            name = type(self).__name__
            raise ValueError(f"{name}: per_batch must be True or False, got {self.per_batch!r}")
        if not math.isfinite(float(self.init)):
            raise ValueError(f"{type(self).__name__}: init must be finite, got {self.init!r}")

    def value(self, raw: Tensor) -> Tensor:
        """The constrained value of unconstrained ``raw`` (elementwise)."""
        raise NotImplementedError

    def raw(self, value: Tensor) -> Tensor:
        """The unconstrained tensor whose value is ``value`` (elementwise)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Rate(_Spec):
    r"""A rate in :math:`(\text{low}, \text{high}) \subseteq (0, 1)`: dropout, a mixing probability.

    Transform: :math:`v = a + (b - a)\,\sigma(r)`; its inverse, the stretched logit, gives the
    initial raw value. The paper bounds dropout rates by 0.9 (``high=0.9``) so that a unit is never
    dropped for good.

    Args:
        init: initial rate, strictly inside ``(low, high)``.
        high: upper bound, ``<= 1`` (default: 1.0).
        low: lower bound, ``>= 0`` (default: 0.0).
        size: how many rates (e.g. one per layer) (default: 1).
        per_batch: one perturbation for the whole batch instead of one per example (default:
            False; see :class:`SelfTuned`).

    Raises:
        ValueError: bounds outside :math:`[0, 1]`, ``low >= high``, ``init`` not strictly inside
            them, or ``size`` not an int >= 1.

    >>> import torch
    >>> r = Rate(0.1, high=0.9)
    >>> round(float(r.value(r.raw(torch.tensor(0.1)))), 6)
    0.1
    """

    init: float = 0.1
    size: int = 1
    high: float = 1.0
    low: float = 0.0

    def __init__(
        self, init: float, high: float = 1.0, *, low: float = 0.0, size: int = 1, per_batch: bool = False
    ) -> None:
        object.__setattr__(self, "init", float(init))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "per_batch", per_batch)
        object.__setattr__(self, "high", float(high))
        object.__setattr__(self, "low", float(low))
        self.__post_init__()
        if not (0.0 <= self.low < self.high <= 1.0):
            raise ValueError(f"Rate: need 0 <= low < high <= 1, got low={low!r}, high={high!r}")
        if not (self.low < self.init < self.high):
            raise ValueError(
                f"Rate: init={init!r} is out of range; a rate must lie strictly inside "
                f"({self.low:g}, {self.high:g})"
            )

    def value(self, raw: Tensor) -> Tensor:
        # kept strictly inside (low, high) even where sigma(r) rounds to 0 or 1 (float32, |r| > 17):
        # a dropout rate of exactly 1 would divide by 0
        v = stretched_sigmoid(raw, self.low, self.high)
        lo, hi = (torch.tensor(b, dtype=v.dtype, device=v.device) for b in (self.low, self.high))
        return v.clamp(torch.nextafter(lo, hi), torch.nextafter(hi, lo))

    def raw(self, value: Tensor) -> Tensor:
        return stretched_logit(value, self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Positive(_Spec):
    r"""A positive hyperparameter: a noise standard deviation, a penalty.

    Args:
        init: initial value, ``> 0``.
        transform: ``"softplus"`` (default; :math:`v = \log(1 + e^r)`, gradients do not vanish
            for large values) or ``"exp"`` (:math:`v = e^r`: steps are relative, for values
            spanning decades such as a penalty).
        size: how many (default: 1).
        per_batch: one perturbation for the whole batch (default: False; see :class:`SelfTuned`).

    Raises:
        ValueError: ``init <= 0`` or not finite, an unknown transform, or ``size`` not an int >= 1.

    >>> import torch
    >>> p = Positive(0.3, transform="exp")
    >>> round(float(p.value(p.raw(torch.tensor(0.3)))), 6)
    0.3
    """

    init: float = 1.0
    size: int = 1
    transform: PositiveTransform = PositiveTransform.SOFTPLUS

    def __init__(
        self,
        init: float,
        *,
        transform: PositiveTransform | str = "softplus",
        size: int = 1,
        per_batch: bool = False,
    ) -> None:
        object.__setattr__(self, "init", float(init))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "per_batch", per_batch)
        object.__setattr__(self, "transform", PositiveTransform(transform))
        self.__post_init__()
        if not self.init > 0:
            raise ValueError(f"Positive: init={init!r} is out of range; it must be > 0")

    def value(self, raw: Tensor) -> Tensor:
        return raw.exp() if self.transform is PositiveTransform.EXP else F.softplus(raw)

    def raw(self, value: Tensor) -> Tensor:
        return value.log() if self.transform is PositiveTransform.EXP else _softplus_inverse(value)


@dataclasses.dataclass(frozen=True)
class Integer(_Spec):
    r"""An integer hyperparameter in :math:`\{l, \dots, h\}`: a cutout length, a shift, a width.

    Transform: a stretched sigmoid onto the continuous interval :math:`(l, h + 1)`, then floor:
    :math:`v = \lfloor l + (h + 1 - l)\,\sigma(r) \rfloor`, so every integer owns an interval of
    equal width in :math:`\sigma(r)`. The unconstrained value (what the layers see and what
    the outer optimiser moves) is continuous; only the value handed to the loss is floored.
    ``init`` starts at the middle of its interval (:math:`c = \text{init} + 1/2`).

    Args:
        init: initial integer, ``low <= init <= high``.
        low: smallest value.
        high: largest value, ``> low``.
        size: how many (default: 1).
        per_batch: one perturbation for the whole batch (default: False; see :class:`SelfTuned`).

    Raises:
        ValueError: non-integers, ``low >= high``, or ``init`` outside ``[low, high]``.

    >>> import torch
    >>> c = Integer(4, 0, 16)
    >>> int(c.value(c.raw(torch.tensor(4.0))))
    4
    """

    init: float = 0.0
    size: int = 1
    low: int = 0
    high: int = 1

    def __init__(self, init: int, low: int, high: int, *, size: int = 1, per_batch: bool = False) -> None:
        for name, v in (("init", init), ("low", low), ("high", high)):
            if isinstance(v, bool) or not float(v).is_integer():
                raise ValueError(f"Integer: {name} must be an integer, got {v!r}")
        object.__setattr__(self, "init", float(init))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "per_batch", per_batch)
        object.__setattr__(self, "low", int(low))
        object.__setattr__(self, "high", int(high))
        self.__post_init__()
        if not self.low < self.high:
            raise ValueError(f"Integer: need low < high, got low={low!r}, high={high!r}")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"Integer: init={init!r} is out of range [{low}, {high}]")

    def continuous(self, raw: Tensor) -> Tensor:
        """The continuous value :math:`l + (h + 1 - l)\\,\\sigma(r)` in :math:`(l, h + 1)`."""
        return stretched_sigmoid(raw, float(self.low), float(self.high + 1))

    def value(self, raw: Tensor) -> Tensor:
        # the clamp guards the rounding of sigma(r) to exactly 1 in floating point
        return torch.floor(self.continuous(raw)).clamp(self.low, self.high)

    def raw(self, value: Tensor) -> Tensor:
        return stretched_logit(value + 0.5, float(self.low), float(self.high + 1))


# ----------------------------------------------------------------------------- draws


def _count(v: Any) -> int | None:
    """``v`` as an int >= 0 (a Python or NumPy integer, a 0-dim integer tensor; not a bool),
    else None."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        return None
    try:
        n = operator.index(v)
    except TypeError:  # (a tensor with more than one element, or a floating one)
        return None
    return n if n >= 0 else None


class _Mode(str, enum.Enum):
    MEAN = "mean"  # the current value, for every example (outside a step: values detached)
    VAL_MEAN = "val_mean"  # the current value, differentiable (BestResponse's hyperstep)
    TRAIN = "train"  # per-example perturbation, detached from lambda and sigma
    VAL = "val"  # per-example perturbation, differentiable w.r.t. lambda and sigma
    SHARED_TRAIN = "shared_train"  # one perturbation (or prior sample) for the whole batch, detached
    BASE = "base"  # Delta-STN's general step: the current value, detached, for every example
    LINEAR = "linear"  # as TRAIN, the layers' centred features linearised (Delta-STN's response step)


@dataclasses.dataclass(frozen=True)
class Draw:
    r"""Per-example hyperparameters for one batch, as the layers and the loss see them.

    Attributes:
        features: :math:`(B, H)` what the STN layers are fed: the unconstrained
            :math:`\tilde\lambda_i` (with ``delta=True``: :math:`\tilde\lambda_i - \lambda`, the
            centred perturbation).
        values: by name, the constrained values, :math:`(B,)` for a spec of size 1 else
            :math:`(B, \text{size})`. :class:`Integer` values are ``torch.long``.
        shared: ``True`` when every row is the same draw (best-response hypernetworks).
        linear: ``True`` in Delta-STN's response step: inside the model call that
            :class:`~hypergrad.SelfTuning` linearises, the layers receive the features as a
            forward-mode dual number with primal 0 and tangent ``features`` (the network's output
            becomes :math:`f(x; w_0) + J_\Delta f\,\Delta`).
        zero: ``True`` when ``features`` are exactly 0 and carry no graph (Delta-STN's step on
            the base weights, at :math:`\Delta = 0`): the layers' response terms vanish, and the
            STN layers skip their hyper half (half the layer's FLOPs, forward and backward).

    ``draw[name]`` is ``draw.values[name]`` (a ``KeyError`` lists the names); ``len(draw)`` is
    :math:`B`.

    >>> import hypergrad as hg
    >>> d = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5)).draw(4)
    >>> len(d), d.features.shape, d["p"].shape
    (4, torch.Size([4, 1]), torch.Size([4]))
    """

    features: Tensor
    values: Mapping[str, Tensor]
    shared: bool = False
    linear: bool = False
    zero: bool = False

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"no hyperparameter {name!r}; this draw has {sorted(self.values)}") from None

    def __len__(self) -> int:
        return int(self.features.shape[0])


class SelfTuned(nn.Module):
    r"""The hyperparameters of a self-tuning network: named specs, one unconstrained vector.

    Parameters (what the outer optimiser moves): ``raw`` :math:`(H,)`, the unconstrained
    hyperparameters in the order the specs were given (a spec of ``size`` k takes k entries), and,
    when ``learn_scale`` (default), ``raw_scale`` :math:`(H,)`, the perturbation scale
    :math:`\sigma = s_{min} + (s_{max} - s_{min})\,\sigma(r_s)`, kept inside ``scale_range`` so that
    it can neither collapse to 0 nor grow without bound. With ``learn_scale=False``, :math:`\sigma`
    is the constant ``scale`` (best-response hypernetworks, Lorraine & Duvenaud 2018).

    A spec built with ``per_batch=True`` (e.g. ``Rate(0.3, high=0.9, per_batch=True)``) is
    perturbed once per batch: in a self-tuning step or hyperstep every example of a draw shares
    its entries of :math:`\tilde\lambda` (the authors' ``minibatch=False``), for what acts on the
    whole batch at once — weight drop on an LSTM's recurrent weights, embedding dropout, a penalty
    coefficient. Its values are still :math:`(B, ...)`, every row equal: use ``d[name][0]``. The
    other entries keep one perturbation per example, and the random stream is the same as without
    the option (the shared entries take the first example's noise).

    Args:
        scale: initial perturbation scale :math:`\sigma_0` in unconstrained units (default: 0.5,
            the paper's).
        scale_range: ``(s_min, s_max)``, bounds of :math:`\sigma` (default: ``(0.01, 3.0)``).
        learn_scale: learn :math:`\sigma` (default: True).
        dtype: of the parameters (default: torch's default dtype): ``float64`` for a ``float64``
            model; ``float32`` also for a ``float16`` / ``bfloat16`` one (the layers cast the
            features to their own dtype), since half-precision hyperparameters are coarse: in
            ``bfloat16`` an ``Integer(97, 0, 128)`` started at 98, and an outer step below about
            :math:`2^{-9}|r|` (Adam's 3e-3 once :math:`|r| \ge 1`) is rounded away.
        **specs: ``name=Rate(...) | Positive(...) | Integer(...)``.

    Raises:
        ValueError: no specs, a spec that is not a :class:`Rate` / :class:`Positive` /
            :class:`Integer`, an ``init`` that ``dtype`` cannot hold (a raw value that
            overflows, a value on the domain's edge or past it, an integer that comes back as
            another), a reserved name (``inner_step``, ``hyper_step``, ``sigma``) or one
            holding a ``.`` (``history()``'s separator), a spec
            named like one of the arguments above (``scale``, ``scale_range``, ``learn_scale``,
            ``dtype``), a
            ``scale_range`` not :math:`0 < s_{min} < s_{max} < \infty`, a
            learned scale outside it, or a fixed one not finite and positive (``scale_range``
            bounds only a learned :math:`\sigma`).
        TypeError: a ``dtype`` that is not floating point, or ``learn_scale`` not a bool.

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.1, high=0.9, size=2),
    ...                           cutout=hg.hparams.Integer(4, 0, 16))
    >>> hp.size
    3
    >>> d = hp.draw(5)        # outside SelfTuning: the current values for every example
    >>> d.features.shape, d["dropout"].shape, d["cutout"].tolist()
    (torch.Size([5, 3]), torch.Size([5, 2]), [4, 4, 4, 4, 4])
    >>> {k: [round(x, 3) for x in v] for k, v in hp.current().items()}
    {'dropout': [0.1, 0.1], 'cutout': [4.0]}
    """

    def __init__(
        self,
        *,
        scale: float = 0.5,
        scale_range: tuple[float, float] = (0.01, 3.0),
        learn_scale: bool = True,
        dtype: torch.dtype | None = None,
        **specs: _Spec,
    ) -> None:
        super().__init__()
        own = {"scale": scale, "scale_range": scale_range, "learn_scale": learn_scale, "dtype": dtype}
        for name, v in own.items():  # a spec under one of these names is taken as that argument
            if isinstance(v, _Spec):
                raise ValueError(
                    f"SelfTuned: {name!r} is an argument of SelfTuned itself, not available as a "
                    f"hyperparameter name ({name}={v!r}); call the hyperparameter something else, "
                    f"e.g. {name}_={type(v).__name__}(...)"
                )
        if not specs:
            raise ValueError("SelfTuned needs at least one hyperparameter, e.g. dropout=Rate(0.1, high=0.9)")
        for name, spec in specs.items():
            if not isinstance(spec, (Rate, Positive, Integer)):
                raise ValueError(f"SelfTuned: {name}={spec!r} is not a hg.hparams.Rate, Positive or Integer")
            if name in ("inner_step", "hyper_step", "sigma"):  # history()'s and values()'s own keys
                raise ValueError(
                    f"SelfTuned: {name!r} is a reserved name (history() rows and hg.hparams.values "
                    f"use it); call the hyperparameter something else"
                )
            if "." in name:  # (**{"a.1": ...} overwrote entry 1 of a spec "a" in history() rows)
                raise ValueError(
                    f"SelfTuned: the name {name!r} holds a '.', which history() rows use for entries "
                    f"('name.i') and scales ('sigma.name'), so it would overwrite another column; "
                    f"call the hyperparameter something else, e.g. {name.replace('.', '_')!r}"
                )
        if not isinstance(learn_scale, bool):  # (bool("false") is True: a learned scale)
            raise TypeError(f"SelfTuned: learn_scale must be True or False, got {learn_scale!r}")
        lo, hi = (float(s) for s in scale_range)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"SelfTuned: need 0 < s_min < s_max < inf, got scale_range={scale_range!r}")
        if learn_scale and not lo < float(scale) < hi:
            raise ValueError(f"SelfTuned: scale={scale!r} is out of range ({lo:g}, {hi:g})")
        if not learn_scale and not (0 < float(scale) < math.inf):  # (the range bounds a learned one)
            raise ValueError(f"SelfTuned: a fixed scale must be finite and > 0, got scale={scale!r}")
        self.specs: dict[str, _Spec] = dict(specs)
        self.scale_range = (lo, hi)
        self.learn_scale = bool(learn_scale)
        self.slices: dict[str, slice] = {}
        start = 0
        for name, spec in self.specs.items():
            self.slices[name] = slice(start, start + spec.size)
            start += spec.size
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"SelfTuned: dtype must be a floating-point dtype, got {dtype}")
        raw = torch.cat(
            [
                spec.raw(torch.full((spec.size,), spec.init, dtype=torch.float64))
                for spec in self.specs.values()
            ]
        )
        self.raw = nn.Parameter(raw.to(dtype))
        self._check_inits(dtype)
        if self.learn_scale:
            s = torch.tensor((float(scale) - lo) / (hi - lo), dtype=torch.float64)
            self.raw_scale: Tensor = nn.Parameter(torch.logit(s).expand(self.size).clone().to(dtype))
        else:
            self._fixed_scale = float(scale)
        self._mode = _Mode.MEAN
        self._centred = False
        # the SelfTuning(delta=...) that set _centred, if any (None: a container no method uses)
        self._centred_by: bool | None = None
        self._cache: dict[int, Draw] = {}
        self._shared_lam: Tensor | None = None  # (1, H): the one lambda of a shared-draw evaluation
        # (batch size, dtype, device) of each perturbation drawn while a validation pass records
        # them (None: not recording), so that it can tell its own draws from the model's
        self._draws: list[tuple[int, torch.dtype, torch.device]] | None = None
        self._prior: tuple[Tensor, Tensor] | None = None  # (mean, std) for global sampling
        self._centre: Tensor | None = None  # Delta-STN's lambda_0 if held fixed (default: sg(raw))
        self._history: list[dict[str, float]] = []
        # (H,) True where a spec is perturbed once per batch (per_batch=True); None: none is
        cols = [spec.per_batch for spec in self.specs.values() for _ in range(spec.size)]
        self._per_batch: Tensor | None = torch.tensor(cols) if any(cols) else None

    def get_extra_state(self) -> Tensor:
        """Whether the STN layers are fed centred features (``SelfTuning(..., delta=True)``): part
        of the state, since a Delta-STN's layers compute another function of uncentred ones. A
        container loaded from a Delta-STN's ``state_dict()`` outside the method (a model and its
        hyperparameters rebuilt for evaluation) fed the layers ``raw`` instead of zeros at the
        current lambda, and ``model(x, hp)`` / ``layer.fixed(hp)`` were silently another network.

        Then a code of ``scale_range`` and one per spec (a CRC-32 of its name and
        :func:`_describe`), in the order of ``raw``'s entries, checked on load: a state saved by
        ``SelfTuned(a=..., b=...)`` has the same keys and sizes as one of ``SelfTuned(b=..., a=...)``,
        and loaded by position each hyperparameter took the other's raw value and scale, silently
        (the usual export of a trained network and its hyperparameters, ``hp.load_state_dict(saved)``,
        outside the method, whose own state checks the specs)."""
        codes = [int(self._centred), self._range_code(), *self._spec_codes()]
        return torch.tensor(codes, dtype=torch.int64)  # (int64, as step counters are)

    def _spec_codes(self) -> list[int]:
        return [zlib.crc32(f"{n}={_describe(s)}".encode()) for n, s in self.specs.items()]

    def _range_code(self) -> int:
        """A code of ``scale_range``, which fixes what ``raw_scale`` means (a state loaded under
        another one samples at another scale: 0.5 became 1.49 from (0.01, 1) to (0.01, 3)); 0
        for a fixed scale, which no tensor holds."""
        if not self.learn_scale:
            return 0
        return zlib.crc32(repr([float(v) for v in self.scale_range]).encode())

    def set_extra_state(self, state: Any) -> None:
        # (a 0-dim flag: saved before the specs' codes were kept)
        self._centred = bool(state.reshape(-1)[0]) if isinstance(state, Tensor) else bool(state)

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
        if isinstance(saved, Tensor) and saved.dim() == 1 and saved.numel() > 2:
            codes = saved.tolist()
            self._check_spec_codes(codes[2:])
            if codes[1] != self._range_code() and 0 in (codes[1], self._range_code()):
                learned = codes[1] != 0
                raise ValueError(
                    f"this state_dict was saved by a SelfTuned with learn_scale={learned}, here "
                    f"learn_scale={not learned}: its raw_scale would be "
                    f"{'ignored for a fixed scale' if learned else 'a learned scale it never had'}; "
                    f"build hg.hparams.SelfTuned with learn_scale={learned} as when it was saved"
                )
            if codes[1] != self._range_code():
                raise ValueError(
                    f"this state_dict was saved by a SelfTuned with another scale_range than here "
                    f"({tuple(self.scale_range)}), so its raw_scale would mean another perturbation "
                    f"scale; build hg.hparams.SelfTuned with the scale_range it was saved with"
                )
            saved = saved[0]
        by = getattr(self, "_centred_by", None)  # (a container pickled before it existed: None)
        if saved is not None and by is not None and bool(saved) != by:
            # (checked before anything is loaded: a refused load changes nothing)
            raise ValueError(
                f"this state was saved with {'centred' if bool(saved) else 'uncentred'} features "
                f"(SelfTuning(delta={bool(saved)})), but this SelfTuned is used by "
                f"SelfTuning(delta={by}): the layers would compute another function; "
                f"build SelfTuning with delta={bool(saved)}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if saved is None and key in missing_keys:  # (saved before the flag was: left as it is)
            missing_keys.remove(key)

    def _check_spec_codes(self, was: list[int]) -> None:
        """Refuse a state saved with other specs, or the same ones in another order (checked before
        anything is loaded: a refused load changes nothing)."""
        now = self._spec_codes()
        if was == now:
            return
        names = list(self.specs)
        if sorted(was) == sorted(now):
            by_code = dict(zip(now, names, strict=True))
            detail = f"the order of the specs: saved {[by_code[c] for c in was]}, here {names}"
        else:
            known = set(was)
            detail = f"{len(was)} specs saved, {len(now)} here; here but not saved: " + ", ".join(
                f"{n}={_describe(self.specs[n])}" for n, c in zip(names, now, strict=True) if c not in known
            )
        raise ValueError(
            f"this state_dict was saved with other hyperparameter specs, so its raw values would mean "
            f"something else here ({detail}); build hg.hparams.SelfTuned as when it was saved"
        )

    def _check_inits(self, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` naming a spec whose ``init`` ``dtype`` cannot hold: its raw value
        not finite (``Positive(1e39)`` in ``float32``), its value on the domain's edge or past it
        (``Positive(1e-8)`` is 0 in ``float16``: a penalty silently off, a zero derivative), or an
        ``Integer`` that comes back as another (``Integer(97, 0, 128)`` is 98 in ``bfloat16``)."""
        if self.raw.device.type == "meta":  # (a torch.device("meta") block: .item() failed in torch)
            from .hparams import _refuse_meta

            _refuse_meta(self.raw, "SelfTuned")
        with torch.no_grad():
            values = self.values_of(self.raw)
            for name, spec in self.specs.items():
                raw = self.raw[self.slices[name]]
                v = values[name].reshape(-1).double()
                if isinstance(spec, Rate):  # (its value is clamped inside: check before the clamp)
                    v = stretched_sigmoid(raw, spec.low, spec.high).double()
                    held = bool(((v > spec.low) & (v < spec.high)).all())
                elif isinstance(spec, Positive):
                    held = bool(((v > 0) & torch.isfinite(v)).all())
                else:
                    held = bool((v == spec.init).all())
                if held and bool(torch.isfinite(raw).all()):
                    continue
                wider = {torch.float64: "", torch.float32: "; use dtype=torch.float64"}.get(
                    dtype, "; use dtype=torch.float32 (or float64)"
                )
                raise ValueError(
                    f"SelfTuned: {name}={spec!r} cannot be held in {dtype}: its raw value "
                    f"{float(raw[0])!r} has the value {float(v[0])!r} there (the transform saturates, "
                    f"underflows or overflows){wider}"
                )

    @property
    def size(self) -> int:
        """:math:`H`, the number of unconstrained hyperparameters (what STN layers take)."""
        return sum(spec.size for spec in self.specs.values())

    @property
    def names(self) -> tuple[str, ...]:
        """The hyperparameters' names, in the order of their entries in ``raw``."""
        return tuple(self.specs)

    def scale(self) -> Tensor:
        r""":math:`\sigma`, shape :math:`(H,)`, in unconstrained units (differentiable w.r.t.
        ``raw_scale``; the constant ``scale`` when ``learn_scale=False``)."""
        if not self.learn_scale:
            return torch.full_like(self.raw, self._fixed_scale)
        lo, hi = self.scale_range
        return stretched_sigmoid(self.raw_scale, lo, hi)

    def entropy(self) -> Tensor:
        r"""Entropy of the perturbation :math:`N(0, \mathrm{diag}\,\sigma^2)` up to a constant:
        :math:`\sum_j \log \sigma_j` (0-dim, differentiable)."""
        return self.scale().log().sum()

    def values_of(self, raw: Tensor) -> dict[str, Tensor]:
        """Constrained values of unconstrained ``raw`` :math:`(..., H)`, by name, shaped
        :math:`(...)` for specs of size 1 and :math:`(..., k)` otherwise (``torch.long`` for
        :class:`Integer` specs; differentiable in ``raw`` for the others)."""
        out = {}
        for name, spec in self.specs.items():
            v = spec.value(raw[..., self.slices[name]])
            if isinstance(spec, Integer):
                v = v.long()
            out[name] = v[..., 0] if spec.size == 1 else v
        return out

    def current(self) -> dict[str, list[float]]:
        """The current values by name, as lists of floats (for logging)."""
        with torch.no_grad():
            return {k: v.reshape(-1).double().tolist() for k, v in self.values_of(self.raw).items()}

    def draw(self, batch_size: int) -> Draw:
        r"""Hyperparameters for a batch of ``batch_size`` examples (see :class:`Draw`).

        Outside a :class:`~hypergrad.SelfTuning` / :class:`~hypergrad.BestResponse` step: the
        current values, every row equal (a graph to ``raw`` is kept in the features, so
        ``model(x, hp)`` is differentiable in :math:`\lambda`; the values are detached, plain
        numbers for logging; nothing is cached). In a hyperstep (and in
        :func:`~hypergrad.selftuning_hypergradient`) the values are differentiable too, so a
        ``val_loss`` may read them directly. Inside a step, the same draw for every
        call with the same ``batch_size`` during that loss evaluation: in
        :meth:`SelfTuning.step <hypergrad.SelfTuning.step>` a fresh per-example perturbation
        :math:`\tilde\lambda_i = \lambda + \sigma\odot\epsilon_i` detached from :math:`\lambda`
        and :math:`\sigma`, in its hyperstep the same but differentiable w.r.t. both; in
        :meth:`BestResponse.step <hypergrad.BestResponse.step>` one perturbation for the whole
        loss evaluation (every row equal, and the same whatever ``batch_size``: the hypernetwork
        draws for one example, a penalty may draw for ``len(x)``), and in its hyperstep the
        current values. With
        ``SelfTuning(..., delta=True)`` the features are centred (see :class:`Draw`).

        Returns:
            A :class:`Draw`: ``features`` :math:`(B, H)`, values :math:`(B,)` or
            :math:`(B, k)` by name.

        Raises:
            ValueError: ``batch_size`` not an int >= 0 (a Python or NumPy integer, or a 0-dim
                integer tensor; 0 gives empty draws, as an empty batch gives ``nn.Linear``).

        Cost: :math:`O(BH)` (one ``randn`` when perturbing); no host synchronisation.
        """
        n = _count(batch_size)
        if n is None:
            raise ValueError(f"draw: batch_size must be an int >= 0, got {batch_size!r}")
        batch_size = n
        cached = self._cache.get(batch_size)
        if cached is not None:
            return cached
        if self._mode in (_Mode.VAL, _Mode.VAL_MEAN) and not torch.is_grad_enabled():
            # a hyperstep's draw is kept for every later call of its loss: one first made inside
            # a torch.no_grad() (or inference_mode) block of val_loss (an accuracy computed for
            # logging before the loss) had no graph to lambda and sigma, and every later call
            # got it (lambda's hypergradient exactly 0, sigma's the entropy term alone, silently)
            with torch.inference_mode(False), torch.enable_grad():
                return self.draw(batch_size)
        raw = self.raw
        mode = self._mode
        if mode in (_Mode.MEAN, _Mode.VAL_MEAN):
            lam = raw.expand(batch_size, -1)
            shared = True
        elif mode is _Mode.BASE:
            lam = raw.detach().expand(batch_size, -1)
            shared = True
        elif mode is _Mode.SHARED_TRAIN:
            # one lambda for the whole loss evaluation, whatever batch size each call asks for:
            # the hypernetwork draws for one example, a penalty may draw for len(x)
            one = self._shared_lam
            if one is None:
                eps = torch.randn(1, self.size, dtype=raw.dtype, device=raw.device)
                if self._prior is not None:
                    mean, std = self._prior  # (moved with the container: hp.to(device) after it was set)
                    one = mean.to(raw) + std.to(raw) * eps
                else:
                    one = raw.detach() + self.scale().detach() * eps
                self._shared_lam = one  # (1, H), whatever batch_size asked first (0 included)
            lam = one.expand(batch_size, -1)
            shared = True
        else:
            eps = torch.randn(batch_size, self.size, dtype=raw.dtype, device=raw.device)
            if getattr(self, "_draws", None) is not None:
                self._draws.append((batch_size, raw.dtype, raw.device))  # type: ignore[union-attr]
            if self._per_batch is not None:  # those entries: the first row's noise for every row
                eps = torch.where(self._per_batch.to(raw.device), eps[:1], eps)
            if mode in (_Mode.TRAIN, _Mode.LINEAR):
                lam = raw.detach() + self.scale().detach() * eps
            else:
                lam = raw + self.scale() * eps
            shared = False
        if self._centred:
            features = lam - (raw.detach() if self._centre is None else self._centre)
        else:
            features = lam
        # the values are differentiable where a hypergradient is taken (a val_loss may read them
        # directly, a penalty on the value); elsewhere detached, as the training modes draw them
        # (and a float() of a value outside a step is a plain number)
        values = self.values_of(lam if mode in (_Mode.VAL, _Mode.VAL_MEAN) else lam.detach())
        zero = mode is _Mode.BASE and self._centred and self._centre is None  # lam - lam, detached
        out = Draw(features, values, shared, linear=mode is _Mode.LINEAR and self._centred, zero=zero)
        if mode is not _Mode.MEAN:
            self._cache[batch_size] = out
        return out

    @contextlib.contextmanager
    def _drawing(self, mode: _Mode) -> Iterator[None]:
        """Within the block, :meth:`draw` perturbs as ``mode`` says (one draw per batch size)."""
        old, old_cache, old_shared = self._mode, self._cache, getattr(self, "_shared_lam", None)
        self._mode, self._cache, self._shared_lam = mode, {}, None
        try:
            yield
        finally:
            self._mode, self._cache, self._shared_lam = old, old_cache, old_shared

    def history(self) -> list[dict[str, float]]:
        r"""The schedule: one row per accepted hyperstep of :class:`~hypergrad.SelfTuning` /
        :class:`~hypergrad.BestResponse`, with ``inner_step``, ``hyper_step``, each value (``name``,
        or ``name.i`` for specs of size > 1, after the step) and its scale :math:`\sigma`
        (``sigma.name`` or ``sigma.name.i``), all as floats. A copy; saved by the method's
        ``state_dict()``."""
        return [dict(row) for row in self._history]

    def _record(self, inner_step: int, hyper_step: int) -> None:
        row: dict[str, float] = {"inner_step": float(inner_step), "hyper_step": float(hyper_step)}
        with torch.no_grad():
            sigma = self.scale()
            for name, v in self.current().items():
                sl = self.slices[name]
                s = sigma[sl].tolist()
                if len(v) == 1:
                    row[name], row[f"sigma.{name}"] = v[0], s[0]
                else:
                    for i, (vi, si) in enumerate(zip(v, s, strict=True)):
                        row[f"{name}.{i}"], row[f"sigma.{name}.{i}"] = vi, si
        self._history.append(row)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.specs.items())


def check_features(features: Any, n_hparams: int, batch: int, where: str, *, tangent: bool = True) -> Tensor:
    """The :math:`(B, H)` feature tensor of a draw, container or tensor, validated for a layer.
    Inside a linearised model call (Delta-STN's response step) the features of a linear draw,
    and a plain tensor of features (``draw.features`` passed on), come back as the tangent of a
    zero primal (``tangent=False``: a plain tensor as it is)."""
    if isinstance(features, SelfTuned):
        features = features.draw(batch)
    if (
        tangent
        and _THREAD.linearising > 0
        and isinstance(features, Tensor)
        and fwAD.unpack_dual(features).tangent is None
    ):
        # (d.features given instead of d: the same centred perturbation, linearised like it;
        # it was used as it is, the layer's output silently not linearised)
        features = Draw(features, {}, linear=True)
    if isinstance(features, Draw):
        linear = features.linear
        features = features.features
        if linear and _THREAD.linearising > 0:  # Delta-STN: the output's first order in the perturbation
            features = fwAD.make_dual(torch.zeros_like(features), features)
        elif linear and _in_backward():
            # activation checkpointing (torch.utils.checkpoint) runs the layer again in the
            # backward pass, after the linearised call has returned and its forward-mode
            # tangents are gone: the recomputation differs from the forward it replaces (a
            # CheckpointError "a different number of tensors was saved", after a warning that
            # blamed the loss)
            raise RuntimeError(
                f"SelfTuning(delta=True): {where} is being recomputed in the backward pass "
                f"(activation checkpointing, torch.utils.checkpoint), outside the model call "
                f"that Delta-STN linearises, so the recomputation cannot repeat the linearised "
                f"forward; pass linearize=False (checkpointing works there), or do not "
                f"checkpoint the STN layers"
            )
        elif linear:
            warnings.warn(
                f"{where} was called outside a call of the model given to SelfTuning(delta=True), "
                f"so its output is not linearised in the perturbation (Delta-STN linearises what "
                f"model(...) returns): call the model itself in the loss, or pass linearize=False",
                RuntimeWarning,
                stacklevel=3,
            )
    if not isinstance(features, Tensor):
        raise TypeError(
            f"{where}: the hyperparameters must be a hg.hparams.SelfTuned, a Draw from it, or a "
            f"tensor (B, {n_hparams}); got {type(features).__name__}"
        )
    if features.dim() == 1:
        if features.shape[0] != n_hparams:
            # (expanded to (B, length) first, it was refused as "features of shape (8, 8); build the
            # layer with n_hparams=hparams.size": the layer was right, the argument was one
            # hyperparameter's per-example values, layer(x, d["dropout"]), not the draw d)
            raise ValueError(
                f"{where}: got a 1-D tensor of {features.shape[0]} entries as the hyperparameters; "
                f"features are ({n_hparams},) for one lambda or (B, {n_hparams}) for each example. "
                f"A hyperparameter's values (d['name'], one per example) are not the features: "
                f"pass the draw d itself (or d.features), or the hparams container"
            )
        features = features.expand(batch, -1)
    if features.dim() != 2 or features.shape[1] != n_hparams:
        raise ValueError(
            f"{where} was built for n_hparams={n_hparams} hyperparameters but got features of shape "
            f"{tuple(features.shape)}; build the layer with n_hparams=hparams.size"
        )
    if features.shape[0] != batch:
        raise ValueError(
            f"{where}: {features.shape[0]} rows of hyperparameters for a batch of {batch} examples"
        )
    return features


def fixed_features(hparams: Any, n_hparams: int, where: str) -> Tensor:
    r"""The one feature vector :math:`(H,)` an STN layer's ``fixed`` is taken at, detached.

    A :class:`SelfTuned` gives what its layers are fed at the current :math:`\lambda`, unperturbed
    (``raw``, or zeros under ``SelfTuning(..., delta=True)``, whose features are centred); a
    :class:`Draw` whose rows are all one draw (``shared``) gives its row; a tensor must be
    :math:`(H,)` or :math:`(1, H)`. Draws no random numbers."""
    if isinstance(hparams, SelfTuned):
        with hparams._drawing(_Mode.MEAN):
            hparams = hparams.draw(1)
    if isinstance(hparams, Draw):
        if not hparams.shared and len(hparams) > 1:
            raise ValueError(
                f"{where}.fixed: this Draw holds one lambda per example ({len(hparams)} rows); pass "
                f"the hparams container (its current lambda) or one row, draw.features[i]"
            )
        hparams = hparams.features[:1]
    if not isinstance(hparams, Tensor):
        raise TypeError(
            f"{where}.fixed: need a hg.hparams.SelfTuned, a Draw or a tensor ({n_hparams},); got "
            f"{type(hparams).__name__}"
        )
    if hparams.dim() == 2 and hparams.shape[0] == 1:
        hparams = hparams[0]
    if hparams.shape != (n_hparams,):
        raise ValueError(
            f"{where}.fixed: need the features of one lambda, shape ({n_hparams},) (or (1, {n_hparams})); "
            f"got {tuple(hparams.shape)}"
        )
    return hparams.detach()


def linear_perturbation(hparams: Any, batch: int, n_hparams: int, where: str) -> Tensor | None:
    r"""The centred perturbation :math:`\Delta` ``(B, H)`` when an STN layer is being linearised
    (Delta-STN's response step, inside the model call), else ``None``: the layer may then compute
    its output's primal (:math:`\Delta = 0`) and tangent itself, without forward-mode AD."""
    if _THREAD.linearising == 0:
        return None
    if isinstance(hparams, SelfTuned):
        hparams = hparams.draw(batch)
    if isinstance(hparams, Tensor) and fwAD.unpack_dual(hparams).tangent is None:
        # the features of the step's draw passed as a plain tensor (``layer(x, d.features)``):
        # the centred perturbation too (it was used as it is: that layer's output silently not
        # linearised, a response off by 0.04 after one step)
        return check_features(hparams, n_hparams, batch, where, tangent=False)
    if not (isinstance(hparams, Draw) and hparams.linear):
        return None
    return check_features(hparams.features, n_hparams, batch, where, tangent=False)


def _in_backward() -> bool:
    """Whether this runs inside an autograd backward pass (e.g. a checkpointed recomputation)."""
    node = getattr(torch._C, "_current_autograd_node", None)
    return node is not None and node() is not None


@contextlib.contextmanager
def validating() -> Iterator[None]:
    """Within the block (a hyperstep's validation pass, the model in eval mode), the ``hg.nn``
    augmentations refuse to run with ``training=True``."""
    _THREAD.validating += 1
    try:
        yield
    finally:
        _THREAD.validating -= 1


def refuse_in_validation(what: str) -> None:
    """Raise if an ``hg.nn`` augmentation runs with ``training=True`` inside a validation pass:
    the model is in eval mode there, so that lambda reaches the validation loss through the best
    response only; a helper called without ``training=self.training`` (its default is True) made
    every hyperstep's validation loss a random draw at the perturbed strengths, silently."""
    if _THREAD.validating > 0:
        raise ValueError(
            f"hg.nn.{what} ran with training=True in the validation step of SelfTuning / "
            f"BestResponse, which runs the model in eval mode (no dropout, no augmentation): "
            f"pass training=self.training (the default is True)"
        )


@contextlib.contextmanager
def linearising() -> Iterator[None]:
    """Within the block (inside a forward-mode dual level), STN layers fed a :class:`Draw` with
    ``linear=True`` see its features as the tangent of a zero primal."""
    _THREAD.linearising += 1
    try:
        yield
    finally:
        _THREAD.linearising -= 1


def _describe(spec: _Spec) -> str:
    """What fixes the meaning of a spec's raw entries (its type, size and bounds; not ``init``)."""
    args = []
    for f in dataclasses.fields(spec):
        if f.name == "per_batch" and not spec.per_batch:
            continue  # (states saved before the option existed describe their specs without it)
        if f.name != "init":
            v = getattr(spec, f.name)
            args.append(f"{f.name}={(v.value if isinstance(v, enum.Enum) else v)!r}")
    return f"{type(spec).__name__}({', '.join(args)})"


def _config(hp: SelfTuned) -> dict[str, Any]:
    """How ``raw`` and ``raw_scale`` are read: a state is meaningful only under the same one.
    A fixed scale (``learn_scale=False``) is configuration, not state: it is in no tensor, so a
    checkpoint loaded under another one would go on sampling at another scale."""
    out: dict[str, Any] = {
        "specs": {name: _describe(spec) for name, spec in hp.specs.items()},
        "scale_range": [float(v) for v in hp.scale_range],
        "learn_scale": hp.learn_scale,
    }
    if not hp.learn_scale:
        out["scale"] = float(hp._fixed_scale)
    return out


def _state(hp: SelfTuned) -> dict[str, Any]:
    return {"history": [dict(r) for r in hp._history], "config": _config(hp)}


def _load_state(hp: SelfTuned, state: dict[str, Any]) -> None:
    check_config(hp, state)
    hp._history = [dict(r) for r in state.get("history", [])]


def check_config(hp: SelfTuned, state: dict[str, Any]) -> None:
    """Refuse a method state saved with another configuration of ``hp`` (specs, their order, the
    scale's range or fixed value), naming what differs."""
    saved, mine = state.get("config"), _config(hp)
    if saved is not None and "scale" not in saved:  # (saved before the fixed scale was recorded)
        mine.pop("scale", None)
    # the specs' order too: it is the order of the entries of raw (and of the layers' feature
    # columns), and dicts compare equal in any order, so SelfTuned(a=..., b=...) loaded a state of
    # SelfTuned(b=..., a=...) silently, each hyperparameter taking the other's value
    order = None if saved is None else list(saved.get("specs", mine["specs"]))
    if saved is not None and (saved != mine or order != list(mine["specs"])):
        diff = [k for k in mine if saved.get(k) != mine[k]]
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, here {mine[k]!r}" for k in diff)
        if not diff:
            detail = f"the order of the specs: saved {order}, here {list(mine['specs'])}"
        raise ValueError(
            f"this state_dict was saved with other hyperparameter specs, so its raw values would mean "
            f"something else here ({detail}); build hg.hparams.SelfTuned as when it was saved"
        )
