"""Looking through the wrappers a user's model may come in."""

from __future__ import annotations

from torch import nn


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile(module)`` returns."""
    inner = getattr(model, "_orig_mod", None)
    return type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module)


def compiled_inner(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs."""
    inner = model._orig_mod
    assert isinstance(inner, nn.Module)
    return inner


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under any ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrappers (in any order): the one whose parameter names the hyperparameters use."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif is_compiled(model):
            model = compiled_inner(model)
        else:
            return model
