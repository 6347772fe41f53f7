"""The reproduction experiments behind ``hypergrad run`` (one module per experiment).

Each module registers its experiment in :data:`REGISTRY` when imported; :func:`load_all`
imports them all. They use hypergrad's public API only, like any user's script.

>>> from hypergrad.experiments import REGISTRY, load_all
>>> load_all()
>>> "accuracy" in REGISTRY
True
"""

from __future__ import annotations

import importlib

from .common import REGISTRY, Context, Experiment, Outcome

__all__ = ["REGISTRY", "Context", "Experiment", "Outcome", "load_all", "MODULES"]

#: the experiment modules, in the issue's order
MODULES = (
    "accuracy",
    "overfit_val",
    "distill",
    "hyperclean",
    "augment",
    "logreg_cv",
    "hd",
    "lstm_lm",
    "baselines",
    "stn_ridge",
    "stn_mnist1d",
    "marglik_precision",
    "marglik_invariance",
)


def load_all() -> None:
    """Import every experiment module (each registers itself)."""
    for m in MODULES:
        importlib.import_module(f"{__name__}.{m}")
