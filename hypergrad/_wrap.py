"""Looking through the wrappers a user's model may come in."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile(module)`` returns."""
    inner = getattr(model, "_orig_mod", None)
    return type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module)


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module it wraps through ``DistributedDataParallel`` /
    ``DataParallel`` / ``torch.compile`` (in any order), the bare module last."""
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = getattr(model, "_orig_mod")  # noqa: B009 - (typed Module | Tensor otherwise)
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under any wrappers (see :func:`wrappers`): the one whose parameter names the
    hyperparameters use, and on which hypergradients run (compiled graphs have no double
    backward; a data-parallel wrapper's reducer is not used by ``torch.autograd.grad``)."""
    *_, bare = wrappers(model)
    return bare
