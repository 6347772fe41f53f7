"""What does a hyperstep cost, in units of a training step?

Measures, in one run, for an MLP (784-256-256-10) and a small CNN (3 conv + BatchNorm on 3x32x32),
both with one weight decay per weight (``hg.hparams.WeightDecay(per="parameter")``), cross-entropy
and SGD with momentum as the inner optimiser:

1. the training step (``hopt.step``), the unit every hyperstep is divided by;
2. ``hg.Implicit`` with Neumann 1/5/20 and CG(20), ``hg.Unrolled`` with K = 1/5/20;
3. for Neumann-K, its parts timed alone (validation gradient, training gradient with graph, HVP,
   mixed VJP) and hyperstep / (sum of parts);
4. peak memory / training's peak, one fresh subprocess per configuration (CUDA:
   ``max_memory_allocated``; CPU: RSS high-water marks, ``VmHWM`` on Linux since a child inherits
   its parent's ``ru_maxrss``), including Implicit with 10 vs 100 inner steps between hypersteps;
5. the same IFT hypergradient computed with torchopt (``torchopt.diff.implicit.custom_root`` with
   its Neumann / CG solvers), timed side by side, and the relative difference of the two results.

Usage::

    python benchmarks/hyperstep.py --quick                  # ~3 minutes on a 2-core CPU
    python benchmarks/hyperstep.py                          # ~10 minutes on a 2-core CPU
    python benchmarks/hyperstep.py --device cuda --out benchmarks/results/h100.json

See ``benchmarks/README.md`` for what the numbers mean.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

# torchopt 0.7 calls functorch.vjp, which torch 2.x deprecates loudly on every call
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt(\..*)?$")

try:  # torchopt is the peer we compare against; the benchmark runs without it
    import torchopt
    import torchopt.diff.implicit

    TORCHOPT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - record whatever stops the import
    torchopt = None
    TORCHOPT_ERROR = f"{type(e).__name__}: {e}"

HERE = Path(__file__).resolve().parent
LR, MOMENTUM, OUTER_LR, WD_INIT = 0.05, 0.9, 1e-3, 1e-4
CG_MAXITER, CG_DAMPING, CG_TOL = 20, 1e-3, 1e-10
NEUMANN_KS = (1, 5, 20)
UNROLLED_KS = (1, 5, 20)
BATCH = 128
CPU_MEMORY_METRIC = ("RSS high-water mark of a fresh subprocess per configuration: VmHWM from "
                     "/proc/self/status, reset via /proc/self/clear_refs between the phases (Linux); "
                     "resource.getrusage(RUSAGE_SELF).ru_maxrss elsewhere (also recorded)")


# ----------------------------------------------------------------------------- problems


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def make_cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "mlp": (make_mlp, (784,), "MLP 784-256-256-10"),
    "cnn": (make_cnn, (3, 32, 32), "CNN 3x[conv3x3+BN+ReLU] (32,64,64 ch) + linear, 3x32x32"),
}


def train_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y) + hp.penalty(model)


def val_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclasses.dataclass
class Problem:
    name: str
    model: nn.Module
    hp: hg.hparams.WeightDecay
    inner: torch.optim.Optimizer
    train_batch: tuple[Tensor, Tensor]
    val_batch: tuple[Tensor, Tensor]
    device: torch.device

    @property
    def weights(self) -> list[Tensor]:
        return list(self.model.parameters())

    @property
    def hparams(self) -> list[Tensor]:
        return list(self.hp.parameters())

    def outer(self, lr: float = OUTER_LR) -> torch.optim.Optimizer:
        if lr == 0:
            return torch.optim.SGD(self.hp.parameters(), lr=0.0)
        return torch.optim.Adam(self.hp.parameters(), lr=lr)

    def implicit(self, solver: hg.LinearSolver, outer_lr: float = OUTER_LR) -> hg.Implicit:
        return hg.Implicit(self.model, self.hp, train_loss, val_loss, inner_optimizer=self.inner,
                           outer_optimizer=self.outer(outer_lr), solver=solver)

    def unrolled(self, steps: int, own_copy: bool = False) -> hg.Unrolled:
        """Unrolled on this problem; ``own_copy`` gives it a copy of the model and inner optimiser
        (several Unrolled timed side by side must not move each other's weights: each one's
        replay has to lead to its own model's weights, or it starts a new episode)."""
        model, inner = self.model, self.inner
        if own_copy:
            model = copy.deepcopy(self.model)
            inner = type(self.inner)(model.parameters(), **self.inner.defaults)
            inner.load_state_dict(self.inner.state_dict())
        return hg.Unrolled(model, self.hp, train_loss, val_loss, inner_optimizer=inner,
                           outer_optimizer=self.outer(), steps=steps, mode="reverse")

    def torch_step(self) -> None:
        """The plain PyTorch training step (what training costs without hypergrad)."""
        self.inner.zero_grad(set_to_none=True)
        train_loss(self.model, self.hp, self.train_batch).backward()
        self.inner.step()


def make_batch(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    x = torch.randn(BATCH, *shape, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return x.to(device), y.to(device)


def make_problem(name: str, device: torch.device, seed: int = 0) -> Problem:
    build, shape, _ = MODELS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build().to(device)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=WD_INIT)
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return Problem(name, model, hp, inner, make_batch(shape, gen, device), make_batch(shape, gen, device),
                   device)


def neumann(k: int) -> hg.Neumann:
    return hg.Neumann(steps=k, alpha=LR)


def cg() -> hg.CG:
    return hg.CG(maxiter=CG_MAXITER, tol=CG_TOL, damping=CG_DAMPING)


# ----------------------------------------------------------------------------- torchopt


class TorchoptIFT:
    """The IFT hypergradient of the same problem through ``torchopt.diff.implicit.custom_root``.

    The optimality condition is the training gradient, ``torch.func.grad`` of a functional training
    loss; the "inner solver" returns the weights the training loop reached (as ``hg.Implicit``
    assumes). The hypergradient is the gradient of the validation loss at those weights w.r.t. the
    weight decays, which torchopt's custom backward computes with the given linear solver.
    BatchNorm runs on batch statistics (as in train mode) without tracking running statistics,
    which torch.func transforms cannot mutate; the loss value is the same.
    """

    def __init__(self, prob: Problem, solve: Callable[..., Any]) -> None:
        self.prob = prob
        fmodel = copy.deepcopy(prob.model)
        torch.func.replace_all_batch_norm_modules_(fmodel)
        self.fmodel = fmodel
        self.names = [n for n, _ in prob.model.named_parameters()]
        if list(prob.hp.names) != self.names:
            raise RuntimeError("WeightDecay does not cover every parameter in model order")

        def loss_at(params: Sequence[Tensor], decays_raw: Sequence[Tensor], x: Tensor, y: Tensor,
                    penalty: bool) -> Tensor:
            out = torch.func.functional_call(self.fmodel, dict(zip(self.names, params, strict=True)),
                                             (x,))
            loss = F.cross_entropy(out, y)
            if penalty:
                terms = [(r.exp() * w.square()).sum() for w, r in zip(params, decays_raw, strict=True)]
                loss = loss + 0.5 * torch.stack(terms).sum()
            return loss

        def inner_objective(params: tuple[Tensor, ...], decays_raw: tuple[Tensor, ...], x: Tensor,
                            y: Tensor) -> Tensor:
            return loss_at(params, decays_raw, x, y, True)

        optimality = torch.func.grad(inner_objective, argnums=0)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solution(params: tuple[Tensor, ...], decays_raw: tuple[Tensor, ...], x: Tensor,
                     y: Tensor) -> tuple[Tensor, ...]:
            return tuple(p.detach() for p in params)  # the training loop already solved it

        self.loss_at = loss_at
        self.solution = solution

    def __call__(self) -> tuple[Tensor, ...]:
        prob = self.prob
        params = tuple(w.detach() for w in prob.weights)
        decays_raw = tuple(prob.hparams)
        w_star = self.solution(params, decays_raw, *prob.train_batch)
        lv = self.loss_at(w_star, decays_raw, *prob.val_batch, False)
        return torch.autograd.grad(lv, decays_raw)


def torchopt_solve(spec: str) -> Callable[..., Any]:
    if spec.startswith("neumann-"):
        return torchopt.linear_solve.solve_inv(ns=True, maxiter=int(spec.split("-")[1]), alpha=LR)
    if spec.startswith("cg-"):
        return torchopt.linear_solve.solve_cg(maxiter=int(spec.split("-")[1]), rtol=CG_TOL, atol=0.0,
                                              ridge=CG_DAMPING)
    raise ValueError(spec)


# ----------------------------------------------------------------------------- timing


class Clock:
    """Wall-clock timing with device synchronisation before and after."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3, out


def summary(samples: Sequence[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "samples_ms": [round(s, 3) for s in samples]}


def ratios(samples: Sequence[float], unit: dict[str, Any]) -> dict[str, float]:
    """Ratio to the training step: of the medians (the headline) and of the minima (less
    sensitive to other processes on a shared machine)."""
    return {"ratio_to_step": statistics.median(samples) / unit["median_ms"],
            "ratio_to_step_min": min(samples) / unit["min_ms"]}


def rounds(cfg: argparse.Namespace) -> Iterator[bool]:
    """Yields ``False`` for the warm-up round(s), then ``True`` for each timed round: at least
    ``min_repeats``, at most ``repeats``, and no new one once ``budget_s`` of timed rounds passed."""
    for _ in range(cfg.warmup):
        yield False
    t0 = time.perf_counter()
    for i in range(cfg.repeats):
        if i >= cfg.min_repeats and time.perf_counter() - t0 > cfg.budget_s:
            return
        yield True


class Samples(dict):
    """name -> list of milliseconds."""

    def add(self, name: str, ms: float) -> None:
        self.setdefault(name, []).append(ms)

    def med(self, name: str) -> float:
        return statistics.median(self[name])


def buffers_of(model: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved, strict=True):
            b.copy_(s)


def rel_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    num = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True)))
    den = math.sqrt(sum(float(y.double().square().sum()) for y in b))
    return num / den if den > 0 else float("nan")


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_model(name: str, device: torch.device, cfg: argparse.Namespace) -> dict[str, Any]:
    clock = Clock(device)
    prob = make_problem(name, device)
    n_w = sum(w.numel() for w in prob.weights)
    n_h = sum(h.numel() for h in prob.hparams)
    log(f"\n== {name}: {MODELS[name][2]}; {n_w:,} weights, {n_h:,} hyperparameters, batch {BATCH}")
    out: dict[str, Any] = {"description": MODELS[name][2], "weights": n_w, "hyperparameters": n_h}
    if hasattr(os, "getloadavg"):
        out["loadavg_start"] = os.getloadavg()
    tb, vb = prob.train_batch, prob.val_batch

    base = prob.implicit(neumann(5))
    t0 = time.perf_counter()
    for _ in range(cfg.warm_train):
        base.step(tb)
    clock.sync()
    log(f"   warm-up: {cfg.warm_train} training steps in {time.perf_counter() - t0:.1f}s")

    # 1. the training step: hypergrad's step (the unit), the plain torch step, Unrolled's step
    # (which also records the weights and optimiser state), interleaved
    rec = prob.unrolled(max(UNROLLED_KS), own_copy=True)
    s = Samples()
    for i in range(2 + cfg.step_repeats):
        for key, fn in (("hg", lambda: base.step(tb)), ("torch", prob.torch_step),
                        ("unrolled", lambda: rec.step(tb))):
            ms, _ = clock(fn)
            if i >= 2:
                s.add(key, ms)
    # The unit is sampled again inside every timed round below (two steps per round), so that it
    # sees the same load as the hypersteps it divides on a shared machine; ratios use all samples.
    unit_ms: list[float] = list(s["hg"])

    def sample_unit() -> None:
        for _ in range(2):
            unit_ms.append(clock(lambda: base.step(tb))[0])

    def unit() -> dict[str, Any]:
        return summary(unit_ms)

    out["train_step"] = {
        "hypergrad_step_alone": summary(s["hg"]),
        "torch_step": summary(s["torch"]),
        "unrolled_step_with_recording": summary(s["unrolled"]),
        "hypergrad_over_torch": s.med("hg") / s.med("torch"),
        "unrolled_over_hypergrad": s.med("unrolled") / s.med("hg"),
    }
    log(f"   train step: hopt.step {s.med('hg'):.2f} ms (the unit), plain torch {s.med('torch'):.2f} ms,"
        f" Unrolled.step (records) {s.med('unrolled'):.2f} ms")

    # 2 + 3. Implicit hypersteps, interleaved with the parts of a Neumann hyperstep timed alone
    solvers: dict[str, hg.LinearSolver] = {f"neumann-{k}": neumann(k) for k in NEUMANN_KS}
    solvers[f"cg-{CG_MAXITER}"] = cg()
    hopts = {key: prob.implicit(sv) for key, sv in solvers.items()}
    cheapest = f"neumann-{min(NEUMANN_KS)}"
    iters: dict[str, list[int | None]] = {key: [] for key in hopts}
    resid: dict[str, list[float | None]] = {key: [] for key in hopts}
    s = Samples()
    w, h = prob.weights, prob.hparams
    part_names = ("val_grad", "train_grad_graph", "hvp", "mixed_vjp")

    def time_parts(record: bool) -> None:
        saved = buffers_of(prob.model)  # the parts run the real model in train mode
        ms, _ = clock(lambda: torch.autograd.grad(val_loss(prob.model, prob.hp, vb), w + h,
                                                  allow_unused=True, materialize_grads=True))
        if record:
            s.add("val_grad", ms)

        def train_graph() -> tuple[Tensor, ...]:
            return torch.autograd.grad(train_loss(prob.model, prob.hp, tb), w, create_graph=True)

        ms, gt = clock(train_graph)
        if record:
            s.add("train_grad_graph", ms)
        u = [torch.randn_like(t) for t in w]
        for _ in range(3):
            ms, _ = clock(lambda: torch.autograd.grad(gt, w, u, retain_graph=True))
            if record:
                s.add("hvp", ms)
        gt = train_graph()  # a fresh graph: the mixed VJP frees it
        ms, _ = clock(lambda: torch.autograd.grad(gt, h, u, allow_unused=True, materialize_grads=True))
        if record:
            s.add("mixed_vjp", ms)
        restore_buffers(prob.model, saved)
        # the outer optimiser's step, part of every hyper_step (not of the hypergradient)
        opt = hopts[cheapest].outer_optimizer
        saved_hp = [p.detach().clone() for p in h]
        for p, g in zip(h, u, strict=True):
            p.grad = g.mul(1e-6)
        ms, _ = clock(opt.step)
        if record:
            s.add("outer_step", ms)
        with torch.no_grad():
            for p, v in zip(h, saved_hp, strict=True):
                p.copy_(v)

    for record in rounds(cfg):
        for key, hopt in hopts.items():
            if not record and key != cheapest:
                continue  # the cheapest one warms up every kernel the others use
            ms, info = clock(lambda hopt=hopt: hopt.hyper_step(train_batch=tb, val_batch=vb))
            if record:
                s.add(key, ms)
                iters[key].append(info.solver_iterations)
                resid[key].append(info.solver_residual)
        time_parts(record)
        if record:
            sample_unit()

    out["parts"] = {k: summary(s[k]) for k in (*part_names, "outer_step")}
    parts_s = s
    fixed = s.med("val_grad") + s.med("train_grad_graph") + s.med("mixed_vjp")
    fixed_min = min(s["val_grad"]) + min(s["train_grad_graph"]) + min(s["mixed_vjp"])
    rows = []
    for key in hopts:
        row = {"method": "implicit", "solver": key, **summary(s[key]), "samples": s[key],
               "solver_iterations": iters[key], "solver_residual": resid[key]}
        if isinstance(solvers[key], hg.Neumann):
            k = solvers[key].steps
            row["sum_of_parts_ms"] = fixed + k * s.med("hvp")
            row["hyperstep_over_parts"] = s.med(key) / row["sum_of_parts_ms"]
            row["hyperstep_over_parts_min"] = min(s[key]) / (fixed_min + k * min(s["hvp"]))
            row["hyperstep_over_parts_and_outer_step"] = s.med(key) / (row["sum_of_parts_ms"]
                                                                       + s.med("outer_step"))
        rows.append(row)
        log(f"   implicit {key:<11} {s.med(key):9.2f} ms = {s.med(key) / unit()['median_ms']:6.2f} steps"
            + (f"   / parts {row['hyperstep_over_parts']:.3f}" if "sum_of_parts_ms" in row else "")
            + f"   (solver iterations {iters[key]})")
    log("   parts: " + ", ".join(f"{k} {s.med(k):.2f} ms ({s.med(k) / unit()['median_ms']:.2f} steps)"
                                  for k in (*part_names, "outer_step")))

    # 2. Unrolled (reverse mode) through the last K inner steps
    s = Samples()
    uhopts = {}
    for k in UNROLLED_KS:
        uh = prob.unrolled(k, own_copy=True)
        for _ in range(k):
            uh.step(tb)
        uhopts[k] = uh
    for record in rounds(cfg):
        for k, uh in uhopts.items():
            if not record and k != min(UNROLLED_KS):
                continue
            ms, _ = clock(lambda uh=uh: uh.hyper_step(val_batch=vb))
            if record:
                s.add(f"unrolled-{k}", ms)
        if record:
            sample_unit()
    for k in UNROLLED_KS:
        key = f"unrolled-{k}"
        rows.append({"method": "unrolled", "solver": key, "k": k, **summary(s[key]), "samples": s[key]})
        log(f"   {key:<20} {s.med(key):9.2f} ms = {s.med(key) / unit()['median_ms']:6.2f} steps")

    # 5. torchopt side by side: same weights, hyperparameters and batches
    out["torchopt"] = bench_torchopt(prob, clock, sample_unit, cfg)

    # ratios to the training step, now that all of its samples are in
    u = unit()
    out["train_step"]["hypergrad_step"] = u
    for row in rows:
        row.update(ratios(row.pop("samples"), u))
        if "k" in row:
            row["per_unrolled_step"] = row["ratio_to_step"] / row.pop("k")
    out["hypersteps"] = rows
    out["parts"]["in_train_steps"] = {k: parts_s.med(k) / u["median_ms"]
                                      for k in (*part_names, "outer_step")}
    for row in out["torchopt"].get("rows", []):
        row["hypergrad_ratio_to_step"] = row["hypergrad"]["median_ms"] / u["median_ms"]
        row["torchopt_ratio_to_step"] = row["torchopt"]["median_ms"] / u["median_ms"]
    if hasattr(os, "getloadavg"):
        out["loadavg_end"] = os.getloadavg()
    return out


def bench_torchopt(prob: Problem, clock: Clock, sample_unit: Callable[[], None],
                   cfg: argparse.Namespace) -> dict[str, Any]:
    if torchopt is None:
        log(f"   torchopt: not available ({TORCHOPT_ERROR})")
        return {"available": False, "error": TORCHOPT_ERROR}
    tb, vb = prob.train_batch, prob.val_batch
    ks = [k for k in NEUMANN_KS if not (cfg.quick and k > 5)]
    specs = [f"neumann-{k}" for k in ks] + [f"cg-{CG_MAXITER}"]
    res: dict[str, Any] = {"available": True, "version": torchopt.__version__, "rows": []}
    if cfg.quick:
        res["note"] = "--quick: Neumann-20 left out of the torchopt comparison"
    try:
        # outer lr 0: the hyperparameters stay put; within a round both libraries see the same
        # weights, hyperparameters and batches
        hg_hopts = {sp: prob.implicit(neumann(int(sp.split("-")[1])) if sp.startswith("neumann")
                                      else cg(), outer_lr=0.0) for sp in specs}
        to_fns = {sp: TorchoptIFT(prob, torchopt_solve(sp)) for sp in specs}
        s = Samples()
        hg_grads: dict[str, list[Tensor]] = {}
        to_grads: dict[str, tuple[Tensor, ...]] = {}
        hg_info: dict[str, hg.HyperStepInfo] = {}
        for record in rounds(cfg):
            if record:  # first, so that the last thing done is the compared hypergradients
                sample_unit()
            for sp in specs:
                if not record and sp != specs[0]:
                    continue
                ms, info = clock(lambda sp=sp: hg_hopts[sp].hyper_step(train_batch=tb, val_batch=vb))
                hg_info[sp] = info
                hg_grads[sp] = [p.grad.detach().clone() for p in prob.hparams]
                ms2, g = clock(to_fns[sp])
                to_grads[sp] = g
                if record:
                    s.add(f"hg/{sp}", ms)
                    s.add(f"to/{sp}", ms2)
        for sp in specs:
            hg_s, to_s = s[f"hg/{sp}"], s[f"to/{sp}"]
            row = {"solver": sp, "hypergrad": summary(hg_s), "torchopt": summary(to_s),
                   "torchopt_over_hypergrad": statistics.median(to_s) / statistics.median(hg_s),
                   "torchopt_over_hypergrad_min": min(to_s) / min(hg_s),
                   "hypergrad_solver_iterations": hg_info[sp].solver_iterations,
                   "hypergrad_norm": hg_info[sp].hypergrad_norm,
                   "hypergrad_solver_residual": hg_info[sp].solver_residual,
                   "torchopt_norm": math.sqrt(sum(float(t.double().square().sum())
                                                  for t in to_grads[sp])),
                   "rel_diff": rel_diff(hg_grads[sp], to_grads[sp])}
            its = hg_info[sp].solver_iterations
            if sp.startswith("cg") and its is not None and its > 1 and row["rel_diff"] > 1e-4:
                # hg.CG stops at the first direction of non-positive curvature, keeping the iterate
                # before it (its - 1 updates, its HVPs); torchopt's CG goes on through it. Compare
                # at equal updates too.
                same = TorchoptIFT(prob, torchopt_solve(f"cg-{its - 1}"))()
                row["rel_diff_same_updates"] = rel_diff(hg_grads[sp], same)
            res["rows"].append(row)
            log(f"   torchopt {sp:<10} hypergrad {row['hypergrad']['median_ms']:9.2f} ms  torchopt "
                f"{row['torchopt']['median_ms']:9.2f} ms  (x{row['torchopt_over_hypergrad']:.2f})  "
                f"rel diff {row['rel_diff']:.2e}"
                + (f" (at hg's {its - 1} CG updates: {row['rel_diff_same_updates']:.2e})"
                   if "rel_diff_same_updates" in row else ""))
    except Exception as e:  # noqa: BLE001 - a failing peer should not lose the rest of the run
        res["available"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"   torchopt failed: {res['error']}")
    return res


# ----------------------------------------------------------------------------- memory


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _vmhwm_bytes() -> int | None:
    """Linux: this process's own RSS high-water mark (``VmHWM``), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Linux >= 4.0: reset VmHWM to the current RSS (like ``reset_peak_memory_stats``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: plain training, then the configuration; returns the two peaks.

    CUDA: ``max_memory_allocated``, reset between the phases. CPU: RSS high-water marks. The
    process's own ``VmHWM`` (Linux), reset between the phases where ``/proc/self/clear_refs`` allows,
    is the metric; ``ru_maxrss`` is recorded too, but on Linux a child inherits its parent's
    ``ru_maxrss`` at exec (the kernel keeps the larger of the two), so started from this benchmark
    it reports the benchmark's own peak from its first line (see ``ru_maxrss_at_start``).
    """
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    out: dict[str, Any] = {"ru_maxrss_at_start": _maxrss_bytes()}
    use_hwm = not cuda and _vmhwm_bytes() is not None

    def mark() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated(device)
        return _vmhwm_bytes() if use_hwm else _maxrss_bytes()  # type: ignore[return-value]

    def reset() -> bool:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return True
        return use_hwm and _reset_hwm()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    prob = make_problem(spec["model"], device)
    sync()
    out["metric"] = "max_memory_allocated" if cuda else ("VmHWM" if use_hwm else "ru_maxrss")
    out["peak_reset_between_phases"] = reset()
    # what is there before training: the CUDA context / Python runtime, the model, the batches
    out["base_bytes"] = torch.cuda.memory_allocated(device) if cuda else mark()
    tb, vb = prob.train_batch, prob.val_batch
    # phase 1: ordinary training (the plain torch loop)
    for _ in range(spec["warm_steps"]):
        prob.torch_step()
    sync()
    out["train_peak_bytes"] = mark()
    out["ru_maxrss_train"] = _maxrss_bytes()
    reset()
    # phase 2: the configuration: inner steps (hopt.step), then a hyperstep; n_hyper times
    method = spec["method"]
    hyper: Callable[[], Any] | None
    hopt: hg.HyperOptimizer
    if method == "train":
        hopt, hyper = prob.implicit(neumann(5)), None
    elif method.startswith("implicit-neumann-"):
        hopt = prob.implicit(neumann(int(method.rsplit("-", 1)[1])))
        hyper = lambda: hopt.hyper_step(train_batch=tb, val_batch=vb)  # noqa: E731
    elif method.startswith("implicit-cg-"):
        hopt = prob.implicit(cg())
        hyper = lambda: hopt.hyper_step(train_batch=tb, val_batch=vb)  # noqa: E731
    elif method.startswith("unrolled-"):
        hopt = prob.unrolled(int(method.rsplit("-", 1)[1]))
        hyper = lambda: hopt.hyper_step(val_batch=vb)  # noqa: E731
    elif method.startswith("torchopt-"):
        if torchopt is None:
            return {"error": f"torchopt unavailable: {TORCHOPT_ERROR}"}
        hopt, hyper = prob.implicit(neumann(5)), TorchoptIFT(prob, torchopt_solve(method[9:]))
    else:
        raise ValueError(method)
    for _ in range(spec["n_hyper"]):
        for _ in range(spec["inner_between"]):
            hopt.step(tb)
        if hyper is not None:
            hyper()
    sync()
    out["hyper_peak_bytes"] = mark()
    out["ru_maxrss_hyper"] = _maxrss_bytes()
    return out


def memory_configs(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    n = cfg.mem_inner
    out = [{"method": "train", "inner_between": n}]
    out += [{"method": f"implicit-neumann-{k}", "inner_between": n} for k in NEUMANN_KS]
    out += [{"method": f"implicit-cg-{CG_MAXITER}", "inner_between": n}]
    out += [{"method": "implicit-neumann-5", "inner_between": m} for m in (10, 100) if m != n]
    out += [{"method": f"unrolled-{k}", "inner_between": max(n, k)} for k in UNROLLED_KS]
    out += [{"method": "torchopt-neumann-5", "inner_between": n}]
    return out


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"error": (proc.stderr or proc.stdout or f"exit code {proc.returncode}")[-2000:]}
    res["seconds"] = time.perf_counter() - t0
    return res


def bench_memory(name: str, device: torch.device, cfg: argparse.Namespace) -> list[dict[str, Any]]:
    kind = "max_memory_allocated" if device.type == "cuda" else "RSS high-water mark"
    jobs = max(1, cfg.mem_jobs)
    threads = max(1, torch.get_num_threads() // jobs) if device.type == "cpu" else torch.get_num_threads()
    log(f"   memory ({kind}; one fresh subprocess per configuration, {jobs} at a time):")
    configs = memory_configs(cfg)
    specs = [{"model": name, "device": str(device), "warm_steps": cfg.mem_warm, "n_hyper": cfg.mem_hyper,
              "threads": threads, **c} for c in configs]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(_run_worker, specs))
    rows = []
    for c, res in zip(configs, results, strict=True):
        row: dict[str, Any] = {**c, **res}
        if "error" not in res:
            b, tp, hp = res["base_bytes"], res["train_peak_bytes"], res["hyper_peak_bytes"]
            row["ratio"] = hp / tp
            row["excess_ratio"] = (hp - b) / (tp - b) if tp > b else float("nan")
            log(f"     {c['method']:<20} inner {c['inner_between']:>3}: train {tp / 2**20:8.1f} MiB, "
                f"hyper {hp / 2**20:8.1f} MiB, ratio {row['ratio']:.2f}  (above the "
                f"{b / 2**20:.0f} MiB before training: {row['excess_ratio']:.2f})  [{res['seconds']:.0f}s]")
        else:
            log(f"     {c['method']}: failed: {res['error'][-400:]}")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hypergrad": hg.__version__,
        "torchopt": getattr(torchopt, "__version__", None),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def print_tables(results: dict[str, Any]) -> None:
    log("\n" + "=" * 104)
    m = results["machine"]
    log(f"{m['device']} | {m['gpu'] or m['cpu_model']} | {m['cpu_count']} CPUs, {m['torch_threads']} "
        f"torch threads | torch {m['torch']} | load average at start {m.get('loadavg_start')}")
    for name, r in results["models"].items():
        ts = r["train_step"]
        unit = ts["hypergrad_step"]["median_ms"]
        log(f"\n{name}: {r['description']} ({r['weights']:,} weights, {r['hyperparameters']:,} "
            f"hyperparameters)")
        log(f"  unit: training step hopt.step = {unit:.2f} ms (plain torch step "
            f"{ts['torch_step']['median_ms']:.2f} ms; Unrolled.step, which records, "
            f"{ts['unrolled_step_with_recording']['median_ms']:.2f} ms)")
        mem = {(x["method"], x["inner_between"]): x for x in r.get("memory", []) if "ratio" in x}
        inner = min((ib for _, ib in mem), default=None)
        log(f"  {'hyperstep':<20}{'ms':>10}{'÷ step':>9}{'(min)':>8}{'÷ parts':>9}{'(min)':>8}"
            f"{'mem ÷ train':>13}{'(excess)':>10}  solver iterations")
        for row in r["hypersteps"]:
            key = ("implicit-" + row["solver"]) if row["method"] == "implicit" else row["solver"]
            mm = mem.get((key, inner)) or next((v for (k, _), v in mem.items() if k == key), None)
            mr = f"{mm['ratio']:.2f}" if mm else "-"
            me = f"{mm['excess_ratio']:.2f}" if mm else "-"
            parts = f"{row['hyperstep_over_parts']:.3f}" if "hyperstep_over_parts" in row else "-"
            parts_min = (f"{row['hyperstep_over_parts_min']:.3f}" if "hyperstep_over_parts_min" in row
                         else "-")
            its = row.get("solver_iterations", "")
            its = sorted(set(its)) if its else ""
            log(f"  {key:<20}{row['median_ms']:10.2f}{row['ratio_to_step']:9.2f}"
                f"{row['ratio_to_step_min']:8.2f}{parts:>9}{parts_min:>8}{mr:>13}{me:>10}  {its}")
        p = r["parts"]
        log("  parts, ms (÷ step): " + ", ".join(
            f"{k} {p[k]['median_ms']:.2f} ({p['in_train_steps'][k]:.2f})"
            for k in ("val_grad", "train_grad_graph", "hvp", "mixed_vjp", "outer_step")))
        for (meth, ib), v in sorted(mem.items()):
            if meth in ("train", "torchopt-neumann-5") or (meth == "implicit-neumann-5" and ib != inner):
                log(f"  memory {meth} with {ib} inner steps per hyperstep: ratio {v['ratio']:.3f} "
                    f"(excess {v['excess_ratio']:.3f}), peak {v['hyper_peak_bytes'] / 2**20:.1f} MiB")
        if ("implicit-neumann-5", inner) in mem:
            v = mem[("implicit-neumann-5", inner)]
            log(f"  memory implicit-neumann-5 with {inner} inner steps per hyperstep: ratio "
                f"{v['ratio']:.3f} (excess {v['excess_ratio']:.3f}), peak "
                f"{v['hyper_peak_bytes'] / 2**20:.1f} MiB")
        to = r["torchopt"]
        if to.get("available"):
            log(f"  torchopt {to['version']}, same IFT hypergradient:")
            log(f"    {'solver':<12}{'hypergrad ms':>14}{'torchopt ms':>13}{'to ÷ hg':>9}{'(min)':>7}"
                f"{'rel diff':>11}")
            for row in to["rows"]:
                extra = (f"   at hg's {row['hypergrad_solver_iterations'] - 1} CG updates: "
                         f"{row['rel_diff_same_updates']:.1e}" if "rel_diff_same_updates" in row else "")
                log(f"    {row['solver']:<12}{row['hypergrad']['median_ms']:14.2f}"
                    f"{row['torchopt']['median_ms']:13.2f}{row['torchopt_over_hypergrad']:9.2f}"
                    f"{row['torchopt_over_hypergrad_min']:7.2f}{row['rel_diff']:11.1e}{extra}")
        else:
            log(f"  torchopt: unavailable ({to.get('error')})")


def default_out(device: torch.device) -> Path:
    if device.type == "cuda":
        tag = torch.cuda.get_device_name(device)
    else:
        tag = f"{socket.gethostname()}-cpu{os.cpu_count()}"
    return HERE / "results" / (re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-") + ".json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (about 3 minutes on 2 CPU cores)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: benchmarks/results/<gpu-name or hostname-cpuN>.json)")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated subset of: mlp,cnn")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per hyperstep (median)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-jobs", type=int, default=None,
                    help="memory subprocesses run at a time (default: 2 with --quick, else 1)")
    args = ap.parse_args(argv)
    q = args.quick
    args.warm_train = 10 if q else 50  # training steps before anything is timed
    args.warmup = 1  # warm-up rounds (of the cheapest configuration of each family)
    args.repeats = args.repeats or (3 if q else 7)  # timed rounds, median taken
    args.min_repeats = min(args.repeats, 2 if q else 5)
    args.budget_s = 15.0 if q else 600.0  # no new timed round after this long (quick: CNN on CPU)
    args.step_repeats = 6 if q else 30
    args.mem_warm = 3 if q else 20
    args.mem_hyper = 1 if q else 2
    args.mem_inner = 10
    args.mem_jobs = args.memory_jobs or (2 if q else 1)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:  # one memory configuration, in its own process
        spec = json.loads(args.worker)
        torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
        print(json.dumps(memory_worker(spec)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "hypergrad hyperstep cost",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {
            "quick": args.quick, "batch": BATCH, "inner_optimizer": f"SGD(lr={LR}, momentum={MOMENTUM})",
            "outer_optimizer": f"Adam(lr={OUTER_LR})", "hparams": f"WeightDecay(per='parameter', "
            f"init={WD_INIT})", "neumann_alpha": LR, "cg": {"maxiter": CG_MAXITER, "tol": CG_TOL,
                                                          "damping": CG_DAMPING},
            "warm_train_steps": args.warm_train, "warmup": args.warmup, "repeats": args.repeats,
            "step_repeats": args.step_repeats, "memory_warm_steps": args.mem_warm,
            "memory_hypersteps": args.mem_hyper,
            "memory_metric": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                              else CPU_MEMORY_METRIC),
            "torchopt_error": TORCHOPT_ERROR,
        },
        "models": {},
    }
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        r = bench_model(name, device, args)
        if not args.no_memory:
            r["memory"] = bench_memory(name, device, args)
        results["models"][name] = r
    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t_start
    print_tables(results)
    out = args.out or default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"\nwrote {out} ({results['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
