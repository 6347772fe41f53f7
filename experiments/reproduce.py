"""Rerun every registered experiment at its default size into experiments/reports/NAME/ and
regenerate the results table of experiments/README.md (``hypergrad report``).

Usage (from the repository root; about 20 minutes on a 2-core CPU)::

    .venv/bin/python experiments/reproduce.py                 # all experiments
    .venv/bin/python experiments/reproduce.py distill hd      # some of them
    .venv/bin/python experiments/reproduce.py --quick         # smoke sizes, into results/quick/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all


def main() -> None:
    load_all()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"experiments (default: all of {sorted(REGISTRY)})")
    parser.add_argument("--quick", action="store_true", help="smoke sizes, not committed")
    args = parser.parse_args()
    names = args.names or sorted(REGISTRY, key=lambda n: REGISTRY[n].number)
    for name in names:
        if args.quick:
            out = str(Path("results/quick") / name)
            rc = cli.main(["run", name, "--quick", "--no-progress", "--out", out])
        else:
            rc = cli.main(["run", name, "--no-progress", "--out", f"experiments/reports/{name}"])
        if rc:  # Ctrl-C (130) or SIGTERM (143) stopped the run: stop here, and write no report
            # (the stopped experiment has no results.json: the report would drop its row)
            raise SystemExit(rc)
    if not args.quick:
        cli.main(["report"])


if __name__ == "__main__":
    main()
