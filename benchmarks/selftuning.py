"""What does self-tuning cost? Time per epoch and parameters, STN network / ordinary network.

For the networks of ``experiments/stn_mnist1d.py`` (an MLP 40-256-256-10 whose hidden layers are
``hg.nn.StnLinear``) and a 1-D CNN (two ``hg.nn.StnConv1d`` layers of 32 channels, a linear head)
on mnist1d-shaped batches (128 x 40, 10 classes; random data: only the shapes matter). On CPU
one torch thread, CPU time (``time.process_time``); with ``--device cuda``, CUDA events around
each epoch (``benchmarks/timing.py``), where these small networks are launch-bound and the
ratios say how many kernels and host round trips self-tuning adds rather than how many FLOPs:

* ``plain``: an epoch of ordinary training (the same network with ``nn.Linear`` / ``nn.Conv1d``,
  per-example dropout, Adam) — the unit;
* ``stn_train``: the epoch's inner steps through ``hg.SelfTuning.step`` only (the STN layers'
  and the method's overhead per step);
* ``stn``: the full self-tuning epoch, ``step`` on every batch plus ``hyper_step`` on a
  validation batch after every two (T_train = 2, T_val = 1), as in the paper and the experiment;
* ``stn_t5``: the same with a hyperstep after every five (T_train = 5, the default of the
  authors' cleaned-up code, pomonam/Self-Tuning-Networks);
* ``delta``: the same with ``delta=True`` (Delta-STN: two forward/backward passes per step, the
  second through the output linearised by a forward-mode JVP);
* parameters of the STN network / the ordinary one (the hyperparameters themselves not counted);
* ``flop_ratio``: the matmul/conv FLOPs (``torch.utils.flop_counter``) of an STN step, a hyperstep
  and an epoch (``epoch`` T_train = 2, ``epoch_t5`` T_train = 5) over those of a plain step /
  epoch: the ratio a FLOP-bound device (a GPU at large batch) cannot beat, whatever the
  implementation.

Both networks are also run with a low-rank hyper half (``rank=16`` for the MLP's 256-unit
layers, ``rank=8`` for the CNN's 32 channels; not the paper's form, the same family of linear
responses), the option for when the paper's 2x matmul cost matters.

Each epoch is 32 batches (4,096 examples). After one warm-up epoch each, ``--repeats`` rounds run
every configuration once, interleaved (so that other processes' load hits them alike); the
ratios use the minimum over the rounds (the least disturbed), the JSON also has the medians and
every sample. Targets (issue 6): time <= 1.5x, parameters <= 2x.

Usage::

    .venv/bin/python benchmarks/selftuning.py            # ~1 minute on a 2-core CPU
    .venv/bin/python benchmarks/selftuning.py --quick    # seconds (smoke test)
    python3 benchmarks/selftuning.py --device cuda        # a GPU: writes selftuning-<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import hypergrad as hg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Timer  # noqa: E402

HIDDEN = 256


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(40, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 10)

    def forward(self, x: Tensor, rate: Tensor) -> Tensor:
        h = hg.nn.dropout(F.relu(self.l1(x)), rate, self.training)
        return self.head(hg.nn.dropout(F.relu(self.l2(h)), rate, self.training))


class StnMLP(nn.Module):
    def __init__(self, n: int, rank: int | None = None) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(40, HIDDEN, n, rank=rank)
        self.l2 = hg.nn.StnLinear(HIDDEN, HIDDEN, n, rank=rank)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: Tensor, hp: hg.hparams.SelfTuned) -> Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(F.relu(self.l1(x, d)), d["dropout"][:, 0], self.training)
        return self.head(hg.nn.dropout(F.relu(self.l2(h, d)), d["dropout"][:, 1], self.training))


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(1, 32, 5, padding=2), nn.Conv1d(32, 32, 5, padding=2)
        self.head = nn.Linear(32 * 40, 10)

    def forward(self, x: Tensor, rate: Tensor) -> Tensor:
        h = hg.nn.dropout(F.relu(self.c1(x[:, None])), rate, self.training)
        h = hg.nn.dropout(F.relu(self.c2(h)), rate, self.training)
        return self.head(h.flatten(1))


class StnCNN(nn.Module):
    def __init__(self, n: int, rank: int | None = None) -> None:
        super().__init__()
        self.c1 = hg.nn.StnConv1d(1, 32, 5, n, padding=2, rank=rank)
        self.c2 = hg.nn.StnConv1d(32, 32, 5, n, padding=2, rank=rank)
        self.head = nn.Linear(32 * 40, 10)

    def forward(self, x: Tensor, hp: hg.hparams.SelfTuned) -> Tensor:
        d = hp.draw(len(x))
        h = hg.nn.dropout(F.relu(self.c1(x[:, None], d)), d["dropout"][:, 0], self.training)
        h = hg.nn.dropout(F.relu(self.c2(h, d)), d["dropout"][:, 1], self.training)
        return self.head(h.flatten(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], nn.Module]]] = {
    "mlp-40-256-256-10": (PlainMLP, StnMLP),
    "mlp-40-256-256-10-rank16": (PlainMLP, lambda n: StnMLP(n, rank=16)),
    "cnn1d-2x32": (PlainCNN, StnCNN),
    "cnn1d-2x32-rank8": (PlainCNN, lambda n: StnCNN(n, rank=8)),
}


#: where the networks and batches live (``--device``)
DEVICE = torch.device("cpu")


def _data(n_batches: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(128, 40, generator=g).to(DEVICE), torch.randint(0, 10, (128,), generator=g).to(DEVICE))
        for _ in range(n_batches)
    ]


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _loss(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _plain(name: str) -> tuple[nn.Module, Callable[[tuple[Tensor, Tensor]], None]]:
    """The ordinary network (seed 0) and one Adam step of it on a batch (per-example dropout 0.2)."""
    torch.manual_seed(0)
    plain = MODELS[name][0]().to(DEVICE)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    rate = torch.full((128,), 0.2, device=DEVICE)

    def step(b: tuple[Tensor, Tensor]) -> None:
        opt.zero_grad()
        F.cross_entropy(plain(b[0], rate), b[1]).backward()
        opt.step()

    return plain, step


def _selftuning(name: str, delta: bool, warmup: int = 0, train_steps: int = 2) -> hg.SelfTuning:
    """The STN network with two tuned dropout rates, as in the experiment (Adam inside and out)."""
    hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9, size=2)).to(DEVICE)
    model = MODELS[name][1](hp.size).to(DEVICE)
    return hg.SelfTuning(
        model,
        hp,
        _loss,
        _loss,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=3e-3),
        warmup=warmup,
        delta=delta,
        train_steps=train_steps,
    )


def flop_ratio(name: str) -> dict[str, float]:
    """Matmul FLOPs of one STN step, one hyperstep and one epoch (T_train = 2, T_val = 1), each
    over a plain train step's (or a plain epoch's), for STN and (``delta_*``) Delta-STN: what
    the method costs, independent of the machine and of per-op overheads."""
    batch, val = _data(2)
    _, plain_step = _plain(name)
    unit = _flops(lambda: plain_step(batch))
    out: dict[str, float] = {"plain_step_flops": unit}
    for prefix, delta in (("", False), ("delta_", True)):
        hopt = _selftuning(name, delta, warmup=1)
        step = _flops(lambda: hopt.step(batch))  # noqa: B023 (called at once)
        hyper = _flops(lambda: hopt.hyper_step(val_batch=val))  # noqa: B023
        out[f"{prefix}stn_step"] = step / unit
        out[f"{prefix}hyperstep"] = hyper / unit
        out[f"{prefix}epoch"] = (2 * step + hyper) / (2 * unit)
        out[f"{prefix}epoch_t5"] = (5 * step + hyper) / (5 * unit)
    return out


def measure(name: str, repeats: int, n_batches: int) -> dict[str, Any]:
    data, val = _data(n_batches), _data(4)
    plain, plain_step = _plain(name)

    def plain_epoch() -> None:
        plain.train()
        for b in data:
            plain_step(b)

    def stn_epoch(delta: bool, hyper: bool, train_steps: int = 2) -> Callable[[], None]:
        hopt = _selftuning(name, delta, train_steps=train_steps)
        model = hopt.model

        def epoch() -> None:
            model.train()
            for i, b in enumerate(data):
                hopt.step(b)
                if hyper and hopt.hyper_due():
                    hopt.hyper_step(val_batch=val[i % len(val)])

        epoch.model = model  # type: ignore[attr-defined]
        return epoch

    runs = {
        "plain": plain_epoch,
        "stn_train": stn_epoch(False, False),
        "stn": stn_epoch(False, True),
        "stn_t5": stn_epoch(False, True, train_steps=5),
        "delta": stn_epoch(True, True),
    }
    samples: dict[str, list[float]] = {k: [] for k in runs}
    timer = Timer(DEVICE, clock="cpu")
    for fn in runs.values():
        fn()  # warm-up epoch
    for _ in range(repeats):  # interleaved, so that a change of load hits every configuration alike
        for k, fn in runs.items():
            samples[k].append(timer(fn)[0].seconds)
    med = {k: min(v) for k, v in samples.items()}
    n_plain = sum(p.numel() for p in plain.parameters())
    n_stn = sum(p.numel() for p in runs["stn"].model.parameters())  # type: ignore[attr-defined]
    return {
        "model": name,
        "batches_per_epoch": n_batches,
        "batch_size": 128,
        "seconds_per_epoch": {
            k: {"min": med[k], "median": statistics.median(samples[k]), "samples": samples[k]} for k in runs
        },
        "time_ratio": {k: med[k] / med["plain"] for k in runs if k != "plain"},
        "parameters": {"plain": n_plain, "stn": n_stn, "ratio": n_stn / n_plain},
        "flop_ratio": flop_ratio(name),
    }


def models_section(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-model summary in the layout every ``benchmarks/results/*.json`` shares: the
    ordinary network's training step as the unit, and what a self-tuning hyperstep costs on top
    of the STN's own steps (``(stn - stn_train) / hypersteps per epoch``)."""
    out: dict[str, Any] = {}
    for r in results:
        sec, n = r["seconds_per_epoch"], r["batches_per_epoch"]
        unit = 1e3 * sec["plain"]["min"] / n
        rows = []
        for method, key in (("selftuning", "stn"), ("selftuning-delta", "delta")):
            per_hyper = 1e3 * (sec[key]["min"] - sec["stn_train"]["min"]) / (n // 2)
            rows.append(
                {
                    "method": method,
                    "group": "hypergrad",
                    "median_ms": per_hyper,
                    "ratio_to_train_step": per_hyper / unit,
                    "stn_step_ms": 1e3 * sec["stn_train"]["min"] / n,
                    "stn_step_ratio_to_train_step": sec["stn_train"]["min"] / sec["plain"]["min"],
                }
            )
        out[r["model"]] = {"train_step": {"torch_step": {"median_ms": unit}}, "hypersteps": rows}
    return out


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hypergrad": hg.__version__,
        "device": str(DEVICE),
        "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "clock": "CUDA events" if DEVICE.type == "cuda" else "time.process_time (CPU time of this process)",
        "git_commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 4-batch epochs (smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    parser.add_argument(
        "--out", type=Path, default=None, help="(default: results/selftuning-cpu-2core.json or -<gpu>.json)"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        DEVICE = torch.device("cuda", torch.cuda.current_device())
        tag = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(DEVICE).lower())
        default_out = Path(f"benchmarks/results/selftuning-{tag.strip('-')}.json")
    else:
        torch.set_num_threads(1)
        default_out = Path("benchmarks/results/selftuning-cpu-2core.json")
    out = args.out or default_out
    repeats, n_batches = (2, 4) if args.quick else (args.repeats, 32)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    results = [measure(name, repeats, n_batches) for name in MODELS]
    report = {
        "benchmark": "hypergrad self-tuning networks: time per epoch and parameters vs ordinary layers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "settings": {"repeats": repeats, "batches_per_epoch": n_batches, "quick": args.quick},
        "targets": {"time_ratio": 1.5, "parameter_ratio": 2.0},
        "results": results,
        "models": models_section(results),
        "wall_seconds": time.perf_counter() - t0,
    }
    for r in results:
        t = r["time_ratio"]
        print(
            f"{r['model']:25} time/epoch ÷ plain: step only {t['stn_train']:.2f}x, STN {t['stn']:.2f}x "
            f"(T_train 5: {t['stn_t5']:.2f}x), Delta-STN {t['delta']:.2f}x; parameters "
            f"{r['parameters']['stn']:,} / {r['parameters']['plain']:,} = {r['parameters']['ratio']:.2f}x; "
            f"FLOPs/epoch STN {r['flop_ratio']['epoch']:.2f}x "
            f"(T_train 5: {r['flop_ratio']['epoch_t5']:.2f}x), "
            f"Delta {r['flop_ratio']['delta_epoch']:.2f}x"
        )
    if not args.quick or args.out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
