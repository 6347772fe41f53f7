"""Round 26 (data): hg.data.WithIndex over torch's dataset plumbing, and ExampleWeights fed by it.

Bugs these tests found (fixed in round 26):

* ``WithIndex(a) + WithIndex(b)`` (torch's ``Dataset.__add__``, inherited) is a ``ConcatDataset``
  of the two wrappers, so ``b``'s examples carried the indices ``0, 1, ...`` of ``a``'s: with
  ``ExampleWeights(len(a) + len(b))`` every example of ``b`` read (and trained) the weight of
  another example, silently (no index ever reaches ``len(a) + len(b)``, so nothing is refused).
  ``WithIndex(a) + b`` gave items of two lengths, which the collate refused far from the cause.
* ``WithIndex(TensorDataset(x, y))[:]`` (a whole dataset as one batch, for a full-batch
  ``Implicit``) appended the ``slice`` object itself as the index, which ``ExampleWeights``
  refused ("got slice"); ``ds[-1]`` appended ``-1``, refused as a negative index although the
  example is the last one.
* ``hypergrad run hyperclean --set n_train=10 --set corrupt=0.96`` was accepted (``corrupt=1.0`` is
  refused), but rounds to every training label corrupted: the "oracle (clean examples only)"
  trained on no example and the clean examples' mean weight was NaN.

Passing tests, new (no earlier test used ``Subset``, ``random_split``, ``ConcatDataset`` or a
sampler with replacement): Unrolled through a ``DataLoader`` over ``WithIndex(Subset(...))``
with a ``WeightedRandomSampler`` (repeated examples in one batch) and ``drop_last`` against a
hand-written unroll; Implicit (``Direct``) over ``random_split(WithIndex(full))`` with weights for
the full dataset against a dense implicit-function-theorem reference, and the clear refusal of
weights sized for the split; ``WithIndex(ConcatDataset(...))`` indexing every example by its
position in the concatenation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
    random_split,
)

import hypergrad as hg
from hypergrad.data import WithIndex

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cls(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _weighted(m: nn.Module, h: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
    x, y, index = b
    return (h(index) * F.cross_entropy(m(x), y, reduction="none")).mean()


def _ce(m: nn.Module, h: nn.Module, b: tuple[Tensor, ...]) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _linear(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).to(DT)


def _weights(n: int, seed: int) -> hg.hparams.ExampleWeights:
    ew = hg.hparams.ExampleWeights(n, dtype=DT)
    with torch.no_grad():
        ew.raw.copy_(torch.randn(n, generator=_gen(seed), dtype=DT))
    return ew


# ------------------------------------------------------------------------ bug 1: WithIndex + WithIndex


def test_sum_of_with_index_datasets_weights_each_example_by_its_position() -> None:
    xa, ya = _cls(3, 0)
    xb, yb = _cls(4, 1)
    ds = WithIndex(TensorDataset(xa, ya)) + WithIndex(TensorDataset(xb, yb))
    n = len(ds)
    assert n == 7
    x, y, index = next(iter(DataLoader(ds, batch_size=n)))
    ew = _weights(n, 2)
    model = _linear()
    _weighted(model, ew, (x, y, index)).backward()
    # reference: example k of the concatenation (xa then xb) weighted by sigmoid(raw[k])
    with torch.no_grad():
        per = F.cross_entropy(model(torch.cat([xa, xb])), torch.cat([ya, yb]), reduction="none")
        s = torch.sigmoid(ew.raw)
    expected = s * (1 - s) * per / n
    assert ew.raw.grad is not None
    # before: index [0, 1, 2, 0, 1, 2, 3]: entries 4..6 got no gradient, 0..3 the sums of two
    # examples' terms (xb's examples trained a's weights)
    torch.testing.assert_close(ew.raw.grad, expected, rtol=1e-12, atol=0.0)
    assert torch.equal(index, torch.arange(n))


def test_with_index_plus_a_plain_dataset_is_refused() -> None:
    xa, ya = _cls(3, 0)
    with pytest.raises(TypeError, match=r"WithIndex\(ConcatDataset"):
        _ = WithIndex(TensorDataset(xa, ya)) + TensorDataset(xa, ya)


def test_with_index_over_a_concat_dataset_indexes_positions_in_it() -> None:
    """The documented way (wrap after concatenating): every example's index is its position in
    the concatenation, also through a shuffled loader; the weighted loss's gradient w.r.t. the
    raw weights matches the closed form sigma'(r_k) l_k / B at those positions."""
    xa, ya = _cls(3, 0)
    xb, yb = _cls(4, 1)
    ds = WithIndex(ConcatDataset([TensorDataset(xa, ya), TensorDataset(xb, yb)]))
    xs, ys = torch.cat([xa, xb]), torch.cat([ya, yb])
    seen = []
    for xbt, ybt, idx in DataLoader(ds, batch_size=3, shuffle=True, generator=_gen(4)):
        assert torch.equal(xbt, xs[idx]) and torch.equal(ybt, ys[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(7))


# ------------------------------------------------------------------------ bug 2: slices, negative ints


def test_sliced_with_index_gives_positions_usable_as_a_full_batch() -> None:
    x, y = _cls(6, 5)
    ds = WithIndex(TensorDataset(x, y))
    assert ds[-1][2] == 5 and torch.equal(ds[-1][0], x[5])
    xs, ys, idx = ds[1:5]
    assert torch.equal(torch.as_tensor(idx), torch.arange(1, 5)) and torch.equal(xs, x[1:5])

    def hypergradient(batch: tuple[Tensor, ...]) -> Tensor:
        model = _linear()
        ew = _weights(6, 6)
        hopt = hg.Implicit(
            model,
            ew,
            _weighted,
            _ce,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
            solver=hg.Direct(),
        )
        hopt.step(batch)
        (g,), _ = hopt.hypergradient(train_batch=batch, val_batch=(x, y))
        return g

    expected = hypergradient((x, y, torch.arange(6)))
    assert expected.abs().min() > 0
    torch.testing.assert_close(hypergradient(tuple(ds[:])), expected, rtol=0.0, atol=0.0)


# ------------------------------------------------------------------------ passing: samplers, splits


def _unroll_reference(
    model: nn.Module,
    raw: Tensor,
    batches: list[tuple[Tensor, ...]],
    val: tuple[Tensor, Tensor],
    lr: float,
    mom: float,
) -> Tensor:
    """d L_V / d raw after SGD-with-momentum steps on ``batches`` (torch.optim's update: buf = g on
    the first step, then mom * buf + g; w -= lr * buf), unrolled by hand with functional_call."""
    r = raw.detach().clone().requires_grad_(True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    bufs: dict[str, Tensor] = {}
    for x, y, index in batches:
        per = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
        loss = (torch.sigmoid(r[index]) * per).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        new = {}
        for (k, p), g in zip(params.items(), grads, strict=True):
            bufs[k] = g if k not in bufs else mom * bufs[k] + g
            new[k] = p - lr * bufs[k]
        params = new
    out = F.cross_entropy(functional_call(model, params, (val[0],)), val[1])
    (g,) = torch.autograd.grad(out, r)
    return g


def test_unrolled_over_a_subset_with_a_sampler_drawing_repeats_matches_a_hand_unroll() -> None:
    """WithIndex over a Subset (weights sized for the subset: positions in it), a
    WeightedRandomSampler with replacement (an example twice in one batch: its weight gets both
    terms) and drop_last, all steps unrolled: equals the hand-written unroll to 1e-10, and the
    examples never drawn get exactly 0."""
    full_x, full_y = _cls(20, 7)
    sub = Subset(TensorDataset(full_x, full_y), [3, 17, 5, 9, 11, 0, 14, 8])
    ds = WithIndex(sub)
    sampler = WeightedRandomSampler(
        torch.tensor([4.0, 1, 4, 1, 1, 0, 1, 4]), num_samples=11, replacement=True, generator=_gen(0)
    )
    batches = list(DataLoader(ds, batch_size=3, sampler=sampler, drop_last=True))
    assert len(batches) == 3  # 11 draws, the last 2 dropped
    assert any(len(set(b[2].tolist())) < 3 for b in batches)  # a repeat inside one batch
    where = torch.tensor(sub.indices)
    for xb, yb, idx in batches:  # positions in the subset, not in the full dataset
        assert torch.equal(xb, full_x[where[idx]]) and torch.equal(yb, full_y[where[idx]])
    val = _cls(6, 9)
    model = _linear()
    ew = _weights(len(ds), 10)
    raw0 = ew.raw.detach().clone()
    ref_model = _linear()
    hopt = hg.Unrolled(
        model,
        ew,
        _weighted,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.8),
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
        steps=3,
    )
    for b in batches:
        hopt.step(b)
    (got,), _ = hopt.hypergradient(val_batch=val)
    ref = _unroll_reference(ref_model, raw0, batches, val, 0.4, 0.8)
    drawn = torch.zeros(len(ds), dtype=torch.bool)
    for b in batches:
        drawn[b[2]] = True
    assert not drawn.all() and got[~drawn].abs().max() == 0 and ref[drawn].abs().min() > 1e-8
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def _flat_ift(
    model: nn.Module, ew: nn.Module, batch: tuple[Tensor, ...], val: tuple[Tensor, Tensor]
) -> Tensor:
    """-d2L_T/dr dw H^-1 dL_V/dw at the model's weights: a dense reference."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v: Tensor) -> dict[str, Tensor]:
        parts = v.split([s.numel() for s in shapes])
        return {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}

    r = ew.raw.detach().clone().requires_grad_(True)

    def train(v: Tensor, rr: Tensor) -> Tensor:
        x, y, index = batch
        per = F.cross_entropy(functional_call(model, unflat(v), (x,)), y, reduction="none")
        return (torch.sigmoid(rr[index]) * per).mean()

    hess = torch.autograd.functional.hessian(lambda v: train(v, r.detach()), w0)
    w = w0.clone().requires_grad_(True)
    gv = torch.autograd.grad(F.cross_entropy(functional_call(model, unflat(w), (val[0],)), val[1]), w)[0]
    sol = torch.linalg.solve(hess, gv)
    w = w0.clone().requires_grad_(True)
    gw = torch.autograd.grad(train(w, r), w, create_graph=True)[0]
    (mixed,) = torch.autograd.grad(gw @ sol, r)
    return -mixed


def test_implicit_over_random_split_of_with_index_uses_full_dataset_positions() -> None:
    """random_split(WithIndex(full)): each training example keeps its index in ``full``, so the
    weights are sized for ``full`` (the validation examples' entries never move). Implicit +
    Direct equals the dense IFT reference; weights sized for the split are refused with an
    IndexError that says so instead of mapping example 17 of full onto another example."""
    x, y = _cls(10, 11)
    train, _ = random_split(WithIndex(TensorDataset(x, y)), [7, 3], generator=_gen(12))
    batch = next(iter(DataLoader(train, batch_size=7)))
    assert sorted(batch[2].tolist()) == sorted(train.indices) and max(train.indices) >= 7
    assert torch.equal(batch[0], x[batch[2]])
    val = _cls(5, 13)
    model = _linear()
    ew = _weights(len(x), 14)
    hopt = hg.Implicit(
        model,
        ew,
        _weighted,
        _ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    for _ in range(3):
        hopt.step(batch)
    (got,), _ = hopt.hypergradient(train_batch=batch, val_batch=val)
    ref = _flat_ift(model, ew, batch, val)
    held_out = torch.ones(10, dtype=torch.bool)
    held_out[batch[2]] = False
    assert got[held_out].abs().max() == 0 and ref[~held_out].abs().min() > 1e-8
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    with pytest.raises(IndexError, match="another dataset"):
        _weighted(model, hg.hparams.ExampleWeights(len(train), dtype=DT), batch)


# ------------------------------------------------------------------------ bug 3: hyperclean settings


def test_hyperclean_refuses_a_corrupt_fraction_that_leaves_no_clean_label() -> None:
    """corrupt=1.0 is refused (no clean example: the oracle has nothing to train on, the clean
    examples' mean weight is undefined), but corrupt=0.96 with 10 training examples rounds to
    the same 10 corrupted labels and ran: an "oracle" trained on no example, weight_clean NaN."""
    import hypergrad.experiments  # noqa: F401  (fills the registry)
    from hypergrad.experiments.common import REGISTRY, check_settings
    from hypergrad.experiments.hyperclean import corrupt_labels

    exp = REGISTRY["hyperclean"]
    cfg = {**exp.defaults, **exp.quick, "n_train": 10, "corrupt": 0.96}
    _, corrupted = corrupt_labels(torch.arange(10), 0.96, 0)
    assert bool(corrupted.all())  # what the run would do: no clean label left
    check_settings(exp, {**cfg, "corrupt": 0.94})  # 9 of 10 corrupted: one clean label, allowed
    with pytest.raises(ValueError, match="clean"):
        check_settings(exp, cfg)
