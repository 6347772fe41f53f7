r"""Hyperparameter containers: ``nn.Module``\ s whose parameters are the raw hyperparameters.

Each container stores unconstrained *raw* tensors (the ``nn.Parameter``\ s the outer optimiser
moves) and maps them onto their domain, so no outer step can leave it:

=============  ==================================  ========================
constraint     value                               domain
=============  ==================================  ========================
``positive``   :math:`e^{r}`                       :math:`(0, \infty)`
``unit``       :math:`\sigma(r) = 1/(1+e^{-r})`    :math:`(0, 1)`
``real``       :math:`r`                           :math:`\mathbb{R}`
=============  ==================================  ========================

Use them inside the losses given to a :class:`~hypergrad.HyperOptimizer`, e.g.
``ce(model(x), y) + hp.penalty(model)``. Initial values outside the domain raise ``ValueError``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Constraint",
    "Hparam",
    "WeightDecay",
    "ExampleWeights",
    "OptimizerSetting",
    "LearningRate",
    "Momentum",
]


class Constraint(str, enum.Enum):
    """How a raw tensor maps to a hyperparameter's value (see the module docstring)."""

    POSITIVE = "positive"
    UNIT = "unit"
    REAL = "real"


def _check_domain(value: Tensor, constraint: Constraint, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} must be finite, got {value.tolist() if value.numel() < 8 else value}")
    if constraint is Constraint.POSITIVE and not bool((value > 0).all()):
        raise ValueError(f"{what} must be > 0 (positive constraint), got min {float(value.min())}")
    if constraint is Constraint.UNIT and not bool(((value > 0) & (value < 1)).all()):
        raise ValueError(
            f"{what} must lie in (0, 1) (unit constraint), got range "
            f"[{float(value.min())}, {float(value.max())}]"
        )


def to_raw(value: Tensor, constraint: Constraint | str) -> Tensor:
    """Inverse of :func:`from_raw`: the raw tensor whose constrained value is ``value``."""
    c = Constraint(constraint)
    if c is Constraint.POSITIVE:
        return value.log()
    if c is Constraint.UNIT:
        return torch.logit(value)
    return value.clone()


def from_raw(raw: Tensor, constraint: Constraint | str) -> Tensor:
    """Map a raw tensor onto the constraint's domain (differentiable, elementwise)."""
    c = Constraint(constraint)
    if c is Constraint.POSITIVE:
        return raw.exp()
    if c is Constraint.UNIT:
        return torch.sigmoid(raw)
    return raw


def _as_tensor(init: float | Tensor, shape: Sequence[int] | None, dtype: torch.dtype | None) -> Tensor:
    t = torch.as_tensor(init, dtype=dtype if dtype is not None else torch.get_default_dtype())
    if shape is not None:
        t = t.expand(tuple(shape)).clone()
    return t.detach().clone()


