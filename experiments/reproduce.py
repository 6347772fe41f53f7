"""Rerun every registered experiment at its default size into experiments/reports/NAME/, and
every other committed run there (such as stn_mnist1d_delta) by the command its results.json
records, then regenerate the results table of experiments/README.md (``hypergrad report``): the
table never mixes fresh runs with a stale one.

Usage (from the repository root; about 20 minutes on a 2-core CPU)::

    .venv/bin/python experiments/reproduce.py                 # all experiments
    .venv/bin/python experiments/reproduce.py distill hd      # some of them
    .venv/bin/python experiments/reproduce.py --quick         # smoke sizes, into results/quick/
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from hypergrad import cli
from hypergrad.experiments import REGISTRY, load_all


def _other_reports() -> list[list[str]]:
    """The ``hypergrad run`` arguments of the committed runs in experiments/reports/ whose folder
    is not an experiment's name (a second setting of one, e.g. stn_mnist1d_delta), as their
    results.json records them."""
    runs = []
    for path in sorted(Path("experiments/reports").glob("*/results.json")):
        if path.parent.name not in REGISTRY:
            argv = shlex.split(json.loads(path.read_text())["command"])[1:]
            if not any(a == "--out" or a.startswith("--out=") for a in argv):  # (into its folder)
                argv += ["--out", str(path.parent)]
            runs.append(argv)
    return runs


def main() -> None:
    load_all()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"experiments (default: all of {sorted(REGISTRY)})")
    parser.add_argument("--quick", action="store_true", help="smoke sizes, not committed")
    args = parser.parse_args()
    names = args.names or sorted(REGISTRY, key=lambda n: REGISTRY[n].number)
    runs = [
        ["run", name, "--quick", "--no-progress", "--out", str(Path("results/quick") / name)]
        if args.quick
        else ["run", name, "--no-progress", "--out", f"experiments/reports/{name}"]
        for name in names
    ]
    if not args.names and not args.quick:
        runs += _other_reports()
    for argv in runs:
        rc = cli.main(argv)
        if rc:  # Ctrl-C (130) or SIGTERM (143) stopped the run: stop here, and write no report
            # (the stopped experiment has no results.json: the report would drop its row)
            raise SystemExit(rc)
    if not args.quick:
        cli.main(["report"])


if __name__ == "__main__":
    main()
