"""Toy: a best-response hypernetwork recovers the validation-optimal ridge penalty.

A thin wrapper around the registered experiment ``stn_ridge``
(:mod:`hypergrad.experiments.stn_ridge`, where the setup is described): the same as
``hypergrad run stn_ridge [--seed N] [--quick]``. Writes ``results/stn_ridge/`` (results.json,
trajectory.csv with the penalty after each hyperstep, stn_ridge.png).

How long it takes
    About 2-5 s on a 2-core CPU (``--quick``: about a second).

Usage::

    .venv/bin/python experiments/stn_ridge.py [--seed 0] [--quick] [--out results/stn_ridge]

Measured (defaults, torch 2.13, 2-core CPU): lambda* / learned lambda (error in decades) =
0.2285 / 0.2179 (0.021) for seed 0, 0.0439 / 0.0430 (0.009) for seed 1, 0.1188 / 0.1205
(0.006) for seed 2, starting from lambda = 1 each time; validation MSE within 0.02% of the
optimum's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hypergrad import cli


def main() -> None:
    """Parse the script's options and run the registered experiment."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("results") / "stn_ridge", help="run folder")
    args = parser.parse_args()
    argv = ["run", "stn_ridge", "--seed", str(args.seed), "--out", str(args.out), "--device", "cpu"]
    rc = cli.main([*argv, "--quick"] if args.quick else argv)
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
