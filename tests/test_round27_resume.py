"""Round 27: saving and resuming, as a researcher's checkpointing code does it.

Earlier rounds made ``hopt.state_dict()`` / ``hopt.load_state_dict`` exact for every family
(mid-window, mid-phase, other seeds, ``weights_only=True``, copies, other orders); this round
found them exact again on every combination tried (chains of resumes after every action, for
every family; cross-loading ``checkpoint`` / ``mode`` configurations of ``Unrolled``; fused and
manual outer steps; episodes). What was left is the containers' *own* ``state_dict``, the usual
export of a trained network's hyperparameters outside the method (``hp.load_state_dict(saved)``
into containers rebuilt for evaluation or retraining, which ``test_round20_stn_marglik`` calls
supported): their raw entries are held by position, and a container built with its entries in
another order loaded a state silently, each hyperparameter taking another's value.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

DT = torch.float64


def _through_file(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _refused_or_same(target: nn.Module, saved: dict[str, Any], by_name: Any, want: dict[str, Any]) -> None:
    """Either ``target.load_state_dict(saved)`` is refused with a ``ValueError`` that changes
    nothing, or the loaded container gives every hyperparameter, by name, its saved value."""
    before = copy.deepcopy(target.state_dict())
    try:
        target.load_state_dict(saved)
    except ValueError as error:
        assert "order" in str(error) or "other" in str(error), error
        after = target.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        return
    got = by_name(target)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0, msg=k)


# ----------------------------------------------------------------------------- SelfTuned's specs


def _specs(kinds: str) -> dict[str, Any]:
    made = {
        "R": lambda: hg.hparams.Rate(0.2, high=0.9),
        "P": lambda: hg.hparams.Positive(0.1),
    }
    return {name: made[k]() for name, k in zip(("dropout", "noise"), kinds, strict=True)}


def _stn_values(hp: hg.hparams.SelfTuned) -> dict[str, torch.Tensor]:
    sigma = hp.scale().detach()
    out = {n: torch.tensor(v, dtype=DT) for n, v in hp.current().items()}
    out.update({f"sigma.{n}": sigma[hp.slices[n]].clone() for n in hp.specs})
    return out


@pytest.mark.parametrize("case", ["specs-in-another-order", "specs-of-other-kinds", "another-scale-range"])
def test_a_selftuned_state_loads_by_spec_or_is_refused(case: str) -> None:
    """A trained ``SelfTuned(dropout=Rate, noise=Positive)`` exported with ``hp.state_dict()``
    and loaded (``weights_only=True``) into one built as ``SelfTuned(noise=..., dropout=...)``
    (a config dict iterated in another order): "All keys matched successfully", and dropout came
    back 0.117 where it was 0.299 (noise 0.403, not 0.139), silently; into one with the kinds
    swapped under the same names, the raw values were read on other domains (dropout 0.403); under
    another ``scale_range``, ``raw_scale`` meant other perturbation scales. The layers' feature
    columns follow the saved order, so the load must be refused (the method's own
    ``load_state_dict`` refuses all three, naming what differs; the container's did not)."""
    torch.manual_seed(0)
    saved_hp = hg.hparams.SelfTuned(**_specs("RP"), dtype=DT)
    with torch.no_grad():  # a trained state: distinct values and scales
        saved_hp.raw.copy_(torch.tensor([-0.7, -1.9], dtype=DT))
        saved_hp.raw_scale.copy_(torch.tensor([-1.0, -2.5], dtype=DT))
    want = _stn_values(saved_hp)
    saved = _through_file(saved_hp.state_dict())
    if case == "specs-in-another-order":
        specs = _specs("RP")
        target = hg.hparams.SelfTuned(noise=specs["noise"], dropout=specs["dropout"], dtype=DT)
    elif case == "specs-of-other-kinds":
        target = hg.hparams.SelfTuned(**_specs("PR"), dtype=DT)
    else:  # raw_scale read on (0.01, 1) instead of (0.01, 3): sigma 0.81 / 0.24 became 0.28 / 0.09
        target = hg.hparams.SelfTuned(**_specs("RP"), scale_range=(0.01, 1.0), dtype=DT)
    _refused_or_same(target, saved, _stn_values, want)
    if case == "specs-of-other-kinds":  # (a refusal is the only right answer: other domains)
        with pytest.raises(ValueError):
            hg.hparams.SelfTuned(**_specs("PR"), dtype=DT).load_state_dict(saved)


def test_a_selftuned_state_in_the_same_order_and_an_old_flag_only_state_load() -> None:
    """The controls (pass before the fix): the same specs load exactly, and a state whose
    ``_extra_state`` is the centred flag alone (a 0-dim tensor, as saved before) loads too and
    keeps the flag."""
    saved_hp = hg.hparams.SelfTuned(**_specs("RP"), dtype=DT)
    with torch.no_grad():
        saved_hp.raw.copy_(torch.tensor([-0.7, -1.9], dtype=DT))
    state = _through_file(saved_hp.state_dict())
    same = hg.hparams.SelfTuned(**_specs("RP"), dtype=DT)
    same.load_state_dict(state)
    assert same.current() == saved_hp.current()
    old = dict(state)
    old["_extra_state"] = torch.tensor(1)  # a Delta-STN's flag, saved before the specs' codes were
    flagged = hg.hparams.SelfTuned(**_specs("RP"), dtype=DT)
    flagged.load_state_dict(old)
    assert flagged.current() == saved_hp.current() and flagged._centred


# ----------------------------------------------------------------------------- WeightDecay's layout


class _TwoLayers(nn.Module):
    """Two layers of one shape registered in the given order (a refactored ``__init__``)."""

    a: nn.Linear
    b: nn.Linear

    def __init__(self, order: str) -> None:
        super().__init__()
        made = {"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)}
        for name in order:
            setattr(self, name, made[name])
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _decays(wd: hg.hparams.WeightDecay) -> dict[str, torch.Tensor]:
    return wd.decays()


@pytest.mark.parametrize("per", ["layer", "parameter"])
def test_a_weight_decay_state_loads_by_parameter_name_or_is_refused(per: str) -> None:
    """Learned decays exported with ``hp.state_dict()`` and loaded into a ``WeightDecay`` over the
    same model with its layers registered ``b`` before ``a``: the keys (``raw.0`` ...) and the
    shapes agree, so it loaded silently, ``a`` decayed 20x more than it learned (e^1 instead of
    e^-2 per weight, the other layer's). ``hopt.load_state_dict`` refuses the same state
    (``hparams_meaning`` lists the names in order); the container's own load did not."""
    wd = hg.hparams.WeightDecay(_TwoLayers("ab"), per=per, init=1e-2)
    with torch.no_grad():
        for i, r in enumerate(wd.raw):
            r.copy_(torch.full_like(r, -2.0 + 3.0 * (i >= len(wd.raw) // 2)))  # a: e^-2, b: e^1
    want = _decays(wd)
    assert float(want["a.weight"].max()) < 0.2 and float(want["b.weight"].min()) > 2.0  # the premise
    saved = _through_file(wd.state_dict())
    _refused_or_same(hg.hparams.WeightDecay(_TwoLayers("ba"), per=per, init=1e-2), saved, _decays, want)


def test_a_weight_decay_state_in_the_same_order_or_global_or_without_a_layout_loads() -> None:
    """The controls (pass before the fix): the same order loads exactly; a global decay (one
    entry, no position to get wrong) loads into a model in another order; a state without a
    ``_extra_state`` entry (saved before one was kept) loads."""
    for per, order in (("layer", "ab"), ("parameter", "ab"), ("global", "ba")):
        wd = hg.hparams.WeightDecay(_TwoLayers("ab"), per=per, init=1e-2)
        with torch.no_grad():
            for i, r in enumerate(wd.raw):
                r.fill_(-1.0 - i)
        state = _through_file(wd.state_dict())
        for sd in (state, {k: v for k, v in state.items() if not k.endswith("_extra_state")}):
            target = hg.hparams.WeightDecay(_TwoLayers(order), per=per, init=1e-2)
            target.load_state_dict(sd)
            got, want = target.decays(), wd.decays()
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), (per, order)


# ----------------------------------------------------------------------------- a resume after every action


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)


def _ce(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _penalised(m: nn.Module, h: Any, b: Any) -> torch.Tensor:
    return _ce(m, h, b) + h["wd"].penalty(m)


def _unrolled_meta_batch(seed: int) -> hg.Unrolled:
    """Dropout, a learned learning rate and decay, K = 3 with an outer step every 2 inner steps
    (the windows overlap, so records span a hyperparameter change)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3)).to(DT)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hp = nn.ModuleDict(
        {
            "wd": hg.hparams.WeightDecay(model, per="layer", init=1e-2),
            "lr": hg.hparams.LearningRate(inner, dtype=DT),
        }
    )
    return hg.Unrolled(
        model, hp, _penalised, _ce, inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), steps=3,
    )  # fmt: skip


def _meta_batch_action(hopt: hg.Unrolled, t: int) -> tuple[Any, ...]:
    """An inner step, or every third action the README's meta-batch: two tasks' hypergradients
    (``hopt.hypergradient``, which commits nothing) summed into ``.grad`` and the user's own
    ``outer_optimizer.step()``."""
    if t % 3 == 2:
        (g1, i1), (g2, i2) = (hopt.hypergradient(val_batch=_data(90 + k)) for k in range(2))
        hopt.outer_optimizer.zero_grad()
        for p, a, b in zip(hopt.hparams.parameters(), g1, g2, strict=True):
            p.grad = a + b
        hopt.outer_optimizer.step()
        return ("meta", i1.outer_loss, i1.hypergrad_norm, i2.hypergrad_norm, i1.unrolled_steps)
    return ("step", float(hopt.step(_data(t))))


def test_a_run_resumed_after_every_action_repeats_the_straight_one() -> None:
    """New coverage (passes): earlier rounds resume once; here the meta-batch loop (user-made
    outer steps between overlapping windows, dropout) is saved after *every* action,
    through ``torch.save`` / ``weights_only=True``, and continued by objects built from another
    seed, eleven resumes in a row: what only a load sets (the records' anchors, "the
    hyperparameters moved" flags) must match what the straight run kept, or the chain drifts.
    Every loss and hypergradient, and the final state, equal the uninterrupted run's."""
    straight = _unrolled_meta_batch(0)
    log = [_meta_batch_action(straight, t) for t in range(11)]
    end = copy.deepcopy(straight.state_dict())
    assert sum(r[0] == "meta" for r in log) == 3 and {r[4] for r in log if r[0] == "meta"} == {2, 3}

    hopt = _unrolled_meta_batch(0)
    out = []
    for t in range(11):
        out.append(_meta_batch_action(hopt, t))
        saved = _through_file(hopt.state_dict())
        hopt = _unrolled_meta_batch(100 + t)
        hopt.load_state_dict(saved)
    assert out == log
    got = hopt.state_dict()
    for part in ("model", "hparams"):
        assert all(torch.equal(end[part][k], got[part][k]) for k in end[part]), part
    for part in ("inner_optimizer", "outer_optimizer"):
        for i, s in end[part]["state"].items():
            assert all(torch.equal(v, got[part]["state"][i][k]) for k, v in s.items()), part
        assert end[part]["param_groups"] == got[part]["param_groups"], part