class Hparam(nn.Module):
    r"""A tensor of hyperparameters with a constraint.

    Args:
        init: initial value(s), inside the constraint's domain.
        constraint: ``"positive"``, ``"unit"`` or ``"real"`` (default: ``"positive"``).
        shape: broadcast ``init`` to this shape (default: ``init``'s shape).
        dtype: (default: torch's default dtype).

    Shapes: ``raw`` and ``value`` have ``shape``.

    >>> import hypergrad as hg
    >>> h = hg.hparams.Hparam(0.1, "positive", shape=(3,))
    >>> [round(v, 3) for v in h().tolist()]
    [0.1, 0.1, 0.1]
    """

    def __init__(
        self,
        init: float | Tensor,
        constraint: Constraint | str = Constraint.POSITIVE,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.constraint = Constraint(constraint)
        value = _as_tensor(init, shape, dtype)
        _check_domain(value, self.constraint, "Hparam init")
        self.raw = nn.Parameter(to_raw(value, self.constraint))

    def forward(self) -> Tensor:
        """The constrained value, shaped like ``raw``."""
        return from_raw(self.raw, self.constraint)

    @property
    def value(self) -> Tensor:
        return self()


class WeightDecay(nn.Module):
    r"""L2 penalties on a model's weights: one global, one per layer, or one per weight.

    The penalty is :math:`\tfrac12 \sum_k d_k \odot w_k^2` with positive decays :math:`d_k = e^{r_k}`
    (the same scale as ``torch.optim.SGD(weight_decay=d)``, which adds :math:`d\,w` to the gradient).

    Args:
        model: the model whose parameters are penalised (names are taken from it).
        per: ``"global"`` (1 hyperparameter), ``"layer"`` (one per module that owns parameters) or
            ``"parameter"`` (one per weight entry: as many hyperparameters as weights)
            (default: ``"parameter"``).
        init: initial decay, > 0 (default: 1e-4).
        include: which parameter names to penalise, e.g. ``lambda n: not n.endswith("bias")``
            (default: all that require grad).

    >>> import torch, hypergrad as hg
    >>> model = torch.nn.Linear(3, 2)
    >>> hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    >>> hp.penalty(model).shape, sum(p.numel() for p in hp.parameters())
    (torch.Size([]), 1)
    """

    def __init__(
        self,
        model: nn.Module,
        per: str = "parameter",
        init: float = 1e-4,
        *,
        include: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__()
        if per not in ("global", "layer", "parameter"):
            raise ValueError(f"Invalid per: {per!r} (choose 'global', 'layer' or 'parameter')")
        if not (isinstance(init, (int, float)) and math.isfinite(init) and init > 0):
            raise ValueError(f"Invalid weight decay init: {init!r} (need a finite value > 0)")
        self.per = per
        names = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and (include is None or include(n))
        ]
        if not names:
            raise ValueError("WeightDecay: the model has no parameters to penalise")
        params = dict(model.named_parameters())
        self.names: tuple[str, ...] = tuple(names)
        self.raw = nn.ParameterList()
        self._index: dict[str, int] = {}
        log0 = math.log(init)
        if per == "global":
            self.raw.append(
                nn.Parameter(
                    torch.full((), log0, dtype=params[names[0]].dtype, device=params[names[0]].device)
                )
            )
            self._index = {n: 0 for n in names}
        elif per == "layer":
            layers: dict[str, int] = {}
            for n in names:
                layer = n.rsplit(".", 1)[0] if "." in n else ""
                if layer not in layers:
                    layers[layer] = len(layers)
                    p = params[n]
                    self.raw.append(nn.Parameter(torch.full((), log0, dtype=p.dtype, device=p.device)))
                self._index[n] = layers[layer]
            self.layers: tuple[str, ...] = tuple(layers)
        else:
            for i, n in enumerate(names):
                p = params[n]
                self.raw.append(nn.Parameter(torch.full(p.shape, log0, dtype=p.dtype, device=p.device)))
                self._index[n] = i

    def decays(self) -> dict[str, Tensor]:
        """Decay per penalised parameter name (scalars, or shaped like the parameter), detached:
        for inspection and logging (the penalty reads the raw tensors itself)."""
        with torch.no_grad():
            return {n: self.raw[self._index[n]].exp() for n in self.names}

    def penalty(self, model: nn.Module) -> Tensor:
        r""":math:`\tfrac12\sum_k d_k \odot w_k^2` over the penalised parameters of ``model``.

        Pass the ``model`` your loss receives, so substituted weights are the ones penalised.
        """
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"WeightDecay.penalty: the model has no parameter(s) {missing[:3]}")
        terms = [(self.raw[self._index[n]].exp() * params[n].square()).sum() for n in self.names]
        return 0.5 * torch.stack(terms).sum()

    def extra_repr(self) -> str:
        return f"per={self.per!r}, count={sum(p.numel() for p in self.parameters())}"


