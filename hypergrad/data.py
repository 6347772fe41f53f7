"""Dataset helpers for per-example hyperparameters.

:class:`~hypergrad.hparams.ExampleWeights` needs each batch's example indices; wrapping the dataset
in :class:`WithIndex` makes a ``DataLoader`` yield them as the last element of every batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

__all__ = ["WithIndex"]


class WithIndex(Dataset[tuple[Any, ...]]):
    """A map-style dataset whose item ``i`` is the wrapped dataset's item ``i`` with ``i`` appended.

    A tuple item ``(x, y)`` becomes ``(x, y, i)``; any other item ``x`` (a tensor, a dict, a list)
    becomes ``(x, i)``. ``i`` is the index as passed (a Python ``int`` from a ``DataLoader``'s
    sampler), so the default collate turns a batch of them into an ``int64`` tensor of shape
    ``(B,)``, ready for ``ExampleWeights(len(dataset))(index)``. ``len`` is the wrapped dataset's.
    A slice (``ds[:]``, a whole ``TensorDataset`` as one batch) gets the ``int64`` tensor of the
    positions it selects (``ds[1:5]``: ``tensor([1, 2, 3, 4])``), and a negative ``int`` its position
    (``ds[-1]`` appends ``len(ds) - 1``): ``ExampleWeights`` reads positions only.

    ``WithIndex(a) + WithIndex(b)`` is ``WithIndex(ConcatDataset([a, b]))``: item ``i`` of the sum
    carries its position ``i`` in the sum (``torch``'s own ``+``, a ``ConcatDataset`` of the two
    wrappers, gave ``b``'s examples the indices ``0, 1, ...`` of ``a``'s: each read another
    example's weight, silently); ``ConcatDataset([WithIndex(a), WithIndex(b)])`` written out still
    does that, so concatenate the plain datasets first and wrap the result.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``), e.g. a ``TensorDataset``.

    Raises:
        TypeError: ``dataset`` is an ``IterableDataset`` (it has no indices) or has no ``len``.

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> ds = WithIndex(TensorDataset(torch.randn(5, 3), torch.arange(5) % 2))
    >>> len(ds), len(ds[4]), ds[4][2]
    (5, 3, 4)
    >>> x, y, index = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    >>> x.shape, index
    (torch.Size([2, 3]), tensor([0, 1]))
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("WithIndex needs a map-style dataset; an IterableDataset has no indices")
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"WithIndex needs a dataset with a len(), got {type(dataset).__name__}")
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if isinstance(index, slice):  # (the slice object itself is no index ExampleWeights reads)
            index = torch.tensor(range(len(self))[index], dtype=torch.int64)  # type: ignore[assignment]
        elif isinstance(index, int) and index < 0:  # ds[-1], the last example: its position
            index += len(self)
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __add__(self, other: Dataset[Any]) -> WithIndex:  # type: ignore[override]
        if not isinstance(other, WithIndex):
            raise TypeError(
                f"WithIndex + {type(other).__name__}: only another WithIndex can be added (the sum "
                "is WithIndex(ConcatDataset([a, b])), each example indexed by its position in it); "
                "concatenate the plain datasets first and wrap the result: "
                "WithIndex(ConcatDataset([a, b]))"
            )
        from torch.utils.data import ConcatDataset

        return WithIndex(ConcatDataset([self.dataset, other.dataset]))

    def __repr__(self) -> str:
        return f"WithIndex({self.dataset!r})"
