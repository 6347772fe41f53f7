"""Type aliases shared across hypergrad."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

#: A tuple of tensors, one per model parameter (or hyperparameter), in a fixed order.
Tensors = tuple[Tensor, ...]
#: A batch, passed through to the user's loss untouched (tensor, tuple, dict, ...).
Batch = Any
#: ``loss(model, hparams, batch) -> scalar Tensor``.
LossFn = Callable[[nn.Module, nn.Module, Batch], Tensor]
#: A Hessian-vector product: ``hvp(v) -> H v`` on tuples of tensors shaped like the parameters.
HVP = Callable[[Sequence[Tensor]], Tensors]
