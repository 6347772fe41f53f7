"""``python -m hypergrad``: the same as the ``hypergrad`` command (see :mod:`hypergrad.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
