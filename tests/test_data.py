"""hg.data.WithIndex: indices appended to each item, and per-example weights fed by them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import hypergrad as hg
from hypergrad.data import WithIndex


def _tensors(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, dtype=torch.float64), torch.arange(n) % 2


def test_items_get_their_index_appended() -> None:
    x, y = _tensors()
    ds = WithIndex(TensorDataset(x, y))
    assert len(ds) == 10
    xi, yi, i = ds[7]
    assert i == 7 and torch.equal(xi, x[7]) and torch.equal(yi, y[7])
    assert torch.equal(WithIndex(TensorDataset(x))[3][0], x[3]) and len(WithIndex(TensorDataset(x))[3]) == 2


class _Plain(Dataset[torch.Tensor]):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]

    def __len__(self) -> int:
        return len(self.x)


def test_non_tuple_items_become_pairs() -> None:
    x, _ = _tensors(4)
    ds = WithIndex(_Plain(x))
    item = ds[2]
    assert isinstance(item, tuple) and len(item) == 2 and item[1] == 2 and torch.equal(item[0], x[2])
    xb, idx = next(iter(DataLoader(ds, batch_size=4)))
    assert torch.equal(xb, x) and torch.equal(idx, torch.arange(4))


def test_dataloader_yields_the_right_indices() -> None:
    x, y = _tensors(10)
    loader = DataLoader(
        WithIndex(TensorDataset(x, y)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    seen = []
    for xb, yb, idx in loader:
        assert idx.dtype == torch.int64 and idx.shape == (len(xb),)
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))  # shuffled, each once


def test_iterable_dataset_is_refused() -> None:
    class _Stream(IterableDataset[int]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(3))

    with pytest.raises(TypeError, match="map-style"):
        WithIndex(_Stream())


def _weighted_loss(model: nn.Module, hparams: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, idx = batch
    per_example = nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)
    return (hparams(idx) * per_example).mean()


def test_example_weights_gradient_is_nonzero_exactly_on_the_batch() -> None:
    x, y = _tensors(10)
    loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=4, shuffle=True)
    model = nn.Linear(3, 2).double()
    ew = hg.hparams.ExampleWeights(len(x), init=0.7, dtype=torch.float64)
    batch = next(iter(loader))
    _weighted_loss(model, ew, batch).backward()
    assert ew.raw.grad is not None
    in_batch = torch.zeros(10, dtype=torch.bool)
    in_batch[batch[2]] = True
    assert torch.equal(ew.raw.grad != 0, in_batch)
    # closed form: d/dr_i mean_b(sigmoid(r_idx_b) l_b) = sigmoid'(r_i) l_i / B
    with torch.no_grad():
        per_example = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
    expected = torch.zeros(10, dtype=torch.float64)
    expected[batch[2]] = 0.7 * 0.3 * per_example / len(per_example)
    assert torch.allclose(ew.raw.grad, expected, rtol=1e-13)


def test_implicit_hyper_step_fills_grad_only_for_the_train_batch_examples() -> None:
    x, y = _tensors(12)
    loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=5, shuffle=True)
    model = nn.Linear(3, 2).double()
    ew = hg.hparams.ExampleWeights(len(x), init=0.5, dtype=torch.float64)

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    hopt = hg.Implicit(
        model,
        ew,
        _weighted_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(ew.parameters(), lr=1.0),
        solver=hg.Identity(),
    )
    train_batch = next(iter(loader))
    hopt.step(train_batch)
    before = ew.raw.detach().clone()
    hopt.hyper_step(train_batch=train_batch, val_batch=(x, y))
    in_batch = torch.zeros(12, dtype=torch.bool)
    in_batch[train_batch[2]] = True
    assert ew.raw.grad is not None and torch.equal(ew.raw.grad != 0, in_batch)
    assert torch.equal(ew.raw.detach() != before, in_batch)  # plain SGD moves only those
