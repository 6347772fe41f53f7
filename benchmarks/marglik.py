"""Benchmark: cost per hypergradient of the stochastic NTK bound against full-data evidences.

On the digits MLP 64-128-10 (scikit-learn's digits, 1,000 training images, one precision per
layer, MAP weights from a short full-batch Adam run), one torch thread, CPU time
(``time.process_time``, robust to other processes on a shared machine), it times one
hypergradient (the value and its gradient w.r.t. the log precisions) of

* ``hg.log_evidence_bound`` on one batch of M = 50, 100, 500 examples (one block), float32 and
  float64, layerwise kernels, with the full ``(MC, MC)`` kernel (``outputs="all"``) and with one
  ``(M, M)`` kernel per output (``outputs="each"``, the cheaper, looser bound); at M = 100 also one
  sampled output (``outputs="sampled"``, unbiased for "each") and the dense ``torch.func``
  Jacobian product for comparison;
* the exact linearised-Laplace evidence ``hg.log_evidence`` on all 1,000 examples (float64);
* laplace-torch's Kronecker-factored evidence (fit + ``log_marginal_likelihood`` + backward),
  where it imports (install it with ``pip install --no-deps laplace-torch asdfghjkl
  backpack-for-pytorch torchmetrics lightning-utilities curvlinops-for-pytorch opt_einsum einops``
  into .venv: never a default dependency);

and reports the ratios, and each bound's value and gap to the exact evidence (the bound's
expectation is the partition bound over the 1,000/M disjoint batches; its spread across batches
is reported too).

Usage::

    .venv/bin/python benchmarks/marglik.py            # ~2-4 minutes on 2 cores
    .venv/bin/python benchmarks/marglik.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import hypergrad as hg

HERE = Path(__file__).resolve().parent
N = 1000


def cpu_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    """Median CPU seconds of ``fn`` over ``reps`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), times


def setup(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits.target), generator=g)[:N]
    x = torch.tensor(digits.data, dtype=dtype)[perm] / 16.0
    y = torch.tensor(digits.target)[perm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0)}).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # MAP at precision 1: full-batch Adam
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + hp["prior"].penalty(model) / N
        loss.backward()
        opt.step()
    return model, hp, x, y


def hypergradient(model: nn.Module, hp: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> float:
    value = hg.log_evidence_bound(model, x, y, hp["prior"], data_size=N, **kw)
    torch.autograd.grad(value, list(hp.parameters()))
    return float(value.detach())


def laplace_kron(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, Any]:
    try:
        from laplace import Laplace
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N)
    log_prec = torch.zeros(1, dtype=x.dtype, requires_grad=True)  # one global precision
    out: dict[str, Any] = {}

    def fit_and_grad() -> None:
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        la.fit(loader, progress_bar=False)
        lml = la.log_marginal_likelihood(prior_precision=log_prec.exp())
        torch.autograd.grad(lml, [log_prec])
        out["value"] = float(lml.detach())

    try:
        med, times = cpu_time(fit_and_grad, reps)
    except Exception as e:  # noqa: BLE001
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    return {"available": True, "seconds": med, "all_seconds": times, "value": out["value"]}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    except OSError:
        commit = ""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hypergrad": hg.__version__,
        "git_commit": commit.strip(),
        "loadavg_start": list(os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "marglik-cpu-2core.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = 3 if args.quick else 10
    info = machine()
    model64, hp64, x64, y64 = setup(torch.float64)
    model32, hp32, x32, y32 = setup(torch.float32)

    t0 = time.process_time()
    ev = hg.log_evidence(model64, x64, y64, hp64["prior"])
    torch.autograd.grad(ev, list(hp64.parameters()))
    exact_seconds = time.process_time() - t0  # one evaluation with its gradient
    exact_value = float(ev.detach())
    print(f"exact evidence {exact_value:.1f} ({exact_seconds:.2f} s CPU per evaluation)")

    rows = []
    for m in (50, 100, 500):
        for dtype, (model, hp, x, y) in (
            ("float32", (model32, hp32, x32, y32)),
            ("float64", (model64, hp64, x64, y64)),
        ):
            variants: list[tuple[str, dict[str, Any]]] = [
                ("layerwise", {}),
                ("layerwise, outputs=each", {"outputs": "each"}),
            ]
            if m == 100:
                variants += [
                    ("layerwise, outputs=sampled", {"outputs": "sampled"}),
                    ("dense", {"kernel": "dense"}),
                ]
            for name, kw in variants:
                r = reps if m <= 100 else max(2, reps // 3)

                def once(
                    m: int = m,
                    kw: dict[str, Any] = kw,
                    model: nn.Module = model,
                    hp: nn.Module = hp,
                    x: torch.Tensor = x,
                    y: torch.Tensor = y,
                ) -> float:
                    return hypergradient(model, hp, x[:m], y[:m], **kw)

                sec, times = cpu_time(once, r)
                row: dict[str, Any] = {"M": m, "dtype": dtype, "variant": name, "seconds": sec}
                if dtype == "float64":
                    vals = [
                        hypergradient(model, hp, x[i : i + m], y[i : i + m], **kw) for i in range(0, N, m)
                    ]
                    mean = statistics.fmean(vals)
                    row |= {
                        "bound_mean_over_partition": mean,
                        "bound_sd_across_batches": statistics.stdev(vals),
                        "gap_to_exact": exact_value - mean,
                    }
                row["speedup_vs_exact"] = exact_seconds / sec
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})

    opt = torch.optim.Adam(model32.parameters(), lr=0.0)

    def train_step() -> None:
        opt.zero_grad()  # lr 0: the MAP weights stay as they are
        loss = nn.functional.cross_entropy(model32(x32[:100]), y32[:100]) + hp32["prior"].penalty(model32) / N
        loss.backward()
        opt.step()

    step_seconds, _ = cpu_time(train_step, reps * 5)
    print(f"plain PyTorch MAP step (batch 100, float32): {step_seconds * 1e3:.2f} ms")
    kron = laplace_kron(model32, x32, y32, max(2, reps // 2))
    if kron.get("available"):
        kron["gap_to_exact"] = exact_value - kron["value"]
        kron["note"] = "fit on 1,000 examples (float32) + log_marginal_likelihood + backward"
        for row in rows:
            row["speedup_vs_kron"] = kron["seconds"] / row["seconds"]
    print("laplace-torch kron:", kron)
    info["loadavg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "hypergrad marginal likelihood: bound per hypergradient vs full-data evidence",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "problem": "digits MLP 64-128-10 (ReLU), N = 1000, one prior precision per layer, MAP at precision 1",
        "timing": "CPU seconds (time.process_time), one torch thread, median over repetitions",
        "exact": {"value": exact_value, "seconds": exact_seconds, "dtype": "float64"},
        "laplace_kron": kron,
        "bound": rows,
        # the schema every benchmarks/results/*.json shares (tests/test_repository.py)
        "models": {
            "digits-mlp-64-128-10": {
                "train_step": {
                    "torch_step": {"median_ms": step_seconds * 1e3, "batch": 100, "dtype": "float32"}
                },
                "hypersteps": {
                    f"bound M={r['M']} {r['variant']} {r['dtype']}": {
                        "median_ms": r["seconds"] * 1e3,
                        "train_steps": r["seconds"] / step_seconds,
                    }
                    for r in rows
                },
            }
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
