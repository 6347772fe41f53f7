"""Round 27, the maintainer's own part: smaller mends found while reviewing the helpers' reports.

* SelfTuned's perturbation scale frozen by hand (``hp.raw_scale.requires_grad_(False)``) was
  refused with advice about pretrained encoders inside augmentation networks; the message now
  names the supported way, ``SelfTuned(..., learn_scale=False, scale=...)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergrad as hg


def test_a_frozen_selftuned_scale_is_refused_with_the_learn_scale_advice() -> None:
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.1, high=0.9))
    model = nn.Sequential(hg.nn.StnLinear(4, 4, n_hparams=hp.size))
    hp.raw_scale.requires_grad_(False)
    with pytest.raises(ValueError, match=r"raw_scale.*learn_scale=False"):
        hg.SelfTuning(
            model,
            hp,
            lambda m, h, b: m(b).sum(),
            lambda m, h, b: m(b).sum(),
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam([hp.raw], lr=0.1),
        )
    # the supported way builds
    fixed = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.1, high=0.9), learn_scale=False, scale=0.5)
    model = nn.Sequential(hg.nn.StnLinear(4, 4, n_hparams=fixed.size))
    hopt = hg.SelfTuning(
        model,
        fixed,
        lambda m, h, b: m(b).sum(),
        lambda m, h, b: m(b).sum(),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(fixed.parameters(), lr=0.1),
    )
    assert isinstance(hopt, hg.SelfTuning)