class ExampleWeights(nn.Module):
    r"""One weight in (0, 1) per training example (data re-weighting / hyper-cleaning).

    Args:
        n: number of training examples.
        init: initial weight, in (0, 1) (default: 0.5).

    Shapes: ``forward(index)`` takes integer indices of shape ``(B,)`` and returns ``(B,)`` weights;
    use them as ``(w * per_example_loss).mean()``.

    >>> import torch, hypergrad as hg
    >>> ew = hg.hparams.ExampleWeights(10, init=0.9)
    >>> ew(torch.tensor([0, 3])).shape
    torch.Size([2])
    """

    def __init__(self, n: int, init: float = 0.5, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"Invalid number of examples: {n!r}")
        value = _as_tensor(init, (n,), dtype)
        _check_domain(value, Constraint.UNIT, "ExampleWeights init")
        self.raw = nn.Parameter(torch.logit(value))

    def forward(self, index: Tensor) -> Tensor:
        if index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"ExampleWeights takes integer example indices, got dtype {index.dtype}")
        return torch.sigmoid(self.raw[index])

    @property
    def value(self) -> Tensor:
        return torch.sigmoid(self.raw)


class OptimizerSetting(nn.Module):
    r"""A setting of the inner optimiser (one value per parameter group) made a hyperparameter.

    Before every inner step the :class:`~hypergrad.HyperOptimizer` writes the current values into
    ``optimizer.param_groups[g][name]``; :class:`~hypergrad.Unrolled` differentiates through them.
    (``Implicit`` cannot: the inner optimum does not depend on how it is reached.)

    Args:
        optimizer: the inner ``torch.optim`` optimiser.
        name: the ``param_groups`` key, e.g. ``"lr"`` or ``"momentum"``.
        constraint: the value's domain.
        init: initial value for every group (default: the optimiser's current values).

    Shapes: ``raw`` and ``value`` are ``(len(optimizer.param_groups),)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        constraint: Constraint | str,
        init: float | None = None,
    ) -> None:
        super().__init__()
        groups = optimizer.param_groups
        if name not in groups[0]:
            raise ValueError(f"{type(optimizer).__name__} has no setting {name!r} to tune")
        self.name = name
        self.constraint = Constraint(constraint)
        if init is None:
            vals = [float(g[name]) for g in groups]
        else:
            vals = [float(init)] * len(groups)
        dtype = groups[0]["params"][0].dtype
        value = torch.tensor(vals, dtype=dtype if dtype.is_floating_point else None)
        _check_domain(value, self.constraint, f"{name} init")
        self.raw = nn.Parameter(to_raw(value, self.constraint).to(groups[0]["params"][0].device))
        self.optimizer = [optimizer]  # a list, so the optimiser is not treated as a submodule

    def forward(self) -> Tensor:
        """The values, one per parameter group: shape ``(n_groups,)``."""
        return from_raw(self.raw, self.constraint)

    @property
    def value(self) -> Tensor:
        return self()

    def write(self) -> None:
        """Copy the current values into the optimiser's ``param_groups`` (as Python floats)."""
        for g, v in zip(self.optimizer[0].param_groups, self().detach().tolist(), strict=True):
            g[self.name] = v


class LearningRate(OptimizerSetting):
    """The inner optimiser's learning rate, one per parameter group, kept positive.

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> [round(v, 6) for v in hg.hparams.LearningRate(opt).value.tolist()]
    [0.1]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, init: float | None = None) -> None:
        super().__init__(optimizer, "lr", Constraint.POSITIVE, init)


class Momentum(OptimizerSetting):
    """SGD's momentum, one per parameter group, kept in (0, 1).

    >>> import torch, hypergrad as hg
    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
    >>> [round(v, 6) for v in hg.hparams.Momentum(opt).value.tolist()]
    [0.9]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, init: float | None = None) -> None:
        super().__init__(optimizer, "momentum", Constraint.UNIT, init)
