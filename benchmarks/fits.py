"""Does a per-weight-decay hyperstep of the ~100M GPT fit on one GPU? Its memory, measured.

Issue 9 asks that the ~100M-parameter GPT (``models.spec("gpt", "full")``: 12 layers, width 768,
vocab 8192, context 256; 97.8M weights, as many hyperparameters) run a hyperstep of
``hg.Implicit`` (Neumann-5) on an 80 GB GPU. This script measures, at each batch size given, the
bytes live before the hyperstep (weights, their ``.grad``, the optimiser's momentum, the
hyperparameters, their ``.grad`` (the previous hypergradient) and the outer Adam's state, each
counted), and the allocator's peak above them
during a plain train step and during the hyperstep (the suite's :class:`timing.Memory`: CUDA's
peak statistics on a GPU, the profiler's allocator events on a CPU). Peaks grow linearly in the
batch (activations), so two batch sizes give the slope, and what the GPU's batch would need.

Usage::

    .venv/bin/python benchmarks/fits.py --device cuda --batch 8,16,32      # a GPU: minutes
    .venv/bin/python benchmarks/fits.py --batch 1,2                         # CPU: ~3 minutes
    .venv/bin/python benchmarks/fits.py --model resnet18 --batch 128 \
        --methods unrolled-5,unrolled-5-ckpt,higher-5                      # Unrolled vs higher
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import peers  # noqa: E402
import torch  # noqa: E402
from timing import Memory  # noqa: E402

import hypergrad as hg  # noqa: E402

GIB = 2**30


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE)
    except OSError:
        return None
    return out.stdout.strip() or None


def _bytes(ts: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def _held_by(hopt: Any) -> int:
    """Bytes an Unrolled keeps between hypersteps: its records' snapshots and batches."""
    total, seen = 0, set()
    for rec in getattr(hopt, "_records", ()):
        ts = [t for t in rec.batch if isinstance(t, torch.Tensor)]
        if rec.anchor is not None:
            a = rec.anchor
            ts += [*a.weights, *a.buffers, *a.hparams]
            ts += [t for s in a.states for t in s.values() if isinstance(t, torch.Tensor)]
        for t in ts:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def measure(
    batch: int, device: torch.device, method: str, size: str = "full", model: str = "gpt"
) -> dict[str, Any]:
    """One method's hyperstep on ``model`` at ``size``: ``neumann-K`` (Implicit), ``unrolled-K``,
    ``unrolled-K-ckpt`` (checkpointed) or ``higher-K`` (the peer, the same hypergradient)."""
    prob = models.make_problem(model, size, device, batch=batch, n_train=5)
    kind, k_text, *rest = method.split("-")
    k = int(k_text)
    tb, vb = prob.train_batch, prob.val_batch
    hopt: Any = None
    peer: Any = None
    if kind == "neumann":
        hopt = prob.implicit(hg.Neumann(steps=k, alpha=models.LR))

        def prepare() -> None:
            hopt.step(tb)

        def hyper() -> None:
            hopt.hyper_step(train_batch=tb, val_batch=vb)

    elif kind == "unrolled":
        hopt = prob.unrolled(k, checkpoint=bool(rest))

        def prepare() -> None:
            for i in range(k):
                hopt.step(prob.train_batches[i % len(prob.train_batches)])

        def hyper() -> None:
            hopt.hyper_step(val_batch=vb)

    elif kind == "higher":
        peer = peers.make("higher", prob, steps=k)

        def prepare() -> None:
            prob.torch_step()

        def hyper() -> None:
            peer()

    else:
        raise SystemExit(f"unknown method {method!r}")
    mem = Memory(device)
    t0 = time.perf_counter()
    with mem.session():
        prepare()  # warm: .grad, momentum, the outer Adam's state, caches, Unrolled's ring
        hyper()
        step, _ = mem(prob.torch_step)
        prepare()
        win, _ = mem(hyper)
    seconds = time.perf_counter() - t0
    weights = prob.weights
    state = [t for s in prob.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    # higher's call takes its own fused-Adam step (peer.outer): its moments are live as hypergrad's are
    outer_opt = hopt.outer_optimizer if hopt is not None else peer.outer
    outer = [
        t
        for s in (outer_opt.state.values() if outer_opt is not None else ())
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    live = {
        "weights": _bytes(weights),
        "grads": _bytes([w.grad for w in weights if w.grad is not None]),
        "momentum": _bytes(state),
        "hparams": _bytes(prob.hparams),
        # the previous hypergradient, left in .grad by every method's outer step (as torch.optim does)
        "hparam_grads": _bytes([h.grad for h in prob.hparams if h.grad is not None]),
        "outer_state": _bytes(outer),
        "held_by_method": _held_by(hopt),
    }
    total = sum(live.values())
    return {
        "model": models.spec(model, size).description,
        "method": method,
        "weights": sum(int(w.numel()) for w in weights),
        "hyperparameters": sum(int(h.numel()) for h in prob.hparams),
        "batch": batch,
        "tokens_per_batch": int(tb[0].numel()) if model == "gpt" else None,
        "live_bytes": live,
        "live_total_gib": total / GIB,
        "train_step_peak_above_live_gib": step.peak / GIB,
        "hyperstep_peak_above_live_gib": win.peak / GIB,
        "hyperstep_total_gib": (total + win.peak) / GIB,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="1,2", help="comma-separated batch sizes (sequences of 256 tokens)")
    ap.add_argument("--model", default="gpt", choices=["gpt", "resnet18"], help="(default: gpt)")
    ap.add_argument(
        "--methods",
        default="neumann-5",
        help="comma-separated: neumann-K, unrolled-K, unrolled-K-ckpt, higher-K (default: neumann-5)",
    )
    ap.add_argument("--size", default="full", choices=models.SIZES, help="the model's size (default: full)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    rows = [measure(b, device, m, args.size, args.model) for m in methods for b in batches]
    for r in rows:
        print(
            f"{r['method']}, batch {r['batch']}: live {r['live_total_gib']:.3f} GiB; peak above it: train "
            f"step {r['train_step_peak_above_live_gib']:.3f} GiB, hyperstep "
            f"{r['hyperstep_peak_above_live_gib']:.3f} GiB (total {r['hyperstep_total_gib']:.3f} GiB); "
            f"{r['seconds']:.0f} s"
        )
    fit: dict[str, float] = {}
    if len(batches) >= 2 and len(methods) == 1:  # peak = intercept + slope * batch (activations)
        a, b = rows[0], rows[-1]
        slope = (b["hyperstep_total_gib"] - a["hyperstep_total_gib"]) / (b["batch"] - a["batch"])
        fit = {
            "slope_gib_per_sequence": slope,
            "intercept_gib": a["hyperstep_total_gib"] - slope * a["batch"],
            "largest_batch_in_80_gib": (80 - (a["hyperstep_total_gib"] - slope * a["batch"])) / slope,
        }
        print(
            f"hyperstep total ≈ {fit['intercept_gib']:.2f} + {slope:.3f} GiB × batch: "
            f"≈ {fit['largest_batch_in_80_gib']:.0f} examples (sequences) in 80 GiB"
        )
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    out = args.out or HERE / "results" / f"fits-{args.model}-{args.size}-{name}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "memory of hypersteps at full size, one weight decay per weight",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": {
                    "device": name,
                    "hostname": socket.gethostname(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "git_commit": _commit(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "memory_metric": Memory(device).metric,
                },
                "model": models.spec(args.model, args.size).description,
                "methods": methods,
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
