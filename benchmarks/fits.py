"""Does a per-weight-decay hyperstep of the ~100M GPT fit on one GPU? Its memory, measured.

Issue 9 asks that the ~100M-parameter GPT (``models.spec("gpt", "full")``: 12 layers, width 768,
vocab 8192, context 256; 97.8M weights, as many hyperparameters) run a hyperstep of
``hg.Implicit`` (Neumann-5) on an 80 GB GPU. This script measures, at each batch size given, the
bytes live before the hyperstep (weights, their ``.grad``, the optimiser's momentum, the
hyperparameters and the outer Adam's state, each counted), and the allocator's peak above them
during a plain train step and during the hyperstep (the suite's :class:`timing.Memory`: CUDA's
peak statistics on a GPU, the profiler's allocator events on a CPU). Peaks grow linearly in the
batch (activations), so two batch sizes give the slope, and what the GPU's batch would need.

Usage::

    .venv/bin/python benchmarks/fits.py --device cuda --batch 8,16,32      # a GPU: minutes
    .venv/bin/python benchmarks/fits.py --batch 1,2                         # CPU: ~8 minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import torch  # noqa: E402
from timing import Memory  # noqa: E402

import hypergrad as hg  # noqa: E402

GIB = 2**30


def _bytes(ts: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def measure(batch: int, device: torch.device, steps: int, size: str = "full") -> dict[str, Any]:
    prob = models.make_problem("gpt", size, device, batch=batch, n_train=2)
    hopt = prob.implicit(hg.Neumann(steps=steps, alpha=models.LR))
    mem = Memory(device)
    tb, vb = prob.train_batch, prob.val_batch
    t0 = time.perf_counter()
    with mem.session():
        hopt.step(tb)  # warm: .grad, momentum, the outer Adam's state, caches
        hopt.hyper_step(train_batch=tb, val_batch=vb)
        step, _ = mem(lambda: hopt.step(tb))
        hyper, _ = mem(lambda: hopt.hyper_step(train_batch=tb, val_batch=vb))
    seconds = time.perf_counter() - t0
    weights = prob.weights
    state = [t for s in prob.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    outer = [
        t for s in hopt.outer_optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    live = {
        "weights": _bytes(weights),
        "grads": _bytes([w.grad for w in weights if w.grad is not None]),
        "momentum": _bytes(state),
        "hparams": _bytes(prob.hparams),
        "outer_state": _bytes(outer),
    }
    total = sum(live.values())
    return {
        "weights": sum(int(w.numel()) for w in weights),
        "hyperparameters": sum(int(h.numel()) for h in prob.hparams),
        "batch": batch,
        "tokens_per_batch": batch * int(tb[0].shape[1]),
        "live_bytes": live,
        "live_total_gib": total / GIB,
        "train_step_peak_above_live_gib": step.peak / GIB,
        "hyperstep_peak_above_live_gib": hyper.peak / GIB,
        "hyperstep_total_gib": (total + hyper.peak) / GIB,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="1,2", help="comma-separated batch sizes (sequences of 256 tokens)")
    ap.add_argument("--steps", type=int, default=5, help="Neumann terms (default: 5)")
    ap.add_argument("--size", default="full", choices=models.SIZES, help="the GPT's size (default: full)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = [measure(int(b), device, args.steps, args.size) for b in args.batch.split(",") if b.strip()]
    for r in rows:
        print(
            f"batch {r['batch']}: live {r['live_total_gib']:.2f} GiB; peak above it: train step "
            f"{r['train_step_peak_above_live_gib']:.2f} GiB, Neumann-{args.steps} hyperstep "
            f"{r['hyperstep_peak_above_live_gib']:.2f} GiB (total {r['hyperstep_total_gib']:.2f} GiB); "
            f"{r['seconds']:.0f} s"
        )
    fit: dict[str, float] = {}
    if len(rows) >= 2:  # peak = intercept + slope * batch (activations are linear in the batch)
        a, b = rows[0], rows[-1]
        slope = (b["hyperstep_total_gib"] - a["hyperstep_total_gib"]) / (b["batch"] - a["batch"])
        fit = {
            "slope_gib_per_sequence": slope,
            "intercept_gib": a["hyperstep_total_gib"] - slope * a["batch"],
            "largest_batch_in_80_gib": (80 - (a["hyperstep_total_gib"] - slope * a["batch"])) / slope,
        }
        seq = rows[0]["tokens_per_batch"] // rows[0]["batch"]
        print(
            f"hyperstep total ≈ {fit['intercept_gib']:.2f} + {slope:.3f} GiB × batch: "
            f"≈ {fit['largest_batch_in_80_gib']:.0f} sequences of {seq} tokens in 80 GiB"
        )
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    out = args.out or HERE / "results" / f"fits-gpt-{args.size}-{name}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "memory of a Neumann hyperstep on the ~100M GPT, one weight decay per weight",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": {
                    "device": name,
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "memory_metric": Memory(device).metric,
                },
                "model": models.spec("gpt", args.size).description,
                "neumann_steps": args.steps,
                "rows": rows,
                "fit": fit,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
