"""Former entry point of the benchmark, kept so that ``make bench`` and old commands still work.

The benchmark is now the suite in ``benchmarks/run.py`` (split into ``models.py``, ``timing.py``,
``peers.py`` and ``report.py``; see ``benchmarks/README.md``). This script forwards its arguments
to it: ``--quick`` becomes ``--repeats 3 --min-repeats 2 --budget 30``, and ``--memory-jobs N``
(the old per-configuration subprocesses, which measured RSS) is ignored: memory is now the
allocator's peak, measured in process. The old results stay in ``results/cpu-2core.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402


def translate(argv: Sequence[str]) -> list[str]:
    """The old command line as the suite's."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--quick":
            out += ["--repeats", "3", "--min-repeats", "2", "--budget", "30"]
        elif a == "--memory-jobs":
            next(it, None)
        elif a.startswith("--memory-jobs="):
            continue
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(run.main(translate(sys.argv[1:])))
