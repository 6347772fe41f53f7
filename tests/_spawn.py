"""Spawning gloo ranks for the DDP tests, with a deadline.

``torch.multiprocessing.spawn(..., join=True)`` waits for ever: a rank that has written its
results but hangs in its exit (gloo's threads at interpreter shutdown; seen once in a CI run under
load) held the whole suite. :func:`spawn_ranks` joins with a deadline, and kills the ranks once
every result file has existed for ``grace`` seconds (their results are what the tests read) or
``timeout`` has passed (then the missing results are an error, not a hang).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def spawn_ranks(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nprocs: int,
    results: Sequence[Path],
    timeout: float = 300.0,
    grace: float = 30.0,
) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait for them, as
    ``mp.spawn(join=True)`` does (a rank's exception is raised here: ``ProcessRaisedException``,
    or ``ProcessExitedException`` for one that aborted), but no longer than described above."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    saved_at = None
    while not ctx.join(timeout=1):
        now = time.monotonic()
        if saved_at is None and all(Path(p).exists() for p in results):
            saved_at = now
        if now > deadline or (saved_at is not None and now > saved_at + grace):
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            break
    missing = [str(p) for p in results if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"the spawned ranks did not finish within {timeout:g} s: no {missing}")


def spawn_workers(worker: Callable[..., Any], world: int, tmp: Path | str) -> None:
    """The DDP test files' usual call: ``worker(rank, world, "file://<tmp>/init", "<tmp>")`` on
    ``world`` ranks, each writing ``<tmp>/rank<r>.pt`` (see :func:`spawn_ranks`)."""
    tmp = Path(tmp)
    spawn_ranks(
        worker,
        (world, f"file://{tmp / 'init'}", str(tmp)),
        world,
        [tmp / f"rank{r}.pt" for r in range(world)],
    )
