"""hypergrad: learn hyperparameters by gradient descent, inside the training loop.

>>> import hypergrad as hg
>>> sorted(n for n in hg.__all__ if n[0].isupper())[:3]
['BestResponse', 'CG', 'Direct']
"""

from __future__ import annotations

from . import data as data
from . import hparams as hparams
from . import log as log
from . import nn as nn
from . import optim as optim
from ._base import DisconnectedWarning as DisconnectedWarning
from ._base import HyperOptimizer as HyperOptimizer
from ._base import HyperStepInfo as HyperStepInfo
from ._base import NonFiniteError as NonFiniteError
from ._base import NonFiniteWarning as NonFiniteWarning
from ._implicit import Implicit as Implicit
from ._implicit import implicit_hypergradient as implicit_hypergradient
from ._marglik import MarginalLikelihood as MarginalLikelihood
from ._marglik import log_evidence as log_evidence
from ._marglik import log_evidence_bound as log_evidence_bound
from ._selftuning import BestResponse as BestResponse
from ._selftuning import SelfTuning as SelfTuning
from ._selftuning import selftuning_hypergradient as selftuning_hypergradient
from ._solvers import CG as CG
from ._solvers import Direct as Direct
from ._solvers import Identity as Identity
from ._solvers import LinearSolver as LinearSolver
from ._solvers import Neumann as Neumann
from ._solvers import SolveResult as SolveResult
from ._solvers import SolveStatus as SolveStatus
from ._unrolled import ReplayWarning as ReplayWarning
from ._unrolled import Unrolled as Unrolled
from ._unrolled import unrolled_hypergradient as unrolled_hypergradient

__version__ = "0.2.0.dev0"

__all__ = [
    "BestResponse",
    "CG",
    "Direct",
    "DisconnectedWarning",
    "HyperOptimizer",
    "HyperStepInfo",
    "Identity",
    "Implicit",
    "LinearSolver",
    "MarginalLikelihood",
    "Neumann",
    "NonFiniteError",
    "NonFiniteWarning",
    "ReplayWarning",
    "SelfTuning",
    "SolveResult",
    "SolveStatus",
    "Unrolled",
    "data",
    "hparams",
    "log",
    "implicit_hypergradient",
    "log_evidence",
    "log_evidence_bound",
    "nn",
    "optim",
    "selftuning_hypergradient",
    "unrolled_hypergradient",
]
